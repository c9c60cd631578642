//! Order: confirm a paid order and publish `order.confirmed` to the data platform; finish a
//! cancellation once every compensation has run and publish `order.cancelled`.

use chrono::Utc;
use orderflow_shared::{
    Result,
    db::{orders, outbox::OutboxMessage},
    domain::OrderStatus,
    messaging::{
        MessageType,
        envelope::{EventItem, OrderConfirmedData},
        topology,
    },
};
use sqlx::PgConnection;

use super::lock;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Order;

impl Step for Order {
    const NAME: &'static str = "order";
    const QUEUE: &'static str = topology::ORDER_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        matches!(kind, MessageType::OrderConfirm | MessageType::OrderFinishCancel)
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        match msg.kind {
            MessageType::OrderConfirm => confirm(tx, msg).await,
            _ => finish_cancel(tx, msg).await,
        }
    }
}

async fn confirm(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let Some(order) = lock(tx, msg, &[OrderStatus::Paid]).await? else {
        return Ok(Outcome::Stale);
    };
    let items = orders::items(tx, order.id).await?;
    let data = OrderConfirmedData {
        user_id: order.user_id,
        coupon_id: order.coupon_id,
        items: items
            .into_iter()
            .map(|i| EventItem {
                product_id: i.product_id,
                quantity: i.quantity,
                unit_price: i.unit_price,
            })
            .collect(),
        total_amount: order.total_amount,
        discount_amount: order.discount_amount,
        paid_amount: order.paid_amount,
        confirmed_at: Utc::now(),
    };
    // The event id is fixed here, in the guarded transaction: re-publishes keep it.
    let event = OutboxMessage::new(MessageType::OrderConfirmed, order.id, &data, msg.trace)?;
    orders::advance(tx, &order, &[(OrderStatus::Confirmed, None)], &[event]).await?;
    Ok(Outcome::Done)
}

async fn finish_cancel(tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
    let order = lock(tx, msg, &[OrderStatus::Cancelling]).await?;
    let Some(order) = order else {
        return Ok(Outcome::Stale);
    };
    if orders::holds_nothing(&order) {
        orders::finish_cancel(tx, &order).await?;
    } else {
        // Cannot happen through the chain; refuse rather than lose what it still holds.
        tracing::error!(order_id = %order.id, "finish-cancel for an order that still holds resources; continuing compensation");
        orders::continue_compensation(tx, &order).await?;
    }
    Ok(Outcome::Done)
}
