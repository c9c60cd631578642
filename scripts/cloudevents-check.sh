#!/usr/bin/env bash
# Parses captured public events with the CloudEvents Python SDK's RabbitMQ binding
# (tests/cloudevents/check.py; cloudevents pinned in tests/cloudevents/requirements.txt and
# installed into target/cloudevents-venv when missing or when that file changed). The last
# line is `cloudevents: N passed, M failed`.
#
#   bash scripts/cloudevents-check.sh            # installs the SDK only
#   bash scripts/cloudevents-check.sh MESSAGES   # checks a file tests/asyncapi.rs or tests/event_replay.rs wrote
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/cloudevents-venv
REQUIREMENTS=tests/cloudevents/requirements.txt
bash scripts/pinned-venv.sh "$VENV" "$REQUIREMENTS"
if [[ $# -gt 0 ]]; then
  exec "$VENV/bin/python" tests/cloudevents/check.py "$1"
fi
