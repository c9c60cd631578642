//! The last hour of the pipeline, sampled by the API process itself for the ops dashboard's
//! "Last hour" charts (`GET /api/admin/trends`), so an operator sees whether things get better
//! or worse without a Prometheus.
//!
//! Every TREND_SAMPLE_INTERVAL [`run`] takes one [`TrendSample`] covering `[start, end)`, the
//! previous sample's end to now, and keeps the last hour of them in memory ([`Trends`]):
//! - orders accepted, confirmed and cancelled in it: `order_status_history` rows whose `at`
//!   falls in the window (every order gets a `PENDING` row when accepted, one `CONFIRMED` or
//!   `CANCELLED` row when it ends);
//! - e2e latency p50/p99 of the orders confirmed in it (their `CONFIRMED` row's `at` minus
//!   `orders.created_at`) and each step's latency p50/p99 (the time from the order's previous
//!   status row to its `STOCK_RESERVED`, `COUPON_APPLIED`, `PAID` and `CONFIRMED` row);
//! - dead letters recorded in it (`dead_letters.recorded_at`);
//! - each queue's ready messages (`QueueStats::read`), null when the broker could not be asked.
//!
//! Windows follow each other without gap or overlap, so the sums over the samples are exact
//! (`orderflow_shared::db::history`: a window ends before any transaction still writing began).
//!
//! Cost per sample: two statements (the window's end; the counts and percentiles, one pass
//! over the window's rows through the BRIN indexes of migration `20261205000004`, plus a
//! primary-key probe per confirmed order and an `(order_id, id)` probe per step row), a
//! summarization of those BRIN indexes' new ranges and one read of the queue depths (over the
//! connection `QueueStats` keeps). At start the hour is backfilled from history by the same
//! query, bucketed, when the hour holds at most [`BACKFILL_MAX_ROWS`] status changes (queue
//! depths cannot be backfilled).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use orderflow_shared::{
    db::{
        history::{READ_DEADLINE, settled_until, summarize},
        kept,
    },
    messaging::stats::QueueStats,
};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// How far back the samples reach.
pub const HOUR: Duration = Duration::from_secs(3600);

/// The backfill reads the hour's history once at start; past this many status changes (about
/// 2.2 orders per second for the hour) that read is not cheap, and the charts start empty.
pub const BACKFILL_MAX_ROWS: i64 = 40_000;

/// One sample: what happened in `[start, end)` (database clock) and the queues at its end.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrendSample {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Orders accepted (PENDING) in the window.
    pub accepted: i64,
    /// Orders that reached CONFIRMED in the window.
    pub confirmed: i64,
    /// Orders that reached CANCELLED in the window.
    pub cancelled: i64,
    pub accepted_per_second: f64,
    pub confirmed_per_second: f64,
    pub cancelled_per_second: f64,
    /// Acceptance to CONFIRMED of the orders confirmed in the window; null when none.
    pub e2e: Option<Latency>,
    /// Each step's latency: from the order's previous status to the step's status.
    pub steps: StepLatencies,
    /// Dead letters recorded in the window.
    pub dead_letters: i64,
    pub dead_letters_per_minute: f64,
    /// Ready messages per queue at the window's end; null when the broker could not be asked
    /// (and for backfilled samples).
    pub queues: Option<BTreeMap<String, i64>>,
    /// The sum of `queues`.
    pub queue_depth: Option<i64>,
    /// Rebuilt from history when the API started, not sampled live.
    pub backfilled: bool,
}

/// Percentiles in whole milliseconds (rounded) over `count` orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    pub count: i64,
    pub p50_ms: i64,
    pub p99_ms: i64,
}

/// Per step; null when no order took the step in the window.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepLatencies {
    /// PENDING to STOCK_RESERVED.
    pub stock_reserved: Option<Latency>,
    /// STOCK_RESERVED to COUPON_APPLIED.
    pub coupon_applied: Option<Latency>,
    /// STOCK_RESERVED or COUPON_APPLIED to PAID.
    pub paid: Option<Latency>,
    /// PAID to CONFIRMED.
    pub confirmed: Option<Latency>,
}

/// The samples of the last hour, oldest first; shared through `AppState`.
#[derive(Debug)]
pub struct Trends {
    interval: Duration,
    capacity: usize,
    samples: Mutex<VecDeque<TrendSample>>,
}

impl Trends {
    pub fn new(interval: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let capacity = HOUR.as_millis().div_ceil(interval.as_millis()) as usize;
        Self {
            interval,
            capacity,
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many samples the hour holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The samples whose window ends within the hour before the newest one's end, oldest first.
    pub fn snapshot(&self) -> Vec<TrendSample> {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(newest) = samples.back().map(|s| s.end) else {
            return Vec::new();
        };
        let since = newest - chrono::Duration::from_std(HOUR).unwrap_or_default();
        samples.iter().filter(|s| s.end > since).cloned().collect()
    }

    fn push(&self, sample: TrendSample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        while samples.len() >= self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

/// Samples every `trends.interval()` until `shutdown`: first the window's start (now, on the
/// database's clock) and the backfill, then one sample per tick. A failed sample is logged and
/// its window joins the next one (the sums stay exact).
pub async fn run(trends: Arc<Trends>, pool: PgPool, queues: Arc<QueueStats>, shutdown: CancellationToken) {
    let interval = trends.interval();
    let body = async {
        let mut start = loop {
            match kept::answered_query(settled_until(&pool, None)).await {
                Ok(t) => break t,
                Err(err) => {
                    tracing::warn!(error = %err, "trend sampler: cannot read the database's clock");
                    tokio::time::sleep(interval).await;
                }
            }
        };
        // An hour of history: longer than one sample may take, but not without end.
        if let Err(err) =
            kept::answered_within(READ_DEADLINE, async { Ok(backfill(&trends, &pool, start).await?) }).await
        {
            tracing::warn!(error = %err, "trend sampler: backfill failed; the charts start empty");
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // A sample that times out joins its window to the next, which must not time out
            // for that in turn: the history reads' bound, far above a sample's own time.
            let sample = kept::answered_within(READ_DEADLINE, async { Ok(sample_database(&pool, start).await?) });
            let (sample, queues) = tokio::join!(sample, queues.read());
            match sample {
                Ok(mut sample) => {
                    if let Ok(queues) = queues {
                        let depths: BTreeMap<String, i64> =
                            queues.into_iter().map(|q| (q.name, i64::from(q.messages))).collect();
                        sample.queue_depth = Some(depths.values().sum());
                        sample.queues = Some(depths);
                    }
                    start = sample.end;
                    trends.push(sample);
                }
                Err(err) => tracing::warn!(error = %err, "trend sampler: sample failed"),
            }
        }
    };
    tokio::select! {
        () = body => {}
        () = shutdown.cancelled() => {}
    }
}

/// Counts and percentiles of `[$1, $2)`, per bucket of `$3` ms from `$1` (`$3` = 0: one bucket,
/// 0). One statement: the window's status rows are read once (BRIN on `at`), each step row
/// finds its order's previous row by a backward probe of `(order_id, id)`, each confirmed
/// order its `created_at` by primary key; dead letters through the BRIN on `recorded_at`.
/// Rows: (bucket, kind, n, p50 ms, p99 ms); kinds `COUNT_<status>`, `STEP_<status>`, `E2E`,
/// `DEAD_LETTERS`.
const WINDOW: &str = "
WITH w AS MATERIALIZED (
    SELECT h.id, h.order_id, h.to_status, h.at,
           CASE WHEN $3 > 0 THEN floor(extract(epoch FROM h.at - $1) * 1000 / $3)::int4 ELSE 0 END AS b
    FROM order_status_history h
    WHERE h.at >= $1 AND h.at < $2
), timed AS (
    SELECT w.b, 'STEP_' || w.to_status AS kind, extract(epoch FROM w.at - p.at)::float8 * 1000 AS ms
    FROM w CROSS JOIN LATERAL (
        SELECT q.at FROM order_status_history q
        WHERE q.order_id = w.order_id AND q.id < w.id
        ORDER BY q.id DESC LIMIT 1
    ) p
    WHERE w.to_status IN ('STOCK_RESERVED', 'COUPON_APPLIED', 'PAID', 'CONFIRMED')
    UNION ALL
    SELECT w.b, 'E2E', extract(epoch FROM w.at - o.created_at)::float8 * 1000
    FROM w JOIN orders o ON o.id = w.order_id
    WHERE w.to_status = 'CONFIRMED'
)
SELECT b, kind, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
FROM timed GROUP BY b, kind
UNION ALL
SELECT b, 'COUNT_' || to_status, count(*), NULL, NULL
FROM w WHERE to_status IN ('PENDING', 'CONFIRMED', 'CANCELLED') GROUP BY b, to_status
UNION ALL
SELECT CASE WHEN $3 > 0 THEN floor(extract(epoch FROM d.recorded_at - $1) * 1000 / $3)::int4 ELSE 0 END,
       'DEAD_LETTERS', count(*), NULL, NULL
FROM dead_letters d WHERE d.recorded_at >= $1 AND d.recorded_at < $2 GROUP BY 1";

#[derive(sqlx::FromRow)]
struct WindowRow {
    b: i32,
    kind: String,
    n: i64,
    p50: Option<f64>,
    p99: Option<f64>,
}

async fn sample_database(pool: &PgPool, start: DateTime<Utc>) -> sqlx::Result<TrendSample> {
    summarize(pool).await;
    let end = settled_until(pool, Some(start)).await?;
    let rows: Vec<WindowRow> = sqlx::query_as(WINDOW)
        .bind(start)
        .bind(end)
        .bind(0_f64)
        .fetch_all(pool)
        .await?;
    Ok(build(start, end, rows.iter(), false))
}

/// The hour before `end` from history, one sample per interval from the first with any status
/// change; nothing when the hour holds more than [`BACKFILL_MAX_ROWS`].
async fn backfill(trends: &Trends, pool: &PgPool, end: DateTime<Utc>) -> sqlx::Result<()> {
    let width = chrono::Duration::from_std(trends.interval).unwrap_or(chrono::Duration::seconds(10));
    let from = end - width * trends.capacity as i32;
    summarize(pool).await;
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM order_status_history WHERE at >= $1 AND at < $2 LIMIT $3) s",
    )
    .bind(from)
    .bind(end)
    .bind(BACKFILL_MAX_ROWS + 1)
    .fetch_one(pool)
    .await?;
    if rows > BACKFILL_MAX_ROWS {
        tracing::info!(
            rows,
            "trend sampler: the last hour is too busy to backfill; the charts start now"
        );
        return Ok(());
    }
    let found: Vec<WindowRow> = sqlx::query_as(WINDOW)
        .bind(from)
        .bind(end)
        .bind(width.num_milliseconds() as f64)
        .fetch_all(pool)
        .await?;
    let Some(first) = found.iter().map(|r| r.b).min() else {
        return Ok(());
    };
    let last = trends.capacity as i32 - 1;
    for b in first.max(0)..=last {
        let start = from + width * b;
        let stop = if b == last { end } else { start + width };
        trends.push(build(start, stop, found.iter().filter(|r| r.b == b), true));
    }
    Ok(())
}

fn build<'a>(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    rows: impl Iterator<Item = &'a WindowRow>,
    backfilled: bool,
) -> TrendSample {
    let seconds = (end - start).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let per_second = |n: i64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    let mut sample = TrendSample {
        start,
        end,
        accepted: 0,
        confirmed: 0,
        cancelled: 0,
        accepted_per_second: 0.0,
        confirmed_per_second: 0.0,
        cancelled_per_second: 0.0,
        e2e: None,
        steps: StepLatencies::default(),
        dead_letters: 0,
        dead_letters_per_minute: 0.0,
        queues: None,
        queue_depth: None,
        backfilled,
    };
    for row in rows {
        let latency = match (row.p50, row.p99) {
            (Some(p50), Some(p99)) => Some(Latency {
                count: row.n,
                p50_ms: p50.round() as i64,
                p99_ms: p99.round() as i64,
            }),
            _ => None,
        };
        match row.kind.as_str() {
            "COUNT_PENDING" => sample.accepted = row.n,
            "COUNT_CONFIRMED" => sample.confirmed = row.n,
            "COUNT_CANCELLED" => sample.cancelled = row.n,
            "DEAD_LETTERS" => sample.dead_letters = row.n,
            "E2E" => sample.e2e = latency,
            "STEP_STOCK_RESERVED" => sample.steps.stock_reserved = latency,
            "STEP_COUPON_APPLIED" => sample.steps.coupon_applied = latency,
            "STEP_PAID" => sample.steps.paid = latency,
            "STEP_CONFIRMED" => sample.steps.confirmed = latency,
            _ => {}
        }
    }
    sample.accepted_per_second = per_second(sample.accepted);
    sample.confirmed_per_second = per_second(sample.confirmed);
    sample.cancelled_per_second = per_second(sample.cancelled);
    sample.dead_letters_per_minute = per_second(sample.dead_letters) * 60.0;
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    #[test]
    fn the_hour_is_kept_and_no_more() {
        let trends = Trends::new(Duration::from_secs(10));
        assert_eq!(trends.capacity(), 360);
        assert_eq!(Trends::new(Duration::from_millis(700)).capacity(), 5143);
        for i in 0..400 {
            trends.push(build(at(i * 10), at(i * 10 + 10), std::iter::empty(), false));
        }
        let samples = trends.snapshot();
        assert_eq!(samples.len(), 360);
        assert_eq!(samples[0].start, at(400));
        assert_eq!(samples[359].end, at(4000));
    }

    #[test]
    fn rates_come_from_the_window_length() {
        let rows = [
            WindowRow {
                b: 0,
                kind: "COUNT_PENDING".into(),
                n: 20,
                p50: None,
                p99: None,
            },
            WindowRow {
                b: 0,
                kind: "DEAD_LETTERS".into(),
                n: 2,
                p50: None,
                p99: None,
            },
            WindowRow {
                b: 0,
                kind: "E2E".into(),
                n: 3,
                p50: Some(12.4),
                p99: Some(30.6),
            },
        ];
        let sample = build(at(0), at(10), rows.iter(), false);
        assert_eq!(sample.accepted, 20);
        assert!((sample.accepted_per_second - 2.0).abs() < 1e-9);
        assert!((sample.dead_letters_per_minute - 12.0).abs() < 1e-9);
        assert_eq!(
            sample.e2e,
            Some(Latency {
                count: 3,
                p50_ms: 12,
                p99_ms: 31
            })
        );
        assert!(sample.steps.paid.is_none());
        let empty = build(at(5), at(5), std::iter::empty(), false);
        assert_eq!(empty.accepted_per_second, 0.0);
    }
}
