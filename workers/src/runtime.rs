//! The one consumer runtime. A worker is only its [`Step`]; everything else lives here:
//! connect and reconnect, declare, prefetch, bounded concurrency, batches of the deliveries
//! already waiting, decode, inbox, guarded transaction, retry of transient errors with
//! backoff, ack after commit, reject poison, a tracing span per delivery, panic containment
//! and graceful shutdown.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use futures_util::{FutureExt, StreamExt};
use lapin::{
    Acker,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions},
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::{
    Error, Result,
    db::{
        kept::{self, Kept},
        outbox::{self, Feed, OutboxMessage},
    },
    messaging::{Envelope, MessageType, topology},
    metrics,
    telemetry::{self, TraceParent},
};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use uuid::Uuid;

use crate::broker;

/// What a step did with one message of its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect and the next messages are written (for at least one of its orders).
    Done,
    /// Nothing to do: every order it names is in another state (late or duplicate).
    Stale,
    /// These orders it names do not exist; the others were handled. A message about one
    /// order is dead-lettered (recorded for an operator); a message about several sends each
    /// missing order on as a message of its own, to be dead-lettered alone.
    Missing(Vec<Uuid>),
    /// The message can never be processed (its data does not fit its type): nothing was
    /// written for it; dead-letter it.
    Poison(String),
}

/// A decoded delivery.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: MessageType,
    pub envelope: Envelope,
    pub trace: Option<TraceParent>,
    /// The orders a command concerns (empty for other messages).
    pub order_ids: Vec<Uuid>,
    /// The trace of each of `order_ids` the message names (aligned; `None` where it names
    /// none, or empty).
    pub order_traces: Vec<Option<TraceParent>>,
}

/// One worker's step: given the transaction (already holding the inbox records) and the
/// messages that arrived together, apply their effects and enqueue what comes next.
pub trait Step: Send + Sync + 'static {
    /// Inbox consumer name and log name.
    const NAME: &'static str;
    /// The queue it consumes.
    const QUEUE: &'static str;

    /// Whether this step handles messages of `kind` (others are rejected as poison).
    fn accepts(&self, kind: MessageType) -> bool;

    /// Turns a delivery into a message; an error dead-letters it. The default reads the
    /// orderflow envelope of a command.
    fn decode(&self, delivery: &Delivery) -> Result<Incoming, String> {
        decode(delivery)
    }

    /// Handles the batch's messages in the caller's transaction, with a constant number of
    /// statements however many orders they name, with the outcome of handling their orders
    /// one after another (serial equivalence; tests/batches.rs). Returns one outcome per
    /// message. Must write nothing for a message it calls `Poison`. `attempt` counts the
    /// transactions this batch already lost a race in ([`Error::Race`]): a step may plan
    /// optimistically at first and take its locks up front on a retry.
    fn handle(
        &self,
        tx: &mut PgConnection,
        batch: &[&Incoming],
        attempt: u32,
    ) -> impl Future<Output = Result<Vec<Outcome>>> + Send;

    /// Whether deliveries that are already waiting may share one transaction.
    const BATCHED: bool = true;

    /// The largest body [`decode`](Self::decode) is given; a larger delivery is dead-lettered
    /// unread.
    const MAX_BODY: usize = MAX_MESSAGE_BYTES;

    /// The queue has no delivery limit (nothing bounds its redeliveries): a message that
    /// failed for good on its [`PARK_AFTER_ATTEMPTS`]th delivery or later is handed to
    /// [`park`](Self::park) instead of being returned to the queue again ([`parks`]).
    const UNBOUNDED_QUEUE: bool = false;

    /// Keeps a message that cannot be handled where an operator sees it (only called when
    /// [`UNBOUNDED_QUEUE`](Self::UNBOUNDED_QUEUE)).
    fn park(&self, _tx: &mut PgConnection, _msg: &Incoming, _error: &str) -> impl Future<Output = Result<()>> + Send {
        async { Err(anyhow::anyhow!("{} cannot park messages", Self::NAME).into()) }
    }
}

/// The largest message a worker decodes: a command names at most 500 orders (about 60 KB with
/// their traceparents), so anything much larger is not orderflow's. Decoding parses JSON into a
/// tree many times the body's size, so a huge message must not reach it.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Attempts at a message on a queue without a delivery limit before it is parked.
pub const PARK_AFTER_ATTEMPTS: i64 = 3;

/// Deliveries of a message that keeps failing transiently before it is parked all the same: a
/// database away for about an hour (each delivery is tried a few times over seconds), or a
/// message whose transaction never answers within `kept::ANSWER_DEADLINE`.
pub const PARK_TRANSIENT_AFTER_ATTEMPTS: i64 = 1_000;

/// Whether a delivery that failed with `err` on its `attempt`th delivery (1 the first) is parked
/// rather than returned to its queue without a delivery limit. A transient failure (the database
/// going away: a failover, a restart) says nothing about the message, which is handled in full
/// once the database is back (parked, its orders would wait for the sweep instead of the action
/// the message asks for), so it counts only past [`PARK_TRANSIENT_AFTER_ATTEMPTS`].
pub fn parks(err: &Error, attempt: i64) -> bool {
    let limit = if err.is_transient() {
        PARK_TRANSIENT_AFTER_ATTEMPTS
    } else {
        PARK_AFTER_ATTEMPTS
    };
    attempt >= limit
}

/// What happened to one delivery; used for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Acked,
    Duplicate,
    Rejected,
    Requeued,
}

impl Disposition {
    /// The `outcome` label of `orderflow_messages_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
            Self::Requeued => "retried",
        }
    }
}

#[derive(Clone)]
pub struct RuntimeConfig {
    pub amqp_url: String,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Most deliveries handled in one transaction.
    pub batch: usize,
    /// How long a batch waits for more deliveries while another batch of its worker is in
    /// flight (WORKER_LINGER; zero: never).
    pub linger: Duration,
    /// How long shutdown waits for in-flight deliveries.
    pub drain_timeout: Duration,
    /// Where the steps hand what they commit to the relay started with them.
    pub feed: Arc<Feed>,
}

/// Consumes `S::QUEUE` until `shutdown`, reconnecting after any broker failure.
pub async fn run<S: Step>(
    step: S,
    pool: PgPool,
    cfg: RuntimeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let step = Arc::new(step);
    let mut backoff = broker::reconnect_backoff();
    while !shutdown.is_cancelled() {
        let mut consumed = false;
        match consume(step.clone(), &pool, &cfg, &shutdown, &mut consumed).await {
            Ok(()) => break,
            Err(err) => {
                // A connection that got as far as consuming starts the back-off over: the
                // next node of a cluster is tried at once, not after the last outage's delay.
                if consumed {
                    backoff = broker::reconnect_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(worker = S::NAME, error = %err, ?delay, "consumer lost its broker connection; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!(worker = S::NAME, "consumer stopped");
    Ok(())
}

/// One connection's life: returns Ok on shutdown, Err when the connection or channel fails;
/// sets `consumed` once it consumes.
async fn consume<S: Step>(
    step: Arc<S>,
    pool: &PgPool,
    cfg: &RuntimeConfig,
    shutdown: &CancellationToken,
    consumed: &mut bool,
) -> lapin::Result<()> {
    let (conn, channel) = broker::connect(&cfg.amqp_url, S::NAME).await?;
    channel.basic_qos(cfg.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            S::QUEUE.into(),
            format!("{}-{}", S::NAME, uuid::Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(worker = S::NAME, queue = S::QUEUE, "consuming");
    *consumed = true;

    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let db = Arc::new(Db {
        kept: Kept::new(pool.clone(), cfg.concurrency.clamp(1, KEPT_CONNECTIONS)),
        feed: cfg.feed.clone(),
    });
    let most = if S::BATCHED { cfg.batch.max(1) } else { 1 };
    let mut in_flight = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else { break Ok(()) };
                    // Whatever arrived while waiting for the permit joins this delivery's
                    // batch. While another batch of this worker is still in flight (the
                    // machine is busy), so does whatever arrives within `linger`: PostgreSQL's
                    // commit_delay with commit_siblings, for batches. Alone, a batch never
                    // waits to fill.
                    let mut batch = vec![delivery];
                    let busy = permits.available_permits() + 1 < cfg.concurrency.max(1);
                    let until = (busy && most > 1 && !cfg.linger.is_zero())
                        .then(|| tokio::time::Instant::now() + cfg.linger);
                    let failed = gather(&mut consumer, &mut batch, most, until, shutdown).await;
                    let (step, db) = (step.clone(), db.clone());
                    // The step's panics are errors (`contained`); one anywhere else must not
                    // keep the batch's deliveries unsettled until the channel closes (an acker
                    // does nothing when dropped): what the batch had not settled goes back to
                    // the queue.
                    let ackers: Vec<Acker> = batch.iter().map(|d| d.acker.clone()).collect();
                    in_flight.spawn(async move {
                        let done = AssertUnwindSafe(process_batch(&*step, &db, batch)).catch_unwind().await;
                        if done.is_err() {
                            requeue_unsettled::<S>(&ackers).await;
                        }
                        drop(permit);
                    });
                    if let Some(err) = failed {
                        break Err(err);
                    }
                }
                Some(Err(err)) => break Err(err),
                None => break Err(stream_ended()),
            },
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(err) = joined {
                    tracing::error!(worker = S::NAME, error = %err, "a delivery task failed");
                }
            }
        }
    };

    // Stop taking deliveries, then let the in-flight ones finish and ack.
    let tag = consumer.tag();
    let _ = channel.basic_cancel(tag, Default::default()).await;
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            worker = S::NAME,
            "in-flight deliveries did not finish in time; the broker will redeliver them"
        );
        in_flight.abort_all();
    }
    let _ = channel.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    result
}

/// Returns to the queue every delivery of a batch whose task panicked that it had not settled
/// (a delivery it acked or rejected stays so).
async fn requeue_unsettled<S: Step>(ackers: &[Acker]) {
    let unsettled = ackers.iter().filter(|a| a.usable()).count();
    tracing::error!(
        worker = S::NAME,
        deliveries = unsettled,
        "a delivery task panicked; returning its unsettled deliveries to the queue"
    );
    for acker in ackers {
        let requeued = acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        if matches!(requeued, Ok(true)) {
            metrics::message(S::QUEUE, Disposition::Requeued.label());
        }
    }
}

/// Adds to `batch`, up to `most`, the deliveries already buffered and, until `until` (if it
/// is still ahead) or `shutdown`, those that arrive meanwhile. Returns the consumer's failure,
/// if it failed.
async fn gather(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<Delivery>,
    most: usize,
    until: Option<tokio::time::Instant>,
    shutdown: &CancellationToken,
) -> Option<lapin::Error> {
    while batch.len() < most {
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None => match until {
                Some(until) => tokio::select! {
                    next = tokio::time::timeout_at(until, consumer.next()) => match next {
                        Ok(next) => next,
                        Err(_) => return None,
                    },
                    _ = shutdown.cancelled() => return None,
                },
                None => return None,
            },
        };
        match next {
            Some(Ok(delivery)) => batch.push(delivery),
            Some(Err(err)) => return Some(err),
            None => return Some(stream_ended()),
        }
    }
    None
}

fn stream_ended() -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
        lapin::ChannelState::Closed,
        "consumer stream ended",
    ))
}

/// A decoded delivery with its tracing span.
struct Item {
    delivery: Delivery,
    msg: Incoming,
    span: Span,
    /// For a message about several orders, while spans are exported: a span per order the
    /// message gave a trace, in that trace (aligned with `msg.order_ids`); empty otherwise
    /// (for a message about one order, `span` is the order's).
    order_spans: Vec<Option<Span>>,
}

impl Item {
    /// The trace context each order goes on in here: its span, or else the trace the message
    /// gave it. An order the message gave no trace has none (its stored trace is used).
    fn order_traces(&self) -> impl Iterator<Item = (Uuid, TraceParent)> + '_ {
        let single = self.msg.order_ids.len() == 1;
        self.msg.order_ids.iter().enumerate().filter_map(move |(i, &order)| {
            let given = self.msg.trace_of(i)?;
            let here = match self.order_spans.get(i) {
                Some(span) => span.as_ref().and_then(telemetry::of),
                None if single => telemetry::of(&self.span),
                None => None,
            };
            Some((order, here.unwrap_or(given)))
        })
    }

    /// Records how the delivery ended on its span and on its orders' spans.
    fn report(&self, disposition: Disposition, err: Option<&Error>) {
        self.span.in_scope(|| report(disposition, err));
        if let Some(kind) = failure_kind(disposition, err) {
            for span in self.order_spans.iter().flatten() {
                span.record("error.type", kind);
            }
        }
    }
}

impl Incoming {
    /// The trace the message gave its `i`th order: its entry in `data.traceparents`, or, for
    /// the first order, the message's `traceparent` header (a message names its first order's
    /// trace there; the others have none unless listed).
    fn trace_of(&self, i: usize) -> Option<TraceParent> {
        self.order_traces
            .get(i)
            .copied()
            .flatten()
            .or(if i == 0 { self.trace } else { None })
    }
}

/// Decodes a delivery, or dead-letters it when it is not for this step.
async fn accept<S: Step>(step: &S, delivery: Delivery) -> Option<Item> {
    let decoded = if delivery.data.len() > S::MAX_BODY {
        Err(format!(
            "{} bytes, too large to be orderflow's: not read",
            delivery.data.len()
        ))
    } else {
        // A decoder's panic makes the delivery undecodable, not the worker's end.
        std::panic::catch_unwind(AssertUnwindSafe(|| step.decode(&delivery)))
            .unwrap_or_else(|panic| Err(format!("decoding panicked: {}", panic_message(&*panic))))
            .and_then(|msg| {
                if step.accepts(msg.kind) {
                    Ok(msg)
                } else {
                    Err(format!("message type {} not handled here", msg.kind.as_str()))
                }
            })
    };
    let msg = match decoded {
        Ok(msg) => msg,
        Err(why) => {
            tracing::warn!(worker = S::NAME, %why, "dead-lettering a message this worker cannot take");
            settle(&delivery, Disposition::Rejected).await;
            metrics::message(S::QUEUE, Disposition::Rejected.label());
            return None;
        }
    };
    // The message's creation span is the delivery span's parent: one order, one trace, across
    // processes. A message about several orders also gets a span per order, each a child of
    // that order's creation span, so that every order's trace shows each step it went through.
    let span = consumer_span(S::NAME, &delivery, &msg, msg.envelope.order_id, msg.trace);
    let order_spans = if msg.order_ids.len() > 1 && telemetry::exporting() {
        (0..msg.order_ids.len())
            .map(|i| {
                let parent = msg.trace_of(i)?;
                Some(consumer_span(
                    S::NAME,
                    &delivery,
                    &msg,
                    Some(msg.order_ids[i]),
                    Some(parent),
                ))
            })
            .collect()
    } else {
        Vec::new()
    };
    Some(Item {
        delivery,
        msg,
        span,
        order_spans,
    })
}

/// A CONSUMER span in OpenTelemetry's messaging conventions for RabbitMQ, named `process
/// <exchange>`, its destination the exchange the message was published to; a child of
/// `parent`. `order` is the order it stands for, if one.
fn consumer_span(
    worker: &'static str,
    delivery: &Delivery,
    msg: &Incoming,
    order: Option<Uuid>,
    parent: Option<TraceParent>,
) -> Span {
    let exchange = delivery.exchange.as_str();
    let span = tracing::info_span!(
        "delivery",
        worker,
        kind = msg.kind.as_str(),
        orders = if order.is_some() { 1 } else { msg.order_ids.len() },
        order_id = order.map(|o| o.to_string()).unwrap_or_default(),
        message_id = %msg.envelope.id,
        trace_id = parent.map(|t| t.trace_id_hex()).unwrap_or_default(),
        attempt = delivery_count(delivery).saturating_add(1),
        "otel.kind" = "consumer",
        "error.type" = tracing::field::Empty,
    );
    if let Some(parent) = parent {
        telemetry::set_parent(&span, parent);
    }
    if telemetry::exporting() {
        telemetry::set_attributes(
            &span,
            &[
                ("messaging.system", "rabbitmq".into()),
                ("messaging.operation.type", "process".into()),
                ("messaging.operation.name", "process".into()),
                ("messaging.destination.name", exchange.to_owned().into()),
                (
                    "messaging.rabbitmq.destination.routing_key",
                    delivery.routing_key.to_string().into(),
                ),
                (
                    "messaging.rabbitmq.message.delivery_tag",
                    i64::try_from(delivery.delivery_tag).unwrap_or(i64::MAX).into(),
                ),
                ("messaging.message.id", msg.envelope.id.to_string().into()),
            ],
        );
        telemetry::rename(&span, telemetry::messaging_span_name("process", Some(exchange)));
    }
    span
}

/// Handles deliveries that arrived together, in one transaction ([`handle`]): one BEGIN,
/// inbox insert, set of step statements and COMMIT for all their orders. If that fails, each
/// delivery goes on alone ([`isolate`]), so a message that cannot be handled never takes its
/// neighbours down with it.
async fn process_batch<S: Step>(step: &S, db: &Db, deliveries: Vec<Delivery>) {
    let mut items = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        items.extend(accept(step, delivery).await);
    }
    if items.is_empty() {
        return;
    }
    let started = Instant::now();
    let together = items.len() > 1 || items[0].msg.order_ids.len() > 1;
    if together {
        let batch = batch_span(S::NAME, &items);
        let mut attempt = 0;
        let err = loop {
            match handle(step, db, &items, attempt).await {
                Ok(dispositions) => {
                    finish::<S>(&items, &dispositions, started).await;
                    return;
                }
                // A lost race or a deadlock: the same batch again, at once.
                Err(err @ Error::Race(_)) if attempt < RACE_RETRIES => {
                    tracing::debug!(worker = S::NAME, error = %err, attempt, "batch lost a race; retrying it");
                    attempt += 1;
                }
                Err(err) => break err,
            }
        };
        if let Some(batch) = &batch {
            batch.record("error.type", error_type(&err));
        }
        tracing::warn!(worker = S::NAME, deliveries = items.len(), error = %err,
            "batch failed; handling its deliveries one by one");
    }
    for item in items {
        isolate(step, db, item).await;
    }
}

/// The batch's own CONSUMER span while spans are exported, linked to the creation span of
/// every message it handles (each delivery keeps its span in its order's trace). Never
/// entered: what the step sends goes on in each order's trace, not the batch's. Named for the
/// exchange its deliveries came through, when they share one.
fn batch_span(worker: &'static str, items: &[Item]) -> Option<Span> {
    if !telemetry::exporting() {
        return None;
    }
    let first = items[0].delivery.exchange.as_str();
    let exchange = items
        .iter()
        .all(|i| i.delivery.exchange.as_str() == first)
        .then_some(first);
    let span = tracing::info_span!(
        "batch",
        worker,
        "otel.kind" = "consumer",
        "error.type" = tracing::field::Empty
    );
    let mut attributes = vec![
        ("messaging.system", "rabbitmq".into()),
        ("messaging.operation.type", "process".into()),
        ("messaging.operation.name", "process".into()),
    ];
    if let Some(exchange) = exchange {
        attributes.push(("messaging.destination.name", exchange.to_owned().into()));
    }
    // The conventions' batch attribute is for more than one message.
    if items.len() > 1 {
        attributes.push(("messaging.batch.message_count", (items.len() as i64).into()));
    }
    telemetry::set_attributes(&span, &attributes);
    for parent in items.iter().filter_map(|i| i.msg.trace) {
        telemetry::link(&span, parent);
    }
    telemetry::rename(&span, telemetry::messaging_span_name("process", exchange));
    Some(span)
}

/// What a consumer's transactions work with: its connections, kept between transactions, and
/// the relay started with it, which takes the outbox rows they commit.
struct Db {
    kept: Arc<Kept>,
    feed: Arc<Feed>,
}

/// Most connections a consumer keeps between its transactions (see [`Kept`]): one per batch
/// in flight, up to this many.
const KEPT_CONNECTIONS: usize = 2;

/// How often a batch that lost a race is tried again before its deliveries go on alone.
const RACE_RETRIES: u32 = 3;

/// Acks, rejects or returns each delivery as decided, with logs and metrics.
async fn finish<S: Step>(items: &[Item], dispositions: &[Disposition], started: Instant) {
    let orders: usize = items.iter().map(|i| i.msg.order_ids.len().max(1)).sum();
    if dispositions.iter().any(|d| *d != Disposition::Requeued) {
        metrics::step_batch(S::NAME, orders);
    }
    for (item, &disposition) in items.iter().zip(dispositions) {
        item.report(disposition, None);
        metrics::step_duration(S::NAME, started.elapsed());
        settle(&item.delivery, disposition).await;
        metrics::message(S::QUEUE, disposition.label());
    }
}

/// One delivery on its own: a message about several orders is split into one message per
/// order (each then has its own attempts and, if need be, its own dead letter); a message
/// about one order is handled alone, transient failures retried with backoff, then returned
/// to the queue (its delivery limit counts the attempts). On a queue without a delivery
/// limit, a message that keeps failing is parked.
async fn isolate<S: Step>(step: &S, db: &Db, item: Item) {
    let pool = db.kept.pool();
    let started = Instant::now();
    let items = std::slice::from_ref(&item);
    let tries = std::sync::atomic::AtomicU32::new(0);
    let attempt = || async {
        let attempt = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if item.msg.order_ids.len() > 1 {
            kept::answered(split::<S>(pool, &item)).await
        } else {
            Ok(handle(step, db, items, attempt).await?[0])
        }
    };
    let result = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(5)
                .with_jitter(),
        )
        .when(Error::is_transient)
        .notify(|err, delay| {
            metrics::message(S::QUEUE, "retried");
            item.span
                .in_scope(|| tracing::warn!(error = %err, ?delay, "transient failure; retrying"));
        })
        .instrument(item.span.clone())
        .await;
    let disposition = match result {
        Ok(d) => d,
        Err(err) if S::UNBOUNDED_QUEUE && parks(&err, delivery_count(&item.delivery).saturating_add(1)) => {
            park(step, pool, &item, &err).await
        }
        Err(err) => {
            item.report(Disposition::Requeued, Some(&err));
            if !S::UNBOUNDED_QUEUE {
                record_failure(pool, S::NAME, &[(item.msg.envelope.id, format!("{err:#}"))]).await;
            }
            Disposition::Requeued
        }
    };
    finish::<S>(items, &[disposition], started).await;
}

/// Keeps the error a delivery failed with (`delivery_failures`), so that its dead letter, if
/// the broker gives up on it, says why and falls into the right failure group. Best effort: a
/// database that cannot take this cannot take the step either, and the letter is still
/// recorded, only without its error.
async fn record_failure(pool: &PgPool, consumer: &str, failures: &[(Uuid, String)]) {
    let (ids, errors): (Vec<Uuid>, Vec<String>) = failures
        .iter()
        .map(|(id, e)| (*id, e.replace('\0', "\u{FFFD}")))
        .unzip();
    if let Err(err) = kept::answered_query(
        sqlx::query(FAILURES)
            .bind(consumer)
            .bind(&ids)
            .bind(&errors)
            .execute(pool),
    )
    .await
    {
        tracing::debug!(error = %err, "could not record a delivery failure");
    }
}

/// Upserts (consumer, message id, error) rows: `$1` the consumer, `$2` and `$3` aligned arrays
/// (errors with NUL replaced: PostgreSQL's text cannot hold it).
const FAILURES: &str = "INSERT INTO delivery_failures (consumer, message_id, error)
     SELECT $1, id, left(error, 2000) FROM unnest($2::uuid[], $3::text[]) AS f(id, error)
     ON CONFLICT (consumer, message_id) DO UPDATE SET error = EXCLUDED.error, failed_at = now()";

/// Keeps a message that failed too often on a queue without a delivery limit (see
/// [`Step::park`]); if even that fails, it goes back to the queue.
async fn park<S: Step>(step: &S, pool: &PgPool, item: &Item, err: &Error) -> Disposition {
    let why = format!("{err:#}");
    let parked = kept::answered(async {
        let mut tx = pool.begin().await?;
        step.park(&mut tx, &item.msg, &why).await?;
        tx.commit().await?;
        Ok::<_, Error>(())
    })
    .await;
    match parked {
        Ok(()) => {
            item.span
                .in_scope(|| tracing::error!(error = %why, "message failed every attempt; parked for an operator"));
            Disposition::Acked
        }
        Err(park_err) => {
            item.span.in_scope(|| {
                tracing::error!(error = %why, park_error = %park_err, "message failed and could not be parked; returning it")
            });
            Disposition::Requeued
        }
    }
}

/// Logs what happened to a delivery (inside its span) and records a failure's `error.type`.
fn report(disposition: Disposition, err: Option<&Error>) {
    if let Some(kind) = failure_kind(disposition, err) {
        Span::current().record("error.type", kind);
    }
    match (disposition, err) {
        (Disposition::Rejected, _) => tracing::warn!("message cannot be processed; dead-lettering"),
        (Disposition::Requeued, Some(err)) => {
            tracing::error!(error = %err, "step failed; returning the delivery to the queue");
        }
        (d, _) => tracing::debug!(disposition = ?d, "processed"),
    }
}

/// The `error.type` of a delivery that ended this way, if it failed.
fn failure_kind(disposition: Disposition, err: Option<&Error>) -> Option<&'static str> {
    match (disposition, err) {
        (Disposition::Rejected, _) => Some("rejected"),
        (Disposition::Requeued, Some(err)) => Some(error_type(err)),
        _ => None,
    }
}

/// `error.type` of a failed span: a low-cardinality class of the error (OpenTelemetry's
/// recorded-errors convention): the client code, or what kind of failure it was.
fn error_type(err: &Error) -> &'static str {
    match err {
        Error::Client { code, .. } => code,
        Error::Unavailable(_) => "database_unavailable",
        Error::Race(_) => "race",
        Error::Internal(_) => "_OTHER",
    }
}

/// One transaction for the deliveries: one inbox insert that also finds the duplicates (the
/// same message twice in the batch counts once), the step for the fresh ones, what their
/// outcomes need (missing orders sent on alone, inbox records of rejected messages removed
/// so that a replay of their dead letter is handled), one commit.
/// A step's panic as an error that is not transient: its deliveries then take the path of any
/// such failure (a batch is tried one delivery at a time, a message about several orders is
/// split, one delivery goes back to its queue until the delivery limit dead-letters it, or is
/// parked where there is no limit), so a bug met by one order never fails its neighbours. The
/// transaction the step ran in is dropped, so rolled back.
async fn contained<T>(step: impl Future<Output = Result<T>>) -> Result<T> {
    AssertUnwindSafe(step)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(anyhow::anyhow!("the step panicked: {}", panic_message(&*panic)).into()))
}

/// What a panic said, if it said it in text.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

async fn handle<S: Step>(step: &S, db: &Db, items: &[Item], attempt: u32) -> Result<Vec<Disposition>> {
    let mut conn = db.kept.acquire().await?;
    let done = tokio::time::timeout(kept::ANSWER_DEADLINE, transaction(step, &mut conn, items, attempt)).await;
    let (dispositions, written) = conn.settle(done)?;
    if let Some((written, unstaged)) = written {
        db.feed.hand_over(written);
        if unstaged {
            outbox::committed(); // rows it was not handed (or none: a step may write without staging)
        }
    }
    Ok(dispositions)
}

/// The outbox rows a committed transaction staged, for the relay, and whether it also wrote
/// rows it did not stage.
type Staged = Option<(Vec<outbox::Committed>, bool)>;

/// [`handle`]'s transaction on `conn`, committed: each delivery's disposition, and what it wrote
/// to the outbox.
async fn transaction<S: Step>(
    step: &S,
    conn: &mut PgConnection,
    items: &[Item],
    attempt: u32,
) -> Result<(Vec<Disposition>, Staged)> {
    let mut tx = conn.begin().await?;
    let ids: Vec<Uuid> = items.iter().map(|i| i.msg.envelope.id).collect();
    let mut fresh: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO inbox (consumer, message_id) SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind(S::NAME)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut dispositions = vec![Disposition::Duplicate; items.len()];
    let todo: Vec<usize> = (0..items.len())
        .filter(|&i| fresh.remove(&items[i].msg.envelope.id))
        .collect();
    if todo.is_empty() {
        tx.commit().await?; // wrote nothing; keeps the connection clean for the next batch
        return Ok((dispositions, None));
    }
    let batch: Vec<&Incoming> = todo.iter().map(|&i| &items[i].msg).collect();
    let traces = todo.iter().flat_map(|&i| items[i].order_traces()).collect();
    // What the step writes to the outbox is handed to the relay after the commit.
    let (outcomes, written) = outbox::staged(telemetry::with_order_traces(
        traces,
        contained(step.handle(&mut tx, &batch, attempt)),
    ))
    .instrument(items[todo[0]].span.clone())
    .await;
    let outcomes = outcomes?;
    let mut forget = Vec::new();
    let mut why_rejected = Vec::new();
    let mut alone = Vec::new();
    for (&i, outcome) in todo.iter().zip(outcomes) {
        let msg = &items[i].msg;
        dispositions[i] = match outcome {
            Outcome::Done => Disposition::Acked,
            Outcome::Stale => Disposition::Duplicate,
            Outcome::Poison(why) => {
                items[i].span.in_scope(|| tracing::warn!(%why, "poison message"));
                forget.push(msg.envelope.id);
                why_rejected.push(why.replace('\0', "\u{FFFD}"));
                Disposition::Rejected
            }
            Outcome::Missing(missing) if msg.order_ids.len() <= 1 => {
                forget.push(msg.envelope.id);
                why_rejected.push(format!("no such order: {missing:?}"));
                Disposition::Rejected
            }
            Outcome::Missing(missing) => {
                items[i]
                    .span
                    .in_scope(|| tracing::warn!(orders = ?missing, "message names orders that do not exist; sending them on alone"));
                alone.extend(split_messages(&items[i], &missing)?);
                Disposition::Acked
            }
        };
    }
    if !forget.is_empty() {
        sqlx::query("DELETE FROM inbox WHERE consumer = $1 AND message_id = ANY($2)")
            .bind(S::NAME)
            .bind(&forget)
            .execute(&mut *tx)
            .await?;
        sqlx::query(FAILURES)
            .bind(S::NAME)
            .bind(&forget)
            .bind(&why_rejected)
            .execute(&mut *tx)
            .await?;
    }
    outbox::enqueue(&mut tx, &alone).await?;
    tx.commit().await?;
    let unstaged = written.is_empty() || !alone.is_empty();
    Ok((dispositions, Some((written, unstaged))))
}

/// Splits a message about several orders into one message per order, in one transaction
/// with its inbox record (a redelivered original is then a duplicate).
async fn split<S: Step>(pool: &PgPool, item: &Item) -> Result<Disposition> {
    let msg = &item.msg;
    let mut tx = pool.begin().await?;
    let fresh = sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(S::NAME)
        .bind(msg.envelope.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if !fresh {
        return Ok(Disposition::Duplicate);
    }
    outbox::enqueue(&mut tx, &split_messages(item, &msg.order_ids)?).await?;
    tx.commit().await?;
    outbox::committed();
    tracing::warn!(
        orders = msg.order_ids.len(),
        "split a message that failed into one message per order"
    );
    Ok(Disposition::Acked)
}

/// One message of the same type per order, each with an id derived from the original's (so
/// that splitting the same message twice makes the same messages, which inboxes absorb), each
/// in its order's trace (from its span here, when it has one; an order the message gave no
/// trace is sent without one, and its next step uses its stored trace). Each goes straight
/// back to the queue the original came from: a deadline being handled has passed, so its parts
/// go to the recovery queue through the exchange the deadline queue expires into, not to the
/// deadline queue, where without an expiration they would wait at its head for ever and hold
/// every later deadline behind them.
fn split_messages(item: &Item, orders: &[Uuid]) -> Result<Vec<OutboxMessage>> {
    let traces: HashMap<Uuid, TraceParent> = item.order_traces().collect();
    let exchange = match item.msg.kind {
        MessageType::OrderDeadline => topology::EXPIRED_EXCHANGE,
        kind => kind.exchange(),
    };
    orders
        .iter()
        .map(|&order| {
            OutboxMessage::command_through(item.msg.kind, exchange, order, traces.get(&order).copied())?
                .with_id(Uuid::new_v5(&item.msg.envelope.id, order.as_bytes()))
        })
        .collect()
}

async fn settle(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Acked | Disposition::Duplicate => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::Rejected => delivery.acker.reject(BasicRejectOptions { requeue: false }).await,
        Disposition::Requeued => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    if let Err(err) = result {
        // The channel is gone; the broker redelivers, and the inbox makes that harmless.
        tracing::warn!(error = %err, "could not settle a delivery; it will be redelivered");
    }
}

/// Reads the orderflow envelope of a command (its orders in `data.orderIds`) and the
/// `traceparent` header.
pub fn decode(delivery: &Delivery) -> Result<Incoming, String> {
    let envelope: Envelope = serde_json::from_slice(&delivery.data).map_err(|e| format!("invalid envelope: {e}"))?;
    let kind = MessageType::parse(&envelope.kind).ok_or_else(|| format!("unknown message type {:?}", envelope.kind))?;
    let (order_ids, order_traces) = envelope.command()?;
    let trace = header_str(delivery, "traceparent").and_then(TraceParent::parse);
    Ok(Incoming {
        kind,
        envelope,
        trace,
        order_ids,
        order_traces,
    })
}

pub fn header_str<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a str> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// How many times the broker delivered this message before (quorum queues count it).
pub fn delivery_count(delivery: &Delivery) -> i64 {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("x-delivery-count") {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::LongUInt(n)) => Some(i64::from(*n)),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_failure_parks_a_message_from_its_third_delivery_a_transient_one_far_later() {
        let lasting = Error::Internal(anyhow::anyhow!("a record the database refuses"));
        assert!(!parks(&lasting, 1));
        assert!(!parks(&lasting, PARK_AFTER_ATTEMPTS - 1));
        assert!(parks(&lasting, PARK_AFTER_ATTEMPTS));
        // The database away (a failover) or a lost race: back to the queue, for a long while.
        for transient in [
            Error::Unavailable(sqlx::Error::PoolTimedOut),
            Error::Race("deadlock".into()),
        ] {
            assert!(!parks(&transient, PARK_AFTER_ATTEMPTS));
            assert!(!parks(&transient, PARK_TRANSIENT_AFTER_ATTEMPTS - 1));
            assert!(parks(&transient, PARK_TRANSIENT_AFTER_ATTEMPTS));
        }
    }
}
