#!/usr/bin/env bash
# Contract test of the HTTP API against its own OpenAPI document:
#   1. /openapi.json is valid OpenAPI 3.1 (openapi-spec-validator);
#   2. schemathesis, every check on (`--checks all`), finds 0 failures with an admin token and
#      then with a user token.
# The API (`target/debug/orderflow api`) runs on a fresh database and a RabbitMQ vhost of its
# own, both removed at the end (also on failure). Idempotent; safe to run again.
#
#   bash scripts/contract-test.sh
#   ORDERFLOW_BIN=/path/to/orderflow bash scripts/contract-test.sh   # test another build, unbuilt
#
# The Python tools are pinned in tests/contract/requirements.txt and installed into
# target/contract-venv when missing or when that file changed; schemathesis's settings (seed,
# examples per operation, ...) are in tests/contract/schemathesis.toml. Reports land in
# ci-output/contract/. The last line of output is `N passed, M failed` (one test per step).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[contract-test] %s\n' "$*" >&2; }

PG_BASE=postgres://postgres@127.0.0.1:5432
MGMT=http://127.0.0.1:15672
VENV=target/contract-venv
REQUIREMENTS=tests/contract/requirements.txt
OUT=ci-output/contract

command -v psql >/dev/null 2>&1 || { log "error: psql is required (apt-get install postgresql-client)"; exit 1; }
command -v curl >/dev/null 2>&1 || { log "error: curl is required"; exit 1; }

bash scripts/services.sh

# --- Tools --------------------------------------------------------------------------------------
bash scripts/pinned-venv.sh "$VENV" "$REQUIREMENTS"

if [[ -n ${ORDERFLOW_BIN:-} ]]; then
  # Another build of orderflow (e.g. an older commit's, to compare).
  BIN=$ORDERFLOW_BIN
else
  locked=()
  if [[ -n ${CI:-} ]]; then
    locked=(--locked)
  fi
  # Built together with a test target, like scripts/browser-test.sh, so the binary the test
  # suite already built is reused.
  log "cargo build --bin orderflow --test faults"
  cargo build --bin orderflow --test faults "${locked[@]}"
  BIN=target/debug/orderflow
fi

# --- The system under test -------------------------------------------------------------------------
suffix=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
db=orderflow_contract_$suffix
vhost=orderflow-contract-$suffix
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
export DATABASE_URL=$PG_BASE/$db
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$vhost
export HTTP_ADDR=127.0.0.1:$port
export JWT_SECRET=$suffix-contract-secret
export RUST_LOG=${RUST_LOG:-warn}
mkdir -p "$OUT"
rm -f "$OUT"/*

api_pid=
cleanup() {
  if [[ -n $api_pid ]]; then
    kill -TERM "$api_pid" 2>/dev/null || true
    wait "$api_pid" 2>/dev/null || true
  fi
  psql "$PG_BASE/postgres" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  curl -s -o /dev/null -u guest:guest -X DELETE "$MGMT/api/vhosts/$vhost" || true
}
trap cleanup EXIT

curl -sf -o /dev/null -u guest:guest -X PUT "$MGMT/api/vhosts/$vhost"
curl -sf -o /dev/null -u guest:guest -X PUT -H 'content-type: application/json' \
  -d '{"configure":".*","write":".*","read":".*"}' "$MGMT/api/permissions/$vhost/guest"

log "starting orderflow api on $base (database $db, vhost $vhost)"
"$BIN" api >"$OUT/orderflow.log" 2>&1 &
api_pid=$!
for _ in $(seq 1 300); do
  if curl -sf -o /dev/null "$base/readyz"; then break; fi
  if ! kill -0 "$api_pid" 2>/dev/null; then
    log "orderflow api exited; its log:"; cat "$OUT/orderflow.log" >&2; exit 1
  fi
  sleep 0.2
done
curl -sf -o /dev/null "$base/readyz" || { log "orderflow api did not become ready"; exit 1; }

admin=$("$BIN" token --user 1 --admin)
user=$("$BIN" token --user 2)

passed=0
failed=0
step() {
  local name=$1
  shift
  local started=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    log "ok   $name ($((SECONDS - started)) s)"
  else
    failed=$((failed + 1))
    log "FAIL $name ($((SECONDS - started)) s)"
  fi
}

# --- 1. The document is valid OpenAPI -------------------------------------------------------------
validate() {
  # The validator quotes the whole document in its error: keep the start of each line.
  curl -sf "$base/openapi.json" -o "$OUT/openapi.json" &&
    "$VENV/bin/openapi-spec-validator" "$OUT/openapi.json" 2>&1 | cut -c1-1500
}
step "openapi.json is valid OpenAPI 3.1 (openapi-spec-validator)" validate

# --- 2. schemathesis, every check, as an admin and as a user ------------------------------------
fuzz() {
  local who=$1 token=$2
  "$VENV/bin/schemathesis" --config-file tests/contract/schemathesis.toml \
    run "$base/openapi.json" --checks all \
    -H "Authorization: Bearer $token" \
    --report junit --report-junit-path "$OUT/schemathesis-$who.xml" \
    --no-color
}
step "schemathesis --checks all with an admin token: 0 failures" fuzz admin "$admin"
step "schemathesis --checks all with a user token: 0 failures" fuzz user "$user"

echo "contract: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
