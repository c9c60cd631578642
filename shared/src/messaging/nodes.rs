//! Several broker addresses: `AMQP_URL` may list the nodes of one RabbitMQ cluster,
//! comma-separated (`amqp://u:p@host-1:5672/%2f,amqp://u:p@host-2:5672/%2f`). Every process
//! connects to a live one, trying them in a new random order each time (so connections, and
//! reconnections after a node dies, spread over the cluster), and never needs more than one
//! to be up. A single URL behaves exactly as before.
//!
//! A comma inside one URI (e.g. in a password) must be percent-encoded (`%2C`).

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    io,
    time::Duration,
};

use lapin::{Connection, ConnectionProperties};

use crate::config::redact_url;

/// How long one node may take to accept a connection (TCP, AMQP handshake) before the next is
/// tried: a node that is paused or behind a dropped route must not hold a process back.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The URIs of `list`, in the order given (blank entries ignored).
pub fn urls(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// The URIs of `list` in a fresh random order.
pub fn shuffled(list: &str) -> Vec<&str> {
    let mut urls = urls(list);
    // Fisher-Yates with a randomly keyed hasher as the source: no RNG crate needed.
    let state = RandomState::new();
    for i in (1..urls.len()).rev() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        let j = usize::try_from(h.finish() % (i as u64 + 1)).unwrap_or(0);
        urls.swap(i, j);
    }
    urls
}

/// Checks an `AMQP_URL` value at load (a clap value parser): one or more comma-separated
/// AMQP URIs, each valid. Returns the value unchanged.
pub fn parse_amqp_urls(list: &str) -> Result<String, String> {
    let urls = urls(list);
    if urls.is_empty() {
        return Err("AMQP_URL is empty: give one AMQP URI or several, comma-separated".to_owned());
    }
    for url in urls {
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| format!("invalid AMQP URI {}: {e}", redact_url(url)))?;
    }
    Ok(list.to_owned())
}

/// Connects to the first node of `list` (in a fresh random order) that accepts a connection
/// within [`CONNECT_TIMEOUT`]. Fails with the last node's error when none does. A single URL
/// is connected to exactly as `lapin::Connection::connect` does (no timeout of ours: there is
/// no other node to try).
pub async fn connect(list: &str, props: ConnectionProperties) -> lapin::Result<Connection> {
    let urls = shuffled(list);
    if let [url] = urls[..] {
        return Connection::connect(url, props).await;
    }
    let mut last = lapin::Error::from(io::Error::new(io::ErrorKind::InvalidInput, "AMQP_URL lists no URI"));
    for (i, url) in urls.iter().enumerate() {
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props.clone())).await {
            Ok(Ok(conn)) => {
                if urls.len() > 1 {
                    tracing::debug!(node = %redact_url(url), "connected to broker node");
                }
                return Ok(conn);
            }
            Ok(Err(err)) => last = err,
            Err(_) => {
                last = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")).into();
            }
        }
        if i + 1 < urls.len() {
            tracing::debug!(node = %redact_url(url), error = %last, "broker node unreachable; trying the next");
        }
    }
    Err(last)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const THREE: &str = "amqp://g:g@127.0.0.1:5681/%2f, amqp://g:g@127.0.0.1:5682/%2f,amqp://g:g@127.0.0.1:5683/%2f";

    #[test]
    fn a_list_is_split_on_commas_and_a_single_url_is_itself() {
        assert_eq!(
            urls("amqp://guest:guest@127.0.0.1:5672/%2f"),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );
        assert_eq!(
            urls(THREE),
            [
                "amqp://g:g@127.0.0.1:5681/%2f",
                "amqp://g:g@127.0.0.1:5682/%2f",
                "amqp://g:g@127.0.0.1:5683/%2f"
            ]
        );
        assert_eq!(urls("amqp://a/,,"), ["amqp://a/"]);
    }

    #[test]
    fn shuffling_keeps_every_node_and_uses_every_order() {
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut order = shuffled(THREE);
            firsts.insert(order[0]);
            order.sort_unstable();
            assert_eq!(order, urls(THREE));
        }
        assert_eq!(firsts.len(), 3, "every node comes first sometimes");
    }

    #[test]
    fn every_uri_of_the_list_is_validated() {
        assert!(parse_amqp_urls(THREE).is_ok());
        assert!(parse_amqp_urls("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(parse_amqp_urls("").is_err());
        assert!(parse_amqp_urls(" , ").is_err());
        let err = parse_amqp_urls("amqp://u:secret@h1/%2f,http://u:secret@h2/").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn connecting_skips_dead_nodes_and_fails_only_when_all_are_dead() {
        // Port 1 refuses at once. The live node is the local default broker (tests run
        // against it); it is found whatever the order.
        let dead = "amqp://guest:guest@127.0.0.1:1/%2f";
        let list = format!("{dead},{dead},amqp://guest:guest@127.0.0.1:5672/%2f");
        for _ in 0..5 {
            let conn = connect(&list, ConnectionProperties::default()).await.unwrap();
            let _ = conn.close(200, "bye".into()).await;
        }
        assert!(
            connect(&format!("{dead},{dead}"), ConnectionProperties::default())
                .await
                .is_err()
        );
    }
}
