#!/usr/bin/env bash
# Browser test of the ops dashboard (tests/browser/ops-dashboard.mjs): headless Chromium, driven
# by playwright-core, against the real system on its own database and RabbitMQ vhost.
# Screenshots and orderflow's log land in ci-output/. Idempotent; safe to run again.
#
#   bash scripts/browser-test.sh
#
# Installs Debian's chromium if /usr/bin/chromium is missing (playwright's own browser download
# is not used), the pinned playwright-core from tests/browser/package-lock.json, and builds the
# debug binary. The last line of output is `N passed, M failed`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[browser-test] %s\n' "$*" >&2; }

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

if [[ ! -x /usr/bin/chromium ]]; then
  log "installing chromium (apt-get)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v psql >/dev/null 2>&1 || { log "error: psql is required (apt-get install postgresql-client)"; exit 1; }

bash scripts/services.sh

log "npm ci (tests/browser)"
# Playwright must never download a browser of its own here.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null

locked=()
if [[ -n ${CI:-} ]]; then
  locked=(--locked)
fi
# Built together with a test target so cargo resolves the same features as `cargo nextest run`
# (dev-dependencies enable more features): the binary the test suite already built is reused
# instead of rebuilding the workspace with another feature set.
log "cargo build --bin orderflow --test faults"
cargo build --bin orderflow --test faults "${locked[@]}"

mkdir -p ci-output
exec node tests/browser/ops-dashboard.mjs
