//! Reading the order status history by time, window after window, so each read costs what was
//! written since the last one, not the whole history. The dashboard's trends and the order
//! gauges both read it this way.
//!
//! Windows follow each other without gap or overlap, so sums over them are exact: a window ends
//! no later than the start of the oldest transaction that has written and not yet finished
//! ([`settled_until`]). A history row's `at` is `clock_timestamp()` at its insert and becomes
//! visible only at its commit; ending the window before any open writer began means no row
//! with an `at` inside it can still appear (the next window counts it). The reads go through
//! the BRIN index on `at` (migration `20261205000004`), kept summarized by [`summarize`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool, Postgres};
use tokio::{sync::Mutex, time::Instant};

use crate::domain::OrderStatus;

/// A transaction that has written and stayed open longer than this no longer holds back the
/// windows' end (an idle-in-transaction session would stop the windows): rows it commits later
/// with an earlier `at` are then left out (of [`StatusCounts`] until its next full count).
pub const MAX_SETTLE: Duration = Duration::from_secs(30);

/// How long [`StatusCounts`] goes on from one full count before the next read counts in full
/// again. What the windows cannot see is corrected within it: a writer open longer than
/// [`MAX_SETTLE`], writers of another role (their transactions are not shown to this one), a
/// clock that stepped back (a failover to a host whose clock is behind), rows changed by hand.
/// At a million orders a full count is about a quarter of a second of CPU.
pub const RECOUNT_AFTER: Duration = Duration::from_secs(600);

/// The end of the next window: now, or the start of the oldest transaction of this database
/// that has written (it has a transaction id) and not finished, if earlier, but never more than
/// [`MAX_SETTLE`] ago, nor before `start`. Needs the sessions' `xact_start`, which PostgreSQL
/// shows for sessions of the same role (or with pg_read_all_stats): orderflow's processes
/// share one role.
const SETTLED_UNTIL: &str = "SELECT greatest($1, least(clock_timestamp(), greatest(
         clock_timestamp() - $2 * interval '1 millisecond',
         COALESCE((SELECT min(xact_start) FROM pg_stat_activity
                   WHERE datname = current_database() AND backend_xid IS NOT NULL
                     AND pid <> pg_backend_pid()), clock_timestamp()))))";

/// See [`SETTLED_UNTIL`]: every status row with an `at` before the returned time is committed
/// (or rolled back) already, so a window ending there is final. Never before `start`.
pub async fn settled_until<'e>(db: impl PgExecutor<'e>, start: Option<DateTime<Utc>>) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar(SETTLED_UNTIL)
        .bind(start)
        .bind(MAX_SETTLE.as_millis() as f64)
        .fetch_one(db)
        .await
}

/// Brings the BRIN indexes' summaries (status history's `at`, dead letters' `recorded_at`) up
/// to the tables' end. With autovacuum on, `autosummarize` does it as each range fills; with it
/// off (this project's machines) nothing would, and a BRIN scan reads every unsummarized range,
/// so the windows' reads would grow back to the whole table. Only ranges not yet summarized are
/// read, so each call costs what was written since the last. Best effort: a lock held by
/// ANALYZE or VACUUM, or a role that does not own the tables, only costs this read a wider scan.
pub async fn summarize<'a>(db: impl Acquire<'a, Database = Postgres>) {
    let run = async {
        let mut tx = db.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '200ms'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "SELECT brin_summarize_new_values('order_status_history_at_brin'),
                    brin_summarize_new_values('dead_letters_recorded_at_brin')",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    };
    if let Err(err) = run.await {
        tracing::debug!(error = %err, "BRIN summarization skipped");
    }
}

/// Orders per status now, as `SELECT status, count(*) FROM orders GROUP BY status` would count
/// them in one snapshot, without reading every order the shop ever took each time (at a million
/// orders that statement cost 224-250 ms of CPU, 120-170 ms of wall time with two parallel
/// workers; the gauges ran it every 5 s and the dashboard every 2 s while open). Orders in
/// flight are counted through the in-flight index. Ended orders (CONFIRMED, CANCELLED: an order
/// ends once, with one status row) are counted in full by one read every [`RECOUNT_AFTER`], up
/// to a settled time ([`settled_until`]); each read between moves that time on over the status
/// rows written since (a BRIN range or two), and adds the ended rows past it that its snapshot
/// already sees. Exact as long as the windows see every ended row ([`RECOUNT_AFTER`] says when
/// they may not). Shared by whoever reports the counts (the gauges, the dashboard's overview);
/// reads take turns.
#[derive(Debug)]
pub struct StatusCounts {
    ended: Mutex<Option<Ended>>,
    recount_after: Duration,
}

impl Default for StatusCounts {
    /// Counts in full again every [`RECOUNT_AFTER`].
    fn default() -> Self {
        Self::recounting_after(RECOUNT_AFTER)
    }
}

/// Ended orders whose status row's `at` is before `upto`, counted in full at `counted`.
#[derive(Debug, Clone, Copy)]
struct Ended {
    counted: Instant,
    upto: DateTime<Utc>,
    confirmed: i64,
    cancelled: i64,
}

/// One statement, so one snapshot: orders in flight per status (`IN_FLIGHT`), ended status rows
/// of `[$1, $2)` (`SETTLED`) and those from `$2` on that this snapshot sees (`LATE`).
const COUNTS: &str = "
SELECT 'IN_FLIGHT' AS part, status, count(*) AS n FROM orders WHERE in_flight GROUP BY status
UNION ALL
SELECT CASE WHEN at < $2 THEN 'SETTLED' ELSE 'LATE' END, to_status, count(*)
FROM order_status_history WHERE at >= $1 AND to_status IN ('CONFIRMED', 'CANCELLED') GROUP BY 1, 2";

impl StatusCounts {
    /// Counts ended orders in full at the first read and again once `recount_after` has passed
    /// since the last full count (the default is [`RECOUNT_AFTER`]).
    pub fn recounting_after(recount_after: Duration) -> Self {
        Self {
            ended: Mutex::new(None),
            recount_after,
        }
    }

    /// Every status with its count (0 when none), in [`OrderStatus::ALL`]'s order. On one
    /// connection of `pool`, so a database that cannot be reached fails it once, after the
    /// pool's acquire timeout; one that stops answering, after [`READ_DEADLINE`] (every other
    /// reader waits for this one meanwhile: the gauges' sampler, the overview).
    pub async fn read(&self, pool: &PgPool) -> sqlx::Result<Vec<(OrderStatus, i64)>> {
        let mut kept = self.ended.lock().await;
        match tokio::time::timeout(READ_DEADLINE, self.read_locked(&mut kept, pool)).await {
            Ok(read) => read,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the database did not answer the order counts in time",
            ))),
        }
    }

    async fn read_locked(&self, kept: &mut Option<Ended>, pool: &PgPool) -> sqlx::Result<Vec<(OrderStatus, i64)>> {
        let mut conn = pool.acquire().await?;
        summarize(&mut *conn).await;
        let mut ended = match *kept {
            Some(ended) if ended.counted.elapsed() < self.recount_after => ended,
            _ => Ended::count(&mut conn).await?,
        };
        let settled = settled_until(&mut *conn, Some(ended.upto)).await?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(COUNTS)
            .bind(ended.upto)
            .bind(settled)
            .fetch_all(&mut *conn)
            .await?;
        let sum = |part: &str, status: OrderStatus| {
            rows.iter()
                .filter(|(p, s, _)| p == part && s == status.as_str())
                .map(|(_, _, n)| n)
                .sum::<i64>()
        };
        ended.confirmed += sum("SETTLED", OrderStatus::Confirmed);
        ended.cancelled += sum("SETTLED", OrderStatus::Cancelled);
        ended.upto = settled;
        *kept = Some(ended);
        Ok(OrderStatus::ALL
            .iter()
            .map(|&status| {
                let n = match status {
                    OrderStatus::Confirmed => ended.confirmed + sum("LATE", status),
                    OrderStatus::Cancelled => ended.cancelled + sum("LATE", status),
                    _ => sum("IN_FLIGHT", status),
                };
                (status, n)
            })
            .collect())
    }
}

/// How long a read over the whole history waits for its answers ([`StatusCounts::read`], the
/// dashboard's trend samples): the full count of ended orders reads every order (a quarter of a
/// second of PostgreSQL's CPU at a million orders), so more than a transaction's
/// [`super::kept::ANSWER_DEADLINE`], lest a large shop's read never finish.
pub const READ_DEADLINE: Duration = Duration::from_secs(60);

impl Ended {
    /// Counts every ended order (a full read of `orders`) and takes away those whose status row
    /// is at or after the settled time, which later reads count: one statement, so both counts
    /// see the same snapshot.
    async fn count(conn: &mut PgConnection) -> sqlx::Result<Self> {
        let counted = Instant::now();
        let upto = settled_until(&mut *conn, None).await?;
        let (confirmed, cancelled): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders WHERE status = 'CONFIRMED') - late.confirmed,
                    (SELECT count(*) FROM orders WHERE status = 'CANCELLED') - late.cancelled
             FROM (SELECT count(*) FILTER (WHERE to_status = 'CONFIRMED') AS confirmed,
                          count(*) FILTER (WHERE to_status = 'CANCELLED') AS cancelled
                   FROM order_status_history WHERE at >= $1 AND to_status IN ('CONFIRMED', 'CANCELLED')) late",
        )
        .bind(upto)
        .fetch_one(&mut *conn)
        .await?;
        Ok(Self {
            counted,
            upto,
            confirmed,
            cancelled,
        })
    }
}
