//! Deadline messages are gathered for [`LINGER`] before they go out, as one message about
//! every order they name. Each accept batch writes one (DESIGN.md §3), which at the rates
//! shops really run is one per order: a publish, a quorum-queue write and, ORDER_TIMEOUT
//! later, its expiry into the recovery queue, a delivery and a recovery transaction, all for
//! a message nobody needs before its deadline. Gathered, that is paid once per second.
//!
//! Nothing is lost or early: the rows stay unsent in the outbox until the broker confirmed the
//! message that carries them (a relay that stops leading drops what it held, and the next
//! leader reads the rows again), and the message expires its own `expiration` after it is
//! published, so no order in it is looked at before its deadline, nor much more than
//! [`LINGER`] after it once the relay took its row.

use std::time::{Duration, Instant};

use orderflow_shared::{
    messaging::{
        Envelope, MessageType,
        envelope::{CommandData, MAX_ORDERS_PER_COMMAND},
        topology,
    },
    telemetry::TraceParent,
};
use uuid::Uuid;

use super::OutboxRow;

/// Longest a deadline row waits for others to go out with.
pub const LINGER: Duration = Duration::from_secs(1);

/// Deadline rows taken (handed over or read) and not yet published.
#[derive(Default)]
pub struct Held {
    rows: Vec<OutboxRow>,
    /// When the oldest of `rows` was taken.
    since: Option<Instant>,
}

impl Held {
    /// Keeps back the deadline rows of `rows` and returns the others.
    pub fn hold(&mut self, rows: Vec<OutboxRow>) -> Vec<OutboxRow> {
        let (deadlines, others): (Vec<_>, Vec<_>) = rows.into_iter().partition(is_deadline);
        for row in deadlines {
            self.since.get_or_insert_with(Instant::now);
            self.rows.push(row);
        }
        others
    }

    /// Whether a row is held here (so a poll or a late hand-over does not take it again).
    pub fn knows(&self, id: i64) -> bool {
        self.rows.iter().any(|r| r.id == id)
    }

    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.rows.iter().map(|r| r.id)
    }

    /// How long until the held rows are due; `None` when none is held.
    pub fn wait(&self) -> Option<Duration> {
        self.since.map(|t| LINGER.saturating_sub(t.elapsed()))
    }

    /// The held rows as messages of at most [`MAX_ORDERS_PER_COMMAND`] orders each, once the
    /// oldest waited [`LINGER`], a message's worth is held, or `now` (shutting down); else none.
    pub fn due(&mut self, now: bool) -> Vec<OutboxRow> {
        let orders: usize = self.rows.iter().map(|r| r.order_ids.len()).sum();
        let ready = now || orders >= MAX_ORDERS_PER_COMMAND || self.wait().is_some_and(|w| w.is_zero());
        if !ready || self.rows.is_empty() {
            return Vec::new();
        }
        self.since = None;
        let mut messages = Vec::new();
        let mut group: Vec<OutboxRow> = Vec::new();
        let mut orders = 0;
        for row in std::mem::take(&mut self.rows) {
            if orders + row.order_ids.len() > MAX_ORDERS_PER_COMMAND && !group.is_empty() {
                messages.extend(merge(std::mem::take(&mut group)));
                orders = 0;
            }
            orders += row.order_ids.len();
            group.push(row);
        }
        if !group.is_empty() {
            messages.extend(merge(group));
        }
        messages
    }
}

/// Whether a row is a deadline as accepting writes it: to the deadline exchange, with an
/// expiration. (A dead-lettered deadline replayed by an operator goes straight to the recovery
/// queue, with its original id: it goes out as it is.)
fn is_deadline(row: &OutboxRow) -> bool {
    row.message_type == MessageType::OrderDeadline.as_str()
        && row.exchange == topology::DEADLINE_EXCHANGE
        && row.routing_key == MessageType::OrderDeadline.as_str()
        && row.expiration_ms.is_some()
}

/// One deadline message naming every order of `rows` (at most [`MAX_ORDERS_PER_COMMAND`]),
/// standing for them all (`covers`): confirmed, they are all marked sent; refused, they are
/// all retried. A single row goes out as it is (and so would all, could the message not be
/// written).
fn merge(rows: Vec<OutboxRow>) -> Vec<OutboxRow> {
    if rows.len() == 1 {
        return rows;
    }
    let mut orders = Vec::new();
    let mut traces = Vec::new();
    for row in &rows {
        orders.extend_from_slice(&row.order_ids);
        traces.extend(row_traces(row));
    }
    // Two rows or more: several orders, so no `orderId` (and no AMQP correlation id).
    let mut envelope = Envelope::new(MessageType::OrderDeadline, None, CommandData::new(&orders, &traces));
    envelope.id = merged_id(&rows);
    let Ok(body) = serde_json::to_vec(&envelope) else {
        return rows;
    };
    let mut headers = serde_json::json!({});
    if let Some(first) = traces.iter().flatten().next() {
        headers["traceparent"] = first.to_string().into();
    }
    let first = &rows[0];
    vec![OutboxRow {
        id: first.id,
        message_id: envelope.id,
        exchange: first.exchange.clone(),
        routing_key: first.routing_key.clone(),
        message_type: first.message_type.clone(),
        headers,
        body,
        expiration_ms: rows.iter().filter_map(|r| r.expiration_ms).max(),
        created_at: first.created_at,
        covers: rows.iter().map(|r| r.id).collect(),
        order_ids: orders,
    }]
}

/// The id of the message standing for `rows`: the same whenever the same rows are gathered
/// again (a relay that died between the broker's confirm and the mark, and the next leader),
/// so the recovery worker's inbox absorbs the repeat. A UUIDv7 like every message id: the time
/// of the first row's message id, and the rest from a hash of the rows' ids.
fn merged_id(rows: &[OutboxRow]) -> Uuid {
    let ids: Vec<u8> = rows.iter().flat_map(|r| r.id.to_be_bytes()).collect();
    let hash = Uuid::new_v5(&Uuid::NAMESPACE_OID, &ids);
    let mut rest = [0u8; 10];
    rest.copy_from_slice(&hash.as_bytes()[..10]);
    let millis = rows[0].message_id.get_timestamp().map_or(0, |t| {
        let (secs, nanos) = t.to_unix();
        secs * 1_000 + u64::from(nanos) / 1_000_000
    });
    uuid::Builder::from_unix_timestamp_millis(millis, &rest).into_uuid()
}

/// Each order's trace in a deadline row, aligned with its `order_ids`: `data.traceparents`
/// when it lists them, else the `traceparent` header for a row about one order.
fn row_traces(row: &OutboxRow) -> Vec<Option<TraceParent>> {
    let listed = serde_json::from_slice::<Envelope<CommandData>>(&row.body)
        .map(|e| e.data.traceparents)
        .unwrap_or_default();
    if listed.len() == row.order_ids.len() {
        return listed.iter().map(|t| TraceParent::parse(t)).collect();
    }
    let header = row.headers["traceparent"].as_str().and_then(TraceParent::parse);
    match row.order_ids.len() {
        1 => vec![header],
        n => vec![None; n],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    const TRACE_A: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const TRACE_B: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn deadline(id: i64, orders: &[Uuid], traces: &[Option<&str>], expiration_ms: i64) -> OutboxRow {
        let parsed: Vec<_> = traces.iter().map(|t| t.and_then(TraceParent::parse)).collect();
        let single = (orders.len() == 1).then(|| orders[0]);
        let envelope = Envelope::new(MessageType::OrderDeadline, single, CommandData::new(orders, &parsed));
        let headers = match parsed.first().copied().flatten() {
            Some(t) => serde_json::json!({ "traceparent": t.to_string() }),
            None => serde_json::json!({}),
        };
        OutboxRow {
            id,
            message_id: envelope.id,
            exchange: MessageType::OrderDeadline.exchange().to_owned(),
            routing_key: "order.deadline".to_owned(),
            message_type: "order.deadline".to_owned(),
            order_ids: orders.to_vec(),
            headers,
            body: serde_json::to_vec(&envelope).unwrap(),
            expiration_ms: Some(expiration_ms),
            created_at: Utc::now(),
            covers: Vec::new(),
        }
    }

    fn other(id: i64) -> OutboxRow {
        OutboxRow {
            message_type: "stock.reserve".to_owned(),
            routing_key: "stock.reserve".to_owned(),
            ..deadline(id, &[Uuid::now_v7()], &[None], 0)
        }
    }

    #[test]
    fn deadlines_are_held_and_go_out_as_one_message_for_all_their_orders() {
        let orders: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let mut held = Held::default();
        let rest = held.hold(vec![
            deadline(1, &orders[..2], &[Some(TRACE_A), None], 60_000),
            other(2),
            deadline(3, &orders[2..3], &[Some(TRACE_B)], 60_000),
        ]);
        assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), [2]);
        assert_eq!(held.hold(vec![deadline(4, &orders[3..], &[None], 61_000)]).len(), 0);
        assert!(held.knows(1) && held.knows(4) && !held.knows(2));
        assert!(held.due(false).is_empty(), "not before the linger");
        assert!(held.wait().is_some_and(|w| w <= LINGER));

        let mut sent = held.due(true);
        assert_eq!(sent.len(), 1);
        let merged = sent.remove(0);
        assert_eq!(merged.covers, [1, 3, 4]);
        assert_eq!(merged.order_ids, orders);
        assert_eq!(merged.expiration_ms, Some(61_000), "no order's deadline comes early");
        assert_eq!(merged.headers["traceparent"], TRACE_A);
        let envelope: Envelope<CommandData> = serde_json::from_slice(&merged.body).unwrap();
        assert_eq!(envelope.id, merged.message_id);
        assert_eq!(envelope.kind, "order.deadline");
        assert_eq!(envelope.order_id, None);
        assert_eq!(envelope.data.order_ids, orders);
        assert_eq!(envelope.data.traceparents, [TRACE_A, "", TRACE_B, ""]);
        assert!(held.wait().is_none() && !held.knows(1), "nothing held after");
        assert_eq!(merged.message_id.get_version_num(), 7);
    }

    #[test]
    fn the_same_rows_gathered_again_make_the_same_message_id() {
        // The same rows read back by the next leader: same ids, message ids and orders.
        let orders: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let (a, b) = (
            deadline(7, &orders[..1], &[None], 60_000),
            deadline(9, &orders[1..], &[None, None], 60_000),
        );
        let copy = |r: &OutboxRow, id: i64| OutboxRow {
            id,
            message_id: r.message_id,
            body: r.body.clone(),
            ..deadline(id, &r.order_ids, &[], 60_000)
        };
        let mut held = Held::default();
        held.hold(vec![copy(&a, 7), copy(&b, 9)]);
        let first = held.due(true).remove(0);
        held.hold(vec![copy(&a, 7), copy(&b, 9)]);
        let again = held.due(true).remove(0);
        assert_eq!(first.message_id, again.message_id);
        assert_eq!(first.message_id.get_version_num(), 7);
        held.hold(vec![copy(&a, 8), copy(&b, 9)]);
        assert_ne!(
            held.due(true).remove(0).message_id,
            first.message_id,
            "other rows, another id"
        );
    }

    #[test]
    fn a_replayed_deadline_goes_out_as_it_is() {
        let mut held = Held::default();
        let replay = OutboxRow {
            exchange: String::new(),
            routing_key: "orderflow.recovery.expired".to_owned(),
            expiration_ms: None,
            ..deadline(5, &[Uuid::now_v7()], &[None], 0)
        };
        let rest = held.hold(vec![replay, deadline(6, &[Uuid::now_v7()], &[None], 60_000)]);
        assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), [5]);
        assert!(held.knows(6));
    }

    #[test]
    fn a_message_never_names_more_orders_than_a_command_may() {
        let mut held = Held::default();
        let big: Vec<Uuid> = (0..MAX_ORDERS_PER_COMMAND - 1).map(|_| Uuid::now_v7()).collect();
        held.hold(vec![
            deadline(1, &big, &[], 60_000),
            deadline(2, &[Uuid::now_v7(), Uuid::now_v7()], &[], 60_000),
        ]);
        let sent = held.due(false);
        assert_eq!(sent.len(), 2, "a message's worth is due at once, split at the limit");
        assert_eq!(
            (sent[0].id, sent[0].covers.as_slice()),
            (1, &[][..]),
            "a lone row goes as it is"
        );
        assert_eq!(sent[1].id, 2);
        assert!(sent.iter().all(|m| m.order_ids.len() <= MAX_ORDERS_PER_COMMAND));
    }
}
