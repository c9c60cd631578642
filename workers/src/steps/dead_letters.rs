//! Dead letters: everything a work queue gave up on (delivery limit reached, or rejected as
//! undecodable, unknown or about no known order) lands in one queue. The recovery worker
//! records each one (source queue, routing key, headers, body, death count, reason, time)
//! and acts for the orders that still wait for it: a failed forward step cancels them
//! (PROCESSING_FAILED); a failed compensation parks them as COMPENSATION_FAILED for an operator
//! to retry; a failed deadline leaves them to the sweep (TIMEOUT when due).
//!
//! Whatever a broker message can carry is recorded: the body as bytes, the headers as JSON in
//! which a value JSON or PostgreSQL cannot hold as it is (a string with NUL or invalid UTF-8,
//! a byte array, a decimal, a timestamp, a non-finite float) becomes a one-key marker object
//! (`{"$bytes": "<hex>"}`, `{"$decimal": {"scale", "value"}}`, `{"$timestamp": seconds}`,
//! `{"$float": "NaN"}`), a table or array nested deeper than [`MAX_HEADER_DEPTH`] levels
//! becomes `{"$amqp": "<hex>"}`, its own AMQP wire encoding (type octet, then contents), so the
//! stored JSON stays shallow enough for every reader (serde_json reads 128 levels) and nothing
//! is lost; text columns have NUL replaced by U+FFFD. A letter that still
//! cannot be recorded after a few attempts is parked as a bare record (body, reason) rather
//! than redelivered forever: the dead-letter queue has no delivery limit of its own. A
//! database that went away counts only after about an hour of it (`runtime::parks`).

use std::hash::{DefaultHasher, Hash, Hasher};

use chrono::{DateTime, Utc};
use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::{
    Result,
    db::orders::{self, Transitions, lock_all},
    domain::{CancelReason, OrderStatus},
    messaging::{Envelope, MessageType, topology},
};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runtime::{Incoming, MAX_MESSAGE_BYTES, Outcome, Step, header_str, panic_message};

pub struct DeadLetters;

/// The header a record gets when only the first [`MAX_MESSAGE_BYTES`] of its body were kept:
/// the body's whole length in bytes (such a letter is not replayable).
pub use orderflow_shared::db::dead_letters::TRUNCATED_FROM;

/// What the recovery worker knows about one dead letter (the `data` of its Incoming).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    /// The orders it concerns: the command's `orderIds`, or its one order.
    pub order_ids: Vec<Uuid>,
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
    /// Nothing bounds this queue's redeliveries: a letter that keeps failing is parked.
    const UNBOUNDED_QUEUE: bool = true;
    /// Any size is a dead letter: [`read`] keeps the first [`MAX_MESSAGE_BYTES`] of its body.
    const MAX_BODY: usize = usize::MAX;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::DeadLetter
    }

    /// Any bytes are a valid dead letter: nothing on this queue is ever rejected (it has no
    /// dead-letter queue of its own, so a rejection would lose the record), not even a letter
    /// that makes [`read`] panic (kept as a bare record).
    fn decode(&self, delivery: &Delivery) -> Result<Incoming, String> {
        let letter = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(delivery)))
            .unwrap_or_else(|panic| unreadable(delivery, panic_message(&*panic)));
        let envelope = Envelope {
            id: fingerprint(&letter),
            kind: MessageType::DeadLetter.as_str().to_owned(),
            occurred_at: letter.dead_at.unwrap_or_else(Utc::now),
            order_id: letter.order_ids.first().copied(),
            data: serde_json::to_value(&letter).map_err(|e| e.to_string())?,
        };
        let trace = header_str(delivery, "traceparent").and_then(orderflow_shared::telemetry::TraceParent::parse);
        Ok(Incoming {
            kind: MessageType::DeadLetter,
            envelope,
            trace,
            order_ids: Vec::new(),
            order_traces: Vec::new(),
        })
    }

    async fn handle(&self, tx: &mut PgConnection, batch: &[&Incoming], _attempt: u32) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for msg in batch {
            record(tx, msg).await?;
            outcomes.push(Outcome::Done);
        }
        Ok(outcomes)
    }

    /// A bare record: the fingerprint, the body, what little text is certain, and why the
    /// full record failed.
    async fn park(&self, tx: &mut PgConnection, msg: &Incoming, error: &str) -> Result<()> {
        let letter = letter(msg)?;
        sqlx::query(
            "INSERT INTO dead_letters (fingerprint, message_id, source_queue, reason, death_count, headers, body)
             VALUES ($1, $2, $3, 'unrecordable', $4, $5, $6)
             ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(msg.envelope.id)
        .bind(letter.message_id.as_deref().map(pg_text))
        .bind(letter.source_queue.as_deref().map(pg_text))
        .bind(letter.death_count)
        .bind(json!({ "$unrecordable": pg_text(error) }))
        .bind(&letter.body)
        .execute(tx)
        .await?;
        Ok(())
    }
}

fn letter(msg: &Incoming) -> Result<DeadLetter> {
    Ok(serde_json::from_value(msg.envelope.data.clone()).map_err(anyhow::Error::from)?)
}

/// Records the letter once and acts for its orders.
async fn record(tx: &mut PgConnection, msg: &Incoming) -> Result<()> {
    let letter = letter(msg)?;
    let fresh = sqlx::query(
        "INSERT INTO dead_letters (fingerprint, message_id, message_type, order_id, order_ids, source_queue, exchange,
                                   routing_key, reason, death_count, headers, body, dead_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (fingerprint) DO NOTHING",
    )
    .bind(msg.envelope.id)
    .bind(&letter.message_id)
    .bind(&letter.message_type)
    .bind((letter.order_ids.len() == 1).then(|| letter.order_ids[0]))
    .bind(&letter.order_ids)
    .bind(&letter.source_queue)
    .bind(&letter.exchange)
    .bind(&letter.routing_key)
    .bind(&letter.reason)
    .bind(letter.death_count)
    .bind(&letter.headers)
    .bind(&letter.body)
    .bind(letter.dead_at)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Ok(());
    }
    metrics::counter!(
        orderflow_shared::metrics::MESSAGES,
        "queue" => letter.source_queue.clone().unwrap_or_default(),
        "outcome" => "dead_lettered"
    )
    .increment(1);
    tracing::warn!(
        orders = ?letter.order_ids,
        queue = ?letter.source_queue,
        kind = ?letter.message_type,
        reason = ?letter.reason,
        "dead letter recorded"
    );
    let kind = letter.message_type.as_deref().and_then(MessageType::parse);
    if letter.order_ids.is_empty() || kind.is_none_or(|k| k.queue().is_none() || k == MessageType::DeadLetter) {
        return Ok(());
    }
    let Some(kind) = kind.filter(|k| *k != MessageType::OrderDeadline) else {
        // A deadline that could not be handled: the sweep cancels its orders when they are
        // due, with the reason that says why (TIMEOUT).
        return Ok(());
    };
    // Only orders that still wait for the message that died: one that another message moved
    // on since (a duplicate that succeeded, the sweep's re-send) is not the order's problem.
    let mut moves = Transitions::new();
    for order in lock_all(tx, &letter.order_ids).await? {
        if kind.is_compensation() {
            // The very compensation it waits for, not just one it still needs: parking the
            // order while another compensation is in flight would leave that one stale.
            if order.status == OrderStatus::Cancelling && orders::next_compensation(&order) == kind {
                moves.park(order);
            }
        } else if orders::awaits(&order, kind) {
            moves.cancel(order, CancelReason::ProcessingFailed)?;
        }
    }
    moves.apply(tx).await
}

/// Reads what the broker tells about a dead letter (`x-death`, RabbitMQ's own headers).
fn read(delivery: &Delivery) -> DeadLetter {
    let props = &delivery.properties;
    let mut headers = props.headers().as_ref().map(table_to_json).unwrap_or(Value::Null);
    let death = headers["x-death"].get(0).cloned().unwrap_or(Value::Null);
    // A body larger than any message of orderflow's is kept in part and never parsed: whole,
    // as JSON and as the record's JSON, it would take many times its size in memory.
    let whole = delivery.data.len();
    let body = &delivery.data[..whole.min(MAX_MESSAGE_BYTES)];
    if whole > MAX_MESSAGE_BYTES {
        if !headers.is_object() {
            headers = json!({});
        }
        headers[TRUNCATED_FROM] = whole.into();
    } else if let Some(map) = headers.as_object_mut() {
        // The mark is the recovery worker's to set: a publisher's own would make a whole body
        // look cut (and change the letter's fingerprint from what another release computes).
        map.remove(TRUNCATED_FROM);
    }
    let envelope: Option<Envelope> = if whole > MAX_MESSAGE_BYTES {
        None
    } else {
        serde_json::from_slice(body).ok()
    };
    let order_ids = envelope
        .as_ref()
        .and_then(|e| e.command_orders().ok())
        .or_else(|| envelope.as_ref().and_then(|e| e.order_id).map(|id| vec![id]))
        .or_else(|| {
            props
                .correlation_id()
                .as_ref()
                .and_then(|c| c.as_str().parse().ok())
                .map(|id| vec![id])
        })
        .unwrap_or_default();
    let text = |v: &Value| v.as_str().map(pg_text);
    DeadLetter {
        message_id: props.message_id().as_ref().map(|m| pg_text(m.as_str())),
        message_type: props
            .kind()
            .as_ref()
            .map(|k| pg_text(k.as_str()))
            .or_else(|| envelope.as_ref().map(|e| pg_text(&e.kind))),
        order_ids,
        source_queue: text(&death["queue"]).or_else(|| text(&headers["x-first-death-queue"])),
        exchange: text(&death["exchange"]).or_else(|| text(&headers["x-first-death-exchange"])),
        routing_key: death["routing-keys"]
            .get(0)
            .and_then(text)
            .or_else(|| Some(pg_text(delivery.routing_key.as_str()))),
        reason: text(&death["reason"]).or_else(|| text(&headers["x-first-death-reason"])),
        death_count: death["count"].as_i64().unwrap_or(1),
        headers,
        body: body.to_vec(),
        dead_at: death["time"]["$timestamp"]
            .as_i64()
            .and_then(|t| DateTime::from_timestamp(t, 0)),
    }
}

/// A letter [`read`] could not take apart: its message id, routing key and (the first
/// [`MAX_MESSAGE_BYTES`] of) its body, and why, for an operator.
fn unreadable(delivery: &Delivery, why: &str) -> DeadLetter {
    let whole = delivery.data.len();
    let mut headers = json!({ "$unreadable": pg_text(why) });
    if whole > MAX_MESSAGE_BYTES {
        headers[TRUNCATED_FROM] = whole.into();
    }
    DeadLetter {
        message_id: delivery.properties.message_id().as_ref().map(|m| pg_text(m.as_str())),
        message_type: None,
        order_ids: Vec::new(),
        source_queue: None,
        exchange: None,
        routing_key: Some(pg_text(delivery.routing_key.as_str())),
        reason: None,
        death_count: 1,
        headers,
        body: delivery.data[..whole.min(MAX_MESSAGE_BYTES)].to_vec(),
        dead_at: None,
    }
}

/// One death of one message: the same (message, queue, count, reason) read twice is
/// recorded once. A replay (an operator's, marked with the dead letter it replays) that dies
/// again is a new death.
fn fingerprint(letter: &DeadLetter) -> Uuid {
    let replay_of = letter.headers["x-orderflow-replay-of"].as_str();
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        replay_of.hash(&mut h);
        letter.message_id.hash(&mut h);
        if letter.message_id.is_none() {
            letter.body.hash(&mut h);
            // Only a cut body's first part is kept: its length tells two such letters apart.
            if let Some(whole) = letter.headers.get(TRUNCATED_FROM).and_then(Value::as_u64) {
                whole.hash(&mut h);
            }
        }
        letter.source_queue.hash(&mut h);
        letter.death_count.hash(&mut h);
        letter.reason.hash(&mut h);
        h.finish()
    };
    Uuid::from_u64_pair(half(1), half(2))
}

/// Text PostgreSQL can store: NUL (which `text` and `jsonb` cannot hold) becomes U+FFFD.
pub fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// How deeply the recorded headers nest tables and arrays (the headers table itself is level
/// 0); deeper values are kept as `{"$amqp": "<hex>"}`. Far past any header RabbitMQ or a client
/// writes (`x-death` nests three), and far below what readers of the stored JSON can parse.
pub const MAX_HEADER_DEPTH: usize = 32;

/// An AMQP field table as JSON that PostgreSQL's `jsonb` can hold, losslessly and at most
/// [`MAX_HEADER_DEPTH`] levels deep (see the module documentation for the markers).
pub fn table_to_json(table: &FieldTable) -> Value {
    table_within(table, MAX_HEADER_DEPTH)
}

fn table_within(table: &FieldTable, depth: usize) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (pg_text(k.as_str()), value_to_json(v, depth)))
            .collect(),
    )
}

/// `v` as JSON; `depth` is how many more tables or arrays may open inside it.
fn value_to_json(v: &AMQPValue, depth: usize) -> Value {
    match v {
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if depth == 0 => wire_encoding(v),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(|v| value_to_json(v, depth - 1)).collect()),
        AMQPValue::FieldTable(t) => table_within(t, depth - 1),
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => json!({"$decimal": {"scale": d.scale, "value": d.value}}),
        AMQPValue::ShortString(s) => text_or_bytes(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => text_or_bytes(s.as_bytes()),
        AMQPValue::Timestamp(t) => json!({ "$timestamp": t }),
        AMQPValue::ByteArray(b) => json!({ "$bytes": hex(b.as_slice()) }),
        AMQPValue::Void => Value::Null,
    }
}

/// `{"$amqp": "<hex>"}`: the value as AMQP writes it (type octet, then contents), which
/// lapin's parser (`amq_protocol_types::parsing::parse_value`) reads back.
fn wire_encoding(v: &AMQPValue) -> Value {
    match cookie_factory::gen_simple(lapin::types::generation::gen_value(v), Vec::new()) {
        Ok(bytes) => json!({ "$amqp": hex(&bytes) }),
        // Writing into a Vec fails only if it cannot grow; say so rather than lose the letter.
        Err(err) => json!({ "$amqp": null, "error": err.to_string() }),
    }
}

fn float(f: f64) -> Value {
    if f.is_finite() {
        json!(f)
    } else {
        json!({ "$float": f.to_string() })
    }
}

/// UTF-8 without NUL as a string; anything else as hex bytes.
fn text_or_bytes(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => json!(s),
        _ => json!({ "$bytes": hex(bytes) }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString, ShortString};

    use super::*;

    fn letter(id: Option<&str>, count: i64) -> DeadLetter {
        DeadLetter {
            message_id: id.map(str::to_owned),
            message_type: Some("stock.reserve".into()),
            order_ids: Vec::new(),
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

    #[test]
    fn every_amqp_field_type_becomes_json_postgres_can_hold() {
        let mut nested = FieldTable::default();
        nested.insert(
            ShortString::from("n\0ul"),
            AMQPValue::LongString(LongString::from(&b"a\0b"[..])),
        );
        let mut table = FieldTable::default();
        let mut put = |k: &str, v| {
            table.insert(ShortString::from(k), v);
        };
        put("nul", AMQPValue::LongString(LongString::from(&b"a\0b"[..])));
        put(
            "latin1",
            AMQPValue::LongString(LongString::from(&[0xe9u8, 0x74, 0xe9][..])),
        );
        put("text", AMQPValue::LongString(LongString::from("plain")));
        put("bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])));
        put(
            "decimal",
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 12345 }),
        );
        put("at", AMQPValue::Timestamp(1_764_000_000));
        put("nan", AMQPValue::Double(f64::NAN));
        put(
            "list",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true), AMQPValue::Void])),
        );
        put("table", AMQPValue::FieldTable(nested));
        let v = table_to_json(&table);
        assert_eq!(v["nul"], json!({"$bytes": "610062"}));
        assert_eq!(v["latin1"], json!({"$bytes": "e974e9"}));
        assert_eq!(v["text"], json!("plain"));
        assert_eq!(v["bytes"], json!({"$bytes": "00ff"}));
        assert_eq!(v["decimal"], json!({"$decimal": {"scale": 2, "value": 12345}}));
        assert_eq!(v["at"], json!({"$timestamp": 1_764_000_000}));
        assert_eq!(v["nan"], json!({"$float": "NaN"}));
        assert_eq!(v["list"], json!([true, null]));
        assert_eq!(v["table"], json!({"n\u{FFFD}ul": {"$bytes": "610062"}}));
        // No NUL survives anywhere in the text, so jsonb accepts it.
        assert!(!v.to_string().contains("\\u0000"));
    }

    /// `inner` wrapped in `levels` arrays.
    fn nest(levels: usize, inner: AMQPValue) -> AMQPValue {
        (0..levels).fold(inner, |v, _| AMQPValue::FieldArray(FieldArray::from(vec![v])))
    }

    #[test]
    fn deep_headers_are_kept_shallow_and_whole() {
        let leaf = AMQPValue::LongString(LongString::from("bottom"));
        let mut table = FieldTable::default();
        table.insert(ShortString::from("x-nest"), nest(90, leaf.clone()));
        table.insert(ShortString::from("x-ok"), nest(MAX_HEADER_DEPTH, leaf.clone()));
        let v = table_to_json(&table);

        // Within the bound: plain JSON all the way down.
        let mut ok = &v["x-ok"];
        for _ in 0..MAX_HEADER_DEPTH {
            ok = &ok[0];
        }
        assert_eq!(ok, &json!("bottom"));

        // Past it: the first MAX_HEADER_DEPTH arrays as JSON, the rest as its wire encoding.
        let mut deep = &v["x-nest"];
        for _ in 0..MAX_HEADER_DEPTH {
            deep = &deep[0];
        }
        let encoded = deep["$amqp"].as_str().expect("a $amqp marker");
        let bytes: Vec<u8> = (0..encoded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&encoded[i..i + 2], 16).expect("hex"))
            .collect();
        let (rest, value) = lapin::types::parsing::parse_value(&bytes[..]).expect("decodes");
        assert!(rest.is_empty());
        assert_eq!(value, nest(90 - MAX_HEADER_DEPTH, leaf));

        // Every reader can parse it back (serde_json stops at 128 levels).
        let text = v.to_string();
        let again: Value = serde_json::from_str(&text).expect("shallow enough for serde_json");
        assert_eq!(again, v);
    }
}
