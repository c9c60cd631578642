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

use orderflow_shared::{Result, db::outbox::OutboxMessage, messaging::MessageType};

use crate::runtime::Incoming;

/// The next command for the message's order, continuing its trace.
fn next(msg: &Incoming, kind: MessageType) -> Result<OutboxMessage> {
    OutboxMessage::command(kind, msg.envelope.order_id, msg.trace)
}
