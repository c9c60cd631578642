//! The message envelope, internal and public alike:
//! `{"id", "type", "occurredAt", "orderId"?, "data": {...}}` with AMQP properties
//! `message_id` = id, `type`, `correlation_id` = the order id (when the message is about one
//! order), and a `traceparent` header.
//!
//! Public events are about one order each (`orderId`). Internal commands name the orders they
//! concern in `data.orderIds` (one accept batch's reservations travel in one message); a
//! command about exactly one order also carries `orderId`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::topology;
use crate::telemetry::TraceParent;

/// The body of every message orderflow sends, internal command or public event: JSON,
/// camelCase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<T = serde_json::Value> {
    /// The message id, a UUIDv7, also sent as the AMQP `message_id`. It stays the same when
    /// the message is published again (at-least-once delivery): consumers dedupe by it.
    pub id: Uuid,
    /// The message type, which is also the routing key and the AMQP `type` property.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the message was written: RFC 3339 in UTC with milliseconds and `Z`
    /// (`2026-11-21T10:00:00.123Z`).
    #[serde(with = "millis")]
    #[schema(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
    pub occurred_at: DateTime<Utc>,
    /// The order the message is about, also sent as the AMQP `correlation_id`. Every event
    /// carries it, and so does a command about exactly one order; a command about several
    /// orders has none (they are in `data.orderIds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    /// What the message says; its shape depends on `type`.
    #[schema(value_type = Object)]
    pub data: T,
}

impl<T> Envelope<T> {
    pub fn new(kind: MessageType, order_id: Option<Uuid>, data: T) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.as_str().to_owned(),
            occurred_at: millis::now(),
            order_id,
            data,
        }
    }
}

/// The AMQP `content_type` of every internal orderflow message (and of a public event's
/// `data`).
pub const CONTENT_TYPE: &str = "application/json";

/// The AMQP `content_type` of a public event: a CloudEvent in structured content mode, JSON
/// event format (CloudEvents 1.0 JSON Event Format §2; the RabbitMQ protocol binding the
/// CloudEvents SDKs implement reads it as structured by this content type).
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The CloudEvents `source` of every public event: orderflow's order pipeline.
pub const EVENT_SOURCE: &str = "/orderflow/orders";

/// A public event (`order.confirmed`, `order.cancelled`) as a CloudEvent 1.0, structured mode,
/// JSON format: `{"specversion", "id", "source", "type", "time", "subject", "datacontenttype",
/// "data"}`. Its `id`, `type` and `data` are where the earlier envelope had them (same values),
/// so a consumer of that envelope that reads those keeps working; `time` is its `occurredAt`
/// and `subject` its `orderId` (docs/EVENTS: the deprecation path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudEvent<T = serde_json::Value> {
    /// Always `1.0`.
    #[schema(pattern = r"^1\.0$")]
    pub specversion: String,
    /// The event id (UUIDv7), also the AMQP `message_id`; the same whenever the event is
    /// published again (relay retries, replays): consumers dedupe by it.
    pub id: Uuid,
    /// Always [`EVENT_SOURCE`].
    pub source: String,
    /// `order.confirmed` or `order.cancelled`, also the routing key and the AMQP `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened: RFC 3339, UTC, milliseconds.
    #[serde(with = "millis")]
    #[schema(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
    pub time: DateTime<Utc>,
    /// The order the event is about (its id), also the AMQP `correlation_id`.
    pub subject: Uuid,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// What the event says; its shape depends on `type`.
    #[schema(value_type = Object)]
    pub data: T,
}

impl<T> CloudEvent<T> {
    pub fn new(kind: MessageType, order_id: Uuid, data: T) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id: Uuid::now_v7(),
            source: EVENT_SOURCE.to_owned(),
            kind: kind.as_str().to_owned(),
            time: millis::now(),
            subject: order_id,
            datacontenttype: CONTENT_TYPE.to_owned(),
            data,
        }
    }
}

impl CloudEvent {
    /// An event as first published, in today's form: a CloudEvent is returned as it is, an
    /// earlier release's envelope (`{"id", "type", "occurredAt", "orderId", "data"}`, the same
    /// event) as the CloudEvent it stands for, with the same id. `None` for anything else.
    pub fn from_published(body: &[u8]) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        if value.get("specversion").is_some() {
            return serde_json::from_value(value).ok();
        }
        let envelope: Envelope = serde_json::from_value(value).ok()?;
        Some(Self {
            specversion: "1.0".to_owned(),
            id: envelope.id,
            source: EVENT_SOURCE.to_owned(),
            kind: envelope.kind,
            time: envelope.occurred_at,
            subject: envelope.order_id?,
            datacontenttype: CONTENT_TYPE.to_owned(),
            data: envelope.data,
        })
    }
}
/// The AMQP `app_id` of every orderflow message.
pub const APP_ID: &str = "orderflow";

/// Most orders one command message carries (the relay and the broker handle one message per
/// batch of orders instead of one per order; larger batches are split into several).
pub const MAX_ORDERS_PER_COMMAND: usize = 500;

/// The `data` of every internal command: the orders it concerns, each handled on its own
/// (outcome, retries and dead-lettering are per order). A message from before batching has
/// `data: {}` and its one order in `orderId`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandData {
    /// The orders the command concerns, 1 to 500 (`MAX_ORDERS_PER_COMMAND`); the handler
    /// reads everything else from the order rows. orderflow always sends it; a consumer still
    /// accepts a command without it (`data: {}`) when the envelope names its one order.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 500)]
    pub order_ids: Vec<Uuid>,
    /// The W3C `traceparent` of each order (its creation context), aligned with `orderIds`,
    /// in a command about several orders while spans are exported (the AMQP `traceparent`
    /// header names the first order's; each order stays in its own trace). Absent otherwise.
    /// Tracing only: an entry that does not parse, or a list that does not align, is ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "lenient_strings")]
    #[schema(max_items = 500)]
    pub traceparents: Vec<String>,
}

/// A list of at most [`MAX_ORDERS_PER_COMMAND`] strings, or an empty list for anything else
/// (tracing data never makes a command unreadable); an entry that is not a string reads as "".
fn lenient_strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) if items.len() <= MAX_ORDERS_PER_COMMAND => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s,
                _ => String::new(),
            })
            .collect(),
        _ => Vec::new(),
    })
}

impl CommandData {
    /// The data of a command about `orders`, each with its trace (aligned, or empty).
    pub fn new(orders: &[Uuid], traces: &[Option<TraceParent>]) -> Self {
        let traced = orders.len() > 1 && traces.len() == orders.len() && traces.iter().any(Option::is_some);
        Self {
            order_ids: orders.to_vec(),
            traceparents: if traced {
                traces
                    .iter()
                    .map(|t| t.map(|t| t.to_string()).unwrap_or_default())
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

impl Envelope {
    /// The orders a command names: `data.orderIds`, or else the envelope's `orderId`.
    /// An error when `data` is not a command's.
    pub fn command_orders(&self) -> Result<Vec<Uuid>, String> {
        self.command().map(|(ids, _)| ids)
    }

    /// The orders a command names ([`command_orders`](Self::command_orders)) and the trace
    /// of each, aligned (all `None` when the command names none).
    pub fn command(&self) -> Result<(Vec<Uuid>, Vec<Option<TraceParent>>), String> {
        let data: CommandData =
            serde_json::from_value(self.data.clone()).map_err(|e| format!("invalid command data: {e}"))?;
        let ids = match (data.order_ids.is_empty(), self.order_id) {
            (false, _) => data.order_ids,
            (true, Some(id)) => vec![id],
            (true, None) => return Err("the command names no order".to_owned()),
        };
        if ids.len() > MAX_ORDERS_PER_COMMAND {
            return Err(format!(
                "the command names {} orders (at most {MAX_ORDERS_PER_COMMAND})",
                ids.len()
            ));
        }
        let traces = if data.traceparents.len() == ids.len() {
            data.traceparents.iter().map(|t| TraceParent::parse(t)).collect()
        } else {
            vec![None; ids.len()]
        };
        Ok((ids, traces))
    }
}

/// orderflow's time precision: milliseconds. Every time an event carries (`occurredAt`,
/// `data.confirmedAt`, `data.cancelledAt`) is a whole millisecond, written as RFC 3339 with
/// three fraction digits and `Z`, and the stored time a client's window is compared with
/// (`confirmed_events.confirmed_at`, a replay's window) is that same whole millisecond, so a
/// window holds exactly the events whose shown times fall in it.
pub mod millis {
    use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }

    /// The current time, truncated to the millisecond.
    pub fn now() -> DateTime<Utc> {
        truncate(Utc::now())
    }

    /// `at` without its digits past the millisecond (what [`serialize`] shows).
    pub fn truncate(at: DateTime<Utc>) -> DateTime<Utc> {
        at.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(at)
    }

    /// The first whole millisecond at or after `at`. For whole-millisecond times `t`,
    /// `t >= at` exactly when `t >= ceil(at)`, and `t < at` exactly when `t < ceil(at)`: a
    /// window `[from, to)` of any precision holds the same events as `[ceil(from), ceil(to))`.
    pub fn ceil(at: DateTime<Utc>) -> DateTime<Utc> {
        let down = truncate(at);
        if down == at {
            at
        } else {
            down + TimeDelta::milliseconds(1)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times_are_whole_milliseconds_and_windows_round_up() {
            let t = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).ok();
            let at = t("2026-12-05T10:00:00.123456789Z");
            assert_eq!(at.map(truncate), t("2026-12-05T10:00:00.123Z"));
            assert_eq!(at.map(ceil), t("2026-12-05T10:00:00.124Z"));
            assert_eq!(t("2026-12-05T10:00:00.123Z").map(ceil), t("2026-12-05T10:00:00.123Z"));
            assert_eq!(t("2026-12-05T10:00:00.999500Z").map(ceil), t("2026-12-05T10:00:01Z"));
            assert_eq!(
                t("1969-12-31T23:59:59.9995Z").map(truncate),
                t("1969-12-31T23:59:59.999Z")
            );
            assert_eq!(now(), truncate(now().max(now())));
        }
    }
}

macro_rules! message_types {
    ($($variant:ident = $s:literal => ($exchange:expr, $queue:expr)),+ $(,)?) => {
        /// Every message type orderflow sends. The type is also the routing key.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MessageType { $($variant),+ }

        impl MessageType {
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)+ _ => None }
            }

            /// The exchange this type is published to.
            pub fn exchange(self) -> &'static str {
                match self { $(Self::$variant => $exchange),+ }
            }

            /// Whether an unroutable publish is a failure. Every internal message and
            /// `order.confirmed` (the data platform's queue) must land somewhere; an
            /// `order.cancelled` with no subscriber is simply not delivered.
            pub fn must_route(self) -> bool {
                !matches!(self, Self::OrderCancelled)
            }

            /// The work queue that consumes this type (public events have none of their own).
            pub fn queue(self) -> Option<&'static str> {
                match self { $(Self::$variant => $queue),+ }
            }
        }
    };
}

message_types! {
    StockReserve = "stock.reserve" => (topology::WORK_EXCHANGE, Some(topology::STOCK_QUEUE)),
    StockRelease = "stock.release" => (topology::WORK_EXCHANGE, Some(topology::STOCK_QUEUE)),
    CouponApply = "coupon.apply" => (topology::WORK_EXCHANGE, Some(topology::COUPON_QUEUE)),
    CouponRestore = "coupon.restore" => (topology::WORK_EXCHANGE, Some(topology::COUPON_QUEUE)),
    PaymentCharge = "payment.charge" => (topology::WORK_EXCHANGE, Some(topology::PAYMENT_QUEUE)),
    PaymentRefund = "payment.refund" => (topology::WORK_EXCHANGE, Some(topology::PAYMENT_QUEUE)),
    OrderConfirm = "order.confirm" => (topology::WORK_EXCHANGE, Some(topology::ORDER_QUEUE)),
    OrderFinishCancel = "order.finish-cancel" => (topology::WORK_EXCHANGE, Some(topology::ORDER_QUEUE)),
    OrderDeadline = "order.deadline" => (topology::DEADLINE_EXCHANGE, Some(topology::EXPIRED_QUEUE)),
    OrderConfirmed = "order.confirmed" => (topology::EVENTS_EXCHANGE, None),
    OrderCancelled = "order.cancelled" => (topology::EVENTS_EXCHANGE, None),
    // Not published by orderflow: the type the recovery worker gives whatever it reads
    // from the dead-letter queue.
    DeadLetter = "dead-letter" => (topology::DEAD_LETTER_EXCHANGE, Some(topology::DEAD_LETTER_QUEUE)),
}

impl MessageType {
    /// Public events, published as CloudEvents ([`CloudEvent`]); everything else is an
    /// internal [`Envelope`].
    pub fn is_public(self) -> bool {
        self.exchange() == topology::EVENTS_EXCHANGE
    }

    /// The AMQP `content_type` it is published with.
    pub fn content_type(self) -> &'static str {
        if self.is_public() {
            CLOUDEVENTS_CONTENT_TYPE
        } else {
            CONTENT_TYPE
        }
    }

    /// Compensations give back what a cancelled order held; when one keeps failing the
    /// order is parked as COMPENSATION_FAILED instead of being cancelled again.
    pub fn is_compensation(self) -> bool {
        matches!(
            self,
            Self::StockRelease | Self::CouponRestore | Self::PaymentRefund | Self::OrderFinishCancel
        )
    }
}

/// The `data` of `order.confirmed`: the data platform's contract. Amounts
/// are whole won (KRW has no minor unit): `totalAmount - discountAmount = paidAmount`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmedData {
    /// The user who placed the order.
    pub user_id: i64,
    /// The coupon the order used, or null.
    #[schema(required = true)]
    pub coupon_id: Option<i64>,
    /// The order's lines, at the prices of the moment it was placed.
    pub items: Vec<EventItem>,
    /// The sum of `quantity x unitPrice` over the lines, in whole won.
    pub total_amount: i64,
    /// What the coupon took off, in whole won (0 without a coupon; never above the total).
    pub discount_amount: i64,
    /// What the balance was charged, in whole won.
    pub paid_amount: i64,
    /// When the order was confirmed: RFC 3339 in UTC with milliseconds and `Z`.
    #[serde(with = "millis")]
    #[schema(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
    pub confirmed_at: DateTime<Utc>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub product_id: i64,
    /// Units of the product, at least 1.
    #[schema(minimum = 1)]
    pub quantity: i32,
    /// The product's price when the order was placed, in whole won.
    pub unit_price: i64,
}

/// The `data` of `order.cancelled`: why, and everything the order gave back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelledData {
    /// The user who placed the order.
    pub user_id: i64,
    /// Why the order was cancelled.
    #[schema(value_type = crate::domain::CancelReason)]
    pub reason: String,
    pub returned: Returned,
    /// When the order was cancelled: RFC 3339 in UTC with milliseconds and `Z`.
    #[serde(with = "millis")]
    #[schema(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
    pub cancelled_at: DateTime<Utc>,
}

/// What a cancelled order gave back: the units it had reserved (empty if it never reserved
/// any), the coupon it had used (made available again), the amount refunded to the balance
/// (whole won).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Returned {
    /// The units put back in stock (empty when the order never reserved any).
    pub items: Vec<EventItem>,
    /// The coupon made available again, or null.
    #[schema(required = true)]
    pub coupon_id: Option<i64>,
    /// The amount refunded to the balance, in whole won (0 when the order was never paid).
    pub refunded_amount: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_camel_case_with_millisecond_times() -> anyhow::Result<()> {
        let mut env = Envelope::new(MessageType::StockReserve, Some(Uuid::nil()), serde_json::json!({}));
        env.occurred_at = DateTime::parse_from_rfc3339("2026-11-21T10:00:00.123456Z")?.with_timezone(&Utc);
        let v = serde_json::to_value(&env)?;
        assert_eq!(v["type"], "stock.reserve");
        assert_eq!(v["occurredAt"], "2026-11-21T10:00:00.123Z");
        assert_eq!(v["orderId"], "00000000-0000-0000-0000-000000000000");
        let back: Envelope = serde_json::from_value(v)?;
        assert_eq!(back.kind, "stock.reserve");
        assert_eq!(back.command_orders(), Ok(vec![Uuid::nil()]));
        Ok(())
    }

    /// Rolling updates (docs/UPGRADING.md): a message of a later release, with fields this one
    /// does not know beside the ones it does, in the envelope and in `data`, is read as this
    /// release reads its own; and a public event's data likewise.
    #[test]
    fn a_later_release_s_message_with_fields_this_one_does_not_know_is_read_alike() -> anyhow::Result<()> {
        let order = Uuid::now_v7();
        let later = serde_json::json!({
            "id": Uuid::now_v7(), "type": "stock.reserve", "occurredAt": "2026-12-05T10:00:00.123Z",
            "orderId": order, "schemaVersion": 2, "tenant": "shop-1",
            "data": {"orderIds": [order], "priority": "high", "hints": {"warehouse": 3}},
        });
        let read: Envelope = serde_json::from_value(later)?;
        assert_eq!(read.command_orders(), Ok(vec![order]));
        let event = serde_json::json!({
            "userId": 42, "couponId": null, "items": [{"productId": 1, "quantity": 2, "unitPrice": 100, "sku": "X"}],
            "totalAmount": 200, "discountAmount": 0, "paidAmount": 200, "confirmedAt": "2026-12-05T10:00:00.120Z",
            "currency": "KRW",
        });
        let data: OrderConfirmedData = serde_json::from_value(event)?;
        assert_eq!((data.user_id, data.paid_amount, data.items.len()), (42, 200, 1));
        Ok(())
    }

    #[test]
    fn a_command_about_several_orders_carries_each_ones_trace_and_bad_traces_are_ignored() -> anyhow::Result<()> {
        let ids = vec![Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        let a = TraceParent::new_root();
        let b = TraceParent::new_root();
        let data = CommandData::new(&ids, &[Some(a), None, Some(b)]);
        assert_eq!(data.traceparents, vec![a.to_string(), String::new(), b.to_string()]);
        let env = Envelope::new(MessageType::PaymentCharge, None, serde_json::to_value(&data)?);
        assert_eq!(env.command(), Ok((ids.clone(), vec![Some(a), None, Some(b)])));
        // One order, or no trace known: no list at all.
        let one = serde_json::to_value(CommandData::new(&ids[..1], &[Some(a)]))?;
        assert!(one.get("traceparents").is_none());
        assert!(
            serde_json::to_value(CommandData::new(&ids, &[None, None, None]))?
                .get("traceparents")
                .is_none()
        );
        // Tracing data never makes a command unreadable: a list that does not align, entries
        // that are not traceparents, or no list at all read as no traces, with the orders intact.
        for traces in [
            serde_json::json!([a.to_string()]),
            serde_json::json!([7, {"x": 1}, null]),
            serde_json::json!(["00-zz", "", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]),
            serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            serde_json::json!({"0": a.to_string()}),
        ] {
            let env = Envelope::new(
                MessageType::PaymentCharge,
                None,
                serde_json::json!({"orderIds": ids, "traceparents": traces}),
            );
            assert_eq!(env.command(), Ok((ids.clone(), vec![None; 3])), "{traces}");
        }
        Ok(())
    }

    #[test]
    fn a_command_names_its_orders_in_data_and_never_none_or_too_many() -> anyhow::Result<()> {
        let ids = vec![Uuid::now_v7(), Uuid::now_v7()];
        let env = Envelope::new(
            MessageType::PaymentCharge,
            None,
            serde_json::to_value(CommandData::new(&ids, &[]))?,
        );
        let v = serde_json::to_value(&env)?;
        assert!(v.get("orderId").is_none());
        let back: Envelope = serde_json::from_value(v)?;
        assert_eq!(back.command_orders(), Ok(ids));
        let none = Envelope::new(MessageType::PaymentCharge, None, serde_json::json!({}));
        assert!(none.command_orders().is_err());
        let not_a_command = Envelope::new(MessageType::PaymentCharge, None, serde_json::json!({"orderIds": 7}));
        assert!(not_a_command.command_orders().is_err());
        let many = vec![Uuid::nil(); MAX_ORDERS_PER_COMMAND + 1];
        let too_many = Envelope::new(
            MessageType::PaymentCharge,
            None,
            serde_json::to_value(CommandData::new(&many, &[]))?,
        );
        assert!(too_many.command_orders().is_err());
        Ok(())
    }

    #[test]
    fn types_round_trip_and_route() {
        for t in MessageType::ALL {
            assert_eq!(MessageType::parse(t.as_str()), Some(*t));
        }
        assert_eq!(MessageType::OrderConfirmed.exchange(), topology::EVENTS_EXCHANGE);
        assert_eq!(MessageType::PaymentRefund.queue(), Some(topology::PAYMENT_QUEUE));
    }
}
