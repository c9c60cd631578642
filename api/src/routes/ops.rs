//! The ops dashboard at `/ops` and the JSON behind it.
//!
//! - `/ops`: the dashboard (HTML, CSS and JS compiled into the binary from `api/assets/ops/`),
//!   or the login form when the browser has no valid admin session.
//! - `POST /ops/login` takes an admin token (form field or JSON `{token}`) and keeps it in the
//!   HttpOnly cookie [`ADMIN_COOKIE`] (also `Secure` when reached over HTTPS) until the token
//!   expires; `POST /ops/logout` clears it.
//!   The [`Admin`] extractor accepts that cookie, so the dashboard's scripts call the admin API
//!   with same-origin requests and never see the token.
//! - `GET /api/admin/overview`: the pipeline at a glance (orders per state, queues, outbox lag,
//!   new dead letters, stuck orders).
//! - `GET /api/admin/orders/{id}/timeline`: one order's statuses, message hops (who sent what,
//!   which worker handled it when), compensations and dead letters.

use std::{collections::BTreeMap, time::Duration};

use axum::{
    Router,
    extract::{
        FromRequest, Request, State,
        rejection::{FormRejection, JsonRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use orderflow_shared::{
    Error, ErrorKind,
    config::query_duration,
    db::orders::{self, OrderRow},
    messaging::{MessageType, stats::QueueStat},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    AppState,
    extract::{ADMIN_COOKIE, Admin, Json, Path, Query, cookie},
    problem::{ApiError, ApiResult, Problem},
    routes::admin::DeadLetterView,
    views::{self, OrderHoldings, OrderSummary, TimelineOrder},
};

/// The dashboard, its assets and its reads (admitted, see `crate::admission`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ops", get(dashboard))
        .route("/ops/", get(|| async { Redirect::permanent("/ops") }))
        .route(
            "/ops/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/ops/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route("/api/admin/overview", get(overview))
        .route("/api/admin/orders/{id}/timeline", get(timeline))
}

/// Logging in and out, outside admission control: a login reads its body before anything
/// proves who sends it, so a client that sent it slowly would hold a turn without a token.
pub fn sign_in() -> Router<AppState> {
    Router::new()
        .route("/ops/login", post(login).get(|| async { Redirect::to("/ops") }))
        .route("/ops/logout", post(logout))
}

const PROBLEM: &str = "application/problem+json";

const INDEX_HTML: &str = include_str!("../../assets/ops/index.html");
const LOGIN_HTML: &str = include_str!("../../assets/ops/login.html");
const APP_CSS: &str = include_str!("../../assets/ops/app.css");
const APP_JS: &str = include_str!("../../assets/ops/app.js");

/// Everything the pages load comes from this origin; nothing inline, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

// --- Pages and session ------------------------------------------------------------------------

/// The dashboard for a valid admin session, else the login form.
async fn dashboard(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = cookie(&headers, ADMIN_COOKIE) else {
        return login_page(StatusCode::OK, None);
    };
    match state.auth.verify(&state.pool, token).await.map(|c| c.principal) {
        Ok(principal) if principal.admin => page(StatusCode::OK, INDEX_HTML.to_owned()),
        Ok(_) => with_cookie(
            login_page(StatusCode::OK, Some("That session is not an admin's. Log in again.")),
            &clear_cookie(),
        ),
        Err(err) if refused(&err) => with_cookie(
            login_page(StatusCode::OK, Some("Your session has expired. Log in again.")),
            &clear_cookie(),
        ),
        Err(err) if !unchecked(&err) => ApiError(err).into_response(),
        // The identity provider or the database did not answer: the session may be good, so
        // it is kept (mid-incident, an operator logged out would have to log in again through
        // the very provider that is down).
        Err(_) => {
            let mut res = login_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(
                    "Your session cannot be checked now (the identity provider or the database is not answering). You are still logged in: reload in a moment.",
                ),
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            res
        }
    }
}

/// Whether a token was refused (401: expired, malformed, not signed by a known key).
fn refused(err: &Error) -> bool {
    matches!(
        err,
        Error::Client {
            kind: ErrorKind::Unauthorized,
            ..
        }
    )
}

/// Whether a token could not be checked now (the identity provider or the database
/// unavailable): it may be good, and asking again later may tell.
fn unchecked(err: &Error) -> bool {
    err.is_transient()
        || matches!(
            err,
            Error::Client {
                kind: ErrorKind::ServiceUnavailable,
                ..
            }
        )
}

#[derive(Debug, Deserialize)]
pub struct Login {
    /// An admin bearer token (`orderflow token --user <id> --admin`, or one from the identity
    /// provider that AUTH_ADMIN_CLAIM makes an admin).
    pub token: String,
}

/// Checks an admin token and keeps it in the session cookie. A form post is answered with a
/// redirect to the dashboard (or the login form again, with the reason); a JSON post with 204
/// (or a problem document).
async fn login(State(state): State<AppState>, req: Request) -> Response {
    if let Err(err) = crate::extract::same_origin(req.headers()) {
        return ApiError(err).into_response();
    }
    let secure = over_https(req.headers());
    let json = crate::header_grammar::media_type_is(req.headers(), "application/json");
    let token = if json {
        match axum::Json::<Login>::from_request(req, &state).await {
            Ok(j) => Some(j.0.token),
            // JSON without a token string is answered below; a body that is not JSON, or too
            // large, as on every JSON route.
            Err(JsonRejection::JsonDataError(_)) => None,
            Err(other) => return ApiError::from(other).into_response(),
        }
    } else {
        match axum::Form::<Login>::from_request(req, &state).await {
            Ok(f) => Some(f.0.token),
            Err(FormRejection::InvalidFormContentType(_)) => {
                return unsupported_login_type();
            }
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return login_page(StatusCode::PAYLOAD_TOO_LARGE, Some("That form is too large."));
            }
            // A form without a token is answered below, as is one that could not be read.
            Err(_) => None,
        }
    };
    let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    let refuse = |status: u16, code: &'static str, message: &str| {
        if json {
            let title = StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            Problem::new(status, title, code, message).into_response()
        } else {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            login_page(status, Some(message))
        }
    };
    let Some(token) = token else {
        return refuse(400, "MISSING_TOKEN", "Paste an admin token to log in.");
    };
    let (principal, exp) = match state.auth.verify(&state.pool, &token).await {
        Ok(caller) => (caller.principal, caller.expires_at),
        Err(err) if err.code() == Some("TOKEN_EXPIRED") => {
            return refuse(401, "TOKEN_EXPIRED", "That token has expired.");
        }
        Err(err) if refused(&err) => {
            return refuse(
                401,
                "INVALID_TOKEN",
                "That token is not valid here (malformed, or signed with another secret).",
            );
        }
        Err(err) if unchecked(&err) => {
            tracing::warn!(error = %err, "a dashboard login could not be checked");
            let mut res = refuse(
                503,
                "SESSION_CHECK_UNAVAILABLE",
                "That token cannot be checked now (the identity provider or the database is not answering). Try again in a moment.",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return res;
        }
        Err(err) => return ApiError(err).into_response(),
    };
    if !principal.admin {
        return refuse(
            403,
            "ADMIN_REQUIRED",
            "That token is not an admin token. Create one with `orderflow token --user <id> --admin`.",
        );
    }
    let max_age = exp - Utc::now().timestamp();
    if max_age <= 0 {
        return refuse(401, "TOKEN_EXPIRED", "That token has expired.");
    }
    // A verified JWT is base64url and dots only: safe inside a cookie value.
    let set = format!(
        "{ADMIN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    // Browsers keep a cookie of at most 4,096 bytes, attributes included (RFC 6265 §6.1), and
    // drop a larger one silently: the login would seem to succeed and the dashboard ask for it
    // again, in a loop. (An identity provider's token with many group claims can be that big.)
    if set.len() > MAX_COOKIE_BYTES {
        return refuse(
            422,
            "TOKEN_TOO_LARGE",
            &format!(
                "That token is {} bytes: too large for the browser to keep as the dashboard's session \
                 (at most about {} bytes). Ask the identity provider for one with fewer claims, or use \
                 the admin API with it as a bearer token.",
                token.len(),
                MAX_COOKIE_BYTES - (set.len() - token.len())
            ),
        );
    }
    let response = if json {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Redirect::to("/ops").into_response()
    };
    with_cookie(response, &set)
}

/// The largest cookie every browser keeps (RFC 6265 §6.1: at least 4,096 bytes of name, value
/// and attributes).
const MAX_COOKIE_BYTES: usize = 4096;

/// A login in neither JSON nor a form: 415 (RFC 9110 §15.5.16), as a problem document.
fn unsupported_login_type() -> Response {
    ApiError(Error::client(
        ErrorKind::UnsupportedMediaType,
        "INVALID_CONTENT_TYPE",
        "send the token as JSON or as an application/x-www-form-urlencoded form",
    ))
    .into_response()
}

/// Ends the session.
async fn logout(headers: HeaderMap) -> Response {
    if let Err(err) = crate::extract::same_origin(&headers) {
        return ApiError(err).into_response();
    }
    with_cookie(Redirect::to("/ops").into_response(), &clear_cookie())
}

/// Ends the cookie (a `Secure` one too: only a page reached over HTTPS had it, and from there
/// any `Set-Cookie` of the name replaces it, RFC 6265bis §5.7).
fn clear_cookie() -> String {
    format!("{ADMIN_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Whether the browser reached the dashboard over HTTPS: its `Origin` says so (sent with every
/// form or script POST), or the TLS-terminating proxy in front does (`X-Forwarded-Proto`). The
/// session cookie is then `Secure` (RFC 6265 §4.1.2.5), so a browser never sends the admin token
/// over plain HTTP, as to a link or a redirect to `http://` on the same host would have it do.
/// Over plain HTTP (a local development setup) it cannot be, or the browser would drop it.
fn over_https(headers: &HeaderMap) -> bool {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|p| p.to_str().ok())
        .and_then(|p| p.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    origin || forwarded
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    match HeaderValue::from_str(cookie) {
        Ok(v) => {
            response.headers_mut().append(header::SET_COOKIE, v);
            response
        }
        Err(_) => Problem::new(
            400,
            "Bad Request",
            "INVALID_TOKEN",
            "the token cannot be kept in a cookie",
        )
        .into_response(),
    }
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| {
            format!(
                r#"<p class="error" role="alert" data-testid="login-error">{}</p>"#,
                escape(e)
            )
        })
        .unwrap_or_default();
    page(status, LOGIN_HTML.replace("<!--error-->", &error))
}

fn page(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it a browser sends `Origin: null` with the page's own form posts
    // and fetches, and over plain HTTP (no `Sec-Fetch-Site` either) they could not be told from
    // another site's. `same-origin` names the origin to itself only.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// --- Overview ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct OverviewParams {
    /// An order still in flight whose last change is older than this counts as stuck: a whole
    /// number and a unit `ms`, `s` or `m` (none: seconds), e.g. `30s`, `5m`; at most 7 days;
    /// default 30s. Out of range or malformed: 400 `INVALID_DURATION`.
    #[param(schema_with = crate::openapi::query_duration_schema)]
    pub stuck_after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Orders per status; every status is present, 0 when none.
    pub funnel: BTreeMap<String, i64>,
    /// Every queue of the topology, from passive declares (empty when the broker is
    /// unreachable; see `brokerError`).
    pub queues: Vec<QueueStat>,
    /// Why `queues` is empty, when the broker could not be asked.
    pub broker_error: Option<String>,
    pub outbox: OutboxLag,
    pub dead_letters: DeadLetterCount,
    /// Orders not CONFIRMED or CANCELLED whose last change is older than `stuckAfterSeconds`.
    pub stuck: i64,
    pub stuck_after_seconds: f64,
    pub generated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxLag {
    /// Outbox rows the relay has yet to publish (parked ones not included).
    pub unsent: i64,
    /// Age of the oldest of those; null when everything is sent.
    pub oldest_unsent_age_seconds: Option<f64>,
    /// Rows the broker kept refusing, parked for an operator (`/api/admin/outbox/parked`).
    pub parked: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterCount {
    /// Dead letters not yet replayed or discarded.
    pub new: i64,
}

/// The pipeline at a glance: orders per state, queue depths and consumers, outbox lag, new
/// dead letters and stuck orders. Never fails because of the broker: when it cannot be
/// reached, `queues` is empty and `brokerError` says why.
#[utoipa::path(get, path = "/api/admin/overview", operation_id = "getOverview", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(OverviewParams), responses(
    (status = 200, description = "the pipeline now", body = Overview),
    (status = 400, description = "INVALID_DURATION or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn overview(
    State(state): State<AppState>,
    _admin: Admin,
    Query(params): Query<OverviewParams>,
) -> ApiResult<Json<Overview>> {
    let stuck_after = match params.stuck_after.as_deref() {
        Some(d) => query_duration(d)?,
        None => Duration::from_secs(30),
    };
    let (db, queues) = tokio::join!(overview_counts(&state, stuck_after), state.queues.read());
    let (funnel, counts) = db?;
    let (queues, broker_error) = match queues {
        Ok(queues) => (queues, None),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "queue statistics unavailable");
            (Vec::new(), Some(format!("{err:#}")))
        }
    };
    Ok(Json(Overview {
        funnel,
        queues,
        broker_error,
        outbox: OutboxLag {
            unsent: counts.unsent,
            oldest_unsent_age_seconds: counts.oldest_unsent_age_seconds,
            parked: counts.parked,
        },
        dead_letters: DeadLetterCount { new: counts.new_dead },
        stuck: counts.stuck,
        stuck_after_seconds: stuck_after.as_secs_f64(),
        generated_at: Utc::now(),
    }))
}

#[derive(sqlx::FromRow)]
struct Counts {
    unsent: i64,
    oldest_unsent_age_seconds: Option<f64>,
    parked: i64,
    new_dead: i64,
    stuck: i64,
}

async fn overview_counts(state: &AppState, stuck_after: Duration) -> ApiResult<(BTreeMap<String, i64>, Counts)> {
    let funnel: BTreeMap<String, i64> = (state.orders.read(&state.pool).await?)
        .into_iter()
        .map(|(status, n)| (status.as_str().to_owned(), n))
        .collect();
    let mut conn = state.pool.acquire().await?;
    // Each count reads a partial or status index: unsent outbox rows, NEW dead letters and
    // orders still in flight are few however large the tables grow.
    let counts: Counts = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL) AS unsent,
                (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox
                    WHERE sent_at IS NULL AND parked_at IS NULL) AS oldest_unsent_age_seconds,
                (SELECT count(*) FROM outbox
                    WHERE parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL) AS parked,
                (SELECT count(*) FROM dead_letters WHERE status = 'NEW') AS new_dead,
                (SELECT count(*) FROM orders WHERE in_flight
                    AND updated_at < now() - $1 * interval '1 millisecond') AS stuck",
    )
    .bind(stuck_after.as_millis() as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok((funnel, counts))
}

// --- Timeline ---------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    pub order: TimelineOrder,
    /// Every status change, oldest first.
    pub history: Vec<StatusChange>,
    /// Every message sent about the order (outbox rows, oldest first) and who handled it.
    pub messages: Vec<MessageHop>,
    /// Dead letters of the order's messages, oldest first.
    pub dead_letters: Vec<DeadLetterView>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct StatusChange {
    pub from: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageHop {
    pub message_id: Uuid,
    /// stock.reserve, payment.charge, order.confirmed, ...
    pub message_type: String,
    pub exchange: String,
    pub routing_key: String,
    /// A compensation: stock.release, coupon.restore, payment.refund, order.finish-cancel.
    pub compensation: bool,
    /// Sent again by an operator's dead-letter replay (same message id as an earlier hop).
    pub replay: bool,
    /// When the transaction that decided to send it committed its outbox row.
    pub created_at: DateTime<Utc>,
    /// When the relay published it (null: not yet).
    pub sent_at: Option<DateTime<Utc>>,
    /// Each consumer that processed it (its inbox record), in order.
    pub handled_by: Vec<Handling>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Handling {
    /// The worker: stock, coupon, payment, order, recovery.
    pub consumer: String,
    pub processed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct OutboxHop {
    message_id: Uuid,
    message_type: String,
    exchange: String,
    routing_key: String,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct InboxRow {
    consumer: String,
    message_id: Uuid,
    processed_at: DateTime<Utc>,
}

/// The dead letters about order `$1`: named alone (`order_id`, also every letter an earlier
/// release recorded) or in a batch (`order_ids`, by its GIN index), oldest first.
pub const DEAD_LETTERS_OF_ORDER: &str =
    "SELECT * FROM dead_letters WHERE order_id = $1 OR order_ids @> ARRAY[$1]::uuid[] ORDER BY id";

/// One order's life: its statuses with times, every message hop (when it was decided, when
/// the relay published it, which worker handled it when), which hops were compensations, and
/// its dead letters.
#[utoipa::path(get, path = "/api/admin/orders/{id}/timeline", operation_id = "getOrderTimeline", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = Uuid, Path, description = "the order id")), responses(
    (status = 200, description = "the order's life so far", body = Timeline),
    (status = 400, description = "INVALID_PATH: the id is not a UUID", body = Problem, content_type = PROBLEM),
    (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn timeline(State(state): State<AppState>, _admin: Admin, Path(id): Path<Uuid>) -> ApiResult<Json<Timeline>> {
    let mut conn = state.pool.acquire().await?;
    let order: OrderRow = sqlx::query_as("SELECT * FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist")))?;
    let items = orders::items(&mut conn, id).await?;
    let history: Vec<StatusChange> = sqlx::query_as(
        "SELECT from_status AS \"from\", to_status AS status, reason, at
         FROM order_status_history WHERE order_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let hops: Vec<OutboxHop> = sqlx::query_as(
        "SELECT message_id, message_type, exchange, routing_key, created_at, sent_at
         FROM outbox WHERE order_ids @> ARRAY[$1]::uuid[] ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let message_ids: Vec<Uuid> = hops.iter().map(|h| h.message_id).collect();
    // The inbox is keyed (consumer, message_id) and has no index on message_id alone: find
    // the few distinct consumers by skipping through the primary key (a loose index scan),
    // then probe the key with both arrays, instead of scanning every message ever processed.
    let inbox: Vec<InboxRow> = sqlx::query_as(
        "WITH RECURSIVE consumers(name) AS (
             (SELECT consumer FROM inbox ORDER BY consumer LIMIT 1)
             UNION ALL
             SELECT (SELECT consumer FROM inbox WHERE consumer > c.name ORDER BY consumer LIMIT 1)
             FROM consumers c WHERE c.name IS NOT NULL
         )
         SELECT consumer, message_id, processed_at FROM inbox
         WHERE consumer = ANY(ARRAY(SELECT name FROM consumers WHERE name IS NOT NULL))
           AND message_id = ANY($1)
         ORDER BY processed_at, consumer",
    )
    .bind(&message_ids)
    .fetch_all(&mut *conn)
    .await?;
    let dead_letters: Vec<DeadLetterView> = sqlx::query_as(DEAD_LETTERS_OF_ORDER)
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;

    let mut seen = std::collections::HashSet::new();
    let messages = hops
        .into_iter()
        .map(|hop| MessageHop {
            compensation: MessageType::parse(&hop.message_type).is_some_and(MessageType::is_compensation),
            replay: !seen.insert(hop.message_id),
            handled_by: inbox
                .iter()
                .filter(|i| i.message_id == hop.message_id)
                .map(|i| Handling {
                    consumer: i.consumer.clone(),
                    processed_at: i.processed_at,
                })
                .collect(),
            message_id: hop.message_id,
            message_type: hop.message_type,
            exchange: hop.exchange,
            routing_key: hop.routing_key,
            created_at: hop.created_at,
            sent_at: hop.sent_at,
        })
        .collect();
    let dead_letters = dead_letters.into_iter().map(DeadLetterView::with_text).collect();
    Ok(Json(Timeline {
        order: TimelineOrder {
            order: OrderSummary::from(&order),
            holdings: OrderHoldings::from(&order),
            items: views::items(items),
        },
        history,
        messages,
        dead_letters,
    }))
}
