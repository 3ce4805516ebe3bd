#!/usr/bin/env bash
# Crash soak: the kill -9 trials of tests/tests/crash.rs, many times over (CI runs 20).
#
#   scripts/crash-soak.sh [TRIALS]        default 200
#
# Each trial starts warren on its own port and data dir, publishes persistent messages with
# confirms while a consumer acks, kills the broker with SIGKILL after a random 50-500 ms,
# restarts it and checks every message (see the module doc of tests/tests/crash.rs for the
# invariants). A failed trial keeps its data directory and prints where.
#
# Environment:
#   SOAK_PROFILE=release|debug   release (default): release broker and test binary, so each
#                                trial moves far more messages; debug: the binary CI uses
#   WARREN_CRASH_PARALLEL=N      trials at once (default 4)
#   WARREN_CRASH_SEED=S          base seed, to replay a run (every run prints its own)
#   WARREN_BIN=PATH              the broker binary to test (overrides SOAK_PROFILE's)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TRIALS=${1:-200}
if ! [[ $TRIALS =~ ^[0-9]+$ ]] || ((TRIALS < 1)); then
  echo "crash-soak.sh: TRIALS must be a positive integer, got '$TRIALS'" >&2
  exit 2
fi
PROFILE=${SOAK_PROFILE:-release}

case $PROFILE in
  release)
    cargo build --release --bin warren
    export WARREN_BIN=${WARREN_BIN:-$ROOT/target/release/warren}
    cargo_args=(--release)
    ;;
  debug)
    cargo build --bin warren
    cargo_args=()
    ;;
  *)
    echo "crash-soak.sh: SOAK_PROFILE must be release or debug, got '$PROFILE'" >&2
    exit 2
    ;;
esac

echo "crash-soak: $TRIALS trials, broker ${WARREN_BIN:-target/debug/warren}, ${WARREN_CRASH_PARALLEL:-4} at a time" >&2
start=$SECONDS
rc=0
WARREN_CRASH_TRIALS=$TRIALS cargo test -p warren-tests --test crash "${cargo_args[@]}" -- --nocapture \
  || rc=$?
echo "crash-soak: $TRIALS trials in $((SECONDS - start)) s: $([[ $rc == 0 ]] && echo passed || echo FAILED)" >&2
exit "$rc"
