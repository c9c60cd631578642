//! Liveness and readiness.

use axum::{Router, extract::State, routing::get};
use serde_json::{Value, json};

use crate::{AppState, extract::Json, problem::ApiResult};

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(live)).route("/readyz", get(ready))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The process can reach its database (503 problem otherwise).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "database unavailable", body = crate::problem::Problem, content_type = "application/problem+json"),
))]
pub async fn ready(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    sqlx::query("SELECT 1").execute(&state.pool).await?;
    Ok(Json(json!({ "status": "ready" })))
}
