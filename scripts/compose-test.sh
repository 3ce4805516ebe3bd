#!/usr/bin/env bash
# The docker compose test: builds the images, starts docker-compose.yml under a private project
# name and host port, and checks the broker the way a user of the image would.
#
#   scripts/compose-test.sh
#
# Without a reachable docker engine (or without docker compose) it prints
# "compose test skipped: <why>" and exits 0; it never passes silently.
#
# Checks, in order (all are run; the exit status is 1 if any failed):
#   image         the image runs as a numeric non-root user, with an exec-form healthcheck
#   healthy       `up -d` makes the broker healthy (HEALTHCHECK: warren diagnostics ping)
#   env           RABBITMQ_DEFAULT_USER/PASS/VHOST are honoured (guest is refused)
#   publish       pika publishes N persistent messages, with confirms, to a durable queue
#   restart       `docker-compose restart warren`, healthy again
#   survive       the durable queue and its N persistent messages survived the restart
#   recreate      N more persistent messages survive removing the container and creating a new
#                 one on the same named volume
#   examples      the example producer and consumer (profile "examples") reach the broker by
#                 its service name
#   defaults      the image's defaults: guest/guest from a non-loopback peer is accepted
#                 (WARREN_LOOPBACK_USERS= empty)
#   stop          `docker stop` closes an open client connection with 320 CONNECTION_FORCED and
#                 the container exits with code 0 well within stop_grace_period
# Always `down -v` at the end (trap), and leftovers of earlier runs that were killed are removed,
# so the script can be run again at any time.
#
# Environment: COMPOSE ("docker-compose" or "docker compose"; default: v2 when present),
# COMPOSE_TEST_MESSAGES (500), WARREN_IMAGE / WARREN_EXAMPLES_IMAGE (see docker-build.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

skip() {
  echo "compose test skipped: $*"
  exit 0
}

# ---- can we run at all? -----------------------------------------------------------------------
command -v docker >/dev/null || skip "no docker client installed"
if ! info_err=$(timeout 20 docker info 2>&1 >/dev/null); then
  skip "no docker engine reachable (docker info: $(echo "$info_err" | grep -m1 -v '^\s*$' || echo 'timed out'))"
fi
if [[ -n ${COMPOSE:-} ]]; then
  read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE_CMD=(docker-compose)
else
  skip "neither 'docker compose' (v2) nor docker-compose (v1) is installed"
fi

PREFIX=warren-ct-
PROJECT=$PREFIX$$
N=${COMPOSE_TEST_MESSAGES:-500}
export WARREN_IMAGE=${WARREN_IMAGE:-warren:local}
export WARREN_EXAMPLES_IMAGE=${WARREN_EXAMPLES_IMAGE:-warren-examples:local}
WORK=$(mktemp -d)
compose() { "${COMPOSE_CMD[@]}" -f "$ROOT/docker-compose.yml" -p "$PROJECT" "$@"; }
say() { echo "compose-test: $*"; }

# ---- leftovers of killed runs -----------------------------------------------------------------
for p in $( (docker ps -a --filter label=com.docker.compose.project \
  --format '{{.Label "com.docker.compose.project"}}'
  docker volume ls --filter label=com.docker.compose.project \
    --format '{{.Label "com.docker.compose.project"}}') | sort -u | grep -E "^$PREFIX[0-9]+\$" || true); do
  if ! kill -0 "${p#"$PREFIX"}" 2>/dev/null; then
    say "removing project $p left by an earlier run"
    "${COMPOSE_CMD[@]}" -f "$ROOT/docker-compose.yml" -p "$p" --profile examples down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
    docker rm -f -v "$p-defaults" >/dev/null 2>&1 || true
  fi
done

# ---- results ----------------------------------------------------------------------------------
declare -a NAMES=() RESULTS=()
FAILED=0
pass() {
  NAMES+=("$1")
  RESULTS+=("passed${2:+: $2}")
  say "PASS $1${2:+: $2}"
}
fail() {
  NAMES+=("$1")
  RESULTS+=("FAILED: $2")
  FAILED=$((FAILED + 1))
  say "FAIL $1: $2"
}
summary() {
  echo
  echo "compose-test summary (project $PROJECT, ${COMPOSE_CMD[*]}, $WARREN_IMAGE):"
  for i in "${!NAMES[@]}"; do
    printf '  %-9s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
  done
}

cleanup() {
  local rc=$?
  set +e
  if ((FAILED > 0 || rc != 0)) && [[ -n ${CID:-} ]]; then
    echo "---- last broker log lines ----"
    docker logs --tail 40 "$CID" 2>&1
    echo "-------------------------------"
  fi
  docker rm -f -v "$PROJECT-defaults" >/dev/null 2>&1
  compose --profile examples down -v --remove-orphans -t 30 >/dev/null 2>&1 ||
    say "warning: '${COMPOSE_CMD[*]} -p $PROJECT down -v' failed"
  rm -rf "$WORK"
  summary
  if ((FAILED > 0 && rc == 0)); then rc=1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build ------------------------------------------------------------------------------------
if ! scripts/setup-python.sh; then
  fail build "scripts/setup-python.sh failed (see above)"
  exit 1
fi
PY=$ROOT/.venv/bin/python
if ! scripts/docker-build.sh; then
  fail build "scripts/docker-build.sh failed (see above)"
  exit 1
fi

# ---- the pika side, run from .venv against the published port ----------------------------------
cat >"$WORK/check.py" <<'EOF'
"""compose-test client: python check.py COMMAND PORT USER PASSWORD VHOST [ARGS]"""
import subprocess
import sys
import time

import pika

QUEUE = "compose-test.durable"


def params(port, user, password, vhost):
    return pika.ConnectionParameters(
        host="127.0.0.1", port=int(port), virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=5, retry_delay=1, blocked_connection_timeout=30,
    )


def body(run, i, n):
    # Sizes from 0 to ~5 KB, and a last message larger than frame_max (131072).
    size = 300_000 if i == n - 1 else (i * 37) % 5000
    return f"{run}:{i}:".encode() + bytes((i + k) % 251 for k in range(size))


def publish(p, run, n):
    conn = pika.BlockingConnection(p)
    ch = conn.channel()
    ch.queue_declare(QUEUE, durable=True)
    ch.confirm_delivery()
    for i in range(n):
        # With confirms, basic_publish returns once the broker acked it (raises on nack,
        # and on return of an unroutable mandatory message).
        ch.basic_publish("", QUEUE, body(run, i, n), pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, headers={"seq": i}, message_id=f"{run}-{i}"),
            mandatory=True)
    depth = ch.queue_declare(QUEUE, durable=True, passive=True).method.message_count
    conn.close()
    if depth != n:
        sys.exit(f"queue {QUEUE} holds {depth} messages after {n} confirmed publishes")
    print(f"{n} persistent messages confirmed into durable queue {QUEUE}")


def verify(p, run, n):
    conn = pika.BlockingConnection(p)
    ch = conn.channel()
    try:
        depth = ch.queue_declare(QUEUE, durable=True, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as e:
        sys.exit(f"durable queue {QUEUE} is gone after the restart: {e.reply_code} {e.reply_text}")
    got = []
    while True:
        method, props, data = ch.basic_get(QUEUE, auto_ack=False)
        if method is None:
            break
        got.append((props, data))
        ch.basic_ack(method.delivery_tag)
    conn.close()
    problems = []
    if depth != n:
        problems.append(f"queue.declare-ok reports {depth} messages, expected {n}")
    if len(got) != n:
        problems.append(f"basic.get returned {len(got)} messages, expected {n}")
    for i, (props, data) in enumerate(got[:n]):
        if data != body(run, i, n):
            problems.append(f"message {i}: body differs (got {len(data)} bytes: {data[:40]!r}...)")
            break
        if props.delivery_mode != 2 or (props.headers or {}).get("seq") != i \
                or props.message_id != f"{run}-{i}":
            problems.append(f"message {i}: properties differ: {props}")
            break
    if problems:
        sys.exit("; ".join(problems))
    print(f"all {n} persistent messages survived the restart, in order, bodies and properties intact")


def refused(p):
    try:
        pika.BlockingConnection(p).close()
    except pika.exceptions.ProbableAccessDeniedError as e:
        print(f"refused as expected: {e!r}")
        return
    except pika.exceptions.ProbableAuthenticationError as e:
        print(f"refused as expected: {e!r}")
        return
    sys.exit("the login was accepted")


def connects(p):
    conn = pika.BlockingConnection(p)
    ch = conn.channel()
    ch.queue_declare("", exclusive=True)
    conn.close()
    print("connected, opened a channel and declared a queue")


def stop(p, container, grace):
    """Holds a consuming connection open while `docker stop` runs; expects 320 from the broker."""
    conn = pika.BlockingConnection(p)
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_consume(q, lambda *a: None)
    t0 = time.monotonic()
    proc = subprocess.Popen(["docker", "stop", container], stdout=subprocess.DEVNULL)
    closed = None
    try:
        while time.monotonic() - t0 < grace + 10:
            conn.process_data_events(time_limit=0.2)
    except pika.exceptions.ConnectionClosedByBroker as e:
        closed = (e.reply_code, e.reply_text, time.monotonic() - t0)
    except pika.exceptions.AMQPConnectionError as e:
        closed = (None, repr(e), time.monotonic() - t0)
    rc = proc.wait(timeout=grace + 30)
    elapsed = time.monotonic() - t0
    print(f"docker stop returned {rc} after {elapsed:.2f} s; client saw {closed}")
    if rc != 0:
        sys.exit(f"docker stop failed ({rc})")
    if closed is None or closed[0] != 320:
        sys.exit(f"the open connection was not closed with 320 CONNECTION_FORCED: {closed}")
    with open(sys.argv[-1], "w") as f:
        f.write(f"{elapsed:.2f}\n")


if __name__ == "__main__":
    cmd, port, user, password, vhost, *rest = sys.argv[1:]
    p = params(port, user, password, vhost)
    if cmd == "publish":
        publish(p, rest[0], int(rest[1]))
    elif cmd == "verify":
        verify(p, rest[0], int(rest[1]))
    elif cmd == "refused":
        refused(p)
    elif cmd == "connects":
        connects(p)
    elif cmd == "stop":
        stop(p, rest[0], float(rest[1]))
    else:
        sys.exit(f"unknown command {cmd}")
EOF

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_healthy CONTAINER TIMEOUT: 0 once the healthcheck says healthy.
wait_healthy() {
  local cid=$1 deadline=$((SECONDS + $2)) state
  while ((SECONDS < deadline)); do
    state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}' "$cid" 2>&1) || true
    case $state in
      "running healthy") return 0 ;;
      *unhealthy* | exited* | dead* | *no-healthcheck*)
        echo "container $cid: $state"
        return 1
        ;;
    esac
    sleep 1
  done
  echo "container $cid: still '$state' after $2 s"
  return 1
}

# ---- up ---------------------------------------------------------------------------------------
export RABBITMQ_DEFAULT_USER=compose-test
RABBITMQ_DEFAULT_PASS=pw-$RANDOM$RANDOM
export RABBITMQ_DEFAULT_PASS
export RABBITMQ_DEFAULT_VHOST=compose-test
export WARREN_AMQP_HOST_IP=127.0.0.1
CREDS=("$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" "$RABBITMQ_DEFAULT_VHOST")
up_ok=0
t_up=$SECONDS
for attempt in 1 2 3; do
  WARREN_AMQP_PORT=$(free_port)
  export WARREN_AMQP_PORT
  say "project $PROJECT: ${COMPOSE_CMD[*]} up -d (AMQP on 127.0.0.1:$WARREN_AMQP_PORT, attempt $attempt)"
  if compose up -d --no-build warren; then
    up_ok=1
    break
  fi
  compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
done
if ((!up_ok)); then
  fail up "'${COMPOSE_CMD[*]} up -d' failed three times"
  exit 1
fi
CID=$(compose ps -q warren)

# image: numeric non-root user, exec-form healthcheck, the volume at /var/lib/warren.
user=$(docker inspect -f '{{.Config.User}}' "$CID")
hc=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$WARREN_IMAGE")
mount=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/var/lib/warren"}}{{.Type}}:{{.Name}}{{end}}{{end}}' "$CID")
entry=$(docker image inspect -f '{{json .Config.Entrypoint}}' "$WARREN_IMAGE")
if [[ $user =~ ^[1-9][0-9]*(:[0-9]+)?$ && $hc == '["CMD","/usr/local/bin/warren","diagnostics","ping"'* &&
  $mount == volume:${PROJECT}_warren-data && $entry == '["/usr/local/bin/warren"]' ]]; then
  pass image "user $user, entrypoint $entry, healthcheck $hc, $mount"
else
  fail image "user '$user', entrypoint '$entry', healthcheck '$hc', mount '$mount'"
fi

if out=$(wait_healthy "$CID" 60); then
  pass healthy "$((SECONDS - t_up)) s after up -d"
else
  fail healthy "$out"
  exit 1
fi

# env: the RABBITMQ_DEFAULT_* of the compose file are honoured.
if out=$("$PY" "$WORK/check.py" refused "$WARREN_AMQP_PORT" guest guest / 2>&1) &&
  out2=$("$PY" "$WORK/check.py" connects "$WARREN_AMQP_PORT" "${CREDS[@]}" 2>&1); then
  pass env "guest refused, $RABBITMQ_DEFAULT_USER on vhost $RABBITMQ_DEFAULT_VHOST accepted"
else
  fail env "$(echo "${out:-} ${out2:-}" | tail -n 3 | tr '\n' ' ')"
fi

RUN=run$$-$RANDOM
if out=$("$PY" "$WORK/check.py" publish "$WARREN_AMQP_PORT" "${CREDS[@]}" "$RUN" "$N" 2>&1); then
  pass publish "$out"
else
  fail publish "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi

# ---- restart: the messages must survive in the volume -----------------------------------------
t0=$SECONDS
started=$(docker inspect -f '{{.State.StartedAt}}' "$CID")
if out=$(compose restart warren 2>&1) && out=$(wait_healthy "$CID" 60); then
  if [[ $(docker inspect -f '{{.State.StartedAt}}' "$CID") != "$started" ]]; then
    pass restart "process restarted (SIGTERM, start) and healthy again in $((SECONDS - t0)) s"
  else
    fail restart "the container was not restarted (StartedAt unchanged: $started)"
  fi
else
  fail restart "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi
if out=$("$PY" "$WORK/check.py" verify "$WARREN_AMQP_PORT" "${CREDS[@]}" "$RUN" "$N" 2>&1); then
  pass survive "$out"
else
  fail survive "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi

# ---- recreate: a new container on the same named volume finds the messages --------------------
# (the data is in the volume, not in the container's own filesystem)
RUN2=${RUN}b
if out=$("$PY" "$WORK/check.py" publish "$WARREN_AMQP_PORT" "${CREDS[@]}" "$RUN2" "$N" 2>&1) &&
  out=$(compose rm -s -f warren 2>&1) && out=$(compose up -d --no-build warren 2>&1) &&
  NEW_CID=$(compose ps -q warren) && [[ -n $NEW_CID && $NEW_CID != "$CID" ]] &&
  out=$(wait_healthy "$NEW_CID" 60) &&
  out=$("$PY" "$WORK/check.py" verify "$WARREN_AMQP_PORT" "${CREDS[@]}" "$RUN2" "$N" 2>&1); then
  pass recreate "container removed and created anew on the volume: $out"
else
  fail recreate "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi
CID=$(compose ps -q warren)
[[ -n $CID ]] || { fail recreate "no warren container is running any more"; exit 1; }

# ---- the example clients, by service name -----------------------------------------------------
k=5
if out=$(compose --profile examples run --rm --no-deps -e AMQP_QUEUE=compose-test.examples \
  producer /app/producer.py --count $k 2>&1) &&
  out2=$(compose --profile examples run --rm --no-deps -e AMQP_QUEUE=compose-test.examples \
    consumer /app/consumer.py --count $k --timeout 30 2>&1) &&
  [[ $(grep -c 'published and confirmed' <<<"$out") == "$k" && $(grep -c 'consumer: received' <<<"$out2") == "$k" ]]; then
  pass examples "producer published $k (confirmed), consumer received $k, via host 'warren'"
else
  fail examples "$(echo "${out:-}"$'\n'"${out2:-}" | grep -v '^\s*$' | tail -n 4 | tr '\n' ' ')"
fi

# ---- the image's defaults: guest from anywhere ------------------------------------------------
dport=$(free_port)
if docker run -d --rm --name "$PROJECT-defaults" -p "127.0.0.1:$dport:5672" "$WARREN_IMAGE" >/dev/null &&
  out=$(wait_healthy "$PROJECT-defaults" 60) &&
  out=$("$PY" "$WORK/check.py" connects "$dport" guest guest / 2>&1); then
  peer=$(docker logs "$PROJECT-defaults" 2>&1 | grep -o 'peer=[0-9.]*' | tail -n1 | cut -d= -f2)
  pass defaults "guest/guest accepted from ${peer:-the docker bridge} (not loopback)"
else
  fail defaults "$(echo "${out:-}" | tail -n 3 | tr '\n' ' ')"
fi
docker rm -f -v "$PROJECT-defaults" >/dev/null 2>&1 || true

# ---- docker stop: SIGTERM to process 1, graceful close, exit 0 --------------------------------
grace=$(docker inspect -f '{{if .Config.StopTimeout}}{{.Config.StopTimeout}}{{end}}' "$CID")
grace=${grace:-10}
if out=$("$PY" "$WORK/check.py" stop "$WARREN_AMQP_PORT" "${CREDS[@]}" "$CID" "$grace" "$WORK/stop-seconds" 2>&1); then
  code=$(docker inspect -f '{{.State.ExitCode}} {{.State.OOMKilled}}' "$CID")
  secs=$(cat "$WORK/stop-seconds")
  if [[ $code == "0 false" ]] && awk -v s="$secs" -v g="$grace" 'BEGIN { exit !(s < g) }' &&
    docker logs "$CID" 2>&1 | grep 'SIGTERM received' >/dev/null; then
    pass stop "exit code 0 after ${secs} s (grace ${grace} s), client got 320 CONNECTION_FORCED"
  else
    fail stop "exit code/OOM '$code' after ${secs} s (grace ${grace} s); SIGTERM logged: $(docker logs "$CID" 2>&1 | grep -c 'SIGTERM received')"
  fi
else
  fail stop "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi

((FAILED == 0))
