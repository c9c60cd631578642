//! Replays of `order.confirmed` (admin): publish again, with their original event ids and
//! bodies, the events of the orders confirmed in a window, for a consumer that lost them. The
//! work is done by `orderflow_shared::db::replay` (the same code `orderflow events replay`
//! runs), in a task of this process; any API process resumes a replay whose runner died.

use axum::{
    Router,
    extract::State,
    response::Response,
    routing::{get, post},
};
use chrono::Utc;
use orderflow_shared::{
    Error,
    db::replay::{self, Plan, Replay},
};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState,
    extract::{Admin, Json, Path, Query},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/events/replay", post(start))
        .route("/api/admin/events/replays", get(list))
        .route("/api/admin/events/replays/{id}", get(show))
        .route("/api/admin/events/replays/{id}/cancel", post(cancel))
}

const PROBLEM: &str = "application/problem+json";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewReplay {
    /// Start of the window (inclusive) on the events' `data.confirmedAt`, RFC 3339.
    #[schema(
        example = "2026-11-21T10:00:00Z",
        format = DateTime,
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    pub from: String,
    /// End of the window (exclusive), RFC 3339; at most 31 days after `from`. An end in the
    /// future is cut at the moment the replay starts.
    #[schema(
        example = "2026-11-21T12:00:00Z",
        format = DateTime,
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    pub to: String,
    /// Events written to the outbox at a time, 1..=1,000 (default 100).
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub chunk_size: Option<i64>,
    /// Pause after each chunk is published, 0..=10,000 ms (default 100).
    #[schema(minimum = 0, maximum = 10000)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub pause_ms: Option<i64>,
}

/// Replay the `order.confirmed` events of the orders confirmed in `[from, to)`, with their
/// original event ids and bodies (consumers dedupe by id), through the outbox in chunks.
/// Answers at once; follow `Location` for progress.
#[utoipa::path(post, path = "/api/admin/events/replay", operation_id = "startEventReplay", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    request_body = NewReplay,
    responses(
        (status = 202, description = "started; follow `Location` for its progress", body = Replay,
            headers(("Location" = String, description = "/api/admin/events/replays/{id}")),
            links(
                ("getEventReplay" = (operation_id = "getEventReplay", parameters(("id" = "$response.body#/id")))),
                ("cancelEventReplay" = (operation_id = "cancelEventReplay", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, description = "INVALID_TIME, INVALID_CHUNK_SIZE, INVALID_PAUSE, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
        (status = 409, description = "REPLAY_OVERLAPS: a running replay covers part of the window", body = Problem, content_type = PROBLEM),
        (status = 422, description = "INVALID_WINDOW: `from` is not before `to` (cut at now); WINDOW_TOO_LONG: over 31 days", body = Problem, content_type = PROBLEM),
    ))]
pub async fn start(State(state): State<AppState>, admin: Admin, Json(req): Json<NewReplay>) -> ApiResult<Response> {
    // The schema's one spelling (json::date_time), before the shared parser (which the CLI
    // also uses, and which is lenient about surrounding blanks).
    for (name, value) in [("from", &req.from), ("to", &req.to)] {
        crate::json::date_time::<serde::de::value::Error>(value)
            .map_err(|e| Error::bad_request("INVALID_TIME", format!("{name}: {e}")))?;
    }
    let plan = Plan::parse(&req.from, &req.to, req.chunk_size, req.pause_ms, Utc::now())?;
    let owner = Uuid::new_v4();
    let created = replay::create(
        &mut *state.pool.acquire().await?,
        &plan,
        &admin.0.describe_as_actor(),
        Some(owner),
    )
    .await?;
    tracing::info!(replay = created.id, from = %plan.from, to = %plan.to, total = created.total, "event replay requested");
    replay::spawn(state.pool.clone(), created.id, owner, state.shutdown.clone());
    Ok(super::accepted(
        &created,
        &format!("/api/admin/events/replays/{}", created.id),
    ))
}

/// Replays, newest first.
#[utoipa::path(get, path = "/api/admin/events/replays", operation_id = "listEventReplays", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), params(PageParams), responses(
    (status = 200, description = "a page of replays, newest first", body = Page<Replay>),
    (status = 400, description = "INVALID_PAGE or INVALID_PAGE_SIZE", body = Problem, content_type = PROBLEM),
))]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Replay>>> {
    let (limit, offset) = page.limit_offset()?;
    let (rows, total) = replay::list(&mut *state.pool.acquire().await?, limit, offset).await?;
    Ok(Json(Page::new(rows, page, total)))
}

/// One replay's progress: state, window, total, enqueued, published, parked, started and
/// finished.
#[utoipa::path(get, path = "/api/admin/events/replays/{id}", operation_id = "getEventReplay", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the replay's id")), responses(
    (status = 200, description = "the replay", body = Replay),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "REPLAY_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn show(State(state): State<AppState>, _admin: Admin, Path(id): Path<i64>) -> ApiResult<Json<Replay>> {
    let found = replay::find(&mut *state.pool.acquire().await?, id).await?;
    Ok(Json(found.ok_or_else(|| replay::not_found(id))?))
}

/// Stop a running replay: no chunk is written after this answer; the chunk already written
/// (at most `chunkSize` events) is still published.
#[utoipa::path(post, path = "/api/admin/events/replays/{id}/cancel", operation_id = "cancelEventReplay", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the replay's id")), responses(
    (status = 200, description = "the replay, CANCELLED", body = Replay),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "REPLAY_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "REPLAY_NOT_RUNNING: already DONE or CANCELLED", body = Problem, content_type = PROBLEM),
))]
pub async fn cancel(State(state): State<AppState>, _admin: Admin, Path(id): Path<i64>) -> ApiResult<Json<Replay>> {
    let cancelled = replay::cancel(&mut *state.pool.acquire().await?, id).await?;
    tracing::info!(replay = id, "event replay cancelled");
    Ok(Json(cancelled))
}
