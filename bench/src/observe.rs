//! Watching accepted orders reach a terminal state, from the outside.
//!
//! [`Observer`] is the seam: [`PollObserver`] polls each user's order list, [`WaitObserver`]
//! long-polls each order with `Prefer: wait` (RFC 7240); `--observe` picks one, and the
//! report's request count and CPU per order compare what each costs the system.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt, stream};
use serde_json::Value;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{client::Api, report::Latency};

/// An accepted order to watch.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    pub order_id: Uuid,
    /// Index of the user who placed it.
    pub user: usize,
    /// When the 202 arrived.
    pub accepted_at: Instant,
}

/// How an order ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    Confirmed,
    /// Cancelled, with its reason.
    Cancelled(String),
    /// Parked in a state no order should reach in a benchmark (COMPENSATION_FAILED).
    Parked(String),
}

impl Final {
    /// The final state of an order with `status` and `reason`, or None while it is in flight.
    pub fn from_status(status: &str, reason: Option<&str>) -> Option<Self> {
        match status {
            "CONFIRMED" => Some(Self::Confirmed),
            "CANCELLED" => Some(Self::Cancelled(reason.unwrap_or("UNKNOWN").to_owned())),
            "COMPENSATION_FAILED" => Some(Self::Parked(status.to_owned())),
            _ => None,
        }
    }
}

/// An order seen in its final state.
#[derive(Debug, Clone)]
pub struct Terminal {
    pub watch: Watch,
    pub outcome: Final,
    pub observed_at: Instant,
    /// From the order's own timestamps (created -> last update), when the observer sees them:
    /// a cross-check of the observed latency that polling delay does not inflate.
    pub recorded: Option<Duration>,
}

/// What observing cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObserverStats {
    /// Requests (or events) the observer needed.
    pub requests: u64,
    /// Requests that failed (retried in the next round).
    pub errors: u64,
    /// Polling rounds.
    pub rounds: u64,
    /// Time spent in rounds (their polling, not the pause after): a round is how late an
    /// order can be seen terminal.
    pub busy: Duration,
}

/// Watches every order received on `orders` until it is terminal and reports it once on
/// `done`. Returns when `orders` is closed and nothing is left to watch, or when `stop` is
/// cancelled (orders still unseen then are the caller's to count as timed out).
pub trait Observer: Send + 'static {
    fn run(
        self,
        orders: mpsc::UnboundedReceiver<Watch>,
        done: mpsc::UnboundedSender<Terminal>,
        stop: CancellationToken,
    ) -> impl Future<Output = ObserverStats> + Send;
}

/// Polls each user's order list (`GET /api/orders`, newest first): one request covers all of
/// a user's orders in flight, so polling costs O(users with orders in flight) per round
/// rather than O(orders). A round polls at most `concurrency * 4` users, those whose oldest
/// order in flight is oldest (orders finish roughly in the order they came, so these are the
/// likeliest to be done), with at most `concurrency` requests in flight; rounds start at
/// least `interval` apart. Short rounds keep the observation delay small even when the API is
/// saturated and each request is slow; it is reported as `poll_round_mean_ms`. A user whose
/// poll still found orders in flight backs off (see [`backoff`]).
pub struct PollObserver {
    pub api: Api,
    pub tokens: Arc<Vec<String>>,
    pub interval: Duration,
    pub concurrency: usize,
}

/// Users polled per round for each request allowed in flight.
const ROUND_PER_SLOT: usize = 4;

/// Orders younger than this are not polled yet: the fastest tenth of the orders so far (once
/// there are some), at most a second.
fn min_age(took: &Latency) -> Duration {
    if took.count() < 20 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(took.quantile_ms(0.10) / 1_000.0).min(Duration::from_secs(1))
}

/// How long a user whose poll still found orders in flight is left alone: an eighth of the
/// age of its oldest order, at most half a second. A backlog of old orders is then polled
/// rarely (the observation stays within ~12% of the latency it observes) instead of
/// loading the system under test with polls that find nothing; young orders are polled
/// every round.
pub fn backoff(oldest_age: Duration) -> Duration {
    (oldest_age / 8).min(Duration::from_millis(500))
}

/// The users to poll this round: at most `max`, those whose oldest order in flight is oldest,
/// and only when that order is at least `min_age` old at `now` and the user is not backing
/// off (`not_before`).
fn due(
    pending: &HashMap<usize, HashMap<Uuid, Watch>>,
    not_before: &HashMap<usize, Instant>,
    max: usize,
    min_age: Duration,
    now: Instant,
) -> Vec<usize> {
    let mut users: Vec<(Instant, usize)> = pending
        .iter()
        .filter(|(user, _)| not_before.get(user).is_none_or(|t| *t <= now))
        .filter_map(|(&user, orders)| {
            orders
                .values()
                .map(|w| w.accepted_at)
                .min()
                .map(|oldest| (oldest, user))
        })
        .filter(|(oldest, _)| now.saturating_duration_since(*oldest) >= min_age)
        .collect();
    if users.len() > max {
        users.select_nth_unstable(max);
        users.truncate(max);
    }
    users.into_iter().map(|(_, user)| user).collect()
}

/// The largest page the API serves.
const MAX_PAGE: usize = 100;

/// The page size to find `pending` in-flight orders among a user's newest: a little more
/// than them, since some newer ones may already be done.
pub fn page_size(pending: usize) -> usize {
    (2 * pending + 4).clamp(10, MAX_PAGE)
}

struct UserPoll {
    found: Vec<(Uuid, Final, Option<Duration>)>,
    requests: u64,
    errors: u64,
    at: Instant,
}

impl PollObserver {
    async fn poll_user(api: Api, token: String, wanted: HashSet<Uuid>) -> UserPoll {
        let size = page_size(wanted.len());
        let mut poll = UserPoll {
            found: Vec::new(),
            requests: 0,
            errors: 0,
            at: Instant::now(),
        };
        let mut seen = HashSet::new();
        for page in 0.. {
            poll.requests += 1;
            let path = format!("/api/orders?page={page}&size={size}");
            // Only the newest orders matter here, never how many the user has in all.
            let reply = match api.get_preferring(&path, &token, "count=none").await {
                Ok(r) if r.status.is_success() => r,
                _ => {
                    poll.errors += 1;
                    break;
                }
            };
            poll.at = Instant::now();
            let items = reply.body["items"].as_array().map(Vec::as_slice).unwrap_or_default();
            for item in items {
                let Some(id) = item["orderId"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
                    continue;
                };
                if !wanted.contains(&id) || !seen.insert(id) {
                    continue;
                }
                let status = item["status"].as_str().unwrap_or_default();
                if let Some(fin) = Final::from_status(status, item["reason"].as_str()) {
                    poll.found.push((id, fin, recorded(item)));
                }
            }
            // Without a total, a full page may have a next one; a page that is not full ends
            // the list.
            let more = items.len() == size;
            if seen.len() == wanted.len() || !more {
                break;
            }
        }
        poll
    }
}

impl Observer for PollObserver {
    async fn run(
        self,
        mut orders: mpsc::UnboundedReceiver<Watch>,
        done: mpsc::UnboundedSender<Terminal>,
        stop: CancellationToken,
    ) -> ObserverStats {
        let mut stats = ObserverStats::default();
        let mut pending: HashMap<usize, HashMap<Uuid, Watch>> = HashMap::new();
        // How long orders took so far: no order is polled before it is as old as the fastest
        // tenth of them, which saves polls that could hardly find anything finished.
        let mut took = Latency::new();
        let mut not_before: HashMap<usize, Instant> = HashMap::new();
        let mut open = true;
        loop {
            // Take whatever was accepted since the last round.
            while open {
                match orders.try_recv() {
                    Ok(w) => {
                        pending.entry(w.user).or_default().insert(w.order_id, w);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if pending.is_empty() {
                if !open {
                    return stats;
                }
                tokio::select! {
                    w = orders.recv() => match w {
                        Some(w) => {
                            pending.entry(w.user).or_default().insert(w.order_id, w);
                        }
                        None => open = false,
                    },
                    () = stop.cancelled() => return stats,
                }
                continue;
            }

            let round_start = Instant::now();
            let max = self.concurrency.max(1) * ROUND_PER_SLOT;
            let polls: Vec<_> = due(&pending, &not_before, max, min_age(&took), round_start)
                .into_iter()
                .map(|user| {
                    let wanted: HashSet<Uuid> = pending[&user].keys().copied().collect();
                    (
                        user,
                        Self::poll_user(self.api.clone(), self.tokens[user].clone(), wanted),
                    )
                })
                .collect();
            if !polls.is_empty() {
                stats.rounds += 1;
            }
            let mut results = stream::iter(polls)
                .map(|(user, fut)| async move { (user, fut.await) })
                .buffer_unordered(self.concurrency.max(1));
            loop {
                let next = tokio::select! {
                    next = results.next() => next,
                    () = stop.cancelled() => return stats,
                };
                let Some((user, poll)) = next else {
                    stats.busy += round_start.elapsed();
                    break;
                };
                stats.requests += poll.requests;
                stats.errors += poll.errors;
                let Some(mine) = pending.get_mut(&user) else { continue };
                for (id, outcome, recorded) in poll.found {
                    if let Some(watch) = mine.remove(&id) {
                        took.record(recorded.unwrap_or_else(|| poll.at.saturating_duration_since(watch.accepted_at)));
                        let _ = done.send(Terminal {
                            watch,
                            outcome,
                            observed_at: poll.at,
                            recorded,
                        });
                    }
                }
                match mine.values().map(|w| w.accepted_at).min() {
                    None => {
                        pending.remove(&user);
                        not_before.remove(&user);
                    }
                    Some(oldest) => {
                        not_before.insert(user, poll.at + backoff(poll.at.saturating_duration_since(oldest)));
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(round_start + self.interval) => {}
                () = stop.cancelled() => return stats,
            }
        }
    }
}

/// Long-polls each order: `GET /api/orders/{id}` with `Prefer: wait=N` (RFC 7240), which the
/// API answers when the order's status changes (or after N seconds); a status that is not
/// final yet is asked about again at once. At most `connections` requests wait at once, each
/// holding a connection; orders beyond wait for a slot in the order they were accepted. A
/// failed request is retried after [`WAIT_RETRY`].
pub struct WaitObserver {
    pub api: Api,
    pub tokens: Arc<Vec<String>>,
    pub connections: usize,
    pub wait: Duration,
}

/// Pause before a failed long-poll is sent again.
const WAIT_RETRY: Duration = Duration::from_millis(100);

impl WaitObserver {
    /// Waits on one order until it is final; returns (requests, errors).
    async fn follow(
        api: Api,
        token: String,
        watch: Watch,
        wait: Duration,
        slots: Arc<Semaphore>,
        done: mpsc::UnboundedSender<Terminal>,
    ) -> (u64, u64) {
        let Ok(_slot) = slots.acquire_owned().await else {
            return (0, 0);
        };
        let path = format!("/api/orders/{}", watch.order_id);
        let (mut requests, mut errors) = (0, 0);
        loop {
            requests += 1;
            match api.get_waiting(&path, &token, wait).await {
                Ok(r) if r.status.is_success() => {
                    let status = r.body["status"].as_str().unwrap_or_default();
                    if let Some(outcome) = Final::from_status(status, r.body["reason"].as_str()) {
                        let _ = done.send(Terminal {
                            watch,
                            outcome,
                            observed_at: Instant::now(),
                            recorded: recorded(&r.body),
                        });
                        return (requests, errors);
                    }
                }
                _ => {
                    errors += 1;
                    tokio::time::sleep(WAIT_RETRY).await;
                }
            }
        }
    }
}

impl Observer for WaitObserver {
    async fn run(
        self,
        mut orders: mpsc::UnboundedReceiver<Watch>,
        done: mpsc::UnboundedSender<Terminal>,
        stop: CancellationToken,
    ) -> ObserverStats {
        let slots = Arc::new(Semaphore::new(self.connections.max(1)));
        let mut following = JoinSet::new();
        let mut stats = ObserverStats::default();
        let mut open = true;
        let started = Instant::now();
        loop {
            if !open && following.is_empty() {
                break;
            }
            tokio::select! {
                w = orders.recv(), if open => match w {
                    Some(w) => {
                        following.spawn(Self::follow(
                            self.api.clone(),
                            self.tokens[w.user].clone(),
                            w,
                            self.wait,
                            slots.clone(),
                            done.clone(),
                        ));
                    }
                    None => open = false,
                },
                Some(r) = following.join_next() => {
                    let (requests, errors) = r.unwrap_or_default();
                    stats.requests += requests;
                    stats.errors += errors;
                }
                () = stop.cancelled() => {
                    following.abort_all();
                    break;
                }
            }
        }
        stats.busy = started.elapsed();
        stats
    }
}

/// `updatedAt - createdAt` of an order in the API's JSON.
pub fn recorded(order: &Value) -> Option<Duration> {
    let at = |k: &str| {
        order[k]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    };
    (at("updatedAt")? - at("createdAt")?).to_std().ok()
}

/// Reads the order id from a 202 body.
pub fn accepted_order_id(body: &Value) -> Option<Uuid> {
    body["orderId"].as_str().and_then(|s| Uuid::parse_str(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_final_states() {
        assert_eq!(Final::from_status("CONFIRMED", None), Some(Final::Confirmed));
        assert_eq!(
            Final::from_status("CANCELLED", Some("OUT_OF_STOCK")),
            Some(Final::Cancelled("OUT_OF_STOCK".to_owned()))
        );
        assert_eq!(
            Final::from_status("COMPENSATION_FAILED", None),
            Some(Final::Parked("COMPENSATION_FAILED".to_owned()))
        );
        for s in ["PENDING", "STOCK_RESERVED", "COUPON_APPLIED", "PAID", "CANCELLING"] {
            assert_eq!(Final::from_status(s, None), None, "{s}");
        }
    }

    #[test]
    fn recorded_latency_comes_from_the_order_timestamps() {
        let order =
            serde_json::json!({"createdAt": "2026-11-21T10:00:00.100Z", "updatedAt": "2026-11-21T10:00:00.350Z"});
        assert_eq!(recorded(&order), Some(Duration::from_millis(250)));
        assert_eq!(
            recorded(&serde_json::json!({"createdAt": "2026-11-21T10:00:00Z"})),
            None
        );
    }

    #[test]
    fn rounds_poll_the_users_with_the_oldest_orders_first() {
        let t0 = Instant::now();
        let watch = |user, age_ms| Watch {
            order_id: Uuid::new_v4(),
            user,
            accepted_at: t0 + Duration::from_secs(10) - Duration::from_millis(age_ms),
        };
        let mut pending: HashMap<usize, HashMap<Uuid, Watch>> = HashMap::new();
        for (user, age) in [(1, 50), (1, 900), (2, 300), (3, 10), (4, 700)] {
            let w = watch(user, age);
            pending.entry(user).or_default().insert(w.order_id, w);
        }
        let now = t0 + Duration::from_secs(10);
        let none = HashMap::new();
        let mut two = due(&pending, &none, 2, Duration::ZERO, now);
        two.sort_unstable();
        assert_eq!(two, vec![1, 4]);
        let mut all = due(&pending, &none, 10, Duration::ZERO, now);
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3, 4]);
        // User 3's only order is 10 ms old: too young to poll when orders take 100 ms and up.
        let mut old_enough = due(&pending, &none, 10, Duration::from_millis(100), now);
        old_enough.sort_unstable();
        assert_eq!(old_enough, vec![1, 2, 4]);
        // User 1 was just polled and backs off: the next oldest take its place.
        let backing_off = HashMap::from([(1, now + Duration::from_millis(50))]);
        let mut two = due(&pending, &backing_off, 2, Duration::ZERO, now);
        two.sort_unstable();
        assert_eq!(two, vec![2, 4]);
    }

    #[test]
    fn old_orders_are_polled_less_often() {
        assert_eq!(backoff(Duration::from_millis(40)), Duration::from_millis(5));
        assert_eq!(backoff(Duration::from_secs(2)), Duration::from_millis(250));
        assert_eq!(backoff(Duration::from_secs(30)), Duration::from_millis(500));
    }

    #[test]
    fn young_orders_wait_for_the_fastest_tenth() {
        let mut took = Latency::new();
        assert_eq!(min_age(&took), Duration::ZERO);
        for ms in 1..=100 {
            took.record(Duration::from_millis(ms * 10));
        }
        let floor = min_age(&took); // hdrhistogram keeps 3 significant digits
        assert!(
            floor >= Duration::from_millis(100) && floor <= Duration::from_micros(100_100),
            "{floor:?}"
        );
        for _ in 0..1_000 {
            took.record(Duration::from_secs(30));
        }
        assert_eq!(min_age(&took), Duration::from_secs(1));
    }

    #[test]
    fn pages_grow_with_the_orders_in_flight() {
        assert_eq!(page_size(1), 10);
        assert_eq!(page_size(10), 24);
        assert_eq!(page_size(1_000), 100);
    }
}
