#!/usr/bin/env bash
# Checks orderflow's Prometheus side with the tools operators run, Debian's `prometheus` and
# `promtool` (installed with apt-get if missing):
#   1. promtool check rules / test rules on deploy/prometheus/alerts.yml (alerts.test.yml), and
#      promtool check config on deploy/prometheus.yml (the compose Prometheus, rules included);
#   2. the real system as separate processes (`orderflow api` and every `orderflow worker <kind>`
#      with METRICS_ADDR) on a database and a RabbitMQ vhost of its own, under a light load
#      (`orderflow bench`, 10 orders/s) plus one poison message (a dead letter):
#      - promtool check metrics finds no problem in the API's and every worker's /metrics;
#      - a real Prometheus (scrape and rule evaluation every 1 s, alerts.yml) scraping them all
#        answers every query of every panel of deploy/grafana/dashboards/orderflow.json with at
#        least one series; evaluates every alert expression without error; finds every metric
#        and the label values the alerts rely on; sees the API's last successful samples of the
#        database and of the broker (orderflow_sample_success_timestamp_seconds) within 30 s of
#        now, and OrderflowDatabaseUnreachable and OrderflowBrokerUnreachable not firing; has no
#        alert firing but the dead letter's;
#   3. the stock worker stopped (SIGTERM) while orders keep coming: within 90 s Prometheus fires
#      OrderflowOrdersStuck, OrderflowWorkQueueWithoutConsumers{queue="orderflow.stock"} and
#      OrderflowTargetDown for the stock worker.
# Everything it starts (processes, Prometheus, its data, the vhost, the database) is removed at the
# end, also on failure. Logs land in ci-output/prometheus/. About 1.5 minutes once built.
#
#   bash scripts/prometheus-check.sh
#   ORDERFLOW_BIN=/path/to/orderflow bash scripts/prometheus-check.sh   # another build, unbuilt
#
# Builds target/debug/orderflow first (cargo decides whether anything changed). Output goes to
# stderr except the last line, `N passed, M failed`; the exit status is non-zero on a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[prometheus-check] %s\n' "$*" >&2; }

passed=0
failed=0
pass() {
  passed=$((passed + 1))
  log "ok: $*"
}
fail() {
  failed=$((failed + 1))
  log "FAILED: $*"
}
# A step the rest depends on failed: counted, and the run ends (cleanup and the summary follow).
die() {
  fail "$*"
  exit 1
}

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

readonly PG_BASE=postgres://postgres@127.0.0.1:5432
readonly MGMT=http://127.0.0.1:15672
readonly OUT=ci-output/prometheus
readonly WORKERS=(relay stock coupon payment order recovery)
# The queues a worker kind consumes (the alert's list).
readonly WORK_QUEUES=(orderflow.stock orderflow.coupon orderflow.payment orderflow.order orderflow.recovery.expired orderflow.dead-letters)
readonly FIRE_TIMEOUT=90

# What the run starts, for cleanup (filled in as it goes).
db=
vhost=
work=
bench_pid=
prom_pid=
declare -A pid=()
# stop PID...: SIGTERM, then SIGKILL after 20 s (orderflow drains in-flight work first).
stop() {
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  local deadline=$((SECONDS + 20))
  for p in "$@"; do
    while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
# On every exit: stop what runs, drop the database and the vhost, remove the temp dir, then the
# summary, last. Exits non-zero when anything failed.
cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  local all=()
  [[ -n $bench_pid ]] && all+=("$bench_pid")
  [[ -n $prom_pid ]] && all+=("$prom_pid")
  all+=("${pid[@]}")
  ((${#all[@]})) && stop "${all[@]}"
  [[ -n $db ]] && psql "$PG_BASE/postgres" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
  [[ -n $vhost ]] && curl -s -o /dev/null -u guest:guest -X DELETE "$MGMT/api/vhosts/$vhost"
  [[ -n $work ]] && rm -rf "$work"
  if ((status != 0 && failed == 0)); then
    fail "aborted (exit status $status)"
  fi
  log "done in $SECONDS s; logs in $OUT/"
  echo "$passed passed, $failed failed"
  if ((status != 0)); then
    exit "$status"
  elif ((failed > 0)); then
    exit 1
  fi
  exit 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v psql >/dev/null 2>&1 || die "psql is required (apt-get install postgresql-client)"
command -v curl >/dev/null 2>&1 || die "curl is required"

# --- Tools ----------------------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  log "installing prometheus (apt-get)"
  as_root apt-get update -qq
  # Without recommends: no node exporter. Nothing is started: there is no init system to start it,
  # and this script runs its own Prometheus.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
log "$(promtool --version 2>&1 | head -n 1)"

# check DESCRIPTION COMMAND...: passes when the command succeeds; its output is shown on failure.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then
    pass "$what"
  else
    fail "$what"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
  fi
}

# --- 1. The rules, offline -------------------------------------------------------------------------
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts.test.yml" promtool test rules deploy/prometheus/alerts.test.yml
check "promtool check config deploy/prometheus.yml (the compose Prometheus)" promtool check config deploy/prometheus.yml

# --- 2. The system under test --------------------------------------------------------------------
bash scripts/services.sh

if [[ -n ${ORDERFLOW_BIN:-} ]]; then
  BIN=$ORDERFLOW_BIN
else
  locked=()
  if [[ -n ${CI:-} ]]; then
    locked=(--locked)
  fi
  # Built together with a test target, like scripts/browser-test.sh and contract-test.sh: cargo
  # then resolves the same features as the test suite and reuses its binary.
  log "cargo build --bin orderflow --test faults"
  cargo build --bin orderflow --test faults "${locked[@]}"
  BIN=target/debug/orderflow
fi
[[ -x $BIN ]] || die "$BIN is not an executable"

suffix=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
db=orderflow_prom_check_$suffix
vhost=orderflow-prom-check-$suffix
work=$(mktemp -d /tmp/orderflow-prometheus-check.XXXXXX)
# Free ports, all distinct: the API, one per worker, Prometheus.
read -r api_port prom_port relay_port stock_port coupon_port payment_port order_port recovery_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')
declare -A metrics_port=([relay]=$relay_port [stock]=$stock_port [coupon]=$coupon_port [payment]=$payment_port [order]=$order_port [recovery]=$recovery_port)
base=http://127.0.0.1:$api_port
prom=http://127.0.0.1:$prom_port
export DATABASE_URL=$PG_BASE/$db
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$vhost
export JWT_SECRET=$suffix-prometheus-check-secret
export RUST_LOG=${RUST_LOG:-info,sqlx=warn,lapin=warn,tower_http=warn}
mkdir -p "$OUT"
rm -f "$OUT"/*

curl -sf -o /dev/null -u guest:guest -X PUT "$MGMT/api/vhosts/$vhost" || die "cannot create vhost $vhost"
curl -sf -o /dev/null -u guest:guest -X PUT -H 'content-type: application/json' \
  -d '{"configure":".*","write":".*","read":".*"}' "$MGMT/api/permissions/$vhost/guest" ||
  die "cannot grant guest access to vhost $vhost"

# wait_http SECONDS URL PID NAME: until URL answers 2xx; fails early if PID exited.
wait_http() {
  local timeout=$1 url=$2 p=$3 name=$4
  local deadline=$((SECONDS + timeout))
  until curl -sf -o /dev/null --max-time 2 "$url"; do
    if ! kill -0 "$p" 2>/dev/null; then
      log "$name exited; the end of its log:"
      tail -n 20 "$OUT/$name.log" >&2
      return 1
    fi
    ((SECONDS < deadline)) || {
      log "$name did not answer $url within ${timeout}s"
      return 1
    }
    sleep 0.2
  done
}

# The API first: it creates the database and applies the migrations.
log "starting orderflow api on $base (database $db, vhost $vhost)"
HTTP_ADDR=127.0.0.1:$api_port "$BIN" api >"$OUT/api.log" 2>&1 &
pid[api]=$!
wait_http 60 "$base/readyz" "${pid[api]}" api || die "the API did not become ready"
for kind in "${WORKERS[@]}"; do
  METRICS_ADDR=127.0.0.1:${metrics_port[$kind]} "$BIN" worker "$kind" >"$OUT/$kind.log" 2>&1 &
  pid[$kind]=$!
done
for kind in "${WORKERS[@]}"; do
  wait_http 60 "http://127.0.0.1:${metrics_port[$kind]}/healthz" "${pid[$kind]}" "$kind" ||
    die "worker $kind did not start"
done
log "started: api :$api_port, workers $(for k in "${WORKERS[@]}"; do printf '%s :%s ' "$k" "${metrics_port[$k]}"; done)"

# --- Prometheus ----------------------------------------------------------------------------------
# Job names as in deploy/prometheus.yml (the alerts name them); workers labelled like compose's.
{
  cat <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: orderflow-api
    static_configs:
      - targets: ["127.0.0.1:$api_port"]
  - job_name: orderflow-workers
    static_configs:
EOF
  for kind in "${WORKERS[@]}"; do
    printf '      - targets: ["127.0.0.1:%s"]\n        labels: {worker: %s}\n' "${metrics_port[$kind]}" "$kind"
  done
} >"$work/prometheus.yml"
cp "$work/prometheus.yml" "$OUT/prometheus.yml"
check "promtool check config on the check's own Prometheus configuration" promtool check config "$work/prometheus.yml"
log "starting prometheus on $prom"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$OUT/prometheus.log" 2>&1 &
prom_pid=$!
wait_http 30 "$prom/-/ready" "$prom_pid" prometheus || die "Prometheus did not become ready"

# --- Load ----------------------------------------------------------------------------------------
# 10 orders/s for two minutes: orders keep coming until the stuck-order alert has fired. The
# bench is stopped at the end; its report does not matter here.
log "load: orderflow bench --rate 10 --orders 1200 --users 50 --coupon-share 0.2"
"$BIN" bench --api "$base" --rate 10 --orders 1200 --users 50 --coupon-share 0.2 \
  --jwt-secret "$JWT_SECRET" --database-url "$DATABASE_URL" --timeout 30s >"$OUT/bench.log" 2>&1 &
bench_pid=$!
# One poison message for the stock worker: rejected, dead-lettered, recorded by the recovery
# worker (the dashboard's dead-letter panels and OrderflowDeadLettersWaiting need one).
sleep 3
curl -sf -o /dev/null -u guest:guest -H 'content-type: application/json' -X POST \
  "$MGMT/api/exchanges/$vhost/amq.default/publish" \
  -d '{"properties":{"delivery_mode":2},"routing_key":"orderflow.stock","payload":"not an envelope","payload_encoding":"string"}' ||
  die "cannot publish the poison message"
# has_series QUERY: Prometheus answers QUERY with at least one series.
has_series() {
  curl -sf --max-time 5 --get "$prom/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}
# Until every step has handled orders, the API's sampler (every 5 s) has seen some confirmed, the
# relay has published and the poison is recorded; then two more scrapes for rate() to have two
# samples of every series.
for q in 'orderflow_orders{status="CONFIRMED"} > 0' \
  'orderflow_step_duration_seconds_count{step="stock"}' 'orderflow_step_duration_seconds_count{step="coupon"}' \
  'orderflow_step_duration_seconds_count{step="payment"}' 'orderflow_step_duration_seconds_count{step="order"}' \
  'orderflow_outbox_delay_seconds_count' 'orderflow_messages_total{outcome="dead_lettered"}'; do
  deadline=$((SECONDS + 60))
  until has_series "$q"; do
    kill -0 "$bench_pid" 2>/dev/null || {
      tail -n 20 "$OUT/bench.log" >&2
      die "the bench stopped early"
    }
    ((SECONDS < deadline)) || die "no series for $q after 60 s of load"
    sleep 1
  done
done
sleep 3
log "the system is under load (${SECONDS} s in)"

# --- promtool check metrics ----------------------------------------------------------------------
# check_metrics NAME URL: the exposition must be non-empty and lint-clean.
check_metrics() {
  local body problems
  body=$(curl -sf --max-time 5 "$2") || {
    echo "cannot fetch $2"
    return 1
  }
  printf '%s\n' "$body" >"$OUT/metrics-$1.txt"
  grep -q '^orderflow_' <<<"$body" || {
    echo "no orderflow_ metric in $2"
    return 1
  }
  # promtool prints each problem (metric name, then what is wrong) and exits 3 when there is one.
  problems=$(promtool check metrics <<<"$body" 2>&1) || {
    printf '%s\n' "$problems"
    return 1
  }
  [[ -z $problems ]] || {
    printf '%s\n' "$problems"
    return 1
  }
}
check "promtool check metrics: the API's /metrics" check_metrics api "$base/metrics"
for kind in "${WORKERS[@]}"; do
  check "promtool check metrics: worker $kind's /metrics" check_metrics "$kind" "http://127.0.0.1:${metrics_port[$kind]}/metrics"
done

# --- Queries through Prometheus ------------------------------------------------------------------
# Prints one line per check, "ok<TAB>what" or "FAILED<TAB>what<TAB>why".
queries() {
  PROM=$prom QUEUES="${WORK_QUEUES[*]}" python3 - <<'EOF'
import json, os, re, urllib.error, urllib.parse, urllib.request
import yaml

prom = os.environ["PROM"]

def query(q):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"status": "error", "error": body}

def report(ok, what, why=""):
    print(("ok" if ok else "FAILED") + "\t" + what + ("\t" + why if why else ""))

def series(q):
    code, body = query(q)
    if code != 200 or body.get("status") != "success":
        return None, f"HTTP {code}: {body.get('errorType', '')} {body.get('error', '')}".strip()
    return body["data"]["result"], ""

# Every panel query of the dashboard, Grafana's range variables replaced by 1m.
dashboard = json.load(open("deploy/grafana/dashboards/orderflow.json"))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dashboard["panels"]):
    for t in p.get("targets", []):
        expr = t.get("expr")
        if not expr:
            continue
        q = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "1m", expr)
        what = f"panel {p.get('title')!r}: {q}"
        if "$" in q:
            report(False, what, "a Grafana variable this check does not know")
            continue
        result, why = series(q)
        if result is None:
            report(False, what, why)
        else:
            report(len(result) > 0, what, "" if result else "no series")

# Every alert expression evaluates; every metric it reads exists.
rules = [r for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"]]
names = set()
for r in rules:
    result, why = series(r["expr"])
    report(result is not None, f"alert {r['alert']}: its expression evaluates", why)
    names.update(re.findall(r"\borderflow_[a-z_]+", r["expr"]))
    if re.search(r"\bup\{", r["expr"]):
        names.add("up")
for name in sorted(names):
    result, why = series(name)
    report(bool(result), f"metric {name} has series", why or ("" if result else "no series"))

# The label values the alerts select on, as a healthy system under load shows them.
def expect(q, n, what):
    result, why = series(q)
    if result is None:
        report(False, what, why)
    else:
        report(len(result) >= n, what, "" if len(result) >= n else f"{len(result)} series: {q}")
expect('orderflow_http_requests_total{job="orderflow-api",route="/api/orders",status="202"}', 1,
       'orders accepted: orderflow_http_requests_total{route="/api/orders",status="202"}')
expect('orderflow_http_requests_total{job="orderflow-api",route="/readyz",status="200"}', 1,
       'readiness probes: orderflow_http_requests_total{route="/readyz",status="200"}')
for status in ("CONFIRMED", "COMPENSATION_FAILED"):
    expect(f'orderflow_orders{{status="{status}"}}', 1, f'orderflow_orders{{status="{status}"}}')
for queue in os.environ["QUEUES"].split():
    expect(f'orderflow_queue_consumers{{queue="{queue}"}} > 0', 1, f'a consumer on {queue}')
expect('orderflow_messages_total{outcome="dead_lettered"}', 1,
       'the poison message recorded: orderflow_messages_total{outcome="dead_lettered"}')
expect('up{job="orderflow-api"} == 1', 1, 'the API scraped (job orderflow-api)')
expect('up{job="orderflow-workers"} == 1', 6, 'all six workers scraped (job orderflow-workers)')

# The API's sampler reads both sources: its last success of each is recent (it samples every
# 5 s; the alerts fire past 30 s).
for source in ("database", "broker"):
    what = f'orderflow_sample_success_timestamp_seconds{{source="{source}"}} within 30 s of now'
    result, why = series(f'time() - orderflow_sample_success_timestamp_seconds{{job="orderflow-api",source="{source}"}}')
    if result is None:
        report(False, what, why)
    elif not result:
        report(False, what, "no series")
    else:
        ages = [float(r["value"][1]) for r in result]
        report(all(-5 <= age <= 30 for age in ages), what, f"seconds since the last success: {ages}")

# Healthy: nothing fires but the poison's dead letter.
code, body = query("ALERTS")
firing = sorted({a["metric"]["alertname"] for a in body["data"]["result"] if a["metric"].get("alertstate") == "firing"})
others = [a for a in firing if a != "OrderflowDeadLettersWaiting"]
report("OrderflowDeadLettersWaiting" in firing, "OrderflowDeadLettersWaiting fires for the poison message", f"firing: {firing}")
report(not others, "no other alert fires on the healthy system", f"firing: {others}")
for alert in ("OrderflowDatabaseUnreachable", "OrderflowBrokerUnreachable"):
    report(alert not in firing, f"{alert} does not fire on the healthy system", f"firing: {firing}")
print("end")
EOF
}
ended=
while IFS=$'\t' read -r verdict what why; do
  case $verdict in
    ok) pass "$what" ;;
    end) ended=1 ;;
    *) fail "$what${why:+: $why}" ;;
  esac
done < <(queries)
[[ -n $ended ]] || fail "the queries through Prometheus did not run to their end (see above)"

# --- 3. A stopped stage fires the alerts ----------------------------------------------------------
log "stopping the stock worker (SIGTERM) while orders keep coming"
stopped_at=$SECONDS
stop "${pid[stock]}"
unset 'pid[stock]'
kill -0 "$bench_pid" 2>/dev/null || log "warning: the bench has stopped sending; orders may not keep coming"

# firing: one line per firing alert, "name queue worker".
firing() {
  curl -sf --max-time 5 "$prom/api/v1/alerts" | python3 -c '
import json, sys
for a in json.load(sys.stdin)["data"]["alerts"]:
    if a["state"] == "firing":
        l = a["labels"]
        print(l["alertname"], l.get("queue", "-"), l.get("worker", "-"))
' || true
}
declare -A want=(
  ["OrderflowOrdersStuck - -"]="OrderflowOrdersStuck"
  ["OrderflowWorkQueueWithoutConsumers orderflow.stock stock"]='OrderflowWorkQueueWithoutConsumers{queue="orderflow.stock",worker="stock"}'
  ["OrderflowTargetDown - stock"]='OrderflowTargetDown{worker="stock"}'
)
declare -A fired_after=()
while ((SECONDS - stopped_at <= FIRE_TIMEOUT)) && ((${#fired_after[@]} < ${#want[@]})); do
  now=$(firing)
  for key in "${!want[@]}"; do
    if [[ -z ${fired_after[$key]:-} ]] && grep -qxF "$key" <<<"$now"; then
      fired_after[$key]=$((SECONDS - stopped_at))
      log "${want[$key]} firing after ${fired_after[$key]} s"
    fi
  done
  sleep 2
done
for key in "${!want[@]}"; do
  if [[ -n ${fired_after[$key]:-} ]]; then
    pass "${want[$key]} fired ${fired_after[$key]} s after the stock worker stopped"
  else
    fail "${want[$key]} did not fire within ${FIRE_TIMEOUT} s of the stock worker stopping (firing: $(firing | tr '\n' ';'))"
  fi
done
# The summary and the exit status: cleanup, on EXIT.
