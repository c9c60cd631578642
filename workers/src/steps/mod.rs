//! The steps of the order pipeline, one module per owning worker. A step handles every order
//! its batch of messages names in the runtime's transaction, set-based: lock the orders (the
//! guard; [`Locked`]), decide for each what happens in Rust, write the effects with a constant
//! number of statements, and move every order with its history rows and next messages in one
//! statement (`orders::Transitions`).

pub mod coupon;
pub mod dead_letters;
pub mod order;
pub mod payment;
pub mod recovery;
pub mod stock;

use std::collections::{HashMap, HashSet};

use orderflow_shared::{
    Result,
    db::orders::{self, OrderRow},
    messaging::MessageType,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runtime::{Incoming, Outcome};

/// A batch's orders, locked, and what became of each of its messages.
pub struct Locked<'a> {
    batch: &'a [&'a Incoming],
    rows: HashMap<Uuid, OrderRow>,
    /// Per message: whether one of its orders was taken.
    done: Vec<bool>,
    missing: HashSet<Uuid>,
}

impl<'a> Locked<'a> {
    /// Locks every order the batch names (in id order, whatever its status: see
    /// `orders::lock_all`).
    pub async fn lock(tx: &mut PgConnection, batch: &'a [&'a Incoming]) -> Result<Self> {
        let mut ids: Vec<Uuid> = batch.iter().flat_map(|m| m.order_ids.iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        let rows: HashMap<Uuid, OrderRow> = orders::lock_all(tx, &ids)
            .await?
            .into_iter()
            .map(|o| (o.id, o))
            .collect();
        let missing = ids.into_iter().filter(|id| !rows.contains_key(id)).collect();
        Ok(Self {
            batch,
            rows,
            done: vec![false; batch.len()],
            missing,
        })
    }

    /// The orders named by this batch's messages of `kind` that await them (`orders::awaits`,
    /// the one guard of every step), in id order, each once. An order is taken at most once
    /// per batch: within one queue no two messages can both apply to the same order (each
    /// moves it out of the state the other needs), so a second message about a taken order is
    /// late, as it would be one by one.
    pub fn take(&mut self, kind: MessageType) -> Vec<OrderRow> {
        self.take_if(kind, |_| true)
    }

    /// As [`take`](Self::take), of the orders that are also `ready`.
    pub fn take_if(&mut self, kind: MessageType, ready: impl Fn(&OrderRow) -> bool) -> Vec<OrderRow> {
        let mut ids: Vec<Uuid> = Vec::new();
        for (i, msg) in self.batch.iter().enumerate().filter(|(_, m)| m.kind == kind) {
            for id in &msg.order_ids {
                if self.rows.get(id).is_some_and(|o| orders::awaits(o, kind) && ready(o)) {
                    self.done[i] = true;
                    ids.push(*id);
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.iter().filter_map(|id| self.rows.remove(id)).collect()
    }

    /// One outcome per message: done if one of its orders was taken, missing if it names
    /// orders that do not exist, stale otherwise.
    pub fn outcomes(self) -> Vec<Outcome> {
        self.batch
            .iter()
            .zip(self.done)
            .map(|(msg, done)| {
                let missing: Vec<Uuid> = msg
                    .order_ids
                    .iter()
                    .filter(|id| self.missing.contains(id))
                    .copied()
                    .collect();
                match (missing.is_empty(), done) {
                    (false, _) => Outcome::Missing(missing),
                    (true, true) => Outcome::Done,
                    (true, false) => Outcome::Stale,
                }
            })
            .collect()
    }
}
