//! Queues an earlier release declared and this one no longer consumes, retired so that an
//! upgrade strands nothing: a retired queue still bound to its exchange keeps receiving
//! messages nobody reads, and whatever it held when its consumers went away is work that was
//! never done.
//!
//! Each retired queue names how its work is redone by this release. The recovery worker looks
//! for them at start and every [`LOOK_EVERY`]: a retired queue that still has consumers (the
//! earlier release's processes, during a rolling update) is left alone; one without is
//! retired: its work redone, then the queue deleted.
//!
//! - `orderflow.sales` (until 2026-11-24's batched pipeline): `order.confirmed` copies for the
//!   `sales` worker, which counted popular products. The order worker now counts them in the
//!   transaction that confirms the order, so the copies left in the queue are of orders
//!   confirmed by the earlier order worker that were never counted. Redone: the
//!   popular-products projection is rebuilt from the confirmed orders ([`rebuild_sales`]), so
//!   counts committed meanwhile are neither lost nor doubled, holding confirmations back only
//!   while the last two hours are recounted.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{
    Connection,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use orderflow_shared::{Result, db::kept};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the recovery worker looks for retired queues after its start.
pub const LOOK_EVERY: Duration = Duration::from_secs(300);

/// The sales worker's queue (retired with the batched pipeline).
pub const SALES_QUEUE: &str = "orderflow.sales";

/// Looks for retired queues now and every [`LOOK_EVERY`] until `shutdown`.
pub async fn run(amqp_url: String, pool: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        if let Err(err) = retire_all(&amqp_url, &pool).await {
            tracing::warn!(error = %format!("{err:#}"), "could not look for retired queues; will look again");
        }
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// One look: retires every retired queue that exists and has no consumer. Returns the queues
/// it retired.
pub async fn retire_all(amqp_url: &str, pool: &PgPool) -> anyhow::Result<Vec<&'static str>> {
    let conn = orderflow_shared::messaging::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let result = retire_sales(&conn, pool).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(result?.into_iter().collect())
}

async fn retire_sales(conn: &Connection, pool: &PgPool) -> anyhow::Result<Option<&'static str>> {
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = match channel
        .queue_declare(SALES_QUEUE.into(), passive, FieldTable::default())
        .await
    {
        Ok(queue) => queue,
        // Not there (the usual case): the broker closed the channel with 404.
        Err(err) if err.is_amqp_soft_error() => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if queue.consumer_count() > 0 {
        tracing::info!(
            queue = SALES_QUEUE,
            consumers = queue.consumer_count(),
            "a retired queue still has consumers (an earlier release runs beside this one); left for now"
        );
        let _ = channel.close(200, "bye".into()).await;
        return Ok(None);
    }
    let stranded = queue.message_count();
    let buckets = rebuild_sales(pool).await?;
    channel
        .queue_delete(
            SALES_QUEUE.into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await?;
    let _ = channel.close(200, "bye".into()).await;
    tracing::info!(
        queue = SALES_QUEUE,
        stranded,
        buckets,
        "retired queue deleted; the popular-products projection was rebuilt from the confirmed orders"
    );
    Ok(Some(SALES_QUEUE))
}

/// Longest the rebuild's recount of the last hours may take (its statements' timeout, the
/// lock's 2 s wait aside): confirmations wait for its lock, and one that waits past the order
/// step's answer deadline (10 s, `kept::ANSWER_DEADLINE`) is given up and retried. Past it the
/// server cancels the rebuild, which is tried again at the next look.
pub const LOCKED_DEADLINE: Duration = Duration::from_secs(6);

/// Longest the rebuild of past hours may take (it holds back no confirmation: a long history
/// may take minutes).
pub const PAST_DEADLINE: Duration = Duration::from_secs(600);

/// Rebuilds `product_sales_hourly` from the CONFIRMED orders (units per product, per hour of
/// confirmation). Returns the buckets written.
///
/// In two transactions, so that confirmations are held back only while the last hours are
/// recounted, not the whole history: the hours before the last two without a lock on the
/// projection, then the last two under it. The lock keeps the order worker's increments out
/// while it runs (they wait, then add to the rebuilt rows): an order confirmed meanwhile is
/// either in the snapshot the rebuild reads or added after it, never both. The order worker
/// adds to the hour of its own clock, so this holds while the workers' clocks are within an
/// hour of the database's (one further behind could add to an hour being rebuilt unlocked, and
/// be counted twice).
///
/// # Errors
/// `Unavailable` if the database did not finish within [`PAST_DEADLINE`] or
/// [`LOCKED_DEADLINE`], or did not give the lock within 2 s; or the database's error. What
/// committed stays (the past hours, rebuilt right), the rest is rebuilt at the next look.
pub async fn rebuild_sales(pool: &PgPool) -> Result<u64> {
    let cut: DateTime<Utc> = kept::answered_query(
        sqlx::query_scalar("SELECT date_trunc('hour', now() - interval '1 hour')").fetch_one(pool),
    )
    .await?;
    let past = rebuild_hours(pool, Hours::Before, cut).await?;
    let recent = rebuild_hours(pool, Hours::From, cut).await?;
    Ok(past + recent)
}

/// Which hours of the projection a transaction rebuilds, on either side of a cut (the start
/// of an hour).
#[derive(Clone, Copy)]
enum Hours {
    /// Those before the cut, which no confirmation writes: without a lock.
    Before,
    /// The cut's and after, under the lock.
    From,
}

/// Rebuilds `hours` in one transaction: what is there deleted, then counted again from the
/// confirmed orders' status rows (an order counts in the hour its CONFIRMED row was written).
async fn rebuild_hours(pool: &PgPool, hours: Hours, cut: DateTime<Utc>) -> Result<u64> {
    let (deadline, compare, lock_within) = match hours {
        Hours::Before => (PAST_DEADLINE, "<", None),
        // The lock only if it comes within 2 s: confirmations queue behind a waiter.
        Hours::From => (LOCKED_DEADLINE, ">=", Some("2s")),
    };
    kept::answered_within(deadline + Duration::from_secs(10), async {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(format!("{}ms", deadline.as_millis()))
            .execute(&mut *tx)
            .await?;
        if let Some(within) = lock_within {
            sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                .bind(within)
                .execute(&mut *tx)
                .await?;
            sqlx::query("LOCK TABLE product_sales_hourly IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM product_sales_hourly WHERE bucket {compare} $1"
        )))
        .bind(cut)
        .execute(&mut *tx)
        .await?;
        let counted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
             SELECT i.product_id, date_trunc('hour', h.at), sum(i.quantity)
             FROM order_status_history h
             JOIN orders o ON o.id = h.order_id AND o.status = 'CONFIRMED'
             JOIN order_items i ON i.order_id = o.id
             WHERE h.to_status = 'CONFIRMED' AND h.at {compare} $1
             GROUP BY 1, 2"
        )))
        .bind(cut)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(counted)
    })
    .await
}
