//! Queue depths and consumer counts from passive queue declares: what the ops dashboard and the
//! metrics show, with no need for the management plugin.

use std::time::Duration;

use anyhow::Context;
use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use serde::Serialize;

use super::topology::QUEUES;
use crate::config::redact_url;

/// How long one round of passive declares may take, connection included.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

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
/// cannot be reached or does not answer within a few seconds.
pub async fn queue_stats(amqp_url: &str) -> anyhow::Result<Vec<QueueStat>> {
    tokio::time::timeout(STATS_TIMEOUT, declare_passively(amqp_url))
        .await
        .with_context(|| format!("the broker at {} did not answer in time", redact_url(amqp_url)))?
}

async fn connect(amqp_url: &str) -> anyhow::Result<Connection> {
    super::connect(amqp_url, ConnectionProperties::default())
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
    let probe = async {
        let conn = connect(amqp_url).await?;
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

async fn declare_passively(amqp_url: &str) -> anyhow::Result<Vec<QueueStat>> {
    let conn = connect(amqp_url).await?;
    let result = async {
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
        // Close the channel before the connection: closing a connection under an open
        // channel makes lapin log an error for it.
        let _ = channel.close(200, "bye".into()).await;
        Ok(stats)
    }
    .await;
    let _ = conn.close(200, "bye".into()).await;
    result.context("passive queue declares failed")
}
