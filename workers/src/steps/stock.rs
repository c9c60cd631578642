//! Stock: reserve all of an order's items or none (OUT_OF_STOCK), and release them when a
//! cancelled order gives them back. Product rows are locked in id order, so concurrent
//! orders over the same products cannot deadlock. They are locked `FOR NO KEY UPDATE`
//! (stock is not a key), which leaves the foreign-key checks of orders being placed for the
//! same products (`FOR KEY SHARE`) unblocked: accepting never waits for a reservation.

use orderflow_shared::{
    Result,
    db::orders::{self, ItemRow},
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{lock, next};
use crate::runtime::{Incoming, Outcome, Step, order_ids};

pub struct Stock;

impl Step for Stock {
    const NAME: &'static str = "stock";
    const QUEUE: &'static str = topology::STOCK_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::StockReserve | MessageType::StockRelease)
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        match msg.kind {
            MessageType::StockReserve => reserve(tx, msg).await,
            _ => release(tx, msg).await,
        }
    }

    /// The orders, then their products, each in id order. A product none of them can take
    /// from (no stock as last committed) is left unlocked unless a release gives to it, so
    /// that batches refusing a sold-out product do not queue behind one another on its row.
    /// (Restocked between this lock and a reservation, it is locked out of order; a deadlock
    /// that may cause fails the batch, which then runs one by one.)
    async fn lock_batch(&self, tx: &mut PgConnection, batch: &[&Incoming]) -> Result<Vec<orders::OrderRow>> {
        let ids = order_ids(batch);
        let locked = orders::lock_all(tx, &ids).await?;
        let releasing: Vec<Uuid> = batch
            .iter()
            .filter(|m| m.kind == MessageType::StockRelease)
            .map(|m| m.envelope.order_id)
            .collect();
        sqlx::query(
            "SELECT 1 FROM products p
             WHERE p.id IN (SELECT product_id FROM order_items WHERE order_id = ANY($1))
               AND (p.stock > 0 OR p.id IN (SELECT product_id FROM order_items WHERE order_id = ANY($2)))
             ORDER BY p.id FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .bind(&releasing)
        .execute(tx)
        .await?;
        Ok(locked)
    }
}

async fn reserve(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let Some(mut order) = lock(tx, msg, &[OrderStatus::Pending]).await? else {
        return Ok(Outcome::Stale);
    };
    // The lines with the stock on hand as last committed. Refusing needs no lock: a
    // committed state that cannot cover the order is a valid moment to refuse at, and nothing
    // is written to the products. So when a product sells out, the orders that find it
    // empty do not queue behind one another on its row.
    let lines: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT i.product_id, i.quantity::int8, p.stock FROM order_items i JOIN products p ON p.id = i.product_id
         WHERE i.order_id = $1 ORDER BY i.product_id",
    )
    .bind(order.id)
    .fetch_all(&mut *tx)
    .await?;
    let (ids, quantities): (Vec<i64>, Vec<i64>) = lines.iter().map(|&(id, qty, _)| (id, qty)).unzip();
    let short = |on_hand: &[(i64, i64)]| {
        ids.iter().zip(&quantities).any(|(id, qty)| {
            on_hand
                .iter()
                .find(|(pid, _)| pid == id)
                .is_none_or(|(_, stock)| stock < qty)
        })
    };
    let seen: Vec<(i64, i64)> = lines.iter().map(|&(id, _, stock)| (id, stock)).collect();
    if ids.is_empty() || short(&seen) {
        orders::cancel_locked(tx, &order, CancelReason::OutOfStock).await?;
        return Ok(Outcome::Done);
    }
    // Taking does lock: the products in id order, every line checked again before any is taken.
    let locked: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
    if short(&locked) {
        orders::cancel_locked(tx, &order, CancelReason::OutOfStock).await?;
        return Ok(Outcome::Done);
    }
    adjust(tx, &ids, &quantities, -1).await?;
    order.stock_held = true;
    let then = if order.coupon_id.is_some() {
        MessageType::CouponApply
    } else {
        MessageType::PaymentCharge
    };
    orders::advance(tx, &order, &[(OrderStatus::StockReserved, None)], &[next(msg, then)?]).await?;
    Ok(Outcome::Done)
}

async fn release(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = lock(tx, msg, &[OrderStatus::Cancelling]).await?;
    let Some(mut order) = order.filter(|o| o.stock_held) else {
        return Ok(Outcome::Stale);
    };
    let items = orders::items(tx, order.id).await?;
    let (ids, quantities) = columns(&items);
    adjust(tx, &ids, &quantities, 1).await?;
    order.stock_held = false;
    orders::compensated(tx, &order).await?;
    Ok(Outcome::Done)
}

fn columns(items: &[ItemRow]) -> (Vec<i64>, Vec<i64>) {
    items.iter().map(|i| (i.product_id, i64::from(i.quantity))).unzip()
}

/// Adds `sign * quantity` to each product's stock (rows are already locked when taking).
async fn adjust(tx: &mut PgConnection, ids: &[i64], quantities: &[i64], sign: i64) -> Result<()> {
    sqlx::query(
        "UPDATE products p SET stock = p.stock + $3 * i.qty
         FROM (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]) AS t(pid, qty) ORDER BY pid) i
         WHERE p.id = i.pid",
    )
    .bind(ids)
    .bind(quantities)
    .bind(sign)
    .execute(tx)
    .await?;
    Ok(())
}
