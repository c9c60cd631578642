//! Prometheus metrics: one recorder per process, rendered by the API's `/metrics` route or
//! a worker's metrics listener. Names and labels are defined here, once.

use std::{
    fmt::Display,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{db::history::StatusCounts, messaging::stats::QueueStats};

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
/// When the gauge sampler last read a source successfully, by `source` (`database`: the
/// PostgreSQL gauges, `broker`: the RabbitMQ queue gauges), as a unix time in seconds; 0 until
/// the first success. A timestamp rather than an up/down flag: the system-wide gauges keep their
/// last values when their source cannot be read, and `time() - this` grows whether the source
/// fails, does not answer, or the sampler itself hangs, so an alert sees each of them.
pub const SAMPLE_SUCCESS: &str = "orderflow_sample_success_timestamp_seconds";

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
        "From commit of an outbox row to the broker's confirm (deadline messages, held up to a second on purpose, excepted)"
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
    describe_gauge!(
        SAMPLE_SUCCESS,
        Unit::Seconds,
        "Unix time of the last successful sample of the system-wide gauges, by source (database, broker; 0 until the first): the gauges of a source that stopped advancing are stale"
    );
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
///
/// The database and the broker are sampled independently, each on its own ticker: one that
/// fails or hangs does not hold the other back. Each success sets [`SAMPLE_SUCCESS`] for its
/// source to the current time; both start at 0.
pub async fn sample_gauges(
    pool: PgPool,
    orders: Arc<StatusCounts>,
    queues: Arc<QueueStats>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    for source in ["database", "broker"] {
        metrics::gauge!(SAMPLE_SUCCESS, "source" => source).set(0.0);
    }
    let database = sample_every(interval, "database", || sample_database(&pool, &orders));
    let broker = async {
        // Like every process, declare the topology first (idempotent), so the passive declares
        // below never hit a queue that no worker has declared yet. Bounded (10 s): a broker
        // that does not answer must not keep the sampler from starting.
        if let Err(err) = queues.declare_topology().await {
            tracing::debug!(error = %format!("{err:#}"), "could not declare the topology before sampling");
        }
        sample_every(interval, "broker", || sample_broker(&queues)).await
    };
    tokio::select! {
        _ = async { tokio::join!(database, broker) } => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Runs `sample` every `interval` (the first time after one interval), forever; records each
/// success as [`SAMPLE_SUCCESS`] for `source`.
async fn sample_every<F, Fut, E>(interval: Duration, source: &'static str, mut sample: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match sample().await {
            Ok(()) => metrics::gauge!(SAMPLE_SUCCESS, "source" => source).set(unix_now()),
            Err(err) => tracing::debug!(error = %err, source, "could not sample gauges"),
        }
    }
}

/// Now as a unix time, in seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

async fn sample_broker(queues: &QueueStats) -> anyhow::Result<()> {
    for q in queues.read().await? {
        metrics::gauge!(QUEUE_DEPTH, "queue" => q.name.clone()).set(q.messages as f64);
        metrics::gauge!(QUEUE_CONSUMERS, "queue" => q.name).set(q.consumers as f64);
    }
    Ok(())
}

async fn sample_database(pool: &PgPool, orders: &StatusCounts) -> crate::Result<()> {
    for (status, n) in orders.read(pool).await? {
        metrics::gauge!(ORDERS, "status" => status.as_str()).set(n as f64);
    }
    // Unsent and lag cover what the relay still has to publish; parked rows wait for an
    // operator and are counted on their own.
    let (dead, unsent, lag, parked, oldest): (i64, i64, f64, i64, f64) = crate::db::kept::answered_query(
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM dead_letters WHERE status = 'NEW'),
                (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL),
                coalesce((SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox
                          WHERE sent_at IS NULL AND parked_at IS NULL), 0),
                (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL),
                coalesce((SELECT extract(epoch FROM now() - min(updated_at))::float8 FROM orders
                          WHERE in_flight AND status <> 'COMPENSATION_FAILED'), 0)",
        )
        .fetch_one(pool),
    )
    .await?;
    metrics::gauge!(OLDEST_IN_FLIGHT).set(oldest);
    metrics::gauge!(DEAD_LETTERS).set(dead as f64);
    metrics::gauge!(OUTBOX_UNSENT).set(unsent as f64);
    metrics::gauge!(OUTBOX_LAG).set(lag);
    metrics::gauge!(OUTBOX_PARKED).set(parked as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// The value of `orderflow_sample_success_timestamp_seconds{source="<source>"}`, if rendered.
    fn success_timestamp(source: &str) -> Option<f64> {
        let prefix = format!("{SAMPLE_SUCCESS}{{source=\"{source}\"}} ");
        render()
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map(|value| value.trim().parse().unwrap())
    }

    #[tokio::test]
    async fn the_success_timestamp_advances_with_each_success_and_stops_with_the_failures() {
        install();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        // Three successes, then the source is gone.
        let sampler = tokio::spawn(sample_every(Duration::from_millis(20), "test-flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { if n < 3 { Ok(()) } else { Err("unreachable") } }
        }));
        while calls.load(Ordering::SeqCst) < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = success_timestamp("test-flaky").unwrap();
        assert!((unix_now() - last).abs() < 5.0, "a unix time in seconds: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(calls.load(Ordering::SeqCst) > 6, "the sampler keeps trying");
        assert_eq!(
            success_timestamp("test-flaky"),
            Some(last),
            "failures do not advance it"
        );
        sampler.abort();
    }

    #[tokio::test]
    async fn both_sources_start_at_zero_and_stay_there_while_unreachable() {
        install();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
            .unwrap();
        let shutdown = CancellationToken::new();
        let sampler = tokio::spawn(sample_gauges(
            pool,
            Arc::default(),
            Arc::new(QueueStats::new("amqp://nobody:nothing@127.0.0.1:1/%2f")),
            Duration::from_millis(20),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(success_timestamp("database"), Some(0.0));
        assert_eq!(success_timestamp("broker"), Some(0.0));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), sampler)
            .await
            .expect("the sampler stops on shutdown, even mid-sample")
            .unwrap();
    }
}
