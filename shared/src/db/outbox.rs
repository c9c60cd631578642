//! The transactional outbox: what a transaction decides to send is written here, in that
//! transaction, and published later by the relay.

use serde::Serialize;
use sqlx::{PgConnection, Postgres, postgres::PgArguments, query::Query};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    Result,
    messaging::{Envelope, MessageType},
    telemetry::TraceParent,
};

#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    pub kind: MessageType,
    pub order_id: Uuid,
    pub trace: Option<TraceParent>,
    pub body: serde_json::Value,
    /// Per-message expiration (deadline messages only).
    pub expiration_ms: Option<i64>,
}

impl OutboxMessage {
    /// A message of `kind` about `order_id`. It carries the trace context of the span that
    /// sends it (a worker's delivery span, the API's request span), or else `parent` (the
    /// order's own trace, for senders outside any span such as the recovery sweep).
    pub fn new<T: Serialize>(kind: MessageType, order_id: Uuid, data: &T, parent: Option<TraceParent>) -> Result<Self> {
        let envelope = Envelope::new(kind, order_id, data);
        Ok(Self {
            message_id: envelope.id,
            kind,
            order_id,
            trace: crate::telemetry::current().or(parent),
            body: serde_json::to_value(&envelope).map_err(anyhow::Error::from)?,
            expiration_ms: None,
        })
    }

    /// A command whose handler reads everything it needs from the order row.
    pub fn command(kind: MessageType, order_id: Uuid, parent: Option<TraceParent>) -> Result<Self> {
        Self::new(kind, order_id, &serde_json::json!({}), parent)
    }

    pub fn with_expiration_ms(mut self, ms: i64) -> Self {
        self.expiration_ms = Some(ms);
        self
    }
}

/// The insert behind [`enqueue`], with the messages as the arrays `$1`..`$7` (see
/// [`Columns`]); other statements embed it to write their messages in the same round trip.
pub const INSERT: &str =
    "INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_id, headers, body, expiration_ms)
     SELECT m, e, k, k, o, h, b, x
     FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::jsonb[], $6::jsonb[], $7::int8[])
          AS t(m, e, k, o, h, b, x)";

/// Messages as the column arrays [`INSERT`] reads.
pub struct Columns {
    ids: Vec<Uuid>,
    exchanges: Vec<&'static str>,
    keys: Vec<&'static str>,
    order_ids: Vec<Uuid>,
    headers: Vec<serde_json::Value>,
    bodies: Vec<serde_json::Value>,
    expirations: Vec<Option<i64>>,
}

impl Columns {
    pub fn new(messages: &[OutboxMessage]) -> Self {
        let mut columns = Self {
            ids: Vec::with_capacity(messages.len()),
            exchanges: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            order_ids: Vec::with_capacity(messages.len()),
            headers: Vec::with_capacity(messages.len()),
            bodies: Vec::with_capacity(messages.len()),
            expirations: Vec::with_capacity(messages.len()),
        };
        for m in messages {
            columns.ids.push(m.message_id);
            columns.exchanges.push(m.kind.exchange());
            columns.keys.push(m.kind.as_str());
            columns.order_ids.push(m.order_id);
            columns.headers.push(match m.trace {
                Some(t) => serde_json::json!({ "traceparent": t.to_string() }),
                None => serde_json::json!({}),
            });
            columns.bodies.push(m.body.clone());
            columns.expirations.push(m.expiration_ms);
        }
        columns
    }

    /// Binds the seven arrays, as `$1`..`$7` of a fresh query.
    pub fn bind(self, query: Query<'_, Postgres, PgArguments>) -> Query<'_, Postgres, PgArguments> {
        query
            .bind(self.ids)
            .bind(self.exchanges)
            .bind(self.keys)
            .bind(self.order_ids)
            .bind(self.headers)
            .bind(self.bodies)
            .bind(self.expirations)
    }
}

/// Writes the messages in one statement.
pub async fn enqueue(conn: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    Columns::new(messages).bind(sqlx::query(INSERT)).execute(conn).await?;
    Ok(())
}

/// Wakes a relay running in this process.
static COMMITTED: Notify = Notify::const_new();

/// Tells a relay in this process that outbox rows were just committed, so it publishes them
/// now instead of at its next poll. Call it after the commit; a relay in another process
/// finds the rows at its next poll. (Not a PostgreSQL NOTIFY: that would serialise commits,
/// see migration 0005.)
pub fn committed() {
    COMMITTED.notify_one();
}

/// Resolves at the next [`committed`] in this process (at once if one came since the last).
pub async fn wait_committed() {
    COMMITTED.notified().await;
}

/// A message to publish again exactly as it was (a dead-letter replay): same exchange,
/// routing key, message id and body, so consumers' inboxes keep it idempotent.
#[derive(Debug, Clone)]
pub struct Replay {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub order_id: Option<Uuid>,
    pub headers: serde_json::Value,
    pub body: serde_json::Value,
}

pub async fn enqueue_replay(conn: &mut PgConnection, replay: &Replay) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_id, headers, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(replay.message_id)
    .bind(&replay.exchange)
    .bind(&replay.routing_key)
    .bind(&replay.message_type)
    .bind(replay.order_id)
    .bind(&replay.headers)
    .bind(&replay.body)
    .execute(conn)
    .await?;
    Ok(())
}
