//! Payment: debit each order's amount from its user's balance with a PAYMENT ledger row
//! (INSUFFICIENT_BALANCE when the balance cannot cover it), and refund with a REFUND row when
//! a cancelled order gives it back, for a whole batch at once.
//!
//! The batch's serial order: refunds first, then charges in order-id order. A debit is guarded
//! by `balance >= amount` in its `WHERE` clause, never read-then-write; the charges run in
//! rounds, the n-th round taking each user's n-th charge, so one statement per round debits
//! every user at once and a user's second order sees what the first left (usually one round).

use std::collections::{HashMap, HashSet};

use orderflow_shared::{
    Result,
    db::orders::{OrderRow, Transitions},
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Locked;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Payment;

impl Step for Payment {
    const NAME: &'static str = "payment";
    const QUEUE: &'static str = topology::PAYMENT_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::PaymentCharge | MessageType::PaymentRefund)
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], _attempt: u32) -> Result<Vec<Outcome>> {
        let mut locked = Locked::lock(tx, batch).await?;
        let refunding = locked.take(MessageType::PaymentRefund);
        // Without a coupon an order comes straight from STOCK_RESERVED; with one, only after
        // it was applied (`orders::awaits`).
        let charging = locked.take(MessageType::PaymentCharge);
        if !refunding.is_empty() && !charging.is_empty() {
            lock_balances(tx, refunding.iter().chain(&charging)).await?;
        }
        let mut moves = Transitions::new();
        if !refunding.is_empty() {
            refund(tx, &refunding).await?;
            for mut order in refunding {
                order.paid_amount = 0;
                moves.compensated(order);
            }
        }
        if !charging.is_empty() {
            let paid = charge(tx, &charging).await?;
            for mut order in charging {
                if paid.contains(&order.id) {
                    order.paid_amount = order.total_amount - order.discount_amount;
                    moves.advance(order, OrderStatus::Paid, Some(MessageType::OrderConfirm));
                } else {
                    moves.cancel(order, CancelReason::InsufficientBalance)?;
                }
            }
        }
        moves.apply(tx).await?;
        Ok(locked.outcomes())
    }
}

/// Locks the balances of every order's user, in user order. The refunds and the charges each
/// lock theirs in user order, but one after the other they would not: a batch refunding user 2
/// and charging user 1 and another doing the reverse would each hold what the other waits for
/// (a deadlock PostgreSQL ends after `deadlock_timeout`, a second, failing one batch to retry).
async fn lock_balances(tx: &mut PgConnection, orders: impl Iterator<Item = &OrderRow>) -> Result<()> {
    let mut users: Vec<i64> = orders.map(|o| o.user_id).collect();
    users.sort_unstable();
    users.dedup();
    sqlx::query("SELECT 1 FROM balances WHERE user_id = ANY($1) ORDER BY user_id FOR NO KEY UPDATE")
        .bind(&users)
        .execute(tx)
        .await?;
    Ok(())
}

/// Debits every order (in id order) that its user's balance covers; returns those paid.
async fn charge(tx: &mut PgConnection, orders: &[OrderRow]) -> Result<HashSet<Uuid>> {
    // Round n holds each user's n-th charge.
    let mut rounds: Vec<Vec<&OrderRow>> = Vec::new();
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for order in orders {
        let n = seen.entry(order.user_id).or_default();
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(order);
        *n += 1;
    }
    let mut paid = HashSet::new();
    for round in rounds {
        let users: Vec<i64> = round.iter().map(|o| o.user_id).collect();
        let amounts: Vec<i64> = round.iter().map(|o| o.total_amount - o.discount_amount).collect();
        let ids: Vec<Uuid> = round.iter().map(|o| o.id).collect();
        // The debits and their ledger rows in one statement; balances locked in user order.
        // A fully discounted order costs nothing, even to a user with no balance row yet.
        let debited: Vec<Uuid> = sqlx::query_scalar(
            "WITH t AS (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::uuid[]) AS t(uid, amt, oid)),
             locked AS (
                 SELECT b.user_id FROM balances b JOIN t ON t.uid = b.user_id ORDER BY b.user_id FOR NO KEY UPDATE OF b
             ),
             debited AS (
                 UPDATE balances b SET balance = b.balance - t.amt, updated_at = now() FROM t
                 WHERE b.user_id = t.uid AND b.user_id IN (SELECT user_id FROM locked) AND b.balance >= t.amt
                 RETURNING t.oid, t.uid, t.amt, b.balance
             ),
             free AS (
                 SELECT t.oid, t.uid, t.amt, 0::int8 AS balance FROM t
                 WHERE t.amt = 0 AND NOT EXISTS (SELECT 1 FROM balances b WHERE b.user_id = t.uid)
             ),
             paid AS (SELECT * FROM debited UNION ALL SELECT * FROM free),
             ledger AS (
                 INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id)
                 SELECT uid, 'PAYMENT', amt, balance, oid FROM paid
             )
             SELECT oid FROM paid",
        )
        .bind(&users)
        .bind(&amounts)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        paid.extend(debited);
    }
    Ok(paid)
}

/// Gives every order its payment back, in one statement: one upsert per user (in user order)
/// and a REFUND row per order with the balance after it. A refund is never refused, even when
/// it lifts a balance over the charge cap.
async fn refund(tx: &mut PgConnection, orders: &[OrderRow]) -> Result<()> {
    let users: Vec<i64> = orders.iter().map(|o| o.user_id).collect();
    let amounts: Vec<i64> = orders.iter().map(|o| o.paid_amount).collect();
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    sqlx::query(
        "WITH t AS (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::uuid[]) AS t(uid, amt, oid)),
         per_user AS (SELECT uid, sum(amt)::int8 AS total FROM t GROUP BY uid),
         credited AS (
             INSERT INTO balances (user_id, balance) SELECT uid, total FROM per_user ORDER BY uid
             ON CONFLICT (user_id) DO UPDATE SET balance = balances.balance + EXCLUDED.balance, updated_at = now()
             RETURNING user_id, balance
         )
         INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id)
         SELECT t.uid, 'REFUND', t.amt,
                c.balance - p.total + sum(t.amt) OVER (PARTITION BY t.uid ORDER BY t.oid), t.oid
         FROM t JOIN credited c ON c.user_id = t.uid JOIN per_user p ON p.uid = t.uid",
    )
    .bind(&users)
    .bind(&amounts)
    .bind(&ids)
    .execute(tx)
    .await?;
    Ok(())
}
