//! Recovery: an order whose deadline message expired while it was still in flight is
//! cancelled with reason TIMEOUT, and its compensations run.

use orderflow_shared::{
    Result,
    db::orders,
    domain::{CancelReason, OrderStatus},
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;

use super::lock;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Expiry;

impl Step for Expiry {
    const NAME: &'static str = "recovery";
    const QUEUE: &'static str = topology::EXPIRED_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::OrderDeadline
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        let Some(order) = lock(tx, msg, OrderStatus::CANCELLABLE).await? else {
            return Ok(Outcome::Stale);
        };
        tracing::warn!(order_id = %order.id, "order passed its deadline; cancelling");
        orders::cancel_locked(tx, &order, CancelReason::Timeout).await?;
        Ok(Outcome::Done)
    }
}
