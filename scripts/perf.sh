#!/usr/bin/env bash
# Repeats the numbers in docs/PERFORMANCE.md with one command:
#
#   bash scripts/perf.sh            # every scenario
#   bash scripts/perf.sh rates      # only some: rates closed accept hot rush instances
#
# Builds the release binary, then for each scenario starts `orderflow all` on a fresh
# database (orderflow_perf) and RabbitMQ vhost (perf), runs `orderflow bench` against it and
# stops it again, so no scenario inherits another's backlog or bloat. Reports (JSON) land in
# target/perf/. Needs PostgreSQL and RabbitMQ as scripts/services.sh leaves them; run it on
# an otherwise idle machine, since every number is CPU time shared with the services.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PORT=18200 DB=orderflow_perf VHOST=perf
readonly PG=postgres://postgres@127.0.0.1:5432 MGMT=http://guest:guest@127.0.0.1:15672/api
readonly OUT=target/perf BIN=target/release/orderflow
export JWT_SECRET=perf-secret DATABASE_URL="$PG/$DB" AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST"
export HTTP_ADDR=127.0.0.1:$PORT LOG_FORMAT=text RUST_LOG=warn
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
trap stop_system EXIT

# A fresh database and vhost, then the whole system in the background, waiting until ready.
start_system() {
  stop_system
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  curl -fsS -o /dev/null -X DELETE "$MGMT/vhosts/$VHOST" || true
  curl -fsS -o /dev/null -X PUT "$MGMT/vhosts/$VHOST"
  curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$MGMT/permissions/$VHOST/guest"
  if [[ -n ${ACCEPT_ONLY:-} ]]; then
    # Only what every order costs before any step runs: the API accepting it and the relay
    # publishing its reservation and deadline messages.
    "$BIN" api 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
    "$BIN" worker relay 2>>"$OUT/system.log" &
    WORKER_PIDS=($!)
  elif [[ $INSTANCES -eq 0 ]]; then
    "$BIN" all 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
  else
    # The API, one relay and one recovery worker, and INSTANCES processes of every step
    # worker, as separate processes (their CPU is counted as orderflow's).
    "$BIN" api 2>>"$OUT/system.log" &
    SYSTEM_PID=$!
    "$BIN" worker relay 2>>"$OUT/system.log" &
    WORKER_PIDS=($!)
    "$BIN" worker recovery 2>>"$OUT/system.log" &
    WORKER_PIDS+=($!)
    # PostgreSQL allows 100 connections: the step workers share ~40 between them.
    local per=$((8 / INSTANCES > 2 ? 8 / INSTANCES : 2))
    for _ in $(seq 1 "$INSTANCES"); do
      for kind in stock coupon payment order; do
        DB_POOL_SIZE=$per WORKER_CONCURRENCY=$per "$BIN" worker "$kind" 2>>"$OUT/system.log" &
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

# CPU time (clock ticks) used so far by the processes with these pids and by their children
# that have exited (PostgreSQL's postmaster collects its backends' time as they end).
ticks() {
  local total=0 pid t
  for pid in "$@"; do
    t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $5 + $6 + $7 + $8, $5 + $6}' /proc/stat; }

# Runs one bench against a fresh system and appends where the CPU went to $OUT/cpu.tsv, in
# core-milliseconds per finished order: PostgreSQL (its processes alive at the end), RabbitMQ
# (beam), orderflow (the system's processes), the bench client, the whole machine; and how
# busy the machine was (% of both cores). Covers the bench's setup too. A run with a
# baseline gets a second row: the machine's CPU per order during the baseline phase.
bench() {
  local name=$1
  shift
  start_system
  log "$name: orderflow bench $*"
  local pg_pids beam_pids before_pg before_beam before_sys machine_before
  pg_pids=$(pgrep -u postgres | tr '\n' ' ')
  beam_pids=$(pgrep -x beam.smp | tr '\n' ' ')
  before_pg=$(ticks $pg_pids) before_beam=$(ticks $beam_pids) before_sys=$(ticks "$SYSTEM_PID" "${WORKER_PIDS[@]}")
  machine_before=$(machine_ticks)
  "$BIN" bench --api "$API" --json "$OUT/$name.json" "$@" &
  local bench_pid=$! bench_ticks=0
  local samples="$OUT/$name.samples"
  : >"$samples"
  while kill -0 "$bench_pid" 2>/dev/null; do
    bench_ticks=$(ticks "$bench_pid")
    echo "$(date +%s%N) $(machine_ticks)" >>"$samples"
    sleep 0.2
  done
  wait "$bench_pid"
  pg_pids=$(pgrep -u postgres | tr '\n' ' ')
  local pg=$(($(ticks $pg_pids) - before_pg)) beam=$(($(ticks $beam_pids) - before_beam))
  local sys=$(($(ticks "$SYSTEM_PID" "${WORKER_PIDS[@]}") - before_sys))
  read -r all_after idle_after <<<"$(machine_ticks)"
  read -r all_before idle_before <<<"$machine_before"
  jq -r --arg name "$name" --argjson pg "$pg" --argjson beam "$beam" --argjson sys "$sys" \
    --argjson client "$bench_ticks" --argjson all $((all_after - all_before)) \
    --argjson idle $((idle_after - idle_before)) '
    (if has("requests") then .requests elif .confirmed + .cancelled > 0 then .confirmed + .cancelled
     else .accepted end) as $done
    | [$name, $done, ((if .confirmed + .cancelled > 0 then .completed_per_s else null end
                       // .requests_per_s // .accepted_per_s) * 10 | round / 10)]
      + ([$pg, $beam, $sys, $client, $all - $idle] | map(. * 10 / $done | . * 100 | round / 100))
      + [(($all - $idle) * 100 / $all | round)]
    | @tsv' "$OUT/$name.json" >>"$OUT/cpu.tsv"
  # The synchronous baseline is the bench's last phase: the machine's CPU over its final
  # baseline_duration_s seconds, per baseline order.
  local base_s base_n
  base_s=$(jq -r '.baseline_duration_s // 0' "$OUT/$name.json")
  base_n=$(jq -r '.baseline_orders // 0' "$OUT/$name.json")
  if [[ $base_n != 0 ]]; then
    # The per-process columns above span both phases; the machine's CPU is split here.
    sed -i '$d' "$OUT/cpu.tsv"
    awk -v name="$name" -v secs="$base_s" -v n="$base_n" -v rate="$(jq -r '.baseline_completed_per_s' "$OUT/$name.json")" \
      -v done="$(jq -r '.confirmed + .cancelled' "$OUT/$name.json")" -v prate="$(jq -r '.completed_per_s' "$OUT/$name.json")" '
      { t[NR] = $1; all[NR] = $2; idle[NR] = $3 }
      END {
        from = 1
        for (i = 1; i <= NR; i++) if (t[i] >= t[NR] - secs * 1e9) { from = i; break }
        busy = (all[from] - all[1]) - (idle[from] - idle[1])
        printf "%s\t%d\t%.1f\t-\t-\t-\t-\t%.2f\t%d\n", name, done, prate, busy * 10 / done, busy * 100 / (all[from] - all[1])
        busy = (all[NR] - all[from]) - (idle[NR] - idle[from])
        printf "%s-baseline\t%d\t%.1f\t-\t-\t-\t-\t%.2f\t%d\n", name, n, rate, busy * 10 / n, busy * 100 / (all[NR] - all[from])
      }' "$samples" >>"$OUT/cpu.tsv"
  fi
}

scenario_rates() {
  for rate in 35 70 100 140 200 300; do
    bench "rate-$rate" --rate "$rate" --orders $((rate * 20)) --users 300 --coupon-share 0.2
  done
}
scenario_closed() {
  bench closed --concurrency 32 --orders 6000 --users 300 --coupon-share 0.2 --baseline sync
}
scenario_hot() {
  bench hot --orders 10000 --users 1000 --hot --hot-stock 100 --rate 5000 ${HOT_ARGS:-}
}
scenario_rush() {
  bench rush --coupon-rush
  bench rush-100 --coupon-rush --concurrency 100
}
# Accepting alone (no step workers; orders stay PENDING): per accepted order, the floor under
# any pipeline's cost. Its completed/s column is accepted/s.
scenario_accept() {
  ACCEPT_ONLY=1 bench accept --concurrency 32 --orders 6000 --users 300 --coupon-share 0.2 --timeout 1s || true
}
scenario_instances() {
  for n in 1 2 4; do
    INSTANCES=$n bench "instances-$n" --concurrency 32 --orders 4000 --users 300 --coupon-share 0.2
  done
}

mkdir -p "$OUT"
: >"$OUT/system.log"
printf 'scenario\torders\tcompleted/s\tpostgres\trabbitmq\torderflow\tbench\tmachine\tbusy%%\n' >"$OUT/cpu.tsv"
bash scripts/services.sh
cargo build --release --quiet
scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(rates closed accept hot rush instances)
for s in "${scenarios[@]}"; do
  "scenario_$s"
done
stop_system
column -t -s $'\t' "$OUT/cpu.tsv" >&2
log "reports in $OUT/ (CPU per finished order: $OUT/cpu.tsv)"
