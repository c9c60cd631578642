//! Liveness and readiness.

use axum::{Router, extract::State, routing::get};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{AppState, extract::Json, problem::ApiResult};

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(live)).route("/readyz", get(ready))
}

/// `{"status": "ok"}` or `{"status": "ready"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready` (the database answers).
    #[schema(pattern = "^(ok|ready)$")]
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", operation_id = "liveness", tag = "health", responses(
    (status = 200, description = "alive", body = Health),
))]
pub async fn live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The process can reach its database (503 problem otherwise).
#[utoipa::path(get, path = "/readyz", operation_id = "readiness", tag = "health", responses(
    (status = 200, description = "ready", body = Health),
    (status = 503, description = "SERVICE_UNAVAILABLE: the database cannot be reached", body = crate::problem::Problem, content_type = "application/problem+json"),
))]
pub async fn ready(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    sqlx::query("SELECT 1").execute(&state.pool).await?;
    Ok(Json(Health { status: "ready" }))
}
