//! Replaying and discarding dead letters: one at a time (`POST /api/admin/dead-letters/{id}/replay`)
//! or by the thousand ([`super::bulk`]), with the same rules.
//!
//! A replay publishes the letter again, through the outbox, to the queue it died in (through
//! the default exchange, so it reaches that queue whatever exchange first carried it), with its
//! original message id and body bytes (consumers' inboxes keep it idempotent) and the header
//! [`REPLAY_OF`] naming the letter (a replay that dies again is a new death, recorded anew). It
//! marks the letter REPLAYED in the same transaction, so a letter is replayed at most once.
//! Replaying a compensation first moves its parked (COMPENSATION_FAILED) orders back to
//! CANCELLING, so the compensation is applied rather than taken as stale.
//! Only a NEW letter whose body is JSON and whose destination exists now can be replayed.

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    Error, Result,
    db::{
        orders::{self, Transitions},
        outbox::{self, Replay},
        stored_json::StoredJson,
    },
    domain::OrderStatus,
    messaging::{
        MessageType,
        stats::{self, Destination},
        topology,
    },
};

/// The header naming the dead letter a message replays.
pub const REPLAY_OF: &str = "x-orderflow-replay-of";

/// What a replay needs of a dead letter.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Letter {
    pub id: i64,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub order_ids: Vec<Uuid>,
    pub source_queue: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub headers: StoredJson,
    pub body: Vec<u8>,
    pub status: String,
}

/// The key the recovery worker adds to a dead letter's recorded headers when it kept only the
/// first part of a body too large to be orderflow's: the body's whole length in bytes. Such a
/// letter cannot be replayed (what was cut is gone).
pub const TRUNCATED_FROM: &str = "$bodyTruncatedFrom";

pub fn not_found(id: i64) -> Error {
    Error::not_found("DEAD_LETTER_NOT_FOUND", format!("dead letter {id} does not exist"))
}

/// Locks letter `id` (`FOR UPDATE`) for a replay or a discard: `DEAD_LETTER_NOT_FOUND` (404),
/// `DEAD_LETTER_RESOLVED` (409) when it is no longer NEW.
pub async fn lock_new(conn: &mut PgConnection, id: i64) -> Result<Letter> {
    let letter: Letter = sqlx::query_as("SELECT * FROM dead_letters WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| not_found(id))?;
    if letter.status != "NEW" {
        return Err(Error::conflict(
            "DEAD_LETTER_RESOLVED",
            format!("dead letter {id} is already {}", letter.status),
        ));
    }
    Ok(letter)
}

/// Where replays go, asked of the broker once per destination (a bulk replay of ten thousand
/// letters from one queue asks once).
pub struct Destinations<'a> {
    amqp_url: &'a str,
    known: HashMap<(bool, String), bool>,
}

impl<'a> Destinations<'a> {
    pub fn new(amqp_url: &'a str) -> Self {
        Self {
            amqp_url,
            known: HashMap::new(),
        }
    }

    /// Whether the broker knows `destination`; `BROKER_UNAVAILABLE` (503) when it cannot be asked.
    async fn exists(&mut self, destination: Destination<'_>) -> Result<bool> {
        let key = match destination {
            Destination::Queue(q) => (true, q.to_owned()),
            Destination::Exchange(e) => (false, e.to_owned()),
        };
        if let Some(&known) = self.known.get(&key) {
            return Ok(known);
        }
        let found = stats::exists(self.amqp_url, destination).await.map_err(|err| {
            tracing::warn!(error = %format!("{err:#}"), "cannot ask the broker about a replay's destination");
            Error::unavailable("BROKER_UNAVAILABLE", "the broker could not be asked; retry shortly")
        })?;
        self.known.insert(key, found);
        Ok(found)
    }

    /// Where `letter` would go: the queue it died in, through the default exchange, if that
    /// queue exists; else the exchange and routing key it was published with, if that
    /// exchange exists and (for orderflow's own exchanges, whose bindings are known) routes
    /// the key. `DEAD_LETTER_NOT_REPLAYABLE` (409) says why not.
    pub async fn of(&mut self, letter: &Letter) -> Result<(String, String)> {
        let not_replayable = |why: String| Error::conflict("DEAD_LETTER_NOT_REPLAYABLE", why);
        if let Some(whole) = letter.headers.0.get(TRUNCATED_FROM) {
            return Err(not_replayable(format!(
                "only the first part of its {whole}-byte body was kept; discard it instead"
            )));
        }
        // An AMQP short string holds 255 bytes: a relay could not publish what names more (and
        // a previous release's relay, running beside this one in a rolling update, would panic).
        let too_long = |what: &str, value: &str| {
            (value.len() > 255).then(|| {
                not_replayable(format!(
                    "its {what} is {} bytes, more than AMQP's 255: it cannot be published; discard it instead",
                    value.len()
                ))
            })
        };
        if let Some(refused) = letter.message_type.as_deref().and_then(|t| too_long("type", t)) {
            return Err(refused);
        }
        // Bytes that are not even JSON can only be refused again: discard those instead.
        if serde_json::from_slice::<serde::de::IgnoredAny>(&letter.body).is_err() {
            return Err(not_replayable(
                "its body is not JSON, so no worker can take it; discard it instead".to_owned(),
            ));
        }
        if let Some(queue) = letter.source_queue.as_deref().filter(|q| !q.is_empty()) {
            if self.exists(Destination::Queue(queue)).await? {
                return Ok((String::new(), queue.to_owned()));
            }
            return Err(not_replayable(format!(
                "the queue it died in, {queue:?}, does not exist"
            )));
        }
        let (Some(exchange), Some(routing_key)) = (letter.exchange.clone(), letter.routing_key.clone()) else {
            return Err(not_replayable("where it was published is unknown".to_owned()));
        };
        if let Some(refused) = too_long("exchange", &exchange).or_else(|| too_long("routing key", &routing_key)) {
            return Err(refused);
        }
        if !exchange.is_empty() && !self.exists(Destination::Exchange(&exchange)).await? {
            return Err(not_replayable(format!("its exchange {exchange:?} does not exist")));
        }
        if topology::EXCHANGES.iter().any(|(name, _)| *name == exchange) && !topology::routes(&exchange, &routing_key) {
            return Err(not_replayable(format!(
                "exchange {exchange:?} routes nothing with routing key {routing_key:?}"
            )));
        }
        Ok((exchange, routing_key))
    }
}

/// Replays `letter`, which the caller has locked (`FOR UPDATE`) in its transaction and found
/// NEW: writes the outbox row and marks the letter REPLAYED by `resolved_by` (through bulk
/// action `bulk`, if any). Errors: `DEAD_LETTER_NOT_REPLAYABLE` (409, nothing written),
/// `BROKER_UNAVAILABLE` (503).
pub async fn replay(
    tx: &mut PgConnection,
    letter: &Letter,
    destinations: &mut Destinations<'_>,
    resolved_by: &str,
    bulk: Option<i64>,
) -> Result<()> {
    let (exchange, routing_key) = destinations.of(letter).await?;
    let message_id = letter
        .message_id
        .as_deref()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(Uuid::now_v7);
    let mut headers = serde_json::json!({ REPLAY_OF: letter.id.to_string() });
    if let Some(tp) = letter.headers.0.get("traceparent").filter(|tp| tp.is_string()) {
        headers["traceparent"] = tp.clone();
    }
    outbox::enqueue_replay(
        tx,
        &Replay {
            message_id,
            message_type: letter.message_type.clone().unwrap_or_else(|| routing_key.clone()),
            exchange,
            routing_key,
            order_ids: letter.order_ids.clone(),
            headers,
            body: letter.body.clone(),
        },
    )
    .await?;
    resume_parked(tx, letter).await?;
    resolve(tx, &[letter.id], "REPLAYED", resolved_by, bulk).await?;
    Ok(())
}

/// Whether the letter is a compensation (its replay resumes its parked orders).
pub fn is_compensation(letter: &Letter) -> bool {
    compensation(letter).is_some()
}

/// The compensation the letter carries, if it carries one.
fn compensation(letter: &Letter) -> Option<MessageType> {
    letter
        .message_type
        .as_deref()
        .and_then(MessageType::parse)
        .filter(|k| k.is_compensation())
}

/// A dead-lettered compensation parked its orders as COMPENSATION_FAILED, where its worker
/// would take the replay as stale: the replay moves them back to CANCELLING first, so the
/// compensation it carries is applied (once: the worker's guard and inbox hold as for any
/// message). Only orders parked waiting for this very compensation: one parked on another
/// (a later compensation that died too) stays parked for its own letter or an operator's
/// retry, and orders in any other status are left as they are.
async fn resume_parked(tx: &mut PgConnection, letter: &Letter) -> Result<()> {
    let Some(kind) = compensation(letter).filter(|_| !letter.order_ids.is_empty()) else {
        return Ok(());
    };
    let mut moves = Transitions::new();
    for order in orders::lock_all(tx, &letter.order_ids).await? {
        if order.status == OrderStatus::CompensationFailed && orders::next_compensation(&order) == kind {
            moves.resume(order, OrderStatus::Cancelling);
        }
    }
    moves.apply(tx).await
}

/// Marks NEW letters `status` (REPLAYED or DISCARDED, both kept for the record) by
/// `resolved_by`; returns the ids it marked (those still NEW).
pub async fn resolve(
    tx: &mut PgConnection,
    ids: &[i64],
    status: &str,
    resolved_by: &str,
    bulk: Option<i64>,
) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE dead_letters SET status = $2, resolved_at = now(), resolved_by = $3, bulk_action_id = $4
         WHERE id = ANY($1) AND status = 'NEW' RETURNING id",
    )
    .bind(ids)
    .bind(status)
    .bind(resolved_by)
    .bind(bulk)
    .fetch_all(tx)
    .await?)
}
