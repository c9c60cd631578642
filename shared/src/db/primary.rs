//! Finding and following the node that accepts writes, for a DATABASE_URL with several hosts
//! (a highly available PostgreSQL: pg_auto_failover's primary and secondary, Patroni, a managed
//! service's replicas).
//!
//! Each pool of such a URL has a [`Follower`]: a task that keeps one connection of its own to
//! the node the pool uses and asks it every [`CHECK_EVERY`] whether it still accepts writes.
//! When it does not (the node died, was demoted, or its connection broke), the follower asks
//! every host in turn, with backoff, until one accepts writes, then points the pool at it
//! (`Pool::set_connect_options`) and has every connection opened before the move closed when
//! it is next taken or given back, so no request keeps talking to the old node. Meanwhile
//! requests fail as the database being unavailable (503 with `Retry-After`, transient for the
//! workers, which retry and then return their deliveries), and `/readyz` says not ready.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, postgres::PgConnectOptions};

use super::url::DatabaseUrl;

/// How often a follower asks its node whether it still accepts writes.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long that question may take before the node counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the session accepts writes: not a standby in recovery, not read-only by default
/// (what libpq's `target_session_attrs=read-write` asks, with `pg_is_in_recovery()` for
/// `primary`).
const ACCEPTS_WRITES: &str = "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'";

/// Asks an open connection whether its node accepts writes.
pub async fn accepts_writes(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(ACCEPTS_WRITES).fetch_one(conn).await
}

/// Connects to the first node of `url` that accepts writes (or, for a URL that does not ask
/// for writes, the first that answers), trying the hosts in the URL's order (`random` with
/// `load_balance_hosts=random`). Returns its index in `url.nodes` and the connection; the error
/// says what each host answered.
pub async fn find(url: &DatabaseUrl) -> Result<(usize, PgConnection), NoPrimary> {
    let mut order: Vec<usize> = (0..url.nodes.len()).collect();
    if url.random_order {
        // A fresh v4 UUID is random enough to spread processes over hosts.
        order.sort_by_key(|_| uuid::Uuid::new_v4());
    }
    let mut answers = Vec::with_capacity(order.len());
    for i in order {
        let attempt = async {
            let mut conn = PgConnection::connect_with(&url.nodes[i]).await?;
            if !url.needs_writes || accepts_writes(&mut conn).await? {
                Ok::<_, sqlx::Error>(Some(conn))
            } else {
                conn.close().await.ok();
                Ok(None)
            }
        };
        let host = url.hosts[i].clone();
        match tokio::time::timeout(url.connect_timeout, attempt).await {
            Ok(Ok(Some(conn))) => return Ok((i, conn)),
            Ok(Ok(None)) => answers.push(Answer {
                host,
                text: "read-only (a standby)".to_owned(),
                transient: true,
            }),
            Ok(Err(e)) => answers.push(Answer {
                host,
                text: e.to_string(),
                transient: crate::error::is_unavailable(&e),
            }),
            Err(_) => answers.push(Answer {
                host,
                text: format!("no answer within {:?}", url.connect_timeout),
                transient: true,
            }),
        }
    }
    Err(NoPrimary(answers))
}

/// What one host answered when asked for writes.
#[derive(Debug, Clone)]
pub struct Answer {
    pub host: String,
    pub text: String,
    /// Unreachable, starting, read-only: asking again later may find a primary. (A refused
    /// login or a missing database is not.)
    pub transient: bool,
}

/// No host accepted writes: what each one answered.
#[derive(Debug, Clone)]
pub struct NoPrimary(pub Vec<Answer>);

impl NoPrimary {
    /// Whether asking again later may find a primary (some host's answer was transient).
    pub fn is_transient(&self) -> bool {
        self.0.iter().any(|a| a.transient)
    }
}

impl std::fmt::Display for NoPrimary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::from("no PostgreSQL node accepts writes:");
        for answer in &self.0 {
            let _ = write!(text, " {}: {};", answer.host, answer.text);
        }
        f.write_str(text.trim_end_matches(';'))
    }
}

impl std::error::Error for NoPrimary {}

/// The pool's options for node `options`: statements logged at trace, slow ones at warn.
pub fn tuned(options: PgConnectOptions) -> PgConnectOptions {
    options
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500))
}

/// Follows the node that accepts writes for one pool (see the module documentation).
pub struct Follower {
    url: DatabaseUrl,
    origin: Instant,
    /// When the pool last moved to another node, in nanoseconds since `origin` (0: never).
    moved_at: AtomicU64,
    /// Wakes the follower before its next check (a new connection met a node that refuses
    /// writes).
    nudge: tokio::sync::Notify,
}

impl Follower {
    pub fn new(url: DatabaseUrl) -> Arc<Self> {
        Arc::new(Self {
            url,
            origin: Instant::now(),
            moved_at: AtomicU64::new(0),
            nudge: tokio::sync::Notify::new(),
        })
    }

    /// Checks a connection the pool just opened: it must be to a node that accepts writes. A
    /// connection attempt that started before the pool moved can end after it, on the node it
    /// left, and a node can be demoted before the follower's next check; such a connection is
    /// refused (the request that wanted it is answered as if the database were unavailable)
    /// and the follower looks at once.
    pub async fn admit(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if accepts_writes(conn).await? {
            return Ok(());
        }
        self.nudge.notify_one();
        Err(sqlx::Error::Protocol(
            "the PostgreSQL node reached does not accept writes (a failover or switchover is under way)".into(),
        ))
    }

    /// Whether a connection of this age was opened before the pool last moved (it talks to a
    /// node the pool left, and is closed instead of used).
    pub fn is_stale(&self, age: Duration) -> bool {
        let moved = self.moved_at.load(Ordering::Acquire);
        if moved == 0 {
            return false;
        }
        let now = self.origin.elapsed().as_nanos() as u64;
        now.saturating_sub(age.as_nanos() as u64) < moved
    }

    /// Runs until the pool is closed: finds the node that accepts writes, points the pool at
    /// it, and watches it.
    pub async fn follow(self: Arc<Self>, pool: PgPool) {
        let mut current: Option<usize> = None;
        let mut watch: Option<PgConnection> = None;
        loop {
            let healthy = match watch.as_mut() {
                Some(conn) => matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, accepts_writes(conn)).await,
                    Ok(Ok(true))
                ),
                None => false,
            };
            if !healthy {
                if let Some(i) = current {
                    tracing::warn!(host = %self.url.hosts[i], "the PostgreSQL node in use no longer accepts writes; looking for the primary");
                }
                // The old connection goes before the search (its node may be gone).
                drop(watch.take());
                let Some((i, conn)) = self.search(&pool).await else {
                    return;
                };
                if current != Some(i) {
                    pool.set_connect_options(tuned(self.url.nodes[i].clone()));
                    let now = (self.origin.elapsed().as_nanos() as u64).max(1);
                    self.moved_at.store(now, Ordering::Release);
                    if current.is_some() {
                        metrics::counter!(crate::metrics::DB_FAILOVERS).increment(1);
                    }
                    tracing::info!(
                        host = %self.url.hosts[i],
                        previous = ?current.map(|p| &self.url.hosts[p]),
                        "PostgreSQL primary found; the pool follows it"
                    );
                }
                current = Some(i);
                watch = Some(conn);
            }
            tokio::select! {
                _ = pool.close_event() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = self.nudge.notified() => {}
            }
        }
    }

    /// Asks the hosts with backoff until one accepts writes; `None` once the pool is closed.
    async fn search(&self, pool: &PgPool) -> Option<(usize, PgConnection)> {
        // A failover takes seconds and every request waits for it: ask often (one connection
        // attempt per host every half second at most, only while there is no primary).
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_millis(500))
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempts = 0u32;
        loop {
            let found = tokio::select! {
                _ = pool.close_event() => return None,
                found = find(&self.url) => found,
            };
            match found {
                Ok(found) => return Some(found),
                Err(none) => {
                    attempts += 1;
                    // Once at first, then every ~20 attempts: an outage is one log line a while.
                    if attempts == 1 || attempts.is_multiple_of(20) {
                        tracing::warn!(attempts, error = %none, "waiting for a PostgreSQL primary");
                    }
                }
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(2));
            tokio::select! {
                _ = pool.close_event() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_opened_before_a_move_are_stale() {
        let follower = Follower::new(DatabaseUrl::parse("postgres://h1,h2/db").unwrap_or_else(|e| panic!("{e}")));
        assert!(!follower.is_stale(Duration::from_secs(3_600)), "no move yet");
        std::thread::sleep(Duration::from_millis(20));
        follower
            .moved_at
            .store(follower.origin.elapsed().as_nanos() as u64, Ordering::Release);
        std::thread::sleep(Duration::from_millis(5));
        assert!(follower.is_stale(Duration::from_millis(15)), "opened before the move");
        assert!(!follower.is_stale(Duration::from_millis(1)), "opened after it");
    }
}
