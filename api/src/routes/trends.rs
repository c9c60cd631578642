//! `GET /api/admin/trends`: the last hour of samples behind the ops dashboard's "Last hour"
//! charts (see `crate::trends`).

use axum::{Router, extract::State, routing::get};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    AppState,
    extract::{Admin, Json},
    trends::{HOUR, TrendSample},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/admin/trends", get(trends))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trends {
    /// TREND_SAMPLE_INTERVAL: how often this API process samples, in milliseconds.
    pub interval_ms: i64,
    /// How far back the samples reach: 3600 (the hour).
    pub window_seconds: i64,
    /// The most samples the hour holds (the hour divided by the interval, rounded up).
    pub max_samples: i64,
    /// Oldest first. Each covers `[start, end)`, the previous sample's end to its own, on the
    /// database's clock; together they count every status change of the period once. Empty
    /// until the first sample, unless the hour before the process started was backfilled from
    /// history. Samples are per API process: another process of the same system has its own.
    pub samples: Vec<TrendSample>,
}

/// The last hour at a glance: per sample, orders accepted, confirmed and cancelled (and per
/// second), e2e and per-step latency p50/p99 in ms, dead letters recorded (and per minute), and
/// ready messages per queue. Kept in memory by this API process (no Prometheus needed), one
/// sample every TREND_SAMPLE_INTERVAL.
#[utoipa::path(get, path = "/api/admin/trends", operation_id = "getTrends", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    responses(
    (status = 200, description = "the samples of the last hour, oldest first", body = Trends),
))]
pub async fn trends(State(state): State<AppState>, _admin: Admin) -> Json<Trends> {
    Json(Trends {
        interval_ms: state.trends.interval().as_millis() as i64,
        window_seconds: HOUR.as_secs() as i64,
        max_samples: state.trends.capacity() as i64,
        samples: state.trends.snapshot(),
    })
}
