#!/usr/bin/env bash
# Storage benchmarks of Warren beside RabbitMQ 3.10, measured in the same run on this machine;
# the results go into docs/durability.md (between the bench-storage markers).
#
#   scripts/bench-storage.sh [--rounds N] [--duration SECS] [--messages N]
#                            [--brokers "warren rabbitmq"] [--no-build] [--out FILE] [--keep]
#
#   (a) throughput: 1 producer, 1 consumer, 1 KiB persistent messages, durable queue,
#       confirms window 1000, prefetch 1000, manual acks (multiple, every 100), DURATION s
#       (default 20), ROUNDS rounds (default 2), brokers interleaved. The load generator is
#       target/release/warren-perf (PerfTest's flags: -x 1 -y 1 -s 1024 -p -c 1000 -q 1000
#       -A 100 -z 20).
#   (b) backlog: MESSAGES (default 1,000,000) x 16-byte persistent messages published with
#       confirms (window 1000) to a durable queue with no consumer. Broker RSS (VmRSS of
#       /proc/PID/status; RabbitMQ: beam.smp) idle before and 1 s after, growth per message;
#       graceful stop, start, time from launch until a passive declare of the queue answers
#       with every message; RSS then; kill -9, start, the same time; then the drain (1
#       consumer, prefetch 1000, multi-ack every 100) and its duration.
#
# Each broker keeps its state in a fresh temporary directory on the disk of $TMPDIR (not a
# tmpfs: fsync must cost what it costs). Ports: $BENCH_WARREN_PORT (5797) and
# $BENCH_RABBITMQ_PORT (5798). RabbitMQ is Debian's rabbitmq-server, run by scripts/rabbitmq.sh
# (installed with apt-get when missing). Every step is bounded by a timeout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="scripts/bench-storage.sh${*:+ $*}"
ROUNDS=2
DURATION=20
MESSAGES=1000000
BROKERS="warren rabbitmq"
OUT="$ROOT/docs/durability.md"
BUILD=1
KEEP=0

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --messages) MESSAGES=$2; shift 2 ;;
    --brokers) BROKERS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-storage.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
for n in "$ROUNDS" "$DURATION" "$MESSAGES"; do
  [[ $n =~ ^[0-9]+$ ]] && ((n > 0)) || { echo "bench-storage.sh: '$n' is not a positive integer" >&2; exit 2; }
done

WARREN_PORT=${BENCH_WARREN_PORT:-5797}
RMQ_PORT=${BENCH_RABBITMQ_PORT:-5798}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/warren-bench-storage.XXXXXX")
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
WARREN="$ROOT/target/release/warren"
PERF="$ROOT/target/release/warren-perf"
RMQ_STATE="$WORK/rabbitmq"
RMQ_NODE="warren-rmq-$RMQ_PORT@localhost"

log() { echo "bench-storage: $*" >&2; }

# ---- process control ----------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }

now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; }

warren_launch() {
  mkdir -p "$WORK/warren/data"
  # In a subshell, so that this shell reports nothing when the process gets killed.
  (
    "$WARREN" --listen "127.0.0.1:$WARREN_PORT" --data-dir "$WORK/warren/data" --log warn \
      >>"$WORK/warren/warren.log" 2>&1 </dev/null &
    echo $! >"$WORK/warren/pid"
  )
}

warren_pid() { cat "$WORK/warren/pid"; }

# True while PID runs. An exited process that is not reaped yet (a zombie: the brokers are
# started detached, so their parent is init, which may reap them only a second later) counts
# as gone.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# wait_gone PID SECONDS
wait_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while alive "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.02
  done
}

warren_stop() {
  local pid
  pid=$(warren_pid)
  kill -TERM "$pid" 2>/dev/null || return 0
  wait_gone "$pid" 60 || { log "warren ignored SIGTERM for 60 s; killing it"; kill -KILL "$pid" || true; }
}

warren_kill() {
  local pid
  pid=$(warren_pid)
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone "$pid" 30 || true
}

rmq_env() {
  export HOME="$RMQ_STATE"
  export RABBITMQ_NODENAME="$RMQ_NODE"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$RMQ_PORT"
  export RABBITMQ_DIST_PORT=$((RMQ_PORT + 20000))
  export ERL_EPMD_PORT=$((RMQ_PORT + 10000))
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_MNESIA_BASE="$RMQ_STATE/mnesia"
  export RABBITMQ_LOG_BASE="$RMQ_STATE/log"
  export RABBITMQ_PID_FILE="$RMQ_STATE/rabbitmq.pid"
  export RABBITMQ_CONF_ENV_FILE="$RMQ_STATE/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$RMQ_STATE/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_STATE/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_STATE/enabled_plugins"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$RMQ_STATE/plugins-expand"
  export RABBITMQ_LOGS="$RMQ_STATE/log/rabbit.log"
}

# First start (and install when missing) through scripts/rabbitmq.sh: it writes the config,
# the cookie and waits until the node is up.
rabbitmq_first_start() {
  RABBITMQ_STATE_DIR="$RMQ_STATE" "$ROOT/scripts/rabbitmq.sh" start "$RMQ_PORT" >/dev/null
}

# Later starts: the same node, launched directly (rabbitmqctl's readiness checks cost seconds
# and would inflate the measured restart time).
rabbitmq_launch() {
  rm -f "$RMQ_STATE/rabbitmq.pid"
  (
    rmq_env
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >>"$RMQ_STATE/log/startup.log" 2>&1 </dev/null &
  )
}

# The Erlang VM's OS pid, which RabbitMQ writes once booted.
rabbitmq_pid() {
  local f="$RMQ_STATE/rabbitmq.pid"
  for _ in $(seq 1 600); do
    if [[ -s $f ]]; then tr -d '[:space:]' <"$f"; return 0; fi
    sleep 0.1
  done
  return 1
}

rabbitmq_stop() {
  local pid
  pid=$(rabbitmq_pid) || return 0
  (rmq_env; timeout 120 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RMQ_NODE" -q shutdown >/dev/null 2>&1) || true
  wait_gone "$pid" 60 || { log "RabbitMQ did not stop; killing it"; kill -KILL "$pid" || true; }
}

rabbitmq_kill() {
  local pid
  pid=$(rabbitmq_pid) || return 0
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone "$pid" 30 || true
}

broker_port() { case $1 in warren) echo "$WARREN_PORT" ;; rabbitmq) echo "$RMQ_PORT" ;; esac; }
broker_pid() { case $1 in warren) warren_pid ;; rabbitmq) rabbitmq_pid ;; esac; }
broker_launch() { case $1 in warren) warren_launch ;; rabbitmq) rabbitmq_launch ;; esac; }
broker_stop() { case $1 in warren) warren_stop ;; rabbitmq) rabbitmq_stop ;; esac; }
broker_kill() { case $1 in warren) warren_kill ;; rabbitmq) rabbitmq_kill ;; esac; }
broker_uri() { echo "amqp://guest:guest@127.0.0.1:$(broker_port "$1")/%2f"; }

broker_start() {
  case $1 in
    warren)
      warren_launch
      local deadline=$((SECONDS + 60))
      until port_open "$WARREN_PORT"; do
        alive "$(warren_pid)" || { tail -n 20 "$WORK/warren/warren.log" >&2; return 1; }
        ((SECONDS < deadline)) || return 1
        sleep 0.05
      done
      ;;
    rabbitmq) rabbitmq_first_start ;;
  esac
}

cleanup() {
  local b
  for b in $BROKERS; do
    case $b in
      warren) [[ -f $WORK/warren/pid ]] && warren_kill ;;
      rabbitmq) [[ -d $RMQ_STATE ]] && RABBITMQ_STATE_DIR="$RMQ_STATE" "$ROOT/scripts/rabbitmq.sh" stop "$RMQ_PORT" >/dev/null 2>&1 ;;
    esac
  done
  if ((KEEP)); then log "state, logs and results kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# record KEY JSON: one line of results.jsonl.
record() { jq -cn --arg key "$1" --argjson v "${2:-null}" '{key: $key, value: $v}' >>"$RESULTS"; }

# perf LIMIT_SECONDS ARGS...: runs warren-perf, prints its final JSON line (or an error object).
perf() {
  local limit=$1 out rc=0
  shift
  echo "warren-perf $*" >>"$WORK/commands.log"
  out=$(timeout --kill-after=5 "$limit" "$PERF" "$@" 2>>"$WORK/perf.log") || rc=$?
  out=$(tail -n 1 <<<"$out")
  if [[ -n $out ]] && jq -e . >/dev/null 2>&1 <<<"$out"; then
    echo "$out"
  else
    jq -cn --arg e "warren-perf exit $rc: $(tail -n 1 "$WORK/perf.log" 2>/dev/null)" '{errors: [$e]}'
  fi
}

# ---- build --------------------------------------------------------------------------------
if ((BUILD)); then
  if [[ -d $ROOT/broker/src/bin/warren-perf ]]; then
    log "building release binaries (cargo build --release -p warren-broker --bins)"
    (cd "$ROOT" && cargo build --release -p warren-broker --bins) >&2
  else
    log "building release warren (cargo build --release --bin warren)"
    (cd "$ROOT" && cargo build --release --bin warren) >&2
  fi
fi
[[ -x $WARREN ]] || { log "missing $WARREN"; exit 1; }
[[ -x $PERF ]] || { log "missing $PERF: the load generator is built from broker/src/bin/warren-perf"; exit 1; }

# ---- brokers ------------------------------------------------------------------------------
for b in $BROKERS; do
  case $b in warren | rabbitmq) ;; *) log "unknown broker '$b'"; exit 2 ;; esac
  if port_open "$(broker_port "$b")"; then
    log "port $(broker_port "$b") for $b is taken; set BENCH_${b^^}_PORT"
    exit 1
  fi
  log "starting $b on 127.0.0.1:$(broker_port "$b")"
  broker_start "$b"
done

BENCH_START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- (a) throughput -----------------------------------------------------------------------
A_ARGS="-x 1 -y 1 -s 1024 -p -c 1000 -q 1000 -A 100 -z $DURATION"
for ((r = 1; r <= ROUNDS; r++)); do
  for b in $BROKERS; do
    q="bench-a-r$r"
    log "(a) round $r/$ROUNDS on $b: warren-perf $A_ARGS -u $q"
    # shellcheck disable=SC2086
    json=$(perf $((DURATION + 90)) -h "$(broker_uri "$b")" --id a $A_ARGS -u "$q")
    record "a.$b.$r" "$json"
    log "  -> $(jq -c '{send_rate, receive_rate, confirmed, p50: .latency_us.p50, p99: .latency_us.p99, errors}' <<<"$json")"
    sleep 2
  done
done

# ---- (b) backlog: RSS, restart, drain -----------------------------------------------------
N=$MESSAGES
LIMIT=$((N / 2000 + 300))
# wait_port PORT SECONDS
wait_port() {
  local deadline=$((SECONDS + $2))
  until port_open "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

run_backlog() {
  local b=$1 q="bench-b" uri pid t0 json took
  uri=$(broker_uri "$b")
  # A fresh process, so that the idle RSS owes nothing to (a).
  broker_stop "$b"
  while port_open "$(broker_port "$b")"; do sleep 0.05; done
  broker_launch "$b"
  wait_port "$(broker_port "$b")" 120 || { log "$b did not come back before (b)"; return 1; }
  pid=$(broker_pid "$b")
  sleep 3
  record "b.$b.rss_idle_kb" "$(rss_kb "$pid")"
  log "(b) $b: publishing $N x 16 B persistent with confirms (RSS idle $(rss_kb "$pid") kB)"
  json=$(perf "$LIMIT" -h "$uri" --id b-publish -x 1 -y 0 -s 16 -p -c 1000 -C "$N" -e "" \
    -u "$q" --auto-delete false)
  record "b.$b.publish" "$json"
  sleep 1
  record "b.$b.rss_loaded_kb" "$(rss_kb "$pid")"
  log "  published: $(jq -c '{send_rate, confirmed, errors}' <<<"$json"); RSS $(rss_kb "$pid") kB"
  record "b.$b.disk_kb" "$(du -sk "$WORK/$b" | cut -f1)"

  for how in stop kill; do
    t0=$(now_ns)
    if [[ $how == stop ]]; then broker_stop "$b"; else broker_kill "$b"; fi
    record "b.$b.${how}_s" "$(secs_since "$t0")"
    while port_open "$(broker_port "$b")"; do sleep 0.05; done
    t0=$(now_ns)
    broker_launch "$b"
    json=$(perf "$LIMIT" -h "$uri" -u "$q" --wait-queue-messages "$N" --wait-timeout "$LIMIT" \
      --absent-grace 30)
    took=$(secs_since "$t0")
    record "b.$b.restart_after_${how}_s" "$took"
    record "b.$b.restart_after_${how}" "$json"
    pid=$(broker_pid "$b")
    sleep 1
    record "b.$b.rss_restarted_after_${how}_kb" "$(rss_kb "$pid")"
    log "  restart after $how: $(jq -c '{recovered, messages, error}' <<<"$json") in $took s; RSS $(rss_kb "$pid") kB"
  done

  json=$(perf "$LIMIT" -h "$uri" --id b-drain -x 0 -y 1 -s 16 -p -q 1000 -A 100 -D "$N" -e "" \
    -u "$q" --auto-delete false --predeclared --idle-stop 30)
  record "b.$b.drain" "$json"
  log "  drain: $(jq -c '{receive_rate, received, receive_duration_s, errors}' <<<"$json")"
}
for b in $BROKERS; do
  run_backlog "$b"
done
record "bench_seconds" "$((SECONDS - BENCH_START))"

# ---- report -------------------------------------------------------------------------------
machine() {
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores (load generator, brokers and anything else on the machine share them)"
  echo "- RAM: $(free -m | awk '/^Mem:/ {printf "%.1f GiB", $2 / 1024}')"
  echo "- Disk: $(df -T "$WORK" | awk 'NR == 2 {print $2 " on " $1}') (state directories under \`${TMPDIR:-/tmp}\`)"
  echo "- Kernel: $(uname -sr)"
  echo "- Warren: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- broker storage protocol 2>/dev/null || echo ' + local changes'), release build (\`cargo build --release\`), default settings"
  echo "- RabbitMQ: $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null) (Debian), Erlang/OTP $(dpkg-query -W -f='${Version}' erlang-base 2>/dev/null), classic queues, default settings, started by scripts/rabbitmq.sh"
  echo "- Load generator: target/release/warren-perf, on the same machine"
  echo "- Load average (1, 5, 15 min) at the start: $LOAD_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine competes for the same cores)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
}

python3 - "$RESULTS" "$OUT" "$COMMAND" "$DURATION" "$ROUNDS" "$N" "$BROKERS" "$(machine)" "$A_ARGS" <<'PY'
import json, statistics, sys

results, out, command, duration, rounds, n, brokers, machine, a_args = sys.argv[1:]
n = int(n)
brokers = brokers.split()
vals = {}
for line in open(results):
    rec = json.loads(line)
    vals[rec["key"]] = rec["value"]

def get(key, *path):
    v = vals.get(key)
    for p in path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v

def fmt(v, digits=0, unit=""):
    if v is None or v == "":
        return "n/a"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{v:,.{digits}f}{unit}"

name = {"warren": "Warren", "rabbitmq": "RabbitMQ 3.10"}
lines = []
lines.append("<!-- bench-storage:begin (generated by scripts/bench-storage.sh; edits here are overwritten) -->")
lines.append("")
lines.append(f"Command: `{command}`")
lines.append("")
lines.append(machine)
lines.append("")
lines.append(f"### (a) 1 KiB persistent messages, durable queue, confirms window 1000, manual acks")
lines.append("")
lines.append(f"`warren-perf -h URI {a_args} -u bench-a-rN` (1 producer, 1 consumer, prefetch 1000, "
             f"multi-ack every 100), {rounds} round(s) of {duration} s per broker, brokers interleaved.")
lines.append("")
lines.append("| broker | round | sent msg/s | received msg/s | confirmed | latency p50 | latency p99 | errors |")
lines.append("|---|---|---:|---:|---:|---:|---:|---|")
medians = {}
for b in brokers:
    rates = []
    for r in range(1, int(rounds) + 1):
        j = vals.get(f"a.{b}.{r}", {})
        rates.append(j.get("receive_rate") or 0.0)
        lat = j.get("latency_us") or {}
        errs = "; ".join(j.get("errors") or []) or "-"
        lines.append(f"| {name[b]} | {r} | {fmt(j.get('send_rate'))} | {fmt(j.get('receive_rate'))} | "
                     f"{fmt(j.get('confirmed'))} | {fmt((lat.get('p50') or 0) / 1000, 1, ' ms') if lat.get('p50') is not None else 'n/a'} | "
                     f"{fmt((lat.get('p99') or 0) / 1000, 1, ' ms') if lat.get('p99') is not None else 'n/a'} | {errs} |")
    medians[b] = statistics.median(rates) if rates else 0.0
lines.append("")
if "warren" in medians and "rabbitmq" in medians and medians["rabbitmq"] > 0:
    ratio = medians["warren"] / medians["rabbitmq"]
    verdict = "meets" if ratio >= 10 else "misses"
    lines.append(f"Median received rate: Warren {fmt(medians['warren'])} msg/s, RabbitMQ {fmt(medians['rabbitmq'])} msg/s: "
                 f"**{ratio:.1f}x** ({verdict} the >= 10x target).")
    lines.append("")

lines.append(f"### (b) {n:,} x 16-byte persistent messages queued")
lines.append("")
lines.append(f"Published with `warren-perf -x 1 -y 0 -s 16 -p -c 1000 -C {n} -e '' -u bench-b --auto-delete false` "
             "(durable queue, confirms window 1000, no consumer). RSS is VmRSS from /proc/PID/status "
             "(RabbitMQ: the beam.smp process), read 3 s after a fresh start (idle, empty) and 1 s after the last confirm. "
             "Restart: the broker is stopped (SIGTERM for Warren, `rabbitmqctl shutdown` for RabbitMQ) or killed with "
             "SIGKILL, launched again, and timed from the launch until "
             f"`warren-perf --wait-queue-messages {n}` sees a passive declare of the queue report all of them. "
             f"Drain: `warren-perf -x 0 -y 1 -s 16 -p -q 1000 -A 100 -D {n} -e '' -u bench-b --predeclared` "
             "right after the restart that followed kill -9.")
lines.append("")
lines.append("| | " + " | ".join(name[b] for b in brokers) + " |")
lines.append("|---|" + "---:|" * len(brokers))

def row(label, f):
    lines.append(f"| {label} | " + " | ".join(f(b) for b in brokers) + " |")

def kb(key):
    try:
        return float(vals.get(key))
    except (TypeError, ValueError):
        return None

def per_msg(b, after):
    a, z = kb(f"b.{b}.rss_idle_kb"), kb(f"b.{b}.{after}")
    if a is None or z is None:
        return "n/a"
    return fmt((z - a) * 1024 / n, 1, " B")

row("publish rate (confirmed)", lambda b: fmt(get(f"b.{b}.publish", "send_rate"), 0, " msg/s"))
row("messages confirmed", lambda b: fmt(get(f"b.{b}.publish", "confirmed")))
row("RSS idle, empty", lambda b: fmt((kb(f"b.{b}.rss_idle_kb") or 0) / 1024, 1, " MiB") if kb(f"b.{b}.rss_idle_kb") else "n/a")
row(f"RSS with {n:,} queued", lambda b: fmt((kb(f"b.{b}.rss_loaded_kb") or 0) / 1024, 1, " MiB") if kb(f"b.{b}.rss_loaded_kb") else "n/a")
row("**RSS growth per message** (target <= 40 B)", lambda b: "**" + per_msg(b, "rss_loaded_kb") + "**")
row("state on disk", lambda b: fmt((kb(f"b.{b}.disk_kb") or 0) / 1024, 1, " MiB") if kb(f"b.{b}.disk_kb") else "n/a")
row("graceful stop took (RabbitMQ: `rabbitmqctl shutdown`, CLI start-up included)", lambda b: fmt(vals.get(f"b.{b}.stop_s"), 2, " s"))
row("**restart after graceful stop until all ready** (target < 2 s)",
    lambda b: "**" + fmt(vals.get(f"b.{b}.restart_after_stop_s"), 2, " s") + "**"
    + ("" if get(f"b.{b}.restart_after_stop", "recovered") else " (not all recovered: "
       + str(get(f"b.{b}.restart_after_stop", "messages")) + ")"))
row("RSS after that restart (per message over idle)",
    lambda b: (fmt((kb(f"b.{b}.rss_restarted_after_stop_kb") or 0) / 1024, 1, " MiB") + " (" + per_msg(b, "rss_restarted_after_stop_kb") + ")")
    if kb(f"b.{b}.rss_restarted_after_stop_kb") else "n/a")
row("**restart after kill -9 until all ready**",
    lambda b: "**" + fmt(vals.get(f"b.{b}.restart_after_kill_s"), 2, " s") + "**"
    + ("" if get(f"b.{b}.restart_after_kill", "recovered") else " (not all recovered: "
       + str(get(f"b.{b}.restart_after_kill", "messages")) + ")"))
row("RSS after that restart (per message over idle)",
    lambda b: (fmt((kb(f"b.{b}.rss_restarted_after_kill_kb") or 0) / 1024, 1, " MiB") + " (" + per_msg(b, "rss_restarted_after_kill_kb") + ")")
    if kb(f"b.{b}.rss_restarted_after_kill_kb") else "n/a")
row("**drain time**", lambda b: "**" + fmt(get(f"b.{b}.drain", "receive_duration_s"), 2, " s") + "**"
    + f" ({fmt(get(f'b.{b}.drain', 'received'))} received, {fmt(get(f'b.{b}.drain', 'receive_rate'), 0, ' msg/s')})")
errs = []
for b in brokers:
    for k in ("publish", "drain"):
        for e in get(f"b.{b}.{k}", "errors") or []:
            errs.append(f"{name[b]} {k}: {e}")
    for k in ("restart_after_stop", "restart_after_kill"):
        e = get(f"b.{b}.{k}", "error")
        if e:
            errs.append(f"{name[b]} {k}: {e}")
lines.append("")
if errs:
    lines.append("Errors reported by the load generator:")
    lines.append("")
    lines.extend(f"- {e}" for e in errs)
    lines.append("")
lines.append(f"Total benchmark time: {vals.get('bench_seconds', '?')} s (without the build).")
lines.append("")
lines.append("<!-- bench-storage:end -->")
block = "\n".join(lines)

try:
    doc = open(out).read()
except FileNotFoundError:
    doc = "# Durability\n\n## Benchmarks\n\n<!-- bench-storage:begin -->\n<!-- bench-storage:end -->\n"
begin = doc.find("<!-- bench-storage:begin")
end = doc.find("<!-- bench-storage:end -->")
if begin < 0 or end < 0:
    doc = doc.rstrip("\n") + "\n\n" + block + "\n"
else:
    doc = doc[:begin] + block + doc[end + len("<!-- bench-storage:end -->"):]
open(out, "w").write(doc)
print(block)
PY
log "wrote $OUT"
if ((KEEP)); then cp "$RESULTS" "$WORK/results.kept.jsonl"; fi
