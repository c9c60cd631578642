//! Stock: reserve all of an order's items or none (OUT_OF_STOCK), and release them when a
//! cancelled order gives them back, for a whole batch of orders at once.
//!
//! The batch's serial order: releases first, then reservations in order-id order, each order
//! taking its lines if every line fits in what is left. The plan is made in Rust on the stock
//! as last committed (read without a lock: refusing on a committed state that cannot cover an
//! order is a valid moment to refuse at, so a sold-out product serialises nothing), the orders
//! move, and the products are written last, in one statement that locks them in id order and
//! applies every change only if none goes below zero. So a product row is locked for one
//! statement and the commit, never across a batch. If the stock moved under the plan (another
//! batch took it), the transaction is retried ([`Error::Race`]); a product the batch wants more
//! of than was committed, and every product on a retry, is locked before planning instead.

use std::collections::{BTreeMap, HashMap};

use orderflow_shared::{
    Error, Result,
    db::orders::{OrderRow, Transitions},
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Locked;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Stock;

impl Step for Stock {
    const NAME: &'static str = "stock";
    const QUEUE: &'static str = topology::STOCK_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::StockReserve | MessageType::StockRelease)
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], attempt: u32) -> Result<Vec<Outcome>> {
        let mut locked = Locked::lock(tx, batch).await?;
        let releasing = locked.take(MessageType::StockRelease);
        let reserving = locked.take(MessageType::StockReserve);
        if releasing.is_empty() && reserving.is_empty() {
            return Ok(locked.outcomes());
        }
        let ids: Vec<Uuid> = releasing.iter().chain(&reserving).map(|o| o.id).collect();
        let lines = lines_with_stock(tx, &ids).await?;
        let mut lines_of: HashMap<Uuid, Vec<&Line>> = HashMap::with_capacity(ids.len());
        for line in &lines {
            lines_of.entry(line.order_id).or_default().push(line);
        }

        // What the batch asks of each product, and what was last committed.
        let mut committed: BTreeMap<i64, i64> = BTreeMap::new();
        let mut wanted: BTreeMap<i64, i64> = BTreeMap::new();
        for line in &lines {
            committed.insert(line.product_id, line.stock);
        }
        for order in &reserving {
            for line in lines_of.get(&order.id).into_iter().flatten() {
                *wanted.entry(line.product_id).or_default() += line.quantity;
            }
        }
        // Scarce: the batch wants more than was committed, so its refusals depend on the exact
        // stock. Then (and on any retry) every product it writes is locked, in id order, and
        // read again before planning.
        let scarce = wanted.iter().any(|(p, w)| committed.get(p).is_some_and(|s| s < w));
        let pessimistic = attempt > 0 || scarce;
        if pessimistic {
            let products: Vec<i64> = committed.keys().copied().collect();
            let current: Vec<(i64, i64)> =
                sqlx::query_as("SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
                    .bind(&products)
                    .fetch_all(&mut *tx)
                    .await?;
            committed.extend(current);
        }

        // The plan, in serial order: releases give back, then each reservation takes all its
        // lines or nothing.
        let mut stock = committed;
        let mut delta: BTreeMap<i64, i64> = BTreeMap::new();
        let mut moves = Transitions::new();
        for mut order in releasing {
            for line in lines_of.get(&order.id).into_iter().flatten() {
                *stock.entry(line.product_id).or_default() += line.quantity;
                *delta.entry(line.product_id).or_default() += line.quantity;
            }
            order.stock_held = false;
            moves.compensated(order);
        }
        for order in reserving {
            let order_lines = lines_of.get(&order.id).map(Vec::as_slice).unwrap_or_default();
            let fits = !order_lines.is_empty()
                && order_lines
                    .iter()
                    .all(|l| stock.get(&l.product_id).is_some_and(|s| *s >= l.quantity));
            if fits {
                for line in order_lines {
                    *stock.entry(line.product_id).or_default() -= line.quantity;
                    *delta.entry(line.product_id).or_default() -= line.quantity;
                }
                take(&mut moves, order);
            } else {
                moves.cancel(order, CancelReason::OutOfStock)?;
            }
        }
        moves.apply(tx).await?;
        if !adjust(tx, &delta).await? {
            return Err(Error::Race("stock was taken since the batch read it".to_owned()));
        }
        Ok(locked.outcomes())
    }
}

/// A reservation that fits: STOCK_RESERVED, then the coupon (if any) or the payment.
fn take(moves: &mut Transitions, mut order: OrderRow) {
    order.stock_held = true;
    let then = if order.coupon_id.is_some() {
        MessageType::CouponApply
    } else {
        MessageType::PaymentCharge
    };
    moves.advance(order, OrderStatus::StockReserved, Some(then));
}

#[derive(Debug, sqlx::FromRow)]
struct Line {
    order_id: Uuid,
    product_id: i64,
    quantity: i64,
    /// The product's stock as last committed.
    stock: i64,
}

async fn lines_with_stock(tx: &mut PgConnection, orders: &[Uuid]) -> Result<Vec<Line>> {
    Ok(sqlx::query_as(
        "SELECT i.order_id, i.product_id, i.quantity::int8 AS quantity, p.stock
         FROM order_items i JOIN products p ON p.id = i.product_id
         WHERE i.order_id = ANY($1) ORDER BY i.order_id, i.product_id",
    )
    .bind(orders)
    .fetch_all(tx)
    .await?)
}

/// Adds each delta to its product's stock, in one statement that locks the products in id
/// order and writes nothing unless every one stays at zero or above (it re-reads the latest
/// committed stock under the lock). Returns whether it wrote.
async fn adjust(tx: &mut PgConnection, delta: &BTreeMap<i64, i64>) -> Result<bool> {
    let (ids, deltas): (Vec<i64>, Vec<i64>) = delta.iter().filter(|(_, d)| **d != 0).map(|(p, d)| (*p, *d)).unzip();
    if ids.is_empty() {
        return Ok(true);
    }
    let ok: Option<bool> = sqlx::query_scalar(
        "WITH d AS (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]) AS d(pid, delta)),
         locked AS (
             SELECT p.id, p.stock + d.delta AS after FROM products p JOIN d ON d.pid = p.id
             ORDER BY p.id FOR NO KEY UPDATE OF p
         ),
         ok AS (SELECT count(*) = cardinality($1::bigint[]) AND bool_and(after >= 0) AS ok FROM locked),
         written AS (
             UPDATE products p SET stock = p.stock + d.delta FROM d, ok
             WHERE p.id = d.pid AND ok.ok
             RETURNING p.id
         )
         SELECT ok FROM ok, (SELECT count(*) FROM written) w",
    )
    .bind(&ids)
    .bind(&deltas)
    .fetch_one(tx)
    .await?;
    Ok(ok == Some(true))
}
