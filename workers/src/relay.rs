//! The outbox relay: the only publisher. Woken after commits in its own process and
//! polling every 20 ms otherwise, it takes committed outbox rows in id order
//! (`FOR UPDATE SKIP LOCKED`, so several relays can run), publishes them persistent and
//! mandatory with publisher confirms, and marks them sent only once the broker confirmed.
//! A broker outage delays messages, never loses them; a crash between confirm and mark
//! re-publishes with the same message id, which consumers' inboxes absorb.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use orderflow_shared::{db::outbox, messaging::MessageType};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker;

/// Rows published per round trip.
const BATCH: i64 = 500;
/// How often the relay looks for rows without being woken. Writers in the same process wake
/// it after their commit (`outbox::committed`); rows written by other processes wait at most
/// this long. (No PostgreSQL NOTIFY: it serialises the commits of every transaction that
/// sends one, see migration 0005; an idle poll is one index probe.)
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub order_id: Option<Uuid>,
    pub headers: serde_json::Value,
    pub body: serde_json::Value,
    pub expiration_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// The AMQP properties every orderflow message carries (DESIGN.md §3).
pub fn properties(row: &OutboxRow) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(map) = row.headers.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str() {
                headers.insert(ShortString::from(k.as_str()), AMQPValue::LongString(s.into()));
            }
        }
    }
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(row.message_id.to_string().into())
        .with_type(row.message_type.as_str().into())
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_app_id("orderflow".into())
        .with_headers(headers);
    if let Some(order_id) = row.order_id {
        props = props.with_correlation_id(order_id.to_string().into());
    }
    if let Some(ms) = row.expiration_ms {
        props = props.with_expiration(ms.max(0).to_string().into());
    }
    props
}

/// Whether a publish of this type must be routed (see `MessageType::must_route`).
pub fn mandatory(message_type: &str) -> bool {
    MessageType::parse(message_type).is_none_or(MessageType::must_route)
}

/// Runs until `shutdown`; after it, publishes what is already committed once more (flush).
/// `abort_every` is fault injection for the fault suite (0: off): abort the process after
/// the broker confirmed every Nth batch, before it is marked sent.
pub async fn run(pool: PgPool, amqp_url: String, abort_every: u32, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = broker::reconnect_backoff();
    let mut batches = 0u32;
    loop {
        match relay(&pool, &amqp_url, abort_every, &mut batches, &shutdown).await {
            Ok(()) => break,
            Err(err) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %err, ?delay, "relay failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!("relay stopped");
    Ok(())
}

async fn relay(
    pool: &PgPool,
    amqp_url: &str,
    abort_every: u32,
    batches: &mut u32,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (conn, channel) = broker::connect(amqp_url, "relay").await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    tracing::info!("relay publishing");
    loop {
        let published = publish_batch(pool, &channel, || {
            *batches += 1;
            abort_every > 0 && batches.is_multiple_of(abort_every)
        })
        .await?;
        if published as i64 >= BATCH {
            continue; // more may be waiting
        }
        if shutdown.is_cancelled() {
            break; // flushed what was committed
        }
        tokio::select! {
            _ = outbox::wait_committed() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    let _ = channel.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

/// Publishes one batch and marks what the broker confirmed. Returns how many were taken.
/// `crash_after_confirm` (asked once per non-empty batch) aborts the process in the worst
/// place: confirmed by the broker, not yet marked sent.
pub async fn publish_batch(
    pool: &PgPool,
    channel: &Channel,
    crash_after_confirm: impl FnOnce() -> bool,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, message_id, exchange, routing_key, message_type, order_id, headers, body, expiration_ms, created_at
         FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Publish all, then await the confirms (they may arrive out of order).
    let mut pending = Vec::with_capacity(rows.len());
    for row in &rows {
        let body = serde_json::to_vec(&row.body)?;
        let confirm = channel
            .basic_publish(
                row.exchange.as_str().into(),
                row.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: mandatory(&row.message_type),
                    immediate: false,
                },
                &body,
                properties(row),
            )
            .await?;
        pending.push((row.id, confirm));
    }
    let now = chrono::Utc::now();
    for row in &rows {
        let delay = (now - row.created_at).to_std().unwrap_or_default();
        metrics::histogram!(orderflow_shared::metrics::OUTBOX_DELAY).record(delay.as_secs_f64());
    }
    let mut sent = Vec::with_capacity(rows.len());
    let mut failed = 0usize;
    for (id, confirm) in pending {
        match confirm.await? {
            Confirmation::Ack(None) => sent.push(id),
            Confirmation::Ack(Some(returned)) => {
                failed += 1;
                tracing::error!(outbox_id = id, reply = %returned.reply_text, "message was unroutable; will retry");
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                failed += 1;
                tracing::warn!(outbox_id = id, "broker did not confirm a message; will retry");
            }
        }
    }
    if crash_after_confirm() {
        tracing::error!(batch = rows.len(), "fault injection: aborting between confirm and mark");
        std::process::abort();
    }
    sqlx::query("UPDATE outbox SET sent_at = clock_timestamp() WHERE id = ANY($1)")
        .bind(&sent)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if failed > 0 {
        anyhow::bail!("{failed} of {} messages were not confirmed", rows.len());
    }
    Ok(rows.len())
}
