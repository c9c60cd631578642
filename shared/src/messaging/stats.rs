//! Queue depths and consumer counts from passive queue declares: what the ops dashboard and the
//! metrics show, with no need for the management plugin.

use std::time::Duration;

use anyhow::Context;
use lapin::{
    Connection, ConnectionProperties,
    options::QueueDeclareOptions,
    types::{FieldTable, ShortString},
};
use serde::Serialize;
use tokio::sync::Mutex;

use super::topology::QUEUES;
use crate::config::redact_url;

/// How long one round of passive declares may take, connection included.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long declaring the whole topology may take, connection included.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close waits for the broker's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// One queue of the topology as the broker sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStat {
    pub name: String,
    /// Messages ready for delivery (not counting delivered, unacknowledged ones).
    pub messages: u32,
    pub consumers: u32,
}

/// Opens one connection (to any live node of `amqp_url`, which may list several), declares
/// every queue of [`QUEUES`] passively, closes. A queue the
/// broker does not know (never declared in this vhost) is left out. Fails when the broker
/// cannot be reached or does not answer within a few seconds. For reads that repeat, keep a
/// [`QueueStats`].
pub async fn queue_stats(amqp_url: &str) -> anyhow::Result<Vec<QueueStat>> {
    let stats = QueueStats::new(amqp_url);
    let read = stats.read().await;
    stats.close().await;
    read
}

/// Reads [`queue_stats`] over one connection kept open from one read to the next. The gauge and
/// trend samplers read every few seconds; a connection opened and closed for each read was
/// about a sixth of what the idle system cost (in the broker and in this process), and three
/// lines of the broker's log each time.
/// A read that fails on the kept connection tries once more on a fresh one, on whichever node
/// of the list is live then; a read that does not answer in time drops the connection, and the
/// next read opens another. Reads take turns.
pub struct QueueStats {
    amqp_url: String,
    connection: Mutex<Option<Connection>>,
}

impl QueueStats {
    /// No connection yet: the first read opens it.
    pub fn new(amqp_url: &str) -> Self {
        Self {
            amqp_url: amqp_url.to_owned(),
            connection: Mutex::new(None),
        }
    }

    /// Every queue of [`QUEUES`] the broker knows, as [`queue_stats`] reads them, within
    /// [`STATS_TIMEOUT`], waiting for another read included.
    pub async fn read(&self) -> anyhow::Result<Vec<QueueStat>> {
        self.on_connection(STATS_TIMEOUT, async |conn| declare_passively(conn).await)
            .await
    }

    /// Declares the whole topology (idempotent, as every process does at start), so later
    /// reads find every queue. Within [`TOPOLOGY_TIMEOUT`]: on a fresh cluster, creating the
    /// quorum queues takes longer than a read.
    pub async fn declare_topology(&self) -> anyhow::Result<()> {
        self.on_connection(TOPOLOGY_TIMEOUT, async |conn| Ok(super::topology::declare(conn).await?))
            .await
    }

    /// Closes the kept connection, if any, waiting at most [`CLOSE_TIMEOUT`] for the broker to
    /// confirm (so it does not log the connection as closed unexpectedly).
    pub async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bye".into())).await;
        }
    }

    /// Runs `work` on the kept connection (opened first if there is none or it closed), all of
    /// it within `within`, the wait for the connection included. If `work` fails on a kept
    /// connection, it runs once more on a fresh one: the broker may have closed the kept one
    /// since the last read (a node restarted, an operator closed it) without this process having
    /// seen it yet, and a dashboard should not show a broker error for that. The connection is
    /// kept only if `work` succeeded; otherwise it is dropped, which closes it once its channels
    /// are gone too (a channel a timed-out read left open keeps it until the broker answers the
    /// channel's close or the heartbeat gives up on it).
    async fn on_connection<T>(
        &self,
        within: Duration,
        work: impl AsyncFn(&Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let attempt = async {
            let mut held = self.connection.lock().await;
            if let Some(conn) = held.take().filter(|conn| conn.status().connected()) {
                match work(&conn).await {
                    Ok(done) => {
                        *held = Some(conn);
                        return Ok(done);
                    }
                    Err(err) => tracing::debug!(error = %err, "kept broker connection failed, opening another"),
                }
            }
            let conn = connect(&self.amqp_url, CONNECTION_NAME).await?;
            let done = work(&conn).await?;
            *held = Some(conn);
            anyhow::Ok(done)
        };
        tokio::time::timeout(within, attempt)
            .await
            .with_context(|| format!("the broker at {} did not answer in time", redact_url(&self.amqp_url)))?
    }
}

/// The name the broker shows for [`QueueStats`]' connection (the management UI, `rabbitmqctl
/// list_connections`).
pub const CONNECTION_NAME: &str = "queue-stats";

/// Connects under `name`, so the broker's listing says what each connection is for.
async fn connect(amqp_url: &str, name: &str) -> anyhow::Result<Connection> {
    super::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| format!("cannot connect to the broker at {}", redact_url(amqp_url)))
}

/// Something a message can be published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

/// Whether the broker knows `destination` now (a passive declare on a connection of its own).
/// Fails when the broker cannot be reached or does not answer within a few seconds.
pub async fn exists(amqp_url: &str, destination: Destination<'_>) -> anyhow::Result<bool> {
    // AMQP names are short strings: one over 255 bytes (a forged `x-death` may name one)
    // cannot exist, and lapin would panic building the declare.
    let (Destination::Queue(name) | Destination::Exchange(name)) = destination;
    if ShortString::try_new(name).is_err() {
        return Ok(false);
    }
    let probe = async {
        let conn = connect(amqp_url, "destination-probe").await?;
        let channel = conn.create_channel().await?;
        let declared = match destination {
            Destination::Queue(name) => channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ()),
            Destination::Exchange(name) => {
                channel
                    .exchange_declare(
                        name.into(),
                        lapin::ExchangeKind::Direct,
                        lapin::options::ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            }
        };
        let found = match declared {
            Ok(()) => {
                let _ = channel.close(200, "bye".into()).await;
                true
            }
            // 404: the broker closed the channel.
            Err(err) if err.is_amqp_soft_error() => false,
            Err(err) => return Err(anyhow::Error::from(err)),
        };
        let _ = conn.close(200, "bye".into()).await;
        Ok(found)
    };
    tokio::time::timeout(STATS_TIMEOUT, probe)
        .await
        .with_context(|| format!("the broker at {} did not answer in time", redact_url(amqp_url)))?
}

async fn declare_passively(conn: &Connection) -> anyhow::Result<Vec<QueueStat>> {
    async {
        let mut channel = conn.create_channel().await?;
        let mut stats = Vec::with_capacity(QUEUES.len());
        for queue in QUEUES {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.name.into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => stats.push(QueueStat {
                    name: queue.name.to_owned(),
                    messages: q.message_count(),
                    consumers: q.consumer_count(),
                }),
                // 404: the broker closes the channel; carry on with a fresh one.
                Err(err) if err.is_amqp_soft_error() => {
                    tracing::debug!(queue = queue.name, error = %err, "queue not declared");
                    channel = conn.create_channel().await?;
                }
                Err(err) => return Err(err),
            }
        }
        // Close the channel, not only drop it: the connection stays open for the next read.
        let _ = channel.close(200, "bye".into()).await;
        Ok(stats)
    }
    .await
    .context("passive queue declares failed")
}
