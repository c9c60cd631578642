//! Balance: query, charge (optionally idempotent) and the ledger.

use axum::{
    Router,
    extract::State,
    response::Response,
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use orderflow_shared::{
    Error,
    domain::{BALANCE_MAX, ChargeAmount},
};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState,
    extract::{IdempotencyKey, Json, Query, User},
    idempotency::{self, Claim, Claimed},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
};

const PROBLEM: &str = "application/problem+json";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/balance", get(get_balance))
        .route("/api/balance/charge", post(charge))
        .route("/api/balance/history", get(history))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceView {
    pub user_id: i64,
    /// Whole won.
    pub balance: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChargeRequest {
    /// Whole won: a multiple of 10 within 1,000..=100,000. The first rule broken, in this
    /// order, is the answer: 400 `INVALID_AMOUNT_UNIT`, `AMOUNT_BELOW_MINIMUM`,
    /// `AMOUNT_ABOVE_MAXIMUM`; then 409 `BALANCE_LIMIT_EXCEEDED` when the balance would pass
    /// 10,000,000.
    #[schema(example = 10_000, minimum = 1000, maximum = 100000, multiple_of = 10)]
    #[serde(deserialize_with = "crate::json::int")]
    pub amount: i64,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub id: i64,
    /// CHARGE, PAYMENT or REFUND.
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub order_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// The caller's balance (0 for a user never seen).
#[utoipa::path(get, path = "/api/balance", operation_id = "getBalance", tag = "balance", security(("bearer" = [])), responses(
    (status = 200, description = "the caller's balance", body = BalanceView),
))]
pub async fn get_balance(State(state): State<AppState>, user: User) -> ApiResult<Json<BalanceView>> {
    let balance: Option<i64> = sqlx::query_scalar("SELECT balance FROM balances WHERE user_id = $1")
        .bind(user.id())
        .fetch_optional(&state.pool)
        .await?;
    Ok(Json(BalanceView {
        user_id: user.id(),
        balance: balance.unwrap_or(0),
    }))
}

/// Charges the caller's balance. With an `Idempotency-Key`, a retried charge applies once and
/// replays the first response.
#[utoipa::path(post, path = "/api/balance/charge", operation_id = "chargeBalance", tag = "balance", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = r#"^(?:[!#-~]{1,255}|"[!#-~]{1,255}")$"#,
        description = "optional: 1..=255 visible ASCII characters other than `\"`, optionally in double quotes; \
                       makes a retried charge apply once")),
    request_body = ChargeRequest,
    responses(
        (status = 200, description = "charged; the new balance", body = BalanceView),
        (status = 400, description = "INVALID_AMOUNT_UNIT, AMOUNT_BELOW_MINIMUM, AMOUNT_ABOVE_MAXIMUM (the first rule broken, in that order), INVALID_IDEMPOTENCY_KEY, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
        (status = 409, description = "BALANCE_LIMIT_EXCEEDED: the balance would pass 10,000,000; IDEMPOTENCY_KEY_IN_USE", body = Problem, content_type = PROBLEM),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used with another amount", body = Problem, content_type = PROBLEM),
    ))]
pub async fn charge(
    State(state): State<AppState>,
    user: User,
    key: IdempotencyKey,
    Json(req): Json<ChargeRequest>,
) -> ApiResult<Response> {
    let amount = ChargeAmount::parse(req.amount)?;
    let claim = key.0.map(|key| Claim {
        user_id: user.id(),
        scope: "balance.charge",
        key,
        request: serde_json::json!({ "amount": req.amount }),
    });
    let mut tx = state.pool.begin().await?;
    let result = async {
        if let Some(stored) = idempotency::previous(claim.as_ref(), &mut tx).await? {
            return Ok(Claimed::Replay(stored));
        }
        let view = apply_charge(&mut tx, user.id(), amount).await?;
        idempotency::answer_ok(claim.as_ref(), &mut tx, &view).await
    }
    .await;
    idempotency::end(tx, result).await
}

/// Adds `amount` in one statement (no read-then-write) and writes the ledger row.
async fn apply_charge(conn: &mut PgConnection, user_id: i64, amount: ChargeAmount) -> Result<BalanceView, Error> {
    let balance: Option<i64> = sqlx::query_scalar(
        "INSERT INTO balances (user_id, balance) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET balance = balances.balance + EXCLUDED.balance, updated_at = now()
         WHERE balances.balance + EXCLUDED.balance <= $3
         RETURNING balance",
    )
    .bind(user_id)
    .bind(amount.get())
    .bind(BALANCE_MAX)
    .fetch_optional(&mut *conn)
    .await?;
    // A conflict with the balance as it is (RFC 9110 §15.5.10), not a malformed request: the
    // same charge succeeds once the balance has been spent down.
    let balance = balance.ok_or_else(|| {
        Error::conflict(
            "BALANCE_LIMIT_EXCEEDED",
            format!("the balance may not exceed {BALANCE_MAX} won"),
        )
    })?;
    sqlx::query("INSERT INTO balance_ledger (user_id, kind, amount, balance_after) VALUES ($1, 'CHARGE', $2, $3)")
        .bind(user_id)
        .bind(amount.get())
        .bind(balance)
        .execute(&mut *conn)
        .await?;
    Ok(BalanceView { user_id, balance })
}

/// The caller's ledger, newest first.
#[utoipa::path(get, path = "/api/balance/history", operation_id = "listBalanceHistory", tag = "balance", security(("bearer" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "a page of the caller's ledger", body = Page<LedgerEntry>),
        (status = 400, description = "INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
    ))]
pub async fn history(
    State(state): State<AppState>,
    user: User,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<Page<LedgerEntry>>> {
    let (limit, offset) = params.limit_offset()?;
    let items: Vec<LedgerEntry> = sqlx::query_as(
        "SELECT id, kind, amount, balance_after, order_id, created_at FROM balance_ledger
         WHERE user_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
    )
    .bind(user.id())
    .bind(limit)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_ledger WHERE user_id = $1")
        .bind(user.id())
        .fetch_one(&state.pool)
        .await?;
    Ok(Json(Page::new(items, params, total)))
}
