#!/usr/bin/env bash
# The tracing test's OTLP/HTTP receiver (tests/otlp/receiver.py; opentelemetry-proto pinned in
# tests/otlp/requirements.txt and installed into target/otlp-venv when missing or when that
# file changed).
#
#   bash scripts/otlp-receiver.sh              # installs it only
#   bash scripts/otlp-receiver.sh SPANS.jsonl  # runs it: prints `ready <port>`, writes spans there
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/otlp-venv
REQUIREMENTS=tests/otlp/requirements.txt
bash scripts/pinned-venv.sh "$VENV" "$REQUIREMENTS"
if [[ $# -gt 0 ]]; then
  exec "$VENV/bin/python" tests/otlp/receiver.py "$1"
fi
