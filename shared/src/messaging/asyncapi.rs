//! The messages as a contract: an AsyncAPI 3.0 document of every exchange, queue, routing key
//! and message orderflow sends, served at `GET /asyncapi.json` and kept in
//! `docs/asyncapi.json` (a test keeps the two identical: `UPDATE_ASYNCAPI=1 cargo test -p
//! orderflow-shared asyncapi` rewrites the copy).
//!
//! Nothing here is copied by hand from elsewhere: exchanges, queues, bindings and queue
//! arguments come from [`topology`], message types from [`MessageType`], and the JSON schemas
//! of the bodies from the Rust types the code serializes ([`Envelope`], [`CommandData`],
//! [`OrderConfirmedData`], [`OrderCancelledData`]), through their `utoipa::ToSchema` derives.
//! Their JSON Schema (utoipa's OpenAPI 3.1 dialect, plain JSON Schema for these types) is also
//! valid in AsyncAPI's default schema format. What no Rust type serializes (the AMQP
//! properties the relay sets, the headers) is described here and checked against real
//! messages by `tests/asyncapi.rs`.

use std::collections::BTreeMap;

use lapin::{
    ExchangeKind,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use utoipa::{PartialSchema, ToSchema, openapi::RefOr, openapi::schema::Schema};

use super::{
    envelope::{
        APP_ID, CLOUDEVENTS_CONTENT_TYPE, CONTENT_TYPE, CloudEvent, CommandData, Envelope, MessageType,
        OrderCancelledData, OrderConfirmedData,
    },
    topology::{self, QueueSpec},
};

/// The version of the AMQP bindings the document uses.
const AMQP_BINDING: &str = "0.3.0";

/// The AsyncAPI document. Deterministic: the same build always yields the same document.
pub fn document() -> Value {
    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();
    let mut messages = serde_json::Map::new();

    for kind in published() {
        let key = kind.as_str();
        messages.insert(key.to_owned(), message(kind));
        channels.insert(key.to_owned(), routing_key_channel(kind));
        operations.insert(format!("send.{key}"), send_operation(kind));
    }
    messages.insert(MessageType::DeadLetter.as_str().to_owned(), dead_letter_message());

    for queue in topology::QUEUES {
        channels.insert(queue.name.to_owned(), queue_channel(queue));
        if let Some(consumer) = consumer(queue.name) {
            operations.insert(format!("receive.{}", queue.name), receive_operation(queue, consumer));
        }
    }

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "orderflow messages",
            "version": env!("CARGO_PKG_VERSION"),
            "description": INFO,
            "license": {"name": "MIT OR Apache-2.0"},
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The RabbitMQ node (3.10 or later) or cluster that `AMQP_URL` names \
                                (comma-separated nodes of one cluster); its vhost is the one in \
                                `AMQP_URL`. `localhost:5672` is the default.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas(),
            "messages": messages,
        },
    })
}

/// The document as served and as kept in `docs/asyncapi.json`: pretty JSON, a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

const INFO: &str = "\
Every message orderflow sends through RabbitMQ: the internal commands that carry an order \
through stock, coupon and payment, the deadline that bounds an order's time in flight, and \
the public events `order.confirmed` and `order.cancelled` that the data platform consumes.

**Topology.** Every process declares it at start, idempotently. All exchanges and queues are \
durable; all queues are quorum queues. Queue arguments never depend on configuration, so a \
redeploy never has to delete a queue. Each channel of `is: routingKey` is a routing key on an \
exchange (what is published); each channel of `is: queue` is a queue (what is consumed), \
with its arguments in `x-arguments` and its bindings in `x-bindings`.

**Envelope.** Every internal body is JSON: `{\"id\", \"type\", \"occurredAt\", \"orderId\"?, \
\"data\"}`, camelCase, times in RFC 3339 UTC with milliseconds, amounts in whole won. A public \
event is a CloudEvent 1.0 in structured content mode (JSON event format): `{\"specversion\": \
\"1.0\", \"id\", \"source\": \"/orderflow/orders\", \"type\", \"time\", \"subject\" (the order id), \
\"datacontenttype\": \"application/json\", \"data\"}`, `content_type=application/cloudevents+json` \
(what the CloudEvents SDKs' RabbitMQ binding reads as structured mode). Every message carries \
the AMQP properties `content_type`, `delivery_mode=2` (persistent), `message_id` = the body's \
`id`, `type` = the message type (also the routing key), `timestamp` (seconds), \
`app_id=orderflow`, `correlation_id` = the order when the message is about one, and the header \
`traceparent` (W3C trace context); each message's `x-amqp-properties` is the schema of its \
properties.

**Delivery.** At least once. What a transaction decides to send is written to an outbox in \
that transaction; a relay publishes it persistent and `mandatory`, with publisher confirms, \
and may publish it again after a crash, with the same `id`: consumers dedupe by `id` \
(orderflow's own record it in an inbox in the same transaction as their effect, and ack only \
after commit).

**Commands** name their orders in `data.orderIds` (1 to 500: one message may carry a batch); a \
command about one order also has `orderId`. Outcomes, retries and dead-lettering are still per \
order.

**Dead letters.** A work queue retries a delivery at most `x-delivery-limit` times; a message \
that reaches the limit, or that a worker rejects (not JSON, unknown type, about no known \
order), is dead-lettered (at least once) through the fanout exchange `orderflow.dlx` into \
`orderflow.dead-letters`, with RabbitMQ's `x-death` and `x-first-death-*` headers and its body \
and properties unchanged. The recovery worker records each one: a dead forward step cancels its \
orders still waiting for it (`PROCESSING_FAILED`), a dead compensation parks those still waiting \
for it as `COMPENSATION_FAILED`, a dead deadline leaves its orders to the sweep. An \
operator can replay a dead letter (`POST /api/admin/dead-letters/{id}/replay`): the same body \
and `message_id`, published to the queue it died in through the default exchange, with the \
header `x-orderflow-replay-of` = the dead letter's id.

**Public events** (the data platform's contract): `order.confirmed` and `order.cancelled` on \
the topic exchange `orderflow.events`, one event per order, at least once. The event `id` is \
stable across re-publishes: dedupe by it. A cancelled order never produces `order.confirmed`; \
an order produces at most one of the two. `order.confirmed` lands in the durable queue \
`data-platform.orders`; no orderflow queue receives `order.cancelled` (bind your own). Fields \
may be added to `data` without notice: ignore what you do not know. Until release 0.1 events \
were published as the internal envelope; the CloudEvent keeps `id`, `type` and `data` where \
they were (`time` is its `occurredAt`, `subject` its `orderId`), and replays send events of \
that time as CloudEvents too.";

/// The message types orderflow publishes (every type but the dead letter, which only names
/// what the recovery worker reads).
fn published() -> impl Iterator<Item = MessageType> {
    MessageType::ALL
        .iter()
        .copied()
        .filter(|t| *t != MessageType::DeadLetter)
}

/// Who sends a message type and when. Exhaustive: a new type must be described here.
fn about(kind: MessageType) -> (&'static str, &'static str) {
    use MessageType::*;
    match kind {
        StockReserve => (
            "Reserve the stock of new orders",
            "Sent by the API when it accepts orders (one message per accept batch). The stock \
             worker reserves every line of an order or none.",
        ),
        StockRelease => (
            "Give back the stock a cancelled order holds",
            "A compensation: sent once the order holds no payment and no coupon any more.",
        ),
        CouponApply => (
            "Use the coupon of orders whose stock is reserved",
            "Sent by the stock worker for orders with a coupon.",
        ),
        CouponRestore => (
            "Make the coupon a cancelled order used available again",
            "A compensation: sent once the order holds no payment any more.",
        ),
        PaymentCharge => (
            "Charge orders to their user's balance",
            "Sent by the stock worker (orders without a coupon) or the coupon worker.",
        ),
        PaymentRefund => (
            "Refund a cancelled order that was paid",
            "A compensation, the first one of a paid order.",
        ),
        OrderConfirm => (
            "Confirm paid orders",
            "Sent by the payment worker. The order worker confirms the order and emits \
             `order.confirmed`.",
        ),
        OrderFinishCancel => (
            "Finish the cancellation of orders that gave everything back",
            "The last compensation. The order worker sets CANCELLED and emits `order.cancelled`.",
        ),
        OrderDeadline => (
            "Bound the time orders spend in flight",
            "Sent for the orders the API accepts, with the AMQP `expiration` ORDER_TIMEOUT \
             (milliseconds): one message names the orders accepted within about a second (up to \
             500), published about a second after the relay took the first of them. No one \
             consumes `orderflow.deadline`: the message expires into `orderflow.expired`, and the \
             recovery worker cancels those orders that are still in flight (reason TIMEOUT).",
        ),
        OrderConfirmed => (
            "An order was confirmed (public)",
            "Sent by the order worker when it confirms an order: once per order, at least once \
             (dedupe by `id`). Lands in `data-platform.orders`.",
        ),
        OrderCancelled => (
            "An order was cancelled (public)",
            "Sent when an order's cancellation is complete (it holds nothing any more): once per \
             order, at least once (dedupe by `id`). No orderflow queue receives it; it is published \
             without `mandatory`.",
        ),
        DeadLetter => (
            "A message a work queue gave up on",
            "Not published by orderflow: RabbitMQ dead-letters it into `orderflow.dlx`.",
        ),
    }
}

/// The orderflow process that consumes a queue, if any.
fn consumer(queue: &str) -> Option<&'static str> {
    match queue {
        topology::STOCK_QUEUE => Some("the stock worker"),
        topology::COUPON_QUEUE => Some("the coupon worker"),
        topology::PAYMENT_QUEUE => Some("the payment worker"),
        topology::ORDER_QUEUE => Some("the order worker"),
        topology::EXPIRED_QUEUE | topology::DEAD_LETTER_QUEUE => Some("the recovery worker"),
        _ => None,
    }
}

fn exchange_kind(exchange: &str) -> Option<&'static str> {
    let (_, kind) = topology::EXCHANGES.iter().find(|(name, _)| *name == exchange)?;
    Some(match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Headers => "headers",
        _ => "default",
    })
}

fn exchange_binding(exchange: &str) -> Value {
    json!({
        "is": "routingKey",
        "exchange": {
            "name": exchange,
            "type": exchange_kind(exchange),
            "durable": true,
            "autoDelete": false,
        },
        "bindingVersion": AMQP_BINDING,
    })
}

/// The queues `exchange` routes `routing_key` to.
fn routed_to(exchange: &str, routing_key: &str) -> Vec<&'static str> {
    let fanout = exchange_kind(exchange) == Some("fanout");
    topology::QUEUES
        .iter()
        .filter(|q| q.exchange == exchange && (fanout || q.routing_keys.contains(&routing_key)))
        .map(|q| q.name)
        .collect()
}

fn message_ref(id: &str) -> Value {
    json!({ "$ref": format!("#/components/messages/{id}") })
}

fn routing_key_channel(kind: MessageType) -> Value {
    let (exchange, key) = (kind.exchange(), kind.as_str());
    let queues = routed_to(exchange, key);
    let routed = if queues.is_empty() {
        "No orderflow queue is bound to it: bind your own queue to receive it.".to_owned()
    } else {
        format!(
            "Routed to {}.",
            queues.iter().map(|q| format!("`{q}`")).collect::<Vec<_>>().join(", ")
        )
    };
    json!({
        "address": key,
        "title": format!("{exchange} / {key}"),
        "description": format!(
            "Routing key `{key}` on the {} exchange `{exchange}`. {routed}",
            exchange_kind(exchange).unwrap_or("default")
        ),
        "messages": { key: message_ref(key) },
        "bindings": { "amqp": exchange_binding(exchange) },
    })
}

/// The message types that reach `queue`: those its exchange routes to it, or, for a queue
/// bound to a dead-letter exchange, those dead-lettered into that exchange.
fn queue_messages(queue: &QueueSpec) -> Vec<MessageType> {
    if queue.exchange == topology::DEAD_LETTER_EXCHANGE {
        return vec![MessageType::DeadLetter];
    }
    let sources = dead_letter_sources(queue);
    published()
        .filter(|t| {
            let routed = t.exchange() == queue.exchange && queue.routing_keys.contains(&t.as_str());
            let dead_lettered = sources
                .iter()
                .any(|s| s.exchange == t.exchange() && s.routing_keys.contains(&t.as_str()));
            routed || dead_lettered
        })
        .collect()
}

/// The queues that dead-letter into the exchange `queue` is bound to.
fn dead_letter_sources(queue: &QueueSpec) -> Vec<&'static QueueSpec> {
    topology::QUEUES
        .iter()
        .filter(|q| argument(q, "x-dead-letter-exchange").as_deref() == Some(queue.exchange))
        .collect()
}

fn argument(queue: &QueueSpec, name: &str) -> Option<String> {
    match queue.arguments().inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Queue arguments as JSON (the types the topology uses; anything else as its debug text).
fn arguments_json(args: &FieldTable) -> Value {
    Value::Object(
        args.inner()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
                    AMQPValue::ShortString(s) => json!(s.as_str()),
                    AMQPValue::LongLongInt(n) => json!(n),
                    AMQPValue::LongInt(n) => json!(n),
                    AMQPValue::LongUInt(n) => json!(n),
                    AMQPValue::ShortInt(n) => json!(n),
                    AMQPValue::Boolean(b) => json!(b),
                    other => json!(format!("{other:?}")),
                };
                (k.as_str().to_owned(), v)
            })
            .collect(),
    )
}

fn queue_channel(queue: &QueueSpec) -> Value {
    let kinds = queue_messages(queue);
    let messages: serde_json::Map<String, Value> = kinds
        .iter()
        .map(|t| (t.as_str().to_owned(), message_ref(t.as_str())))
        .collect();
    let bindings: Vec<Value> = queue
        .routing_keys
        .iter()
        .map(|key| json!({ "exchange": queue.exchange, "routingKey": key }))
        .collect();
    let role = match queue.kind {
        topology::QueueKind::Work => format!(
            "A work queue: a delivery is retried at most {} times, then dead-lettered into `{}`, as \
             is anything its consumer rejects.",
            topology::DELIVERY_LIMIT,
            argument(queue, "x-dead-letter-exchange").unwrap_or_default()
        ),
        topology::QueueKind::Deadline => format!(
            "Holds deadline messages until their per-message `expiration`, then dead-letters them \
             into `{}`.",
            argument(queue, "x-dead-letter-exchange").unwrap_or_default()
        ),
        topology::QueueKind::Terminal => "No delivery limit, nowhere to dead-letter.".to_owned(),
    };
    let sources = dead_letter_sources(queue);
    let arrives = if sources.is_empty() {
        String::new()
    } else {
        format!(
            " Receives the messages {} dead-letters into `{}`, with RabbitMQ's `x-death` and \
             `x-first-death-*` headers added (and, for an expired message, its `expiration` \
             removed). A message about several orders whose batch failed here comes back split, \
             one per order, published straight to that exchange (without `x-death`).",
            sources
                .iter()
                .map(|q| format!("`{}`", q.name))
                .collect::<Vec<_>>()
                .join(" or "),
            queue.exchange
        )
    };
    let consumed = match (consumer(queue.name), queue.name) {
        (Some(c), _) => format!("Consumed by {c}."),
        (None, topology::DATA_PLATFORM_QUEUE) => {
            "Consumed by the data platform (declared by orderflow, which never reads it).".to_owned()
        }
        (None, _) => "No one consumes it.".to_owned(),
    };
    let bound = queue
        .routing_keys
        .iter()
        .map(|key| match key {
            &"" => format!("`{}`", queue.exchange),
            key => format!("`{}` with `{key}`", queue.exchange),
        })
        .collect::<Vec<_>>()
        .join(", ");
    json!({
        "address": queue.name,
        "title": format!("queue {}", queue.name),
        "description": format!("Durable quorum queue bound to {bound}.{arrives} {role} {consumed}"),
        "messages": messages,
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": queue.name,
                    "durable": true,
                    "exclusive": false,
                    "autoDelete": false,
                },
                "x-arguments": arguments_json(&queue.arguments()),
                "x-bindings": bindings,
                "bindingVersion": AMQP_BINDING,
            }
        },
    })
}

fn send_operation(kind: MessageType) -> Value {
    let key = kind.as_str();
    let (title, description) = about(kind);
    json!({
        "action": "send",
        "channel": { "$ref": format!("#/channels/{key}") },
        "messages": [{ "$ref": format!("#/channels/{key}/messages/{key}") }],
        "title": format!("Publish {key}"),
        "summary": title,
        "description": format!(
            "{description} Published by the relay from the outbox: persistent, {}with publisher \
             confirms; a broker return counts as a failed publish.",
            if kind.must_route() { "`mandatory`, " } else { "" }
        ),
        "bindings": {
            "amqp": {
                "deliveryMode": 2,
                "mandatory": kind.must_route(),
                "timestamp": true,
                "bindingVersion": AMQP_BINDING,
            }
        },
    })
}

fn receive_operation(queue: &QueueSpec, consumer: &str) -> Value {
    let messages: Vec<Value> = queue_messages(queue)
        .iter()
        .map(|t| json!({ "$ref": format!("#/channels/{}/messages/{}", queue.name, t.as_str()) }))
        .collect();
    json!({
        "action": "receive",
        "channel": { "$ref": format!("#/channels/{}", queue.name) },
        "messages": messages,
        "title": format!("Consume {}", queue.name),
        "summary": format!("{} consumes `{}`", capitalized(consumer), queue.name),
        "description": if queue.kind == topology::QueueKind::Work {
            "Each message is recorded in the consumer's inbox in the same transaction as its \
             effect and acked after commit (a message seen before is acked and skipped). \
             Transient failures are retried, then returned to the queue; a message that can \
             never be handled is rejected without requeue (dead-lettered)."
        } else {
            "Each dead letter is recorded once (by a fingerprint of its content) in the same \
             transaction as what it causes, and acked after commit. Nothing here is ever \
             rejected: a letter that cannot be recorded after a few attempts is kept as a bare \
             record (body and reason) instead of being redelivered without end."
        },
        "bindings": {
            "amqp": { "ack": true, "bindingVersion": AMQP_BINDING }
        },
    })
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The body schema of one message type: the envelope's, with `type` fixed and `data` the
/// type's own.
fn payload(kind: MessageType) -> Value {
    let (data, order_id_required) = match kind {
        MessageType::OrderConfirmed => (OrderConfirmedData::name(), true),
        MessageType::OrderCancelled => (OrderCancelledData::name(), true),
        _ => (CommandData::name(), false),
    };
    if kind.is_public() {
        let mut schema = schema_json(<CloudEvent>::schema());
        if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            for (name, value) in [
                ("type", json!(kind.as_str())),
                ("specversion", json!("1.0")),
                ("source", json!(super::envelope::EVENT_SOURCE)),
                ("datacontenttype", json!(CONTENT_TYPE)),
            ] {
                if let Some(p) = properties.get_mut(name).and_then(Value::as_object_mut) {
                    p.insert("const".to_owned(), value);
                }
            }
            properties.insert(
                "data".to_owned(),
                json!({ "$ref": format!("#/components/schemas/{data}") }),
            );
        }
        return schema;
    }
    let mut schema = schema_json(<Envelope>::schema());
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        if let Some(t) = properties.get_mut("type").and_then(Value::as_object_mut) {
            t.insert("const".to_owned(), json!(kind.as_str()));
        }
        properties.insert(
            "data".to_owned(),
            json!({ "$ref": format!("#/components/schemas/{data}") }),
        );
    }
    if order_id_required && let Some(required) = schema.get_mut("required").and_then(Value::as_array_mut) {
        required.push(json!("orderId"));
    }
    schema
}

fn message(kind: MessageType) -> Value {
    let key = kind.as_str();
    let (title, description) = about(kind);
    let (correlation, location) = if kind.is_public() {
        (
            "The order the event is about (the CloudEvent's `subject`); also the AMQP `correlation_id`.",
            "$message.payload#/subject",
        )
    } else {
        (
            "The order, when the command is about exactly one (then also the AMQP `correlation_id`); \
             a command about several orders names them in `data.orderIds`.",
            "$message.payload#/orderId",
        )
    };
    json!({
        "name": key,
        "title": title,
        "summary": description,
        "contentType": kind.content_type(),
        "correlationId": {
            "description": correlation,
            "location": location,
        },
        "headers": { "$ref": "#/components/schemas/MessageHeaders" },
        "payload": payload(kind),
        "bindings": {
            "amqp": { "messageType": key, "bindingVersion": AMQP_BINDING }
        },
        "x-amqp-properties": { "$ref": "#/components/schemas/AmqpProperties" },
    })
}

fn dead_letter_message() -> Value {
    let (title, description) = about(MessageType::DeadLetter);
    json!({
        "name": MessageType::DeadLetter.as_str(),
        "title": title,
        "summary": description,
        "description": "The message as it was published (usually one of the commands), body and \
                        properties unchanged, whatever its bytes: a rejected message need not \
                        even be JSON, so the payload is described as bytes. RabbitMQ adds the \
                        headers below.",
        "contentType": "application/octet-stream",
        "headers": { "$ref": "#/components/schemas/DeadLetterHeaders" },
        "payload": {
            "type": "string",
            "format": "binary",
            "description": "The dead message's body, unchanged: any bytes."
        },
    })
}

/// `components.schemas`: the body types (from their `ToSchema` derives, with everything they
/// refer to), and the AMQP properties and headers.
fn schemas() -> BTreeMap<String, Value> {
    let mut found: Vec<(String, RefOr<Schema>)> = Vec::new();
    let mut root = |name: std::borrow::Cow<'static, str>, schema: RefOr<Schema>| {
        found.push((name.into_owned(), schema));
    };
    root(<Envelope>::name(), <Envelope>::schema());
    root(<CloudEvent>::name(), <CloudEvent>::schema());
    root(CommandData::name(), CommandData::schema());
    root(OrderConfirmedData::name(), OrderConfirmedData::schema());
    root(OrderCancelledData::name(), OrderCancelledData::schema());
    <Envelope as ToSchema>::schemas(&mut found);
    <CloudEvent as ToSchema>::schemas(&mut found);
    CommandData::schemas(&mut found);
    OrderConfirmedData::schemas(&mut found);
    OrderCancelledData::schemas(&mut found);
    let mut schemas: BTreeMap<String, Value> = found
        .into_iter()
        .map(|(name, schema)| (name, schema_json(schema)))
        .collect();
    schemas.insert("AmqpProperties".to_owned(), amqp_properties());
    schemas.insert("MessageHeaders".to_owned(), message_headers());
    schemas.insert("DeadLetterHeaders".to_owned(), dead_letter_headers());
    schemas
}

fn schema_json(schema: RefOr<Schema>) -> Value {
    serde_json::to_value(schema).unwrap_or(Value::Null)
}

fn amqp_properties() -> Value {
    json!({
        "type": "object",
        "description": "The AMQP basic properties of every message orderflow publishes (names as \
                        the AMQP 0-9-1 spec and RabbitMQ's management API spell them; the \
                        headers are the message's `headers`).",
        "required": ["content_type", "delivery_mode", "message_id", "type", "timestamp", "app_id"],
        "properties": {
            "content_type": {
                "type": "string",
                "enum": [CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE],
                "description": "`application/cloudevents+json` for the public events (CloudEvents, \
                                structured mode), `application/json` for every other message.",
            },
            "delivery_mode": {
                "type": "integer",
                "const": 2,
                "description": "Persistent.",
            },
            "message_id": {
                "type": "string",
                "format": "uuid",
                "description": "The body's `id` (UUIDv7), stable across re-publishes.",
            },
            "type": {
                "type": "string",
                "description": "The message type: the envelope's `type`, the routing key and the \
                                message's `bindings.amqp.messageType`.",
            },
            "timestamp": {
                "type": "integer",
                "minimum": 0,
                "description": "When the message was written to the outbox, in seconds since the \
                                Unix epoch.",
            },
            "app_id": { "type": "string", "const": APP_ID },
            "correlation_id": {
                "type": "string",
                "format": "uuid",
                "description": "The order the message is about: the envelope's `orderId` or the \
                                CloudEvent's `subject`; present exactly when the body names one.",
            },
            "expiration": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "`order.deadline` only: ORDER_TIMEOUT in milliseconds. RabbitMQ \
                                removes it when it dead-letters the expired message.",
            },
        },
    })
}

fn message_headers() -> Value {
    json!({
        "type": "object",
        "description": "The AMQP headers of every message orderflow publishes.",
        "required": ["traceparent"],
        "properties": {
            "traceparent": {
                "type": "string",
                "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                "description": "W3C trace context of the span that sent the message (the order's \
                                trace for its events).",
            },
            "tracestate": {
                "type": "string",
                "description": "W3C trace state, when the trace has one.",
            },
            "x-orderflow-replay-of": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "Only on an operator's replay of a dead letter: that dead letter's id.",
            },
            "x-orderflow-event-replay": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "Only on an `order.confirmed` published again by an event replay \
                                (`POST /api/admin/events/replay`): the replay's id. The event's \
                                `id` and bytes are the original's, so dedup by `id` absorbs it.",
            },
            "x-delivery-count": {
                "type": "integer",
                "description": "Added by RabbitMQ on a redelivery from a quorum queue: the \
                                attempts before this one.",
            },
        },
    })
}

fn dead_letter_headers() -> Value {
    json!({
        "type": "object",
        "description": "The headers of a dead letter: the message's own (see `MessageHeaders`) \
                        and those RabbitMQ adds when it dead-letters it.",
        "required": ["x-death", "x-first-death-reason", "x-first-death-queue", "x-first-death-exchange"],
        "properties": {
            "x-death": {
                "type": "array",
                "description": "One entry per (queue, reason) the message died in, latest first.",
                "items": {
                    "type": "object",
                    "required": ["count", "reason", "queue", "exchange", "routing-keys"],
                    "properties": {
                        "count": { "type": "integer", "minimum": 1 },
                        "reason": {
                            "type": "string",
                            "enum": ["rejected", "expired", "maxlen", "delivery_limit"],
                        },
                        "queue": { "type": "string" },
                        "exchange": { "type": "string" },
                        "routing-keys": { "type": "array", "items": { "type": "string" } },
                        "time": { "description": "An AMQP timestamp: when it died." },
                    },
                },
            },
            "x-first-death-reason": {
                "type": "string",
                "enum": ["rejected", "expired", "maxlen", "delivery_limit"],
            },
            "x-first-death-queue": { "type": "string" },
            "x-first-death-exchange": { "type": "string" },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::envelope::MAX_ORDERS_PER_COMMAND;

    #[test]
    fn the_copy_in_docs_is_what_the_server_serves() -> anyhow::Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/asyncapi.json");
        let served = document_text();
        if std::env::var_os("UPDATE_ASYNCAPI").is_some() {
            std::fs::write(&path, &served)?;
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == served,
            "docs/asyncapi.json is not what GET /asyncapi.json serves; regenerate it with \
             `UPDATE_ASYNCAPI=1 cargo test -p orderflow-shared asyncapi` and commit it"
        );
        Ok(())
    }

    #[test]
    fn every_type_every_queue_and_every_argument_is_described() {
        let doc = document();
        for t in published() {
            let channel = &doc["channels"][t.as_str()];
            assert_eq!(channel["address"], t.as_str());
            assert_eq!(channel["bindings"]["amqp"]["exchange"]["name"], t.exchange());
            assert_eq!(
                doc["components"]["messages"][t.as_str()]["payload"]["properties"]["type"]["const"],
                t.as_str()
            );
            assert!(doc["operations"][format!("send.{}", t.as_str())].is_object());
        }
        for q in topology::QUEUES {
            let binding = &doc["channels"][q.name]["bindings"]["amqp"];
            assert_eq!(binding["queue"]["name"], q.name);
            assert_eq!(binding["x-arguments"], arguments_json(&q.arguments()));
            assert_eq!(binding["x-arguments"]["x-queue-type"], "quorum");
            assert!(
                !doc["channels"][q.name]["messages"]
                    .as_object()
                    .is_none_or(|m| m.is_empty()),
                "{} receives nothing",
                q.name
            );
        }
        let orders = &doc["components"]["schemas"]["CommandData"]["properties"]["orderIds"];
        assert_eq!(orders["maxItems"], MAX_ORDERS_PER_COMMAND);
        assert_eq!(orders["minItems"], 1);
    }

    #[test]
    fn deadlines_expire_into_the_recovery_queue_and_work_queues_into_the_dead_letters() {
        let doc = document();
        let names = |queue: &str| -> Vec<String> {
            doc["channels"][queue]["messages"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(names(topology::EXPIRED_QUEUE), ["order.deadline"]);
        assert_eq!(names(topology::DEADLINE_QUEUE), ["order.deadline"]);
        assert_eq!(names(topology::DEAD_LETTER_QUEUE), ["dead-letter"]);
        assert_eq!(names(topology::DATA_PLATFORM_QUEUE), ["order.confirmed"]);
        assert_eq!(names(topology::STOCK_QUEUE), ["stock.release", "stock.reserve"]);
        assert!(doc["operations"]["receive.orderflow.dead-letters"].is_object());
        assert!(doc["operations"].get("receive.orderflow.deadline").is_none());
        assert!(doc["operations"].get("receive.data-platform.orders").is_none());
    }
}
