//! Stock: reserve all of an order's items or none (OUT_OF_STOCK), and release them when a
//! cancelled order gives them back. Product rows are locked in id order, so concurrent
//! orders over the same products cannot deadlock.

use orderflow_shared::{
    Result,
    db::orders::{self, ItemRow},
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;

use super::send_next;
use crate::runtime::{Incoming, Outcome, Step};

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
}

async fn reserve(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let Some(mut order) = orders::lock(tx, msg.envelope.order_id, &[OrderStatus::Pending]).await? else {
        return Ok(Outcome::Stale);
    };
    let items = orders::items(tx, order.id).await?;
    let (ids, quantities) = columns(&items);
    // Lock the products in id order and check every line before taking anything.
    let stock: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
    let short = items.iter().any(|item| {
        stock
            .iter()
            .find(|(id, _)| *id == item.product_id)
            .is_none_or(|(_, on_hand)| *on_hand < i64::from(item.quantity))
    });
    if short {
        orders::cancel_locked(tx, &order, CancelReason::OutOfStock).await?;
        return Ok(Outcome::Done);
    }
    adjust(tx, &ids, &quantities, -1).await?;
    order.stock_held = true;
    orders::set_status(tx, &order, OrderStatus::StockReserved, None).await?;
    let next = if order.coupon_id.is_some() {
        MessageType::CouponApply
    } else {
        MessageType::PaymentCharge
    };
    send_next(tx, msg, next).await?;
    Ok(Outcome::Done)
}

async fn release(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = orders::lock(tx, msg.envelope.order_id, &[OrderStatus::Cancelling]).await?;
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
