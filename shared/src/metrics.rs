//! Prometheus metrics: one recorder per process, rendered by the API's `/metrics` route or
//! a worker's metrics listener. Names and labels are defined here, once.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const HTTP_REQUESTS: &str = "orderflow_http_requests_total";
pub const HTTP_DURATION: &str = "orderflow_http_request_duration_seconds";
pub const MESSAGES: &str = "orderflow_messages_total";
pub const STEP_DURATION: &str = "orderflow_step_duration_seconds";
pub const STEP_BATCH: &str = "orderflow_step_batch_size";
pub const OUTBOX_LAG: &str = "orderflow_outbox_lag_seconds";
pub const OUTBOX_UNSENT: &str = "orderflow_outbox_unsent";
pub const OUTBOX_DELAY: &str = "orderflow_outbox_delay_seconds";
pub const OUTBOX_PARKED: &str = "orderflow_outbox_parked";
pub const ACCEPT_BATCH: &str = "orderflow_accept_batch_size";
pub const QUEUE_DEPTH: &str = "orderflow_queue_depth";
pub const QUEUE_CONSUMERS: &str = "orderflow_queue_consumers";
pub const ORDERS: &str = "orderflow_orders";
pub const DEAD_LETTERS: &str = "orderflow_dead_letters";
pub const DB_FAILOVERS: &str = "orderflow_db_failovers_total";
pub const OLDEST_IN_FLIGHT: &str = "orderflow_orders_oldest_in_flight_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding application's): keep it, and
                // render an empty local one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            handle
        })
        .clone()
}

/// The Prometheus text exposition of this process's metrics.
pub fn render() -> String {
    install().render()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status");
    describe_counter!(
        DB_FAILOVERS,
        "Times a pool moved to another PostgreSQL node that accepts writes (DATABASE_URL with several hosts)"
    );
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request duration by route");
    describe_counter!(
        MESSAGES,
        "Deliveries by queue and outcome (acked, duplicate, retried, rejected, dead_lettered)"
    );
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Time to handle one delivery, by step");
    describe_histogram!(STEP_BATCH, "Orders handled per committed transaction, by step");
    describe_gauge!(
        OUTBOX_LAG,
        Unit::Seconds,
        "Age of the oldest unsent outbox row (0 when drained)"
    );
    describe_gauge!(OUTBOX_UNSENT, "Outbox rows not yet published");
    describe_histogram!(
        OUTBOX_DELAY,
        Unit::Seconds,
        "From commit of an outbox row to the broker's confirm"
    );
    describe_gauge!(
        OUTBOX_PARKED,
        "Outbox rows the broker kept refusing, parked for an operator (retry or discard)"
    );
    describe_histogram!(ACCEPT_BATCH, "Orders accepted per transaction (group commit)");
    describe_gauge!(QUEUE_DEPTH, "Messages ready in each queue");
    describe_gauge!(QUEUE_CONSUMERS, "Consumers on each queue");
    describe_gauge!(ORDERS, "Orders by status");
    describe_gauge!(
        OLDEST_IN_FLIGHT,
        Unit::Seconds,
        "Time since the in-flight order that waited longest last changed status (parked compensations aside; 0 when none is in flight): a stage that stopped moving"
    );
    describe_gauge!(DEAD_LETTERS, "Dead letters waiting for an operator (NEW)");
}

/// Counts one delivery outcome.
pub fn message(queue: &'static str, outcome: &'static str) {
    metrics::counter!(MESSAGES, "queue" => queue, "outcome" => outcome).increment(1);
}

/// Records how long a step took for one delivery.
pub fn step_duration(step: &'static str, elapsed: Duration) {
    metrics::histogram!(STEP_DURATION, "step" => step).record(elapsed.as_secs_f64());
}

/// Records how many orders one committed transaction of a step handled.
pub fn step_batch(step: &'static str, size: usize) {
    metrics::histogram!(STEP_BATCH, "step" => step).record(size as f64);
}

/// Samples the system-wide gauges (orders by status, dead letters, outbox, queues) every
/// `interval` until `shutdown`. Runs in the API process: one sampler per deployment is
/// enough, and every API replica reporting the same values is harmless.
pub async fn sample_gauges(pool: PgPool, amqp_url: String, interval: Duration, shutdown: CancellationToken) {
    // Like every process, declare the topology first (idempotent), so the passive declares
    // below never hit a queue that no worker has declared yet.
    if let Ok(conn) = crate::messaging::connect(&amqp_url, lapin::ConnectionProperties::default()).await {
        let _ = crate::messaging::topology::declare(&conn).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(err) = sample_database(&pool).await {
            tracing::debug!(error = %err, "could not sample database gauges");
        }
        match crate::messaging::stats::queue_stats(&amqp_url).await {
            Ok(queues) => {
                for q in queues {
                    metrics::gauge!(QUEUE_DEPTH, "queue" => q.name.clone()).set(q.messages as f64);
                    metrics::gauge!(QUEUE_CONSUMERS, "queue" => q.name).set(q.consumers as f64);
                }
            }
            Err(err) => tracing::debug!(error = %err, "could not sample queue gauges"),
        }
    }
}

async fn sample_database(pool: &PgPool) -> crate::Result<()> {
    let counts: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
        .fetch_all(pool)
        .await?;
    for status in crate::domain::OrderStatus::ALL {
        let n = counts.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
        metrics::gauge!(ORDERS, "status" => status.as_str()).set(n as f64);
    }
    // Unsent and lag cover what the relay still has to publish; parked rows wait for an
    // operator and are counted on their own.
    let (dead, unsent, lag, parked, oldest): (i64, i64, f64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dead_letters WHERE status = 'NEW'),
                (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL),
                coalesce((SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox
                          WHERE sent_at IS NULL AND parked_at IS NULL), 0),
                (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL),
                coalesce((SELECT extract(epoch FROM now() - min(updated_at))::float8 FROM orders
                          WHERE in_flight AND status <> 'COMPENSATION_FAILED'), 0)",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!(OLDEST_IN_FLIGHT).set(oldest);
    metrics::gauge!(DEAD_LETTERS).set(dead as f64);
    metrics::gauge!(OUTBOX_UNSENT).set(unsent as f64);
    metrics::gauge!(OUTBOX_LAG).set(lag);
    metrics::gauge!(OUTBOX_PARKED).set(parked as f64);
    Ok(())
}
