//! Orders: accept at once as PENDING (one transaction: order, items, first history row and
//! the outbox rows that start the pipeline and its deadline), then read their progress.
//! Also the popular-products view fed by the sales projection.

use std::{collections::HashSet, sync::LazyLock};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use orderflow_shared::{
    Error,
    db::{
        orders,
        outbox::{self, OutboxMessage},
    },
    domain::{MAX_LINE_QUANTITY, MAX_ORDER_LINES, OrderStatus},
    messaging::MessageType,
    telemetry::{self, TraceParent},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState,
    extract::{IdempotencyKey, Json, Path, Query, User},
    idempotency::{self, Claim, Claimed},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
    views::{self, HistoryView, OrderSummary, OrderView},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/orders", get(list).post(place))
        .route("/api/orders/{id}", get(show))
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
/// payment asynchronously; poll `Location` (or stream its events) for its status.
#[utoipa::path(post, path = "/api/orders", operation_id = "placeOrder", tag = "orders", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, pattern = r#"^(?:[!#-~]{1,255}|"[!#-~]{1,255}")$"#,
        description = "required: 1..=255 visible ASCII characters other than `\"`, optionally in double quotes. \
                       A retry with the same key and body replays the first response")),
    request_body = NewOrder,
    responses(
        (status = 202, description = "accepted as PENDING", body = Accepted,
            headers(("Location" = String, description = "/api/orders/{orderId}")),
            links(
                ("getOrder" = (operation_id = "getOrder", parameters(("id" = "$response.body#/orderId")))),
                ("streamOrderEvents" = (operation_id = "streamOrderEvents", parameters(("id" = "$response.body#/orderId")))),
                ("getOrderTimeline" = (operation_id = "getOrderTimeline", parameters(("id" = "$response.body#/orderId")))),
                ("cancelOrder" = (operation_id = "cancelOrder", parameters(("id" = "$response.body#/orderId")))),
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
    Json(req): Json<NewOrder>,
) -> ApiResult<Response> {
    let key = key.required()?;
    validate(&req)?;
    let claim = Claim {
        user_id: user.id(),
        scope: "orders.place",
        key,
        request: serde_json::to_value(&req).map_err(anyhow::Error::from)?,
    };
    let mut tx = state.pool.begin().await?;
    let result = accept(&state, &mut tx, &user, &claim, &req).await;
    idempotency::end(tx, result).await
}

/// Accepting an order in one statement; the outbox messages are `$1`..`$7`.
static PLACE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH placed AS (
             INSERT INTO orders (id, user_id, status, coupon_id, total_amount, trace_parent, deadline_at)
             VALUES ($8, $9, 'PENDING', $10, $11, $12, now() + $13 * interval '1 millisecond')
             RETURNING id
         ), lines AS (
             INSERT INTO order_items (order_id, product_id, quantity, unit_price)
             SELECT $8, pid, qty, price FROM UNNEST($14::bigint[], $15::int[], $16::bigint[]) AS t(pid, qty, price)
         ), history AS (
             INSERT INTO order_status_history (order_id, from_status, to_status) SELECT id, NULL, 'PENDING' FROM placed
         )
         {}",
        outbox::INSERT
    )
});

/// Everything of accepting an order that happens inside its transaction.
async fn accept(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    user: &User,
    claim: &Claim,
    req: &NewOrder,
) -> Result<Claimed, Error> {
    if let Some(stored) = claim.begin(tx).await? {
        return Ok(Claimed::Replay(stored));
    }

    let ids: Vec<i64> = req.items.iter().map(|i| i.product_id).collect();
    let prices: Vec<(i64, i64)> = sqlx::query_as("SELECT id, price FROM products WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    let mut unit_prices = Vec::with_capacity(req.items.len());
    let mut total: i64 = 0;
    for item in &req.items {
        let price = prices
            .iter()
            .find(|(id, _)| *id == item.product_id)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                Error::not_found(
                    "PRODUCT_NOT_FOUND",
                    format!("product {} does not exist", item.product_id),
                )
            })?;
        unit_prices.push(price);
        total = price
            .checked_mul(i64::from(item.quantity))
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| Error::bad_request("ORDER_TOO_LARGE", "the order total is too large"))?;
    }

    let order_id = Uuid::now_v7();
    // The request's trace (continuing a caller's `traceparent`) becomes the order's trace.
    let trace = telemetry::current().unwrap_or_else(TraceParent::new_root);
    let timeout_ms = i64::try_from(state.config.order_timeout.as_millis()).unwrap_or(i64::MAX);
    // The order, its lines, its first history row and its first two messages (the
    // reservation, and the deadline that recovery acts on) in one statement; foreign keys
    // are checked at its end, when the order row exists.
    let quantities: Vec<i32> = req.items.iter().map(|i| i.quantity).collect();
    let start = OutboxMessage::command(MessageType::StockReserve, order_id, Some(trace))?;
    let deadline =
        OutboxMessage::command(MessageType::OrderDeadline, order_id, Some(trace))?.with_expiration_ms(timeout_ms);
    outbox::Columns::new(&[start, deadline])
        .bind(sqlx::query(PLACE.as_str()))
        .bind(order_id)
        .bind(user.id())
        .bind(req.coupon_id)
        .bind(total)
        .bind(trace.to_string())
        .bind(timeout_ms as f64)
        .bind(&ids)
        .bind(&quantities)
        .bind(&unit_prices)
        .execute(&mut *tx)
        .await?;

    let location = format!("/api/orders/{order_id}");
    let body = Accepted {
        order_id,
        status: OrderStatus::Pending,
    };
    let json = serde_json::to_value(&body).map_err(anyhow::Error::from)?;
    claim
        .finish(
            tx,
            StatusCode::ACCEPTED,
            &json,
            serde_json::json!({ "location": location }),
        )
        .await?;
    tracing::info!(order_id = %order_id, total, "order accepted");

    let mut res = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(Claimed::Fresh(res))
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
#[utoipa::path(get, path = "/api/orders/{id}", operation_id = "getOrder", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the order id")), responses(
    (status = 200, description = "the order", body = OrderView),
    (status = 400, description = "INVALID_PATH: the id is not a UUID", body = Problem, content_type = PROBLEM),
    (status = 404, description = "ORDER_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn show(State(state): State<AppState>, user: User, Path(id): Path<Uuid>) -> ApiResult<Json<OrderView>> {
    let mut conn = state.pool.acquire().await?;
    let order: Option<orders::OrderRow> = sqlx::query_as("SELECT * FROM orders WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user.id())
        .fetch_optional(&mut *conn)
        .await?;
    let order = order.ok_or_else(|| Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist")))?;
    let items = orders::items(&mut conn, id).await?;
    let history: Vec<HistoryView> = sqlx::query_as(
        "SELECT to_status AS status, reason, at FROM order_status_history WHERE order_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(OrderView {
        order: OrderSummary::from(&order),
        items: views::items(items),
        history,
    }))
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/api/orders", operation_id = "listOrders", tag = "orders", security(("bearer" = [])),
    params(PageParams), responses(
    (status = 200, description = "a page of the caller's orders", body = Page<OrderSummary>,
        links(("getOrder" = (operation_id = "getOrder", parameters(("id" = "$response.body#/items/0/orderId")))))),
    (status = 400, description = "INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn list(
    State(state): State<AppState>,
    user: User,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<Page<OrderSummary>>> {
    let (limit, offset) = params.limit_offset()?;
    let rows: Vec<orders::OrderRow> =
        sqlx::query_as("SELECT * FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3")
            .bind(user.id())
            .bind(limit)
            .bind(offset)
            .fetch_all(&state.pool)
            .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
        .bind(user.id())
        .fetch_one(&state.pool)
        .await?;
    let items = rows.iter().map(OrderSummary::from).collect();
    Ok(Json(Page::new(items, params, total)))
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
