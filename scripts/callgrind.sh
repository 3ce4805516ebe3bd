#!/usr/bin/env bash
# Instructions per message of the Warren broker, counted by valgrind's callgrind for a fixed
# workload per benchmark scenario: a number that machine noise and other load do not change,
# to tell whether a change to the hot path made the broker do less work.
#
#   scripts/callgrind.sh [--scenarios abcdefh] [--messages N | --messages a=N,d=N,...]
#                        [--scale F] [--annotate] [--write] [--out FILE] [--build] [--keep]
#
# For each scenario: target/release/warren runs under `valgrind --tool=callgrind` on a free
# 127.0.0.1 port (5790-5799) with a fresh temp data directory; target/release/warren-perf
# (native) sends the scenario's load with a fixed count instead of a duration (-C messages per
# producer, -D messages per consumer); then SIGTERM, and the total Ir (instructions executed,
# every thread of the broker) is read from the callgrind output. The same scenario run with one
# message per producer is the baseline (boot, connections, declares, shutdown); the report is
# (Ir - baseline Ir) / (messages - baseline messages). The flags are those of
# scripts/bench-compare.sh without -z:
#
#   (a) 1 producer / 1 consumer, 16 B transient, auto-ack               (default 20,000 msgs)
#   (b) the same with 1 KiB                                              (20,000)
#   (c) 1 KiB persistent, durable queue, confirms 1000, prefetch 1000, ack every 100 (20,000)
#   (d) 64 KiB transient, auto-ack                                       (2,000)
#   (e) fanout to 10 queues, 10 consumers, 1 KiB, auto-ack      (5,000 published, x10 delivered)
#   (f) 10 producers / 10 consumers on 10 queues, 1 KiB, auto-ack        (20,000 in all)
#   (h) 16 B persistent published with confirms to a durable queue, no consumer, then drained
#       (prefetch 1000, ack every 100) by a second warren-perf, same broker process (20,000)
#   (g), latency at a fixed rate, is not an instruction-count question and is skipped.
#
# --messages N       messages published per scenario (f: in all, split over its 10 producers;
#                    e: published, each delivered 10 times); or per scenario: a=50000,d=1000
# --scale F          multiply the message counts by F (e.g. 0.1 for a smoke run)
# --annotate         keep the callgrind files in target/callgrind/ (S.out, S-baseline.out) and
#                    print the 15 functions with the most exclusive Ir per scenario
# --write            also write the report to docs/callgrind.md (--out FILE: to FILE)
# --build            cargo build --release -p warren-broker --bins first (default: use the
#                    binaries as they are; they are copied first, so a rebuild during the run
#                    does not mix two builds)
# --keep             keep the work directory (broker and warren-perf logs)
#
# Environment: CALLGRIND_PORT_BASE (5790; ports BASE..BASE+9 are tried), CALLGRIND_BOOT_TIMEOUT
# (30 s for the broker under valgrind to listen). Compare numbers from the same counts and
# the same number of cores only: the per-message cost grows with the backlog (the producers run
# far ahead of a broker under valgrind), and the broker starts one runtime worker per core.
#
# Prints a markdown table on stdout, progress on stderr. Exits non-zero when a scenario failed
# (warren-perf errors, fewer messages sent/confirmed/received than asked, the broker not
# starting or not exiting 0): that scenario's row says why instead of giving a number.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="scripts/callgrind.sh${*:+ $*}"
SCENARIOS=abcdefh
MESSAGES_SPEC=""
SCALE=1
ANNOTATE=0
WRITE=0
OUT="$ROOT/docs/callgrind.md"
BUILD=0
KEEP=0
PORT_BASE=${CALLGRIND_PORT_BASE:-5790}
BOOT_TIMEOUT=${CALLGRIND_BOOT_TIMEOUT:-30}

usage() { sed -n '2,46p' "$0" | sed 's/^# \{0,1\}//'; }
log() { echo "callgrind: $*" >&2; }
die() { log "$*"; exit 2; }

while (($#)); do
  case $1 in
    --scenarios) SCENARIOS=${2:?}; shift 2 ;;
    --messages) MESSAGES_SPEC=${2:?}; shift 2 ;;
    --scale) SCALE=${2:?}; shift 2 ;;
    --annotate) ANNOTATE=1; shift ;;
    --write) WRITE=1; shift ;;
    --out) OUT=${2:?}; WRITE=1; shift 2 ;;
    --build) BUILD=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "callgrind.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

# ---- scenarios ----------------------------------------------------------------------------

declare -A DESC=(
  [a]="1 producer / 1 consumer, 16 B transient, auto-ack"
  [b]="1 producer / 1 consumer, 1 KiB transient, auto-ack"
  [c]="1 KiB persistent, durable queue, confirms 1000, prefetch 1000, ack every 100"
  [d]="1 producer / 1 consumer, 64 KiB transient, auto-ack"
  [e]="fanout to 10 queues, 10 consumers (1 KiB, auto-ack)"
  [f]="10 producers / 10 consumers on 10 queues (1 KiB, auto-ack)"
  [g]="fixed 1,000 msg/s (1 KiB, auto-ack): latency"
  [h]="16 B persistent, confirms 1000, durable queue, no consumer; then drained (prefetch 1000, ack every 100)"
)
declare -A COUNT=([a]=20000 [b]=20000 [c]=20000 [d]=2000 [e]=5000 [f]=20000 [h]=20000)
# Messages published per producer in the baseline run of each scenario, and producers.
declare -A PRODUCERS=([a]=1 [b]=1 [c]=1 [d]=1 [e]=1 [f]=10 [h]=1)
# Deliveries per published message.
declare -A COPIES=([a]=1 [b]=1 [c]=1 [d]=1 [e]=10 [f]=1 [h]=1)

# scenario_flags S PER_PRODUCER PER_CONSUMER: warren-perf flags (bench-compare.sh's, without
# -z and with the counts). Scenario h is two runs; see run_workload.
scenario_flags() {
  local s=$1 c=$2 d=$3 q="cg-$1"
  case $s in
    a) echo "-x 1 -y 1 -s 16 -a -u $q -C $c -D $d --max-backlog 500000" ;;
    b) echo "-x 1 -y 1 -s 1024 -a -u $q -C $c -D $d --max-backlog 200000" ;;
    c) echo "-x 1 -y 1 -s 1024 -f persistent -c 1000 -q 1000 -A 100 -u $q -C $c -D $d --max-backlog 200000" ;;
    d) echo "-x 1 -y 1 -s 65536 -a -u $q -C $c -D $d --max-backlog 5000" ;;
    e) echo "-x 1 -y 10 -s 1024 -a -e cg-fanout -t fanout --queue-count 10 -u $q -C $c -D $d --max-backlog 50000" ;;
    f) echo "-x 10 -y 10 -s 1024 -a --queue-count 10 -u $q -C $c -D $d --max-backlog 200000" ;;
  esac
}
H_PUBLISH="-x 1 -y 0 -s 16 -f persistent -c 1000 -C N -e '' -u cg-h --auto-delete false"
H_DRAIN="-x 0 -y 1 -s 16 -f persistent -q 1000 -A 100 -D N -e '' -u cg-h --auto-delete false --idle-stop 60"

[[ $SCENARIOS =~ ^[a-h]+$ ]] || die "--scenarios takes letters a-h, got '$SCENARIOS'"
[[ $SCALE =~ ^[0-9]*\.?[0-9]+$ ]] || die "--scale takes a positive number, got '$SCALE'"
if [[ -n $MESSAGES_SPEC ]]; then
  if [[ $MESSAGES_SPEC =~ ^[0-9]+$ ]]; then
    for s in "${!COUNT[@]}"; do COUNT[$s]=$MESSAGES_SPEC; done
  else
    IFS=, read -ra parts <<<"$MESSAGES_SPEC"
    for p in "${parts[@]}"; do
      [[ $p =~ ^([a-h])=([0-9]+)$ ]] || die "--messages takes N or S=N[,S=N...], got '$p'"
      [[ ${BASH_REMATCH[1]} != g ]] || die "scenario g has no message count (it is skipped)"
      COUNT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    done
  fi
fi
for s in "${!COUNT[@]}"; do
  n=$(awk -v n="${COUNT[$s]}" -v f="$SCALE" 'BEGIN {printf "%d", n * f + 0.5}')
  # Whole multiples: f spreads the count over 10 producers; c and h ack every 100.
  case $s in
    f) m=10 ;;
    c | h) m=100 ;;
    *) m=1 ;;
  esac
  r=$(((n + m - 1) / m * m))
  if ((r != n)) && [[ $SCENARIOS == *$s* ]]; then
    log "($s) $n messages rounded up to $r (a multiple of $m)"
  fi
  ((r > 2 * PRODUCERS[$s])) || die "($s) needs more than $((2 * PRODUCERS[$s])) messages, got $r"
  COUNT[$s]=$r
done

# ---- setup --------------------------------------------------------------------------------

command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"
command -v jq >/dev/null || die "jq is not installed (apt-get install jq)"
if ((ANNOTATE)); then
  command -v callgrind_annotate >/dev/null || die "callgrind_annotate is missing (it comes with valgrind)"
fi
if ((BUILD)); then
  log "building release binaries (cargo build --release -p warren-broker --bins)"
  (cd "$ROOT" && cargo build --release -p warren-broker --bins) >&2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/warren-callgrind.XXXXXX")
BROKER_PID=""
PERF_PID=""
RUN_NO=0
FAILED=0

REASON=""

# alive PID: true while it runs (a zombie counts as gone).
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# Stops the broker started last (SIGTERM, bounded wait); its exit status goes to STOP_RC.
broker_stop() {
  local pid=$BROKER_PID deadline=$((SECONDS + 120))
  STOP_RC=0
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    log "the broker (pid $pid) ignored SIGTERM for 120 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || STOP_RC=$?
  BROKER_PID=""
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  if [[ -n $PERF_PID ]]; then kill -TERM "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; fi
  if [[ -n $BROKER_PID ]]; then broker_stop; fi
  if ((KEEP)); then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The binaries as they are now: a rebuild during the run must not mix two builds.
mkdir -p "$WORK/bin"
for bin in warren warren-perf; do
  [[ -x $ROOT/target/release/$bin ]] || { log "missing target/release/$bin (cargo build --release -p warren-broker --bins)"; exit 2; }
  cp "$ROOT/target/release/$bin" "$WORK/bin/$bin"
done
"$WORK/bin/warren" --version >/dev/null 2>&1 || { log "target/release/warren does not run (being rebuilt?)"; exit 2; }
WARREN="$WORK/bin/warren"
PERF="$WORK/bin/warren-perf"
BUILT=$(date -u -r "$ROOT/target/release/warren" '+%Y-%m-%d %H:%M UTC')

listening() {
  if command -v ss >/dev/null; then
    # Without a probe connection, which would be work in the broker's count.
    [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# broker_start OUTFILE LOG: warren under callgrind on the next free port; sets PORT and
# BROKER_PID, or REASON and returns 1.
broker_start() {
  local out=$1 logf=$2 i p data deadline
  PORT=""
  for ((i = 0; i < 10; i++)); do
    p=$((PORT_BASE + (RUN_NO + i) % 10))
    if ! listening "$p"; then PORT=$p; break; fi
  done
  RUN_NO=$((RUN_NO + 1))
  [[ -n $PORT ]] || { REASON="no free port in $PORT_BASE-$((PORT_BASE + 9))"; return 1; }
  data=$(mktemp -d "$WORK/data.XXXXXX")
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$WARREN" --listen "127.0.0.1:$PORT" --data-dir "$data" --log warn \
    >"$logf" 2>&1 </dev/null &
  BROKER_PID=$!
  deadline=$((SECONDS + BOOT_TIMEOUT))
  until listening "$PORT"; do
    if ! alive "$BROKER_PID"; then
      broker_stop
      REASON="the broker exited during boot (status $STOP_RC): $(grep -v '^==' "$logf" | tail -n 1)"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      broker_stop
      REASON="the broker did not listen on port $PORT within $BOOT_TIMEOUT s"
      return 1
    fi
    sleep 0.1
  done
}

# perf_run LOG SENT CONFIRMED RECEIVED FLAGS...: warren-perf against the broker, bounded in
# time. Fails (REASON set) unless it exits 0 without errors and with exactly the expected
# counts (CONFIRMED -1: not checked).
perf_run() {
  local logf=$1 sent=$2 confirmed=$3 received=$4 rc=0 out limit why
  shift 4
  limit=$((300 + (sent + received) / 50))
  echo "warren-perf $*" >>"$logf"
  # In the background, so that a signal reaches the trap without waiting for the run's end.
  timeout --kill-after=5 "$limit" "$PERF" -h "amqp://guest:guest@127.0.0.1:$PORT/%2f" "$@" \
    >"$WORK/perf.out" 2>>"$logf" </dev/null &
  PERF_PID=$!
  wait "$PERF_PID" || rc=$?
  PERF_PID=""
  out=$(tail -n 1 "$WORK/perf.out")
  [[ -z $out ]] || echo "$out" >>"$logf"
  if [[ -z $out ]] || ! jq -e . >/dev/null 2>&1 <<<"$out"; then
    ((rc != 124 && rc != 137)) || rc="$rc (timed out after $limit s)"
    REASON="warren-perf exit $rc without a result: $(grep -v -e '^{' -e '^$' "$logf" | tail -n 1)"
    return 1
  fi
  why=$(jq -r --arg rc "$rc" --argjson s "$sent" --argjson c "$confirmed" --argjson r "$received" '
    [ (if $rc != "0" then "warren-perf exit \($rc)" else empty end),
      (.errors // [] | .[]),
      (if .sent != $s then "sent \(.sent) of \($s)" else empty end),
      (if $c >= 0 and .confirmed != $c then "confirmed \(.confirmed) of \($c)" else empty end),
      (if .received != $r then "received \(.received) of \($r)" else empty end)
    ] | join("; ")' <<<"$out")
  [[ -z $why ]] || { REASON=$why; return 1; }
}

# run_workload S PUBLISHED LOG: scenario S's load, PUBLISHED messages in all.
run_workload() {
  local s=$1 n=$2 logf=$3 per confirmed=-1 flags
  per=$((n / PRODUCERS[$s]))
  case $s in
    h)
      perf_run "$logf" "$n" "$n" 0 --id h-publish \
        -x 1 -y 0 -s 16 -f persistent -c 1000 -C "$n" -e "" -u cg-h --auto-delete false || return 1
      perf_run "$logf" 0 -1 "$n" --id h-drain \
        -x 0 -y 1 -s 16 -f persistent -q 1000 -A 100 -D "$n" -e "" -u cg-h --auto-delete false \
        --idle-stop 60 || return 1
      ;;
    *)
      [[ $s != c ]] || confirmed=$n
      flags=$(scenario_flags "$s" "$per" "$per")
      # shellcheck disable=SC2086
      perf_run "$logf" "$n" "$confirmed" $((n * COPIES[$s])) --id "$s" $flags || return 1
      ;;
  esac
}

# measure S KIND PUBLISHED: one broker process under callgrind running one load; sets IR
# (its total instruction count) and OUTFILE, or REASON and returns 1.
measure() {
  local s=$1 kind=$2 n=$3 t0=$SECONDS
  OUTFILE="$WORK/$s-$kind.out"
  local blog="$WORK/$s-$kind.broker.log" plog="$WORK/$s-$kind.perf.log"
  broker_start "$OUTFILE" "$blog" || return 1
  if ! run_workload "$s" "$n" "$plog"; then
    broker_stop
    return 1
  fi
  broker_stop
  if ((STOP_RC != 0)); then
    REASON="the broker exited with status $STOP_RC after SIGTERM: $(grep -v '^==' "$blog" | tail -n 1)"
    return 1
  fi
  # totals: the sum of the file's cost lines (what callgrind prints as "Collected");
  # summary: when totals is missing.
  IR=$(awk '/^totals:/ {t = $2} /^summary:/ {s = $2} END {print (t != "" ? t : s)}' "$OUTFILE" 2>/dev/null || true)
  [[ $IR =~ ^[0-9]+$ ]] || { REASON="no total in the callgrind output ($OUTFILE)"; return 1; }
  log "($s) $kind: $n message(s) published, $(commas "$IR") Ir, $((SECONDS - t0)) s"
}

commas() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }

# top_functions FILE: the 15 functions with the most exclusive Ir. callgrind_annotate splits a
# function by the source file of its (inlined) lines; this sums them per function.
top_functions() {
  callgrind_annotate --auto=no --threshold=100 "$1" >"$WORK/annotate.txt" 2>&1 || true
  awk '
    /PROGRAM TOTALS/ {total = $1; gsub(",", "", total)}
    /file:function/ {on = 1; getline; next}
    on && match($0, /^ *[0-9,]+ +\( *[0-9.]+%\)  /) {
      cost = $1; gsub(",", "", cost)
      name = substr($0, RLENGTH + 1)
      sub(/ \[[^]]*\]$/, "", name)
      sub(/^[^ :]*:/, "", name)
      sum[name] += cost
    }
    END {for (n in sum) printf "%d\t%.2f\t%s\n", sum[n], total ? 100 * sum[n] / total : 0, n}
  ' "$WORK/annotate.txt" | sort -t "$(printf '\t')" -k1,1nr >"$WORK/functions.tsv"
  awk -F '\t' '
    function commas(n,  out) {
      out = ""
      while (length(n) > 3) {out = "," substr(n, length(n) - 2) out; n = substr(n, 1, length(n) - 3)}
      return n out
    }
    NR == 1 {printf "%14s %7s  %s\n", "Ir", "share", "function (exclusive: its own instructions)"}
    NR <= 15 {printf "%14s %6.2f%%  %s\n", commas($1), $2, $3}' "$WORK/functions.tsv"
}

# ---- runs ---------------------------------------------------------------------------------

declare -A STATUS TOTAL BASE PER_MSG PER_DELIVERY WHY
VG_VERSION=$(valgrind --version)
START=$SECONDS
if ((ANNOTATE)); then mkdir -p "$ROOT/target/callgrind"; fi
log "scenarios $SCENARIOS; binaries of $BUILT; work in $WORK"
for ((i = 0; i < ${#SCENARIOS}; i++)); do
  s=${SCENARIOS:i:1}
  [[ -n ${STATUS[$s]:-} ]] && continue
  if [[ $s == g ]]; then
    STATUS[$s]=skipped
    log "(g) skipped: latency at a fixed rate is not an instruction-count question"
    continue
  fi
  n=${COUNT[$s]}
  base_n=${PRODUCERS[$s]}
  log "($s) ${DESC[$s]}: baseline ($base_n message(s)), then $n messages"
  if measure "$s" baseline "$base_n"; then
    BASE[$s]=$IR
    base_out=$OUTFILE
    if measure "$s" run "$n"; then
      TOTAL[$s]=$IR
      diff=$((TOTAL[$s] - BASE[$s]))
      msgs=$((n - base_n))
      deliveries=$((msgs * COPIES[$s]))
      if ((diff <= 0)); then
        STATUS[$s]=failed
        WHY[$s]="the run counted fewer instructions than its baseline"
      else
        STATUS[$s]=ok
        PER_MSG[$s]=$(((diff + msgs / 2) / msgs))
        PER_DELIVERY[$s]=$(((diff + deliveries / 2) / deliveries))
      fi
      if ((ANNOTATE)); then
        cp "$OUTFILE" "$ROOT/target/callgrind/$s.out"
        cp "$base_out" "$ROOT/target/callgrind/$s-baseline.out"
        top_functions "$OUTFILE" >"$WORK/$s.top"
      fi
    else
      STATUS[$s]=failed
      WHY[$s]="run: $REASON"
    fi
  else
    STATUS[$s]=failed
    WHY[$s]="baseline: $REASON"
  fi
  if [[ ${STATUS[$s]} == failed ]]; then
    FAILED=1
    log "($s) FAILED: ${WHY[$s]}"
  fi
done
log "done in $((SECONDS - START)) s"

# ---- report -------------------------------------------------------------------------------

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || COMMIT="$COMMIT-dirty"
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')

report() {
  local s flags
  echo "| scenario | description | messages | deliveries | total Ir | baseline Ir | Ir / message | Ir / delivery |"
  echo "|---|---|---|---|---|---|---|---|"
  for ((i = 0; i < ${#SCENARIOS}; i++)); do
    s=${SCENARIOS:i:1}
    case ${STATUS[$s]:-} in
      ok)
        echo "| $s | ${DESC[$s]} | $(commas "${COUNT[$s]}") | $(commas $((COUNT[$s] * COPIES[$s]))) |" \
          "$(commas "${TOTAL[$s]}") | $(commas "${BASE[$s]}") | **$(commas "${PER_MSG[$s]}")** |" \
          "$(commas "${PER_DELIVERY[$s]}") |"
        ;;
      failed)
        echo "| $s | ${DESC[$s]} | $(commas "${COUNT[$s]}") | $(commas $((COUNT[$s] * COPIES[$s]))) |" \
          "**failed** | | ${WHY[$s]//|/\\|} | |"
        ;;
      skipped)
        echo "| g | ${DESC[g]} | | | skipped | | | |"
        ;;
      *) ;;
    esac
  done
  echo
  echo "Ir / message = (total Ir - baseline Ir) / (messages - baseline messages); Ir / delivery"
  echo "divides by the deliveries instead (10 per message in (e), 1 elsewhere)."
  echo "Scenario (g) of \`scripts/bench-compare.sh\` (latency at a fixed 1,000 msg/s) is not"
  echo "measured here: latency at a fixed rate is not an instruction-count question."
  echo
  echo "- Command: \`$COMMAND\`"
  echo "- Commit: $COMMIT (binaries \`target/release/warren\` and \`warren-perf\` built $BUILT)"
  echo "- Machine: $(nproc) cores (the broker runs one runtime worker per core), $(uname -sr)"
  echo "- Valgrind: $VG_VERSION (\`valgrind --tool=callgrind\`, default options)"
  echo "- Date: $DATE"
  echo
  [[ ${SCENARIOS//g/} ]] || return 0
  echo "warren-perf flags (against a broker started for the run; the baseline has one message per producer):"
  echo
  for ((i = 0; i < ${#SCENARIOS}; i++)); do
    s=${SCENARIOS:i:1}
    case $s in
      g) ;;
      h)
        echo "- (h) \`${H_PUBLISH/-C N/-C ${COUNT[h]}}\`, then \`${H_DRAIN/-D N/-D ${COUNT[h]}}\`"
        ;;
      *)
        flags=$(scenario_flags "$s" $((COUNT[$s] / PRODUCERS[$s])) $((COUNT[$s] / PRODUCERS[$s])))
        echo "- ($s) \`$flags\`"
        ;;
    esac
  done
  if ((ANNOTATE)); then
    for ((i = 0; i < ${#SCENARIOS}; i++)); do
      s=${SCENARIOS:i:1}
      [[ -s $WORK/$s.top ]] || continue
      echo
      echo "### ($s) top 15 functions by exclusive Ir (whole run, baseline included; the lines a function has inlined from elsewhere counted with it)"
      echo
      echo "\`callgrind_annotate target/callgrind/$s.out\`:"
      echo
      echo '```'
      cat "$WORK/$s.top"
      echo '```'
    done
  fi
}

report >"$WORK/report.md"
cat "$WORK/report.md"

if ((WRITE)); then
  if ((FAILED)); then
    log "not writing $OUT: a scenario failed"
  else
    {
      cat <<INTRO
# Warren: instructions per message (callgrind)

Generated by \`scripts/callgrind.sh\` on $DATE; rerun it rather than editing this file.

Throughput on a shared machine moves with everything else the machine does; the number of
instructions the broker executes for a fixed workload hardly does. For each benchmark scenario
of \`scripts/bench-compare.sh\` (see [performance.md](performance.md)), the script starts
\`target/release/warren\` under \`valgrind --tool=callgrind\` on a free 127.0.0.1 port with an empty
data directory, runs \`target/release/warren-perf\` (natively, not under valgrind) with the
scenario's flags and a fixed message count (\`-C\` per producer, \`-D\` per consumer) instead of a
duration, stops the broker with SIGTERM and reads the total instruction count (Ir) of the
broker process from the callgrind output. A baseline run of the same scenario with one message
per producer (boot, connections, declares, shutdown) is subtracted, and the rest is divided by
the messages.

What is counted: every instruction the broker process executes in user space, on all of its
threads: the user-space side of the network syscalls, frame parsing and encoding, routing,
queues, the message store and its fsync bookkeeping, allocation, the async runtime. Work in the
kernel (TCP, page cache, the fsyncs themselves) is not counted by callgrind, and neither is the
load generator. Callgrind serialises the broker's threads, so batching (how many frames one
read or write carries) can differ a little from a native run, and timers that fire while the
load runs add a little (about 30,000 Ir per idle second). Repeated runs agree to within about
1%. Under valgrind the broker is much slower than the native warren-perf, so the producers run
ahead and a backlog of about the whole count builds up; the cost per message grows with that
backlog, so compare runs with the same counts only (the default ones, for this file), and on
machines with the same number of cores (the broker starts one runtime worker per core).

To reproduce: \`cargo build --release -p warren-broker --bins\`, then
\`scripts/callgrind.sh [--scenarios abcdefh] [--messages N | a=N,...] [--scale F] [--annotate] [--write]\`.
\`--annotate\` keeps the callgrind files in \`target/callgrind/\` and lists the functions with
the most exclusive instructions per scenario; \`callgrind_annotate target/callgrind/a.out\` (or
\`kcachegrind\`) shows the rest.

## Results

INTRO
      cat "$WORK/report.md"
    } >"$OUT"
    log "wrote $OUT"
  fi
fi
exit "$FAILED"
