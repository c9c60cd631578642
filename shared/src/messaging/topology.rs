//! The broker topology, declared idempotently by every process at start. Arguments never
//! depend on configuration (ORDER_TIMEOUT is a per-message expiration), so a redeploy never
//! has to delete a queue.
//!
//! On a cluster: every queue is created with three replicas (`x-quorum-initial-group-size`)
//! and its leader on the least loaded node (`x-queue-leader-locator=balanced`). RabbitMQ 3.10
//! checks both for equivalence on a redeclare (as it does `x-delivery-limit`, the
//! dead-letter arguments, `x-max-length` and `x-overflow`): a queue created without them
//! answers a redeclare with them PRECONDITION_FAILED. So [`declare`] leaves a queue that
//! exists with other arguments as it is, and creates missing ones with today's.
//!
//! | exchange | kind | routing keys | queue |
//! |---|---|---|---|
//! | `orderflow.work` | direct | `stock.*`, `coupon.*`, `payment.*`, `order.confirm`, `order.finish-cancel` | one quorum queue per worker |
//! | `orderflow.events` | topic | `order.confirmed`, `order.cancelled` | `data-platform.orders` (confirmed) |
//! | `orderflow.deadline` | direct | `order.deadline` | `orderflow.deadline` (no consumer; expires into `orderflow.expired`) |
//! | `orderflow.expired` | fanout | | `orderflow.recovery.expired` |
//! | `orderflow.dlx` | fanout | | `orderflow.dead-letters` |

use lapin::{
    Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, ShortString},
};

pub const WORK_EXCHANGE: &str = "orderflow.work";
pub const EVENTS_EXCHANGE: &str = "orderflow.events";
pub const DEADLINE_EXCHANGE: &str = "orderflow.deadline";
pub const EXPIRED_EXCHANGE: &str = "orderflow.expired";
pub const DEAD_LETTER_EXCHANGE: &str = "orderflow.dlx";

pub const STOCK_QUEUE: &str = "orderflow.stock";
pub const COUPON_QUEUE: &str = "orderflow.coupon";
pub const PAYMENT_QUEUE: &str = "orderflow.payment";
pub const ORDER_QUEUE: &str = "orderflow.order";
pub const DEADLINE_QUEUE: &str = "orderflow.deadline";
pub const EXPIRED_QUEUE: &str = "orderflow.recovery.expired";
pub const DEAD_LETTER_QUEUE: &str = "orderflow.dead-letters";
/// The data platform's queue: every `order.confirmed`, at least once.
pub const DATA_PLATFORM_QUEUE: &str = "data-platform.orders";

/// Attempts (deliveries) before a work message is dead-lettered.
pub const DELIVERY_LIMIT: i64 = 10;
/// Replicas of each quorum queue when it is created (capped by the cluster's size).
pub const QUORUM_INITIAL_GROUP_SIZE: i64 = 3;
/// Upper bound on a work queue's length; needed by at-least-once dead lettering, which keeps
/// unconfirmed dead letters in the source queue.
pub const MAX_QUEUE_LENGTH: i64 = 1_000_000;

/// A queue the topology declares, with what it is bound to.
#[derive(Debug, Clone, Copy)]
pub struct QueueSpec {
    pub name: &'static str,
    pub exchange: &'static str,
    pub routing_keys: &'static [&'static str],
    pub kind: QueueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Quorum queue with a delivery limit, dead-lettering at least once into the DLQ.
    Work,
    /// Quorum queue, no delivery limit, nowhere to dead-letter (the DLQ, the public queue).
    Terminal,
    /// Holds deadline messages until they expire into the recovery worker's queue.
    Deadline,
}

pub const QUEUES: &[QueueSpec] = &[
    QueueSpec {
        name: STOCK_QUEUE,
        exchange: WORK_EXCHANGE,
        routing_keys: &["stock.reserve", "stock.release"],
        kind: QueueKind::Work,
    },
    QueueSpec {
        name: COUPON_QUEUE,
        exchange: WORK_EXCHANGE,
        routing_keys: &["coupon.apply", "coupon.restore"],
        kind: QueueKind::Work,
    },
    QueueSpec {
        name: PAYMENT_QUEUE,
        exchange: WORK_EXCHANGE,
        routing_keys: &["payment.charge", "payment.refund"],
        kind: QueueKind::Work,
    },
    QueueSpec {
        name: ORDER_QUEUE,
        exchange: WORK_EXCHANGE,
        routing_keys: &["order.confirm", "order.finish-cancel"],
        kind: QueueKind::Work,
    },
    QueueSpec {
        name: EXPIRED_QUEUE,
        exchange: EXPIRED_EXCHANGE,
        routing_keys: &[""],
        kind: QueueKind::Work,
    },
    QueueSpec {
        name: DEADLINE_QUEUE,
        exchange: DEADLINE_EXCHANGE,
        routing_keys: &["order.deadline"],
        kind: QueueKind::Deadline,
    },
    QueueSpec {
        name: DEAD_LETTER_QUEUE,
        exchange: DEAD_LETTER_EXCHANGE,
        routing_keys: &[""],
        kind: QueueKind::Terminal,
    },
    QueueSpec {
        name: DATA_PLATFORM_QUEUE,
        exchange: EVENTS_EXCHANGE,
        routing_keys: &["order.confirmed"],
        kind: QueueKind::Terminal,
    },
];

pub const EXCHANGES: &[(&str, ExchangeKind)] = &[
    (WORK_EXCHANGE, ExchangeKind::Direct),
    (EVENTS_EXCHANGE, ExchangeKind::Topic),
    (DEADLINE_EXCHANGE, ExchangeKind::Direct),
    (EXPIRED_EXCHANGE, ExchangeKind::Fanout),
    (DEAD_LETTER_EXCHANGE, ExchangeKind::Fanout),
];

impl QueueSpec {
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let mut set = |k: &str, v: AMQPValue| {
            args.insert(ShortString::from(k), v);
        };
        set("x-queue-type", AMQPValue::LongString("quorum".into()));
        // Cluster placement, fixed (never from configuration): three replicas (a majority
        // survives one lost node; fewer nodes cap it), the leader on the node with the
        // fewest leaders, so the queues' leaders spread over a three-node cluster instead of
        // all landing on the node the first process happened to connect to.
        set(
            "x-quorum-initial-group-size",
            AMQPValue::LongLongInt(QUORUM_INITIAL_GROUP_SIZE),
        );
        set("x-queue-leader-locator", AMQPValue::LongString("balanced".into()));
        match self.kind {
            QueueKind::Work => {
                set("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT));
                set(
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
                );
                set("x-dead-letter-strategy", AMQPValue::LongString("at-least-once".into()));
                set("x-overflow", AMQPValue::LongString("reject-publish".into()));
                set("x-max-length", AMQPValue::LongLongInt(MAX_QUEUE_LENGTH));
            }
            QueueKind::Deadline => {
                set("x-dead-letter-exchange", AMQPValue::LongString(EXPIRED_EXCHANGE.into()));
                set("x-dead-letter-strategy", AMQPValue::LongString("at-least-once".into()));
                set("x-overflow", AMQPValue::LongString("reject-publish".into()));
                set("x-max-length", AMQPValue::LongLongInt(MAX_QUEUE_LENGTH));
            }
            QueueKind::Terminal => {}
        }
        args
    }
}

/// Whether `exchange` (one of [`EXCHANGES`]) routes `routing_key` to one of [`QUEUES`].
pub fn routes(exchange: &str, routing_key: &str) -> bool {
    let fanout = EXCHANGES
        .iter()
        .any(|(name, kind)| *name == exchange && *kind == ExchangeKind::Fanout);
    QUEUES
        .iter()
        .any(|q| q.exchange == exchange && (fanout || q.routing_keys.contains(&routing_key)))
}

/// Declares every exchange, queue and binding. Idempotent: safe in every process at start.
///
/// Every queue is declared with [`QueueSpec::arguments`]: that creates a missing one, and
/// RabbitMQ accepts the redeclare of one created with the same arguments (by another process,
/// or an earlier start). A queue created with other arguments (by an earlier version, without
/// the cluster placement ones) is refused with PRECONDITION_FAILED, which closes the channel;
/// it is then left exactly as it is (so is one this user may not configure: ACCESS_REFUSED),
/// once a passive declare on a new channel shows it exists; only its bindings are declared,
/// so arguments added since apply to queues created from now on without breaking a running
/// deployment. A refused queue that does not exist fails with the refusal. Declaring today's
/// arguments first, not a passive probe, keeps a fresh or current broker free of refused
/// declares (each one a closed channel, which lapin logs as an error). Opens its own channels.
pub async fn declare(conn: &Connection) -> lapin::Result<()> {
    let mut channel = conn.create_channel().await?;
    for (name, kind) in EXCHANGES {
        channel
            .exchange_declare(
                (*name).into(),
                kind.clone(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    for q in QUEUES {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        match channel.queue_declare(q.name.into(), durable, q.arguments()).await {
            Ok(_) => {}
            Err(err) if is_refused(&err) => {
                // The refusal closed the channel. A queue that exists (created with other
                // arguments, or where this user may not configure it) is left as it is; a
                // refused queue that does not exist is the original error (an invalid
                // argument, no permission to create it).
                channel = conn.create_channel().await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..Default::default()
                };
                if channel
                    .queue_declare(q.name.into(), passive, FieldTable::default())
                    .await
                    .is_err()
                {
                    return Err(err);
                }
                tracing::info!(queue = q.name, error = %err, "queue exists as created earlier; left as it is");
            }
            Err(err) => return Err(err),
        }
        for key in q.routing_keys {
            channel
                .queue_bind(
                    q.name.into(),
                    q.exchange.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// PRECONDITION_FAILED (other arguments) or ACCESS_REFUSED (no configure permission).
fn is_refused(err: &lapin::Error) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(e)
    if matches!(e.kind(), AMQPErrorKind::Soft(
        AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_exchanges_route_what_is_bound_and_nothing_else() {
        assert!(routes(WORK_EXCHANGE, "stock.reserve"));
        assert!(routes(EVENTS_EXCHANGE, "order.confirmed"));
        assert!(!routes(EVENTS_EXCHANGE, "order.cancelled"));
        assert!(!routes(WORK_EXCHANGE, "stock.unknown"));
        assert!(routes(DEAD_LETTER_EXCHANGE, "anything"));
        assert!(!routes("legacy", "stock.reserve"));
    }
}
