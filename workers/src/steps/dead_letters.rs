//! Dead letters: everything a work queue gave up on (delivery limit reached, or rejected as
//! undecodable, unknown or about no known order) lands in one queue. The recovery worker
//! records each one (source queue, routing key, headers, body, death count, reason, time)
//! and acts for its order: a failed forward step cancels the order (PROCESSING_FAILED); a
//! failed compensation parks it as COMPENSATION_FAILED for an operator to retry.

use std::hash::{DefaultHasher, Hash, Hasher};

use chrono::{DateTime, Utc};
use lapin::{message::Delivery, types::AMQPValue};
use orderflow_shared::{
    Result,
    db::orders,
    domain::{CancelReason, OrderStatus},
    messaging::{Envelope, MessageType, topology},
};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runtime::{Incoming, Outcome, Step, header_str};

pub struct DeadLetters;

/// What the recovery worker knows about one dead letter (the `data` of its Incoming).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub order_id: Option<Uuid>,
    pub source_queue: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub reason: Option<String>,
    pub death_count: i64,
    pub headers: Value,
    pub body: Vec<u8>,
    pub dead_at: Option<DateTime<Utc>>,
}

impl Step for DeadLetters {
    const NAME: &'static str = "dead-letters";
    const QUEUE: &'static str = topology::DEAD_LETTER_QUEUE;
    /// Dead letters are few, and each one is logged and counted as it is handled.
    const BATCHED: bool = false;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::DeadLetter
    }

    /// Any bytes are a valid dead letter: nothing on this queue is ever rejected.
    fn decode(&self, delivery: &Delivery) -> Result<Incoming, String> {
        let letter = read(delivery);
        let envelope = Envelope {
            id: fingerprint(&letter),
            kind: MessageType::DeadLetter.as_str().to_owned(),
            occurred_at: letter.dead_at.unwrap_or_else(Utc::now),
            order_id: letter.order_id.unwrap_or(Uuid::nil()),
            data: serde_json::to_value(&letter).map_err(|e| e.to_string())?,
        };
        let trace = header_str(delivery, "traceparent").and_then(orderflow_shared::telemetry::TraceParent::parse);
        Ok(Incoming {
            kind: MessageType::DeadLetter,
            envelope,
            trace,
            locked: None,
        })
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        let letter: DeadLetter = serde_json::from_value(msg.envelope.data.clone()).map_err(anyhow::Error::from)?;
        sqlx::query(
            "INSERT INTO dead_letters (fingerprint, message_id, message_type, order_id, source_queue, exchange,
                                       routing_key, reason, death_count, headers, body, dead_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(msg.envelope.id)
        .bind(&letter.message_id)
        .bind(&letter.message_type)
        .bind(letter.order_id)
        .bind(&letter.source_queue)
        .bind(&letter.exchange)
        .bind(&letter.routing_key)
        .bind(&letter.reason)
        .bind(letter.death_count)
        .bind(&letter.headers)
        .bind(&letter.body)
        .bind(letter.dead_at)
        .execute(&mut *tx)
        .await?;
        metrics::counter!(
            orderflow_shared::metrics::MESSAGES,
            "queue" => letter.source_queue.clone().unwrap_or_default(),
            "outcome" => "dead_lettered"
        )
        .increment(1);
        tracing::warn!(
            order_id = ?letter.order_id,
            queue = ?letter.source_queue,
            kind = ?letter.message_type,
            reason = ?letter.reason,
            "dead letter recorded"
        );
        if let Some(order_id) = letter.order_id {
            let kind = letter.message_type.as_deref().and_then(MessageType::parse);
            if kind.is_some_and(MessageType::is_compensation) {
                if let Some(order) = orders::lock(tx, order_id, &[OrderStatus::Cancelling]).await? {
                    orders::set_status(tx, &order, OrderStatus::CompensationFailed, None).await?;
                }
            } else if kind.is_some_and(|k| k.queue().is_some()) {
                orders::cancel(tx, order_id, CancelReason::ProcessingFailed).await?;
            }
        }
        Ok(Outcome::Done)
    }
}

/// Reads what the broker tells about a dead letter (`x-death`, RabbitMQ's own headers).
fn read(delivery: &Delivery) -> DeadLetter {
    let props = &delivery.properties;
    let headers = props
        .headers()
        .as_ref()
        .map(|h| table_to_json(h.inner()))
        .unwrap_or(Value::Null);
    let death = headers["x-death"].get(0).cloned().unwrap_or(Value::Null);
    let envelope: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let order_id = props
        .correlation_id()
        .as_ref()
        .and_then(|c| c.as_str().parse().ok())
        .or_else(|| {
            envelope
                .as_ref()
                .and_then(|e| e["orderId"].as_str())
                .and_then(|s| s.parse().ok())
        });
    let text = |v: &Value| v.as_str().map(str::to_owned);
    DeadLetter {
        message_id: props.message_id().as_ref().map(|m| m.to_string()),
        message_type: props
            .kind()
            .as_ref()
            .map(|k| k.to_string())
            .or_else(|| envelope.as_ref().and_then(|e| text(&e["type"]))),
        order_id,
        source_queue: text(&death["queue"]).or_else(|| text(&headers["x-first-death-queue"])),
        exchange: text(&death["exchange"]).or_else(|| text(&headers["x-first-death-exchange"])),
        routing_key: death["routing-keys"]
            .get(0)
            .and_then(text)
            .or_else(|| Some(delivery.routing_key.to_string())),
        reason: text(&death["reason"]).or_else(|| text(&headers["x-first-death-reason"])),
        death_count: death["count"].as_i64().unwrap_or(1),
        headers,
        body: delivery.data.clone(),
        dead_at: death["time"].as_i64().and_then(|t| DateTime::from_timestamp(t, 0)),
    }
}

/// One death of one message: the same (message, queue, count, reason) read twice is
/// recorded once.
fn fingerprint(letter: &DeadLetter) -> Uuid {
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        letter.message_id.hash(&mut h);
        if letter.message_id.is_none() {
            letter.body.hash(&mut h);
        }
        letter.source_queue.hash(&mut h);
        letter.death_count.hash(&mut h);
        letter.reason.hash(&mut h);
        h.finish()
    };
    Uuid::from_u64_pair(half(1), half(2))
}

fn table_to_json(table: &std::collections::BTreeMap<lapin::types::ShortString, AMQPValue>) -> Value {
    Value::Object(table.iter().map(|(k, v)| (k.to_string(), value_to_json(v))).collect())
}

fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t.inner()),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: Option<&str>, count: i64) -> DeadLetter {
        DeadLetter {
            message_id: id.map(str::to_owned),
            message_type: Some("stock.reserve".into()),
            order_id: None,
            source_queue: Some("orderflow.stock".into()),
            exchange: Some("orderflow.work".into()),
            routing_key: Some("stock.reserve".into()),
            reason: Some("delivery_limit".into()),
            death_count: count,
            headers: Value::Null,
            body: b"{}".to_vec(),
            dead_at: None,
        }
    }

    #[test]
    fn the_same_death_has_the_same_fingerprint_and_a_new_death_a_new_one() {
        assert_eq!(fingerprint(&letter(Some("a"), 1)), fingerprint(&letter(Some("a"), 1)));
        assert_ne!(fingerprint(&letter(Some("a"), 1)), fingerprint(&letter(Some("a"), 2)));
        assert_ne!(fingerprint(&letter(Some("a"), 1)), fingerprint(&letter(Some("b"), 1)));
    }
}
