//! First-come-first-served coupons: admin creates, users race to issue, users list theirs.
//!
//! Issuing is one transaction: insert the user's row (the unique (coupon, user) constraint
//! makes a second issue for the same user a 409 even under concurrency), then take one unit
//! with a guarded `UPDATE ... WHERE issued < quantity` (a 410 when none is left). A plain
//! read first answers sold-out coupons without touching the hot row.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use orderflow_shared::{Error, domain::DiscountType, error::violated_constraint};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    AppState,
    extract::{Admin, Json, Path, User},
    problem::{ApiResult, Problem},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/coupons", post(create))
        .route("/api/coupons", get(mine))
        .route("/api/coupons/{coupon_id}/issue", post(issue))
}

/// A new coupon. In the OpenAPI document this schema is split by `discountType` into two
/// (`oneOf`), so that `discountValue`'s range can differ: 1..=1,000,000,000 won for FIXED,
/// 1..=100 for PERCENT (see `openapi::split_new_coupon`). `name` is stored trimmed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewCoupon {
    /// 1..=200 characters, no control characters, not blank (400 `INVALID_NAME`).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    pub discount_type: DiscountType,
    /// Won for FIXED (1..=1,000,000,000), percent for PERCENT (1..=100); else 400
    /// `INVALID_DISCOUNT`.
    #[schema(minimum = 1, maximum = 1000000000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub discount_value: i64,
    /// How many may ever be issued, 1..=10,000,000 (400 `INVALID_QUANTITY`).
    #[schema(minimum = 1, maximum = 10000000)]
    #[serde(deserialize_with = "crate::json::int")]
    pub quantity: i32,
    /// Issuing starts then (at once when absent).
    #[schema(
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    #[serde(default, deserialize_with = "crate::json::opt_date_time")]
    pub issue_starts_at: Option<DateTime<Utc>>,
    /// Issuing ends then (never when absent); must be after `issueStartsAt` (422
    /// `INVALID_ISSUE_WINDOW`).
    #[schema(
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    #[serde(default, deserialize_with = "crate::json::opt_date_time")]
    pub issue_ends_at: Option<DateTime<Utc>>,
    /// Issued coupons are usable until then (forever when absent). Must lie in the future and
    /// after `issueStartsAt` (422 `INVALID_EXPIRES_AT`); an expired coupon is no longer issued.
    #[schema(
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    #[serde(default, deserialize_with = "crate::json::opt_date_time")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Orders below this total (before discount) cannot use the coupon; whole won,
    /// 0..=1,000,000,000,000 (400 `INVALID_MIN_ORDER_AMOUNT`).
    #[schema(minimum = 0, maximum = 1000000000000.0)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub min_order_amount: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Coupon {
    pub id: i64,
    pub name: String,
    #[schema(value_type = DiscountType)]
    pub discount_type: String,
    pub discount_value: i64,
    pub quantity: i32,
    pub issued: i32,
    pub issue_starts_at: Option<DateTime<Utc>>,
    pub issue_ends_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub min_order_amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCoupon {
    pub coupon_id: i64,
    /// Always AVAILABLE for a fresh issue.
    pub status: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct UserCoupon {
    pub coupon_id: i64,
    pub name: String,
    #[schema(value_type = DiscountType)]
    pub discount_type: String,
    pub discount_value: i64,
    pub min_order_amount: i64,
    /// AVAILABLE, USED or EXPIRED.
    pub status: String,
    pub issued_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

const PROBLEM: &str = "application/problem+json";

/// Create a coupon (admin).
#[utoipa::path(post, path = "/api/admin/coupons", operation_id = "createCoupon", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), request_body = NewCoupon, responses(
    (status = 201, description = "created", body = Coupon,
        links(("issueCoupon" = (operation_id = "issueCoupon", parameters(("coupon_id" = "$response.body#/id")))))),
    (status = 400, description = "INVALID_NAME, INVALID_DISCOUNT, INVALID_QUANTITY, INVALID_MIN_ORDER_AMOUNT, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
    (status = 422, description = "INVALID_ISSUE_WINDOW: issueStartsAt is not before issueEndsAt; INVALID_EXPIRES_AT: expiresAt is not in the future or not after issueStartsAt (rules between fields and the clock, which a schema cannot state)", body = Problem, content_type = PROBLEM),
))]
pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    Json(req): Json<NewCoupon>,
) -> ApiResult<(StatusCode, Json<Coupon>)> {
    validate(&req)?;
    let coupon: Coupon = sqlx::query_as(
        "INSERT INTO coupons (name, discount_type, discount_value, quantity, issue_starts_at, issue_ends_at,
                              expires_at, min_order_amount)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING id, name, discount_type, discount_value, quantity, issued, issue_starts_at, issue_ends_at,
                   expires_at, min_order_amount",
    )
    .bind(req.name.trim())
    .bind(req.discount_type.as_str())
    .bind(req.discount_value)
    .bind(req.quantity)
    .bind(req.issue_starts_at)
    .bind(req.issue_ends_at)
    .bind(req.expires_at)
    .bind(req.min_order_amount.unwrap_or(0))
    .fetch_one(&state.pool)
    .await?;
    Ok((StatusCode::CREATED, Json(coupon)))
}

/// The rules of the schema first (400), then those between fields and the clock (422, RFC
/// 9110 §15.5.21: the content is valid by the schema and still cannot be processed).
fn validate(req: &NewCoupon) -> Result<(), Error> {
    let bad = |code, detail: &str| Err(Error::bad_request(code, detail));
    let name = req.name.trim();
    if name.is_empty() || req.name.chars().count() > 200 || req.name.chars().any(char::is_control) {
        return bad(
            "INVALID_NAME",
            "name must be 1 to 200 characters, without control characters",
        );
    }
    match req.discount_type {
        DiscountType::Fixed if !(1..=1_000_000_000).contains(&req.discount_value) => {
            return bad("INVALID_DISCOUNT", "a FIXED discount must be 1..=1,000,000,000 won");
        }
        DiscountType::Percent if !(1..=100).contains(&req.discount_value) => {
            return bad("INVALID_DISCOUNT", "a PERCENT discount must be 1..=100");
        }
        _ => {}
    }
    if !(1..=10_000_000).contains(&req.quantity) {
        return bad("INVALID_QUANTITY", "quantity must be 1..=10,000,000");
    }
    if req
        .min_order_amount
        .is_some_and(|m| !(0..=1_000_000_000_000).contains(&m))
    {
        return bad(
            "INVALID_MIN_ORDER_AMOUNT",
            "minOrderAmount must be 0..=1,000,000,000,000 won",
        );
    }
    if let (Some(start), Some(end)) = (req.issue_starts_at, req.issue_ends_at)
        && start >= end
    {
        return Err(Error::unprocessable(
            "INVALID_ISSUE_WINDOW",
            "issueStartsAt must be before issueEndsAt",
        ));
    }
    if let Some(expires) = req.expires_at {
        // A coupon that is dead on arrival could only be issued unusable.
        if expires <= Utc::now() || req.issue_starts_at.is_some_and(|start| expires <= start) {
            return Err(Error::unprocessable(
                "INVALID_EXPIRES_AT",
                "expiresAt must be in the future and after issueStartsAt",
            ));
        }
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct IssueCheck {
    sold_out: bool,
    not_started: bool,
    ended: bool,
    expired: bool,
    expires_at: Option<DateTime<Utc>>,
}

/// Issue one unit of a coupon to the caller, first come, first served.
#[utoipa::path(post, path = "/api/coupons/{coupon_id}/issue", operation_id = "issueCoupon", tag = "coupons", security(("bearer" = [])),
    params(("coupon_id" = i64, Path, minimum = 1, description = "the coupon id")), responses(
    (status = 201, description = "issued to the caller", body = IssuedCoupon),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 403, description = "COUPON_NOT_ISSUABLE: outside the issue window, or expired", body = Problem, content_type = PROBLEM),
    (status = 404, description = "COUPON_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "COUPON_ALREADY_ISSUED", body = Problem, content_type = PROBLEM),
    (status = 410, description = "COUPON_SOLD_OUT", body = Problem, content_type = PROBLEM),
))]
pub async fn issue(
    State(state): State<AppState>,
    user: User,
    Path(coupon_id): Path<i64>,
) -> ApiResult<(StatusCode, Json<IssuedCoupon>)> {
    let check: Option<IssueCheck> = sqlx::query_as(
        "SELECT issued >= quantity AS sold_out,
                coalesce(issue_starts_at > now(), false) AS not_started,
                coalesce(issue_ends_at <= now(), false) AS ended,
                coalesce(expires_at <= now(), false) AS expired,
                expires_at
         FROM coupons WHERE id = $1",
    )
    .bind(coupon_id)
    .fetch_optional(&state.pool)
    .await?;
    let check =
        check.ok_or_else(|| Error::not_found("COUPON_NOT_FOUND", format!("coupon {coupon_id} does not exist")))?;
    if check.not_started || check.ended {
        return Err(Error::forbidden("COUPON_NOT_ISSUABLE", "the coupon is outside its issue window").into());
    }
    if check.expired {
        return Err(Error::forbidden("COUPON_NOT_ISSUABLE", "the coupon has expired").into());
    }
    let already_issued = || Error::conflict("COUPON_ALREADY_ISSUED", "you already have this coupon");
    let sold_out = || Error::gone("COUPON_SOLD_OUT", "every unit of this coupon has been issued");
    if check.sold_out {
        let has: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM user_coupons WHERE coupon_id = $1 AND user_id = $2)")
                .bind(coupon_id)
                .bind(user.id())
                .fetch_one(&state.pool)
                .await?;
        return Err(if has { already_issued() } else { sold_out() }.into());
    }

    let mut tx = state.pool.begin().await?;
    let inserted = sqlx::query("INSERT INTO user_coupons (coupon_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(coupon_id)
        .bind(user.id())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Err(already_issued().into());
    }
    let taken = sqlx::query(
        "UPDATE coupons SET issued = issued + 1
         WHERE id = $1 AND issued < quantity
           AND (issue_starts_at IS NULL OR issue_starts_at <= now())
           AND (issue_ends_at IS NULL OR issue_ends_at > now())
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(coupon_id)
    .execute(&mut *tx)
    .await;
    let taken = match taken {
        Ok(r) => r.rows_affected(),
        Err(e) if violated_constraint(&e) == Some("coupons_issued_within_quantity") => 0,
        Err(e) => return Err(e.into()),
    };
    if taken == 0 {
        return Err(sold_out().into());
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedCoupon {
            coupon_id,
            status: "AVAILABLE".to_owned(),
            expires_at: check.expires_at,
        }),
    ))
}

/// The caller's coupons with their status (AVAILABLE, USED or EXPIRED).
#[utoipa::path(get, path = "/api/coupons", operation_id = "listMyCoupons", tag = "coupons", security(("bearer" = [])), responses(
    (status = 200, description = "the caller's coupons, newest first", body = Vec<UserCoupon>),
))]
pub async fn mine(State(state): State<AppState>, user: User) -> ApiResult<Json<Vec<UserCoupon>>> {
    let coupons: Vec<UserCoupon> = sqlx::query_as(
        "SELECT uc.coupon_id, c.name, c.discount_type, c.discount_value, c.min_order_amount,
                CASE WHEN uc.status = 'USED' THEN 'USED'
                     WHEN c.expires_at IS NOT NULL AND c.expires_at <= now() THEN 'EXPIRED'
                     ELSE 'AVAILABLE' END AS status,
                uc.issued_at, uc.used_at, c.expires_at
         FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.user_id = $1 ORDER BY uc.id DESC",
    )
    .bind(user.id())
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(coupons))
}
