//! Orders: guarded state transitions with history, and the compensation chain, set-based.
//!
//! A transaction that moves orders first locks them (`lock_all`, in id order, which
//! serialises it against recovery, admin cancel and other batches), decides in Rust what each
//! one does, and writes every move, history row and outbox message of the batch in one
//! statement ([`Transitions::apply`]). Every move is guarded by the status it was read in;
//! zero rows for a locked order cannot happen and fails the transaction.

use std::{collections::BTreeMap, sync::LazyLock};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::outbox::{self, Columns, OutboxMessage};
use crate::{
    Result,
    domain::{CancelReason, OrderStatus},
    messaging::{
        MessageType,
        envelope::{OrderCancelledData, Returned},
    },
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
    pub order_id: Uuid,
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

/// Locks every one of `ids` that exists, in id order, whatever its status, and returns them
/// in id order: the first lock a transaction handling several orders takes, so that two such
/// transactions (and any that lock one order) always meet in the same order and cannot
/// deadlock.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<OrderRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(ids)
            .fetch_all(conn)
            .await?,
    )
}

pub async fn items(conn: &mut PgConnection, id: Uuid) -> Result<Vec<ItemRow>> {
    items_of(conn, &[id]).await
}

/// The lines of every one of `ids`, by order then product.
pub async fn items_of(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<ItemRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, product_id, quantity, unit_price FROM order_items
         WHERE order_id = ANY($1) ORDER BY order_id, product_id",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?)
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

/// Whether `order` is in the state a message of `kind` acts on: the guard every step applies
/// before moving an order (anything else is a stale or duplicate message), and the recovery
/// worker's test of whether an order still waits for a message that died.
///
/// Forward commands: `stock.reserve` in PENDING; `coupon.apply` in STOCK_RESERVED with a
/// coupon; `payment.charge` in COUPON_APPLIED, or STOCK_RESERVED without a coupon;
/// `order.confirm` in PAID. Compensations: in CANCELLING while the order still holds what the
/// compensation gives back (`order.finish-cancel`: in CANCELLING). `order.deadline`: any
/// cancellable state (the deadline itself is checked against the database's clock by the
/// recovery worker). Every other type acts on no order.
pub fn awaits(order: &OrderRow, kind: MessageType) -> bool {
    use OrderStatus::*;
    let status = order.status;
    match kind {
        MessageType::StockReserve => status == Pending,
        MessageType::CouponApply => status == StockReserved && order.coupon_id.is_some(),
        MessageType::PaymentCharge => match order.coupon_id {
            Some(_) => status == CouponApplied,
            None => status == StockReserved,
        },
        MessageType::OrderConfirm => status == Paid,
        MessageType::StockRelease => status == Cancelling && order.stock_held,
        MessageType::CouponRestore => status == Cancelling && order.coupon_held,
        MessageType::PaymentRefund => status == Cancelling && order.paid_amount > 0,
        MessageType::OrderFinishCancel => status == Cancelling,
        MessageType::OrderDeadline => OrderStatus::CANCELLABLE.contains(&status),
        MessageType::OrderConfirmed | MessageType::OrderCancelled | MessageType::DeadLetter => false,
    }
}

/// Whether the order holds nothing that a compensation would have to give back.
pub fn holds_nothing(order: &OrderRow) -> bool {
    !order.stock_held && !order.coupon_held && order.paid_amount == 0
}

/// One order's move: its row as locked, with the holdings it will have written in; the
/// statuses it passes through (empty: holdings only, status unchanged, no history row).
struct Move {
    order: OrderRow,
    path: Vec<(OrderStatus, Option<CancelReason>)>,
}

/// The moves, history rows and messages of one transaction, written by [`apply`](Self::apply)
/// in one statement. Commands to the same step are grouped: one message per kind carries
/// every order that needs it.
type Traces = Vec<Option<TraceParent>>;

#[derive(Default)]
pub struct Transitions {
    moves: Vec<Move>,
    /// Per command type: the orders and each one's stored trace (aligned).
    commands: BTreeMap<&'static str, (MessageType, Vec<Uuid>, Traces)>,
    messages: Vec<OutboxMessage>,
}

impl Transitions {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many orders move.
    pub fn len(&self) -> usize {
        self.moves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Moves a locked order (holdings as it will hold them) to `to`, then sends it `then`.
    pub fn advance(&mut self, order: OrderRow, to: OrderStatus, then: Option<MessageType>) {
        if let Some(kind) = then {
            self.command(kind, &order);
        }
        self.moves.push(Move {
            order,
            path: vec![(to, None)],
        });
    }

    /// Moves a locked, cancellable order to CANCELLING with `reason` and starts its
    /// compensation. An order that holds nothing has nothing to compensate: it goes on to
    /// CANCELLED in the same statement (both hops recorded) with its `order.cancelled`, which
    /// spares a message and a transaction for every order refused before it took anything.
    /// Returns the status the order is left in.
    pub fn cancel(&mut self, order: OrderRow, reason: CancelReason) -> Result<OrderStatus> {
        if holds_nothing(&order) {
            self.messages
                .push(cancelled_event(&order, reason.as_str(), Returned::default())?);
            self.moves.push(Move {
                order,
                path: vec![(OrderStatus::Cancelling, Some(reason)), (OrderStatus::Cancelled, None)],
            });
            return Ok(OrderStatus::Cancelled);
        }
        self.command(next_compensation(&order), &order);
        self.moves.push(Move {
            order,
            path: vec![(OrderStatus::Cancelling, Some(reason))],
        });
        Ok(OrderStatus::Cancelling)
    }

    /// Records what a CANCELLING order still holds after a compensation (or re-drives it
    /// unchanged) and sends the next compensation.
    pub fn compensated(&mut self, order: OrderRow) {
        self.command(next_compensation(&order), &order);
        self.moves.push(Move {
            order,
            path: Vec::new(),
        });
    }

    /// Ends a CANCELLING order that holds nothing: CANCELLED, and `order.cancelled` for the
    /// data platform with what its compensations gave back (its id is fixed here, in the
    /// guarded transaction, so re-publishes keep it).
    pub fn finish_cancel(&mut self, order: OrderRow, returned: Returned) -> Result<()> {
        let reason = order.reason.clone().unwrap_or_default();
        self.messages.push(cancelled_event(&order, &reason, returned)?);
        self.moves.push(Move {
            order,
            path: vec![(OrderStatus::Cancelled, None)],
        });
        Ok(())
    }

    /// Parks a CANCELLING order whose compensation keeps failing: COMPENSATION_FAILED, until
    /// an operator retries it ([`reopen`](Self::reopen)).
    pub fn park(&mut self, order: OrderRow) {
        self.moves.push(Move {
            order,
            path: vec![(OrderStatus::CompensationFailed, None)],
        });
    }

    /// Moves a locked order to `to` (e.g. an operator's retry of a parked compensation) and
    /// sends the next compensation.
    pub fn reopen(&mut self, order: OrderRow, to: OrderStatus) {
        self.command(next_compensation(&order), &order);
        self.moves.push(Move {
            order,
            path: vec![(to, None)],
        });
    }

    /// Moves a locked order to `to` and sends nothing: the message that carries it on is
    /// already on its way (an operator's replay of its dead-lettered compensation).
    pub fn resume(&mut self, order: OrderRow, to: OrderStatus) {
        self.moves.push(Move {
            order,
            path: vec![(to, None)],
        });
    }

    /// A message written with the moves (e.g. a public event built by the step).
    pub fn message(&mut self, message: OutboxMessage) {
        self.messages.push(message);
    }

    fn command(&mut self, kind: MessageType, order: &OrderRow) {
        let entry = self
            .commands
            .entry(kind.as_str())
            .or_insert_with(|| (kind, Vec::new(), Vec::new()));
        entry.1.push(order.id);
        entry.2.push(order.trace());
    }

    /// Writes every move (guarded by the status each order was locked in), its history rows
    /// and the messages, in one statement. Fails if an order left its status while locked.
    pub async fn apply(self, conn: &mut PgConnection) -> Result<()> {
        let mut messages = self.messages;
        for (kind, ids, traces) in self.commands.into_values() {
            messages.extend(OutboxMessage::commands(kind, &ids, &traces)?);
        }
        if self.moves.is_empty() {
            return outbox::enqueue(conn, &messages).await;
        }
        let n = self.moves.len();
        let mut m = MoveColumns::with_capacity(n);
        for mv in &self.moves {
            let o = &mv.order;
            let to = mv.path.last().map_or(o.status, |&(s, _)| s);
            m.ids.push(o.id);
            m.from.push(o.status.as_str());
            m.to.push(to.as_str());
            m.reason
                .push(mv.path.iter().find_map(|&(_, r)| r).map(CancelReason::as_str));
            m.stock_held.push(o.stock_held);
            m.coupon_held.push(o.coupon_held);
            m.paid.push(o.paid_amount);
            m.discount.push(o.discount_amount);
            let mut from = o.status;
            for &(next, reason) in &mv.path {
                m.h_ids.push(o.id);
                m.h_from.push(from.as_str());
                m.h_to.push(next.as_str());
                m.h_reason.push(reason.map(CancelReason::as_str));
                from = next;
            }
        }
        let row = Columns::new(&messages)
            .bind(sqlx::query(APPLY.as_str()))
            .bind(m.ids)
            .bind(m.from)
            .bind(m.to)
            .bind(m.reason)
            .bind(m.stock_held)
            .bind(m.coupon_held)
            .bind(m.paid)
            .bind(m.discount)
            .bind(m.h_ids)
            .bind(m.h_from)
            .bind(m.h_to)
            .bind(m.h_reason)
            .fetch_one(&mut *conn)
            .await?;
        let moved: i64 = row.try_get(0)?;
        outbox::stage(
            &messages,
            &row.try_get::<Vec<i64>, _>(1)?,
            &row.try_get::<Vec<Uuid>, _>(2)?,
        );
        if moved != n as i64 {
            return Err(anyhow::anyhow!("{} of {n} orders left their status while locked", n as i64 - moved).into());
        }
        Ok(())
    }
}

#[derive(Default)]
struct MoveColumns {
    ids: Vec<Uuid>,
    from: Vec<&'static str>,
    to: Vec<&'static str>,
    reason: Vec<Option<&'static str>>,
    stock_held: Vec<bool>,
    coupon_held: Vec<bool>,
    paid: Vec<i64>,
    discount: Vec<i64>,
    h_ids: Vec<Uuid>,
    h_from: Vec<&'static str>,
    h_to: Vec<&'static str>,
    h_reason: Vec<Option<&'static str>>,
}

impl MoveColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            from: Vec::with_capacity(n),
            to: Vec::with_capacity(n),
            reason: Vec::with_capacity(n),
            stock_held: Vec::with_capacity(n),
            coupon_held: Vec::with_capacity(n),
            paid: Vec::with_capacity(n),
            discount: Vec::with_capacity(n),
            h_ids: Vec::with_capacity(n),
            h_from: Vec::with_capacity(n),
            h_to: Vec::with_capacity(n),
            h_reason: Vec::with_capacity(n),
        }
    }
}

/// One statement for a batch of transitions (one round trip): every order moves from the
/// status it was locked in, with its holdings written; a history row per hop, in order; the
/// messages into the outbox (`$1`..`$7`). Returns how many orders moved, and the outbox rows'
/// ids and message ids (aligned) for [`outbox::stage`].
static APPLY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH m AS (
             SELECT * FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::text[], $12::bool[], $13::bool[],
                                  $14::int8[], $15::int8[])
                 AS m(id, from_status, to_status, reason, stock_held, coupon_held, paid_amount, discount_amount)
         ), moved AS (
             UPDATE orders o SET status = m.to_status, reason = COALESCE(m.reason, o.reason),
                                 stock_held = m.stock_held, coupon_held = m.coupon_held,
                                 paid_amount = m.paid_amount, discount_amount = m.discount_amount, updated_at = now()
             FROM m WHERE o.id = m.id AND o.status = m.from_status
             RETURNING o.id
         ), history AS (
             INSERT INTO order_status_history (order_id, from_status, to_status, reason)
             SELECT h.id, h.f, h.t, h.r
             FROM UNNEST($16::uuid[], $17::text[], $18::text[], $19::text[]) WITH ORDINALITY AS h(id, f, t, r, n)
             WHERE h.id IN (SELECT id FROM moved)
             ORDER BY h.n
         ), sent AS ({} RETURNING id, message_id)
         SELECT (SELECT count(*) FROM moved), COALESCE(array_agg(id), '{{}}'), COALESCE(array_agg(message_id), '{{}}')
         FROM sent",
        outbox::INSERT
    )
});

fn cancelled_event(order: &OrderRow, reason: &str, returned: Returned) -> Result<OutboxMessage> {
    let data = OrderCancelledData {
        user_id: order.user_id,
        reason: reason.to_owned(),
        returned,
        cancelled_at: crate::messaging::envelope::millis::now(),
    };
    OutboxMessage::event(MessageType::OrderCancelled, order.id, &data, order.trace())
}

/// Cancels the order if it is still cancellable (recovery, admin). Returns the status it is
/// left in, or None when it is already terminal, cancelling, or missing.
pub async fn cancel(conn: &mut PgConnection, id: Uuid, reason: CancelReason) -> Result<Option<OrderStatus>> {
    let Some(order) = lock(conn, id, OrderStatus::CANCELLABLE).await? else {
        return Ok(None);
    };
    let mut moves = Transitions::new();
    let status = moves.cancel(order, reason)?;
    moves.apply(conn).await?;
    Ok(Some(status))
}

/// What [`cancel_owned`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerCancel {
    /// Cancelled: the status it is left in (CANCELLING, or CANCELLED when it held nothing).
    Cancelled(OrderStatus),
    /// The caller's order, but no longer cancellable: its status (CONFIRMED, CANCELLED,
    /// CANCELLING or COMPENSATION_FAILED).
    NotCancellable(OrderStatus),
    /// No such order, or another user's (the two are not told apart).
    NotFound,
}

/// Cancels order `id` of user `user_id` with `reason` if it is still cancellable, exactly as
/// [`cancel`] does (compensation driven by what it holds).
///
/// The order row is locked first, whatever its status (`FOR NO KEY UPDATE`, the lock every
/// step takes): a step that holds it finishes first and the status read here is the one it
/// committed; a step that comes after finds the order CANCELLING or CANCELLED and its
/// message stale. So a PAID order is cancelled only if the order worker has not confirmed it,
/// and then its confirm is stale: a cancel either wins (and the order ends CANCELLED, with
/// everything given back) or is told the order is no longer cancellable.
pub async fn cancel_owned(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: i64,
    reason: CancelReason,
) -> Result<OwnerCancel> {
    let order: Option<OrderRow> =
        sqlx::query_as("SELECT * FROM orders WHERE id = $1 AND user_id = $2 FOR NO KEY UPDATE")
            .bind(id)
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(order) = order else {
        return Ok(OwnerCancel::NotFound);
    };
    if !OrderStatus::CANCELLABLE.contains(&order.status) {
        return Ok(OwnerCancel::NotCancellable(order.status));
    }
    let mut moves = Transitions::new();
    let status = moves.cancel(order, reason)?;
    moves.apply(conn).await?;
    Ok(OwnerCancel::Cancelled(status))
}
