//! What a phase of the run cost the database and the broker, counted rather than timed:
//! PostgreSQL transactions, rows written and WAL bytes, and the messages the system's
//! consumers settled, per order.
//!
//! - Write transactions are the transaction ids assigned in between (the next id,
//!   `pg_snapshot_xmax(pg_current_snapshot())`, which reading does not advance): exact and at
//!   once, every one a commit PostgreSQL had to make durable (or a rollback), but the whole
//!   cluster's (another database's writes count too).
//! - Commits and rows are DATABASE_URL's database's cumulative statistics
//!   (`pg_stat_database`: `xact_commit`, `tup_inserted`, `tup_updated`, `tup_deleted`), so
//!   read-only transactions count as commits too (a poll is a round trip PostgreSQL pays for).
//!   A busy backend reports them at most once a second and an idle one within ten (PostgreSQL
//!   15's `PGSTAT_MIN_INTERVAL` and `PGSTAT_IDLE_INTERVAL`), so each end of a phase is off by
//!   up to a second's work: measure phases of tens of seconds.
//! - WAL is the distance between `pg_current_wal_lsn()` at the two marks: exact, but the
//!   whole cluster's (anything else writing meanwhile counts too).
//! - Messages are the sum of `orderflow_messages_total` (every delivery a consumer settled,
//!   by queue and outcome) on the API's `/metrics`: every message of a system run as
//!   `orderflow all`, where the workers share the API's registry; null when the workers run
//!   as processes of their own (each exposes its own listener, which the bench does not know). Events to the data platform and deadline messages still waiting to expire are
//!   not consumed by the system, so they are not in it.

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;

/// The counters at one moment; a part that could not be read is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub db: Option<DbCounters>,
    pub messages: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DbCounters {
    pub commits: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    /// `pg_current_wal_lsn()` as a byte position.
    pub wal_lsn: i64,
    /// The next transaction id.
    pub next_xid: i64,
}

/// Database and broker work per order over one phase.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkReport {
    /// What the figures are divided by (as in the CPU report).
    pub per: &'static str,
    pub orders: u64,
    /// Transaction ids assigned in the whole cluster: transactions that wrote.
    pub write_transactions_per_order: Option<f64>,
    /// PostgreSQL transactions committed in the database, read-only ones included.
    pub commits_per_order: Option<f64>,
    pub rows_inserted_per_order: Option<f64>,
    pub rows_updated_per_order: Option<f64>,
    pub rows_deleted_per_order: Option<f64>,
    /// WAL written by the whole PostgreSQL cluster.
    pub wal_bytes_per_order: Option<f64>,
    /// Deliveries the system's consumers settled (`orderflow_messages_total`); null when the
    /// API's `/metrics` does not carry them (or could not be read).
    pub messages_per_order: Option<f64>,
}

/// Reads the counters: a connection of its own to the database, and the API's `/metrics`.
pub struct WorkProbe {
    conn: Option<Mutex<PgConnection>>,
    metrics_url: String,
    http: reqwest::Client,
}

const DB_COUNTERS: &str = "
SELECT d.xact_commit, d.tup_inserted, d.tup_updated, d.tup_deleted,
       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint
FROM pg_stat_database d
WHERE d.datname = current_database()";

impl WorkProbe {
    /// Connects to `database_url`; when it cannot, the database's part is left out (with a
    /// warning), never guessed.
    pub async fn start(database_url: &str, api: &str) -> Self {
        let conn = match orderflow_shared::db::connect(database_url).await {
            Ok(c) => Some(Mutex::new(c)),
            Err(e) => {
                eprintln!("warning: no PostgreSQL work per order: cannot connect to DATABASE_URL: {e:#}");
                None
            }
        };
        Self {
            conn,
            metrics_url: format!("{api}/metrics"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn counters(&self) -> Counters {
        let db = match &self.conn {
            Some(conn) => {
                let mut conn = conn.lock().await;
                let read: Result<(i64, i64, i64, i64, i64, i64), _> =
                    sqlx::query_as(DB_COUNTERS).fetch_one(&mut *conn).await;
                match read {
                    Ok((commits, inserted, updated, deleted, wal_lsn, next_xid)) => Some(DbCounters {
                        commits,
                        inserted,
                        updated,
                        deleted,
                        wal_lsn,
                        next_xid,
                    }),
                    Err(e) => {
                        tracing::debug!(error = %e, "reading pg_stat_database failed");
                        None
                    }
                }
            }
            None => None,
        };
        let messages = match self.scrape().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "scraping the API's /metrics failed");
                None
            }
        };
        Counters { db, messages }
    }

    async fn scrape(&self) -> anyhow::Result<Option<f64>> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
            .context("reading /metrics")?;
        // No series yet is none consumed yet (a counter appears with its first increment).
        Ok(Some(messages_total(&text).unwrap_or(0.0)))
    }

    pub async fn stop(self) {
        if let Some(conn) = self.conn {
            let _ = conn.into_inner().close().await;
        }
    }
}

/// The sum of every `orderflow_messages_total` series in a Prometheus text exposition;
/// `None` when there is none.
fn messages_total(text: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(orderflow_shared::metrics::MESSAGES) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        // `name{labels} value [timestamp]`: the value follows the closing brace.
        let after_labels = rest.rsplit_once('}').map_or(rest, |(_, v)| v);
        if let Some(v) = after_labels
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Work per order between two readings.
pub fn report(before: &Counters, after: &Counters, orders: u64, per: &'static str) -> WorkReport {
    let per_order = |d: f64| Some((d / orders.max(1) as f64 * 100.0).round() / 100.0);
    let db = |f: fn(&DbCounters) -> i64| match (before.db, after.db) {
        (Some(a), Some(b)) => per_order((f(&b) - f(&a)).max(0) as f64),
        _ => None,
    };
    WorkReport {
        per,
        orders,
        write_transactions_per_order: db(|c| c.next_xid),
        commits_per_order: db(|c| c.commits),
        rows_inserted_per_order: db(|c| c.inserted),
        rows_updated_per_order: db(|c| c.updated),
        rows_deleted_per_order: db(|c| c.deleted),
        wal_bytes_per_order: db(|c| c.wal_lsn).map(f64::round),
        // Nothing ever consumed by the end: the deliveries are counted elsewhere (workers in
        // processes of their own), not zero.
        messages_per_order: match (before.messages, after.messages) {
            (Some(a), Some(b)) if b > 0.0 => per_order((b - a).max(0.0)),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_summed_over_every_series_and_nothing_else() {
        let text = "\
# HELP orderflow_messages_total Deliveries settled.
# TYPE orderflow_messages_total counter
orderflow_messages_total{queue=\"orderflow.stock\",outcome=\"acked\"} 120
orderflow_messages_total{queue=\"orderflow.order\",outcome=\"acked\"} 60 1700000000000
orderflow_messages_total{queue=\"x{}\",outcome=\"rejected\"} 2
orderflow_messages_totally_other 1000
orderflow_http_requests_total{route=\"/api/orders\"} 500
";
        assert_eq!(messages_total(text), Some(182.0));
        assert_eq!(messages_total("orderflow_http_requests_total 5\n"), None);
    }

    #[test]
    fn work_is_divided_by_the_orders_and_missing_parts_stay_missing() {
        let db = |c: i64, i: i64, u: i64, d: i64, w: i64, x: i64| DbCounters {
            commits: c,
            inserted: i,
            updated: u,
            deleted: d,
            wal_lsn: w,
            next_xid: x,
        };
        let before = Counters {
            db: Some(db(1_000, 50, 10, 0, 1 << 30, 7_000)),
            messages: Some(10.0),
        };
        let after = Counters {
            db: Some(db(1_830, 1_750, 1_110, 200, (1 << 30) + 1_300_000, 7_650)),
            messages: Some(510.0),
        };
        let r = report(&before, &after, 100, "completed");
        assert_eq!(r.write_transactions_per_order, Some(6.5));
        assert_eq!(r.commits_per_order, Some(8.3));
        assert_eq!(r.rows_inserted_per_order, Some(17.0));
        assert_eq!(r.rows_updated_per_order, Some(11.0));
        assert_eq!(r.rows_deleted_per_order, Some(2.0));
        assert_eq!(r.wal_bytes_per_order, Some(13_000.0));
        assert_eq!(r.messages_per_order, Some(5.0));
        let unread = report(&Counters::default(), &after, 100, "completed");
        assert_eq!(unread.commits_per_order, None);
        assert_eq!(unread.messages_per_order, None);
        // A counter appears with its first increment: none before is zero before...
        let first = Counters {
            db: None,
            messages: Some(0.0),
        };
        assert_eq!(report(&first, &after, 100, "completed").messages_per_order, Some(5.1));
        // ...but none at the end either means they are counted elsewhere.
        assert_eq!(report(&first, &first, 100, "completed").messages_per_order, None);
    }
}
