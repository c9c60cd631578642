//! `--pg-waits`: samples what the sessions on the system's database are waiting for
//! (`pg_stat_activity`, every `--pg-waits-interval`), to tell how long orders spend waiting
//! on locks.
//!
//! Each sample counts the active client backends of DATABASE_URL's database (other than the
//! sampler's own) by `wait_event_type:wait_event`, leaving out `Client` and `Activity` waits
//! (waiting for the application's next statement, or idle). A count weighs the time since the
//! previous sample, so the sum estimates backend-seconds spent in each wait (a wait shorter
//! than the interval is caught in proportion to its length, on average). The report divides
//! them by the orders of the phase: `Lock` (row, tuple, transaction id ... heavyweight locks)
//! and `LWLock` (PostgreSQL's internal locks: WAL insertion, buffer mapping ...) separately.
//! The sampler needs to see other sessions' wait events: a superuser or a member of
//! `pg_read_all_stats`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

const SAMPLE: &str = "
SELECT wait_event_type || ':' || wait_event, count(*)
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
  AND state = 'active'
  AND wait_event_type IS NOT NULL
  AND wait_event_type NOT IN ('Client', 'Activity')
GROUP BY 1";

/// What the sampler has added up since it started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub samples: u64,
    /// Backend-seconds by `type:event`.
    pub waits: BTreeMap<String, f64>,
    /// Samples that failed (the database restarting, say): their time is not counted.
    pub failed: u64,
}

/// The sampling task.
pub struct Sampler {
    interval: Duration,
    totals: Arc<Mutex<Totals>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Waits per order over one phase of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaitReport {
    pub interval_ms: f64,
    pub samples: u64,
    pub failed_samples: u64,
    /// What the figures are divided by (as in the CPU report).
    pub per: &'static str,
    pub orders: u64,
    /// Milliseconds sessions spent waiting on heavyweight locks (`wait_event_type = 'Lock'`),
    /// per order.
    pub lock_ms_per_order: f64,
    /// The same for PostgreSQL's lightweight locks (`LWLock`).
    pub lwlock_ms_per_order: f64,
    /// Every wait seen, `type:event` -> milliseconds per order.
    pub by_event_ms_per_order: BTreeMap<String, f64>,
}

impl Sampler {
    /// Connects to `database_url` and starts sampling every `interval`.
    pub async fn start(database_url: &str, interval: Duration) -> anyhow::Result<Self> {
        let mut conn = orderflow_shared::db::connect(database_url)
            .await
            .context("connecting to DATABASE_URL to sample wait events (--pg-waits)")?;
        let sees_all: bool = sqlx::query_scalar(
            "SELECT current_setting('is_superuser') = 'on'
                 OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')",
        )
        .fetch_one(&mut conn)
        .await
        .context("checking what --pg-waits may see")?;
        if !sees_all {
            eprintln!(
                "warning: --pg-waits: this role cannot see other users' wait events (needs pg_read_all_stats); their waits are missed"
            );
        }
        let totals = Arc::new(Mutex::new(Totals::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(sample(conn, interval, totals.clone(), stop.clone()));
        Ok(Self {
            interval,
            totals,
            stop,
            task,
        })
    }

    pub fn totals(&self) -> Totals {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits per order between two readings of [`Self::totals`].
    pub fn report(&self, before: &Totals, after: &Totals, orders: u64, per: &'static str) -> WaitReport {
        report(self.interval, before, after, orders, per)
    }
}

async fn sample(mut conn: PgConnection, interval: Duration, totals: Arc<Mutex<Totals>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(SAMPLE).fetch_all(&mut conn).await;
        let now = Instant::now();
        // The time this sample stands for: since the previous one (one interval for the first).
        let weight = last
            .map_or(interval, |l| now.saturating_duration_since(l))
            .as_secs_f64();
        last = Some(now);
        let mut t = totals.lock().unwrap_or_else(PoisonError::into_inner);
        match rows {
            Ok(rows) => {
                t.samples += 1;
                for (event, n) in rows {
                    *t.waits.entry(event).or_default() += n as f64 * weight;
                }
            }
            Err(e) => {
                t.failed += 1;
                tracing::debug!(error = %e, "a wait-event sample failed");
            }
        }
    }
    let _ = conn.close().await;
}

fn report(interval: Duration, before: &Totals, after: &Totals, orders: u64, per: &'static str) -> WaitReport {
    let per_order = |secs: f64| ((secs * 1_000.0 / orders.max(1) as f64) * 1_000.0).round() / 1_000.0;
    let by_event: BTreeMap<String, f64> = after
        .waits
        .iter()
        .map(|(event, secs)| {
            let was = before.waits.get(event).copied().unwrap_or(0.0);
            (event.clone(), per_order(secs - was))
        })
        .filter(|(_, ms)| *ms > 0.0)
        .collect();
    let of_type = |ty: &str| {
        let secs: f64 = after
            .waits
            .iter()
            .filter(|(event, _)| event.split(':').next() == Some(ty))
            .map(|(event, secs)| secs - before.waits.get(event).copied().unwrap_or(0.0))
            .sum();
        // (An empty sum is -0.0.)
        if secs > 0.0 { per_order(secs) } else { 0.0 }
    };
    WaitReport {
        interval_ms: interval.as_secs_f64() * 1_000.0,
        samples: after.samples - before.samples,
        failed_samples: after.failed - before.failed,
        per,
        orders,
        lock_ms_per_order: of_type("Lock"),
        lwlock_ms_per_order: of_type("LWLock"),
        by_event_ms_per_order: by_event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_split_by_type_and_divided_by_the_orders() {
        let before = Totals {
            samples: 10,
            waits: BTreeMap::from([("Lock:transactionid".to_owned(), 0.5)]),
            failed: 0,
        };
        let after = Totals {
            samples: 110,
            waits: BTreeMap::from([
                ("Lock:transactionid".to_owned(), 2.5),
                ("Lock:tuple".to_owned(), 1.0),
                ("LWLock:WALWrite".to_owned(), 0.4),
                ("IO:WalSync".to_owned(), 4.0),
            ]),
            failed: 1,
        };
        let r = report(Duration::from_millis(50), &before, &after, 1_000, "completed");
        assert_eq!(r.samples, 100);
        assert_eq!(r.failed_samples, 1);
        assert_eq!(r.interval_ms, 50.0);
        assert_eq!(r.lock_ms_per_order, 3.0); // (2 + 1) s over 1,000 orders
        assert_eq!(r.lwlock_ms_per_order, 0.4);
        assert_eq!(r.by_event_ms_per_order["Lock:transactionid"], 2.0);
        assert_eq!(r.by_event_ms_per_order["IO:WalSync"], 4.0);
        let none = report(Duration::from_millis(50), &after, &after, 1_000, "completed");
        assert!(none.lwlock_ms_per_order.is_sign_positive() && none.lock_ms_per_order == 0.0);
        assert!(none.by_event_ms_per_order.is_empty());
    }
}
