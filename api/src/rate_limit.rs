//! Per-user rate limits on the write routes, so that one user cannot send orders, cancels,
//! charges or coupon requests as fast as a connection allows (OWASP API4:2023, unrestricted resource
//! consumption).
//!
//! | route | policy |
//! |---|---|
//! | `POST /api/orders` | `"orders"` |
//! | `POST /api/balance/charge` | `"charges"` |
//! | `POST /api/coupons/{coupon_id}/issue` | `"coupon-issues"` |
//! | `POST /api/orders/{id}/cancel` | `"order-cancels"` |
//!
//! Each policy allows one user `RATE_LIMIT_WRITES` requests per `RATE_LIMIT_WINDOW`
//! (defaults: 100 per 10 s): all of them at once, then one more every window/limit (GCRA, the
//! `governor` crate; one state per user and policy). The key is the user id of the verified
//! bearer token, so the layer sits after authentication and before admission control and the
//! handler: a refused request is answered without waiting for a turn, reading its body or
//! touching the database. A request without a valid token is passed on untouched (the
//! handler answers 401). Admin writes (`/api/admin/...`, the ops dashboard) are not limited:
//! they come from a handful of trusted operators, who need them most during an incident
//! (cancelling or retrying hundreds of orders from a script), and an admin token can do far
//! worse than send many requests.
//!
//! Over the limit: **429** (RFC 6585, section 4) with an RFC 9457 problem document
//! (`code: RATE_LIMITED`) and `Retry-After` (RFC 9110, section 10.2.3: whole seconds until a
//! request will be accepted again). Every answer of a limited route also carries the fields of
//! draft-ietf-httpapi-ratelimit-headers-10 (the syntax of revisions 08 to 10):
//!
//! ```text
//! RateLimit-Policy: "orders";q=100;w=10      quota q requests per window w seconds
//! RateLimit: "orders";r=97;t=1               r requests left now; t seconds until all q are back
//!                                            (on a 429: r=0 and t = Retry-After)
//! ```
//!
//! Memory is bounded: a user's state is dropped once it is indistinguishable from a fresh one
//! (a whole window after their last write); the stores are pruned at most every
//! [`PRUNE_EVERY`], by whichever request comes along, so they hold only the users who wrote in
//! the last window plus [`PRUNE_EVERY`] (a few dozen bytes each).

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRequestParts, MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    NotUntil, Quota, RateLimiter,
    clock::{Clock, DefaultClock, QuantaInstant},
    middleware::{StateInformationMiddleware, StateSnapshot},
    state::keyed::DefaultKeyedStateStore,
};

use crate::{AppState, extract::User, problem::Problem};

/// The stores are pruned at most this often.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10, section 4).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10, section 5).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A rate-limited route: the method, axum's route template and the policy's name.
struct Limited {
    method: Method,
    path: &'static str,
    policy: &'static str,
}

/// The limited routes. The integration tests (`tests/rate_limits.rs`) send to each of them,
/// so a renamed route cannot silently drop out of this table.
const LIMITED: [Limited; 4] = [
    Limited {
        method: Method::POST,
        path: "/api/orders",
        policy: "orders",
    },
    Limited {
        method: Method::POST,
        path: "/api/balance/charge",
        policy: "charges",
    },
    Limited {
        method: Method::POST,
        path: "/api/coupons/{coupon_id}/issue",
        policy: "coupon-issues",
    },
    Limited {
        method: Method::POST,
        path: "/api/orders/{id}/cancel",
        policy: "order-cancels",
    },
];

type Limiter = RateLimiter<i64, DefaultKeyedStateStore<i64>, DefaultClock, StateInformationMiddleware>;

/// The per-user limits of the write routes, one store per policy. Cheap to share (`Arc`).
pub struct RateLimits {
    quota: u32,
    window_secs: u64,
    /// One limiter per entry of [`LIMITED`], same index.
    limiters: Vec<Limiter>,
    started: Instant,
    /// Milliseconds since `started` after which the next request prunes the stores.
    next_prune_ms: AtomicU64,
}

/// What a check decided.
pub enum Decision {
    /// Let through; `remaining` more may follow at once.
    Allowed { remaining: u32, full_in: Duration },
    /// Refused: no request is accepted before `retry_after`.
    Refused { retry_after: Duration },
}

impl RateLimits {
    /// `quota` requests per `window` for each user and limited route; `None` when `quota` is
    /// 0 (limits off) or the window is empty.
    pub fn new(quota: u32, window: Duration) -> Option<Self> {
        let burst = NonZeroU32::new(quota)?;
        let per = Quota::with_period(window / quota)?.allow_burst(burst);
        let limiters = LIMITED
            .iter()
            .map(|_| {
                RateLimiter::dashmap_with_clock(per, DefaultClock::default())
                    .with_middleware::<StateInformationMiddleware>()
            })
            .collect();
        Some(Self {
            quota,
            window_secs: window.as_secs().max(1),
            limiters,
            started: Instant::now(),
            next_prune_ms: AtomicU64::new(duration_ms(PRUNE_EVERY)),
        })
    }

    /// Counts one request of `user` against policy `index` of [`LIMITED`].
    fn check(&self, index: usize, user: i64) -> Decision {
        self.maybe_prune();
        let limiter = &self.limiters[index];
        match limiter.check_key(&user) {
            Ok(snapshot) => allowed(&snapshot),
            Err(not_until) => refused(&not_until, limiter.clock().now()),
        }
    }

    /// Users with state in any store (for tests and the memory bound).
    pub fn tracked(&self) -> usize {
        self.limiters.iter().map(Limiter::len).sum()
    }

    /// Drops every user whose state is back to fresh, now.
    pub fn prune(&self) {
        for limiter in &self.limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Prunes when [`PRUNE_EVERY`] has passed since the last prune; only one caller does.
    fn maybe_prune(&self) {
        let now = duration_ms(self.started.elapsed());
        let due = self.next_prune_ms.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_prune_ms
                .compare_exchange(due, now + duration_ms(PRUNE_EVERY), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.prune();
        }
    }

    /// `"orders";q=100;w=10`
    fn policy_header(&self, index: usize) -> HeaderValue {
        header_value(format!(
            "\"{}\";q={};w={}",
            LIMITED[index].policy, self.quota, self.window_secs
        ))
    }

    /// `"orders";r=97;t=1`
    fn state_header(&self, index: usize, remaining: u32, reset: Duration) -> HeaderValue {
        header_value(format!(
            "\"{}\";r={};t={}",
            LIMITED[index].policy,
            remaining,
            ceil_secs(reset)
        ))
    }
}

fn allowed(snapshot: &StateSnapshot) -> Decision {
    let quota = snapshot.quota();
    let remaining = snapshot.remaining_burst_capacity();
    let used = quota.burst_size().get().saturating_sub(remaining);
    Decision::Allowed {
        remaining,
        full_in: quota.replenish_interval().saturating_mul(used),
    }
}

fn refused(not_until: &NotUntil<QuantaInstant>, now: QuantaInstant) -> Decision {
    Decision::Refused {
        retry_after: not_until.wait_time_from(now),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up, at least 1: a client that waits this long is accepted.
fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

fn header_value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Middleware (a route layer over every route): limits the routes of [`LIMITED`] per user and
/// passes everything else on untouched.
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limits) = state.rate_limits.as_deref() else {
        return next.run(req).await;
    };
    let Some(path) = req.extensions().get::<MatchedPath>() else {
        return next.run(req).await;
    };
    let Some(index) = LIMITED
        .iter()
        .position(|l| l.method == req.method() && l.path == path.as_str())
    else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    let user = User::from_request_parts(&mut parts, &state).await;
    let req = Request::from_parts(parts, body);
    // No valid token: the handler's own extractor answers 401.
    let Ok(user) = user else {
        return next.run(req).await;
    };
    match limits.check(index, user.id()) {
        Decision::Allowed { remaining, full_in } => {
            let mut res = next.run(req).await;
            set_fields(res.headers_mut(), limits, index, remaining, full_in);
            res
        }
        Decision::Refused { retry_after } => {
            let secs = ceil_secs(retry_after);
            let mut res = Problem::new(
                429,
                "Too Many Requests",
                "RATE_LIMITED",
                format!(
                    "at most {} requests per {} s per user on this route; retry in {secs} s",
                    limits.quota, limits.window_secs
                ),
            )
            .into_response();
            let headers = res.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            set_fields(headers, limits, index, 0, retry_after);
            res
        }
    }
}

fn set_fields(headers: &mut HeaderMap, limits: &RateLimits, index: usize, remaining: u32, reset: Duration) {
    headers.insert(RATELIMIT_POLICY, limits.policy_header(index));
    headers.insert(RATELIMIT, limits.state_header(index, remaining, reset));
}

/// The limits the configuration asks for, shared by every router built from one state.
pub fn from_config(writes: u32, window: Duration) -> Option<Arc<RateLimits>> {
    RateLimits::new(writes, window).map(Arc::new)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn outcomes(limits: &RateLimits, index: usize, user: i64, n: usize) -> (usize, usize) {
        let mut allowed = 0;
        let mut refused = 0;
        for _ in 0..n {
            match limits.check(index, user) {
                Decision::Allowed { .. } => allowed += 1,
                Decision::Refused { .. } => refused += 1,
            }
        }
        (allowed, refused)
    }

    #[test]
    fn exactly_the_quota_passes_per_user_and_route() {
        let limits = RateLimits::new(5, Duration::from_secs(60)).unwrap();
        assert_eq!(outcomes(&limits, 0, 1, 8), (5, 3));
        // Another user, and the same user on another route, start with a full quota.
        assert_eq!(outcomes(&limits, 0, 2, 5), (5, 0));
        assert_eq!(outcomes(&limits, 1, 1, 6), (5, 1));
    }

    #[test]
    fn remaining_counts_down_and_a_refusal_says_when_to_come_back() {
        let limits = RateLimits::new(3, Duration::from_secs(30)).unwrap();
        let remaining: Vec<u32> = (0..3)
            .map(|_| match limits.check(0, 7) {
                Decision::Allowed { remaining, .. } => remaining,
                Decision::Refused { .. } => u32::MAX,
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let Decision::Refused { retry_after } = limits.check(0, 7) else {
            panic!("the fourth request passed");
        };
        // One request comes back every 30 s / 3 = 10 s.
        assert!(retry_after > Duration::from_secs(9) && retry_after <= Duration::from_secs(10));
        assert_eq!(ceil_secs(retry_after), 10);
        assert_eq!(limits.policy_header(0).to_str().unwrap(), "\"orders\";q=3;w=30");
        assert_eq!(
            limits.state_header(2, 0, retry_after).to_str().unwrap(),
            "\"coupon-issues\";r=0;t=10"
        );
    }

    #[test]
    fn zero_turns_the_limits_off() {
        assert!(RateLimits::new(0, Duration::from_secs(10)).is_none());
    }

    #[test]
    fn users_whose_state_is_fresh_again_are_forgotten() {
        // 1,000 per second: a user's state is fresh again 1 ms after their last request.
        let limits = RateLimits::new(1_000, Duration::from_secs(1)).unwrap();
        for user in 0..1_000 {
            assert!(matches!(limits.check(0, user), Decision::Allowed { .. }));
        }
        assert_eq!(limits.tracked(), 1_000);
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(limits.tracked(), 0);
    }
}
