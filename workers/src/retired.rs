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
//!   popular-products projection is rebuilt from the confirmed orders, in one transaction that
//!   locks the projection, so counts committed meanwhile are neither lost nor doubled.

use std::time::Duration;

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
    let products = rebuild_sales(pool).await?;
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
        products,
        "retired queue deleted; the popular-products projection was rebuilt from the confirmed orders"
    );
    Ok(Some(SALES_QUEUE))
}

/// Longest the rebuild may hold the projection's lock (and so hold back confirmations, which
/// wait for it): past it the server cancels the rebuild, which is tried again at the next look.
/// The same bound, with a margin, on the client's wait, for a primary that stops answering.
pub const REBUILD_DEADLINE: Duration = Duration::from_secs(60);

/// Rebuilds `product_sales_hourly` from the CONFIRMED orders (units per product, per hour of
/// confirmation), in one transaction. The lock keeps the order worker's increments out while it
/// runs (they wait, then add to the rebuilt rows): an order confirmed meanwhile is either in
/// the snapshot the rebuild reads or added after it, never both. Returns the products counted.
///
/// # Errors
/// `Unavailable` if the database did not finish within [`REBUILD_DEADLINE`] (nothing changed),
/// or the database's error.
pub async fn rebuild_sales(pool: &PgPool) -> Result<u64> {
    kept::answered_within(REBUILD_DEADLINE + Duration::from_secs(10), async {
        let mut tx = pool.begin().await?;
        // The lock is taken only if it comes within 2 s (confirmations queue behind a waiter).
        sqlx::query("SELECT set_config('lock_timeout', '2s', true), set_config('statement_timeout', $1, true)")
            .bind(format!("{}s", REBUILD_DEADLINE.as_secs()))
            .execute(&mut *tx)
            .await?;
        let counted = rebuild_in(&mut tx).await?;
        tx.commit().await?;
        Ok(counted)
    })
    .await
}

async fn rebuild_in(tx: &mut sqlx::PgConnection) -> sqlx::Result<u64> {
    sqlx::query("LOCK TABLE product_sales_hourly IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM product_sales_hourly")
        .execute(&mut *tx)
        .await?;
    let counted = sqlx::query(
        "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
         SELECT i.product_id, date_trunc('hour', h.at), sum(i.quantity)
         FROM orders o
         JOIN order_items i ON i.order_id = o.id
         JOIN order_status_history h ON h.order_id = o.id AND h.to_status = 'CONFIRMED'
         WHERE o.status = 'CONFIRMED'
         GROUP BY 1, 2",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(counted)
}
