//! Order: confirm paid orders, publish one `order.confirmed` per order to the data platform and
//! count their units in the popular-products projection; finish cancellations once every
//! compensation has run and publish `order.cancelled`. A whole batch at once.
//!
//! The projection (hourly buckets per product) is written in the confirming transaction, so an
//! order is counted exactly when it is confirmed, once; its rows are written last, in key
//! order, so concurrent batches hold a bucket only for one statement and the commit.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use orderflow_shared::{
    Result,
    db::{
        orders::{self, Transitions},
        outbox::OutboxMessage,
    },
    domain::OrderStatus,
    messaging::{
        MessageType,
        envelope::{EventItem, OrderConfirmedData, Returned},
        topology,
    },
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Locked;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Order;

impl Step for Order {
    const NAME: &'static str = "order";
    const QUEUE: &'static str = topology::ORDER_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::OrderConfirm | MessageType::OrderFinishCancel)
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], _attempt: u32) -> Result<Vec<Outcome>> {
        let mut locked = Locked::lock(tx, batch).await?;
        let finishing = locked.take(MessageType::OrderFinishCancel);
        let confirming = locked.take(MessageType::OrderConfirm);
        let mut moves = Transitions::new();
        let mut returned = given_back(tx, &finishing).await?;
        for order in finishing {
            if orders::holds_nothing(&order) {
                let returned = returned.remove(&order.id).unwrap_or_default();
                moves.finish_cancel(order, returned)?;
            } else {
                // Cannot happen through the chain; refuse rather than lose what it still holds.
                tracing::error!(order_id = %order.id, "finish-cancel for an order that still holds resources; continuing compensation");
                moves.compensated(order);
            }
        }
        let mut sold: BTreeMap<i64, i64> = BTreeMap::new();
        let mut events = Vec::new();
        // The event's time and the stored one are the same whole millisecond (replay windows).
        let confirmed_at = orderflow_shared::messaging::envelope::millis::now();
        if !confirming.is_empty() {
            let ids: Vec<Uuid> = confirming.iter().map(|o| o.id).collect();
            let mut items: HashMap<Uuid, Vec<orders::ItemRow>> = HashMap::with_capacity(ids.len());
            for item in orders::items_of(tx, &ids).await? {
                items.entry(item.order_id).or_default().push(item);
            }
            for order in confirming {
                let lines: Vec<EventItem> = items
                    .remove(&order.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| {
                        *sold.entry(i.product_id).or_default() += i64::from(i.quantity);
                        EventItem {
                            product_id: i.product_id,
                            quantity: i.quantity,
                            unit_price: i.unit_price,
                        }
                    })
                    .collect();
                let data = OrderConfirmedData {
                    user_id: order.user_id,
                    coupon_id: order.coupon_id,
                    items: lines,
                    total_amount: order.total_amount,
                    discount_amount: order.discount_amount,
                    paid_amount: order.paid_amount,
                    confirmed_at,
                };
                // The event id is fixed here, in the guarded transaction: re-publishes keep it.
                let event = OutboxMessage::event(MessageType::OrderConfirmed, order.id, &data, order.trace())?;
                events.push(event.clone());
                moves.message(event);
                moves.advance(order, OrderStatus::Confirmed, None);
            }
        }
        moves.apply(tx).await?;
        record(tx, &events, &sold, confirmed_at).await?;
        Ok(locked.outcomes())
    }
}

/// What each cancelled order's compensations gave back: its units if it had reserved stock,
/// its coupon if it had applied one, the sum of its refunds. Two statements for the batch.
async fn given_back(tx: &mut PgConnection, finishing: &[orders::OrderRow]) -> Result<HashMap<Uuid, Returned>> {
    if finishing.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = finishing.iter().map(|o| o.id).collect();
    let held: Vec<(Uuid, bool, bool, i64)> = sqlx::query_as(
        "SELECT o.id,
                EXISTS (SELECT 1 FROM order_status_history h WHERE h.order_id = o.id AND h.to_status = 'STOCK_RESERVED'),
                EXISTS (SELECT 1 FROM order_status_history h WHERE h.order_id = o.id AND h.to_status = 'COUPON_APPLIED'),
                coalesce((SELECT sum(amount) FROM balance_ledger l WHERE l.order_id = o.id AND l.kind = 'REFUND'), 0)::int8
         FROM UNNEST($1::uuid[]) AS o(id)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let stocked: Vec<Uuid> = held.iter().filter(|h| h.1).map(|h| h.0).collect();
    let mut items: HashMap<Uuid, Vec<EventItem>> = HashMap::new();
    for i in orders::items_of(tx, &stocked).await? {
        items.entry(i.order_id).or_default().push(EventItem {
            product_id: i.product_id,
            quantity: i.quantity,
            unit_price: i.unit_price,
        });
    }
    let coupons: HashMap<Uuid, Option<i64>> = finishing.iter().map(|o| (o.id, o.coupon_id)).collect();
    Ok(held
        .into_iter()
        .map(|(id, _, coupon, refunded)| {
            let returned = Returned {
                items: items.remove(&id).unwrap_or_default(),
                coupon_id: if coupon {
                    coupons.get(&id).copied().flatten()
                } else {
                    None
                },
                refunded_amount: refunded,
            };
            (id, returned)
        })
        .collect())
}

/// In one statement: keeps each confirmed order's event as first published (`confirmed_events`,
/// what an event replay sends again, with its id and bytes), and adds the units to their
/// products' hourly buckets, in key order.
async fn record(
    tx: &mut PgConnection,
    events: &[OutboxMessage],
    sold: &BTreeMap<i64, i64>,
    at: DateTime<Utc>,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let (ids, quantities): (Vec<i64>, Vec<i64>) = sold.iter().map(|(p, q)| (*p, *q)).unzip();
    let orders: Vec<Uuid> = events.iter().flat_map(|e| e.order_ids.first().copied()).collect();
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.message_id).collect();
    let headers: Vec<serde_json::Value> = events.iter().map(OutboxMessage::headers).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
    sqlx::query(
        "WITH kept AS (
             INSERT INTO confirmed_events (order_id, event_id, confirmed_at, headers, body)
             SELECT o, e, $3, h, b FROM UNNEST($4::uuid[], $5::uuid[], $6::jsonb[], $7::bytea[]) AS t(o, e, h, b)
             ON CONFLICT (order_id) DO NOTHING
         )
         INSERT INTO product_sales_hourly (product_id, bucket, quantity)
         SELECT pid, date_trunc('hour', $3::timestamptz), qty FROM UNNEST($1::bigint[], $2::bigint[]) AS t(pid, qty)
         ORDER BY pid
         ON CONFLICT (product_id, bucket) DO UPDATE SET quantity = product_sales_hourly.quantity + EXCLUDED.quantity",
    )
    .bind(&ids)
    .bind(&quantities)
    .bind(at)
    .bind(&orders)
    .bind(&event_ids)
    .bind(&headers)
    .bind(&bodies)
    .execute(tx)
    .await?;
    Ok(())
}
