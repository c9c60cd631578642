#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the integration tests against the real
# PostgreSQL and RabbitMQ. Starts those two first if they are down. Idempotent.
#
#   bash scripts/test.sh             # everything
#   bash scripts/test.sh coupon      # extra arguments go to `cargo nextest run` (e.g. a filter)
#
# Profile `ci` in .config/nextest.toml: no retries, no fail-fast, 4 tests at a time, a hung
# test is killed after 240 s. Results also land in target/nextest/ci/junit.xml.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/services.sh

# In CI the lock file must already match the manifests.
locked=()
if [[ -n ${CI:-} ]]; then
  locked=(--locked)
fi

# --- Parallel suite: unit + integration tests ----------------------------------------------------
# Each integration test owns a fresh database and a fresh RabbitMQ vhost, so they run in parallel.
# (nextest does not run doctests; the workspace has none. Add `cargo test --workspace --doc` here
# if that changes.)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci "${locked[@]}" "$@"
else
  echo "cargo-nextest is not installed (cargo install cargo-nextest --locked); falling back to cargo test" >&2
  cargo test --workspace "${locked[@]}" "$@"
fi

# --- Fault-injection suite (not run here yet) ----------------------------------------------------
# Reserved: the fault-injection suite (tests/faults.rs: killed workers, broker and database
# restarts, poison, a paused worker, a relay crash) runs HERE, after the parallel suite and one
# test at a time, because it stops and restarts the shared PostgreSQL and RabbitMQ. Its tests are
# #[ignore]d, so the parallel run above skips them. To be wired in once `orderflow audit`, which
# the suite calls, is implemented:
#   cargo nextest run --profile ci --test faults --run-ignored only --test-threads 1
