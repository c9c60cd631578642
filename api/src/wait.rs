//! `Prefer: wait=N` (RFC 7240 §4.3): a request may ask the server to hold its answer until the
//! order it concerns changes status or is done, up to N seconds ([`MAX_WAIT`] at most).
//!
//! Waiting requests do not poll the database each: they register with the [`Watcher`] and
//! sleep. One task per API process checks every watched order in one query per tick
//! ([`TICK`]), only while someone is waiting, and wakes the requests whose order moved. So a
//! thousand waiting requests cost one small query per tick and their idle connections, not a
//! thousand queries. Event streams (`routes::events`) watch through it too, at a slower tick
//! ([`STREAM_TICK`]) while no request waits.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderValue};
use orderflow_shared::{db::kept, domain::OrderStatus};
use sqlx::PgPool;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{admission::Turn, header_grammar};

/// The longest wait a request may ask for; a larger `wait` is served as this.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often the watched orders are checked while a request waits ([`Watcher::wait`]).
pub const TICK: Duration = Duration::from_millis(10);
/// How often they are checked while only event streams watch ([`Watcher::watch`]): a stream
/// may hear of a change a little later, and thousands of open streams cost five small queries a
/// second in all for the watching (each stream also reads its history when its order moves,
/// and every few seconds: `routes::events`).
pub const STREAM_TICK: Duration = Duration::from_millis(200);

/// The `wait` preference of a request (RFC 7240 §4.3): `Prefer: wait=N`, N in whole seconds
/// (`delta-seconds`, digits only; quoted or not, RFC 9110 §5.6.6), capped at [`MAX_WAIT`]; a
/// number too large to represent is simply very large, so it is capped too (RFC 9111 §1.2.2).
/// `None` without one, or when the first `wait` is not a number of seconds: the first
/// occurrence of a preference is the one that counts, and one the server does not understand
/// is ignored (RFC 7240 §2). Read by the list grammar ([`header_grammar::preferences`]): a
/// `wait=` inside another preference's quoted string is not a wait.
pub fn preferred_wait(headers: &HeaderMap) -> Option<Duration> {
    let wait = header_grammar::preferences(headers)
        .into_iter()
        .find(|p| p.name == "wait")?
        .value?;
    if wait.is_empty() || !wait.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = wait.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_WAIT))
}

/// `Preference-Applied: wait=N` for a wait that was honoured (RFC 7240 §3).
pub fn applied(wait: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("wait={}", wait.as_secs())).unwrap_or(HeaderValue::from_static("wait"))
}

/// What a waiting request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The order is in another status than this one.
    Leaves(OrderStatus),
    /// The order is CONFIRMED or CANCELLED.
    Terminal,
}

impl Until {
    fn met(self, status: OrderStatus) -> bool {
        match self {
            Self::Leaves(from) => status != from,
            Self::Terminal => status.is_terminal(),
        }
    }
}

struct Waiter {
    until: Until,
    wake: oneshot::Sender<()>,
    /// How often it needs its order checked.
    tick: Duration,
}

/// Registers waiting requests and wakes them when their order moves (cheap to clone).
#[derive(Clone)]
pub struct Watcher {
    waiting: Arc<Mutex<HashMap<Uuid, Vec<Waiter>>>>,
    someone: Arc<Notify>,
}

impl Watcher {
    /// Starts the checking task on the current tokio runtime; it ends with the last handle.
    pub fn start(pool: PgPool) -> Self {
        let watcher = Self {
            waiting: Arc::default(),
            someone: Arc::default(),
        };
        tokio::spawn(watch(Arc::downgrade(&watcher.waiting), watcher.someone.clone(), pool));
        watcher
    }

    /// Waits until `order` meets `until`, or `timeout`, or the server shuts down (so that a
    /// graceful shutdown need not wait the wait out), with the request's admission turn given
    /// back meanwhile (taken again before returning: an error is the 503 of a full house).
    /// Returns whether the order met `until` (the caller reads it again either way).
    pub async fn wait_turn(
        &self,
        turn: Option<&Turn>,
        order: Uuid,
        until: Until,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<bool, orderflow_shared::Error> {
        if let Some(turn) = turn {
            turn.pause();
        }
        let met = tokio::select! {
            met = self.wait(order, until, timeout) => met,
            () = shutdown.cancelled() => false,
        };
        if let Some(turn) = turn {
            turn.resume().await?;
        }
        Ok(met)
    }

    /// Waits until `order` meets `until`, or `timeout`, checked every [`TICK`]. Returns
    /// whether it did (the caller reads the order again either way).
    pub async fn wait(&self, order: Uuid, until: Until, timeout: Duration) -> bool {
        self.wait_ticking(order, until, timeout, TICK).await
    }

    /// [`wait`](Self::wait) for an event stream: checked every [`STREAM_TICK`].
    pub async fn watch(&self, order: Uuid, until: Until, timeout: Duration) -> bool {
        self.wait_ticking(order, until, timeout, STREAM_TICK).await
    }

    async fn wait_ticking(&self, order: Uuid, until: Until, timeout: Duration, tick: Duration) -> bool {
        let (wake, woken) = oneshot::channel();
        {
            let Ok(mut waiting) = self.waiting.lock() else {
                return false;
            };
            let idle = waiting.is_empty();
            waiting.entry(order).or_default().push(Waiter { until, wake, tick });
            // Wake the checking task when it sleeps for want of waiters, or checks less often
            // than this waiter needs.
            if idle || tick == TICK {
                self.someone.notify_one();
            }
        }
        let met = matches!(tokio::time::timeout(timeout, woken).await, Ok(Ok(())));
        if !met && let Ok(mut waiting) = self.waiting.lock() {
            // Timed out: forget the waiter (and the order, if it was the last).
            if let Some(list) = waiting.get_mut(&order) {
                list.retain(|w| !w.wake.is_closed());
                if list.is_empty() {
                    waiting.remove(&order);
                }
            }
        }
        met
    }
}

/// One query per tick for every watched order, while any is watched.
async fn watch(waiting: std::sync::Weak<Mutex<HashMap<Uuid, Vec<Waiter>>>>, someone: Arc<Notify>, pool: PgPool) {
    loop {
        let Some(map) = waiting.upgrade() else {
            return;
        };
        let (ids, tick): (Vec<Uuid>, Duration) = match map.lock() {
            Ok(waiting) => (
                waiting.keys().copied().collect(),
                waiting.values().flatten().map(|w| w.tick).min().unwrap_or(TICK),
            ),
            Err(_) => return,
        };
        drop(map);
        if ids.is_empty() {
            // Nobody waits: sleep until someone does (or the next tick, to notice shutdown).
            let _ = tokio::time::timeout(Duration::from_secs(1), someone.notified()).await;
            continue;
        }
        if tick > TICK && tokio::time::timeout(tick - TICK, someone.notified()).await.is_ok() {
            // Only streams watched, and someone new came: read the watched orders again.
            continue;
        }
        tokio::time::sleep(TICK).await;
        let statuses: Vec<(Uuid, String)> = match kept::answered_query(
            sqlx::query_as("SELECT id, status FROM orders WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&pool),
        )
        .await
        {
            Ok(rows) => rows,
            Err(err) => {
                tracing::debug!(error = %err, "could not check waited-for orders");
                continue;
            }
        };
        let Some(map) = waiting.upgrade() else {
            return;
        };
        let Ok(mut waiting) = map.lock() else {
            return;
        };
        for (id, status) in statuses {
            let Some(status) = OrderStatus::parse(&status) else {
                continue;
            };
            if let Some(list) = waiting.get_mut(&id) {
                let (met, rest): (Vec<Waiter>, Vec<Waiter>) = list.drain(..).partition(|w| w.until.met(status));
                for waiter in met {
                    let _ = waiter.wake.send(());
                }
                list.extend(rest.into_iter().filter(|w| !w.wake.is_closed()));
                if list.is_empty() {
                    waiting.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                "prefer",
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        preferred_wait(&headers)
    }

    #[test]
    fn the_wait_preference_is_read_as_rfc_7240_writes_it() {
        assert_eq!(prefer(&["wait=5"]), Some(Duration::from_secs(5)));
        assert_eq!(prefer(&["respond-async, wait=10"]), Some(Duration::from_secs(10)));
        assert_eq!(
            prefer(&["handling=lenient", "Wait = 3 ; x=y"]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(prefer(&["wait=\"7\""]), Some(Duration::from_secs(7)));
        assert_eq!(prefer(&["wait=3600"]), Some(MAX_WAIT));
        assert_eq!(prefer(&["wait=0"]), Some(Duration::ZERO));
        assert_eq!(prefer(&["wait=soon"]), None);
        assert_eq!(prefer(&["wait=-1"]), None);
        assert_eq!(prefer(&["respond-async"]), None);
        assert_eq!(prefer(&[]), None);
        // A `wait=` inside another preference's quoted string is no wait.
        assert_eq!(prefer(&[r#"foo="a,wait=7""#]), None);
        assert_eq!(prefer(&[r#"foo="a,wait=7", wait=2"#]), Some(Duration::from_secs(2)));
        // delta-seconds is digits only.
        assert_eq!(prefer(&["wait=+5"]), None);
        assert_eq!(prefer(&["wait=5s"]), None);
        assert_eq!(prefer(&["wait=\"\""]), None);
        // Past any integer: very large, so the cap (like 2^64 - 1).
        assert_eq!(prefer(&["wait=18446744073709551615"]), Some(MAX_WAIT));
        assert_eq!(prefer(&["wait=18446744073709551616"]), Some(MAX_WAIT));
        assert_eq!(prefer(&["wait=99999999999999999999999999999999"]), Some(MAX_WAIT));
        // Only the first `wait` counts (RFC 7240 §2).
        assert_eq!(prefer(&["wait=1, wait=9"]), Some(Duration::from_secs(1)));
        assert_eq!(prefer(&["wait=x", "wait=9"]), None);
    }

    #[test]
    fn a_waiter_is_met_by_a_change_or_an_end() {
        assert!(Until::Leaves(OrderStatus::Pending).met(OrderStatus::StockReserved));
        assert!(!Until::Leaves(OrderStatus::Pending).met(OrderStatus::Pending));
        assert!(Until::Terminal.met(OrderStatus::Cancelled));
        assert!(!Until::Terminal.met(OrderStatus::Paid));
    }
}
