//! Serving a router over HTTP/1.1 with the limits a listener facing unknown clients needs,
//! which `axum::serve` does not set (it gives hyper no timer, so hyper enforces no timeout).
//!
//! - **Header timeout**: a request's head (request line and headers) must arrive within
//!   [`Limits::header_timeout`] of the connection being ready for it, and a kept-alive
//!   connection idle that long is closed (hyper's `header_read_timeout`, which covers both).
//!   Without it a client sending a byte a minute holds its connection, task and read buffer
//!   (up to ~400 KB) for as long as it likes. A slow *body* is the admission layer's
//!   ([`crate::admission::BODY_DEADLINE`]).
//! - **Connection cap**: at most [`Limits::max_connections`] connections are served at once;
//!   the next is accepted when one closes (until then it waits in the kernel's backlog), so
//!   clients cannot take the file descriptors the process needs for PostgreSQL and RabbitMQ.
//! - **Graceful shutdown**: once `shutdown` is cancelled no connection is accepted, idle ones
//!   are closed, and requests in flight finish (long polls and event streams end on the same
//!   token), for up to [`SHUTDOWN_GRACE`].

use std::{sync::Arc, time::Duration};

use axum::{Router, serve::Listener};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use orderflow_shared::config::Config;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// HTTP_HEADER_TIMEOUT: the longest a request's head may take, and a connection may idle.
    pub header_timeout: Duration,
    /// HTTP_MAX_CONNECTIONS: connections served at once (at least 1).
    pub max_connections: usize,
}

impl Limits {
    /// The limits `config` sets (HTTP_HEADER_TIMEOUT, HTTP_MAX_CONNECTIONS).
    pub fn of(config: &Config) -> Self {
        Self {
            header_timeout: config.http_header_timeout,
            max_connections: config.http_max_connections,
        }
    }
}

/// File descriptors a process keeps beside its clients' connections: its database pools,
/// broker connections, listeners, logs and the runtime's own.
const OWN_FILES: u64 = 256;

/// Raises the soft limit on open files to the hard limit, as Go's runtime does at start:
/// systemd and many container runtimes start a process with a soft 1,024 (and a hard limit far
/// above), below HTTP_MAX_CONNECTIONS' default, and a process out of descriptors can open
/// neither a client's connection nor its own to PostgreSQL or RabbitMQ. Warns when the limit
/// stays below what `max_connections` clients and the process itself need. Process-wide: called
/// once at start, before any listener or pool opens a file. Idempotent.
pub fn raise_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + OWN_FILES => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below HTTP_MAX_CONNECTIONS and the process's own files: \
             raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower HTTP_MAX_CONNECTIONS"
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` is cancelled, then waits for
/// the connections' requests in flight to finish. Accept errors (a full file table, say) are
/// retried after a pause by axum's `Listener` for `TcpListener`, so this never fails.
pub async fn serve(mut listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    loop {
        // The slot first: at the cap the listener is not read, so the kernel holds the rest.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, _) = tokio::select! {
            accepted = Listener::accept(&mut listener) => accepted,
            () = shutdown.cancelled() => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {} // forget the ones that ended
        connections.spawn(async move {
            // A client that goes away, sends garbage or is too slow: nothing to do but log it.
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    // hyper closes idle connections at once; one in the middle of a request head would stay
    // until its header timeout (up to ten minutes): the process's own drain must not wait so long.
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them"
        );
    }
    connections.abort_all();
}

/// How long a shutting-down listener waits for its connections' requests to finish (the
/// process gives all its parts 30 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")] // elsewhere the soft limit may be capped below the hard one
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        // As systemd starts a process: a soft limit below the hard one.
        let low = (hard / 2).min(soft).max(64);
        rlimit::setrlimit(rlimit::Resource::NOFILE, low, hard).unwrap();
        raise_file_limit(1);
        assert_eq!(rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap(), (hard, hard));
    }
}
