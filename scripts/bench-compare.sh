#!/usr/bin/env bash
# Compare Warren with RabbitMQ 3.10 and garagemq (both from Debian) under the same load, and
# write docs/performance.md.
#
#   scripts/bench-compare.sh [--rounds N] [--quick] [--duration SECS] [--scenarios abcdefgh]
#                            [--brokers "warren rabbitmq garagemq"] [--h-messages N]
#                            [--out FILE] [--no-build] [--keep] [--no-isolate]
#
# Builds the release binaries once (warren, warren-perf), installs rabbitmq-server and
# garagemq with apt-get when missing, starts each broker on its own 127.0.0.1 port with its
# state in a temp directory, then runs every scenario against every broker interleaved
# (round 1: a on each broker, b on each broker, ...; round 2: ...), and writes a markdown
# table of medians and Warren/RabbitMQ ratios with the machine and the exact command.
# The load generator (warren-perf) runs on the same machine and shares its cores.
#
#   (a) 1 producer / 1 consumer, 16 B transient, auto-ack
#   (b) the same with 1 KiB
#   (c) 1 KiB persistent, durable queue, confirms window 1000, prefetch 1000, ack every 100
#   (d) 64 KiB transient, auto-ack
#   (e) fanout to 10 queues, 10 consumers (1 KiB, auto-ack)
#   (f) 10 producers / 10 consumers on 10 queues (1 KiB, auto-ack)
#   (g) fixed 1,000 msg/s, 1 KiB, auto-ack: latency percentiles (one generator thread)
#   (h) N x 16 B persistent published with confirms (default 1,000,000), then broker RSS,
#       graceful stop, restart time (until a passive declare shows all N), drain time
#
# --quick: 3 s per run, 1 round, 100,000 messages in (h): a smoke run.
# While one broker runs a scenario the others are paused (SIGSTOP, then SIGCONT), so that
# their idle work (the Erlang VM's spinning schedulers, Go's runtime) does not take the
# shared cores from the broker under test; --no-isolate leaves them running.
# Every run is bounded by `timeout`; all traffic stays on 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="scripts/bench-compare.sh${*:+ $*}"
ROUNDS=3
DURATION=10
H_MESSAGES=1000000
SCENARIOS=abcdefgh
BROKERS="warren rabbitmq garagemq"
OUT="$ROOT/docs/performance.md"
BUILD=1
KEEP=0
QUICK=0
ISOLATE=1
rounds_set=0 duration_set=0 h_set=0

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; rounds_set=1; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --duration) DURATION=$2; duration_set=1; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --brokers) BROKERS=$2; shift 2 ;;
    --h-messages) H_MESSAGES=$2; h_set=1; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --no-isolate) ISOLATE=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-compare.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if ((QUICK)); then
  ((rounds_set)) || ROUNDS=1
  ((duration_set)) || DURATION=3
  ((h_set)) || H_MESSAGES=100000
fi
for n in "$ROUNDS" "$DURATION" "$H_MESSAGES"; do
  [[ $n =~ ^[0-9]+$ ]] && ((n > 0)) || { echo "bench-compare.sh: '$n' is not a positive integer" >&2; exit 2; }
done

RMQ_PORT=${BENCH_RABBITMQ_PORT:-5781}
GMQ_PORT=${BENCH_GARAGEMQ_PORT:-5782}
GMQ_ADMIN_PORT=${BENCH_GARAGEMQ_ADMIN_PORT:-15782}
WARREN_PORT=${BENCH_WARREN_PORT:-5783}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/warren-bench.XXXXXX")
RESULTS="$WORK/results.jsonl"
NOTES="$WORK/notes.txt"
: >"$RESULTS"
: >"$NOTES"
PERF="$ROOT/target/release/warren-perf"

# shellcheck source=bench/brokers.sh
source "$ROOT/scripts/bench/brokers.sh"

note() { bench_log "$*"; echo "$*" >>"$NOTES"; }

STARTED=()
# pause_others BROKER: SIGSTOP every other started broker (with --no-isolate: nothing).
pause_others() {
  ((ISOLATE)) || return 0
  local o pid
  for o in "${STARTED[@]}"; do
    [[ $o == "$1" ]] && continue
    pid=$(broker_pid "$o" 2>/dev/null || true)
    [[ -n $pid ]] && kill -STOP "$pid" 2>/dev/null || true
  done
}
resume_all() {
  local o pid
  for o in "${STARTED[@]}"; do
    pid=$(broker_pid "$o" 2>/dev/null || true)
    [[ -n $pid ]] && kill -CONT "$pid" 2>/dev/null || true
  done
}
cleanup() {
  local b
  # A stopped process would hold a SIGTERM pending forever.
  resume_all
  for b in "${STARTED[@]}"; do broker_stop "$b" || true; done
  if ((KEEP)); then
    bench_log "state and logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build ----
if ((BUILD)); then
  bench_log "building release binaries (cargo build --release -p warren-broker --bins)"
  (cd "$ROOT" && cargo build --release -p warren-broker --bins) >&2
fi
for bin in warren warren-perf; do
  [[ -x $ROOT/target/release/$bin ]] || { bench_log "missing target/release/$bin"; exit 1; }
done

# ---- brokers ----
ACTIVE=()
for b in $BROKERS; do
  case $b in
    warren | rabbitmq) ;;
    garagemq)
      if ! install_garagemq; then
        note "garagemq: not packaged for this system (apt-cache policy garagemq has no candidate); results are Warren and RabbitMQ only."
        continue
      fi
      ;;
    *) bench_log "unknown broker '$b'"; exit 2 ;;
  esac
  if port_open "$(broker_port "$b")"; then
    bench_log "port $(broker_port "$b") for $b is already taken; set BENCH_${b^^}_PORT"
    exit 1
  fi
  bench_log "starting $b on 127.0.0.1:$(broker_port "$b")"
  STARTED+=("$b")
  if broker_start "$b"; then
    ACTIVE+=("$b")
  else
    note "$b: failed to start; left out of this run."
  fi
done
((${#ACTIVE[@]})) || { bench_log "no broker started"; exit 1; }

broker_version() {
  case $1 in
    warren) echo "Warren $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '+local changes') (release build)" ;;
    rabbitmq) echo "RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null) (Debian package, classic queues, default settings)" ;;
    garagemq) echo "garagemq $(dpkg-query -W -f='${Version}' garagemq 2>/dev/null) (Debian package, badger storage)" ;;
  esac
}
for b in "${ACTIVE[@]}"; do echo "version $b $(broker_version "$b")" >>"$NOTES"; done
echo "fs $(df -T "$WORK" | awk 'NR == 2 {print $2}')" >>"$NOTES"
echo "load_start $(cut -d' ' -f1-3 /proc/loadavg)" >>"$NOTES"

# ---- scenarios ----
scenario_args() {
  local s=$1 r=$2 q="bench-$1-r$2" d=$DURATION
  case $s in
    a) echo "-x 1 -y 1 -s 16 -a -u $q -z $d --max-backlog 500000" ;;
    b) echo "-x 1 -y 1 -s 1024 -a -u $q -z $d --max-backlog 200000" ;;
    c) echo "-x 1 -y 1 -s 1024 -f persistent -c 1000 -q 1000 -A 100 -u $q -z $d --max-backlog 200000" ;;
    d) echo "-x 1 -y 1 -s 65536 -a -u $q -z $d --max-backlog 5000" ;;
    e) echo "-x 1 -y 10 -s 1024 -a -e bench-fanout-r$r -t fanout --queue-count 10 -u $q -z $d --max-backlog 50000" ;;
    f) echo "-x 10 -y 10 -s 1024 -a --queue-count 10 -u $q -z $d --max-backlog 200000" ;;
    # One generator thread: at 1,000 msg/s a second one only adds its own wakeups to every
    # sample, whichever broker is measured.
    g) echo "-x 1 -y 1 -s 1024 -a -r 1000 --threads 1 -u $q -z $d" ;;
  esac
}

# record BROKER ROUND SCENARIO ARGS JSON: one line of results.jsonl.
record() {
  jq -cn --arg broker "$1" --argjson round "$2" --arg scenario "$3" --arg args "$4" \
    --argjson result "$5" '{broker: $broker, round: $round, scenario: $scenario, args: $args} + $result' \
    >>"$RESULTS"
}

# perf LOGNAME TIMEOUT ARGS...: runs warren-perf, prints its JSON line (or an error object).
perf() {
  local logname=$1 limit=$2 out rc=0
  shift 2
  out=$(timeout --kill-after=5 "$limit" "$PERF" "$@" 2>>"$WORK/$logname.log") || rc=$?
  out=$(tail -n 1 <<<"$out")
  if jq -e . >/dev/null 2>&1 <<<"$out" && [[ -n $out ]]; then
    echo "$out"
  else
    local why
    why=$(tail -n 1 "$WORK/$logname.log" 2>/dev/null || true)
    jq -cn --arg e "warren-perf exit $rc: $why" '{errors: [$e]}'
  fi
}

run_throughput() {
  local b=$1 r=$2 s=$3 args json uri
  args=$(scenario_args "$s" "$r")
  uri="amqp://guest:guest@127.0.0.1:$(broker_port "$b")/%2f"
  bench_log "round $r/$ROUNDS scenario $s on $b: warren-perf $args"
  # shellcheck disable=SC2086
  json=$(perf "perf-$b" $((DURATION + 60)) -h "$uri" --id "$s" $args)
  record "$b" "$r" "$s" "$args" "$json"
  bench_log "  -> $(jq -c '{send_rate, receive_rate, p50: .latency_us.p50, p99: .latency_us.p99, errors}' <<<"$json")"
  sleep 1
}

ensure_up() {
  local b=$1
  if ! port_open "$(broker_port "$b")"; then
    bench_log "$b is down; starting it again"
    broker_stop "$b" || true
    broker_start "$b" || note "$b: could not be restarted after scenario h."
  fi
}

# Scenario h: publish N persistent messages with confirms, RSS, stop, restart, drain.
run_durability() {
  local b=$1 r=$2 q="bench-h-r$2" uri port pid rss0 rss1 rss2 pub t0 t1 stop_s wait_json
  local restart_s drain drained_after_restart=true limit
  port=$(broker_port "$b")
  uri="amqp://guest:guest@127.0.0.1:$port/%2f"
  limit=$((H_MESSAGES / 2000 + 120))
  local pargs="-x 1 -y 0 -s 16 -f persistent -c 1000 -C $H_MESSAGES -e '' -u $q --auto-delete false"
  bench_log "round $r/$ROUNDS scenario h on $b: publishing $H_MESSAGES persistent messages"
  pid=$(broker_pid "$b" || true)
  rss0=$(rss_kb "$pid")
  pub=$(perf "perf-$b" "$limit" -h "$uri" --id h -x 1 -y 0 -s 16 -f persistent -c 1000 \
    -C "$H_MESSAGES" -e "" -u "$q" --auto-delete false)
  sleep 1
  pid=$(broker_pid "$b" || true)
  rss1=$(rss_kb "$pid")
  bench_log "  published: $(jq -c '{send_rate, confirmed, errors}' <<<"$pub"); RSS ${rss0:-?} -> ${rss1:-?} kB"

  t0=$(date +%s%N)
  broker_stop "$b"
  t1=$(date +%s%N)
  stop_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
  while port_open "$port"; do sleep 0.05; done
  t0=$(date +%s%N)
  broker_launch "$b"
  wait_json=$(timeout --kill-after=5 $((limit + 60)) "$PERF" -h "$uri" -u "$q" \
    --wait-queue-messages "$H_MESSAGES" --wait-timeout "$limit" --absent-grace 5 \
    2>>"$WORK/perf-$b.log" | tail -n 1) || true
  t1=$(date +%s%N)
  jq -e . >/dev/null 2>&1 <<<"$wait_json" && [[ -n $wait_json ]] || wait_json='{"recovered":false,"error":"no answer"}'
  restart_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
  wait_port "$port" "" 60 || true
  pid=$(broker_pid "$b" || true)
  rss2=$(rss_kb "$pid")
  bench_log "  restart: $(jq -c '{recovered, messages, error}' <<<"$wait_json") after ${restart_s} s (stop took ${stop_s} s)"

  if [[ $(jq -r '.recovered' <<<"$wait_json") != true ]]; then
    # Nothing to drain after the restart: publish again and drain without one, so the drain
    # rate is still measured (reported as such).
    drained_after_restart=false
    ensure_up "$b"
    perf "perf-$b" "$limit" -h "$uri" --id h-republish -x 1 -y 0 -s 16 -f persistent -c 1000 \
      -C "$H_MESSAGES" -e "" -u "$q" --auto-delete false >/dev/null
  fi
  drain=$(perf "perf-$b" "$limit" -h "$uri" --id h-drain -x 0 -y 1 -s 16 -f persistent \
    -q 1000 -A 100 -D "$H_MESSAGES" -e "" -u "$q" --auto-delete false -z "$limit" --idle-stop 15)
  # A drain that stalled (nothing for 15 s) is a failure, not a slow drain.
  drain=$(jq -c --argjson n "$H_MESSAGES" \
    'if (.received // 0) < $n then .errors += ["drained \(.received // 0) of \($n) messages (nothing arrived for 15 s)"] else . end' \
    <<<"$drain")
  bench_log "  drain: $(jq -c '{receive_rate, received, receive_duration_s, errors}' <<<"$drain")"
  local result
  result=$(jq -cn --argjson publish "$pub" --argjson restart "$wait_json" --argjson drain "$drain" \
    --arg rss0 "${rss0:-}" --arg rss1 "${rss1:-}" --arg rss2 "${rss2:-}" \
    --argjson stop_s "$stop_s" --argjson restart_s "$restart_s" \
    --argjson after "$drained_after_restart" --argjson n "$H_MESSAGES" \
    '{messages: $n, publish: $publish, restart: $restart, drain: $drain,
      rss_before_kb: ($rss0 | tonumber? // null), rss_after_kb: ($rss1 | tonumber? // null),
      rss_restarted_kb: ($rss2 | tonumber? // null), stop_s: $stop_s, restart_s: $restart_s,
      drained_after_restart: $after}')
  record "$b" "$r" h "$pargs" "$result"
  sleep 1
}

bench_log "brokers: ${ACTIVE[*]}; scenarios: $SCENARIOS; rounds: $ROUNDS; ${DURATION}s per run"
if ((ISOLATE)); then
  note "Isolation: while one broker runs a scenario, the other brokers' processes are paused (SIGSTOP) and resumed after it (SIGCONT); --no-isolate turns this off."
else
  note "Isolation: off (--no-isolate): every broker keeps running while another is measured."
fi
BENCH_START=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
  for ((i = 0; i < ${#SCENARIOS}; i++)); do
    s=${SCENARIOS:i:1}
    for b in "${ACTIVE[@]}"; do
      pause_others "$b"
      case $s in
        [a-g]) run_throughput "$b" "$r" "$s" ;;
        h) run_durability "$b" "$r" ;;
        *) bench_log "unknown scenario '$s'"; exit 2 ;;
      esac
      resume_all
      ensure_up "$b"
    done
  done
done
note "benchmark time: $((SECONDS - BENCH_START)) s"
echo "load_end $(cut -d' ' -f1-3 /proc/loadavg)" >>"$NOTES"

python3 "$ROOT/scripts/bench/report.py" --results "$RESULTS" --notes "$NOTES" \
  --command "$COMMAND" --rounds "$ROUNDS" --duration "$DURATION" --out "$OUT"
bench_log "wrote $OUT"
if ((KEEP)); then cp "$RESULTS" "$WORK/results.kept.jsonl"; fi
