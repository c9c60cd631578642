//! Recovery: the orders of an expired deadline message (the relay gathers a second's) that are still
//! in flight and past their deadline are cancelled with reason TIMEOUT, and their compensations run.

use chrono::{DateTime, Utc};
use orderflow_shared::{
    Result,
    db::orders::Transitions,
    domain::CancelReason,
    messaging::{MessageType, topology},
};
use sqlx::PgConnection;

use super::Locked;
use crate::runtime::{Incoming, Outcome, Step};

pub struct Expiry;

impl Step for Expiry {
    const NAME: &'static str = "recovery";
    const QUEUE: &'static str = topology::EXPIRED_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::OrderDeadline
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], _attempt: u32) -> Result<Vec<Outcome>> {
        let mut locked = Locked::lock(tx, batch).await?;
        // Only orders past their deadline by the database's clock, which set it: a deadline
        // message expires no sooner, so one that comes early is forged or replayed by hand,
        // and the sweep cancels any order it leaves once its time is up.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?;
        let overdue = locked.take_if(MessageType::OrderDeadline, |o| o.deadline_at <= now);
        let mut moves = Transitions::new();
        for order in overdue {
            tracing::warn!(order_id = %order.id, "order passed its deadline; cancelling");
            moves.cancel(order, CancelReason::Timeout)?;
        }
        moves.apply(tx).await?;
        Ok(locked.outcomes())
    }
}
