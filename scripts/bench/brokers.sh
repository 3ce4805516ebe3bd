# shellcheck shell=bash
# Broker control for scripts/bench-compare.sh (sourced, not run). Needs ROOT and WORK set, and
# the ports RMQ_PORT, GMQ_PORT, GMQ_ADMIN_PORT, WARREN_PORT. Every broker listens on
# 127.0.0.1 only and keeps all of its state under $WORK/<broker>.
#
#   broker_start NAME     start and wait until it accepts AMQP (blocking, bounded)
#   broker_launch NAME    start without waiting (restart timing)
#   broker_stop NAME      graceful stop (SIGTERM / rabbitmqctl shutdown), bounded
#   broker_pid NAME       pid of the process whose memory counts (RabbitMQ: beam.smp)
#   broker_port NAME
#   rss_kb PID            VmRSS from /proc/PID/status
#   install_garagemq      apt-get install it when missing; non-zero when not packaged

bench_log() { echo "bench: $*" >&2; }

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT PID SECONDS: until the port accepts, the pid dies, or time runs out.
wait_port() {
  local port=$1 pid=$2 deadline=$((SECONDS + $3))
  until port_open "$port"; do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.05
  done
}

APT_UPDATED=0
# Without -q: grep must read all of apt-cache's output, or apt-cache may die of SIGPIPE and,
# under pipefail, a package with a candidate looks like one without.
apt_candidate() { apt-cache policy "$1" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }

# Installs a Debian package without letting its maintainer scripts start a system service.
apt_install_quiet() {
  local policy=/usr/sbin/policy-rc.d created=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    created=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 || rc=$?
  if ((created)); then as_root rm -f "$policy"; fi
  return "$rc"
}

install_garagemq() {
  if command -v garagemq >/dev/null 2>&1; then return 0; fi
  if ! apt_candidate garagemq && ((APT_UPDATED == 0)); then
    bench_log "apt-get update (garagemq not in the package lists yet)"
    as_root apt-get update -qq >&2 || true
    APT_UPDATED=1
  fi
  if ! apt_candidate garagemq; then
    bench_log "garagemq is not packaged for this system (apt-cache policy garagemq: no candidate)"
    return 1
  fi
  bench_log "installing garagemq from Debian"
  apt_install_quiet garagemq
}

broker_port() {
  case $1 in
    warren) echo "$WARREN_PORT" ;;
    rabbitmq) echo "$RMQ_PORT" ;;
    garagemq) echo "$GMQ_PORT" ;;
  esac
}

# ---- Warren ----
warren_launch() {
  mkdir -p "$WORK/warren/data"
  "$ROOT/target/release/warren" --listen "127.0.0.1:$WARREN_PORT" \
    --data-dir "$WORK/warren/data" --log warn >>"$WORK/warren/warren.log" 2>&1 </dev/null &
  echo $! >"$WORK/warren/pid"
}

warren_stop() {
  local pid
  pid=$(cat "$WORK/warren/pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  bench_log "warren (pid $pid) ignored SIGTERM for 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# ---- garagemq ----
garagemq_config() {
  mkdir -p "$WORK/garagemq/db"
  # The packaged /etc/garagemq/config.yaml with our port, admin port and data directory.
  cat >"$WORK/garagemq/config.yaml" <<EOF
proto: amqp-rabbit
users:
  - username: guest
    password: 084e0343a0486ff05530df6c705c8bb4 # guest md5
tcp:
  ip: 127.0.0.1
  port: $GMQ_PORT
  nodelay: false
  readBufSize: 196608
  writeBufSize: 196608
admin:
  ip: 127.0.0.1
  port: $GMQ_ADMIN_PORT
queue:
  shardSize: 8192
  maxMessagesInRam: 131072
db:
  defaultPath: $WORK/garagemq/db
  engine: badger
vhost:
  defaultPath: /
security:
  passwordCheck: md5
connection:
  channelsMax: 4096
  frameMaxSize: 65536
EOF
}

garagemq_launch() {
  [[ -f $WORK/garagemq/config.yaml ]] || garagemq_config
  (cd "$WORK/garagemq" && exec garagemq --config "$WORK/garagemq/config.yaml" --log-level error \
    >>"$WORK/garagemq/garagemq.log" 2>&1 </dev/null) &
  echo $! >"$WORK/garagemq/pid"
}

garagemq_stop() {
  local pid
  pid=$(cat "$WORK/garagemq/pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  bench_log "garagemq (pid $pid) ignored SIGTERM for 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# ---- RabbitMQ (through scripts/rabbitmq.sh) ----
rmq_state() { echo "$WORK/rabbitmq"; }

rabbitmq_start() {
  RABBITMQ_STATE_DIR=$(rmq_state) "$ROOT/scripts/rabbitmq.sh" start "$RMQ_PORT" >/dev/null
}

rabbitmq_stop() {
  RABBITMQ_STATE_DIR=$(rmq_state) "$ROOT/scripts/rabbitmq.sh" stop "$RMQ_PORT" >/dev/null 2>&1 || true
}

# Starts the node that scripts/rabbitmq.sh set up, without its blocking readiness checks
# (rabbitmqctl calls cost seconds and would inflate the measured restart time). The
# environment is the one rabbitmq.sh's node_env exports; the node must have been started by
# rabbitmq.sh once (it writes the config files and the cookie).
rabbitmq_launch() {
  local state port=$RMQ_PORT
  state=$(rmq_state)
  (
    export HOME="$state"
    export RABBITMQ_NODENAME="warren-rmq-$port@localhost"
    export RABBITMQ_USE_LONGNAME=false
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$port"
    export RABBITMQ_DIST_PORT=$((port + 20000))
    export ERL_EPMD_PORT=$((port + 10000))
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_MNESIA_BASE="$state/mnesia"
    export RABBITMQ_LOG_BASE="$state/log"
    export RABBITMQ_PID_FILE="$state/rabbitmq.pid"
    export RABBITMQ_CONF_ENV_FILE="$state/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$state/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$state/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$state/enabled_plugins"
    export RABBITMQ_PLUGINS_EXPAND_DIR="$state/plugins-expand"
    export RABBITMQ_LOGS="$state/log/rabbit.log"
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >>"$state/log/startup.log" 2>&1 </dev/null &
    echo $! >"$state/launcher.pid"
  )
}

# ---- by name ----
broker_launch() {
  case $1 in
    warren) warren_launch ;;
    garagemq) garagemq_launch ;;
    rabbitmq) rm -f "$(rmq_state)/rabbitmq.pid"; rabbitmq_launch ;;
  esac
}

broker_start() {
  local name=$1 pid
  case $name in
    rabbitmq)
      rabbitmq_start || return 1
      ;;
    *)
      broker_launch "$name"
      pid=$(cat "$WORK/$name/pid")
      if ! wait_port "$(broker_port "$name")" "$pid" 60; then
        bench_log "$name did not start; last lines of its log:"
        tail -n 20 "$WORK/$name/$name.log" >&2 || true
        return 1
      fi
      ;;
  esac
}

broker_stop() {
  case $1 in
    warren) warren_stop ;;
    garagemq) garagemq_stop ;;
    rabbitmq) rabbitmq_stop ;;
  esac
}

broker_pid() {
  case $1 in
    warren | garagemq) cat "$WORK/$1/pid" 2>/dev/null ;;
    rabbitmq)
      # RabbitMQ writes the Erlang VM's OS pid here once it has booted.
      local f
      f="$(rmq_state)/rabbitmq.pid"
      for _ in $(seq 1 100); do
        if [[ -s $f ]]; then tr -d '[:space:]' <"$f"; return 0; fi
        sleep 0.1
      done
      return 1
      ;;
  esac
}

rss_kb() {
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true
}
