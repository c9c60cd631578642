#!/usr/bin/env bash
# Makes a Python virtual environment holding exactly the pinned requirements a test tool needs:
# creates VENV and installs REQUIREMENTS when VENV is missing or was made from another version
# of that file (a copy is kept in VENV), else does nothing. Used by the scripts that run Python
# tools (contract-test.sh, cloudevents-check.sh, otlp-receiver.sh).
#
#   bash scripts/pinned-venv.sh target/otlp-venv tests/otlp/requirements.txt
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=$1
REQUIREMENTS=$2
if [[ ! -x $VENV/bin/python ]] || ! cmp -s "$REQUIREMENTS" "$VENV/requirements.txt"; then
  printf '[pinned-venv] installing %s into %s\n' "$REQUIREMENTS" "$VENV" >&2
  python3 -m venv --clear "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS"
  cp "$REQUIREMENTS" "$VENV/requirements.txt"
fi
