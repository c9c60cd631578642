//! Orders: guarded state transitions with history, and the compensation chain.
//!
//! Every transition is guarded by the expected status. A step first locks the order row
//! (`lock`), which serialises it against recovery and admin cancel; zero rows means the
//! message is late or duplicated and the caller changes nothing.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::outbox::{self, Columns, OutboxMessage};
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

/// Locks every one of `ids` that exists, in id order, whatever its status, and returns them:
/// the first lock a transaction handling several orders takes, so that two such transactions
/// (and any that lock one order) always meet in the same order and cannot deadlock.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<OrderRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(ids)
            .fetch_all(conn)
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
    advance(conn, order, &[(to, reason)], &[]).await
}

/// One statement for a whole transition (one round trip): the order row moves from its
/// current status along `path` (usually one status; CANCELLING then CANCELLED for an order
/// that holds nothing) with its holdings written from `order`, a history row per hop, and
/// `messages` into the outbox.
static ADVANCE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH moved AS (
             UPDATE orders SET status = $10, reason = COALESCE($11, reason), stock_held = $12, coupon_held = $13,
                               paid_amount = $14, discount_amount = $15, updated_at = now()
             WHERE id = $8 AND status = $9
             RETURNING id
         ), history AS (
             INSERT INTO order_status_history (order_id, from_status, to_status, reason)
             SELECT moved.id, h.f, h.t, h.r
             FROM moved, UNNEST($16::text[], $17::text[], $18::text[]) WITH ORDINALITY AS h(f, t, r, n)
             ORDER BY h.n
         ), sent AS ({})
         SELECT count(*) FROM moved",
        outbox::INSERT
    )
});

pub async fn advance(
    conn: &mut PgConnection,
    order: &OrderRow,
    path: &[(OrderStatus, Option<CancelReason>)],
    messages: &[OutboxMessage],
) -> Result<()> {
    let Some(&(to, _)) = path.last() else {
        return Ok(());
    };
    let (mut froms, mut tos, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    let mut from = order.status;
    for &(next, reason) in path {
        froms.push(from.as_str());
        tos.push(next.as_str());
        reasons.push(reason.map(CancelReason::as_str));
        from = next;
    }
    let moved: i64 = Columns::new(messages)
        .bind(sqlx::query(ADVANCE.as_str()))
        .bind(order.id)
        .bind(order.status.as_str())
        .bind(to.as_str())
        .bind(path.iter().find_map(|&(_, r)| r).map(CancelReason::as_str))
        .bind(order.stock_held)
        .bind(order.coupon_held)
        .bind(order.paid_amount)
        .bind(order.discount_amount)
        .bind(froms)
        .bind(tos)
        .bind(reasons)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    if moved != 1 {
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
    outbox::enqueue(conn, &[compensation(order)?]).await
}

/// The command for the next compensation a CANCELLING order needs.
fn compensation(order: &OrderRow) -> Result<OutboxMessage> {
    OutboxMessage::command(next_compensation(order), order.id, order.trace())
}

/// Whether the order holds nothing that a compensation would have to give back.
pub fn holds_nothing(order: &OrderRow) -> bool {
    !order.stock_held && !order.coupon_held && order.paid_amount == 0
}

/// Moves a locked, cancellable order to CANCELLING with `reason` and starts compensation.
/// An order that holds nothing has nothing to compensate: it goes on to CANCELLED in the same
/// statement (both transitions recorded), which spares a message and a transaction for
/// every order refused before it took anything (out of stock, timed out while PENDING).
/// Returns the status the order is left in.
pub async fn cancel_locked(conn: &mut PgConnection, order: &OrderRow, reason: CancelReason) -> Result<OrderStatus> {
    if holds_nothing(order) {
        let event = cancelled_event(order, reason.as_str())?;
        let path = [(OrderStatus::Cancelling, Some(reason)), (OrderStatus::Cancelled, None)];
        advance(conn, order, &path, &[event]).await?;
        return Ok(OrderStatus::Cancelled);
    }
    advance(
        conn,
        order,
        &[(OrderStatus::Cancelling, Some(reason))],
        &[compensation(order)?],
    )
    .await?;
    Ok(OrderStatus::Cancelling)
}

/// Ends a CANCELLING order that holds nothing: CANCELLED, and `order.cancelled` for the data
/// platform (its id is fixed here, in the guarded transaction, so re-publishes keep it).
pub async fn finish_cancel(conn: &mut PgConnection, order: &OrderRow) -> Result<()> {
    let event = cancelled_event(order, order.reason.as_deref().unwrap_or_default())?;
    advance(conn, order, &[(OrderStatus::Cancelled, None)], &[event]).await
}

fn cancelled_event(order: &OrderRow, reason: &str) -> Result<OutboxMessage> {
    let data = OrderCancelledData {
        user_id: order.user_id,
        reason: reason.to_owned(),
        cancelled_at: Utc::now(),
    };
    OutboxMessage::new(MessageType::OrderCancelled, order.id, &data, order.trace())
}

/// Cancels the order if it is still cancellable (recovery, admin). Returns the status it is
/// left in, or None when it is already terminal, cancelling, or missing.
pub async fn cancel(conn: &mut PgConnection, id: Uuid, reason: CancelReason) -> Result<Option<OrderStatus>> {
    match lock(conn, id, OrderStatus::CANCELLABLE).await? {
        Some(order) => Ok(Some(cancel_locked(conn, &order, reason).await?)),
        None => Ok(None),
    }
}
