//! The HTTP API: an axum router over the shared state, with problem-document errors,
//! bearer-token auth, OpenAPI and AsyncAPI.

pub mod accept;
pub mod admission;
pub mod asyncapi;
pub mod auth;
pub mod extract;
pub mod header_grammar;
pub mod idempotency;
pub mod json;
pub mod openapi;
pub mod page;
pub mod problem;
pub mod rate_limit;
pub mod routes;
pub mod server;
pub mod trends;
pub mod views;
pub mod wait;

use std::sync::Arc;

use axum::{
    Router,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use orderflow_shared::{
    config::Config,
    db::{history::StatusCounts, outbox::Feed},
    messaging::stats::QueueStats,
    telemetry,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::problem::Problem;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Verifies bearer tokens (the shared secret, the identity provider).
    pub auth: Arc<auth::Authenticator>,
    pub config: Arc<Config>,
    /// Cancelled when the server shuts down: long-lived responses (event streams) end on it.
    pub shutdown: CancellationToken,
    /// Order acceptance, group-committed (needs a tokio runtime when built).
    pub acceptor: accept::Acceptor,
    /// Requests waiting for an order to move (`Prefer: wait`).
    pub watcher: wait::Watcher,
    /// Per-user limits of the write routes (`None`: off, RATE_LIMIT_WRITES=0).
    pub rate_limits: Option<Arc<rate_limit::RateLimits>>,
    /// The last hour of pipeline samples for the dashboard (filled by [`serve`]'s sampler).
    pub trends: Arc<trends::Trends>,
    /// The broker's queue depths, read over one kept connection (trends, overview, gauges).
    pub queues: Arc<QueueStats>,
    /// Orders per status, counted without reading every order each time (overview, gauges).
    pub orders: Arc<StatusCounts>,
}

impl AppState {
    pub fn new(pool: PgPool, config: Arc<Config>) -> Self {
        Self::with_feed(pool, config, None)
    }

    /// [`new`](Self::new), handing the orders it accepts to a relay in this process through
    /// `feed` (see `orderflow_workers::spawn_fed`) instead of asking it to read them back.
    pub fn with_feed(pool: PgPool, config: Arc<Config>, feed: Option<Arc<Feed>>) -> Self {
        Self {
            acceptor: accept::Acceptor::start(pool.clone(), config.order_timeout, feed),
            watcher: wait::Watcher::start(pool.clone()),
            pool,
            auth: Arc::new(auth::Authenticator::from_config(&config)),
            rate_limits: rate_limit::from_config(config.rate_limit_writes, config.rate_limit_window),
            trends: Arc::new(trends::Trends::new(config.trend_sample_interval)),
            queues: Arc::new(QueueStats::new(&config.amqp_url)),
            orders: Arc::default(),
            config,
            shutdown: CancellationToken::new(),
        }
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    // Twice the pool: a request also spends time outside its transaction (parsing, auth,
    // writing the response), so this keeps every pooled connection busy and no more.
    let admission = admission::Admission::new(
        2 * state.config.db_pool_size as usize,
        accept::MAX_BATCH * accept::WRITERS,
    );
    Router::new()
        .merge(routes::router(admission))
        .merge(openapi::router(state.auth.issuer()))
        .merge(asyncapi::router())
        .route("/metrics", axum::routing::get(metrics_text))
        // Outside admission control: an over-limit write is refused without waiting its turn.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), rate_limit::limit))
        .fallback(|| async { Problem::new(404, "Not Found", "NOT_FOUND", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                405,
                "Method Not Allowed",
                "METHOD_NOT_ALLOWED",
                "this route does not accept that method",
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn(track_http))
        .layer(CatchPanicLayer::custom(|_| panic_response()))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// One span per request, continuing the caller's W3C `traceparent` when it sends one. While
/// spans are exported it follows the OpenTelemetry HTTP server conventions: kind SERVER,
/// named `{method} {route}` once the route is known ([`track_http`] records it; the method
/// alone for no route), with `http.request.method`, `url.path`, `url.scheme`, `http.route`,
/// `http.response.status_code` and, for a 5xx, `error.type`.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let method = req.method().as_str();
    let span = tracing::info_span!(
        "request",
        method = %method,
        uri = %req.uri().path(),
        "otel.kind" = "server",
        "error.type" = tracing::field::Empty,
    );
    // W3C Trace Context: several traceparent lines are as good as none.
    if let Some(parent) = header_grammar::single(req.headers(), "traceparent")
        .ok()
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(telemetry::TraceParent::parse)
    {
        telemetry::set_parent(&span, parent);
    }
    telemetry::set_attributes(
        &span,
        &[
            ("http.request.method", method.to_owned().into()),
            ("url.path", req.uri().path().to_owned().into()),
            ("url.scheme", "http".into()),
        ],
    );
    span
}

/// Counts and times every request by its route template (never the raw path, so ids do
/// not explode the label set), and tells the client the same time: `Server-Timing: app;dur=D`,
/// D the milliseconds from routing to the response's head (W3C Server Timing), so a client
/// can tell the API's share of a slow answer from the network's and its own.
async fn track_http(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let mut res = next.run(req).await;
    let took = started.elapsed();
    if let Ok(timing) = HeaderValue::from_str(&format!("app;dur={:.3}", took.as_secs_f64() * 1_000.0)) {
        res.headers_mut().append(SERVER_TIMING.clone(), timing);
    }
    let status = res.status().as_u16().to_string();
    let span = tracing::Span::current();
    if res.status().is_server_error() {
        span.record("error.type", status.as_str());
    }
    if telemetry::exporting() {
        let matched = route != UNMATCHED;
        let mut attributes = vec![("http.response.status_code", i64::from(res.status().as_u16()).into())];
        if matched {
            attributes.push(("http.route", route.clone().into()));
        }
        telemetry::set_attributes(&span, &attributes);
        telemetry::rename(
            &span,
            if matched {
                format!("{method} {route}")
            } else {
                method.to_string()
            },
        );
    }
    metrics::counter!(orderflow_shared::metrics::HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(orderflow_shared::metrics::HTTP_DURATION, "route" => route).record(took.as_secs_f64());
    res
}

/// The `route` label of a request that matched no route.
const UNMATCHED: &str = "unmatched";

static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Prometheus text exposition of this process's metrics.
pub async fn metrics_text() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        orderflow_shared::metrics::render(),
    )
}

/// A worker process's own small listener: `/metrics` and `/healthz`, within `limits`.
pub async fn serve_metrics(
    listener: TcpListener,
    limits: server::Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let app = Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    server::serve(listener, app, limits, shutdown).await;
    Ok(())
}

fn panic_response() -> Response {
    tracing::error!("handler panicked");
    let mut res = Problem::new(
        500,
        "Internal Server Error",
        "INTERNAL_ERROR",
        "an unexpected error occurred",
    )
    .into_response();
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res
}

/// Serves the API on an already bound listener until `shutdown` is cancelled, then lets
/// in-flight requests finish; HTTP_HEADER_TIMEOUT and HTTP_MAX_CONNECTIONS apply
/// ([`server`]). Also resumes event replays and bulk actions left RUNNING by a
/// runner that is gone (`orderflow_shared::db::replay::resume`, `orderflow_shared::db::bulk::resume`).
pub async fn serve(listener: TcpListener, mut state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    state.shutdown = shutdown.clone();
    // Event replays whose runner died (another API process, `orderflow events replay`) go on here.
    tokio::spawn(orderflow_shared::db::replay::resume(
        state.pool.clone(),
        shutdown.clone(),
    ));
    // So do bulk actions (replay a failure group, cancel stuck orders, ...).
    tokio::spawn(orderflow_shared::db::bulk::resume(
        state.pool.clone(),
        state.config.amqp_url.clone(),
        shutdown.clone(),
    ));
    // The dashboard's "Last hour" charts: one sample every TREND_SAMPLE_INTERVAL.
    tokio::spawn(trends::run(
        state.trends.clone(),
        state.pool.clone(),
        state.queues.clone(),
        shutdown.clone(),
    ));
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    let queues = state.queues.clone();
    let limits = server::Limits::of(&state.config);
    server::serve(listener, router(state), limits, shutdown).await;
    // The kept connection would otherwise end with the process, which the broker logs as a
    // connection closed unexpectedly.
    queues.close().await;
    Ok(())
}
