#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, next to (not instead of) the default node
# (rabbit@localhost on 5672/15672/25672, which this script never touches).
#
#   bash scripts/cluster.sh start     # starts whichever node is down, joins them; idempotent.
#                                     # The LAST line of output is the AMQP_URL of all three.
#   bash scripts/cluster.sh status    # each node up or down, and the cluster as node 1 sees it
#   bash scripts/cluster.sh stop      # stops the three nodes and removes their data and logs
#   bash scripts/cluster.sh stop-node 2   # stops one node gracefully, data kept (it stays a member:
#                                     # `start` brings it back); waits first until no quorum queue
#                                     # needs it for its majority, as a rolling restart must
#   bash scripts/cluster.sh start-node 2  # starts one member that was stopped (or killed) and waits
#                                     # until it serves again; quicker than `start`, which checks all
#
# node               AMQP                management        distribution
# orderflow-1@localhost  127.0.0.1:5681  127.0.0.1:15681  25681
# orderflow-2@localhost  127.0.0.1:5682  127.0.0.1:15682  25682
# orderflow-3@localhost  127.0.0.1:5683  127.0.0.1:15683  25683
#
# Environment: ORDERFLOW_CLUSTER_DIR (default /tmp/orderflow-cluster: data, logs, configs,
# and node i's pid in node-i/rabbitmq.pid), ORDERFLOW_CLUSTER_PORT (default 5680: node i
# listens on PORT+i, management on PORT+10000+i, distribution on PORT+20000+i),
# ORDERFLOW_CLUSTER_NAME (default orderflow: node i is NAME-i@localhost). A second cluster
# (a test's) runs beside the first with other values of all three. Each node gets its own rabbitmq.conf,
# enabled_plugins (management) and env file, so nothing in /etc/rabbitmq applies to it.
# The nodes share the machine's Erlang cookie (the rabbitmq user's, ~rabbitmq/.erlang.cookie:
# Debian's wrappers run every node and rabbitmqctl as that user), which is what lets them and
# rabbitmqctl talk. The guest user may connect from 127.0.0.1, as on the default node.
set -euo pipefail

readonly DIR=${ORDERFLOW_CLUSTER_DIR:-/tmp/orderflow-cluster}
readonly PORT=${ORDERFLOW_CLUSTER_PORT:-5680}
readonly NAME=${ORDERFLOW_CLUSTER_NAME:-orderflow}
readonly NODES=(1 2 3)
readonly HOST=localhost

log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

node_name() { echo "$NAME-$1@$HOST"; }
amqp_port() { echo $((PORT + $1)); }
mgmt_port() { echo $((PORT + 10000 + $1)); }
dist_port() { echo $((PORT + 20000 + $1)); }
node_dir() { echo "$DIR/node-$1"; }

# The environment of node $1, for rabbitmq-server and rabbitmqctl alike.
node_env() {
  local i=$1 d
  d=$(node_dir "$i")
  echo RABBITMQ_NODENAME="$(node_name "$i")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$i")" \
    RABBITMQ_DIST_PORT="$(dist_port "$i")" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/rabbitmq.pid"
}

# Runs a RabbitMQ command (rabbitmq-server, rabbitmqctl, ...) as node $1.
as_node() {
  local i=$1
  shift
  # shellcheck disable=SC2046 # node_env prints NAME=value words without spaces
  env $(node_env "$i") "$@"
}

ctl() {
  local i=$1
  shift
  as_node "$i" rabbitmqctl -q -n "$(node_name "$i")" "$@"
}

running() { ctl "$1" ping >/dev/null 2>&1; }

pid_of() {
  local f
  f="$(node_dir "$1")/rabbitmq.pid"
  [[ -s $f ]] && cat "$f"
}

write_config() {
  local i=$1 d
  d=$(node_dir "$i")
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq.conf" <<EOF
# Node $(node_name "$i") of the orderflow test cluster (scripts/cluster.sh).
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$i")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$i")
# The management API's statistics every 5 s is plenty for tests.
collect_statistics_interval = 5000
EOF
  # Sourced by rabbitmq-env instead of /etc/rabbitmq/rabbitmq-env.conf (whose NODENAME is the
  # default node's). Keep Erlang distribution on the loopback interface, like the default node.
  cat >"$d/rabbitmq-env.conf" <<'EOF'
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  echo '[rabbitmq_management].' >"$d/enabled_plugins"
  # Debian's wrappers run the node as the rabbitmq user.
  if [[ $EUID -eq 0 ]] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$d"
  fi
}

# wait_until SECONDS WHAT COMMAND...
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${timeout}s (logs: $DIR/node-*/log)"
    sleep 1
  done
}

tcp_open() { timeout 3 bash -c ": <>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Is node $1 clustered with node 1 (both running, each in the other's running nodes)?
joined() {
  ctl "$1" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name 1)\""
}

start_node() {
  local i=$1
  if running "$i"; then
    log "$(node_name "$i") is running"
    return
  fi
  # A node killed with -9 leaves its pid file: remove it so the new one is not confused.
  rm -f "$(node_dir "$i")/rabbitmq.pid"
  write_config "$i"
  log "starting $(node_name "$i") (AMQP $(amqp_port "$i"), management $(mgmt_port "$i"), distribution $(dist_port "$i"))"
  as_node "$i" rabbitmq-server -detached >&2 || log "rabbitmq-server -detached exited with $?"
}

start() {
  command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server not found (apt-get install rabbitmq-server)"
  mkdir -p "$DIR"
  [[ $EUID -eq 0 ]] && id rabbitmq >/dev/null 2>&1 && chown rabbitmq:rabbitmq "$DIR"
  for i in "${NODES[@]}"; do start_node "$i"; done
  for i in "${NODES[@]}"; do
    wait_until 120 "$(node_name "$i")" ctl "$i" await_startup
    wait_until 60 "$(node_name "$i") AMQP listener" tcp_open "$(amqp_port "$i")"
  done
  for i in "${NODES[@]:1}"; do
    if joined "$i"; then
      continue
    fi
    log "joining $(node_name "$i") to $(node_name 1)"
    # rabbitmqctl is chatty while a node joins (benign "tracked connection table" errors):
    # keep its output in a file and show it only when a step fails.
    for step in stop_app reset "join_cluster $(node_name 1)" start_app; do
      # shellcheck disable=SC2086 # "join_cluster NODE" is two words on purpose
      ctl "$i" $step >>"$DIR/join.log" 2>&1 || {
        cat "$DIR/join.log" >&2
        die "rabbitmqctl $step on $(node_name "$i") failed"
      }
    done
    wait_until 60 "$(node_name "$i") in the cluster" joined "$i"
  done
  for i in "${NODES[@]}"; do
    wait_until 60 "$(node_name "$i") management API" tcp_open "$(mgmt_port "$i")"
  done
  log "cluster of $(running_nodes) running nodes"
  url
}

# The running nodes as node 1 (or any running node) sees them.
running_nodes() {
  local i
  for i in "${NODES[@]}"; do
    if running "$i"; then
      ctl "$i" cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))' 2>/dev/null && return
    fi
  done
  echo 0
}

url() {
  local urls=() i
  for i in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/%2f"); done
  (
    IFS=,
    echo "${urls[*]}"
  )
}

stop() {
  local i pid
  for i in "${NODES[@]}"; do
    pid=$(pid_of "$i" || true)
    if running "$i"; then
      log "stopping $(node_name "$i")"
      ctl "$i" shutdown >&2 || true
    fi
    # Whatever survived (a node that never answered): end it by its own pid.
    if [[ -n ${pid:-} ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
      done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$DIR"
  log "stopped; removed $DIR"
}

# Starts node $1, already a member of the cluster (stopped or killed since `start` joined it),
# and waits until it serves AMQP and management again; prints the AMQP_URL last, like `start`.
start_one() {
  local i=$1
  [[ $i =~ ^[1-3]$ ]] || die "start-node takes a node number: 1, 2 or 3"
  [[ -d $(node_dir "$i")/mnesia ]] || die "$(node_name "$i") was never started: use start"
  start_node "$i"
  wait_until 120 "$(node_name "$i")" ctl "$i" await_startup
  wait_until 60 "$(node_name "$i") AMQP listener" tcp_open "$(amqp_port "$i")"
  wait_until 60 "$(node_name "$i") management API" tcp_open "$(mgmt_port "$i")"
  url
}

stop_node() {
  local i=$1
  [[ $i =~ ^[1-3]$ ]] || die "stop-node takes a node number: 1, 2 or 3"
  if ! running "$i"; then
    log "$(node_name "$i") is not running"
    return
  fi
  wait_until 120 "$(node_name "$i") not quorum-critical" \
    as_node "$i" rabbitmq-queues -q -n "$(node_name "$i")" check_if_node_is_quorum_critical
  log "stopping $(node_name "$i")"
  ctl "$i" shutdown >&2
}

status() {
  local i any=0
  for i in "${NODES[@]}"; do
    if running "$i"; then
      any=1
      printf '%s\tup\tamqp=%s\tmanagement=%s\tdistribution=%s\n' "$(node_name "$i")" "$(amqp_port "$i")" "$(mgmt_port "$i")" "$(dist_port "$i")"
    else
      printf '%s\tdown\n' "$(node_name "$i")"
    fi
  done
  if ((any)); then
    printf 'running nodes: %s\n' "$(running_nodes)"
    url
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  stop-node) stop_node "${2:-}" ;;
  start-node) start_one "${2:-}" ;;
  status) status ;;
  url) url ;;
  *)
    echo "usage: $0 start|stop|stop-node N|start-node N|status|url" >&2
    exit 2
    ;;
esac
