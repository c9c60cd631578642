//! Connecting to RabbitMQ. Every connection declares the whole topology first, so any
//! process can start first and a broker restart re-creates nothing by hand.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Channel, Connection, ConnectionProperties};
use orderflow_shared::messaging::{self, topology};

/// Opens a connection to a live node of `url` (AMQP_URL: one URI, or several nodes of one
/// cluster, comma-separated, tried in a fresh random order each time), declares the topology
/// and opens a channel. A reconnect after a node died calls this again and so lands on
/// another node.
pub async fn connect(url: &str, name: &str) -> lapin::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = messaging::connect(url, props).await?;
    topology::declare(&conn).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// Backoff between reconnect attempts: 100 ms doubling to 5 s, with jitter, forever.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
