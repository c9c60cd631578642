//! The one consumer runtime. A worker is only its [`Step`]; everything else lives here:
//! connect and reconnect, declare, prefetch, bounded concurrency, batches of the deliveries
//! already waiting, decode, inbox, guarded transaction, retry of transient errors with
//! backoff, ack after commit, reject poison, a tracing span per delivery, panic containment
//! and graceful shutdown.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use futures_util::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions},
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::{
    Error, Result,
    db::{
        orders::{self, OrderRow},
        outbox,
    },
    messaging::{Envelope, MessageType},
    metrics,
    telemetry::{self, TraceParent},
};
use sqlx::{PgConnection, PgPool};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use uuid::Uuid;

use crate::broker;

/// What a step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect and the next messages are written; commit.
    Done,
    /// The order is not in the state this message expects (late or duplicate): change
    /// nothing, ack.
    Stale,
    /// The message can never be processed (its data does not fit its type): change
    /// nothing, dead-letter it.
    Poison(String),
}

/// A decoded delivery.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: MessageType,
    pub envelope: Envelope,
    pub trace: Option<TraceParent>,
    /// The message's order as its batch locked it, before any message of the batch ran (on
    /// the first message of each order in a batch only): the step's lock need not ask again.
    pub locked: Option<OrderRow>,
}

/// One worker's step: given the transaction (already holding the inbox record) and the
/// message, apply the effect and enqueue what comes next.
pub trait Step: Send + Sync + 'static {
    /// Inbox consumer name and log name.
    const NAME: &'static str;
    /// The queue it consumes.
    const QUEUE: &'static str;

    /// Whether this step handles messages of `kind` (others are rejected as poison).
    fn accepts(&self, kind: MessageType) -> bool;

    /// Turns a delivery into a message; an error dead-letters it. The default reads the
    /// orderflow envelope.
    fn decode(&self, delivery: &Delivery) -> Result<Incoming, String> {
        decode(delivery)
    }

    fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> impl Future<Output = Result<Outcome>> + Send;

    /// Whether deliveries that are already waiting may share one transaction (see
    /// [`process_batch`]). A batched step's `handle` must write nothing before it returns
    /// `Stale` or `Poison`.
    const BATCHED: bool = true;

    /// Takes every row lock the batch's messages will take, in one global order (orders by
    /// id, then the step's own rows by key), before they are handled one by one in the
    /// batch's transaction. Without it, two batches could lock the same rows in opposite
    /// orders and deadlock. Returns the orders it locked (read under the lock, so each
    /// message's own lock can be skipped). The default locks the messages' orders.
    fn lock_batch(
        &self,
        tx: &mut PgConnection,
        batch: &[&Incoming],
    ) -> impl Future<Output = Result<Vec<OrderRow>>> + Send {
        let ids = order_ids(batch);
        async move { orders::lock_all(tx, &ids).await }
    }
}

/// The distinct orders of a batch, sorted.
pub fn order_ids(batch: &[&Incoming]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = batch.iter().map(|m| m.envelope.order_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
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
    /// How long shutdown waits for in-flight deliveries.
    pub drain_timeout: Duration,
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
        match consume(step.clone(), &pool, &cfg, &shutdown).await {
            Ok(()) => break,
            Err(err) => {
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

/// One connection's life: returns Ok on shutdown, Err when the connection or channel fails.
async fn consume<S: Step>(
    step: Arc<S>,
    pool: &PgPool,
    cfg: &RuntimeConfig,
    shutdown: &CancellationToken,
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

    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else { break Ok(()) };
                    // Whatever arrived while waiting for the permit joins this delivery's
                    // batch; a batch never waits to fill.
                    let mut batch = vec![delivery];
                    let mut failed = None;
                    while batch.len() < cfg.batch {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(delivery))) => batch.push(delivery),
                            Some(Some(Err(err))) => {
                                failed = Some(err);
                                break;
                            }
                            Some(None) => {
                                failed = Some(stream_ended());
                                break;
                            }
                            None => break,
                        }
                    }
                    let (step, pool) = (step.clone(), pool.clone());
                    in_flight.spawn(async move {
                        process_batch(&*step, &pool, batch).await;
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
                    tracing::error!(worker = S::NAME, error = %err, "delivery task panicked; the delivery will be redelivered");
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
}

/// Decodes a delivery, or dead-letters it when it is not for this step.
async fn accept<S: Step>(step: &S, delivery: Delivery) -> Option<Item> {
    let msg = match step.decode(&delivery) {
        Ok(msg) if step.accepts(msg.kind) => msg,
        Ok(msg) => {
            tracing::warn!(
                worker = S::NAME,
                kind = msg.kind.as_str(),
                "message type not handled here; dead-lettering"
            );
            settle(&delivery, Disposition::Rejected).await;
            metrics::message(S::QUEUE, Disposition::Rejected.label());
            return None;
        }
        Err(why) => {
            tracing::warn!(worker = S::NAME, %why, "undecodable message; dead-lettering");
            settle(&delivery, Disposition::Rejected).await;
            metrics::message(S::QUEUE, Disposition::Rejected.label());
            return None;
        }
    };
    let span = tracing::info_span!(
        "delivery",
        worker = S::NAME,
        kind = msg.kind.as_str(),
        order_id = %msg.envelope.order_id,
        message_id = %msg.envelope.id,
        trace_id = msg.trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        attempt = delivery_count(&delivery) + 1,
    );
    // The producer's span is this span's parent: one order, one trace, across processes.
    if let Some(parent) = msg.trace {
        telemetry::set_parent(&span, parent);
    }
    Some(Item { delivery, msg, span })
}

/// Handles deliveries that arrived together. Several go through one transaction
/// ([`handle_batch`]): one BEGIN, inbox insert and COMMIT for all of them instead of one
/// each, which is most of a step's round trips. If that transaction fails, or one message
/// turns out to be poison, it is rolled back and every delivery goes through on its own,
/// with its own retries and outcome, exactly as a batch of one.
async fn process_batch<S: Step>(step: &S, pool: &PgPool, deliveries: Vec<Delivery>) {
    let mut items = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        items.extend(accept(step, delivery).await);
    }
    if items.len() > 1 && S::BATCHED {
        let started = Instant::now();
        match handle_batch(step, pool, &mut items).await {
            Ok(Some(dispositions)) => {
                metrics::step_batch(S::NAME, items.len());
                for (item, disposition) in items.iter().zip(dispositions) {
                    item.span.in_scope(|| report(disposition, None));
                    metrics::step_duration(S::NAME, started.elapsed());
                    settle(&item.delivery, disposition).await;
                    metrics::message(S::QUEUE, disposition.label());
                }
                return;
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(worker = S::NAME, size = items.len(), error = %err, "batch failed; handling its deliveries one by one");
            }
        }
    }
    for mut item in items {
        // Whatever the failed batch read is not this transaction's to trust.
        item.msg.locked = None;
        process(step, pool, item).await;
    }
}

/// Handles one delivery in its own transaction, retrying transient failures, and settles it.
async fn process<S: Step>(step: &S, pool: &PgPool, item: Item) {
    let Item { delivery, msg, span } = item;
    let started = Instant::now();
    let disposition = async {
        let attempt = || handle_once(step, pool, &msg);
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
                tracing::warn!(error = %err, ?delay, "transient failure; retrying");
            })
            .await;
        match result {
            Ok(d) => {
                report(d, None);
                d
            }
            Err(err) => {
                report(Disposition::Requeued, Some(&err));
                Disposition::Requeued
            }
        }
    }
    .instrument(span)
    .await;
    if disposition != Disposition::Requeued {
        metrics::step_batch(S::NAME, 1);
    }
    metrics::step_duration(S::NAME, started.elapsed());
    settle(&delivery, disposition).await;
    metrics::message(S::QUEUE, disposition.label());
}

/// Logs what happened to a delivery (inside its span).
fn report(disposition: Disposition, err: Option<&Error>) {
    match (disposition, err) {
        (Disposition::Rejected, _) => tracing::warn!("message cannot be processed; dead-lettering"),
        (Disposition::Requeued, Some(err)) => {
            tracing::error!(error = %err, "step failed; returning the delivery to the queue");
        }
        (d, _) => tracing::debug!(disposition = ?d, "processed"),
    }
}

/// Several deliveries in one transaction: one inbox insert that also finds the duplicates,
/// the step's locks for the whole batch in a global order, each message's step in turn (a
/// later message sees what an earlier one did, as if they ran one after another), one
/// commit. Returns `None` when a message is poison (the batch is rolled back and every
/// delivery handled on its own, so only that one is dead-lettered).
async fn handle_batch<S: Step>(step: &S, pool: &PgPool, items: &mut [Item]) -> Result<Option<Vec<Disposition>>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = items.iter().map(|i| i.msg.envelope.id).collect();
    let mut fresh: std::collections::HashSet<Uuid> = sqlx::query_scalar(
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
    // `remove`: the same message twice in one batch is handled once.
    let todo: Vec<usize> = (0..items.len())
        .filter(|&i| fresh.remove(&items[i].msg.envelope.id))
        .collect();
    let batch: Vec<&Incoming> = todo.iter().map(|&i| &items[i].msg).collect();
    let locked = step.lock_batch(&mut tx, &batch).await?;
    // Each row goes to the first message of its order; a later one locks again and sees
    // what the earlier one did.
    for row in locked {
        if let Some(&i) = todo.iter().find(|&&i| items[i].msg.envelope.order_id == row.id) {
            items[i].msg.locked = Some(row);
        }
    }
    let mut stale = Vec::new();
    for &i in &todo {
        match step
            .handle(&mut tx, &items[i].msg)
            .instrument(items[i].span.clone())
            .await?
        {
            Outcome::Done => dispositions[i] = Disposition::Acked,
            Outcome::Stale => stale.push(i),
            Outcome::Poison(_) => return Ok(None),
        }
    }
    if !stale.is_empty() {
        let stale_msgs: Vec<&Incoming> = stale.iter().map(|&i| &items[i].msg).collect();
        let unknown = about_no_order::<S>(&mut tx, &stale_msgs).await?;
        for i in stale {
            if unknown.contains(&items[i].msg.envelope.id) {
                dispositions[i] = Disposition::Rejected;
            }
        }
    }
    tx.commit().await?;
    outbox::committed();
    Ok(Some(dispositions))
}

/// One attempt: a transaction with the inbox record, the step, and commit.
async fn handle_once<S: Step>(step: &S, pool: &PgPool, msg: &Incoming) -> Result<Disposition> {
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
    match step.handle(&mut tx, msg).await? {
        Outcome::Done => {
            tx.commit().await?;
            outbox::committed();
            Ok(Disposition::Acked)
        }
        Outcome::Stale => Ok(if about_no_order::<S>(&mut tx, &[msg]).await?.is_empty() {
            Disposition::Duplicate
        } else {
            Disposition::Rejected
        }),
        Outcome::Poison(why) => {
            tracing::warn!(%why, "poison message");
            Ok(Disposition::Rejected)
        }
    }
}

/// Of these stale messages, the ids of those about an order that does not exist at all: they
/// are poison, to be dead-lettered so they are recorded. Their inbox records go, so that a
/// replay of the dead letter is processed (a batch commits the others' records).
async fn about_no_order<S: Step>(tx: &mut PgConnection, stale: &[&Incoming]) -> Result<Vec<Uuid>> {
    let (ids, order_ids): (Vec<Uuid>, Vec<Uuid>) = stale.iter().map(|m| (m.envelope.id, m.envelope.order_id)).unzip();
    Ok(sqlx::query_scalar(
        "WITH unknown AS (
             SELECT m FROM UNNEST($2::uuid[], $3::uuid[]) AS t(m, o)
             WHERE NOT EXISTS (SELECT 1 FROM orders WHERE id = o)
         )
         DELETE FROM inbox WHERE consumer = $1 AND message_id IN (SELECT m FROM unknown) RETURNING message_id",
    )
    .bind(S::NAME)
    .bind(&ids)
    .bind(&order_ids)
    .fetch_all(tx)
    .await?)
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

/// Reads the orderflow envelope and the `traceparent` header.
pub fn decode(delivery: &Delivery) -> Result<Incoming, String> {
    let envelope: Envelope = serde_json::from_slice(&delivery.data).map_err(|e| format!("invalid envelope: {e}"))?;
    let kind = MessageType::parse(&envelope.kind).ok_or_else(|| format!("unknown message type {:?}", envelope.kind))?;
    let trace = header_str(delivery, "traceparent").and_then(TraceParent::parse);
    Ok(Incoming {
        kind,
        envelope,
        trace,
        locked: None,
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
