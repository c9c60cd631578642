//! Products: browse, look up, and (admin) create and restock. Popular products live in
//! `routes::orders` beside the projection that feeds them.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use orderflow_shared::Error;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    extract::{Admin, Json, Path, Query},
    page::{MAX_PAGE_SIZE, Page},
    problem::{ApiResult, Problem},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/products", get(list))
        .route("/api/products/{id}", get(show))
        .route("/api/admin/products", post(create))
        .route("/api/admin/products/{id}/restock", post(restock))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Product {
    pub id: i64,
    pub name: String,
    /// Whole won.
    pub price: i64,
    pub stock: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    #[serde(default)]
    pub page: u32,
    /// 1..=100; larger values are capped at 100.
    #[serde(default = "default_size")]
    pub size: u32,
    /// Case-insensitive substring of the product name.
    pub keyword: Option<String>,
}

fn default_size() -> u32 {
    20
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewProduct {
    pub name: String,
    pub price: i64,
    pub stock: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Restock {
    /// Units to add, 1..=1,000,000.
    pub quantity: i64,
}

/// Browse products, optionally filtered by a name keyword.
#[utoipa::path(get, path = "/api/products", tag = "products", params(ListParams), responses(
    (status = 200, body = Page<Product>),
    (status = 400, body = Problem, content_type = "application/problem+json"),
))]
pub async fn list(State(state): State<AppState>, Query(params): Query<ListParams>) -> ApiResult<Json<Page<Product>>> {
    let page = crate::page::PageParams {
        page: params.page,
        size: params.size,
    };
    let (limit, offset) = page.limit_offset()?;
    let pattern = match params.keyword.as_deref().map(str::trim) {
        Some(k) if !k.is_empty() => {
            if k.chars().count() > 100 || k.chars().any(char::is_control) {
                return Err(Error::bad_request(
                    "INVALID_KEYWORD",
                    "keyword may be at most 100 characters, without control characters",
                )
                .into());
            }
            // Lower-cased by PostgreSQL, like the names it is compared with: Rust's and the
            // database's case mappings differ for some characters (e.g. 'İ').
            Some(format!("%{}%", escape_like(k)))
        }
        _ => None,
    };
    let items: Vec<Product> = sqlx::query_as(
        "SELECT id, name, price, stock FROM products
         WHERE $1::text IS NULL OR lower(name) LIKE lower($1)
         ORDER BY id LIMIT $2 OFFSET $3",
    )
    .bind(&pattern)
    .bind(limit)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM products WHERE $1::text IS NULL OR lower(name) LIKE lower($1)")
            .bind(&pattern)
            .fetch_one(&state.pool)
            .await?;
    debug_assert!(page.size() <= MAX_PAGE_SIZE);
    Ok(Json(Page::new(items, page, total)))
}

/// `%`, `_` and `\` in a keyword match themselves.
fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// One product.
#[utoipa::path(get, path = "/api/products/{id}", tag = "products", params(("id" = i64, Path)), responses(
    (status = 200, body = Product),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
))]
pub async fn show(State(state): State<AppState>, Path(id): Path<i64>) -> ApiResult<Json<Product>> {
    let product: Option<Product> = sqlx::query_as("SELECT id, name, price, stock FROM products WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    Ok(Json(product.ok_or_else(|| not_found(id))?))
}

fn not_found(id: i64) -> Error {
    Error::not_found("PRODUCT_NOT_FOUND", format!("product {id} does not exist"))
}

/// Create a product (admin).
#[utoipa::path(post, path = "/api/admin/products", tag = "admin", security(("bearer" = [])), request_body = NewProduct, responses(
    (status = 201, body = Product),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 401, body = Problem, content_type = "application/problem+json"),
    (status = 403, body = Problem, content_type = "application/problem+json"),
))]
pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    Json(req): Json<NewProduct>,
) -> ApiResult<(StatusCode, Json<Product>)> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "INVALID_NAME",
            "name must be 1 to 200 characters, without control characters",
        )
        .into());
    }
    if !(0..=1_000_000_000).contains(&req.price) {
        return Err(Error::bad_request("INVALID_PRICE", "price must be 0..=1,000,000,000 won").into());
    }
    if !(0..=1_000_000_000).contains(&req.stock) {
        return Err(Error::bad_request("INVALID_STOCK", "stock must be 0..=1,000,000,000").into());
    }
    let product: Product = sqlx::query_as(
        "INSERT INTO products (name, price, stock, initial_stock) VALUES ($1, $2, $3, $3)
         RETURNING id, name, price, stock",
    )
    .bind(name)
    .bind(req.price)
    .bind(req.stock)
    .fetch_one(&state.pool)
    .await?;
    Ok((StatusCode::CREATED, Json(product)))
}

/// Add stock to a product (admin).
#[utoipa::path(post, path = "/api/admin/products/{id}/restock", tag = "admin", security(("bearer" = [])),
    params(("id" = i64, Path)), request_body = Restock, responses(
    (status = 200, body = Product),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 401, body = Problem, content_type = "application/problem+json"),
    (status = 403, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
))]
pub async fn restock(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
    Json(req): Json<Restock>,
) -> ApiResult<Json<Product>> {
    if !(1..=1_000_000).contains(&req.quantity) {
        return Err(Error::bad_request("INVALID_QUANTITY", "quantity must be 1..=1,000,000").into());
    }
    let product: Option<Product> = sqlx::query_as(
        "UPDATE products SET stock = stock + $2, restocked = restocked + $2 WHERE id = $1
         RETURNING id, name, price, stock",
    )
    .bind(id)
    .bind(req.quantity)
    .fetch_optional(&state.pool)
    .await?;
    Ok(Json(product.ok_or_else(|| not_found(id))?))
}
