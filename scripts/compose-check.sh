#!/usr/bin/env bash
# Validates docker-compose.yml with the compose tool, without a Docker engine:
#   - with JWT_SECRET set, the file is valid, with and without the `cluster` profile;
#   - without JWT_SECRET (unset or empty), compose refuses, naming JWT_SECRET in its message;
#   - the cluster profile has three RabbitMQ nodes and every worker kind at two replicas, and
#     every orderflow service is given all three broker addresses;
#   - every file the compose file mounts from deploy/ exists.
# Installs Debian's docker-compose (v1, which parses a file without an engine) if missing.
# Fast (a few seconds once installed). The last line is `N passed, M failed`.
#
#   bash scripts/compose-check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[compose-check] %s\n' "$*" >&2; }

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

if ! command -v docker-compose >/dev/null 2>&1; then
  log "installing docker-compose (apt-get)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi

FILE=docker-compose.yml
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

# Runs compose in a clean environment: only PATH and what the check passes (no .env file of
# the developer's can leak in: --env-file points at an empty one).
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
# dc [NAME=value...] ARGS...: docker-compose with exactly those variables.
dc() {
  local vars=()
  while [[ ${1:-} == *=* ]]; do
    vars+=("$1")
    shift
  done
  env -i PATH="$PATH" HOME="${HOME:-/root}" "${vars[@]}" docker-compose --env-file "$empty_env" -f "$FILE" "$@"
}

# 1. Valid with a secret, with and without the cluster profile.
if out=$(dc JWT_SECRET=test-secret config -q 2>&1); then
  pass "valid with JWT_SECRET"
else
  fail "invalid with JWT_SECRET: $out"
fi
if out=$(dc JWT_SECRET=test-secret --profile cluster config -q 2>&1); then
  pass "valid with JWT_SECRET and --profile cluster"
else
  fail "invalid with --profile cluster: $out"
fi

# 2. Refused without a secret (unset, then empty), with a message that names it.
for how in unset empty; do
  vars=()
  [[ $how == empty ]] && vars=(JWT_SECRET=)
  if out=$(dc "${vars[@]}" config -q 2>&1); then
    fail "accepted with JWT_SECRET $how"
  elif grep -q 'JWT_SECRET is not set' <<<"$out"; then
    pass "refused with JWT_SECRET $how: $(grep -o 'JWT_SECRET is not set[^}]*' <<<"$out" | head -n1 | cut -c1-90)..."
  else
    fail "refused with JWT_SECRET $how, but without the clear message: $out"
  fi
done

# 3. The cluster profile's shape, from the resolved file.
resolved=$(dc JWT_SECRET=test-secret --profile cluster config)
if out=$(python3 - "$resolved" <<'EOF'
import sys, yaml
services = yaml.safe_load(sys.argv[1])["services"]
problems = []
nodes = [n for n in ("rabbitmq", "rabbitmq-2", "rabbitmq-3") if n in services]
if len(nodes) != 3:
    problems.append(f"RabbitMQ nodes: {nodes}")
for kind in ("relay", "stock", "coupon", "payment", "order", "recovery"):
    replicas = [n for n, s in services.items() if s.get("command") == ["worker", kind]]
    if len(replicas) != 2:
        problems.append(f"{kind}: {len(replicas)} replicas")
    if "cluster" not in (services.get(f"{kind}-2", {}).get("profiles") or []):
        problems.append(f"{kind}-2 is not in the cluster profile")
for name, s in services.items():
    url = (s.get("environment") or {}).get("AMQP_URL")
    if s.get("image") == "orderflow:local" and (url is None or [h in url for h in ("@rabbitmq:", "@rabbitmq-2:", "@rabbitmq-3:")] != [True] * 3):
        problems.append(f"{name}: AMQP_URL does not list the three nodes")
    if "JWT_SECRET" in (s.get("environment") or {}) and name != "api":
        problems.append(f"{name} gets JWT_SECRET")
for n in ("rabbitmq-2", "rabbitmq-3", "rabbitmq-grow"):
    if "cluster" not in (services.get(n, {}).get("profiles") or []):
        problems.append(f"{n} is not in the cluster profile")
print("; ".join(problems))
sys.exit(1 if problems else 0)
EOF
); then
  pass "cluster profile: 3 RabbitMQ nodes, 2 replicas of each worker kind, 3 addresses for every orderflow service"
else
  fail "cluster profile: $out"
fi

# 4. Mounted files exist.
missing=$(grep -oE '\./deploy/[^:]+' "$FILE" | sort -u | while read -r f; do [[ -e $f ]] || echo "$f"; done)
if [[ -z $missing ]]; then
  pass "every mounted deploy/ file exists"
else
  fail "missing mounted files: $missing"
fi

echo "$passed passed, $failed failed"
((failed == 0))
