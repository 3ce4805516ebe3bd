#!/usr/bin/env bash
# Run a private RabbitMQ node (Debian's rabbitmq-server, 3.10 on bookworm) for differential tests.
#
#   scripts/rabbitmq.sh [start] [PORT]   install if needed, start a node on 127.0.0.1:PORT,
#                                        wait until it accepts AMQP, print PORT on stdout
#   scripts/rabbitmq.sh stop [PORT]      stop that node (and its private epmd)
#   scripts/rabbitmq.sh status [PORT]    exit 0 when the node answers
#
# PORT defaults to $RABBITMQ_PORT, else 5673 (Warren's default is 5672). Everything the node
# writes (mnesia, logs, cookie, config) lives in $RABBITMQ_STATE_DIR, default
# ${TMPDIR:-/tmp}/warren-rabbitmq-PORT. The node has its own name (warren-rmq-PORT@localhost),
# its own epmd port (PORT+10000) and distribution port (PORT+20000), so it neither collides
# with a system RabbitMQ nor with another node started by this script. Plugins (management
# included) are off. guest/guest may log in from loopback, as in a default RabbitMQ.
# Both start and stop are idempotent. Progress goes to stderr; stdout carries only the port.
set -euo pipefail

cmd=start
case "${1:-}" in
  start | stop | status) cmd=$1; shift ;;
esac
PORT=${1:-${RABBITMQ_PORT:-5673}}
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1024 || PORT > 45000)); then
  echo "rabbitmq.sh: bad port '$PORT' (want 1024..45000)" >&2
  exit 2
fi
STATE=${RABBITMQ_STATE_DIR:-${TMPDIR:-/tmp}/warren-rabbitmq-$PORT}
EPMD_PORT=$((PORT + 10000))
DIST_PORT=$((PORT + 20000))
NODE="warren-rmq-$PORT@localhost"
# Handshake timeout of this node, in ms: kept short so the handshake-timeout test is quick.
HANDSHAKE_TIMEOUT_MS=${RABBITMQ_HANDSHAKE_TIMEOUT_MS:-3000}

log() { echo "rabbitmq.sh: $*" >&2; }

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

install_rabbitmq() {
  if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
    return 0
  fi
  if ! apt-cache policy rabbitmq-server 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    log "apt-get update (rabbitmq-server not in the package lists yet)"
    as_root apt-get update -qq >&2
  fi
  log "installing rabbitmq-server from Debian"
  # Keep the package's maintainer scripts from starting a system node on port 5672.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    created_policy=1
  fi
  local rc=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rabbitmq-server >&2 || rc=$?
  if ((created_policy)); then as_root rm -f "$policy"; fi
  if ((rc != 0)); then
    log "apt-get install rabbitmq-server failed ($rc)"
    exit "$rc"
  fi
}

node_env() {
  export HOME="$STATE" # the Erlang cookie lives in $HOME
  export RABBITMQ_NODENAME="$NODE"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$PORT"
  export RABBITMQ_DIST_PORT="$DIST_PORT"
  export ERL_EPMD_PORT="$EPMD_PORT"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_MNESIA_BASE="$STATE/mnesia"
  export RABBITMQ_LOG_BASE="$STATE/log"
  export RABBITMQ_PID_FILE="$STATE/rabbitmq.pid"
  export RABBITMQ_CONF_ENV_FILE="$STATE/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$STATE/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$STATE/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$STATE/enabled_plugins"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$STATE/plugins-expand"
  export RABBITMQ_LOGS="$STATE/log/rabbit.log"
}

ctl() { /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" "$@"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

is_up() {
  [[ -d $STATE ]] || return 1
  node_env
  ctl -q status >/dev/null 2>&1 && port_open
}

do_start() {
  install_rabbitmq
  if is_up; then
    log "node $NODE already running on 127.0.0.1:$PORT"
    echo "$PORT"
    return 0
  fi
  if port_open; then
    log "port $PORT is taken by something else; pick another: scripts/rabbitmq.sh start PORT"
    exit 1
  fi
  mkdir -p "$STATE/log" "$STATE/mnesia"
  node_env
  if [[ ! -s $STATE/.erlang.cookie ]]; then
    head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/.erlang.cookie"
    chmod 400 "$STATE/.erlang.cookie"
  fi
  : >"$STATE/rabbitmq-env.conf"
  echo '[].' >"$STATE/enabled_plugins"
  echo '[].' >"$STATE/advanced.config"
  cat >"$STATE/rabbitmq.conf" <<EOF
loopback_users.guest = true
handshake_timeout = $HANDSHAKE_TIMEOUT_MS
EOF
  log "starting $NODE on 127.0.0.1:$PORT (state in $STATE)"
  # -detached loses the exit status of a failed boot; run it in the background instead and
  # watch both the process and the port.
  setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$STATE/log/startup.log" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + 90))
  echo "$pid" >"$STATE/launcher.pid"
  until ctl -q await_startup --timeout 5 >/dev/null 2>&1 && port_open; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "rabbitmq-server exited during boot; last lines of its log:"
      tail -n 40 "$STATE/log/startup.log" >&2 || true
      exit 1
    fi
    if ((SECONDS > deadline)); then
      log "rabbitmq-server did not start within 90 s; last lines of its log:"
      tail -n 40 "$STATE/log/startup.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "ready: amqp://guest:guest@127.0.0.1:$PORT/%2f (node $NODE)"
  echo "$PORT"
}

do_stop() {
  if [[ ! -d $STATE ]]; then
    log "no node state in $STATE: nothing to stop"
    return 0
  fi
  node_env
  if ctl -q status >/dev/null 2>&1; then
    log "stopping $NODE"
    ctl -q shutdown >/dev/null 2>&1 || ctl -q stop >/dev/null 2>&1 || true
  fi
  if [[ -f $STATE/launcher.pid ]]; then
    local pid
    pid=$(cat "$STATE/launcher.pid")
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "node did not stop; killing launcher pid $pid"
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/launcher.pid"
  fi
  # The private epmd this node started (on its own port) goes too.
  epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
  log "stopped $NODE"
}

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  status)
    if is_up; then
      echo "$PORT"
    else
      exit 1
    fi
    ;;
esac
