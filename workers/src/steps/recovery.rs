//! Recovery: an order whose deadline message expired while it was still in flight is
//! cancelled with reason TIMEOUT, and its compensations run.

use orderflow_shared::{
    Result,
    db::orders,
    domain::CancelReason,
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;

use crate::runtime::{Incoming, Outcome, Step};

pub struct Expiry;

impl Step for Expiry {
    const NAME: &'static str = "recovery";
    const QUEUE: &'static str = topology::EXPIRED_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::OrderDeadline
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        if orders::cancel(tx, msg.envelope.order_id, CancelReason::Timeout)
            .await?
            .is_some()
        {
            tracing::warn!(order_id = %msg.envelope.order_id, "order passed its deadline; cancelling");
            Ok(Outcome::Done)
        } else {
            Ok(Outcome::Stale)
        }
    }
}
