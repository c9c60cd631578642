//! The steps of the order pipeline, one module per owning worker. Each step runs inside the
//! runtime's transaction: lock the order in the state it expects (the guard), apply its
//! effect, move the order on, and enqueue what comes next.

pub mod coupon;
pub mod dead_letters;
pub mod order;
pub mod payment;
pub mod recovery;
pub mod sales;
pub mod stock;

use orderflow_shared::{
    Result,
    db::{
        orders::{self, OrderRow},
        outbox::OutboxMessage,
    },
    domain::OrderStatus,
    messaging::MessageType,
};
use sqlx::PgConnection;

use crate::runtime::Incoming;

/// Locks the message's order if it is in one of the `expected` states (see `orders::lock`);
/// the row its batch already locked and read counts as this lock.
async fn lock(tx: &mut PgConnection, msg: &Incoming, expected: &[OrderStatus]) -> Result<Option<OrderRow>> {
    match &msg.locked {
        Some(order) => Ok(Some(order.clone()).filter(|o| expected.contains(&o.status))),
        None => orders::lock(tx, msg.envelope.order_id, expected).await,
    }
}

/// The next command for the message's order, continuing its trace.
fn next(msg: &Incoming, kind: MessageType) -> Result<OutboxMessage> {
    OutboxMessage::command(kind, msg.envelope.order_id, msg.trace)
}
