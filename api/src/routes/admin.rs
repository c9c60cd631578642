//! Operator routes (admin token): find stuck orders and cancel them, retry a parked
//! compensation, inspect, replay and discard dead letters.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use orderflow_shared::{
    Error,
    config::query_duration,
    db::{
        dead_letters,
        orders::{self, OrderRow},
        outbox,
        stored_json::StoredJson,
    },
    domain::{CancelReason, OrderStatus},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    AppState,
    extract::{Admin, Json, Path, Query},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
    views::AdminOrder,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/orders", get(list_orders))
        .route("/api/admin/orders/{id}/cancel", post(cancel_order))
        .route("/api/admin/orders/{id}/retry", post(retry_compensation))
        .route("/api/admin/dead-letters", get(list_dead_letters))
        .route(
            "/api/admin/dead-letters/{id}",
            get(show_dead_letter).delete(discard_dead_letter),
        )
        .route("/api/admin/dead-letters/{id}/replay", post(replay_dead_letter))
        .route("/api/admin/outbox/parked", get(list_parked))
        .route("/api/admin/outbox/{id}", axum::routing::delete(discard_parked))
        .route("/api/admin/outbox/{id}/retry", post(retry_parked))
}

const PROBLEM: &str = "application/problem+json";

/// The filters of `GET /api/admin/orders` (paging is [`PageParams`]).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct OrderFilter {
    /// Only orders in this state.
    #[param(value_type = Option<OrderStatus>)]
    pub status: Option<String>,
    /// Only orders last changed longer ago than this: a whole number and a unit `ms`, `s` or
    /// `m` (none: seconds), e.g. `30s`, `5m`; at most 7 days. Out of range or malformed: 400
    /// `INVALID_DURATION`.
    #[param(schema_with = crate::openapi::query_duration_schema)]
    pub older_than: Option<String>,
    /// Only orders still in flight (not CONFIRMED or CANCELLED).
    #[serde(default)]
    pub stuck: bool,
}

/// The statements of `GET /api/admin/orders`: a page (`$3` rows from row `$4`, oldest change
/// first) and the count, over `$1` (a status or NULL) and `$2` (an age in milliseconds or
/// NULL). `in_flight`: only orders in flight (stuck ones, or a status that is not terminal),
/// read through the in-flight index, whose predicate a statement must name as it is
/// (`in_flight`, migration 104) for any plan, generic ones included, to use it: ended orders
/// are then not read at all, however many there are. (A B-tree on `updated_at` would give the
/// listing's order, but every status change would stop being a heap-only update.)
pub fn order_listing(in_flight: bool) -> (String, String) {
    let filter = format!(
        "($1::text IS NULL OR status = $1)
          AND ($2::float8 IS NULL OR updated_at < now() - $2 * interval '1 millisecond')
          AND {}",
        if in_flight { "in_flight" } else { "true" }
    );
    (
        format!("SELECT * FROM orders WHERE {filter} ORDER BY updated_at, id LIMIT $3 OFFSET $4"),
        format!("SELECT count(*) FROM orders WHERE {filter}"),
    )
}

/// Orders by state and age, oldest change first: where to look for stuck ones.
#[utoipa::path(get, path = "/api/admin/orders", operation_id = "listAdminOrders", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), params(OrderFilter, PageParams), responses(
    (status = 200, description = "a page of orders", body = Page<AdminOrder>,
        links(
            ("getOrderTimeline" = (operation_id = "getOrderTimeline", parameters(("id" = "$response.body#/items/0/orderId")))),
            ("cancelOrder" = (operation_id = "cancelOrder", parameters(("id" = "$response.body#/items/0/orderId")))),
            ("retryCompensation" = (operation_id = "retryCompensation", parameters(("id" = "$response.body#/items/0/orderId")))),
        )),
    (status = 400, description = "INVALID_STATUS, INVALID_DURATION, INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn list_orders(
    State(state): State<AppState>,
    _admin: Admin,
    Query(filter): Query<OrderFilter>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<AdminOrder>>> {
    let (limit, offset) = page.limit_offset()?;
    let status = match filter.status.as_deref() {
        Some(s) => Some(
            OrderStatus::parse(s)
                .ok_or_else(|| Error::bad_request("INVALID_STATUS", format!("{s:?} is not an order status")))?
                .as_str(),
        ),
        None => None,
    };
    // At most 7 days in milliseconds: exact in an f64, and far inside PostgreSQL's range.
    let older_ms = match filter.older_than.as_deref() {
        Some(d) => Some(query_duration(d)?.as_millis() as f64),
        None => None,
    };
    let in_flight = filter.stuck || status.and_then(OrderStatus::parse).is_some_and(|s| !s.is_terminal());
    let (page_sql, count_sql) = order_listing(in_flight);
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(page_sql))
        .bind(status)
        .bind(older_ms)
        .bind(limit)
        .bind(offset)
        .fetch_all(&state.pool)
        .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count_sql))
        .bind(status)
        .bind(older_ms)
        .fetch_one(&state.pool)
        .await?;
    let users: Vec<i64> = rows.iter().map(|o| o.user_id).collect();
    let identities = crate::auth::identities::Identities::of(&state.pool, &users).await?;
    let orders = rows
        .iter()
        .map(|o| AdminOrder {
            identity: identities.get(&o.user_id).cloned(),
            ..AdminOrder::from(o)
        })
        .collect();
    Ok(Json(Page::new(orders, page, total)))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderAction {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
}

/// Cancel an in-flight order (ADMIN_CANCELLED); its compensations run as for any failure.
/// The answer is CANCELLING, or CANCELLED at once when the order held nothing yet.
#[utoipa::path(post, path = "/api/admin/orders/{id}/cancel", operation_id = "cancelOrder", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = Uuid, Path, description = "the order id")), responses(
    (status = 202, description = "moved to CANCELLING (or CANCELLED at once when it held nothing)", body = OrderAction,
        links(("getOrderTimeline" = (operation_id = "getOrderTimeline", parameters(("id" = "$request.path.id")))))),
    (status = 400, description = "INVALID_PATH: the id is not a UUID", body = Problem, content_type = PROBLEM),
    (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "ORDER_NOT_CANCELLABLE: already confirmed, cancelled or cancelling", body = Problem, content_type = PROBLEM),
))]
pub async fn cancel_order(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<OrderAction>)> {
    let mut tx = state.pool.begin().await?;
    let Some(status) = orders::cancel(&mut tx, id, CancelReason::AdminCancelled).await? else {
        return Err(not_actionable(
            &mut tx,
            id,
            "ORDER_NOT_CANCELLABLE",
            "only an order still in flight can be cancelled",
        )
        .await);
    };
    tx.commit().await?;
    outbox::committed();
    tracing::info!(order_id = %id, by = %admin.0.describe_as_actor(), "an operator cancelled an order");
    Ok((StatusCode::ACCEPTED, Json(OrderAction { order_id: id, status })))
}

/// Retry the compensations of an order parked as COMPENSATION_FAILED.
#[utoipa::path(post, path = "/api/admin/orders/{id}/retry", operation_id = "retryCompensation", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = Uuid, Path, description = "the order id")), responses(
    (status = 202, description = "moved back to CANCELLING; the compensations it still needs are sent again", body = OrderAction),
    (status = 400, description = "INVALID_PATH: the id is not a UUID", body = Problem, content_type = PROBLEM),
    (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "ORDER_NOT_RETRYABLE: not COMPENSATION_FAILED", body = Problem, content_type = PROBLEM),
))]
pub async fn retry_compensation(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<OrderAction>)> {
    let mut tx = state.pool.begin().await?;
    let Some(order) = orders::lock(&mut tx, id, &[OrderStatus::CompensationFailed]).await? else {
        return Err(not_actionable(
            &mut tx,
            id,
            "ORDER_NOT_RETRYABLE",
            "only a COMPENSATION_FAILED order can be retried",
        )
        .await);
    };
    let mut moves = orders::Transitions::new();
    moves.reopen(order, OrderStatus::Cancelling);
    moves.apply(&mut tx).await?;
    tx.commit().await?;
    outbox::committed();
    tracing::info!(order_id = %id, by = %admin.0.describe_as_actor(), "an operator retried an order's compensations");
    Ok((
        StatusCode::ACCEPTED,
        Json(OrderAction {
            order_id: id,
            status: OrderStatus::Cancelling,
        }),
    ))
}

/// 404 when the order does not exist, else a 409 with `code`.
async fn not_actionable(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    code: &'static str,
    detail: &str,
) -> crate::problem::ApiError {
    match sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
    {
        Ok(Some(status)) => Error::conflict(code, format!("{detail}; it is {status}")).into(),
        Ok(None) => Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist")).into(),
        Err(e) => e.into(),
    }
}

/// The filter of `GET /api/admin/dead-letters` (paging is [`PageParams`]).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterFilter {
    /// Which dead letters: NEW (the default), REPLAYED, DISCARDED or ALL.
    #[param(value_type = Option<DeadLetterStatusFilter>)]
    pub status: Option<String>,
    /// Only the letters of this failure group (`GET /api/admin/failure-groups`; 32 lowercase
    /// hex digits, else 400 `INVALID_GROUP`).
    #[param(pattern = "^[0-9a-f]{32}$")]
    pub group: Option<String>,
}

/// The values of `status` in `GET /api/admin/dead-letters`.
#[derive(Debug, ToSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum DeadLetterStatusFilter {
    NEW,
    REPLAYED,
    DISCARDED,
    ALL,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: i64,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    /// The order, when the message was about one.
    pub order_id: Option<Uuid>,
    /// Every order the message named (a command may name several).
    pub order_ids: Vec<Uuid>,
    pub source_queue: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    /// delivery_limit, rejected or expired.
    pub reason: Option<String>,
    pub death_count: i64,
    /// The AMQP headers as JSON; values JSON cannot hold as they are appear as one-key
    /// objects: `{"$bytes": "<hex>"}` (NUL, invalid UTF-8, byte arrays), `{"$decimal": ...}`,
    /// `{"$timestamp": seconds}`, `{"$float": "NaN"}`; a table or array nested past 32 levels
    /// as `{"$amqp": "<hex of its AMQP encoding>"}`. Headers stored by an older release that
    /// are too deep to parse come whole as text: `{"$json": "<text>"}`.
    #[schema(value_type = Object)]
    pub headers: StoredJson,
    /// The body as text (invalid UTF-8 replaced).
    #[sqlx(skip)]
    pub body: String,
    #[serde(skip)]
    #[sqlx(rename = "body")]
    pub raw_body: Vec<u8>,
    pub dead_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    /// NEW, REPLAYED or DISCARDED.
    pub status: String,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Who replayed or discarded it: `admin:<user id>` (with the identity provider's
    /// `issuer#sub` for its users).
    pub resolved_by: Option<String>,
    /// The bulk action that replayed or discarded it, if one did.
    pub bulk_action_id: Option<i64>,
    /// The error its consumer last failed it with, when the consumer said (the broker only
    /// says `delivery_limit` or `rejected`).
    pub error: Option<String>,
    /// Its failure group (`GET /api/admin/failure-groups`).
    pub failure_group: Option<String>,
    /// How often its message had been replayed before this death.
    pub previous_replays: i32,
}

impl DeadLetterView {
    /// Fills `body` from the stored bytes.
    pub(crate) fn with_text(mut self) -> Self {
        self.body = String::from_utf8_lossy(&self.raw_body).into_owned();
        self
    }
}

/// Dead letters, newest first.
#[utoipa::path(get, path = "/api/admin/dead-letters", operation_id = "listDeadLetters", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), params(DeadLetterFilter, PageParams), responses(
    (status = 200, description = "a page of dead letters", body = Page<DeadLetterView>,
        links(
            ("getDeadLetter" = (operation_id = "getDeadLetter", parameters(("id" = "$response.body#/items/0/id")))),
            ("replayDeadLetter" = (operation_id = "replayDeadLetter", parameters(("id" = "$response.body#/items/0/id")))),
            ("discardDeadLetter" = (operation_id = "discardDeadLetter", parameters(("id" = "$response.body#/items/0/id")))),
        )),
    (status = 400, description = "INVALID_STATUS, INVALID_GROUP, INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    Query(filter): Query<DeadLetterFilter>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<DeadLetterView>>> {
    let (limit, offset) = page.limit_offset()?;
    let status = letter_status(filter.status.as_deref())?;
    let group = crate::routes::incidents::group_id(filter.group.as_deref())?;
    const WHERE: &str = "($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR failure_group = $2)";
    let rows: Vec<DeadLetterView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM dead_letters WHERE {WHERE} ORDER BY id DESC LIMIT $3 OFFSET $4"
    )))
    .bind(&status)
    .bind(&group)
    .bind(limit)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM dead_letters WHERE {WHERE}"
    )))
    .bind(&status)
    .bind(&group)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(Page::new(
        rows.into_iter().map(DeadLetterView::with_text).collect(),
        page,
        total,
    )))
}

/// A letter status filter: NEW (the default), REPLAYED, DISCARDED, or ALL (None); else 400
/// `INVALID_STATUS`.
pub(crate) fn letter_status(asked: Option<&str>) -> Result<Option<String>, Error> {
    match asked.unwrap_or("NEW") {
        "ALL" => Ok(None),
        s @ ("NEW" | "REPLAYED" | "DISCARDED") => Ok(Some(s.to_owned())),
        other => Err(Error::bad_request(
            "INVALID_STATUS",
            format!("{other:?} is not NEW, REPLAYED, DISCARDED or ALL"),
        )),
    }
}

async fn find_dead_letter(conn: &mut sqlx::PgConnection, id: i64) -> Result<DeadLetterView, Error> {
    let row: Option<DeadLetterView> = sqlx::query_as("SELECT * FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(DeadLetterView::with_text)
        .ok_or_else(|| dead_letters::not_found(id))
}

/// One dead letter with its headers and body.
#[utoipa::path(get, path = "/api/admin/dead-letters/{id}", operation_id = "getDeadLetter", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the dead letter's id")), responses(
    (status = 200, description = "the dead letter", body = DeadLetterView),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "DEAD_LETTER_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn show_dead_letter(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
) -> ApiResult<Json<DeadLetterView>> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(find_dead_letter(&mut conn, id).await?))
}

/// Publish a dead letter again to the queue it died in (through the default exchange, so it
/// reaches that queue whatever exchange first carried it), with its original message id and
/// body bytes (consumers' inboxes keep the replay idempotent). Only a NEW dead letter whose
/// body is JSON and whose destination exists now can be replayed: the broker is asked when
/// the operator asks.
#[utoipa::path(post, path = "/api/admin/dead-letters/{id}/replay", operation_id = "replayDeadLetter", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the dead letter's id")), responses(
    (status = 202, description = "published again (through the outbox); the dead letter is now REPLAYED", body = DeadLetterView),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "DEAD_LETTER_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "DEAD_LETTER_RESOLVED, or DEAD_LETTER_NOT_REPLAYABLE: its queue (or exchange) does not exist or does not route its routing key", body = Problem, content_type = PROBLEM),
    (status = 503, description = "BROKER_UNAVAILABLE: the broker could not be asked", body = Problem, content_type = PROBLEM),
))]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<DeadLetterView>)> {
    let mut tx = state.pool.begin().await?;
    let letter = dead_letters::lock_new(&mut tx, id).await?;
    let mut destinations = dead_letters::Destinations::new(&state.config.amqp_url);
    dead_letters::replay(&mut tx, &letter, &mut destinations, &admin.0.describe_as_actor(), None).await?;
    let letter = find_dead_letter(&mut tx, id).await?;
    tx.commit().await?;
    outbox::committed();
    Ok((StatusCode::ACCEPTED, Json(letter)))
}

/// Discard a dead letter (kept, marked DISCARDED, for the record).
#[utoipa::path(delete, path = "/api/admin/dead-letters/{id}", operation_id = "discardDeadLetter", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the dead letter's id")), responses(
    (status = 204, description = "discarded (kept, marked DISCARDED)"),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "DEAD_LETTER_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "DEAD_LETTER_RESOLVED", body = Problem, content_type = PROBLEM),
))]
pub async fn discard_dead_letter(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    let mut tx = state.pool.begin().await?;
    dead_letters::lock_new(&mut tx, id).await?;
    dead_letters::resolve(&mut tx, &[id], "DISCARDED", &admin.0.describe_as_actor(), None).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- Parked outbox rows -------------------------------------------------------------------------

/// An outbox row the relay parked after the broker refused it [`relay::MAX_ATTEMPTS`] times
/// (no such exchange, unroutable, channel closed over it) or nacked it
/// [`relay::MAX_NACKED_ATTEMPTS`] times (retried every 5 s at most: about ten minutes of "not now"),
/// or at once when it cannot be put on the wire at all (a type, header name, exchange or
/// routing key over AMQP's 255-byte limit, as a replayed dead letter may carry). The rows
/// behind it kept flowing; it waits here for an operator.
///
/// [`relay::MAX_ATTEMPTS`]: ../../orderflow_workers/relay/constant.MAX_ATTEMPTS.html
/// [`relay::MAX_NACKED_ATTEMPTS`]: ../../orderflow_workers/relay/constant.MAX_NACKED_ATTEMPTS.html
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    pub id: i64,
    pub message_id: Uuid,
    /// stock.reserve, order.confirmed, ... (or whatever a replayed dead letter said).
    pub message_type: String,
    pub exchange: String,
    pub routing_key: String,
    pub order_ids: Vec<Uuid>,
    /// Publishes the broker refused.
    pub attempts: i32,
    /// The broker's last refusal.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub parked_at: Option<DateTime<Utc>>,
    /// The body as text (invalid UTF-8 replaced).
    #[sqlx(skip)]
    pub body: String,
    #[serde(skip)]
    #[sqlx(rename = "body")]
    pub raw_body: Vec<u8>,
}

impl ParkedMessage {
    fn with_text(mut self) -> Self {
        self.body = String::from_utf8_lossy(&self.raw_body).into_owned();
        self
    }
}

const PARKED: &str = "parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL";

/// Outbox rows parked by the relay, oldest first.
#[utoipa::path(get, path = "/api/admin/outbox/parked", tag = "admin", security(("bearer" = []), ("admin_cookie" = [])), params(PageParams), responses(
    (status = 200, body = Page<ParkedMessage>),
    (status = 400, body = Problem, content_type = PROBLEM),
    (status = 401, body = Problem, content_type = PROBLEM),
    (status = 403, body = Problem, content_type = PROBLEM),
))]
pub async fn list_parked(
    State(state): State<AppState>,
    _admin: Admin,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<ParkedMessage>>> {
    let (limit, offset) = page.limit_offset()?;
    let rows: Vec<ParkedMessage> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM outbox WHERE {PARKED} ORDER BY id LIMIT $1 OFFSET $2"
    )))
    .bind(limit)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox WHERE {PARKED}"
    )))
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(Page::new(
        rows.into_iter().map(ParkedMessage::with_text).collect(),
        page,
        total,
    )))
}

/// Publish a parked row again: it goes back to the relay with its attempts reset.
#[utoipa::path(post, path = "/api/admin/outbox/{id}/retry", tag = "admin", security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path)), responses(
    (status = 202, body = ParkedMessage),
    (status = 401, body = Problem, content_type = PROBLEM),
    (status = 403, body = Problem, content_type = PROBLEM),
    (status = 404, description = "OUTBOX_MESSAGE_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "OUTBOX_MESSAGE_NOT_PARKED: published, waiting for the relay, or discarded", body = Problem, content_type = PROBLEM),
))]
pub async fn retry_parked(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<ParkedMessage>)> {
    let row: Option<ParkedMessage> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE outbox SET parked_at = NULL, retry_at = NULL, attempts = 0 WHERE id = $1 AND {PARKED} RETURNING *"
    )))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    let Some(row) = row else {
        return Err(not_parked(&state, id).await.into());
    };
    outbox::committed();
    tracing::info!(outbox_id = id, by = %admin.0.describe_as_actor(), "an operator retried a parked message");
    Ok((StatusCode::ACCEPTED, Json(row.with_text())))
}

/// Give up on a parked row: it is kept, marked discarded, and never published. (The orders
/// it would have moved are cancelled at their deadline.)
#[utoipa::path(delete, path = "/api/admin/outbox/{id}", tag = "admin", security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path)), responses(
    (status = 204, description = "discarded"),
    (status = 401, body = Problem, content_type = PROBLEM),
    (status = 403, body = Problem, content_type = PROBLEM),
    (status = 404, description = "OUTBOX_MESSAGE_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "OUTBOX_MESSAGE_NOT_PARKED", body = Problem, content_type = PROBLEM),
))]
pub async fn discard_parked(State(state): State<AppState>, admin: Admin, Path(id): Path<i64>) -> ApiResult<StatusCode> {
    let discarded = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE outbox SET discarded_at = now() WHERE id = $1 AND {PARKED}"
    )))
    .bind(id)
    .execute(&state.pool)
    .await?
    .rows_affected();
    if discarded == 0 {
        return Err(not_parked(&state, id).await.into());
    }
    tracing::info!(outbox_id = id, by = %admin.0.describe_as_actor(), "an operator discarded a parked message");
    Ok(StatusCode::NO_CONTENT)
}

/// 404 for no such row, else 409.
async fn not_parked(state: &AppState, id: i64) -> Error {
    match sqlx::query_scalar::<_, i64>("SELECT id FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await
    {
        Ok(Some(_)) => Error::conflict(
            "OUTBOX_MESSAGE_NOT_PARKED",
            format!("outbox message {id} is not parked (published, pending or discarded)"),
        ),
        Ok(None) => Error::not_found(
            "OUTBOX_MESSAGE_NOT_FOUND",
            format!("outbox message {id} does not exist"),
        ),
        Err(err) => err.into(),
    }
}
