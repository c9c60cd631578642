#!/usr/bin/env bash
# Checks the AsyncAPI document of the messages with the official AsyncAPI parser
# (tests/asyncapi/check.mjs, @asyncapi/parser pinned in tests/asyncapi/package-lock.json):
# zero errors, zero warnings. Given captured messages too (tests/asyncapi.rs does that), it
# validates each one against the document. Idempotent: installs the pinned packages on first
# use and again only when the lock file changes. The last line is `asyncapi: N passed, M failed`.
#
#   bash scripts/asyncapi.sh                      # docs/asyncapi.json
#   bash scripts/asyncapi.sh DOCUMENT [MESSAGES]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

dir=tests/asyncapi
if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"; then
  printf '[asyncapi] npm ci (%s)\n' "$dir" >&2
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
  cp "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"
fi

exec node "$dir/check.mjs" "${1:-docs/asyncapi.json}" ${2:+"$2"}
