//! Coupon: apply the order's coupon (owner, AVAILABLE, not expired, minimum order amount;
//! otherwise COUPON_INVALID), and restore it when a cancelled order gives it back.

use orderflow_shared::{
    Result,
    db::orders,
    domain::{self, CancelReason, DiscountType, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;

use super::{lock, next};
use crate::runtime::{Incoming, Outcome, Step, order_ids};

pub struct Coupon;

impl Step for Coupon {
    const NAME: &'static str = "coupon";
    const QUEUE: &'static str = topology::COUPON_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::CouponApply | MessageType::CouponRestore)
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        match msg.kind {
            MessageType::CouponApply => apply(tx, msg).await,
            _ => restore(tx, msg).await,
        }
    }

    /// The orders, then their users' coupons, each in key order.
    async fn lock_batch(&self, tx: &mut PgConnection, batch: &[&Incoming]) -> Result<Vec<orders::OrderRow>> {
        let ids = order_ids(batch);
        let locked = orders::lock_all(tx, &ids).await?;
        sqlx::query(
            "SELECT 1 FROM user_coupons uc JOIN orders o ON o.coupon_id = uc.coupon_id AND o.user_id = uc.user_id
             WHERE o.id = ANY($1) ORDER BY uc.coupon_id, uc.user_id FOR NO KEY UPDATE OF uc",
        )
        .bind(&ids)
        .execute(tx)
        .await?;
        Ok(locked)
    }
}

async fn apply(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = lock(tx, msg, &[OrderStatus::StockReserved]).await?;
    let Some(mut order) = order else {
        return Ok(Outcome::Stale);
    };
    let Some(coupon_id) = order.coupon_id else {
        return Ok(Outcome::Stale);
    };
    // One guarded statement: only the owner's AVAILABLE, unexpired coupon, for an order
    // total (before discount) that meets the minimum.
    let taken: Option<(String, i64)> = sqlx::query_as(
        "UPDATE user_coupons uc SET status = 'USED', order_id = $3, used_at = now()
         FROM coupons c
         WHERE c.id = uc.coupon_id AND uc.coupon_id = $1 AND uc.user_id = $2 AND uc.status = 'AVAILABLE'
           AND (c.expires_at IS NULL OR c.expires_at > now()) AND c.min_order_amount <= $4
         RETURNING c.discount_type, c.discount_value",
    )
    .bind(coupon_id)
    .bind(order.user_id)
    .bind(order.id)
    .bind(order.total_amount)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((kind, value)) = taken else {
        orders::cancel_locked(tx, &order, CancelReason::CouponInvalid).await?;
        return Ok(Outcome::Done);
    };
    let kind =
        DiscountType::parse(&kind).ok_or_else(|| anyhow::anyhow!("coupon {coupon_id} has discount type {kind:?}"))?;
    let discount = domain::discount(kind, value, order.total_amount);
    order.coupon_held = true;
    order.discount_amount = discount;
    let then = next(msg, MessageType::PaymentCharge)?;
    orders::advance(tx, &order, &[(OrderStatus::CouponApplied, None)], &[then]).await?;
    Ok(Outcome::Done)
}

async fn restore(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = lock(tx, msg, &[OrderStatus::Cancelling]).await?;
    let Some(mut order) = order.filter(|o| o.coupon_held) else {
        return Ok(Outcome::Stale);
    };
    sqlx::query(
        "UPDATE user_coupons SET status = 'AVAILABLE', order_id = NULL, used_at = NULL
         WHERE coupon_id = $1 AND user_id = $2 AND order_id = $3",
    )
    .bind(order.coupon_id)
    .bind(order.user_id)
    .bind(order.id)
    .execute(&mut *tx)
    .await?;
    order.coupon_held = false;
    orders::compensated(tx, &order).await?;
    Ok(Outcome::Done)
}
