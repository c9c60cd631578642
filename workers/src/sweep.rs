//! The recovery sweep: a periodic, database-timed safety net behind the deadline messages.
//! It cancels in-flight orders past their deadline whose deadline message was lost, and
//! re-drives cancellations that made no progress for a whole ORDER_TIMEOUT (re-sending a
//! compensation is harmless: every compensation is guarded by what the order still holds).
//! `FOR NO KEY UPDATE SKIP LOCKED` lets several recovery workers sweep at once.

use std::time::Duration;

use orderflow_shared::{
    Result,
    db::{
        kept,
        orders::{OrderRow, Transitions},
        outbox,
    },
    domain::{CancelReason, OrderStatus},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Orders handled per sweep transaction.
const BATCH: i64 = 200;

pub async fn run(
    pool: PgPool,
    interval: Duration,
    order_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        if let Err(err) = prune(&pool, (interval / 2).min(PRUNE_BUDGET)).await {
            tracing::warn!(error = %err, "pruning old bookkeeping failed; will retry next interval");
        }
        match sweep(&pool, order_timeout, (interval / 2).min(PRUNE_BUDGET)).await {
            Ok(n) if n.timed_out + n.redriven > 0 => {
                tracing::warn!(
                    timed_out = n.timed_out,
                    redriven = n.redriven,
                    "sweep acted on stuck orders"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "sweep failed; will retry next interval"),
        }
    }
    tracing::info!("sweep stopped");
    Ok(())
}

/// Rows removed per table per statement: small batches keep each delete (and the locks and
/// WAL it holds) short.
const PRUNE_BATCH: i64 = 5_000;
/// Longest a pass prunes (and at most half the sweep interval): the sweep's own work, and a
/// shutdown, wait for it.
const PRUNE_BUDGET: Duration = Duration::from_secs(5);

/// Deletes bookkeeping nobody can need any more: idempotency keys older than 48 hours (the
/// promise is at least 24), outbox rows published or discarded over a day ago, inbox records older than
/// 7 days (a redelivery that late cannot happen: RabbitMQ redelivers on reconnect, and the
/// delivery limit caps attempts), delivery failures older than 7 days (their dead letters
/// were recorded long before). Safe with several recovery workers. Returns how many rows it
/// removed.
///
/// It takes [`PRUNE_BATCH`] rows from each table in turn, and goes round again while a table
/// had a full batch, for at most `budget` (the sweep gives it half its interval, at most
/// [`PRUNE_BUDGET`]): so it keeps
/// pace with any rate at which rows come due that the database can delete within that time,
/// instead of at most one batch per table per pass (500 rows a second at the default 10 s,
/// less than a shop at a few hundred orders a second writes).
pub async fn prune(pool: &PgPool, budget: Duration) -> Result<u64> {
    let mut removed = 0;
    while_full(
        budget,
        || kept::answered(prune_once(pool)),
        |(n, full)| {
            removed += n;
            full
        },
    )
    .await?;
    Ok(removed)
}

/// One batch from each table: (rows removed, whether a table had a whole batch due).
async fn prune_once(pool: &PgPool) -> Result<(u64, bool)> {
    let (mut removed, mut full) = (0, false);
    for sql in PRUNE {
        let n = sqlx::query(sql).bind(PRUNE_BATCH).execute(pool).await?.rows_affected();
        removed += n;
        full |= n >= PRUNE_BATCH as u64;
    }
    Ok((removed, full))
}

/// Runs `pass` again while `add` (given each pass's result) says it found a whole batch, so
/// more may be due, for at most `budget` (at least one pass).
async fn while_full<T, F: Future<Output = Result<T>>>(
    budget: Duration,
    mut pass: impl FnMut() -> F,
    mut add: impl FnMut(T) -> bool,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    while add(pass().await?) && started.elapsed() < budget {}
    Ok(())
}

/// One batch of [`prune`] per table (`$1`: at most how many rows).
const PRUNE: [&str; 5] = [
    "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM idempotency_keys WHERE created_at < now() - interval '48 hours' LIMIT $1))",
    "DELETE FROM outbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM outbox WHERE sent_at < now() - interval '1 day' LIMIT $1))",
    "DELETE FROM outbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM outbox WHERE discarded_at < now() - interval '1 day' LIMIT $1))",
    "DELETE FROM inbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM inbox WHERE processed_at < now() - interval '7 days' LIMIT $1))",
    "DELETE FROM delivery_failures WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM delivery_failures WHERE failed_at < now() - interval '7 days' LIMIT $1))",
];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub timed_out: usize,
    pub redriven: usize,
}

/// Passes of [`sweep_once`] while the last one found a whole batch to do, for at most
/// `budget` (the sweep gives it half its interval, at most [`PRUNE_BUDGET`]): when the deadline
/// messages fail (a blocked deadline queue, a broker that lost them), the sweep cancels orders
/// as fast as they come due, not [`BATCH`] per interval (20 a second at the default 10 s).
/// Returns what it did in all.
pub async fn sweep(pool: &PgPool, order_timeout: Duration, budget: Duration) -> Result<Swept> {
    let mut total = Swept::default();
    while_full(
        budget,
        || kept::answered(sweep_once(pool, order_timeout)),
        |pass| {
            total.timed_out += pass.timed_out;
            total.redriven += pass.redriven;
            pass.timed_out.max(pass.redriven) >= BATCH as usize
        },
    )
    .await?;
    Ok(total)
}

/// One pass; returns what it did.
pub async fn sweep_once(pool: &PgPool, order_timeout: Duration) -> Result<Swept> {
    let mut swept = Swept::default();
    let mut tx = pool.begin().await?;
    let overdue: Vec<OrderRow> = sqlx::query_as(
        "SELECT * FROM orders WHERE in_flight AND status = ANY($1) AND deadline_at < now()
         ORDER BY deadline_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(OrderStatus::CANCELLABLE.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let mut moves = Transitions::new();
    swept.timed_out = overdue.len();
    for order in overdue {
        moves.cancel(order, CancelReason::Timeout)?;
    }
    let stalled: Vec<OrderRow> = sqlx::query_as(
        "SELECT * FROM orders WHERE in_flight AND status = 'CANCELLING' AND updated_at < now() - $1 * interval '1 millisecond'
         ORDER BY updated_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(order_timeout.as_millis() as f64)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    swept.redriven = stalled.len();
    for order in stalled {
        // Unchanged holdings, a fresh updated_at: the next re-drive waits a whole timeout.
        moves.compensated(order);
    }
    moves.apply(&mut tx).await?;
    tx.commit().await?;
    outbox::committed();
    Ok(swept)
}
