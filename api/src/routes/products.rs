//! Products: browse, look up, and (admin) create and restock. Popular products live in
//! `routes::orders` beside the projection that feeds them.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::Response,
    routing::{get, post},
};
use orderflow_shared::Error;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    extract::{Admin, IdempotencyKey, Json, Path, Query},
    idempotency::{self, Claim, Claimed},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
};

const PROBLEM: &str = "application/problem+json";

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

/// The filter of `GET /api/products` (paging is [`PageParams`]).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Case-insensitive substring of the product name: at most 100 characters, no control
    /// characters (400 `INVALID_KEYWORD`); blank means no filter.
    #[param(max_length = 100, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub keyword: Option<String>,
}

/// A new product. `name` is stored trimmed.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewProduct {
    /// 1..=200 characters, no control characters, not blank (400 `INVALID_NAME`).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// Whole won, 0..=1,000,000,000 (400 `INVALID_PRICE`).
    #[schema(minimum = 0, maximum = 1000000000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub price: i64,
    /// Units, 0..=1,000,000,000 (400 `INVALID_STOCK`).
    #[schema(minimum = 0, maximum = 1000000000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub stock: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Restock {
    /// Units to add, 1..=1,000,000 (400 `INVALID_QUANTITY`).
    #[schema(minimum = 1, maximum = 1000000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub quantity: i64,
}

/// Browse products, optionally filtered by a name keyword.
#[utoipa::path(get, path = "/api/products", operation_id = "listProducts", tag = "products", params(ListParams, PageParams), responses(
    (status = 200, description = "a page of products, by id", body = Page<Product>,
        links(("getProduct" = (operation_id = "getProduct", parameters(("id" = "$response.body#/items/0/id")))))),
    (status = 400, description = "INVALID_KEYWORD, INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn list(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Product>>> {
    let (limit, offset) = page.limit_offset()?;
    let keyword = params.keyword.as_deref().unwrap_or_default();
    if keyword.chars().count() > 100 || keyword.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "INVALID_KEYWORD",
            "keyword may be at most 100 characters, without control characters",
        )
        .into());
    }
    let pattern = match keyword.trim() {
        "" => None,
        // Lower-cased by PostgreSQL, like the names it is compared with: Rust's and the
        // database's case mappings differ for some characters (e.g. 'İ').
        k => Some(format!("%{}%", escape_like(k))),
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
    Ok(Json(Page::new(items, page, total)))
}

/// `%`, `_` and `\` in a keyword match themselves.
fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// One product.
#[utoipa::path(get, path = "/api/products/{id}", operation_id = "getProduct", tag = "products",
    params(("id" = i64, Path, minimum = 1, description = "the product id")), responses(
    (status = 200, description = "the product", body = Product),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = PROBLEM),
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
#[utoipa::path(post, path = "/api/admin/products", operation_id = "createProduct", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), request_body = NewProduct, responses(
    (status = 201, description = "created", body = Product,
        links(
            ("getProduct" = (operation_id = "getProduct", parameters(("id" = "$response.body#/id")))),
            ("restockProduct" = (operation_id = "restockProduct", parameters(("id" = "$response.body#/id")))),
        )),
    (status = 400, description = "INVALID_NAME, INVALID_PRICE, INVALID_STOCK, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
))]
pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    Json(req): Json<NewProduct>,
) -> ApiResult<(StatusCode, Json<Product>)> {
    let name = req.name.trim();
    if name.is_empty() || req.name.chars().count() > 200 || req.name.chars().any(char::is_control) {
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

/// Add stock to a product (admin). With an `Idempotency-Key`, a retried restock (after a
/// timeout or a 503 whose commit the client cannot know of) adds the stock once.
#[utoipa::path(post, path = "/api/admin/products/{id}/restock", operation_id = "restockProduct", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the product id"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r#"^(?:[!#-~]{1,255}|"[!#-~]{1,255}")$"#,
        description = "optional: 1..=255 visible ASCII characters other than `\"`, optionally in double quotes; \
                       makes a retried restock apply once")),
    request_body = Restock, responses(
    (status = 200, description = "restocked; the product now", body = Product),
    (status = 400, description = "INVALID_QUANTITY, INVALID_PATH, INVALID_IDEMPOTENCY_KEY, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
    (status = 404, description = "PRODUCT_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = PROBLEM),
    (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used with another product or quantity", body = Problem, content_type = PROBLEM),
))]
pub async fn restock(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
    key: IdempotencyKey,
    Json(req): Json<Restock>,
) -> ApiResult<Response> {
    if !(1..=1_000_000).contains(&req.quantity) {
        return Err(Error::bad_request("INVALID_QUANTITY", "quantity must be 1..=1,000,000").into());
    }
    let claim = key.0.map(|key| Claim {
        user_id: admin.0.user_id,
        scope: "products.restock",
        key,
        request: serde_json::json!({ "productId": id, "quantity": req.quantity }),
    });
    let mut tx = state.pool.begin().await?;
    let result = async {
        if let Some(stored) = idempotency::previous(claim.as_ref(), &mut tx).await? {
            return Ok(Claimed::Replay(stored));
        }
        let product: Product = sqlx::query_as(
            "UPDATE products SET stock = stock + $2, restocked = restocked + $2 WHERE id = $1
             RETURNING id, name, price, stock",
        )
        .bind(id)
        .bind(req.quantity)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| not_found(id))?;
        idempotency::answer_ok(claim.as_ref(), &mut tx, &product).await
    }
    .await;
    idempotency::end(tx, result).await
}
