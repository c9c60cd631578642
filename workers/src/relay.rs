//! The outbox relay: the only publisher. It takes committed outbox rows (handed over by the
//! steps of its own process right after their commit, read from the outbox when a writer here
//! asks, and polled for otherwise: see [`POLL`]), publishes them persistent and mandatory with
//! publisher confirms, and marks them sent only once the broker confirmed. A broker outage
//! delays messages, never loses them; a crash between confirm and
//! mark re-publishes with the same message id, which consumers' inboxes absorb.
//!
//! One relay publishes at a time: the one holding a session advisory lock on the database
//! ([`LEADER_LOCK`]); others stand by and take over within a second of its connection going
//! away. Being the only publisher lets it read rows without locking them and without a
//! transaction, and mark what the broker confirmed in bulk, at most [`MARK_DELAY`] later,
//! instead of one locking transaction per batch: at the rates shops really run a batch is one
//! or two rows, and that transaction was half of the commits an order cost. Rows it published
//! and has not marked yet are kept in memory and left out of its polls; if it dies before
//! marking them, the next leader publishes them again (the inboxes absorb it, as above).
//!
//! A row the broker refuses (no such exchange, unroutable, nacked, or any publish after which
//! the broker closes the channel: too large, not allowed) never holds back the rows behind
//! it: it is retried on its own schedule (`retry_at`), and after [`MAX_ATTEMPTS`] (a nack,
//! which is the broker's "not now", after [`MAX_NACKED_ATTEMPTS`]) it is parked
//! with its reason for an operator (`/api/admin/outbox`: retry or discard), counted in the
//! overview and the `orderflow_outbox_parked` gauge. When the broker closes the channel in
//! the middle of a batch, the rows not yet confirmed are published again one at a time on
//! fresh channels, to tell the row that caused it from the ones that merely shared its
//! channel. After a nack the relay also opens a fresh channel: when a node of a cluster dies,
//! a channel can keep nacking a quorum queue whose leader moved (seen for 30 s and more on
//! RabbitMQ 3.10), while a new channel finds the new leader at once.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use orderflow_shared::{
    db::outbox::{self, Feed},
    messaging::{MessageType, envelope, topology},
    telemetry::{self, TraceParent},
};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::broker;

mod deadlines;
use deadlines::Held;

/// Rows read per poll, and marks written at most per [`MARK_DELAY`] (a batch handed over in
/// this process may be larger, up to the feed's limit).
const BATCH: i64 = 500;
/// How often the relay reads the outbox unasked while rows written by other processes come
/// (a poll nobody in this process asked for found rows within [`IDLE_AFTER`]). Writers in the
/// same process hand it their rows (`Feed::hand_over`) or ask it to read them
/// (`outbox::committed`) right after their commit. (No PostgreSQL NOTIFY: it serialises the
/// commits of every transaction that sends one, see migration 0005.)
const POLL: Duration = Duration::from_millis(20);
/// How often it reads the outbox unasked otherwise: a poll is a database round trip, and at 50
/// a second the relay's polls were most of what an idle system cost. The first row another
/// process writes after a quiet second waits up to this long; the rows after it find the relay
/// polling every [`POLL`] again.
const IDLE_POLL: Duration = Duration::from_millis(100);
const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Longest a confirmed row waits to be marked sent: marks are written in bulk (one statement
/// for every row confirmed meanwhile, at most [`BATCH`]), not one transaction per batch.
pub const MARK_DELAY: Duration = Duration::from_millis(100);
/// The session advisory lock (PostgreSQL's two-key form, apart from the idempotency keys'
/// one-key locks) held by the relay that publishes; `('orderflow' as int4, 1)`.
pub const LEADER_LOCK: (i32, i32) = (0x6f66_6c77, 1);
/// How often a standing-by relay asks for the lock. (The leader learns it lost its session
/// from its own polls, which go through that session.)
const LEADER_CHECK: Duration = Duration::from_secs(1);
/// Publishes of one row the broker refused before the row is parked for an operator.
pub const MAX_ATTEMPTS: i32 = 3;
/// Longest pause before a refused row is tried again, in seconds (the pause doubles from 1 s).
const MAX_RETRY_DELAY_S: i32 = 60;
/// The same two for a row the broker nacked: a nack says it could not take the message *now*
/// (a quorum queue electing a leader or without a majority while a node is down, or full with
/// `reject-publish`), so the row is tried again at least every 5 s, to go out soon after the
/// queue is back, for about ten minutes before an operator is asked.
pub const MAX_NACKED_ATTEMPTS: i32 = 120;
const MAX_NACKED_RETRY_DELAY_S: i32 = 5;

#[derive(Debug, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub order_ids: Vec<Uuid>,
    pub headers: serde_json::Value,
    pub body: Vec<u8>,
    pub expiration_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
    /// The rows a message gathered from several stands for (see `deadlines`); empty for a
    /// row published as it is.
    #[sqlx(skip)]
    pub covers: Vec<i64>,
}

impl OutboxRow {
    /// The outbox rows this publish settles.
    fn ids(&self) -> &[i64] {
        if self.covers.is_empty() {
            std::slice::from_ref(&self.id)
        } else {
            &self.covers
        }
    }
}

/// The AMQP properties every orderflow message carries (DESIGN.md §3), for `row` going out
/// with `body` (what [`wire`] sends). Err when the row cannot be put on the wire: its type or a
/// header name is over AMQP's 255-byte short-string limit (a row copied from a dead letter,
/// whose type came from whoever published it, may be).
pub fn properties(row: &OutboxRow, body: &[u8]) -> Result<BasicProperties, String> {
    let mut headers = FieldTable::default();
    if let Some(map) = row.headers.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str() {
                headers.insert(short("a header name", k)?, AMQPValue::LongString(s.into()));
            }
        }
    }
    let mut props = BasicProperties::default()
        .with_content_type(content_type(row, body).into())
        .with_delivery_mode(2)
        .with_message_id(row.message_id.to_string().into())
        .with_type(short("the type", &row.message_type)?)
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_app_id(envelope::APP_ID.into())
        .with_headers(headers);
    if let [order_id] = row.order_ids.as_slice() {
        props = props.with_correlation_id(order_id.to_string().into());
    }
    if let Some(ms) = row.expiration_ms {
        props = props.with_expiration(ms.max(0).to_string().into());
    }
    Ok(props)
}

/// `value` as an AMQP short string, or why it cannot be one (`what` names it).
fn short(what: &str, value: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|_| {
        format!(
            "{what} is {} bytes, over AMQP's limit of 255: the message cannot be published",
            value.len()
        )
    })
}

/// Whether a publish of this type must be routed (see `MessageType::must_route`).
pub fn mandatory(message_type: &str) -> bool {
    MessageType::parse(message_type).is_none_or(MessageType::must_route)
}

/// Runs until `shutdown`; after it, publishes what is already committed once more (flush)
/// and marks it. `abort_every` is fault injection for the fault suite (0: off): abort the
/// process after the broker confirmed every Nth batch, before it is marked sent.
/// `feed` carries the rows the steps started with it commit (see `outbox::Feed`).
pub async fn run(
    pool: PgPool,
    amqp_url: String,
    abort_every: u32,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = broker::reconnect_backoff();
    let mut batches = 0u32;
    // Kept across broker reconnects: a new session would find the old one's lock held until
    // the server notices it is gone, and stand by for a second for nothing.
    let mut leader: Option<PgConnection> = None;
    loop {
        let mut published = false;
        if leader.is_none() {
            match lead(&pool, &shutdown).await {
                Ok(Some(conn)) => leader = Some(conn),
                Ok(None) => break, // shut down while standing by
                Err(err) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %err, ?delay, "relay cannot reach the database; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        let Some(conn) = leader.as_mut() else { continue };
        match relay(
            conn,
            &feed,
            &amqp_url,
            abort_every,
            &mut batches,
            &mut published,
            &shutdown,
        )
        .await
        {
            Ok(()) => break,
            Err(err) => {
                if !alive(conn).await {
                    leader = None; // its lock went with its session
                }
                if published {
                    // It worked for a while: the next failure starts from a short delay again.
                    backoff = broker::reconnect_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %err, ?delay, "relay failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    if let Some(conn) = leader {
        let _ = conn.close().await;
    }
    tracing::info!("relay stopped");
    Ok(())
}

/// Publishes while it leads (`leader` holds [`LEADER_LOCK`]) until `shutdown`; an error means
/// the broker or the database went away. Every query goes through the leader's own session:
/// each answer proves the lock is still held, and a session kept out of the pool costs no
/// check as it goes back (sqlx pings every connection returned to its pool).
async fn relay(
    leader: &mut PgConnection,
    feed: &Feed,
    amqp_url: &str,
    abort_every: u32,
    batches: &mut u32,
    published: &mut bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (conn, channel) = broker::connect(amqp_url, "relay").await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut publisher = Publisher { conn, channel };
    let mut marks = Marks::default();
    let mut held = Held::default();
    let mut found = Instant::now();
    let mut polled = Instant::now();
    // Read at once: rows the last leader (or a closed feed) left, and after a full batch.
    let mut more = true;
    let _feed = Leading::open(feed);
    tracing::info!("relay publishing");
    loop {
        let mut crash_after_confirm = || {
            *batches += 1;
            abort_every > 0 && batches.is_multiple_of(abort_every)
        };
        // Rows this process handed over go out without being read back; the outbox is read
        // when a commit here asked for it, on the poll's schedule, and when shutting down.
        let handed = feed.take().into_iter().map(handed_row).collect();
        let asked = outbox::take_asked();
        let closing = shutdown.is_cancelled();
        let fed = publish_taken(
            leader,
            &mut publisher,
            &mut marks,
            &mut held,
            handed,
            closing,
            &mut crash_after_confirm,
        )
        .await?;
        let poll = if found.elapsed() >= IDLE_AFTER { IDLE_POLL } else { POLL };
        let mut taken = 0;
        if more || asked || polled.elapsed() >= poll || closing {
            taken = publish_batch(
                leader,
                &mut publisher,
                &mut marks,
                &mut held,
                closing,
                &mut crash_after_confirm,
            )
            .await?;
            polled = Instant::now();
            more = taken as i64 >= BATCH;
            if taken > 0 && !asked {
                // Rows nobody here told it about: written elsewhere, so poll often for a while.
                found = Instant::now();
            }
        }
        *published |= taken + fed > 0;
        if marks.due() {
            marks.flush(leader).await?;
        }
        if more {
            continue; // a full batch: more may be waiting
        }
        if closing {
            break; // flushed what was committed
        }
        let poll = if found.elapsed() >= IDLE_AFTER { IDLE_POLL } else { POLL };
        let next = [marks.wait(), held.wait()]
            .into_iter()
            .flatten()
            .fold(poll.saturating_sub(polled.elapsed()), Duration::min);
        tokio::select! {
            _ = feed.wait() => {}
            _ = outbox::wait_committed() => {}
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    marks.flush(leader).await?;
    let _ = publisher.channel.close(200, "bye".into()).await;
    let _ = publisher.conn.close(200, "bye".into()).await;
    Ok(())
}

/// Waits until this relay holds [`LEADER_LOCK`] (standing by, asking every
/// [`LEADER_CHECK`], while another relay holds it), on a connection of its own taken out of
/// the pool: the lock lives as long as that session. `None` when shut down first.
async fn lead(pool: &PgPool, shutdown: &CancellationToken) -> anyhow::Result<Option<PgConnection>> {
    let mut conn = pool.acquire().await?.detach();
    let mut told = false;
    loop {
        // Within the session timeout: a standby asking a primary that vanished would wait
        // until the kernel gives up, long after the leader it stood by for died with it.
        let held: bool = answered(
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(LEADER_LOCK.0)
                .bind(LEADER_LOCK.1)
                .fetch_one(&mut conn),
        )
        .await?;
        if held {
            return Ok(Some(conn));
        }
        if !told {
            tracing::info!("another relay publishes; standing by");
            told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(LEADER_CHECK) => {}
            _ = shutdown.cancelled() => {
                let _ = conn.close().await;
                return Ok(None);
            }
        }
    }
}

/// Rows are handed to this relay (`Feed::hand_over`) while it publishes; the feed closes when
/// it stops, whatever the reason.
struct Leading<'a>(&'a Feed);

impl<'a> Leading<'a> {
    fn open(feed: &'a Feed) -> Self {
        feed.open();
        Self(feed)
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A row handed over, as it would have been read from the outbox.
fn handed_row(committed: outbox::Committed) -> OutboxRow {
    let message = committed.message;
    OutboxRow {
        id: committed.id,
        message_id: message.message_id,
        exchange: message.exchange.to_owned(),
        routing_key: message.kind.as_str().to_owned(),
        message_type: message.kind.as_str().to_owned(),
        headers: message.headers(),
        order_ids: message.order_ids,
        body: message.body,
        expiration_ms: message.expiration_ms,
        created_at: committed.created_at,
        covers: Vec::new(),
    }
}

/// Whether the leader's session still answers (within [`SESSION_TIMEOUT`]).
async fn alive(conn: &mut PgConnection) -> bool {
    answered(sqlx::query("SELECT 1").execute(&mut *conn)).await.is_ok()
}

/// Longest the relay waits for its session to answer: a server that vanished may never reset
/// the connection, and a lost session is a lost lock (another relay may lead by now).
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// `query`'s answer, or an error once it took longer than [`SESSION_TIMEOUT`].
async fn answered<T>(query: impl Future<Output = sqlx::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(SESSION_TIMEOUT, query).await {
        Ok(answer) => Ok(answer?),
        Err(_) => anyhow::bail!("the relay's database session did not answer within {SESSION_TIMEOUT:?}"),
    }
}

/// Rows the broker confirmed and the relay has not marked sent yet (left out of its polls).
#[derive(Default)]
struct Marks {
    ids: Vec<i64>,
    /// The rows of the last mark: a row handed over late (its writer was slow between its
    /// commit and handing it over) may have been read, published and marked meanwhile.
    marked: HashSet<i64>,
    /// When the oldest of `ids` was confirmed.
    since: Option<Instant>,
}

impl Marks {
    fn add(&mut self, ids: &[i64]) {
        if !ids.is_empty() {
            self.since.get_or_insert_with(Instant::now);
            self.ids.extend_from_slice(ids);
        }
    }

    /// How long until the oldest confirmed row is due to be marked; `None` when there is none.
    fn wait(&self) -> Option<Duration> {
        self.since.map(|t| MARK_DELAY.saturating_sub(t.elapsed()))
    }

    /// Whether a row was published since the last mark but one (so a handed-over copy is not).
    fn knows(&self, id: i64) -> bool {
        self.marked.contains(&id) || self.ids.contains(&id)
    }

    fn due(&self) -> bool {
        self.ids.len() as i64 >= BATCH || self.wait().is_some_and(|w| w.is_zero())
    }

    /// Marks every confirmed row sent in one statement (its own transaction). Rows another
    /// transaction holds are skipped, not waited for: only the previous release's relay locks
    /// rows (a rolling update), and it marks what it publishes itself; a row left unmarked is
    /// published again at worst. On error the rows stay here, to be marked at the next try.
    async fn flush(&mut self, db: &mut PgConnection) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        answered(
            sqlx::query(
                "UPDATE outbox SET sent_at = clock_timestamp() WHERE id IN (
                     SELECT id FROM outbox WHERE id = ANY($1) AND sent_at IS NULL FOR UPDATE SKIP LOCKED)",
            )
            .bind(&self.ids)
            .execute(&mut *db),
        )
        .await?;
        self.marked = self.ids.drain(..).collect();
        self.since = None;
        Ok(())
    }
}

/// A connection and its confirm-mode channel; the channel is replaced when the broker closes
/// it over one message.
pub struct Publisher {
    pub conn: Connection,
    pub channel: Channel,
}

impl Publisher {
    async fn reopen(&mut self) -> lapin::Result<()> {
        let channel = self.conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        self.channel = channel;
        Ok(())
    }
}

/// What became of one row's publish.
enum Published {
    Confirmed,
    /// The broker refused this row; the reason is kept with the row. `nack`: it only said
    /// "not now" (see [`MAX_NACKED_ATTEMPTS`]).
    Refused {
        why: String,
        nack: bool,
    },
    /// The channel failed (maybe over another row): unknown for this one.
    Unknown(lapin::Error),
    /// The row cannot be put on the wire (not sent): parked at once, since trying again
    /// cannot help.
    Unsendable(String),
}

/// Publishes one batch (committed rows not yet sent, parked, in `marks` or `held`) and adds
/// what the broker confirmed to `marks`; rows it refused get their next attempt scheduled (or
/// are parked) at once. Returns how many rows were taken. An error means the connection is
/// gone. `crash_after_confirm` (asked once per non-empty batch) aborts the process in the
/// worst place: confirmed by the broker, not yet marked sent. `closing`: publish what is held.
async fn publish_batch(
    db: &mut PgConnection,
    publisher: &mut Publisher,
    marks: &mut Marks,
    held: &mut Held,
    closing: bool,
    crash_after_confirm: impl FnOnce() -> bool,
) -> anyhow::Result<usize> {
    let in_hand: Vec<i64> = marks.ids.iter().copied().chain(held.ids()).collect();
    let rows: Vec<OutboxRow> = answered(sqlx::query_as(
        "SELECT id, message_id, exchange, routing_key, message_type, order_ids, headers, body, expiration_ms, created_at
         FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL AND (retry_at IS NULL OR retry_at <= now())
           AND id <> ALL($2)
         ORDER BY id LIMIT $1",
    )
    .bind(BATCH)
    .bind(&in_hand)
    .fetch_all(&mut *db))
    .await?;
    publish_taken(db, publisher, marks, held, rows, closing, crash_after_confirm).await
}

/// Publishes rows taken from the outbox or handed over (those `marks` or `held` know already
/// excepted) as one batch, like [`publish_batch`], with the deadline messages `held` has due;
/// deadline rows among `rows` are held (see `deadlines`). Returns how many rows it took.
async fn publish_taken(
    db: &mut PgConnection,
    publisher: &mut Publisher,
    marks: &mut Marks,
    held: &mut Held,
    mut rows: Vec<OutboxRow>,
    closing: bool,
    crash_after_confirm: impl FnOnce() -> bool,
) -> anyhow::Result<usize> {
    rows.retain(|row| !marks.knows(row.id) && !held.knows(row.id));
    let taken = rows.len();
    let mut rows = held.hold(rows);
    rows.extend(held.due(closing));
    if rows.is_empty() {
        return Ok(taken);
    }
    // OpenTelemetry's messaging conventions: the batch's publish is a CLIENT span (`send`
    // operation, RabbitMQ's `publish`): the messages carry their creation spans' context, not
    // this span's, so it links each of them. Named for the exchange when the batch shares one.
    let span = tracing::info_span!(
        "publish",
        rows = rows.len(),
        "otel.kind" = "client",
        "error.type" = tracing::field::Empty,
    );
    if telemetry::exporting() {
        let first = rows[0].exchange.as_str();
        let exchange = rows.iter().all(|r| r.exchange == first).then_some(first);
        let mut attributes = vec![
            ("messaging.system", "rabbitmq".into()),
            ("messaging.operation.type", "send".into()),
            ("messaging.operation.name", "publish".into()),
        ];
        if let Some(exchange) = exchange {
            attributes.push(("messaging.destination.name", exchange.to_owned().into()));
        }
        if rows.len() > 1 {
            attributes.push(("messaging.batch.message_count", (rows.len() as i64).into()));
        }
        telemetry::set_attributes(&span, &attributes);
        for parent in rows
            .iter()
            .filter_map(|r| r.headers["traceparent"].as_str().and_then(TraceParent::parse))
        {
            telemetry::link(&span, parent);
        }
        telemetry::rename(&span, telemetry::messaging_span_name("publish", exchange));
    }
    match publish_rows(db, publisher, rows, crash_after_confirm)
        .instrument(span.clone())
        .await
    {
        Ok(sent) => {
            marks.add(&sent);
            Ok(taken)
        }
        Err(err) => {
            span.record("error.type", "_OTHER");
            Err(err)
        }
    }
}

/// [`publish_batch`] once it has its rows (the batch's span is current): the ids the broker
/// confirmed, to be marked sent.
async fn publish_rows(
    db: &mut PgConnection,
    publisher: &mut Publisher,
    rows: Vec<OutboxRow>,
    crash_after_confirm: impl FnOnce() -> bool,
) -> anyhow::Result<Vec<i64>> {
    // Publish all, then await the confirms (they may arrive out of order).
    let mut pending = Vec::with_capacity(rows.len());
    for row in &rows {
        pending.push(publish(&publisher.channel, row).await);
    }
    let now = Utc::now();
    // Deadline messages wait on purpose (`deadlines::LINGER`): they would hide the delay of the rest.
    for row in rows
        .iter()
        .filter(|r| r.message_type != MessageType::OrderDeadline.as_str())
    {
        let delay = (now - row.created_at).to_std().unwrap_or_default();
        metrics::histogram!(orderflow_shared::metrics::OUTBOX_DELAY).record(delay.as_secs_f64());
    }
    let mut results = Vec::with_capacity(rows.len());
    for publish in pending {
        results.push(settle(publish).await);
    }
    // The broker closed the channel over some row: find which, one row at a time.
    if results.iter().any(|r| matches!(r, Published::Unknown(_))) {
        for (row, result) in rows.iter().zip(results.iter_mut()) {
            if let Published::Unknown(err) = result {
                if !publisher.conn.status().connected() {
                    return Err(anyhow::anyhow!("lost the broker connection: {err}"));
                }
                if !publisher.channel.status().connected() {
                    publisher.reopen().await?;
                }
                *result = settle(publish(&publisher.channel, row).await).await;
                if let Published::Unknown(err) = result {
                    if !publisher.conn.status().connected() {
                        return Err(anyhow::anyhow!("lost the broker connection: {err}"));
                    }
                    *result = Published::refused(format!("the broker closed the channel: {err}"));
                }
            }
        }
        if !publisher.channel.status().connected() {
            publisher.reopen().await?;
        }
    }
    // A nack may come from the channel's own view of a queue whose leader moved (a node of a
    // cluster died): the next batch goes out on a fresh channel, which looks the leader up anew.
    let nacked = results
        .iter()
        .any(|r| matches!(r, Published::Refused { nack: true, .. }));
    if nacked {
        let _ = publisher.channel.close(200, "nacked; reopening".into()).await;
        publisher.reopen().await?;
    }
    if crash_after_confirm() {
        tracing::error!(batch = rows.len(), "fault injection: aborting between confirm and mark");
        std::process::abort();
    }
    let mut sent = Vec::with_capacity(rows.len());
    let (mut refused, mut reasons, mut limits, mut delays) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (row, result) in rows.iter().zip(results) {
        let (why, most, max_delay) = match result {
            Published::Confirmed => {
                sent.extend_from_slice(row.ids());
                continue;
            }
            Published::Unknown(err) => return Err(err.into()),
            Published::Refused { why, nack: true } => (why, MAX_NACKED_ATTEMPTS, MAX_NACKED_RETRY_DELAY_S),
            Published::Refused { why, nack: false } => (why, MAX_ATTEMPTS, MAX_RETRY_DELAY_S),
            Published::Unsendable(why) => (why, 1, MAX_RETRY_DELAY_S),
        };
        tracing::warn!(outbox_id = row.id, covers = ?row.covers, message_type = %row.message_type, exchange = %row.exchange,
            routing_key = %row.routing_key, reason = %why, "a message was refused; it will be retried on its own or parked");
        for &id in row.ids() {
            refused.push(id);
            reasons.push(why.clone());
            limits.push(most);
            delays.push(max_delay);
        }
    }
    if !refused.is_empty() {
        let parked: Vec<i64> = answered(
            sqlx::query_scalar::<_, Option<i64>>(
                "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.why,
                 retry_at = now() + least(power(2, least(o.attempts, 30)), f.max_delay) * interval '1 second',
                 parked_at = CASE WHEN o.attempts + 1 >= f.most THEN now() END
             FROM UNNEST($1::bigint[], $2::text[], $3::int[], $4::int[]) AS f(id, why, most, max_delay)
             WHERE o.id = f.id
             RETURNING CASE WHEN o.parked_at IS NOT NULL THEN o.id END",
            )
            .bind(&refused)
            .bind(&reasons)
            .bind(&limits)
            .bind(&delays)
            .fetch_all(&mut *db),
        )
        .await?
        .into_iter()
        .flatten()
        .collect();
        for id in parked {
            tracing::error!(
                outbox_id = id,
                "a message the broker keeps refusing, or that cannot be published, was parked for an operator"
            );
        }
    }
    Ok(sent)
}

/// Publishes `row`: Err(why) without asking the broker when it cannot be put on the wire.
async fn publish(channel: &Channel, row: &OutboxRow) -> Result<lapin::Result<lapin::PublisherConfirm>, String> {
    let (exchange, body) = wire(row);
    let (exchange, routing_key) = (
        short("the exchange", exchange)?,
        short("the routing key", &row.routing_key)?,
    );
    let properties = properties(row, &body)?;
    Ok(channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: mandatory(&row.message_type),
                immediate: false,
            },
            &body,
            properties,
        )
        .await)
}

/// The exchange and body `row` goes out with. Rows this release writes go as written; two
/// kinds an earlier release writes (both run side by side in a rolling update) are put right:
/// - an `order.deadline` to the deadline exchange without an expiration (an earlier release's
///   recovery worker splits a failed deadline batch that way) would never expire, and at the
///   head of the deadline queue would hold every later deadline behind it: it goes to the
///   expired exchange, straight to the recovery worker, as this release's split sends it;
/// - a public event in the envelope of before CloudEvents goes out as the CloudEvent it stands
///   for (the same id, type and data), which is what its content type says.
pub fn wire(row: &OutboxRow) -> (&str, Cow<'_, [u8]>) {
    let kind = MessageType::parse(&row.message_type);
    let exchange = if kind == Some(MessageType::OrderDeadline)
        && row.exchange == topology::DEADLINE_EXCHANGE
        && row.expiration_ms.is_none()
    {
        topology::EXPIRED_EXCHANGE
    } else {
        row.exchange.as_str()
    };
    let body = if kind.is_some_and(MessageType::is_public) && !is_cloud_event(&row.body) {
        envelope::CloudEvent::from_published(&row.body)
            .and_then(|event| serde_json::to_vec(&event).ok())
            .map_or(Cow::Borrowed(row.body.as_slice()), Cow::Owned)
    } else {
        Cow::Borrowed(row.body.as_slice())
    };
    (exchange, body)
}

/// Whether `body` is a CloudEvent as orderflow writes one (`specversion` first).
fn is_cloud_event(body: &[u8]) -> bool {
    body.starts_with(br#"{"specversion""#)
}

/// The content type `body` (as [`wire`] sends it) goes out with: a public event that could not
/// be put in CloudEvents form (a row that is not an envelope) goes as the JSON it is, so that
/// `application/cloudevents+json` always labels a CloudEvent.
fn content_type(row: &OutboxRow, body: &[u8]) -> &'static str {
    match MessageType::parse(&row.message_type) {
        Some(kind) if kind.is_public() && !is_cloud_event(body) => envelope::CONTENT_TYPE,
        Some(kind) => kind.content_type(),
        None => envelope::CONTENT_TYPE,
    }
}

/// What became of a publish: its confirm awaited.
async fn settle(publish: Result<lapin::Result<lapin::PublisherConfirm>, String>) -> Published {
    match publish {
        Ok(Ok(confirm)) => outcome(confirm.await),
        Ok(Err(err)) => Published::Unknown(err),
        Err(why) => Published::Unsendable(why),
    }
}

impl Published {
    /// A refusal that says something about the message (no exchange, no queue bound, too
    /// large, not allowed): parked after [`MAX_ATTEMPTS`].
    fn refused(why: String) -> Self {
        Self::Refused { why, nack: false }
    }
}

fn outcome(confirm: lapin::Result<Confirmation>) -> Published {
    match confirm {
        Ok(Confirmation::Ack(None)) => Published::Confirmed,
        Ok(Confirmation::Ack(Some(returned))) => {
            Published::refused(format!("unroutable: {} {}", returned.reply_code, returned.reply_text))
        }
        Ok(Confirmation::Nack(_)) => Published::Refused {
            why: "the broker nacked it (a queue without a leader or a majority, or full)".to_owned(),
            nack: true,
        },
        Ok(Confirmation::NotRequested) => Published::refused("no publisher confirm".to_owned()),
        Err(err) => Published::Unknown(err),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use orderflow_shared::messaging::envelope::{CloudEvent, CommandData, Envelope};

    use super::*;

    fn row(kind: MessageType, exchange: &str, body: Vec<u8>, expiration_ms: Option<i64>) -> OutboxRow {
        OutboxRow {
            id: 1,
            message_id: Uuid::now_v7(),
            exchange: exchange.to_owned(),
            routing_key: kind.as_str().to_owned(),
            message_type: kind.as_str().to_owned(),
            order_ids: Vec::new(),
            headers: serde_json::json!({}),
            body,
            expiration_ms,
            created_at: Utc::now(),
            covers: Vec::new(),
        }
    }

    #[test]
    fn what_an_earlier_release_writes_goes_out_as_this_one_would_send_it() {
        let order = Uuid::now_v7();
        let data = serde_json::json!({"orderId": order, "totalAmount": 1000});

        // A CloudEvent goes as written, byte for byte.
        let event = serde_json::to_vec(&CloudEvent::new(MessageType::OrderConfirmed, order, data.clone())).unwrap();
        let new = row(
            MessageType::OrderConfirmed,
            topology::EVENTS_EXCHANGE,
            event.clone(),
            None,
        );
        assert_eq!(wire(&new), (topology::EVENTS_EXCHANGE, Cow::Borrowed(event.as_slice())));

        // The envelope of before: the CloudEvent it stands for, with its id.
        let envelope = Envelope::new(MessageType::OrderConfirmed, Some(order), data.clone());
        let old = row(
            MessageType::OrderConfirmed,
            topology::EVENTS_EXCHANGE,
            serde_json::to_vec(&envelope).unwrap(),
            None,
        );
        let (exchange, body) = wire(&old);
        assert_eq!(content_type(&old, &body), envelope::CLOUDEVENTS_CONTENT_TYPE);
        let sent: CloudEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(exchange, topology::EVENTS_EXCHANGE);
        assert_eq!(
            (
                sent.id,
                sent.kind.as_str(),
                sent.subject,
                &sent.data,
                sent.specversion.as_str()
            ),
            (envelope.id, "order.confirmed", order, &data, "1.0")
        );

        // A deadline with an expiration goes to the deadline queue; one without, straight to
        // the recovery worker (it would never expire).
        let command = serde_json::to_vec(&Envelope::new(
            MessageType::OrderDeadline,
            Some(order),
            CommandData::new(&[order], &[None]),
        ))
        .unwrap();
        let timed = row(
            MessageType::OrderDeadline,
            topology::DEADLINE_EXCHANGE,
            command.clone(),
            Some(60_000),
        );
        assert_eq!(wire(&timed).0, topology::DEADLINE_EXCHANGE);
        let untimed = row(
            MessageType::OrderDeadline,
            topology::DEADLINE_EXCHANGE,
            command.clone(),
            None,
        );
        assert_eq!(
            wire(&untimed),
            (topology::EXPIRED_EXCHANGE, Cow::Borrowed(command.as_slice()))
        );
        // A public event that is not an envelope goes as it is, labelled as the JSON it is.
        let odd = row(
            MessageType::OrderConfirmed,
            topology::EVENTS_EXCHANGE,
            br#"{"not":"an envelope"}"#.to_vec(),
            None,
        );
        let (_, body) = wire(&odd);
        assert_eq!(
            (body.as_ref(), content_type(&odd, &body)),
            (odd.body.as_slice(), envelope::CONTENT_TYPE)
        );
        assert_eq!(content_type(&new, &new.body), envelope::CLOUDEVENTS_CONTENT_TYPE);
        // Other commands go as written.
        let reserve = row(
            MessageType::StockReserve,
            topology::WORK_EXCHANGE,
            command.clone(),
            None,
        );
        assert_eq!(
            wire(&reserve),
            (topology::WORK_EXCHANGE, Cow::Borrowed(command.as_slice()))
        );
    }
}
