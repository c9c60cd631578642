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
    db::outbox::{self, OutboxMessage},
    messaging::MessageType,
};
use sqlx::PgConnection;

use crate::runtime::Incoming;

/// Enqueues the next command for the message's order, continuing its trace.
async fn send_next(tx: &mut PgConnection, msg: &Incoming, kind: MessageType) -> Result<()> {
    let next = OutboxMessage::command(kind, msg.envelope.order_id, msg.trace)?;
    outbox::enqueue(tx, &[next]).await
}
