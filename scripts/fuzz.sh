#!/usr/bin/env bash
# Fuzzes warren-protocol's inbound codec (target `frames`) for a bounded time.
# Usage: scripts/fuzz.sh [SECONDS]   (default 60). Exits non-zero if a crash is found; the
# crashing input is left in protocol/fuzz/artifacts/frames/.
#
# Only the stable toolchain is installed; cargo-fuzz needs nightly-only rustc flags, which
# RUSTC_BOOTSTRAP=1 unlocks. AddressSanitizer is used when it works on this toolchain, else
# the run falls back to `-s none` (Rust code is memory-safe; the fuzzer still finds panics,
# overflows in debug assertions, and stack overflows).
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/protocol"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
# Never pick up the host's target dir for these nightly-flagged builds.
unset CARGO_TARGET_DIR

sanitizer=address
if ! cargo fuzz build -s address frames >/dev/null 2>"${TMPDIR:-/tmp}/warren-fuzz-build.log"; then
    echo "fuzz.sh: building with AddressSanitizer failed, using -s none" >&2
    sanitizer=none
    cargo fuzz build -s none frames
fi

corpus="fuzz/corpus/frames"
mkdir -p "$corpus"
# The first corpus directory collects new inputs; the committed seeds are read only.
exec cargo fuzz run -s "$sanitizer" frames "$corpus" fuzz/seeds/frames -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
