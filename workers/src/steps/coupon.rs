//! Coupon: apply each order's coupon (owner, AVAILABLE, not expired, minimum order amount;
//! otherwise COUPON_INVALID), and restore it when a cancelled order gives it back, for a
//! whole batch at once: restores first, then applies in order-id order (two orders of one
//! user with the same coupon: the first whose total meets the minimum takes it, the others
//! find it used or their total too small).

use std::collections::HashMap;

use orderflow_shared::{
    Result,
    db::orders::{OrderRow, Transitions},
    domain::{self, CancelReason, DiscountType, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Locked;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Coupon;

impl Step for Coupon {
    const NAME: &'static str = "coupon";
    const QUEUE: &'static str = topology::COUPON_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::CouponApply | MessageType::CouponRestore)
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], _attempt: u32) -> Result<Vec<Outcome>> {
        let mut locked = Locked::lock(tx, batch).await?;
        let restoring = locked.take(MessageType::CouponRestore);
        let applying = locked.take(MessageType::CouponApply);
        if !restoring.is_empty() && !applying.is_empty() {
            lock_user_coupons(tx, restoring.iter().chain(&applying)).await?;
        }
        let mut moves = Transitions::new();
        if !restoring.is_empty() {
            restore(tx, &restoring).await?;
            for mut order in restoring {
                order.coupon_held = false;
                moves.compensated(order);
            }
        }
        if !applying.is_empty() {
            let mut taken = apply(tx, &applying).await?;
            for mut order in applying {
                match taken.remove(&order.id) {
                    Some((kind, value)) => {
                        let kind = DiscountType::parse(&kind).ok_or_else(|| {
                            anyhow::anyhow!("coupon of order {} has discount type {kind:?}", order.id)
                        })?;
                        order.coupon_held = true;
                        order.discount_amount = domain::discount(kind, value, order.total_amount);
                        moves.advance(order, OrderStatus::CouponApplied, Some(MessageType::PaymentCharge));
                    }
                    None => {
                        moves.cancel(order, CancelReason::CouponInvalid)?;
                    }
                }
            }
        }
        moves.apply(tx).await?;
        Ok(locked.outcomes())
    }
}

/// Locks the user coupons of every order, in key order (coupon, user): the restores and the
/// applies each lock theirs in that order, but one after the other they would not (see
/// `payment::lock_balances`).
async fn lock_user_coupons(tx: &mut PgConnection, orders: impl Iterator<Item = &OrderRow>) -> Result<()> {
    let (coupons, users): (Vec<i64>, Vec<i64>) = orders.filter_map(|o| o.coupon_id.map(|c| (c, o.user_id))).unzip();
    sqlx::query(
        "SELECT 1 FROM user_coupons uc JOIN UNNEST($1::bigint[], $2::bigint[]) AS t(cid, uid)
             ON uc.coupon_id = t.cid AND uc.user_id = t.uid
         ORDER BY uc.coupon_id, uc.user_id FOR NO KEY UPDATE OF uc",
    )
    .bind(&coupons)
    .bind(&users)
    .execute(tx)
    .await?;
    Ok(())
}

/// Marks each order's coupon USED, in one guarded statement: only the owner's AVAILABLE,
/// unexpired coupon, for an order total (before discount) that meets the minimum; of two
/// orders wanting the same user coupon, the lower order id of those whose total meets the
/// minimum (handled one by one in id order, an order below it is refused and leaves the coupon
/// to the next). The user coupons are locked in key order first (two batches never lock them
/// in opposite orders). Returns, per order that got its coupon, the discount type and value.
async fn apply(tx: &mut PgConnection, orders: &[OrderRow]) -> Result<HashMap<Uuid, (String, i64)>> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let coupons: Vec<i64> = orders.iter().map(|o| o.coupon_id.unwrap_or_default()).collect();
    let users: Vec<i64> = orders.iter().map(|o| o.user_id).collect();
    let totals: Vec<i64> = orders.iter().map(|o| o.total_amount).collect();
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "WITH t AS (
             SELECT DISTINCT ON (t.cid, t.uid) t.* FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[])
                 AS t(oid, cid, uid, total)
             JOIN coupons c ON c.id = t.cid AND c.min_order_amount <= t.total
             ORDER BY t.cid, t.uid, t.oid
         ), locked AS (
             SELECT uc.id FROM user_coupons uc JOIN t ON uc.coupon_id = t.cid AND uc.user_id = t.uid
             ORDER BY uc.coupon_id, uc.user_id FOR NO KEY UPDATE OF uc
         )
         UPDATE user_coupons uc SET status = 'USED', order_id = t.oid, used_at = now()
         FROM t, coupons c
         WHERE uc.id IN (SELECT id FROM locked) AND uc.coupon_id = t.cid AND uc.user_id = t.uid
           AND c.id = uc.coupon_id AND uc.status = 'AVAILABLE'
           AND (c.expires_at IS NULL OR c.expires_at > now())
         RETURNING t.oid, c.discount_type, c.discount_value",
    )
    .bind(&ids)
    .bind(&coupons)
    .bind(&users)
    .bind(&totals)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().map(|(id, kind, value)| (id, (kind, value))).collect())
}

/// Makes each order's coupon AVAILABLE again, in one statement (locked in key order).
async fn restore(tx: &mut PgConnection, orders: &[OrderRow]) -> Result<()> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let coupons: Vec<i64> = orders.iter().map(|o| o.coupon_id.unwrap_or_default()).collect();
    let users: Vec<i64> = orders.iter().map(|o| o.user_id).collect();
    sqlx::query(
        "WITH t AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS t(oid, cid, uid)),
         locked AS (
             SELECT uc.id FROM user_coupons uc JOIN t ON uc.coupon_id = t.cid AND uc.user_id = t.uid AND uc.order_id = t.oid
             ORDER BY uc.coupon_id, uc.user_id FOR NO KEY UPDATE OF uc
         )
         UPDATE user_coupons SET status = 'AVAILABLE', order_id = NULL, used_at = NULL
         WHERE id IN (SELECT id FROM locked)",
    )
    .bind(&ids)
    .bind(&coupons)
    .bind(&users)
    .execute(tx)
    .await?;
    Ok(())
}
