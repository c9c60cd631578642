//! Orders: accept at once as PENDING (group commit, `crate::accept`: the order, its items,
//! first history row and idempotency record, and the messages that start the pipeline and its
//! deadline, in a transaction shared with the requests that arrived together), then read their
//! progress.
//! Also the popular-products view, counted when orders are confirmed.

use std::collections::HashSet;

use axum::{
    Extension, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use orderflow_shared::{
    Error,
    db::orders::{self, OwnerCancel},
    domain::{CancelReason, MAX_LINE_QUANTITY, MAX_ORDER_LINES, OrderStatus},
    telemetry::{self, TraceParent},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState, accept,
    admission::Turn,
    extract::{IdempotencyKey, Json, Path, Query, User},
    idempotency::{self, Claim, Claimed},
    page::{self, PageMaybeCounted, PageParams},
    problem::{ApiResult, Problem},
    views::{self, HistoryView, OrderSummary, OrderView},
    wait::{self, Until},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/orders", get(list).post(place))
        .route("/api/orders/{id}", get(show))
        .route("/api/orders/{id}/cancel", post(cancel))
        .route("/api/products/popular", get(popular))
}

const PROBLEM: &str = "application/problem+json";

/// An order: 1..=50 lines, each product at most once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    /// 1..=50 lines; a product on two lines is 422 `DUPLICATE_ORDER_LINE`.
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<NewItem>,
    /// A coupon the caller holds (checked by the coupon worker: one it does not hold cancels
    /// the order with COUPON_INVALID).
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub coupon_id: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewItem {
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    #[serde(deserialize_with = "crate::json::int")]
    pub product_id: i64,
    /// Units, 1..=1,000.
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub quantity: i32,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct PopularProduct {
    pub product_id: i64,
    pub name: String,
    pub price: i64,
    /// Units in CONFIRMED orders over the last 72 hours.
    pub quantity: i64,
}

/// Place an order. It is accepted at once as PENDING and carried through stock, coupon and
/// payment asynchronously; poll `Location` (or stream its events) for its status, or send
/// `Prefer: wait=N` (RFC 7240, N seconds, at most 30) to be answered 201 with the whole order as
/// soon as it is CONFIRMED or CANCELLED, or the usual 202 once N seconds passed.
#[utoipa::path(post, path = "/api/orders", operation_id = "placeOrder", tag = "orders", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, pattern = r#"^(?:[!#-~]{1,255}|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$"#,
        description = "required: 1..=255 visible ASCII characters other than `\"`, optionally in double quotes. \
                       A retry with the same key and body replays the first response (with `Prefer: wait`, \
                       the order as it is now)"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240 §4.3, N whole seconds, at most 30): hold \
                       the answer until the order is CONFIRMED or CANCELLED, or N seconds passed")),
    request_body = NewOrder,
    responses(
        (status = 201, description = "with `Prefer: wait`: the order, done within the wait", body = OrderView,
            headers(("Location" = String, description = "/api/orders/{orderId}"),
                ("Preference-Applied" = String, description = "wait=N (RFC 7240 §3)"))),
        (status = 202, description = "accepted; PENDING (or, after a wait, the status it has reached)", body = Accepted,
            headers(("Location" = String, description = "/api/orders/{orderId}"),
                ("Preference-Applied" = Option<String>, description = "wait=N when the request waited (RFC 7240 §3)")),
            links(
                ("getOrder" = (operation_id = "getOrder", parameters(("id" = "$response.body#/orderId")))),
                ("streamOrderEvents" = (operation_id = "streamOrderEvents", parameters(("id" = "$response.body#/orderId")))),
                ("getOrderTimeline" = (operation_id = "getOrderTimeline", parameters(("id" = "$response.body#/orderId")))),
                ("cancelMyOrder" = (operation_id = "cancelMyOrder", parameters(("id" = "$response.body#/orderId")))),
            )),
        (status = 400, description = "IDEMPOTENCY_KEY_REQUIRED, INVALID_IDEMPOTENCY_KEY, INVALID_ORDER, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
        (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = PROBLEM),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE: a request with this key is still being processed", body = Problem, content_type = PROBLEM),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used with another body; DUPLICATE_ORDER_LINE: a product on two lines", body = Problem, content_type = PROBLEM),
    ))]
pub async fn place(
    State(state): State<AppState>,
    user: User,
    key: IdempotencyKey,
    headers: HeaderMap,
    turn: Option<Extension<Turn>>,
    Json(req): Json<NewOrder>,
) -> ApiResult<Response> {
    let key = key.required()?;
    validate(&req)?;
    let wait = wait::preferred_wait(&headers);
    let request = accept::Request {
        claim: Claim {
            user_id: user.id(),
            scope: "orders.place",
            key,
            request: serde_json::to_value(&req).map_err(anyhow::Error::from)?,
        },
        lines: req.items.iter().map(|i| (i.product_id, i.quantity)).collect(),
        coupon_id: req.coupon_id,
        // The request's trace (continuing a caller's `traceparent`) becomes the order's trace.
        trace: telemetry::current().unwrap_or_else(TraceParent::new_root),
    };
    let order_id = match state.acceptor.accept(request).await? {
        accept::Accepted::Fresh { order_id, total } => {
            tracing::info!(order_id = %order_id, total, "order accepted");
            order_id
        }
        // A retry answers as the first request did; a retry that waits, with the order as it
        // is now.
        accept::Accepted::Replay(stored) => match (wait, stored.response["orderId"].as_str().map(str::parse)) {
            (Some(_), Some(Ok(order_id))) => order_id,
            _ => return Ok(stored.into_response()),
        },
    };
    let Some(wait) = wait else {
        return Ok(accepted(order_id, OrderStatus::Pending, None));
    };
    state
        .watcher
        .wait_turn(turn.as_deref(), order_id, Until::Terminal, wait, &state.shutdown)
        .await?;
    let order = view(&state, user, order_id).await?;
    if !order.order.status.is_terminal() {
        return Ok(accepted(order_id, order.order.status, Some(wait)));
    }
    let mut res = (StatusCode::CREATED, Json(order)).into_response();
    with_location(&mut res, order_id);
    res.headers_mut().insert("preference-applied", wait::applied(wait));
    Ok(res)
}

/// 202 with the order's id, its status and `Location`.
fn accepted(order_id: Uuid, status: OrderStatus, waited: Option<std::time::Duration>) -> Response {
    let mut res = (StatusCode::ACCEPTED, Json(Accepted { order_id, status })).into_response();
    with_location(&mut res, order_id);
    if let Some(wait) = waited {
        res.headers_mut().insert("preference-applied", wait::applied(wait));
    }
    res
}

fn with_location(res: &mut Response, order_id: Uuid) {
    super::set_location(res, &format!("/api/orders/{order_id}"));
}

/// The rules of the schema (lines, ids, quantities; 400 `INVALID_ORDER`), then the one rule a
/// schema cannot state: each product at most once (422 `DUPLICATE_ORDER_LINE`, RFC 9110
/// §15.5.21: well-formed, valid by the schema, and still not processable).
fn validate(req: &NewOrder) -> Result<(), Error> {
    let invalid = |detail: String| Err(Error::bad_request("INVALID_ORDER", detail));
    if req.items.is_empty() || req.items.len() > MAX_ORDER_LINES {
        return invalid(format!("an order has 1 to {MAX_ORDER_LINES} lines"));
    }
    for item in &req.items {
        if item.product_id <= 0 {
            return invalid(format!("productId {} is not a valid id", item.product_id));
        }
        if !(1..=MAX_LINE_QUANTITY).contains(&item.quantity) {
            return invalid(format!("quantity must be 1 to {MAX_LINE_QUANTITY}"));
        }
    }
    if req.coupon_id.is_some_and(|c| c <= 0) {
        return invalid("couponId is not a valid id".to_owned());
    }
    let mut seen = HashSet::new();
    for item in &req.items {
        if !seen.insert(item.product_id) {
            return Err(Error::unprocessable(
                "DUPLICATE_ORDER_LINE",
                format!("product {} appears on more than one line", item.product_id),
            ));
        }
    }
    Ok(())
}

/// One of the caller's orders, with its items and status history (another user's order is 404).
/// With `Prefer: wait=N` (RFC 7240, N seconds, at most 30) the answer waits until the order's
/// status changes (or N seconds pass); a terminal order is answered at once.
#[utoipa::path(get, path = "/api/orders/{id}", operation_id = "getOrder", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the order id"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240 §4.3, N whole seconds, at most 30): hold \
                       the answer until the order's status changes, or N seconds passed")),
    responses(
    (status = 200, description = "the order", body = OrderView,
        headers(("Preference-Applied" = Option<String>, description = "wait=N when the request waited (RFC 7240 §3)"))),
    (status = 400, description = "INVALID_PATH: the id is not a UUID", body = Problem, content_type = PROBLEM),
    (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn show(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    turn: Option<Extension<Turn>>,
) -> ApiResult<Response> {
    let order = view(&state, user.clone(), id).await?;
    let Some(wait) = wait::preferred_wait(&headers) else {
        return Ok(Json(order).into_response());
    };
    // A terminal order cannot change any more: no reason to hold the answer.
    let order = if order.order.status.is_terminal() {
        order
    } else {
        state
            .watcher
            .wait_turn(
                turn.as_deref(),
                id,
                Until::Leaves(order.order.status),
                wait,
                &state.shutdown,
            )
            .await?;
        view(&state, user, id).await?
    };
    let mut res = Json(order).into_response();
    res.headers_mut().insert("preference-applied", wait::applied(wait));
    Ok(res)
}

/// One of the user's orders as `GET /api/orders/{id}` shows it; 404 for another user's.
pub async fn view(state: &AppState, user: User, id: Uuid) -> Result<OrderView, Error> {
    let mut conn = state.pool.acquire().await?;
    read_view(&mut conn, id, user.id())
        .await?
        .ok_or_else(|| order_not_found(id))
}

/// Cancel one of the caller's orders while it is in flight (reason USER_CANCELLED). It gives
/// back everything it holds exactly as any cancellation does (refund, coupon, stock, each by
/// the worker that owns it); the answer is the order as `GET /api/orders/{id}` shows it, in
/// the transaction that cancelled it: CANCELLING, or CANCELLED at once when it held nothing
/// yet. A cancel that loses the race with the pipeline (the order worker confirmed the order
/// first) is answered 409 and changes nothing; a 202 means the order will end CANCELLED.
///
/// `Idempotency-Key` is optional: cancelling is idempotent in effect (a second cancel is a
/// 409 and changes nothing), and with a key a retry replays the first 202 instead
/// (`Idempotent-Replayed: true`); the key with another order is 422, while the first request
/// is in flight 409. Only a 202 is stored under the key.
#[utoipa::path(post, path = "/api/orders/{id}/cancel", operation_id = "cancelMyOrder", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the order id"),
           ("Idempotency-Key" = Option<String>, Header, pattern = r#"^(?:[!#-~]{1,255}|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$"#,
            description = "optional: 1..=255 visible ASCII characters other than `\"`, optionally in double quotes; \
                           a retry with the same key and order replays the first 202")),
    responses(
        (status = 202, description = "cancelled: CANCELLING (compensations running) or CANCELLED (it held nothing)", body = OrderView,
            headers(("Location" = String, description = "/api/orders/{id}"))),
        (status = 400, description = "INVALID_PATH: the id is not a UUID; INVALID_IDEMPOTENCY_KEY", body = Problem, content_type = PROBLEM),
        (status = 404, description = "ORDER_NOT_FOUND (also for another user's order)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "ORDER_NOT_CANCELLABLE: CONFIRMED, CANCELLED, CANCELLING or COMPENSATION_FAILED; IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = PROBLEM),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used to cancel another order", body = Problem, content_type = PROBLEM),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    user: User,
    key: IdempotencyKey,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    let claim = key.0.map(|key| Claim {
        user_id: user.id(),
        scope: "orders.cancel",
        key,
        request: serde_json::json!({ "orderId": id }),
    });
    let mut tx = state.pool.begin().await?;
    let result = async {
        if let Some(claim) = &claim
            && let Some(stored) = claim.begin(&mut tx).await?
        {
            return Ok(Claimed::Replay(stored));
        }
        match orders::cancel_owned(&mut tx, id, user.id(), CancelReason::UserCancelled).await? {
            OwnerCancel::Cancelled(status) => tracing::info!(order_id = %id, %status, "order cancelled by its owner"),
            OwnerCancel::NotCancellable(status) => {
                return Err(Error::conflict(
                    "ORDER_NOT_CANCELLABLE",
                    format!("order {id} is {status}; only an order still in flight can be cancelled"),
                ));
            }
            OwnerCancel::NotFound => return Err(order_not_found(id)),
        }
        let view = read_view(&mut tx, id, user.id())
            .await?
            .ok_or_else(|| order_not_found(id))?;
        let body = serde_json::to_value(&view).map_err(anyhow::Error::from)?;
        let location = format!("/api/orders/{id}");
        if let Some(claim) = &claim {
            let headers = serde_json::json!({ "location": location });
            claim.finish(&mut tx, StatusCode::ACCEPTED, &body, headers).await?;
        }
        Ok(Claimed::Fresh(super::accepted(body, &location)))
    }
    .await;
    idempotency::end(tx, result).await
}

fn order_not_found(id: Uuid) -> Error {
    Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist"))
}

/// Order `id` of user `user_id` as `GET /api/orders/{id}` shows it (None: no such order, or
/// another user's), read on `conn` (inside a transaction: as that transaction sees it).
pub async fn read_view(conn: &mut sqlx::PgConnection, id: Uuid, user_id: i64) -> Result<Option<OrderView>, Error> {
    let order: Option<orders::OrderRow> = sqlx::query_as("SELECT * FROM orders WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(order) = order else {
        return Ok(None);
    };
    let items = orders::items(conn, id).await?;
    let history: Vec<HistoryView> = sqlx::query_as(
        "SELECT to_status AS status, reason, at FROM order_status_history WHERE order_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(OrderView {
        order: OrderSummary::from(&order),
        items: views::items(items),
        history,
    }))
}

/// The caller's orders, newest first. `total` is exact; a client that only looks for its
/// newest orders (polling for their status) may send `Prefer: count=none` (RFC 7240 §2) to
/// leave it out (`Preference-Applied: count=none`) and save the server counting every order
/// the user ever placed; it then knows there is no further page when a page is not full.
#[utoipa::path(get, path = "/api/orders", operation_id = "listOrders", tag = "orders", security(("bearer" = [])),
    params(PageParams,
        ("Prefer" = Option<String>, Header, description = "`count=none` (RFC 7240 §2): leave `total` out")),
    responses(
    (status = 200, description = "a page of the caller's orders; without `total` when asked with `Prefer: count=none`",
        body = PageMaybeCounted<OrderSummary>,
        headers(("Preference-Applied" = String, description = "count=none when `total` was left out (RFC 7240 §3)"),
            ("Vary" = String, description = "Prefer: the body depends on it (RFC 7240 §2)")),
        links(("getOrder" = (operation_id = "getOrder", parameters(("id" = "$response.body#/items/0/orderId")))))),
    (status = 400, description = "INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn list(
    State(state): State<AppState>,
    user: User,
    Query(params): Query<PageParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (limit, offset) = params.limit_offset()?;
    let mut conn = state.pool.acquire().await?;
    // Every answer names `Prefer` in `Vary`, counted or not (RFC 7240 §2).
    let vary = |mut res: Response| {
        res.headers_mut()
            .append(header::VARY, HeaderValue::from_static("prefer"));
        res
    };
    if page::prefers_no_count(&headers) {
        let rows: Vec<orders::OrderRow> = sqlx::query_as(
            "SELECT * FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
        )
        .bind(user.id())
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?;
        let items = rows.iter().map(OrderSummary::from).collect();
        let mut res = Json(PageMaybeCounted::new(items, params, None)).into_response();
        res.headers_mut()
            .insert("preference-applied", HeaderValue::from_static(page::COUNT_NONE));
        return Ok(vary(res));
    }
    // The page and the total in one round trip (clients poll this route). A page that is not
    // full ends the list, so its total is its offset plus its rows; only a full page counts
    // the user's orders (the scalar subquery runs only in the branch that needs it). A page
    // past the end has no row to carry the total, so it is asked for on its own.
    let rows: Vec<Listed> = sqlx::query_as(
        "SELECT CASE WHEN p.on_page < $2 THEN $3 + p.on_page
                     ELSE (SELECT count(*) FROM orders WHERE user_id = $1) END AS total, p.*
         FROM (SELECT o.*, count(*) OVER () AS on_page
               FROM (SELECT * FROM orders WHERE user_id = $1
                     ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3) o) p
         ORDER BY p.created_at DESC, p.id DESC",
    )
    .bind(user.id())
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = match rows.first() {
        Some(row) => row.total,
        None if offset == 0 => 0,
        None => {
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
                .bind(user.id())
                .fetch_one(&mut *conn)
                .await?
        }
    };
    let items = rows.iter().map(|r| OrderSummary::from(&r.order)).collect();
    Ok(vary(
        Json(PageMaybeCounted::new(items, params, Some(total))).into_response(),
    ))
}

#[derive(sqlx::FromRow)]
struct Listed {
    total: i64,
    #[sqlx(flatten)]
    order: orders::OrderRow,
}

/// The top 5 products by units in CONFIRMED orders over the last 72 hours. Sales are kept in
/// hourly buckets, so the window's start is rounded down to the hour.
#[utoipa::path(get, path = "/api/products/popular", operation_id = "getPopularProducts", tag = "products", responses(
    (status = 200, description = "at most 5 products, most units first", body = Vec<PopularProduct>),
))]
pub async fn popular(State(state): State<AppState>) -> ApiResult<Json<Vec<PopularProduct>>> {
    let top: Vec<PopularProduct> = sqlx::query_as(
        "SELECT p.id AS product_id, p.name, p.price, s.quantity::bigint AS quantity
         FROM (SELECT product_id, sum(quantity) AS quantity FROM product_sales_hourly
               WHERE bucket >= date_trunc('hour', now() - interval '72 hours')
               GROUP BY product_id) s
         JOIN products p ON p.id = s.product_id
         ORDER BY s.quantity DESC, p.id
         LIMIT 5",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(top))
}
