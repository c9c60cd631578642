//! Payment: debit the balance with a PAYMENT ledger row (INSUFFICIENT_BALANCE when it cannot
//! cover the amount), and refund with a REFUND row when a cancelled order gives it back.
//! The debit is one guarded statement (`balance >= amount`); there is no read-then-write.

use orderflow_shared::{
    Result,
    db::orders,
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{lock, next};
use crate::runtime::{Incoming, Outcome, Step, order_ids};

pub struct Payment;

impl Step for Payment {
    const NAME: &'static str = "payment";
    const QUEUE: &'static str = topology::PAYMENT_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::PaymentCharge | MessageType::PaymentRefund)
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        match msg.kind {
            MessageType::PaymentCharge => charge(tx, msg).await,
            _ => refund(tx, msg).await,
        }
    }

    /// The orders, then their users' balances, each in key order.
    async fn lock_batch(&self, tx: &mut PgConnection, batch: &[&Incoming]) -> Result<Vec<orders::OrderRow>> {
        let ids = order_ids(batch);
        let locked = orders::lock_all(tx, &ids).await?;
        sqlx::query(
            "SELECT 1 FROM balances WHERE user_id IN (SELECT user_id FROM orders WHERE id = ANY($1))
             ORDER BY user_id FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .execute(tx)
        .await?;
        Ok(locked)
    }
}

async fn charge(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let expected = [OrderStatus::StockReserved, OrderStatus::CouponApplied];
    let order = lock(tx, msg, &expected).await?;
    // Without a coupon the order comes straight from STOCK_RESERVED; with one, only after it
    // was applied.
    let ready = |o: &orders::OrderRow| match o.coupon_id {
        Some(_) => o.status == OrderStatus::CouponApplied,
        None => o.status == OrderStatus::StockReserved,
    };
    let Some(mut order) = order.filter(ready) else {
        return Ok(Outcome::Stale);
    };
    let amount = order.total_amount - order.discount_amount;
    // The debit and its ledger row in one statement: no row back means not enough balance.
    let debited: Option<i64> = sqlx::query_scalar(
        "WITH debited AS (
             UPDATE balances SET balance = balance - $2, updated_at = now()
             WHERE user_id = $1 AND balance >= $2 RETURNING balance
         )
         INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id)
         SELECT $1, 'PAYMENT', $2, balance, $3 FROM debited RETURNING balance_after",
    )
    .bind(order.user_id)
    .bind(amount)
    .bind(order.id)
    .fetch_optional(&mut *tx)
    .await?;
    match (debited, amount) {
        (Some(_), _) => {}
        // Fully discounted: nothing to take from a user with no balance row.
        (None, 0) => ledger(tx, order.user_id, "PAYMENT", 0, 0, order.id).await?,
        (None, _) => {
            orders::cancel_locked(tx, &order, CancelReason::InsufficientBalance).await?;
            return Ok(Outcome::Done);
        }
    }
    order.paid_amount = amount;
    let then = next(msg, MessageType::OrderConfirm)?;
    orders::advance(tx, &order, &[(OrderStatus::Paid, None)], &[then]).await?;
    Ok(Outcome::Done)
}

async fn refund(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = lock(tx, msg, &[OrderStatus::Cancelling]).await?;
    let Some(mut order) = order.filter(|o| o.paid_amount > 0) else {
        return Ok(Outcome::Stale);
    };
    // A refund is never refused, even above the charge cap.
    let balance: i64 = sqlx::query_scalar(
        "INSERT INTO balances (user_id, balance) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET balance = balances.balance + EXCLUDED.balance, updated_at = now()
         RETURNING balance",
    )
    .bind(order.user_id)
    .bind(order.paid_amount)
    .fetch_one(&mut *tx)
    .await?;
    ledger(tx, order.user_id, "REFUND", order.paid_amount, balance, order.id).await?;
    order.paid_amount = 0;
    orders::compensated(tx, &order).await?;
    Ok(Outcome::Done)
}

async fn ledger(
    tx: &mut PgConnection,
    user_id: i64,
    kind: &str,
    amount: i64,
    balance_after: i64,
    order_id: Uuid,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user_id)
    .bind(kind)
    .bind(amount)
    .bind(balance_after)
    .bind(order_id)
    .execute(tx)
    .await?;
    Ok(())
}
