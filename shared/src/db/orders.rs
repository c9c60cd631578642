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
    messaging::{MessageType, envelope::OrderCancelledData},
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

/// Locks the order if it is in one of the `expected` states (`FOR NO KEY UPDATE`: a step never
/// changes the key, and inserts that reference the order need not wait for it).
pub async fn lock(conn: &mut PgConnection, id: Uuid, expected: &[OrderStatus]) -> Result<Option<OrderRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM orders WHERE id = $1 AND status = ANY($2) FOR NO KEY UPDATE")
            .bind(id)
            .bind(names(expected))
            .fetch_optional(conn)
            .await?,
    )
}

/// Locks every one of `ids` that exists, in id order, whatever its status: the first lock a
/// transaction handling several orders takes, so that two such transactions (and any that
/// lock one order) always meet in the same order and cannot deadlock.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<()> {
    sqlx::query("SELECT 1 FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
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
/// `order` in the same statement, so a step records its effect and its transition at once;
/// the history row is written by that statement too (one round trip per transition).
pub async fn set_status(
    conn: &mut PgConnection,
    order: &OrderRow,
    to: OrderStatus,
    reason: Option<CancelReason>,
) -> Result<()> {
    let updated = sqlx::query(
        "WITH moved AS (
             UPDATE orders SET status = $3, reason = COALESCE($4, reason), stock_held = $5, coupon_held = $6,
                               paid_amount = $7, discount_amount = $8, updated_at = now()
             WHERE id = $1 AND status = $2
             RETURNING id
         )
         INSERT INTO order_status_history (order_id, from_status, to_status, reason)
         SELECT id, $2, $3, $4 FROM moved",
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

/// Whether the order holds nothing that a compensation would have to give back.
pub fn holds_nothing(order: &OrderRow) -> bool {
    !order.stock_held && !order.coupon_held && order.paid_amount == 0
}

/// Moves a locked, cancellable order to CANCELLING with `reason` and starts compensation.
/// An order that holds nothing has nothing to compensate: it goes on to CANCELLED in the same
/// transaction (both transitions recorded), which spares a message and a transaction for
/// every order refused before it took anything (out of stock, timed out while PENDING).
/// Returns the status the order is left in.
pub async fn cancel_locked(conn: &mut PgConnection, order: &OrderRow, reason: CancelReason) -> Result<OrderStatus> {
    set_status(conn, order, OrderStatus::Cancelling, Some(reason)).await?;
    if holds_nothing(order) {
        let cancelling = OrderRow {
            status: OrderStatus::Cancelling,
            reason: Some(reason.as_str().to_owned()),
            ..order.clone()
        };
        finish_cancel(conn, &cancelling).await?;
        return Ok(OrderStatus::Cancelled);
    }
    continue_compensation(conn, order).await?;
    Ok(OrderStatus::Cancelling)
}

/// Ends a CANCELLING order that holds nothing: CANCELLED, and `order.cancelled` for the data
/// platform (its id is fixed here, in the guarded transaction, so re-publishes keep it).
pub async fn finish_cancel(conn: &mut PgConnection, order: &OrderRow) -> Result<()> {
    set_status(conn, order, OrderStatus::Cancelled, None).await?;
    let data = OrderCancelledData {
        user_id: order.user_id,
        reason: order.reason.clone().unwrap_or_default(),
        cancelled_at: Utc::now(),
    };
    let event = OutboxMessage::new(MessageType::OrderCancelled, order.id, &data, order.trace())?;
    outbox::enqueue(conn, &[event]).await
}

/// Cancels the order if it is still cancellable (recovery, admin). Returns the status it is
/// left in, or None when it is already terminal, cancelling, or missing.
pub async fn cancel(conn: &mut PgConnection, id: Uuid, reason: CancelReason) -> Result<Option<OrderStatus>> {
    match lock(conn, id, OrderStatus::CANCELLABLE).await? {
        Some(order) => Ok(Some(cancel_locked(conn, &order, reason).await?)),
        None => Ok(None),
    }
}
