#!/usr/bin/env bash
# Repeats the numbers in docs/PERFORMANCE.md with one command:
#
#   bash scripts/perf.sh            # every scenario
#   bash scripts/perf.sh rates      # only some: idle rates floor closed accept hot rush instances observe
#                                   # cluster prune floor_split floor_batch
#   PERF_RATES="350 700" bash scripts/perf.sh rates   # only these offered rates
#                                   # (rates ends with a step at half the saturation it found,
#                                   # and prints whether the latency there is within target)
#   RATE_ARGS="--observe wait" bash scripts/perf.sh rates   # extra bench flags for the rate runs
#   ORDER_TIMEOUT=5s RATE_SECONDS=40 PERF_RATES="35 140" bash scripts/perf.sh rates
#                                   # 40 s per rate, and deadlines that expire inside the run: with
#                                   # the default 60 s a run ends before any deadline message
#                                   # expires, and leaves out the delivery and the recovery
#                                   # transaction each costs a minute later
#   PERF_RATES="35 140 350" bash scripts/perf.sh floor rates
#                                   # the floor (what the guarantees alone cost, without the
#                                   # system) beside the pipeline at the same rates
#   CLOSED_ORDERS=15000 bash scripts/perf.sh closed   # longer 64-client runs (default 3,000)
#   WORK_SETTLE=0s bash scripts/perf.sh closed   # 22 s quicker per bench: PostgreSQL's statistics
#                                   # (commits, rows) read at once, off by up to a second's work
#   PERF_BIN=target/debug/orderflow PERF_ORDERS=300 bash scripts/perf.sh cluster
#                                   # a quick check that a scenario runs (debug build, few orders):
#                                   # its numbers mean nothing
#
# Builds the release binary, then for each scenario starts `orderflow all` on a fresh
# database (orderflow_perf) and RabbitMQ vhost (perf) (the floor scenarios: only the fresh
# database and vhost), runs `orderflow bench` against it and stops it again, so no scenario inherits another's backlog or bloat. Reports (JSON) land in
# target/perf/. Needs PostgreSQL and RabbitMQ as scripts/services.sh leaves them; run it on
# an otherwise idle machine, since every number is CPU time shared with the services.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PORT=18200 DB=orderflow_perf VHOST=perf
readonly PG=postgres://postgres@127.0.0.1:5432
readonly OUT=target/perf BIN=${PERF_BIN:-target/release/orderflow}
# The binary that runs the system (the bench is always $BIN): another build's, to compare two
# builds with the same bench, e.g. PERF_SYSTEM_BIN=../before/target/release/orderflow.
readonly SYS=${PERF_SYSTEM_BIN:-$BIN}
# The broker's management API, where the vhost is made (the cluster scenario points it at the cluster).
MGMT=http://guest:guest@127.0.0.1:15672/api
export JWT_SECRET=perf-secret DATABASE_URL="$PG/$DB" AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST"
export HTTP_ADDR=127.0.0.1:$PORT LOG_FORMAT=text RUST_LOG=warn
# The bench's 300 users stand for a shop's many shoppers: from 2,800 offered orders/s on, their
# coupon requests in the setup and their orders exceed the default per-user quota (100 per 10 s).
# The limiter still runs.
export RATE_LIMIT_WRITES=1000
API=http://127.0.0.1:$PORT
SYSTEM_PID=
WORKER_PIDS=()
# 0: `orderflow all` (one process); N: the API and N processes of each step worker.
INSTANCES=0

log() { printf '[perf] %s\n' "$*" >&2; }

stop_system() {
  if [[ ${#WORKER_PIDS[@]} -gt 0 ]]; then
    kill -TERM "${WORKER_PIDS[@]}" 2>/dev/null || true
    wait "${WORKER_PIDS[@]}" 2>/dev/null || true
    WORKER_PIDS=()
  fi
  if [[ -n $SYSTEM_PID ]]; then
    kill -TERM "$SYSTEM_PID" 2>/dev/null || true
    wait "$SYSTEM_PID" 2>/dev/null || true
    SYSTEM_PID=
  fi
}
# Stops the three-node cluster if the cluster scenario started it.
CLUSTER_STARTED=0
stop_cluster() {
  if ((CLUSTER_STARTED)); then
    bash scripts/cluster.sh stop
    CLUSTER_STARTED=0
  fi
}
trap 'stop_system; stop_cluster' EXIT

# A fresh (empty) database and vhost.
fresh() {
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  curl -fsS -o /dev/null -X DELETE "$MGMT/vhosts/$VHOST" || true
  curl -fsS -o /dev/null -X PUT "$MGMT/vhosts/$VHOST"
  curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$MGMT/permissions/$VHOST/guest"
}

# A fresh database and vhost, then the whole system in the background, waiting until ready.
start_system() {
  stop_system
  fresh
  if [[ -n ${ACCEPT_ONLY:-} ]]; then
    # Only what every order costs before any step runs: the API accepting it and the relay
    # publishing its reservation and deadline messages; and the recovery worker, which keeps
    # the planner statistics where autovacuum is off (without it the accept's plans, made on
    # empty tables, scan idempotency_keys whole for every batch).
    "$SYS" api 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
    "$SYS" worker relay 2>>"$OUT/system.log" &
    WORKER_PIDS=($!)
    "$SYS" worker recovery 2>>"$OUT/system.log" &
    WORKER_PIDS+=($!)
  elif [[ $INSTANCES -eq 0 ]]; then
    "$SYS" all 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
  else
    # The API, one relay and one recovery worker, and INSTANCES processes of every step
    # worker, as separate processes (their CPU is counted as orderflow's).
    "$SYS" api 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
    "$SYS" worker relay 2>>"$OUT/system.log" &
    WORKER_PIDS=($!)
    "$SYS" worker recovery 2>>"$OUT/system.log" &
    WORKER_PIDS+=($!)
    # Each process as deployed (WORKER_CONCURRENCY's default), so N processes run N times the
    # batches of one; 4 connections each keep 16 processes within PostgreSQL's 100.
    for _ in $(seq 1 "$INSTANCES"); do
      for kind in stock coupon payment order; do
        DB_POOL_SIZE=4 "$SYS" worker "$kind" 2>>"$OUT/system.log" &
        WORKER_PIDS+=($!)
      done
    done
  fi
  for _ in $(seq 1 120); do
    if curl -fsS -o /dev/null "$API/readyz" 2>/dev/null; then
      # PERF_SQL: a statement to run on the fresh database first (for experiments).
      [[ -z ${PERF_SQL:-} ]] || psql -q "$DATABASE_URL" -c "$PERF_SQL"
      return 0
    fi
    sleep 0.5
  done
  log "the system did not become ready; see $OUT/system.log"
  exit 1
}

# Runs one bench against a fresh system and appends its rows to $OUT/cpu.tsv, from the bench's
# JSON report: completed orders per second, the CPU each process group used per finished order
# in core-milliseconds (the bench reads /proc over the measured phase: PostgreSQL including
# backends that exited, RabbitMQ's beam.smp, the system's processes named by pid, the bench
# itself, the whole machine), how busy the machine was (% of both cores), and how long
# PostgreSQL sessions waited per finished order on heavyweight locks and on LWLocks (sampled
# wait events, --pg-waits), and the database's and broker's work per finished order (the
# bench's `work`: transactions that wrote, commits, rows inserted/updated/deleted, messages
# the system's consumers settled, WAL bytes), and the context switches per finished order of
# PostgreSQL, RabbitMQ, the system and the whole machine (sw-*: what the fixed cost of a hop is
# made of at low load; a group's figure misses threads that ended). A run with a baseline gets a second row for the
# baseline's phase, named after the baseline.
bench() {
  local name=$1
  shift
  start_system
  log "$name: orderflow bench $*"
  local pids
  pids=$(IFS=,; echo "$SYSTEM_PID${WORKER_PIDS[*]:+,${WORKER_PIDS[*]}}")
  # PostgreSQL's statistics (commits, rows) are given 11 s at each end of each phase to arrive,
  # so they are exact (WORK_SETTLE=0s: quicker, off by up to a second's work at each end).
  "$BIN" bench --api "$API" --json "$OUT/$name.json" --system-pids "$pids" --pg-waits \
    --work-settle "${WORK_SETTLE:-11s}" "$@"
  append_rows "$name"
}
# Appends the rows of $OUT/$1.json to $OUT/cpu.tsv.
append_rows() {
  local name=$1
  jq -r --arg name "$name" '
    def num: if . == null then "-" else . * 100 | round / 100 end;
    def row($n; $done; $rate; $cpu; $waits; $work):
      [$n, $done, ($rate * 10 | round / 10)]
      + ([$cpu.core_ms_per_order | .postgres, .rabbitmq, .orderflow, .bench, .machine] | map(num))
      + [($cpu.machine_busy_pct | if . == null then "-" else round end)]
      + ([$waits.lock_ms_per_order, $waits.lwlock_ms_per_order] | map(num))
      + ([$work | .write_transactions_per_order, .commits_per_order, .rows_inserted_per_order,
          .rows_updated_per_order, .rows_deleted_per_order, .messages_per_order] | map(num))
      + [$work.wal_bytes_per_order | if . == null then "-" else round end]
      + ([$cpu.switches_per_order | .postgres, .rabbitmq, .orderflow, .machine]
         | map(if . == null then "-" else . * 10 | round / 10 end))
      | @tsv;
    if has("requests") then row($name; .requests; .requests_per_s; .cpu; .pg_waits; .work)
    else
      row($name; .cpu.orders // (if .confirmed + .cancelled > 0 then .confirmed + .cancelled else .accepted end);
          (if .confirmed + .cancelled > 0 then .completed_per_s else .accept_per_s end); .cpu; .pg_waits; .work),
      (select(has("baseline_orders"))
       | row("\($name)-\(.baseline_kind)"; .baseline_confirmed + .baseline_cancelled; .baseline_completed_per_s;
             .baseline_cpu; .baseline_pg_waits; .baseline_work))
    end' "$OUT/$name.json" >>"$OUT/cpu.tsv"
}

rate_bench() {
  bench "$1" --rate "$2" --orders $(($2 * ${RATE_SECONDS:-20})) --users 300 --coupon-share 0.2 ${RATE_ARGS:-}
}
# Offered rates up to past saturation, then the latency target at half of it. Saturation is the
# most orders per second any step completed, once some step fell behind: it completed fewer than
# 95% of the orders per second it accepted (completed/s counts until the last order is terminal,
# so over a 20 s step that is a backlog of more than a second, not the pipeline's own latency;
# the accepted rate is what the bench, sharing the cores, managed to offer). Until a step falls
# behind every rate is only a lower bound, and the half step is left out.
scenario_rates() {
  local rate top=0 sat behind half reports=()
  for rate in ${PERF_RATES:-35 140 350 700 1000 1400 2000 2800 3500 4200}; do
    rate_bench "rate-$rate" "$rate"
    reports+=("$OUT/rate-$rate.json")
    if ((rate > top)); then top=$rate; fi
  done
  read -r sat behind half < <(jq -rs '(map(.completed_per_s) | max) as $sat
      | [$sat, (map(select(.completed_per_s < 0.95 * .accept_per_s)) | length), ($sat / 2 | floor)]
      | @tsv' "${reports[@]}")
  if ((behind == 0 || half < 1)); then
    log "half of saturation: no step fell behind (up to $top/s offered); add a higher rate to find saturation"
    return 0
  fi
  rate_bench rate-half "$half"
  jq -r --argjson sat "$sat" --argjson top "$top" '
    "[perf] half of saturation: saturation \($sat * 10 | round / 10)/s (the most any step completed; \($top)/s offered at most); at \(.rate)/s accept p99 \(.accept_p99_ms) ms (<= 50), end-to-end p99 \(.e2e_p99_ms) ms (<= 500): "
    + (if .accept_p99_ms <= 50 and .e2e_p99_ms <= 500 then "met" else "NOT met" end)' \
    "$OUT/rate-half.json" | tee "$OUT/half-saturation.txt" >&2
}
# The floor under the pipeline's cost at the same rates (`orderflow bench --floor`, without the
# system): orders accepted and carried through three hops that do only what the design's
# guarantees require (inbox, outbox, synchronous commit, a persistent quorum-queue message with a
# publisher confirm, ack after commit), all in the bench's process (its `bench` column).
scenario_floor() {
  local rate name
  for rate in ${PERF_RATES:-35 140 350}; do
    stop_system
    fresh
    psql -q "$PG/postgres" -c "CREATE DATABASE $DB"
    name=floor${1:+-$1}-$rate
    log "$name: orderflow bench --floor ${*:2} --rate $rate"
    # --api: where nothing listens now, so the work probe finds no other system's messages.
    "$BIN" bench --floor "${@:2}" --api "$API" --rate "$rate" --orders $((rate * ${RATE_SECONDS:-20})) \
      --json "$OUT/$name.json" --work-settle "${WORK_SETTLE:-11s}"
    append_rows "$name"
  done
}
# The same floor with each transaction a statement at a time (BEGIN, a statement per table,
# COMMIT): what the round trips a hop spends beyond one cost.
scenario_floor_split() {
  scenario_floor split --floor-split
}
# The floor batched as the pipeline batches (what waits when one of two writers is free is one
# statement and one message): the floor of a batching design at the rates where batches form.
scenario_floor_batch() {
  scenario_floor batch --floor-batch
}
scenario_closed() {
  bench closed --concurrency 32 --orders 6000 --users 300 --coupon-share 0.2 --baseline sync
  # The plain mix the Performance II issue states its first target with, against both
  # monoliths: a statement per step (sync) and one PL/pgSQL call per order (procedure).
  bench closed-64 --concurrency 64 --orders "${CLOSED_ORDERS:-3000}" --baseline sync
  bench closed-64-procedure --concurrency 64 --orders "${CLOSED_ORDERS:-3000}" --baseline procedure
}
# The system doing nothing, IDLE_SETTLE (5 s) after it became ready, for IDLE_FOR (30 s): CPU
# by process group in % of one core, the database's and the broker's work per second (the
# floor under every order's cost at low load) and the context switches per second of each group
# and the machine (sw-*: what the timers and polls wake). Appends a row to $OUT/idle.tsv.
scenario_idle() {
  start_system
  sleep "${IDLE_SETTLE:-5}"
  log "idle: orderflow bench --idle ${IDLE_FOR:-30s}"
  local pids
  pids=$(IFS=,; echo "$SYSTEM_PID${WORKER_PIDS[*]:+,${WORKER_PIDS[*]}}")
  "$BIN" bench --api "$API" --json "$OUT/idle.json" --system-pids "$pids" --idle "${IDLE_FOR:-30s}"
  jq -r 'def num: if . == null then "-" else . * 100 | round / 100 end;
    [.seconds] + ([.cpu_pct_of_a_core | .postgres, .rabbitmq, .orderflow, .machine] | map(num))
    + ([.write_transactions_per_s, .commits_per_s, .wal_bytes_per_s, .messages_per_s] | map(num))
    + ([.switches_per_s | .postgres, .rabbitmq, .orderflow, .machine] | map(if . == null then "-" else . * 10 | round / 10 end))
    | @tsv' "$OUT/idle.json" >>"$OUT/idle.tsv"
}
# With the baseline: its duration_s against the pipeline's is the hot-product target.
scenario_hot() {
  bench hot --orders 10000 --users 1000 --hot --hot-stock 100 --rate 5000 --baseline sync ${HOT_ARGS:-}
}
scenario_rush() {
  bench rush --coupon-rush
  bench rush-100 --coupon-rush --concurrency 100
}
# Accepting alone (no step workers; orders stay PENDING, so nothing watches them): per accepted
# order, the floor under any pipeline's cost. Its completed/s column is accepted/s;
# accept_ratio in its JSON is accepted/s over the baseline's completed/s.
scenario_accept() {
  ACCEPT_ONLY=1 bench accept --concurrency 32 --orders 12000 --users 300 --coupon-share 0.2 --observe none \
    --baseline sync
}
scenario_instances() {
  for n in 1 2 4; do
    INSTANCES=$n bench "instances-$n" --concurrency 32 --orders "${PERF_ORDERS:-4000}" --users 300 --coupon-share 0.2
  done
}
# What watching orders costs the system: the same open-model run observed by polling each user's
# order list, then by long-polling each order with `Prefer: wait` (RFC 7240).
scenario_observe() {
  for how in poll wait; do
    bench "observe-$how" --rate 350 --orders 7000 --users 300 --coupon-share 0.2 --observe "$how"
  done
}
# The broker's share: the same closed bench on the default node, then on the three-node cluster of
# scripts/cluster.sh (its default names and ports; started here if it is down and stopped again
# after), every process given the three addresses. Quorum queues then replicate every message to
# three nodes on the same two cores; the rabbitmq column counts every beam.smp, all nodes together.
scenario_cluster() {
  local orders=${PERF_ORDERS:-6000} url amqp=$AMQP_URL mgmt=$MGMT
  bench cluster-1node --concurrency 32 --orders "$orders" --users 300 --coupon-share 0.2
  stop_system
  bash scripts/cluster.sh status 2>/dev/null | grep -q '^running nodes: 3$' || CLUSTER_STARTED=1
  url=$(bash scripts/cluster.sh start | tail -n 1)
  AMQP_URL=${url//\/%2f//$VHOST}
  MGMT=http://guest:guest@127.0.0.1:15681/api
  bench cluster-3nodes --concurrency 32 --orders "$orders" --users 300 --coupon-share 0.2
  stop_system
  AMQP_URL=$amqp MGMT=$mgmt
  stop_cluster
}

# Whether pruning keeps pace, without waiting a day for rows to come due: PRUNE_DUE (300,000)
# outbox rows published two days ago and as many inbox records eight days old are put in the
# fresh database (rows the sweep prunes, as a day's or a week's traffic would leave them), then
# the open-model bench runs at SOAK_RATE (350/s) for SOAK_SECONDS (60) while the due rows and
# the tables are counted every 2 s ($OUT/prune.tsv). Pruning keeps pace if the due rows are gone
# while the bench still runs: it prints how fast they went against how fast the bench wrote rows.
scenario_prune() {
  local due=${PRUNE_DUE:-300000} rate=${SOAK_RATE:-350} secs=${SOAK_SECONDS:-60} sampler
  printf 'epoch\toutbox_due\tinbox_due\toutbox\tinbox\n' >"$OUT/prune.tsv"
  (
    while sleep 2; do
      psql -Atq -F $'\t' "$DATABASE_URL" -c "SELECT round(extract(epoch FROM clock_timestamp())),
          (SELECT count(*) FROM outbox WHERE sent_at < now() - interval '1 day'),
          (SELECT count(*) FROM inbox WHERE processed_at < now() - interval '7 days'),
          (SELECT count(*) FROM outbox), (SELECT count(*) FROM inbox)" 2>/dev/null || true
    done >>"$OUT/prune.tsv"
  ) &
  sampler=$!
  PERF_SQL="INSERT INTO outbox (message_id, exchange, routing_key, message_type, body, sent_at)
      SELECT gen_random_uuid(), 'x', 'k', 'k', '{}'::bytea, now() - interval '2 days' FROM generate_series(1, $due);
    INSERT INTO inbox (consumer, message_id, processed_at)
      SELECT 'stock', gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, $due)" \
    bench prune --rate "$rate" --orders $((rate * secs)) --users 300 --coupon-share 0.2
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  jq -r --slurp --raw-input --argjson due "$due" --slurpfile r "$OUT/prune.json" '
    [split("\n")[1:][] | select(length > 0) | split("\t") | map(tonumber)] as $all
    # From the first sample that saw the seeded rows (samples before the seed see none).
    | ($all | map(.[1] + .[2] > 0) | index(true)) as $seen
    | (if $seen == null then [] else $all[$seen:] end) as $s
    | ($s | map(select(.[1] == 0 and .[2] == 0)) | first) as $gone
    | ($r[0].work.rows_inserted_per_order * $r[0].completed_per_s) as $written
    | if $s == [] then "[perf] prune: the samples never saw the seeded rows"
      elif $gone == null then "[perf] prune: \($due) due rows per table NOT gone by the end of the soak: pruning did not keep pace"
      else "[perf] prune: \($due) due outbox rows and \($due) inbox records gone \($gone[0] - $s[0][0] + 2) s into the soak (at most; sampled every 2 s), \(($due * 2 / ($gone[0] - $s[0][0] + 2)) | round) rows/s, while the bench wrote \($written | round) rows/s in all tables (\($r[0].completed_per_s * 10 | round / 10) orders/s), the outbox growing by \((($s[-1][3] - $gone[3]) / ([$s[-1][0] - $gone[0], 1] | max)) | round) rows/s and the inbox by \((($s[-1][4] - $gone[4]) / ([$s[-1][0] - $gone[0], 1] | max)) | round) after"
      end' "$OUT/prune.tsv" | tee "$OUT/prune.txt" >&2
}

mkdir -p "$OUT"
: >"$OUT/system.log"
rm -f "$OUT/half-saturation.txt" "$OUT/rate-half.json"
printf 'scenario\torders\tcompleted/s\tpostgres\trabbitmq\torderflow\tbench\tmachine\tbusy%%\tlock-ms\tlwlock-ms\twrite-tx\tcommits\tins\tupd\tdel\tmsgs\tWAL-B\tsw-pg\tsw-rmq\tsw-of\tsw-machine\n' >"$OUT/cpu.tsv"
printf 'seconds\tpostgres%%\trabbitmq%%\torderflow%%\tmachine%%\twrite-tx/s\tcommits/s\tWAL-B/s\tmsgs/s\tsw-pg/s\tsw-rmq/s\tsw-of/s\tsw-machine/s\n' >"$OUT/idle.tsv"
bash scripts/services.sh
if [[ -z ${PERF_BIN:-} ]]; then cargo build --release --quiet; fi
scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(idle rates floor closed accept hot rush instances observe)
for s in "${scenarios[@]}"; do
  "scenario_$s"
done
stop_system
column -t -s $'\t' "$OUT/cpu.tsv" >&2
if [[ $(wc -l <"$OUT/idle.tsv") -gt 1 ]]; then
  log "idle (CPU in % of one core; work per second):"
  column -t -s $'\t' "$OUT/idle.tsv" >&2
fi
[[ ! -s $OUT/half-saturation.txt ]] || cat "$OUT/half-saturation.txt" >&2
log "reports in $OUT/ (CPU, lock waits and work per finished order: $OUT/cpu.tsv; the system idle: $OUT/idle.tsv)"
