#!/usr/bin/env bash
# A highly available PostgreSQL 15 on this machine, for tests and for trying orderflow: a
# pg_auto_failover monitor and two data nodes (a primary and a synchronous standby), next to (not
# instead of) the default cluster on 5432, which this script never touches. Built from Debian's
# packages postgresql-15-auto-failover and pg-auto-failover-cli (installed with apt-get when
# pg_autoctl is missing). Every pg_autoctl and postgres process runs as the postgres OS user.
#
#   bash scripts/pg-ha.sh start        # creates what is missing, starts whatever is down, waits until
#                                      # one node is primary and the other secondary (synchronous).
#                                      # The LAST line of stdout is the DATABASE_URL (both nodes,
#                                      # target_session_attrs=read-write); everything else is stderr.
#   bash scripts/pg-ha.sh url          # prints that DATABASE_URL
#   bash scripts/pg-ha.sh status       # the monitor and each node: up or down, state per the monitor
#   bash scripts/pg-ha.sh primary      # the port of the current primary (exit 1 while there is none)
#   bash scripts/pg-ha.sh kill-primary # kill -9, at once, the primary's keeper (pg_autoctl run and its
#                                      # services), postmaster and backends, as if its machine were
#                                      # lost; prints its port and does not wait for the failover
#   bash scripts/pg-ha.sh kill-secondary  # the same for the standby; the primary goes on alone once the
#                                      # monitor has moved it to wait_primary (asynchronous)
#   bash scripts/pg-ha.sh wait-primary [SECONDS]  # waits (default 60 s) until a node is primary (or
#                                      # wait_primary) and takes a write; prints its port
#   bash scripts/pg-ha.sh start-node 1 # restarts a killed node's keeper, which brings its postgres back
#                                      # as a standby (pg_rewind); waits until it is secondary (and,
#                                      # the other node being up, the primary synchronous again);
#                                      # prints the DATABASE_URL last. `start` does the same for all.
#   bash scripts/pg-ha.sh switchover   # pg_autoctl perform switchover (after waiting for a primary and
#                                      # a secondary); waits until the old primary is the synchronous
#                                      # secondary; prints the new primary's port
#   bash scripts/pg-ha.sh stop         # stops the data nodes, then the monitor (their keepers stop
#                                      # postgres), kill -9 after 30 s, and removes the directory: no
#                                      # process, port or file is left
#
# node      role                 port (default)  data directory
# monitor   pg_auto_failover     PORT   (6000)   $DIR/monitor (database pg_auto_failover)
# node-1    primary or standby   PORT+1 (6001)   $DIR/node-1
# node-2    primary or standby   PORT+2 (6002)   $DIR/node-2
#
# DATABASE_URL: the data nodes in pg_autoctl show uri's form, with user postgres and database
# orderflow (which orderflow creates itself: psql wants /postgres until then):
#   postgres://postgres@127.0.0.1:6001,127.0.0.1:6002/orderflow?target_session_attrs=read-write&sslmode=require
#
# Environment: ORDERFLOW_PG_HA_DIR (default /tmp/orderflow-pg-ha: data directories, pg_autoctl's
# configuration and state (its XDG directories config/, share/, run/), unix sockets in run/, and
# logs in log/), ORDERFLOW_PG_HA_PORT (default 6000: the monitor listens on PORT, node i on
# PORT+i), ORDERFLOW_PG_HA_SSL (default 1: self-signed certificates (--ssl-self-signed) and
# sslmode=require, which encrypts but does not authenticate the server; 0: --no-ssl and
# sslmode=disable; fixed when the formation is created). A second formation (a test's) runs beside
# the first with other values of DIR and PORT. Everything listens on 127.0.0.1 only, and
# authentication is trust (any local user may connect as postgres): for tests only.
#
# Replication: with two data nodes, pg_auto_failover keeps number_sync_standbys = 0 and sets
# synchronous_standby_names = 'ANY 1 (pgautofailover_standby_N)' on the primary while the standby is
# healthy, so a commit waits for the standby; when the standby is lost the monitor moves the
# primary to wait_primary, which empties synchronous_standby_names and releases waiting commits.
# Timeouts are tuned for tests (defaults in parentheses), on the monitor (pgautofailover.*):
#   health_check_period 1000 ms (5000), health_check_timeout 2000 ms (5000),
#   health_check_max_retries 2 (2), health_check_retry_delay 500 ms (2000),
#   node_considered_unhealthy_timeout 3000 ms (20000), primary_demote_timeout 6000 ms (30000),
#   startup_grace_period 3000 ms (10000);
# and on each keeper: timeout.network_partition_timeout 3 s (20), which must stay below
# primary_demote_timeout: a primary that can reach neither the monitor nor its standby stops its
# postgres after it, before the monitor lets the promoted standby take writes (and until then the
# old primary cannot acknowledge a commit: its synchronous standby is gone).
# Measured on this 2-core machine (busy with builds), over several runs: kill-primary to a writable
# new primary 9.5-10.5 s (2-3 s until the monitor marks the primary unhealthy and starts the
# failover, then the 6 s demote timeout; a client inserting in a loop through DATABASE_URL saw a
# 10.3 s gap); kill-secondary blocks commits on the primary 2.8-3.7 s; switchover 2.5-8.5 s until
# both nodes settle, with a 2 s gap for the inserting client; start 9-21 s; start-node 4.5-9 s;
# stop 4.5-13 s. No acknowledged insert was lost across failovers and switchovers.
set -euo pipefail

readonly DIR=${ORDERFLOW_PG_HA_DIR:-/tmp/orderflow-pg-ha}
readonly PORT=${ORDERFLOW_PG_HA_PORT:-6000}
readonly NODES=(1 2)
readonly HOST=127.0.0.1
readonly PG_VERSION=15
readonly PGBIN=/usr/lib/postgresql/$PG_VERSION/bin
readonly PACKAGES=("postgresql-$PG_VERSION-auto-failover" pg-auto-failover-cli)

log() { printf '[pg-ha] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65533)); then die "ORDERFLOW_PG_HA_PORT must be a port number"; fi
[[ $DIR == /* ]] || die "ORDERFLOW_PG_HA_DIR must be an absolute path"
[[ ${ORDERFLOW_PG_HA_SSL:-1} =~ ^[01]$ ]] || die "ORDERFLOW_PG_HA_SSL must be 0 or 1"

# The TLS choice is made once, when the formation is created, and kept in $DIR/sslmode.
sslmode() {
  if [[ -s $DIR/sslmode ]]; then
    cat "$DIR/sslmode"
  else
    if [[ ${ORDERFLOW_PG_HA_SSL:-1} == 1 ]]; then echo require; else echo disable; fi
  fi
}

node_name() { if (($1 == 0)); then echo monitor; else echo "node-$1"; fi; }
node_port() { echo $((PORT + $1)); }
pgdata() { echo "$DIR/$(node_name "$1")"; }
node_log() { echo "$DIR/log/$(node_name "$1").log"; }
# pg_autoctl keeps its configuration, state and pid files under the XDG directories, by PGDATA.
autoctl_cfg() { echo "$DIR/config/pg_autoctl$(pgdata "$1")/pg_autoctl.cfg"; }
autoctl_init() { echo "$DIR/share/pg_autoctl$(pgdata "$1")/pg_autoctl.init"; }
autoctl_pidfile() { echo "$DIR/run/pg_autoctl$(pgdata "$1")/pg_autoctl.pid"; }

url() {
  local hosts=() i
  for i in "${NODES[@]}"; do hosts+=("$HOST:$(node_port "$i")"); done
  (
    IFS=,
    echo "postgres://postgres@${hosts[*]}/orderflow?target_session_attrs=read-write&sslmode=$(sslmode)"
  )
}

# Runs a command as the postgres OS user with a clean environment that points pg_autoctl at $DIR
# (setpriv execs, without a parent left behind, so `setsid as_pg ...` makes the command a session
# leader whose pid is its session id).
AS_PG=()
init_as_pg() {
  local home
  home=$(getent passwd postgres | cut -d: -f6) || die "no postgres OS user (apt-get install postgresql-$PG_VERSION)"
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --
    env -i HOME="$home" PATH="$PGBIN:/usr/bin:/bin" LANG=C.UTF-8
    XDG_CONFIG_HOME="$DIR/config" XDG_DATA_HOME="$DIR/share" XDG_RUNTIME_DIR="$DIR/run"
    PG_CONFIG="$PGBIN/pg_config")
}
as_pg() { "${AS_PG[@]}" "$@"; }

# psql as the postgres database user on port $1 (database $2), as root: no .psqlrc, unaligned,
# at most 10 s (a commit that waits for a lost standby must not hang the script).
sql() {
  local port=$1 db=$2
  shift 2
  timeout 10 psql "host=$HOST port=$port user=postgres dbname=$db sslmode=$(sslmode) connect_timeout=3" \
    -X -A -t -q -v ON_ERROR_STOP=1 -F '|' "$@"
}
monitor_sql() { sql "$PORT" pg_auto_failover -c "$1"; }

# "name|port|reported state|goal state|health" per data node, as the monitor sees them.
states() {
  monitor_sql "SELECT nodename, nodeport, reportedstate, goalstate, health FROM pgautofailover.node
                WHERE formationid = 'default' ORDER BY nodeid" 2>/dev/null
}

# The port of the node that serves writes per the monitor: it reached its goal state, which is
# primary, wait_primary or single. Fails while there is none (a failover is under way).
primary_port() {
  states | awk -F'|' '$3 == $4 && ($3 == "primary" || $3 == "wait_primary" || $3 == "single") { print $2; found = 1 }
                      END { exit !found }' | head -1
}
secondary_port() {
  states | awk -F'|' '$3 == "secondary" && $4 == "secondary" { print $2; found = 1 } END { exit !found }' | head -1
}

# A healthy formation: one node primary, the other secondary (both reported what the monitor
# asked), and the primary makes commits wait for the standby.
formation_ready() {
  local p names
  [[ $(states | awk -F'|' '$3 == $4 { print $3 }' | sort | tr '\n' ' ') == "primary secondary " ]] || return 1
  p=$(primary_port) || return 1
  names=$(sql "$p" postgres -c "SHOW synchronous_standby_names") || return 1
  [[ -n $names ]]
}

# Takes a write on port $1 (a temporary table: fails on a standby and in a read-only session).
writable() {
  [[ $(sql "$1" postgres -c "CREATE TEMP TABLE pg_ha_probe (x int)" -c "SELECT 'ok'" 2>/dev/null) == ok ]]
}

tcp_open() { timeout 3 bash -c ": <>/dev/tcp/$HOST/$1" 2>/dev/null; }

# wait_until SECONDS WHAT COMMAND...
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not reached after ${timeout}s (logs: $DIR/log, state: bash $0 status)"
    sleep 0.5
  done
}

# The pid of node $1's keeper (pg_autoctl run), if it is running.
keeper_pid() {
  local f pid args
  f=$(autoctl_pidfile "$1")
  [[ -s $f ]] || return 1
  pid=$(head -1 "$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ $args == *pg_autoctl*"$(pgdata "$1")"* ]] && echo "$pid"
}
keeper_running() { keeper_pid "$1" >/dev/null; }

# The pid of node $1's postmaster, if it is running.
postmaster_pid() {
  local f pid args
  f="$(pgdata "$1")/postmaster.pid"
  [[ -s $f ]] || return 1
  pid=$(head -1 "$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ $args == *postgres*"$(pgdata "$1")"* ]] && echo "$pid"
}

# Node $1's keeper (pg_autoctl run), its services and its postmaster: from their pid files, from
# the data directory on their command lines, and from the ORDERFLOW_PG_HA_NODE variable that the
# script puts in every pg_autoctl's environment (so even an orphan is found, should the files and
# the keeper be gone; postgres processes overwrite theirs, but are children of the postmaster).
node_roots() {
  local d pid args environ
  d=$(pgdata "$1")
  {
    keeper_pid "$1" || true
    postmaster_pid "$1" || true
    ps -u postgres -o pid=,args= 2>/dev/null | while read -r pid args; do
      environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" || true)
      if [[ " $args " == *" $d "* || $'\n'$environ$'\n' == *$'\n'"ORDERFLOW_PG_HA_NODE=$d"$'\n'* ]]; then
        echo "$pid"
      fi
    done || true
  } | sort -un
}

# Every process of node $1: the keeper's session (the keeper, its pg_autoctl services and the
# postmaster, which pg_autoctl runs in its own session) and the postmaster's children (each
# postgres backend and auxiliary process is a session of its own).
node_pids() {
  local root
  for root in $(node_roots "$1"); do
    echo "$root"
    pgrep -s "$root" || true
    pgrep -P "$root" || true
  done | sort -un
}

# kill -9 every process of node $1 at once (as if its machine were lost), then waits until they
# are gone and its port is closed.
kill_node() {
  local i=$1 pids
  mapfile -t pids < <(node_pids "$i")
  ((${#pids[@]})) || die "$(node_name "$i") has no process to kill"
  log "kill -9 $(node_name "$i") (port $(node_port "$i")): ${#pids[@]} processes"
  kill -9 "${pids[@]}" 2>/dev/null || true
  wait_until 20 "$(node_name "$i") gone" gone "$i" "${pids[@]}"
}

# Are node $1's port closed and the given pids all gone?
gone() {
  local i=$1 pid
  shift
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null; then return 1; fi
  done
  ! tcp_open "$(node_port "$i")"
}

install_packages() {
  if command -v pg_autoctl >/dev/null 2>&1 && [[ -x $PGBIN/pg_ctl ]] &&
    [[ -f /usr/lib/postgresql/$PG_VERSION/lib/pgautofailover.so ]]; then
    return
  fi
  ((EUID == 0)) || die "pg_autoctl is missing: apt-get install ${PACKAGES[*]} (as root)"
  log "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${PACKAGES[@]}" >&2; then
    log "apt-get install failed; updating the package lists and trying again"
    apt-get update -q >&2
    apt-get install -y -q "${PACKAGES[@]}" >&2 || die "apt-get install ${PACKAGES[*]} failed"
  fi
  command -v pg_autoctl >/dev/null 2>&1 || die "pg_autoctl still missing after apt-get install"
}

# Settings of ours, in a file that postgresql.conf includes last (so it wins over initdb's and
# pg_autoctl's): unix sockets in $DIR/run instead of /var/run/postgresql (so nothing is left there,
# even after kill -9), and on the monitor the failover timeouts documented at the top.
write_settings() {
  local i=$1 d f
  d=$(pgdata "$i")
  f="$d/orderflow-pg-ha.conf"
  {
    echo "# Written by scripts/pg-ha.sh on each start; postgresql.conf includes it last."
    echo "unix_socket_directories = '$DIR/run'"
    if ((i == 0)); then
      cat <<'EOF'
pgautofailover.health_check_period = 1000
pgautofailover.health_check_timeout = 2000
pgautofailover.health_check_max_retries = 2
pgautofailover.health_check_retry_delay = 500
pgautofailover.node_considered_unhealthy_timeout = 3000
pgautofailover.primary_demote_timeout = 6000
pgautofailover.startup_grace_period = 3000
EOF
    fi
  } >"$f.new"
  chown postgres:postgres "$f.new"
  mv "$f.new" "$f"
  grep -q "^include_if_exists 'orderflow-pg-ha.conf'" "$d/postgresql.conf" ||
    echo "include_if_exists 'orderflow-pg-ha.conf'" >>"$d/postgresql.conf"
}

# Starts node $1's keeper (pg_autoctl run) in the background, in a session of its own, as postgres.
launch_keeper() {
  local i=$1
  log "starting $(node_name "$i") keeper (port $(node_port "$i"), log $(node_log "$i"))"
  setsid "${AS_PG[@]}" ORDERFLOW_PG_HA_NODE="$(pgdata "$i")" pg_autoctl run --pgdata "$(pgdata "$i")" \
    >>"$(node_log "$i")" 2>&1 </dev/null &
  wait_until 30 "$(node_name "$i") keeper" keeper_running "$i"
}

# Runs a pg_autoctl create command for node $1 in the foreground (it initialises the data
# directory, registers the node and leaves postgres stopped), its output in the node's log.
create_node() {
  local i=$1
  shift
  log "creating $(node_name "$i") (port $(node_port "$i"))"
  if ! timeout 300 "${AS_PG[@]}" ORDERFLOW_PG_HA_NODE="$(pgdata "$i")" pg_autoctl create "$@" \
    >>"$(node_log "$i")" 2>&1 </dev/null; then
    tail -n 30 "$(node_log "$i")" >&2
    die "pg_autoctl create for $(node_name "$i") failed (log: $(node_log "$i"))"
  fi
}

ssl_option() { if [[ $(sslmode) == require ]]; then echo --ssl-self-signed; else echo --no-ssl; fi; }

start_monitor() {
  local d
  d=$(pgdata 0)
  if ! keeper_running 0; then
    if [[ ! -f $(autoctl_cfg 0) ]]; then
      [[ ! -e $d ]] || die "$d exists without pg_autoctl's configuration: run stop, then start"
      tcp_open "$PORT" && die "port $PORT is taken by something else"
      create_node 0 monitor --pgctl "$PGBIN/pg_ctl" --pgdata "$d" --pgport "$PORT" \
        --hostname "$HOST" --listen "$HOST" --auth trust "$(ssl_option)"
    fi
    write_settings 0
    launch_keeper 0
  else
    write_settings 0
    # The monitor picks up changed timeouts on reload.
    as_pg "$PGBIN/pg_ctl" reload -s -D "$d" >&2 || true
  fi
  wait_until 60 "monitor accepting connections" monitor_sql "SELECT 1"
}

monitor_uri() { as_pg pg_autoctl show uri --pgdata "$(pgdata 0)" --formation monitor; }

start_data_node() {
  local i=$1 d
  d=$(pgdata "$i")
  if keeper_running "$i"; then
    log "$(node_name "$i") keeper is running"
    return
  fi
  if [[ ! -f $(autoctl_cfg "$i") || -f $(autoctl_init "$i") ]]; then
    [[ -f $(autoctl_cfg "$i") || ! -e $d ]] || die "$d exists without pg_autoctl's configuration: run stop, then start"
    [[ -f $(autoctl_cfg "$i") ]] || ! tcp_open "$(node_port "$i")" || die "port $(node_port "$i") is taken by something else"
    # The second node's create waits until the first node's keeper has made it wait_primary, then
    # copies it with pg_basebackup.
    create_node "$i" postgres --pgctl "$PGBIN/pg_ctl" --pgdata "$d" --pgport "$(node_port "$i")" \
      --hostname "$HOST" --listen "$HOST" --name "$(node_name "$i")" --monitor "$(monitor_uri)" \
      --auth trust "$(ssl_option)"
  fi
  write_settings "$i"
  as_pg pg_autoctl config set --pgdata "$d" timeout.network_partition_timeout 3 >>"$(node_log "$i")" 2>&1
  launch_keeper "$i"
}

prepare_dir() {
  mkdir -p "$DIR/log" "$DIR/run" "$DIR/config" "$DIR/share"
  [[ -s $DIR/sslmode ]] || sslmode >"$DIR/sslmode"
  chown postgres:postgres "$DIR" "$DIR/log" "$DIR/run" "$DIR/config" "$DIR/share"
  chmod 0700 "$DIR/run"
  as_pg test -w "$DIR" || die "the postgres user cannot write $DIR"
}

start() {
  ((EUID == 0)) || die "run as root (pg_autoctl runs as the postgres user, which the script switches to)"
  install_packages
  init_as_pg
  prepare_dir
  start_monitor
  for i in "${NODES[@]}"; do start_data_node "$i"; done
  wait_until 180 "a primary and a synchronous secondary" formation_ready
  log "primary on port $(primary_port), secondary on port $(secondary_port)"
  url
}

start_one() {
  local i=${1:-}
  [[ $i =~ ^[12]$ ]] || die "start-node takes a node number: 1 or 2"
  [[ -f $(autoctl_cfg "$i") ]] || die "$(node_name "$i") was never created: use start"
  init_as_pg
  keeper_running 0 || die "the monitor is down: use start"
  if keeper_running "$i"; then
    log "$(node_name "$i") keeper is running"
  else
    launch_keeper "$i"
  fi
  wait_until 120 "$(node_name "$i") back as secondary or primary" node_settled "$i"
  # With the other node up too, wait until the primary has turned synchronous replication back on.
  if keeper_running $((3 - i)); then
    wait_until 60 "a primary and a synchronous secondary" formation_ready
  fi
  log "$(node_name "$i") is $(states | awk -F'|' -v p="$(node_port "$i")" '$2 == p { print $3 }')"
  url
}

# Has node $1 reached the state the monitor gave it, and is that secondary or primary-like?
node_settled() {
  states | awk -F'|' -v p="$(node_port "$1")" '$2 == p && $3 == $4 && $3 ~ /^(secondary|primary|wait_primary|single)$/ { found = 1 }
                                                END { exit !found }'
}

kill_primary() {
  local p
  init_as_pg
  p=$(primary_port) || die "no primary right now (bash $0 status)"
  kill_node $((p - PORT))
  echo "$p"
}

kill_secondary() {
  local p
  init_as_pg
  p=$(secondary_port) || die "no secondary right now (bash $0 status)"
  kill_node $((p - PORT))
  echo "$p"
}

# Waits until a node is primary per the monitor and takes a write; prints its port.
wait_primary() {
  local timeout=${1:-60} deadline p
  [[ $timeout =~ ^[0-9]+$ ]] || die "wait-primary takes a number of seconds"
  deadline=$((SECONDS + timeout))
  while :; do
    if p=$(primary_port) && writable "$p"; then
      echo "$p"
      return
    fi
    ((SECONDS < deadline)) || die "no writable primary after ${timeout}s (bash $0 status)"
    sleep 0.2
  done
}

switchover() {
  local before after
  init_as_pg
  wait_until 60 "a primary and a secondary to switch over" formation_ready
  before=$(primary_port)
  log "switchover: primary on port $before hands over"
  # Its output goes to a log: pg_autoctl 2.0 prints a spurious "Monitor ERROR: invalid input syntax
  # for type integer" while it waits (hapostgres/pg_auto_failover#1033); we wait on the monitor.
  if ! timeout 120 "${AS_PG[@]}" pg_autoctl perform switchover --pgdata "$(pgdata 0)" \
    --formation default --group 0 >>"$DIR/log/switchover.log" 2>&1 </dev/null; then
    log "pg_autoctl perform switchover failed (log: $DIR/log/switchover.log); waiting for the monitor anyway"
  fi
  wait_until 120 "a primary and a synchronous secondary after the switchover" formation_ready
  after=$(primary_port)
  [[ $after != "$before" ]] || die "the primary is still on port $before after the switchover"
  log "primary on port $after, secondary on port $before"
  echo "$after"
}

status() {
  local i st pid up p
  for i in 0 "${NODES[@]}"; do
    up=down
    if tcp_open "$(node_port "$i")"; then up=up; fi
    pid=$(keeper_pid "$i" 2>/dev/null || echo '-')
    if ((i == 0)); then
      st=monitor
    else
      st=$(states | awk -F'|' -v p="$(node_port "$i")" '$2 == p { printf "reported=%s\tassigned=%s\thealth=%s", $3, $4, ($5 == 1 ? "good" : ($5 == 0 ? "bad" : "unknown")) }' || true)
      [[ -n $st ]] || st="unknown to the monitor"
    fi
    printf '%s\tport=%s\tpostgres=%s\tkeeper=%s\t%s\n' "$(node_name "$i")" "$(node_port "$i")" "$up" "$pid" "$st"
  done
  if p=$(primary_port 2>/dev/null); then printf 'primary: %s\n' "$p"; else printf 'primary: none\n'; fi
  url
}

# Stops every process of the given nodes, gracefully first (on SIGTERM a keeper stops its postgres
# with a fast shutdown), and kill -9 what is left after 30 s.
stop_nodes() {
  local i pids=() pid alive=() roots=() keeper deadline=$((SECONDS + 30))
  for i in "$@"; do
    mapfile -t -O "${#pids[@]}" pids < <(node_pids "$i")
    keeper=0
    mapfile -t roots < <(node_roots "$i")
    for pid in "${roots[@]}"; do
      if [[ $(ps -o args= -p "$pid" 2>/dev/null) == "pg_autoctl run "* ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        keeper=1
      fi
    done
    if ((!keeper)); then
      # No keeper: its orphaned services and its postmaster (a fast shutdown) are told directly.
      for pid in "${roots[@]}"; do
        case $(ps -o args= -p "$pid" 2>/dev/null) in
          pg_autoctl*) kill -TERM "$pid" 2>/dev/null || true ;;
          "$PGBIN/postgres -D "*) kill -INT "$pid" 2>/dev/null || true ;;
        esac
      done
    fi
  done
  while :; do
    alive=()
    for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi; done
    ((${#alive[@]})) || return 0
    if ((SECONDS >= deadline)); then
      log "kill -9 ${#alive[@]} processes that did not stop in 30 s"
      kill -9 "${alive[@]}" 2>/dev/null || true
      sleep 1
      return 0
    fi
    sleep 0.2
  done
}

# Stops the data nodes, then the monitor (so that no keeper waits for a monitor that is gone),
# then removes the directory.
stop() {
  local i
  log "stopping the data nodes"
  stop_nodes "${NODES[@]}"
  log "stopping the monitor"
  stop_nodes 0
  for i in 0 "${NODES[@]}"; do
    if tcp_open "$(node_port "$i")"; then die "port $(node_port "$i") is still open: not ours, or not stopped (ss -ltnp)"; fi
  done
  rm -rf "$DIR"
  log "stopped; removed $DIR"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url ;;
  primary)
    primary_port || die "no primary right now"
    ;;
  kill-primary) kill_primary ;;
  kill-secondary) kill_secondary ;;
  wait-primary) wait_primary "${2:-60}" ;;
  start-node) start_one "${2:-}" ;;
  switchover) switchover ;;
  *)
    echo "usage: $0 start|stop|status|url|primary|kill-primary|kill-secondary|wait-primary [SECONDS]|start-node N|switchover" >&2
    exit 2
    ;;
esac
