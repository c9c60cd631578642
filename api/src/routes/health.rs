//! Liveness and readiness.

use axum::{Router, extract::State, routing::get};
use serde::Serialize;
use utoipa::ToSchema;

use orderflow_shared::{Error, db::kept};

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

/// The process can write to its database: the node its pool uses answers and accepts writes
/// (503 problem otherwise, e.g. while a highly available PostgreSQL fails over).
#[utoipa::path(get, path = "/readyz", operation_id = "readiness", tag = "health", responses(
    (status = 200, description = "ready", body = Health),
    (status = 503, description = "SERVICE_UNAVAILABLE: the database cannot be reached, or the node reached does not accept writes", body = crate::problem::Problem, content_type = "application/problem+json"),
))]
pub async fn ready(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    // Within the answer deadline: a probe asking a primary that vanished would otherwise hold a
    // pooled connection until the kernel gives up, and probes come every few seconds.
    let writable = kept::answered(async {
        let mut conn = state.pool.acquire().await?;
        Ok(orderflow_shared::db::primary::accepts_writes(&mut conn).await?)
    })
    .await?;
    if !writable {
        return Err(Error::unavailable(
            "SERVICE_UNAVAILABLE",
            "the database node in use does not accept writes (a failover is under way)",
        )
        .into());
    }
    Ok(Json(Health { status: "ready" }))
}
