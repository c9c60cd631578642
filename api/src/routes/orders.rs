//! Orders: accept at once as PENDING (group commit, `crate::accept`: the order, its items,
//! first history row and idempotency record, and the messages that start the pipeline and its
//! deadline, in a transaction shared with the requests that arrived together), then read their
//! progress.
//! Also the popular-products view, counted when orders are confirmed.

use std::collections::HashSet;

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
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
    extract::{IdempotencyKey, Json, Path, Query, User},
    idempotency::{self, Claim, Claimed},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/orders", get(list).post(place))
        .route("/api/orders/{id}", get(show))
        .route("/api/orders/{id}/cancel", post(cancel))
        .route("/api/products/popular", get(popular))
}

const PROBLEM: &str = "application/problem+json";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    /// 1..=50 lines, each product at most once.
    pub items: Vec<NewItem>,
    /// A coupon the caller holds (checked by the coupon worker).
    pub coupon_id: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewItem {
    pub product_id: i64,
    /// 1..=1,000.
    pub quantity: i32,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
    /// Why it was cancelled (OUT_OF_STOCK, COUPON_INVALID, INSUFFICIENT_BALANCE, TIMEOUT,
    /// PROCESSING_FAILED, ADMIN_CANCELLED, USER_CANCELLED).
    pub reason: Option<String>,
    pub items: Vec<ItemView>,
    pub total_amount: i64,
    pub discount_amount: i64,
    /// What the order currently holds of the caller's money (0 once refunded).
    pub paid_amount: i64,
    pub coupon_id: Option<i64>,
    pub history: Vec<HistoryView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemView {
    pub product_id: i64,
    pub quantity: i32,
    /// The price when the order was accepted.
    pub unit_price: i64,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct HistoryView {
    pub status: String,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderSummary {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub paid_amount: i64,
    pub coupon_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
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
/// payment asynchronously; poll `Location` for its status.
#[utoipa::path(post, path = "/api/orders", tag = "orders", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "required; a retry with the same key and body replays the first response")),
    request_body = NewOrder,
    responses(
        (status = 202, body = Accepted, headers(("Location" = String, description = "/api/orders/{id}"))),
        (status = 400, description = "IDEMPOTENCY_KEY_REQUIRED, INVALID_ORDER or malformed input", body = Problem, content_type = PROBLEM),
        (status = 401, body = Problem, content_type = PROBLEM),
        (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = PROBLEM),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = PROBLEM),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED", body = Problem, content_type = PROBLEM),
        (status = 429, description = "RATE_LIMITED: over the per-user limit of this route (RATE_LIMIT_WRITES per RATE_LIMIT_WINDOW)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "whole seconds until a request is accepted again"), ("RateLimit-Policy" = String, description = "draft-ietf-httpapi-ratelimit-headers-10, e.g. \"orders\";q=100;w=10"), ("RateLimit" = String, description = "e.g. \"orders\";r=0;t=3"))),
    ))]
pub async fn place(
    State(state): State<AppState>,
    user: User,
    key: IdempotencyKey,
    Json(req): Json<NewOrder>,
) -> ApiResult<Response> {
    let key = key.required()?;
    validate(&req)?;
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
    match state.acceptor.accept(request).await? {
        accept::Accepted::Replay(stored) => Ok(stored.into_response()),
        accept::Accepted::Fresh { order_id, total } => {
            tracing::info!(order_id = %order_id, total, "order accepted");
            let mut res = (
                StatusCode::ACCEPTED,
                Json(Accepted {
                    order_id,
                    status: OrderStatus::Pending,
                }),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/api/orders/{order_id}")) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            Ok(res)
        }
    }
}

fn validate(req: &NewOrder) -> Result<(), Error> {
    let invalid = |detail: String| Err(Error::bad_request("INVALID_ORDER", detail));
    if req.items.is_empty() || req.items.len() > MAX_ORDER_LINES {
        return invalid(format!("an order has 1 to {MAX_ORDER_LINES} lines"));
    }
    let mut seen = HashSet::new();
    for item in &req.items {
        if item.product_id <= 0 {
            return invalid(format!("productId {} is not a valid id", item.product_id));
        }
        if !(1..=MAX_LINE_QUANTITY).contains(&item.quantity) {
            return invalid(format!("quantity must be 1 to {MAX_LINE_QUANTITY}"));
        }
        if !seen.insert(item.product_id) {
            return invalid(format!("product {} appears on more than one line", item.product_id));
        }
    }
    if req.coupon_id.is_some_and(|c| c <= 0) {
        return invalid("couponId is not a valid id".to_owned());
    }
    Ok(())
}

/// One of the caller's orders, with its items and status history (another user's order is 404).
#[utoipa::path(get, path = "/api/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses(
    (status = 200, body = OrderView),
    (status = 400, body = Problem, content_type = PROBLEM),
    (status = 401, body = Problem, content_type = PROBLEM),
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
        order_id: order.id,
        status: order.status,
        reason: order.reason,
        items: items
            .into_iter()
            .map(|i| ItemView {
                product_id: i.product_id,
                quantity: i.quantity,
                unit_price: i.unit_price,
            })
            .collect(),
        total_amount: order.total_amount,
        discount_amount: order.discount_amount,
        paid_amount: order.paid_amount,
        coupon_id: order.coupon_id,
        history,
        created_at: order.created_at,
        updated_at: order.updated_at,
    }))
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
#[utoipa::path(post, path = "/api/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path),
           ("Idempotency-Key" = Option<String>, Header, description = "optional; a retry with the same key and order replays the first 202")),
    responses(
        (status = 202, description = "cancelled: CANCELLING (compensations running) or CANCELLED (it held nothing)", body = OrderView,
            headers(("Location" = String, description = "/api/orders/{id}"))),
        (status = 400, description = "INVALID_PATH, INVALID_IDEMPOTENCY_KEY", body = Problem, content_type = PROBLEM),
        (status = 401, body = Problem, content_type = PROBLEM),
        (status = 404, description = "ORDER_NOT_FOUND (also for another user's order)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "ORDER_NOT_CANCELLABLE: CONFIRMED, CANCELLED, CANCELLING or COMPENSATION_FAILED; IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = PROBLEM),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used to cancel another order", body = Problem, content_type = PROBLEM),
        (status = 429, description = "RATE_LIMITED: over the per-user limit of this route (RATE_LIMIT_WRITES per RATE_LIMIT_WINDOW)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "whole seconds until a request is accepted again"), ("RateLimit-Policy" = String, description = "draft-ietf-httpapi-ratelimit-headers-10, e.g. \"order-cancels\";q=100;w=10"), ("RateLimit" = String, description = "e.g. \"order-cancels\";r=0;t=3"))),
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
        let view = view(&mut tx, id, user.id()).await?.ok_or_else(|| order_not_found(id))?;
        let body = serde_json::to_value(&view).map_err(anyhow::Error::from)?;
        let location = format!("/api/orders/{id}");
        if let Some(claim) = &claim {
            let headers = serde_json::json!({ "location": location });
            claim.finish(&mut tx, StatusCode::ACCEPTED, &body, headers).await?;
        }
        let mut res = (StatusCode::ACCEPTED, Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            res.headers_mut().insert(header::LOCATION, v);
        }
        Ok(Claimed::Fresh(res))
    }
    .await;
    idempotency::end(tx, result).await
}

fn order_not_found(id: Uuid) -> Error {
    Error::not_found("ORDER_NOT_FOUND", format!("order {id} does not exist"))
}

/// Order `id` of user `user_id` as `GET /api/orders/{id}` shows it (None: no such order, or
/// another user's), read on `conn` (inside a transaction: as that transaction sees it).
pub async fn view(conn: &mut sqlx::PgConnection, id: Uuid, user_id: i64) -> Result<Option<OrderView>, Error> {
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
        order_id: order.id,
        status: order.status,
        reason: order.reason,
        items: items
            .into_iter()
            .map(|i| ItemView {
                product_id: i.product_id,
                quantity: i.quantity,
                unit_price: i.unit_price,
            })
            .collect(),
        total_amount: order.total_amount,
        discount_amount: order.discount_amount,
        paid_amount: order.paid_amount,
        coupon_id: order.coupon_id,
        history,
        created_at: order.created_at,
        updated_at: order.updated_at,
    }))
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/api/orders", tag = "orders", security(("bearer" = [])), params(PageParams), responses(
    (status = 200, body = Page<OrderSummary>),
    (status = 400, body = Problem, content_type = PROBLEM),
    (status = 401, body = Problem, content_type = PROBLEM),
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
    let items = rows
        .into_iter()
        .map(|o| OrderSummary {
            order_id: o.id,
            status: o.status,
            reason: o.reason,
            total_amount: o.total_amount,
            discount_amount: o.discount_amount,
            paid_amount: o.paid_amount,
            coupon_id: o.coupon_id,
            created_at: o.created_at,
            updated_at: o.updated_at,
        })
        .collect();
    Ok(Json(Page::new(items, params, total)))
}

/// The top 5 products by units in CONFIRMED orders over the last 72 hours. Sales are kept in
/// hourly buckets, so the window's start is rounded down to the hour.
#[utoipa::path(get, path = "/api/products/popular", tag = "products", responses(
    (status = 200, body = Vec<PopularProduct>),
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
