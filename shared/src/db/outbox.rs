//! The transactional outbox: what a transaction decides to send is written here, in that
//! transaction, and published later by the relay. A row holds the exact bytes to publish.

use std::{
    collections::HashMap,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Postgres, Row as _, postgres::PgArguments, query::Query};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    Result,
    messaging::{
        Envelope, MessageType,
        envelope::{CloudEvent, CommandData, MAX_ORDERS_PER_COMMAND},
    },
    telemetry::{self, TraceParent},
};

#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    pub kind: MessageType,
    /// Where it is published: its type's exchange ([`MessageType::exchange`]) unless
    /// [`commands_through`](Self::commands_through) says otherwise.
    pub exchange: &'static str,
    /// The orders the message concerns (one for an event; one or more for a command).
    pub order_ids: Vec<Uuid>,
    pub trace: Option<TraceParent>,
    /// The serialized envelope (a CloudEvent for a public event), published as is.
    pub body: Vec<u8>,
    /// Per-message expiration (deadline messages only).
    pub expiration_ms: Option<i64>,
}

impl OutboxMessage {
    /// A public event about one order, as a CloudEvent. It goes on in the order's trace: the
    /// span handling the order in this process ([`telemetry::order_trace`]), or else `parent`
    /// (the order's stored trace), or else the current span; its creation span
    /// ([`telemetry::create`]) is in that trace.
    pub fn event<T: Serialize>(
        kind: MessageType,
        order_id: Uuid,
        data: &T,
        parent: Option<TraceParent>,
    ) -> Result<Self> {
        let event = CloudEvent::new(kind, order_id, data);
        let parent = telemetry::order_trace(order_id).or(parent).or_else(telemetry::current);
        Ok(Self {
            message_id: event.id,
            kind,
            exchange: kind.exchange(),
            order_ids: vec![order_id],
            trace: telemetry::create(kind.exchange(), kind.as_str(), order_id, parent),
            body: serde_json::to_vec(&event).map_err(anyhow::Error::from)?,
            expiration_ms: None,
        })
    }

    /// Commands of `kind` for `order_ids` (sorted as given), one message per
    /// [`MAX_ORDERS_PER_COMMAND`]: the handler reads everything else from the order rows.
    /// Each order goes on in its own trace: the span handling it in this process
    /// ([`telemetry::order_trace`]), or else its entry in `traces` (aligned with `order_ids`:
    /// the order's stored trace), or, when `traces` is empty, the current span; an order with
    /// none of these is sent without a trace. Each order's creation span
    /// ([`telemetry::create`]) is in its trace. A message's `traceparent` header is its first
    /// order's; while spans are exported, a message about several orders also names each
    /// one's in `data.traceparents`.
    pub fn commands(kind: MessageType, order_ids: &[Uuid], traces: &[Option<TraceParent>]) -> Result<Vec<Self>> {
        Self::commands_through(kind, kind.exchange(), order_ids, traces)
    }

    /// [`commands`](Self::commands), published to `exchange` (with the type as the routing key)
    /// instead of the type's own: each order's creation span names it as the destination.
    pub fn commands_through(
        kind: MessageType,
        exchange: &'static str,
        order_ids: &[Uuid],
        traces: &[Option<TraceParent>],
    ) -> Result<Vec<Self>> {
        let current = if traces.is_empty() { telemetry::current() } else { None };
        let traces: Vec<Option<TraceParent>> = order_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let parent = telemetry::order_trace(id)
                    .or(traces.get(i).copied().flatten())
                    .or(current);
                telemetry::create(exchange, kind.as_str(), id, parent)
            })
            .collect();
        let listed = telemetry::exporting();
        order_ids
            .chunks(MAX_ORDERS_PER_COMMAND)
            .zip(traces.chunks(MAX_ORDERS_PER_COMMAND))
            .map(|(ids, traces)| {
                let data = CommandData::new(ids, if listed { traces } else { &[] });
                let single = (ids.len() == 1).then(|| ids[0]);
                Self::build(kind, exchange, single, ids.to_vec(), &data, traces[0])
            })
            .collect()
    }

    /// One command of `kind` for one order (see [`commands`](Self::commands)).
    pub fn command(kind: MessageType, order_id: Uuid, trace: Option<TraceParent>) -> Result<Self> {
        Self::command_through(kind, kind.exchange(), order_id, trace)
    }

    /// One command of `kind` for one order, published to `exchange` (see
    /// [`commands_through`](Self::commands_through)).
    pub fn command_through(
        kind: MessageType,
        exchange: &'static str,
        order_id: Uuid,
        trace: Option<TraceParent>,
    ) -> Result<Self> {
        let mut one = Self::commands_through(kind, exchange, &[order_id], &[trace])?;
        one.pop().ok_or_else(|| anyhow::anyhow!("no command built").into())
    }

    fn build<T: Serialize>(
        kind: MessageType,
        exchange: &'static str,
        order_id: Option<Uuid>,
        order_ids: Vec<Uuid>,
        data: &T,
        trace: Option<TraceParent>,
    ) -> Result<Self> {
        let envelope = Envelope::new(kind, order_id, data);
        Ok(Self {
            message_id: envelope.id,
            kind,
            exchange,
            order_ids,
            trace,
            body: serde_json::to_vec(&envelope).map_err(anyhow::Error::from)?,
            expiration_ms: None,
        })
    }

    /// The same message with another id: deterministic, so that splitting the same message
    /// twice yields the same ids and consumers' inboxes absorb the repeat.
    pub fn with_id(mut self, id: Uuid) -> Result<Self> {
        let mut envelope: Envelope = serde_json::from_slice(&self.body).map_err(anyhow::Error::from)?;
        envelope.id = id;
        self.body = serde_json::to_vec(&envelope).map_err(anyhow::Error::from)?;
        self.message_id = id;
        Ok(self)
    }

    /// The AMQP headers it is published with (as the outbox stores them).
    pub fn headers(&self) -> serde_json::Value {
        match self.trace {
            Some(t) => serde_json::json!({ "traceparent": t.to_string() }),
            None => serde_json::json!({}),
        }
    }

    pub fn with_expiration_ms(mut self, ms: i64) -> Self {
        self.expiration_ms = Some(ms);
        self
    }
}

/// The insert behind [`enqueue`], with the messages as the arrays `$1`..`$7` (see
/// [`Columns`]); other statements embed it to write their messages in the same round trip.
pub const INSERT: &str =
    "INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_ids, headers, body, expiration_ms)
     SELECT m, e, k, k, o::uuid[], h, b, x
     FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bytea[], $7::int8[])
          AS t(m, e, k, o, h, b, x)";

/// Messages as the column arrays [`INSERT`] reads.
pub struct Columns {
    ids: Vec<Uuid>,
    exchanges: Vec<&'static str>,
    keys: Vec<&'static str>,
    /// Each message's orders as a PostgreSQL array literal (arrays of arrays must be
    /// rectangular, so they travel as text and are cast back).
    order_ids: Vec<String>,
    headers: Vec<serde_json::Value>,
    bodies: Vec<Vec<u8>>,
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
            columns.exchanges.push(m.exchange);
            columns.keys.push(m.kind.as_str());
            columns.order_ids.push(array_literal(&m.order_ids));
            columns.headers.push(m.headers());
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

fn array_literal(ids: &[Uuid]) -> String {
    let mut s = String::with_capacity(2 + ids.len() * 37);
    s.push('{');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s.push('}');
    s
}

/// [`INSERT`] answering each row's id and message id, for [`stage`].
static INSERT_RETURNING: LazyLock<String> = LazyLock::new(|| format!("{INSERT} RETURNING id, message_id"));

/// Writes the messages in one statement (staged for the relay, see [`staged`]).
pub async fn enqueue(conn: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let written: Vec<(i64, Uuid)> = Columns::new(messages)
        .bind(sqlx::query(INSERT_RETURNING.as_str()))
        .fetch_all(conn)
        .await?
        .into_iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<sqlx::Result<_>>()?;
    let (ids, message_ids): (Vec<i64>, Vec<Uuid>) = written.into_iter().unzip();
    stage(messages, &ids, &message_ids);
    Ok(())
}

// Handing rows to the relay ([`Feed`]): a relay that leads in this process publishes the rows its own
// process committed straight from memory, instead of reading back what was just written (a
// database round trip per transaction, the largest share of its work at ordinary rates). It
// still polls for rows written elsewhere (other processes, jobs that do not hand over) and for
// anything it was not handed; a row is marked sent only once the broker confirmed it, whichever
// way it came, so nothing handed over can be lost: at worst it is read back and published again,
// which the consumers' inboxes absorb.

/// A row committed in this process, handed to the relay.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The outbox row's id.
    pub id: i64,
    pub message: OutboxMessage,
    /// About when the row was written (in its transaction, before the commit).
    pub created_at: DateTime<Utc>,
}

tokio::task_local! {
    static STAGED: Arc<Mutex<Vec<Committed>>>;
}

/// Runs `f` (the work of one transaction, before its commit) and returns, beside its output,
/// the outbox rows it wrote through [`enqueue`] or a statement that [`stage`]s them: after the
/// commit, [`Feed::hand_over`] gives them to the relay. Dropped instead if the transaction fails.
pub async fn staged<F: Future>(f: F) -> (F::Output, Vec<Committed>) {
    let rows = Arc::new(Mutex::new(Vec::new()));
    let output = STAGED.scope(rows.clone(), f).await;
    let rows = std::mem::take(&mut *rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    (output, rows)
}

/// Records rows just written (`ids` and `message_ids` aligned, in any order) for the
/// enclosing [`staged`], if there is one.
pub fn stage(messages: &[OutboxMessage], ids: &[i64], message_ids: &[Uuid]) {
    let created_at = Utc::now();
    let _ = STAGED.try_with(|staged| {
        let by_message: HashMap<Uuid, i64> = message_ids.iter().copied().zip(ids.iter().copied()).collect();
        let mut staged = staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for message in messages {
            if let Some(&id) = by_message.get(&message.message_id) {
                staged.push(Committed {
                    id,
                    message: message.clone(),
                    created_at,
                });
            }
        }
    });
}

/// Wakes a relay running in this process.
static COMMITTED: Notify = Notify::const_new();
/// Whether a relay running in this process should read the outbox now: rows were committed
/// that it was not handed.
static POLL_ASKED: AtomicBool = AtomicBool::new(false);

/// Tells a relay in this process that outbox rows were just committed, so it reads and
/// publishes them now instead of at its next poll. Call it after the commit; a relay in
/// another process finds the rows at its next poll. (Not a PostgreSQL NOTIFY: that would
/// serialise commits, see migration 0005.)
pub fn committed() {
    POLL_ASKED.store(true, Ordering::Release);
    COMMITTED.notify_one();
}

/// Resolves at the next [`committed`] in this process (at once if one came since the last).
pub async fn wait_committed() {
    COMMITTED.notified().await;
}

/// For the relay: whether it was asked to read the outbox (by [`committed`]) since the last call.
pub fn take_asked() -> bool {
    POLL_ASKED.swap(false, Ordering::AcqRel)
}

/// Rows handed to the relay by the steps started with it (one `orderflow` process's workers,
/// on one database) and by the API's order acceptance in the same process: open while that
/// relay leads.
#[derive(Debug, Default)]
pub struct Feed {
    /// Rows handed over and not yet taken; `None` while the relay does not lead.
    rows: Mutex<Option<Vec<Committed>>>,
    /// Wakes the relay when rows are handed over.
    handed: Notify,
}

/// Most rows waiting in a [`Feed`]: past it, a relay that cannot keep up reads them back instead.
const FEED_MAX: usize = 5_000;

impl Feed {
    fn rows(&self) -> std::sync::MutexGuard<'_, Option<Vec<Committed>>> {
        self.rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives rows just committed (from [`staged`]) to the relay, which publishes them without
    /// reading them back; while it does not lead (or does not keep up), the same as
    /// [`committed`]. Call it after the commit.
    pub fn hand_over(&self, rows: Vec<Committed>) {
        if rows.is_empty() {
            return;
        }
        {
            let mut feed = self.rows();
            match feed.as_mut() {
                Some(waiting) if waiting.len() + rows.len() <= FEED_MAX => waiting.extend(rows),
                _ => {
                    drop(feed);
                    return committed();
                }
            }
        }
        self.handed.notify_one();
    }

    /// For the relay: resolves at the next [`hand_over`](Self::hand_over) (at once if one came
    /// since the last).
    pub async fn wait(&self) {
        self.handed.notified().await;
    }

    /// For the relay: rows are handed over from now on (it leads).
    pub fn open(&self) {
        self.rows().get_or_insert_with(Vec::new);
    }

    /// For the relay: no more rows are handed over, and those waiting are dropped (it no
    /// longer leads; whoever leads next reads them from the outbox as it starts).
    pub fn close(&self) {
        *self.rows() = None;
    }

    /// For the relay: the rows handed over since the last call.
    pub fn take(&self) -> Vec<Committed> {
        self.rows().as_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// Whether more than `n` messages wait for the relay (unsent and not parked): jobs that write
/// to the outbox in chunks (replays, bulk actions) wait while it is so, so live orders go
/// first and no backlog grows because of them.
pub async fn backlog_exceeds(pool: &sqlx::PgPool, n: i64) -> Result<bool> {
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL LIMIT $1) AS t",
    )
    .bind(n + 1)
    .fetch_one(pool)
    .await?;
    Ok(waiting > n)
}

/// A message to publish again exactly as it was (a dead-letter replay): the original body
/// bytes and message id (consumers' inboxes keep it idempotent), to `exchange` with
/// `routing_key`.
#[derive(Debug, Clone)]
pub struct Replay {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub order_ids: Vec<Uuid>,
    pub headers: serde_json::Value,
    pub body: Vec<u8>,
}

pub async fn enqueue_replay(conn: &mut PgConnection, replay: &Replay) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_ids, headers, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(replay.message_id)
    .bind(&replay.exchange)
    .bind(&replay.routing_key)
    .bind(&replay.message_type)
    .bind(&replay.order_ids)
    .bind(&replay.headers)
    .bind(&replay.body)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_carries_its_first_orders_trace_and_none_is_invented() -> anyhow::Result<()> {
        let ids: Vec<Uuid> = (0..MAX_ORDERS_PER_COMMAND + 2).map(|_| Uuid::now_v7()).collect();
        let traces: Vec<Option<TraceParent>> = (0..ids.len())
            .map(|i| (i % 2 == 0).then(TraceParent::new_root))
            .collect();
        let messages = OutboxMessage::commands(MessageType::PaymentCharge, &ids, &traces)?;
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].trace, traces[0]);
        assert_eq!(messages[1].trace, traces[MAX_ORDERS_PER_COMMAND]);
        assert_eq!(messages[1].order_ids, ids[MAX_ORDERS_PER_COMMAND..].to_vec());
        let untraced = OutboxMessage::command(MessageType::PaymentCharge, ids[1], None)?;
        assert_eq!(untraced.trace, None);
        assert_eq!(untraced.headers(), serde_json::json!({}));
        Ok(())
    }

    /// The feed as a relay and its process's steps see it (one test: the asking flag is global).
    #[tokio::test]
    async fn rows_are_handed_over_only_after_staging_and_only_while_the_relay_leads() -> anyhow::Result<()> {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let messages = OutboxMessage::commands(MessageType::PaymentCharge, &ids, &[])?;
        let message_ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();

        // Outside a staged transaction nothing is recorded; inside, every row written is, by id.
        stage(&messages, &[1], &message_ids[..1]);
        let ((), staged) = staged(async { stage(&messages, &[7], &message_ids[..1]) }).await;
        assert_eq!(
            staged.iter().map(|c| (c.id, c.message.message_id)).collect::<Vec<_>>(),
            [(7, message_ids[0])]
        );

        // The relay does not lead: handing over asks it to read the outbox instead, once.
        let feed = Feed::default();
        take_asked();
        feed.hand_over(staged.clone());
        assert!(feed.take().is_empty());
        assert!(take_asked());
        assert!(!take_asked());

        // It leads: rows come to it, and it is not asked to read them back.
        feed.open();
        feed.hand_over(staged.clone());
        let rows = feed.take();
        assert_eq!((rows.len(), rows[0].id, take_asked()), (1, 7, false));
        // More than it takes: read back instead.
        let many: Vec<Committed> = (0..FEED_MAX as i64 + 1)
            .map(|id| Committed {
                id,
                message: messages[0].clone(),
                created_at: Utc::now(),
            })
            .collect();
        feed.hand_over(many);
        assert!(feed.take().is_empty());
        assert!(take_asked());
        // It stops leading: what was handed over and not taken is dropped (the next leader reads it).
        feed.hand_over(staged.clone());
        feed.close();
        feed.hand_over(staged);
        assert!(feed.take().is_empty());
        assert!(take_asked());
        Ok(())
    }

    #[test]
    fn commands_are_chunked_and_carry_their_orders() -> anyhow::Result<()> {
        let ids: Vec<Uuid> = (0..MAX_ORDERS_PER_COMMAND + 1).map(|_| Uuid::now_v7()).collect();
        let messages = OutboxMessage::commands(MessageType::StockReserve, &ids, &[])?;
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].order_ids, vec![ids[MAX_ORDERS_PER_COMMAND]]);
        let envelope: Envelope = serde_json::from_slice(&messages[1].body)?;
        assert_eq!(envelope.order_id, Some(ids[MAX_ORDERS_PER_COMMAND]));
        assert_eq!(envelope.command_orders(), Ok(vec![ids[MAX_ORDERS_PER_COMMAND]]));
        let first: Envelope = serde_json::from_slice(&messages[0].body)?;
        assert_eq!(first.order_id, None);
        assert_eq!(first.command_orders().map(|o| o.len()), Ok(MAX_ORDERS_PER_COMMAND));
        assert_eq!(array_literal(&ids[..2]), format!("{{{},{}}}", ids[0], ids[1]));
        Ok(())
    }
}
