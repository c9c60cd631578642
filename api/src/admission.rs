//! Admission control: at most `2 x DB_POOL_SIZE` requests are worked on at once; the rest
//! wait their turn, parked, before their body is read or their token checked. Order
//! placements (`POST /api/orders`) have a turn of their own and many more of them run at once:
//! they hold no connection while they wait for their group commit (`crate::accept`), and the
//! more of them wait together, the larger the batch that shares one transaction. A request that
//! asked to wait (`Prefer: wait`) gives its turn back while it sleeps and takes it again to
//! finish ([`Turn`]).
//!
//! Without it a flood (a flash sale: thousands of connections at once) lets every request
//! start, and the few that hold a database connection share two cores with thousands of
//! runnable tasks: each of their round trips waits behind the others, transactions that
//! take a few milliseconds hold a pooled connection for a hundred, and the rest time out
//! on the pool. Measured with `orderflow bench --hot` (docs/PERFORMANCE.md): the API
//! accepted 5x more orders per second once the holders were not competing with the crowd.
//! A request that waits longer than [`MAX_WAIT`] is answered 503 with `Retry-After`; one
//! admitted has [`BODY_DEADLINE`] to send its body, and is answered 503 once it has worked
//! (held its turn) for [`WORK_DEADLINE`] ([`ADMIN_WORK_DEADLINE`] for an operator's).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// How long a request may wait for its turn.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long an admitted request may take to send its body, from the first read of it (2 MB,
/// the largest body accepted, at 200 KB/s). A body still arriving then is refused (408
/// `BODY_TIMEOUT`): a client that sends slowly, or stops, holds a turn for no longer than this
/// past its token check, so a few such clients cannot hold every turn and shut every other
/// caller out. It starts at the first read, not at the turn, so that the server's own time
/// before (a token checked against an identity provider) is never counted against the client.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// How long an admitted request may work, its pauses ([`Turn::pause`]) not counted, before it is
/// answered 503 and dropped, its transaction with it. A PostgreSQL primary that vanished
/// without closing its connections (power or network lost) answers nothing, and with no TCP
/// keepalive a request waiting on it would wait until the kernel gives up, about 15 minutes,
/// holding its turn and its pooled connection. Dropped, its connection goes back to the pool,
/// which closes it unchecked once the pool has moved to the new primary (`db::primary`; on a
/// live database, once its statement ends). Far above any request's own work (milliseconds);
/// an order placement's batch is given up sooner, at `kept::ANSWER_DEADLINE`.
pub const WORK_DEADLINE: Duration = Duration::from_secs(30);

/// [`WORK_DEADLINE`] for the operators' routes (`/api/admin/...`): a dry run or a count over a
/// large incident or a month of events may take longer than a shop's request ever does.
pub const ADMIN_WORK_DEADLINE: Duration = Duration::from_secs(300);

/// The error a body read past [`BODY_DEADLINE`] ends with.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} s",
            BODY_DEADLINE.as_secs()
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// Middleware for routes outside admission control that read a body (the dashboard's login):
/// the same [`BODY_DEADLINE`], so a body sent slowly holds its connection no longer either.
pub async fn body_deadline(req: Request, next: Next) -> Response {
    next.run(req.map(with_deadline)).await
}

/// `body`, ended with [`BodyTimeout`] once [`BODY_DEADLINE`] has passed since it was first read.
fn with_deadline(body: Body) -> Body {
    use futures_util::StreamExt;
    let chunks = body.into_data_stream();
    // (the chunks, the deadline once the first read set it, whether it is over)
    let timed = futures_util::stream::unfold((chunks, None, false), |(mut chunks, deadline, over)| async move {
        if over {
            return None;
        }
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + BODY_DEADLINE);
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(chunk)) => {
                let chunk = chunk.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
                Some((chunk, (chunks, Some(deadline), false)))
            }
            Ok(None) => None,
            Err(_) => Some((Err(Box::new(BodyTimeout) as _), (chunks, Some(deadline), true))),
        }
    });
    Body::from_stream(timed)
}

/// Middleware for routes outside admission control whose writes are idempotent (the
/// dashboard's login, which checks the token, mapping an identity provider's user on first
/// sight): the same [`WORK_DEADLINE`], counted from the start, answered as a read's
/// (`REQUEST_DEADLINE_EXCEEDED`, retry freely) whatever the method.
pub async fn work_deadline(req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    match tokio::time::timeout(WORK_DEADLINE, next.run(req)).await {
        Ok(response) => response,
        Err(_) => overran(&method, uri.path(), WORK_DEADLINE, Retry::Freely),
    }
}

/// The permits shared by the admitted routes.
#[derive(Clone)]
pub struct Admission {
    general: Arc<Semaphore>,
    placements: Arc<Semaphore>,
}

impl Admission {
    /// `in_flight` requests at once, and `placements` order placements besides.
    pub fn new(in_flight: usize, placements: usize) -> Self {
        Self {
            general: Arc::new(Semaphore::new(in_flight.max(1))),
            placements: Arc::new(Semaphore::new(placements.max(1))),
        }
    }
}

/// An admitted request's turn (a request extension). A handler that sleeps (`Prefer: wait`)
/// gives it back first ([`pause`](Self::pause)) and takes it again before it works on
/// ([`resume`](Self::resume)), so sleeping requests never keep working ones out.
#[derive(Clone)]
pub struct Turn {
    permits: Arc<Semaphore>,
    held: Arc<Mutex<Held>>,
}

/// A turn's permit while it is held, and how long it has been held in all.
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    /// When the permit was last taken.
    since: Instant,
    /// Held before that, over the earlier spells.
    before: Duration,
}

impl Turn {
    fn new(permits: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Self {
        Self {
            permits,
            held: Arc::new(Mutex::new(Held {
                permit: Some(permit),
                since: Instant::now(),
                before: Duration::ZERO,
            })),
        }
    }

    /// Gives the turn back while the request sleeps; the time until [`resume`](Self::resume)
    /// does not count as work ([`WORK_DEADLINE`]).
    pub fn pause(&self) {
        let mut held = self.lock();
        if held.permit.take().is_some() {
            let spell = held.since.elapsed();
            held.before += spell;
        }
    }

    /// Waits for a turn again (at most [`MAX_WAIT`]); an error is the 503 `SERVICE_BUSY`. A turn
    /// still held is kept as it is.
    pub async fn resume(&self) -> Result<(), orderflow_shared::Error> {
        if self.lock().permit.is_some() {
            return Ok(());
        }
        let permit = tokio::time::timeout(MAX_WAIT, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(busy)?;
        let mut held = self.lock();
        held.permit = Some(permit);
        held.since = Instant::now();
        Ok(())
    }

    /// How long the request has held its turn, pauses not counted.
    fn worked(&self) -> Duration {
        let held = self.lock();
        held.before + held.permit.as_ref().map_or(Duration::ZERO, |_| held.since.elapsed())
    }

    /// Completes once the request has held its turn for `limit` in all.
    async fn overrun(&self, limit: Duration) {
        loop {
            let left = limit.saturating_sub(self.worked());
            if left.is_zero() {
                return;
            }
            // Paused meanwhile, the work done is unchanged: this sleeps again.
            tokio::time::sleep(left).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves a valid state: use it.
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn busy() -> orderflow_shared::Error {
    orderflow_shared::Error::unavailable("SERVICE_BUSY", "too many requests are being served; retry shortly")
}

/// Middleware: runs the request once a permit is free (FIFO), or answers 503.
pub async fn admit(State(admission): State<Admission>, mut req: Request, next: Next) -> Response {
    let permits = if req.method() == axum::http::Method::POST && req.uri().path() == "/api/orders" {
        &admission.placements
    } else {
        &admission.general
    };
    match tokio::time::timeout(MAX_WAIT, permits.clone().acquire_owned()).await {
        Ok(Ok(permit)) => {
            let turn = Turn::new(permits.clone(), permit);
            // The extension is dropped with the request, before the handler's body runs; the
            // turn is held here until the response is ready (or the handler pauses it).
            req.extensions_mut().insert(turn.clone());
            // (cheap to keep: the method is a tag, the URI shares the request's bytes)
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let deadline = if uri.path().starts_with("/api/admin/") {
                ADMIN_WORK_DEADLINE
            } else {
                WORK_DEADLINE
            };
            let req = req.map(with_deadline);
            let response = tokio::select! {
                biased;
                response = next.run(req) => response,
                () = turn.overrun(deadline) => {
                    let retry = if method.is_safe() { Retry::Freely } else { Retry::WithKey };
                    overran(&method, uri.path(), deadline, retry)
                }
            };
            drop(turn);
            response
        }
        _ => crate::problem::ApiError(busy()).into_response(),
    }
}

/// How a client may retry a request given up at its deadline.
#[derive(Clone, Copy)]
enum Retry {
    /// Retrying changes nothing it did not (a safe method, or a route whose writes are
    /// idempotent).
    Freely,
    /// It may have committed without the answer coming back (as for a lost COMMIT,
    /// `idempotency`): only with its Idempotency-Key, or after checking.
    WithKey,
}

/// The answer to a request given up at its deadline ([`WORK_DEADLINE`]): 503 with
/// `REQUEST_DEADLINE_EXCEEDED` or `COMMIT_OUTCOME_UNKNOWN` as `retry` says.
fn overran(method: &axum::http::Method, path: &str, deadline: Duration, retry: Retry) -> Response {
    tracing::warn!(%method, path, ?deadline, "request given up: no answer within the deadline");
    let secs = deadline.as_secs();
    let err = if matches!(retry, Retry::Freely) {
        orderflow_shared::Error::unavailable(
            "REQUEST_DEADLINE_EXCEEDED",
            format!("no answer within {secs} s (the database may be failing over); retry shortly"),
        )
    } else {
        orderflow_shared::Error::unavailable(
            "COMMIT_OUTCOME_UNKNOWN",
            format!(
                "the request was given up after {secs} s without an answer (the database may be failing over), \
                 so it may have been applied: retry only with the same Idempotency-Key (which answers what was \
                 done), or check before retrying"
            ),
        )
    };
    crate::problem::ApiError(err).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::{Router, body::Body, http::Request, routing::get};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn no_more_than_the_limit_run_at_once_and_the_rest_wait_their_turn() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
                    MOST.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    RUNNING.fetch_sub(1, Ordering::SeqCst);
                    "ok"
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(Admission::new(2, 2), admit));
        let calls = (0..10).map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.oneshot(Request::new(Body::empty())).await.map(|r| r.status()) })
        });
        for call in futures_util::future::join_all(calls).await {
            assert_eq!(call.ok().and_then(Result::ok).map(|s| s.as_u16()), Some(200));
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 2);
    }

    /// A body that stops half way is refused with 408 once [`BODY_DEADLINE`] has passed since
    /// it was first read, and its turn goes to the next request (the only turn here); a whole
    /// body first read later than that (the server took its time) is read as any other.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_refused_and_gives_its_turn_back() {
        use futures_util::StreamExt;
        let app = Router::new()
            .route(
                "/",
                axum::routing::post(
                    |crate::extract::Json(v): crate::extract::Json<serde_json::Value>| async move { v.to_string() },
                ),
            )
            .route(
                "/late",
                axum::routing::post(|req: Request<Body>| async move {
                    tokio::time::sleep(2 * BODY_DEADLINE).await;
                    axum::body::to_bytes(req.into_body(), 100).await.is_ok().to_string()
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(Admission::new(1, 1), admit));
        let json = |path: &str, body: Body| {
            Request::post(path)
                .header("content-type", "application/json")
                .body(body)
                .expect("a request")
        };
        let call = |req: Request<Body>| {
            let app = app.clone();
            async move {
                let res = tokio::time::timeout(3 * BODY_DEADLINE, app.oneshot(req))
                    .await
                    .expect("an answer, not a hang")
                    .expect("a response");
                let status = res.status().as_u16();
                let body = axum::body::to_bytes(res.into_body(), 10_000).await.expect("a body");
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let stalled = futures_util::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{")) })
            .chain(futures_util::stream::pending());
        let started = tokio::time::Instant::now();
        let (status, problem) = call(json("/", Body::from_stream(stalled))).await;
        assert_eq!(status, 408, "{problem}");
        assert_eq!(started.elapsed(), BODY_DEADLINE);
        let problem: serde_json::Value = serde_json::from_str(&problem).expect("a problem document");
        assert_eq!(problem["code"], "BODY_TIMEOUT");
        assert_eq!(call(json("/", Body::from("[1]"))).await, (200, "[1]".to_owned()));
        assert_eq!(call(json("/late", Body::from("[1]"))).await, (200, "true".to_owned()));
    }
    /// A request that works past [`WORK_DEADLINE`] (a database that stopped answering) is
    /// answered 503 at the deadline, a read to retry and a write whose outcome is unknown, and
    /// its turn goes to the next request; the time a request sleeps with its turn given back
    /// (`Prefer: wait`) does not count.
    #[tokio::test(start_paused = true)]
    async fn a_request_working_past_the_deadline_is_answered_and_a_paused_one_is_not() {
        let hang = || async {
            std::future::pending::<()>().await;
            "never"
        };
        let app = Router::new()
            .route("/", get(hang).post(hang))
            .route("/api/admin/dry-run", axum::routing::post(hang))
            .route(
                "/sleeps",
                get(|axum::Extension(turn): axum::Extension<Turn>| async move {
                    tokio::time::sleep(WORK_DEADLINE / 2).await; // working
                    turn.pause();
                    tokio::time::sleep(2 * WORK_DEADLINE).await; // waiting, its turn given back
                    turn.resume().await.expect("a turn");
                    tokio::time::sleep(WORK_DEADLINE / 4).await; // working again
                    "slept"
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(Admission::new(1, 1), admit))
            .merge(
                Router::new()
                    .route("/ops/login", axum::routing::post(hang))
                    .route_layer(axum::middleware::from_fn(work_deadline)),
            );
        let call = |method: &str, path: &str| {
            let (app, req) = (
                app.clone(),
                Request::builder().method(method).uri(path).body(Body::empty()),
            );
            async move {
                let started = tokio::time::Instant::now();
                let res = app.oneshot(req.expect("a request")).await.expect("a response");
                let status = res.status().as_u16();
                let body = axum::body::to_bytes(res.into_body(), 10_000).await.expect("a body");
                let body = String::from_utf8_lossy(&body).into_owned();
                (status, body, started.elapsed())
            }
        };
        let code = |body: &str| serde_json::from_str::<serde_json::Value>(body).expect("a problem")["code"].clone();
        let (status, body, took) = call("GET", "/").await;
        assert_eq!(
            (status, code(&body), took),
            (503, "REQUEST_DEADLINE_EXCEEDED".into(), WORK_DEADLINE)
        );
        let (status, body, took) = call("POST", "/").await;
        assert_eq!(
            (status, code(&body), took),
            (503, "COMMIT_OUTCOME_UNKNOWN".into(), WORK_DEADLINE)
        );
        // A route outside admission has the same deadline; the login's writes are idempotent,
        // so it is retried freely though it is a POST.
        let (status, body, took) = call("POST", "/ops/login").await;
        assert_eq!(
            (status, code(&body), took),
            (503, "REQUEST_DEADLINE_EXCEEDED".into(), WORK_DEADLINE)
        );
        // An operator's route has longer.
        let (status, body, took) = call("POST", "/api/admin/dry-run").await;
        assert_eq!(
            (status, code(&body), took),
            (503, "COMMIT_OUTCOME_UNKNOWN".into(), ADMIN_WORK_DEADLINE)
        );
        let (status, body, took) = call("GET", "/sleeps").await;
        assert_eq!((status, body.as_str()), (200, "slept"));
        assert_eq!(took, WORK_DEADLINE / 2 + 2 * WORK_DEADLINE + WORK_DEADLINE / 4);
    }
}
