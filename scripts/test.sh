#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the integration tests against the real
# PostgreSQL and RabbitMQ, the dashboard's browser test, the API's contract test, then the fault
# suite. Starts PostgreSQL and RabbitMQ first if they are down. Idempotent.
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

# --- AsyncAPI: the messages' document, checked by the official parser (a few seconds) ------------
# Also installs the pinned parser that tests/asyncapi.rs validates captured messages with.
bash scripts/asyncapi.sh

# --- The CloudEvents SDK the public-event tests parse every event with (tests/cloudevents/,
# pinned; installed into target/cloudevents-venv when missing).
bash scripts/cloudevents-check.sh

# --- The OTLP receiver the tracing test exports spans to (tests/otlp.rs, tests/otlp/receiver.py:
# the OpenTelemetry protocol definitions, pinned; installed into target/otlp-venv when missing).
bash scripts/otlp-receiver.sh

# --- The test OpenID provider (tests/oidc.rs signs in through it): oauth2-mock-server, pinned in
# tests/oidc/package-lock.json, behind tests/oidc/provider.mjs. A few seconds once cached.
npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error >/dev/null

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

# --- docker-compose.yml: valid (also with the cluster profile), refuses to start without JWT_SECRET
bash scripts/compose-check.sh

# --- Browser test: the ops dashboard in headless Chromium ---------------------------------------
# Logs in, sees the funnel and a dead letter, replays it, follows the order to a terminal state.
# Screenshots land in ci-output/.
bash scripts/browser-test.sh

# --- Contract test: the API against its OpenAPI document ------------------------------------------
# openapi-spec-validator validates /openapi.json; schemathesis (`--checks all`, seeded, a bounded
# number of examples per operation) must find 0 failures with an admin token and with a user
# token. Both tools pinned in tests/contract/requirements.txt. Reports land in ci-output/contract/.
bash scripts/contract-test.sh

# --- Prometheus: the alert rules (deploy/prometheus/alerts.yml) pass promtool's checks and their
# unit tests (alerts.test.yml); a real Prometheus scraping the API and every worker under light
# load answers every dashboard panel, fires no alert on a healthy system, and fires the stuck-order,
# no-consumer and target-down alerts once the stock worker is stopped. Debian's prometheus package
# is installed if missing. About 1.5 min. Logs in ci-output/prometheus/. SKIP_PROMETHEUS=1 leaves
# it out.
if [[ -z ${SKIP_PROMETHEUS:-} ]]; then
  bash scripts/prometheus-check.sh
fi

# --- A rolling upgrade from the previous release (tests/upgrade.rs, docs/UPGRADING.md) ----------
# scripts/previous-release.sh builds the release pinned there from this repository's history
# (target/previous/, kept between runs; a few minutes cold), then the upgrade scenarios run the
# two releases side by side under orders, one scenario at a time. About 3 min besides the build.
# A clone without the pinned commit (a shallow one) cannot build it: the scenarios are skipped
# with a warning. SKIP_UPGRADE=1 leaves all of it out.
if [[ -z ${SKIP_UPGRADE:-} ]]; then
  if previous=$(bash scripts/previous-release.sh | tail -n 1); then
    ORDERFLOW_PREVIOUS_BIN=$previous cargo nextest run --profile ci "${locked[@]}" --test upgrade \
      --run-ignored only --test-threads 1 --no-capture
  else
    status=$?
    [[ $status -eq 3 ]] || exit "$status"
    echo "WARNING: the previous release is not in this clone's history; upgrade scenarios skipped" >&2
  fi
fi

# --- A highly available PostgreSQL (scripts/pg-ha.sh with the tests' own ports and directory,
# beside the default PostgreSQL; tests/common/pg_ha.rs): a pg_auto_failover monitor, a primary
# and a synchronous secondary, installed from Debian's packages if missing. Started once here for
# the fault scenarios that fail it over (tests/faults.rs, fault_11.. fault_14: the primary lost,
# a switchover, the secondary lost, each under 5,000 orders; and the primary lost while the
# broker is the three-node cluster, in the cluster block below), stopped after them (also when a
# test fails). About 3 min in all. SKIP_PG_HA=1 leaves it out.
pg_ha=(env ORDERFLOW_PG_HA_PORT=6100 ORDERFLOW_PG_HA_DIR="${TMPDIR:-/tmp}/orderflow-pg-ha-test" bash scripts/pg-ha.sh)
cluster=(env ORDERFLOW_CLUSTER_NAME=orderflow-test ORDERFLOW_CLUSTER_PORT=5690
  ORDERFLOW_CLUSTER_DIR="${TMPDIR:-/tmp}/orderflow-cluster-test" bash scripts/cluster.sh)
cleanup() {
  "${cluster[@]}" stop >/dev/null 2>&1 || true
  "${pg_ha[@]}" stop >/dev/null 2>&1 || true
}
if [[ -z ${SKIP_PG_HA:-} ]]; then
  trap cleanup EXIT
  "${pg_ha[@]}" start >/dev/null
fi

# --- A three-node RabbitMQ cluster (scripts/cluster.sh with the tests' own node names, ports and
# directory, next to the default node; tests/common/cluster.rs), started once here for every test
# that needs it and stopped afterwards (also when a test fails):
#   - tests/cluster.rs: orders complete while the node holding the relay is killed;
#   - the fault suite's cluster scenarios (tests/faults.rs, fault_7.. fault_10: the work queues'
#     leader killed, a node stopped past ORDER_TIMEOUT, a rolling restart, connections cut with
#     deliveries unacked; fault_14: the PostgreSQL primary lost meanwhile; 5,000 orders each),
#     one at a time.
# About 6 min in all. SKIP_CLUSTER=1 leaves all of it out.
if [[ -z ${SKIP_CLUSTER:-} ]]; then
  trap cleanup EXIT
  "${cluster[@]}" start >/dev/null
  cargo nextest run --profile ci "${locked[@]}" --test cluster --run-ignored only
  cargo nextest run --profile ci "${locked[@]}" --test faults --run-ignored only --test-threads 1 --no-capture \
    -E 'test(/^fault_[0-9]+_cluster_/)'
  "${cluster[@]}" stop >/dev/null
fi

# The PostgreSQL failover scenarios on the default RabbitMQ node (fault_11.. fault_13).
if [[ -z ${SKIP_PG_HA:-} ]]; then
  cargo nextest run --profile ci "${locked[@]}" --test faults --run-ignored only --test-threads 1 --no-capture \
    -E 'test(/^fault_[0-9]+_pg_ha_/)'
fi
cleanup
trap - EXIT

# --- Fault-injection suite -----------------------------------------------------------------------
# tests/faults.rs runs the system as separate processes under 5,000 orders and injects one fault
# per scenario (killed workers, RabbitMQ and PostgreSQL restarts, poison, a paused worker, a relay
# crash between confirm and mark). It restarts the shared PostgreSQL and RabbitMQ, so it runs
# after everything else, one test at a time. Its tests are #[ignore]d, so the parallel run above
# skips them; its cluster scenarios ran in the cluster block. docs/RELIABILITY.md has the
# scenarios and their numbers. SKIP_FAULTS=1 leaves it out.
if [[ -z ${SKIP_FAULTS:-} ]]; then
  cargo nextest run --profile ci "${locked[@]}" --test faults --run-ignored only --test-threads 1 --no-capture \
    -E 'not test(/^fault_[0-9]+_cluster_/) and not test(/^fault_[0-9]+_pg_ha_/)'
fi
