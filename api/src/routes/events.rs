//! `GET /api/orders/{id}/events`: server-sent events of one order's status changes until it is
//! CONFIRMED or CANCELLED, for clients that would rather not poll.
//!
//! On connect the stream replays the history so far, then waits for the order to change status
//! and sends each new change; it ends after the terminal status, or after ten minutes at most (a
//! client may reconnect: each event's id is its history row id, and `Last-Event-ID` resumes
//! after it). Streams do not poll the database each: they wait on the API's
//! [`Watcher`](crate::wait::Watcher), which checks every watched order in one query per tick
//! ([`STREAM_TICK`](crate::wait::STREAM_TICK) while only streams watch), and read the history
//! only when their order moved (and every [`RECHECK_EVERY`] in case it
//! moved and came back between two ticks). Opening a stream is admitted like any request (its
//! turn is given back once the stream starts); HTTP_MAX_CONNECTIONS bounds how many are open.

use std::{
    collections::VecDeque,
    convert::Infallible,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use chrono::{DateTime, Utc};
use futures_util::{Stream, stream};
use orderflow_shared::{Error, db::kept, domain::OrderStatus};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState,
    extract::{Path, User},
    problem::{ApiResult, Problem},
    wait::{Until, Watcher},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/orders/{id}/events", get(order_events))
}

const PROBLEM: &str = "application/problem+json";
/// How long a stream waits on the watcher before reading the history anyway.
const RECHECK_EVERY: Duration = Duration::from_secs(5);
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// A stream ends after this even if the order is still in flight (the client may reconnect).
const MAX_LIFETIME: Duration = Duration::from_secs(600);

/// The `data` of an `event: status`.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct StatusEvent {
    #[serde(skip)]
    #[schema(ignore)]
    pub id: i64,
    /// The status the order moved to.
    pub status: String,
    /// Why it is cancelling or cancelled (OUT_OF_STOCK, TIMEOUT, ...).
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// Server-sent events (`text/event-stream`) of one of the caller's orders: one
/// `event: status` per status change, `data: {"status", "reason", "at"}` and `id:` the change's
/// sequence number. The history so far comes first; the stream ends after CONFIRMED or
/// CANCELLED (or after 10 minutes, or when the token expires; reconnect with `Last-Event-ID` to
/// resume). Comment lines
/// keep idle connections alive. Another user's order is 404. Reconnecting with the id of the
/// terminal event answers 204, which tells an `EventSource` to stop.
#[utoipa::path(get, path = "/api/orders/{id}/events", operation_id = "streamOrderEvents", tag = "orders", security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "the order id"),
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0,
            description = "resume after this event id (a whole number, as the stream sent it); else 400 `INVALID_LAST_EVENT_ID`"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = StatusEvent,
            description = "a stream of `event: status` messages, each `data` a StatusEvent"),
        (status = 204, description = "nothing left to send: the order is terminal and the client has seen it"),
        (status = 400, description = "INVALID_PATH: the id is not a UUID; INVALID_LAST_EVENT_ID", body = Problem, content_type = PROBLEM),
        (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
    ))]
pub async fn order_events(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user.id())
        .fetch_optional(&state.pool)
        .await?;
    let status = status.ok_or_else(|| Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist")))?;
    let invalid = || {
        Error::bad_request(
            "INVALID_LAST_EVENT_ID",
            "Last-Event-ID must be one whole number the stream sent",
        )
    };
    let after = match crate::header_grammar::single(&headers, "last-event-id").map_err(|_| invalid())? {
        None => 0,
        // Only ids this stream sent (history row ids) come back from an EventSource.
        Some(v) => v
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(invalid)?,
    };
    let terminal = OrderStatus::parse(&status).is_some_and(OrderStatus::is_terminal);
    if terminal && after > 0 {
        let more: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM order_status_history WHERE order_id = $1 AND id > $2)")
                .bind(id)
                .bind(after)
                .fetch_one(&state.pool)
                .await?;
        if !more {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let feed = Feed {
        pool: state.pool.clone(),
        watcher: state.watcher.clone(),
        order_id: id,
        after,
        status: OrderStatus::parse(&status),
        pending: VecDeque::new(),
        polled: false,
        finished: false,
        // Not past the token's expiry: a stream is access, and a revoked user's token stops
        // being renewed.
        until: Instant::now() + MAX_LIFETIME.min(token_left(user.expires_at)),
        shutdown: state.shutdown.clone(),
    };
    let mut response = Sse::new(feed.into_stream())
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE_EVERY))
        .into_response();
    // Proxies such as nginx would otherwise buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// How long a token that expires at `expires_at` (seconds since the epoch) is still good.
fn token_left(expires_at: i64) -> Duration {
    Duration::from_secs(u64::try_from(expires_at - Utc::now().timestamp()).unwrap_or(0))
}

/// The state of one stream: what has been sent, what is waiting to be sent.
struct Feed {
    pool: PgPool,
    watcher: Watcher,
    order_id: Uuid,
    /// The last history row sent.
    after: i64,
    /// The order's status as last read: the stream waits for it to change.
    status: Option<OrderStatus>,
    pending: VecDeque<Event>,
    polled: bool,
    finished: bool,
    until: Instant,
    /// The server is shutting down: end the stream so graceful shutdown need not wait.
    shutdown: CancellationToken,
}

impl Feed {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        stream::unfold(self, |mut feed| async move {
            loop {
                if let Some(event) = feed.pending.pop_front() {
                    return Some((Ok(event), feed));
                }
                // The history is sent once however little time is left.
                let over = feed.polled && Instant::now() >= feed.until;
                if feed.finished || over || feed.shutdown.is_cancelled() {
                    return None;
                }
                if feed.polled {
                    let wait = feed.until.saturating_duration_since(Instant::now()).min(RECHECK_EVERY);
                    let until = feed.status.map_or(Until::Terminal, Until::Leaves);
                    tokio::select! {
                        _ = feed.watcher.watch(feed.order_id, until, wait) => {}
                        _ = feed.shutdown.cancelled() => return None,
                    }
                }
                feed.polled = true;
                feed.poll().await;
            }
        })
    }

    /// Queues the history rows after the last one sent; marks the feed finished at a terminal
    /// status. A database error is logged and the next poll tries again.
    async fn poll(&mut self) {
        let rows: Vec<StatusEvent> = match kept::answered_query(
            sqlx::query_as(
                "SELECT id, to_status AS status, reason, at FROM order_status_history
                 WHERE order_id = $1 AND id > $2 ORDER BY id",
            )
            .bind(self.order_id)
            .bind(self.after)
            .fetch_all(&self.pool),
        )
        .await
        {
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(order_id = %self.order_id, error = %err, "order events: polling failed");
                return;
            }
        };
        for row in rows {
            self.after = row.id;
            self.status = OrderStatus::parse(&row.status).or(self.status);
            match Event::default().event("status").id(row.id.to_string()).json_data(&row) {
                Ok(event) => self.pending.push_back(event),
                Err(err) => tracing::warn!(order_id = %self.order_id, error = %err, "order events: encoding failed"),
            }
            if OrderStatus::parse(&row.status).is_some_and(OrderStatus::is_terminal) {
                self.finished = true;
                break;
            }
        }
    }
}
