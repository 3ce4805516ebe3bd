#!/usr/bin/env bash
# Differential test: the same clients against RabbitMQ 3.10 and against Warren, comparing what
# they observe. Exits non-zero on any difference (or on a test whose expectation RabbitMQ
# itself does not meet).
#
#   scripts/differential.sh [--no-rust] [--no-pytest] [--no-scenarios] [--keep]
#
# Outside CI it is skipped (exit 0) with WARREN_SKIP_RABBITMQ=1 or when rabbitmq-server is
# missing and cannot be installed, like the differential stage of scripts/test.
#
# Stages:
#   pytest     the parametrised Python suites (test_messaging_*.py, test_kombu.py,
#              test_aio_pika.py): every test runs as [warren] (a Warren spawned per test) and
#              [rabbitmq] (RABBITMQ_ADDR) in one pytest run; a test that passes against
#              RabbitMQ must pass against Warren, and every test must pass against RabbitMQ
#   scenarios  interop-tests/differential/scenarios.py run against both brokers; the full
#              transcripts (reply codes and complete texts, counts, bodies, flags, routing)
#              must be identical
#   rust       the messaging Rust tests (tests/tests/messaging.rs, interop-tests/tests/
#              messaging_lapin.rs, messaging_amqprs.rs) once with AMQP_ADDR=RabbitMQ and once
#              against Warren; the outcomes must agree
#
# RabbitMQ: RABBITMQ_ADDR=host:port uses a running broker; otherwise scripts/rabbitmq.sh starts
# a private node (idempotent) on $RABBITMQ_PORT or a random port in 20000..39999 and stops it
# at the end unless --keep. Warren: $WARREN_BIN, else target/debug/warren (built here).
# Reports go to $DIFF_OUT (default target/differential).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUN_RUST=1 RUN_PYTEST=1 RUN_SCENARIOS=1 KEEP=0
for arg in "$@"; do
  case $arg in
    --no-rust) RUN_RUST=0 ;;
    --no-pytest) RUN_PYTEST=0 ;;
    --no-scenarios) RUN_SCENARIOS=0 ;;
    --keep) KEEP=1 ;;
    -h | --help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0
      ;;
    *)
      echo "differential.sh: unknown argument $arg" >&2
      exit 2
      ;;
  esac
done

# Same skip rules as scripts/test's differential stage: optional outside CI.
if [[ -z ${RABBITMQ_ADDR:-} && ${CI:-} != true ]]; then
  if [[ ${WARREN_SKIP_RABBITMQ:-} == 1 ]]; then
    echo "differential.sh: skipped (WARREN_SKIP_RABBITMQ=1)"
    exit 0
  fi
  if [[ $(id -u) != 0 ]] && [[ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] &&
    ! sudo -n true 2>/dev/null; then
    echo "differential.sh: skipped (rabbitmq-server is not installed and installing it needs root)"
    exit 0
  fi
fi

OUT=${DIFF_OUT:-$ROOT/target/differential}
mkdir -p "$OUT"
PY=$ROOT/.venv/bin/python
if [[ ! -x $PY ]]; then
  scripts/setup-python.sh || exit 1
fi

# ---- Warren ----------------------------------------------------------------------------------
if [[ -z ${WARREN_BIN:-} ]]; then
  echo "== cargo build --bin warren"
  cargo build --bin warren || exit 1
  export WARREN_BIN=$ROOT/target/debug/warren
fi

# ---- RabbitMQ --------------------------------------------------------------------------------
STARTED_PORT=""
if [[ -n ${RABBITMQ_ADDR:-} ]]; then
  echo "== using RabbitMQ at $RABBITMQ_ADDR"
else
  port=""
  for try in 1 2 3; do
    candidate=${RABBITMQ_PORT:-$((20000 + (RANDOM * 32768 + RANDOM) % 20000))}
    if scripts/rabbitmq.sh start "$candidate" >/dev/null; then
      port=$candidate
      break
    fi
    echo "RabbitMQ did not start on port $candidate (attempt $try)"
    scripts/rabbitmq.sh stop "$candidate" >/dev/null 2>&1 || true
    [[ -n ${RABBITMQ_PORT:-} ]] && break
  done
  if [[ -z $port ]]; then
    echo "differential.sh: could not start RabbitMQ with scripts/rabbitmq.sh" >&2
    exit 1
  fi
  STARTED_PORT=$port
  export RABBITMQ_ADDR=127.0.0.1:$port
  echo "== RabbitMQ started on $RABBITMQ_ADDR"
fi

cleanup() {
  if [[ -n $STARTED_PORT && $KEEP == 0 ]]; then
    scripts/rabbitmq.sh stop "$STARTED_PORT" >/dev/null 2>&1 || true
  fi
  if [[ -n ${WARREN_PID:-} ]]; then
    kill "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

declare -a FAILED_STAGES=()

# ---- pytest: [warren] and [rabbitmq] side by side --------------------------------------------
if ((RUN_PYTEST)); then
  echo
  echo "== pytest: parametrised suites against Warren and RabbitMQ"
  # AMQP_ADDR would point the [warren] side at another broker: not here.
  env -u AMQP_ADDR "$PY" -m pytest interop-tests/python/test_messaging_*.py \
    interop-tests/python/test_kombu.py interop-tests/python/test_aio_pika.py \
    -n 2 -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" -o junit_family=xunit1 \
    >"$OUT/pytest.log" 2>&1
  tail -n 3 "$OUT/pytest.log"
  if ! "$PY" interop-tests/differential/diff.py junit "$OUT/pytest.xml" | tee "$OUT/pytest-diff.txt"; then
    FAILED_STAGES+=(pytest)
  fi
fi

# ---- scenario transcripts --------------------------------------------------------------------
start_warren() {
  local port dir
  for _ in 1 2 3 4 5; do
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    dir=$(mktemp -d "${TMPDIR:-/tmp}/warren-diff.XXXXXX")
    "$WARREN_BIN" --listen "127.0.0.1:$port" --data-dir "$dir/data" >"$OUT/warren-scenarios.log" 2>&1 &
    WARREN_PID=$!
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        WARREN_ADDR=127.0.0.1:$port
        return 0
      fi
      kill -0 "$WARREN_PID" 2>/dev/null || break
      sleep 0.05
    done
    kill "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
  done
  echo "differential.sh: Warren did not start; see $OUT/warren-scenarios.log" >&2
  return 1
}

if ((RUN_SCENARIOS)); then
  echo
  echo "== scenarios: full transcripts, RabbitMQ vs Warren"
  if start_warren; then
    "$PY" interop-tests/differential/diff.py run "$RABBITMQ_ADDR" "$OUT/scenarios-rabbitmq.json"
    "$PY" interop-tests/differential/diff.py run "$WARREN_ADDR" "$OUT/scenarios-warren.json"
    kill "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
    WARREN_PID=""
    if ! "$PY" interop-tests/differential/diff.py compare "$OUT/scenarios-rabbitmq.json" \
      "$OUT/scenarios-warren.json" | tee "$OUT/scenarios-diff.txt"; then
      FAILED_STAGES+=(scenarios)
    fi
  else
    FAILED_STAGES+=(scenarios)
  fi
fi

# ---- Rust messaging tests: RabbitMQ run vs Warren run ----------------------------------------
if ((RUN_RUST)); then
  echo
  echo "== rust: messaging tests with AMQP_ADDR=RabbitMQ, then against Warren"
  rust_run() {
    cargo test --no-fail-fast -p warren-tests --test messaging 2>&1
    cargo test --no-fail-fast -p warren-interop-tests --test messaging_lapin \
      --test messaging_amqprs 2>&1
  }
  AMQP_ADDR=$RABBITMQ_ADDR AMQP_HANDSHAKE_TIMEOUT_MS=3000 rust_run >"$OUT/rust-rabbitmq.log"
  env -u AMQP_ADDR bash -c "$(declare -f rust_run); rust_run" >"$OUT/rust-warren.log"
  if ! "$PY" interop-tests/differential/diff.py cargo "$OUT/rust-rabbitmq.log" \
    "$OUT/rust-warren.log" | tee "$OUT/rust-diff.txt"; then
    FAILED_STAGES+=(rust)
  fi
fi

echo
if ((${#FAILED_STAGES[@]})); then
  echo "differential: DIFFERENCES in: ${FAILED_STAGES[*]} (reports in $OUT)"
  exit 1
fi
echo "differential: Warren and RabbitMQ agree (reports in $OUT)"
