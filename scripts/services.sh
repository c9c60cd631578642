#!/usr/bin/env bash
# Makes sure the local PostgreSQL and RabbitMQ (Debian packages) are up, as orderflow's
# defaults and its test harness expect them:
#   - PostgreSQL on 127.0.0.1:5432, user postgres, no password (trust auth);
#   - RabbitMQ on 127.0.0.1:5672 (guest/guest) with the management plugin on 127.0.0.1:15672
#     (each integration test creates its own vhost through the management HTTP API).
# Starts whatever is down, enables the management plugin if needed and waits, bounded, until
# everything answers. Idempotent: when all is up it only checks.
set -euo pipefail

readonly PG_HOST=127.0.0.1 PG_PORT=5432
readonly AMQP_HOST=127.0.0.1 AMQP_PORT=5672
readonly MGMT_URL=http://127.0.0.1:15672

log() { printf '[services] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Runs a command as root: directly when we are root, else through passwordless sudo if any.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    "$@"
  fi
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND once a second until it succeeds.
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what is not ready after ${timeout}s"
    sleep 1
  done
}

tcp_open() { timeout 3 bash -c ": <>/dev/tcp/$1/$2" 2>/dev/null; }

pg_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    tcp_open "$PG_HOST" "$PG_PORT"
  fi
}

amqp_ready() { tcp_open "$AMQP_HOST" "$AMQP_PORT"; }

mgmt_ready() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 5 -u guest:guest "$MGMT_URL/api/overview"
  else
    # No curl: a bare HTTP request over bash's /dev/tcp (Basic guest:guest).
    timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/15672
      printf "GET /api/overview HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n" >&3
      head -n1 <&3 | grep -q " 200 "'
  fi
}

# --- PostgreSQL --------------------------------------------------------------------------------
if pg_ready; then
  log "PostgreSQL is up"
else
  log "PostgreSQL is down; starting it"
  command -v pg_ctlcluster >/dev/null 2>&1 || die "pg_ctlcluster not found: start PostgreSQL on $PG_HOST:$PG_PORT yourself"
  pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
  [[ -n $pg_version ]] || die "no cluster under /etc/postgresql"
  # Non-zero when it is already starting; the wait below is what decides.
  as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || log "pg_ctlcluster exited with $?"
  wait_for 60 PostgreSQL pg_ready
  log "PostgreSQL is up"
fi
# The tests connect as postgres without a password. Refuse early when that cannot work; wait
# out transient refusals (e.g. "too many clients already").
if command -v psql >/dev/null 2>&1; then
  deadline=$((SECONDS + 60))
  until pg_error=$(psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'SELECT 1' 2>&1 >/dev/null); do
    if grep -qiE 'password|authentication' <<<"$pg_error"; then
      die "cannot connect as postgres@$PG_HOST:$PG_PORT without a password (the tests need trust auth): $pg_error"
    fi
    ((SECONDS < deadline)) || die "PostgreSQL refuses connections: $pg_error"
    sleep 2
  done
fi

# --- RabbitMQ ----------------------------------------------------------------------------------
if amqp_ready; then
  log "RabbitMQ is up"
else
  log "RabbitMQ is down; starting it"
  command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server not found: start RabbitMQ on $AMQP_HOST:$AMQP_PORT yourself"
  # Non-zero when the node is already booting; the wait below is what decides.
  as_root rabbitmq-server -detached || log "rabbitmq-server -detached exited with $?"
  wait_for 120 RabbitMQ amqp_ready
  log "RabbitMQ is up"
fi

if mgmt_ready; then
  log "RabbitMQ management API is up"
else
  # Right after a start the plugin may still be booting: give it a moment before enabling.
  if ! (wait_for 15 "RabbitMQ management API" mgmt_ready 2>/dev/null); then
    log "enabling the rabbitmq_management plugin"
    as_root rabbitmq-plugins enable rabbitmq_management >&2
    wait_for 90 "RabbitMQ management API ($MGMT_URL)" mgmt_ready
  fi
  log "RabbitMQ management API is up"
fi
