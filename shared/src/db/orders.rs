//! Orders: guarded state transitions with history, and the compensation chain.
//!
//! Every transition is guarded by the expected status. A step first locks the order row
//! (`lock`), which serialises it against recovery and admin cancel; zero rows means the
//! message is late or duplicated and the caller changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::outbox::{self, OutboxMessage};
use crate::{
    Result,
    domain::{CancelReason, OrderStatus},
    messaging::MessageType,
    telemetry::TraceParent,
};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRow {
    pub id: Uuid,
    pub user_id: i64,
    #[sqlx(try_from = "String")]
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub coupon_id: Option<i64>,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub paid_amount: i64,
    pub stock_held: bool,
    pub coupon_held: bool,
    pub trace_parent: Option<String>,
    pub deadline_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl OrderRow {
    pub fn trace(&self) -> Option<TraceParent> {
        self.trace_parent.as_deref().and_then(TraceParent::parse)
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub product_id: i64,
    pub quantity: i32,
    pub unit_price: i64,
}

fn names(statuses: &[OrderStatus]) -> Vec<&'static str> {
    statuses.iter().map(|s| s.as_str()).collect()
}

/// Locks the order if it is in one of the `expected` states.
pub async fn lock(conn: &mut PgConnection, id: Uuid, expected: &[OrderStatus]) -> Result<Option<OrderRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM orders WHERE id = $1 AND status = ANY($2) FOR UPDATE")
            .bind(id)
            .bind(names(expected))
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn items(conn: &mut PgConnection, id: Uuid) -> Result<Vec<ItemRow>> {
    Ok(sqlx::query_as(
        "SELECT product_id, quantity, unit_price FROM order_items WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(id)
    .fetch_all(conn)
    .await?)
}

/// Moves a locked order from its current status to `to`, with a history row. The order's
/// holdings (`stock_held`, `coupon_held`, `paid_amount`, `discount_amount`) are written from
/// `order` in the same statement, so a step records its effect and its transition at once.
pub async fn set_status(
    conn: &mut PgConnection,
    order: &OrderRow,
    to: OrderStatus,
    reason: Option<CancelReason>,
) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE orders SET status = $3, reason = COALESCE($4, reason), stock_held = $5, coupon_held = $6,
                           paid_amount = $7, discount_amount = $8, updated_at = now()
         WHERE id = $1 AND status = $2",
    )
    .bind(order.id)
    .bind(order.status.as_str())
    .bind(to.as_str())
    .bind(reason.map(CancelReason::as_str))
    .bind(order.stock_held)
    .bind(order.coupon_held)
    .bind(order.paid_amount)
    .bind(order.discount_amount)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(anyhow::anyhow!("order {} left {} while locked", order.id, order.status).into());
    }
    record_history(conn, order.id, Some(order.status), to, reason).await
}

pub async fn record_history(
    conn: &mut PgConnection,
    id: Uuid,
    from: Option<OrderStatus>,
    to: OrderStatus,
    reason: Option<CancelReason>,
) -> Result<()> {
    sqlx::query("INSERT INTO order_status_history (order_id, from_status, to_status, reason) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(from.map(OrderStatus::as_str))
        .bind(to.as_str())
        .bind(reason.map(CancelReason::as_str))
        .execute(conn)
        .await?;
    Ok(())
}

/// The next compensation a CANCELLING order needs, driven by what it still holds:
/// refund if paid, then restore the coupon, then release stock, then finish.
pub fn next_compensation(order: &OrderRow) -> MessageType {
    if order.paid_amount > 0 {
        MessageType::PaymentRefund
    } else if order.coupon_held {
        MessageType::CouponRestore
    } else if order.stock_held {
        MessageType::StockRelease
    } else {
        MessageType::OrderFinishCancel
    }
}

/// Records what a CANCELLING order still holds after a compensation (or re-drives it
/// unchanged) and enqueues the next compensation.
pub async fn compensated(conn: &mut PgConnection, order: &OrderRow) -> Result<()> {
    sqlx::query(
        "UPDATE orders SET stock_held = $2, coupon_held = $3, paid_amount = $4, updated_at = now()
         WHERE id = $1 AND status = 'CANCELLING'",
    )
    .bind(order.id)
    .bind(order.stock_held)
    .bind(order.coupon_held)
    .bind(order.paid_amount)
    .execute(&mut *conn)
    .await?;
    continue_compensation(conn, order).await
}

/// Enqueues the next compensation step for a CANCELLING order.
pub async fn continue_compensation(conn: &mut PgConnection, order: &OrderRow) -> Result<()> {
    let next = OutboxMessage::command(next_compensation(order), order.id, order.trace())?;
    outbox::enqueue(conn, &[next]).await
}

/// Moves a locked, cancellable order to CANCELLING with `reason` and starts compensation.
pub async fn cancel_locked(conn: &mut PgConnection, order: &OrderRow, reason: CancelReason) -> Result<()> {
    set_status(conn, order, OrderStatus::Cancelling, Some(reason)).await?;
    continue_compensation(conn, order).await
}

/// Cancels the order if it is still cancellable (recovery, admin). Returns false when the
/// order is already terminal, cancelling, or missing.
pub async fn cancel(conn: &mut PgConnection, id: Uuid, reason: CancelReason) -> Result<bool> {
    match lock(conn, id, OrderStatus::CANCELLABLE).await? {
        Some(order) => {
            cancel_locked(conn, &order, reason).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}
