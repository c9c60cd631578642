//! Operators in an incident (admin): dead letters grouped by cause, and bulk actions that
//! replay or discard a group, cancel stuck orders or retry parked compensations by the
//! thousand. The work is `orderflow_shared::db::bulk`, run in a task of this process; any API
//! process resumes an action whose runner died.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use orderflow_shared::{
    Error,
    config::query_duration,
    db::bulk::{
        self, Action, BulkAction, BulkItem, DryRun, Filter, LetterFilter, OrderFilter, PARKED_GROUP, Plan, Target,
    },
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    AppState,
    extract::{Admin, Json, Path, Query},
    page::{Page, PageParams},
    problem::{ApiResult, Problem},
    routes::admin::DeadLetterView,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/failure-groups", get(failure_groups))
        .route("/api/admin/bulk-actions", post(start).get(list))
        .route("/api/admin/bulk-actions/{id}", get(show))
        .route("/api/admin/bulk-actions/{id}/items", get(items))
        .route("/api/admin/bulk-actions/{id}/cancel", post(cancel))
}

const PROBLEM: &str = "application/problem+json";

// --- Failure groups ---------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GroupFilter {
    /// Which letters count: NEW (the default: groups still to act on), REPLAYED, DISCARDED or
    /// ALL.
    #[param(value_type = Option<crate::routes::admin::DeadLetterStatusFilter>)]
    pub status: Option<String>,
}

/// Dead letters of one cause: the queue they died in, their message type, the broker's reason
/// and the kind of error their consumer failed them with (the error with ids and numbers taken
/// out), e.g. every `stock.release` of `orderflow.stock` that hit "delivery_limit" with
/// `error returned from database: product # is misconfigured`.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroup {
    /// The group's fingerprint (stable: the same cause is the same id, in every release that
    /// keeps the `failure_group` SQL function); filter bulk actions and letters by it.
    pub id: String,
    /// DEAD_LETTERS (messages a queue gave up on) or PARKED (outbox rows the relay set aside
    /// because the broker kept refusing them; `queue` is then `outbox:<exchange>/<routing key>`
    /// and `reason` `parked`).
    pub source: String,
    pub queue: Option<String>,
    pub message_type: Option<String>,
    /// The broker's reason: delivery_limit, rejected, expired.
    pub reason: Option<String>,
    /// The consumer's error without ids and numbers; null when no consumer said.
    pub error_kind: Option<String>,
    /// Letters in the group (with the status asked for).
    pub count: i64,
    /// Of those: NEW, REPLAYED, DISCARDED.
    pub new: i64,
    pub replayed: i64,
    pub discarded: i64,
    /// Distinct orders the letters name.
    pub orders: i64,
    /// Up to 5 of those orders.
    pub sample_orders: Vec<Uuid>,
    /// Most replays one message of the group had been through before it died again.
    pub max_previous_replays: i32,
    /// When the first and last letters of the group died (recorded).
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The newest letter of the group (none for parked rows: `GET /api/admin/outbox/parked`).
    #[sqlx(skip)]
    pub sample: Option<DeadLetterView>,
    #[serde(skip)]
    sample_id: i64,
}

/// Dead letters grouped by cause, the most recent cause first.
#[utoipa::path(get, path = "/api/admin/failure-groups", operation_id = "listFailureGroups", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), params(GroupFilter, PageParams), responses(
    (status = 200, description = "a page of failure groups, the most recently seen first", body = Page<FailureGroup>),
    (status = 400, description = "INVALID_STATUS, INVALID_PAGE, INVALID_PAGE_SIZE or INVALID_QUERY", body = Problem, content_type = PROBLEM),
))]
pub async fn failure_groups(
    State(state): State<AppState>,
    _admin: Admin,
    Query(filter): Query<GroupFilter>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<FailureGroup>>> {
    let (limit, offset) = page.limit_offset()?;
    let status = crate::routes::admin::letter_status(filter.status.as_deref())?;
    let mut conn = state.pool.acquire().await?;
    // Parked outbox rows have no status of their own: they count as NEW until retried or
    // discarded, and are listed with NEW (and ALL).
    let parked = status.as_deref().is_none_or(|s| s == "NEW");
    // One pass over the failures (narrow columns, materialized once), the page of groups from
    // it, then the orders of those groups only: 350 ms at 100,000 NEW letters in 20 groups
    // (880 ms with a subquery per group), and the dashboard asks every 10 s.
    let mut groups: Vec<FailureGroup> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH failures AS MATERIALIZED (
             SELECT 'DEAD_LETTERS' AS source, failure_group AS grp, source_queue AS queue, message_type,
                    reason, error, status, order_ids, previous_replays, recorded_at AS seen, id
             FROM dead_letters WHERE $1::text IS NULL OR status = $1
             UNION ALL
             SELECT 'PARKED', {PARKED_GROUP}, 'outbox:' || exchange || '/' || routing_key, message_type,
                    'parked', last_error, 'NEW', order_ids, 0, parked_at, 0
             FROM outbox WHERE $4 AND parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL
         ),
         page AS (
             SELECT grp, min(source) AS source, min(queue) AS queue, min(message_type) AS message_type,
                    min(reason) AS reason, error_kind(min(error)) AS error_kind, count(*) AS count,
                    count(*) FILTER (WHERE status = 'NEW') AS new,
                    count(*) FILTER (WHERE status = 'REPLAYED') AS replayed,
                    count(*) FILTER (WHERE status = 'DISCARDED') AS discarded,
                    max(previous_replays)::int4 AS max_previous_replays,
                    min(seen) AS first_seen, max(seen) AS last_seen, max(id) AS sample_id
             FROM failures GROUP BY grp ORDER BY last_seen DESC, grp LIMIT $2 OFFSET $3
         ),
         orders AS (
             SELECT f.grp, count(DISTINCT o) AS n, (array_agg(DISTINCT o))[1:5] AS sample
             FROM failures f JOIN page p USING (grp), unnest(f.order_ids) o GROUP BY f.grp
         )
         SELECT p.grp AS id, p.source, p.queue, p.message_type, p.reason, p.error_kind, p.count, p.new,
                p.replayed, p.discarded, coalesce(o.n, 0) AS orders,
                coalesce(o.sample, '{{}}'::uuid[]) AS sample_orders, p.max_previous_replays,
                p.first_seen, p.last_seen, p.sample_id
         FROM page p LEFT JOIN orders o USING (grp) ORDER BY p.last_seen DESC, p.grp"
    )))
    .bind(&status)
    .bind(limit)
    .bind(offset)
    .bind(parked)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(DISTINCT failure_group) FROM dead_letters WHERE $1::text IS NULL OR status = $1)
              + (SELECT count(DISTINCT {PARKED_GROUP}) FROM outbox
                 WHERE $2 AND parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL)"
    )))
    .bind(&status)
    .bind(parked)
    .fetch_one(&mut *conn)
    .await?;
    let ids: Vec<i64> = groups
        .iter()
        .filter(|g| g.source == "DEAD_LETTERS")
        .map(|g| g.sample_id)
        .collect();
    let samples: Vec<DeadLetterView> = sqlx::query_as("SELECT * FROM dead_letters WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
    for sample in samples {
        if let Some(g) = groups
            .iter_mut()
            .find(|g| g.source == "DEAD_LETTERS" && g.sample_id == sample.id)
        {
            g.sample = Some(sample.with_text());
        }
    }
    Ok(Json(Page::new(groups, page, total)))
}

// --- Bulk actions -----------------------------------------------------------------------------

/// Which items; every field given must match. Dead-letter actions take `group`, `queue`,
/// `messageType`, `reason`, `from` and `to` (on when the letter was recorded) and `throughId`;
/// parked-row actions `group` and `messageType`; order actions `status` and `olderThan` or
/// `updatedBefore` (a cancel needs one of them).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestFilter {
    /// A failure group's id (32 lowercase hex digits).
    #[schema(pattern = "^[0-9a-f]{32}$")]
    pub group: Option<String>,
    /// The queue the letters died in, e.g. `orderflow.stock`.
    pub queue: Option<String>,
    /// e.g. `stock.release`.
    pub message_type: Option<String>,
    /// delivery_limit, rejected or expired.
    pub reason: Option<String>,
    /// Letters recorded at or after this time (RFC 3339).
    #[schema(format = DateTime)]
    pub from: Option<String>,
    /// Letters recorded before this time (RFC 3339).
    #[schema(format = DateTime)]
    pub to: Option<String>,
    /// Orders in this status (a cancel: PENDING, STOCK_RESERVED, COUPON_APPLIED or PAID, all of
    /// them when absent; a retry: COMPENSATION_FAILED).
    pub status: Option<String>,
    /// Orders unchanged for at least this long: a whole number and `ms`, `s` or `m` (none:
    /// seconds), at most 7 days; counted from when the action is created.
    #[schema(example = "5m")]
    pub older_than: Option<String>,
    /// Orders unchanged since before this time (RFC 3339), instead of `olderThan`: what a dry
    /// run's `filter.updatedBefore` says, so that the action covers the orders the operator was
    /// shown (some may have moved on since), not those that got stuck while they read it.
    #[schema(format = DateTime)]
    pub updated_before: Option<String>,
    /// Dead letters with an id up to this one: what a dry run's `filter.throughId` says, so
    /// that the action covers the letters the operator was shown, not those that joined the
    /// group since.
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub through_id: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewBulkAction {
    pub action: Action,
    #[serde(default)]
    pub filter: RequestFilter,
    /// Say what would happen (200, a [`DryRun`]) and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Items per transaction, 1..=1,000 (default 100).
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub chunk_size: Option<i64>,
    /// Pause after each chunk, 0..=10,000 ms (default 100).
    #[schema(minimum = 0, maximum = 10000)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub pause_ms: Option<i64>,
    /// The `matching` of the dry run the operator confirmed: if more items match when the
    /// action is created (a backlog grew meanwhile), it is refused with 409
    /// `BULK_ACTION_CHANGED` and nothing changes; fewer is fine (some were settled since).
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    pub expected_matching: Option<i64>,
}

/// A failure group's id as `GET /api/admin/failure-groups` gives it (32 lowercase hex
/// digits), or 400 `INVALID_GROUP`.
pub(crate) fn group_id(group: Option<&str>) -> Result<Option<String>, Error> {
    match group {
        Some(g) if g.len() != 32 || !g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Err(
            Error::bad_request("INVALID_GROUP", "a failure group id is 32 lowercase hex digits"),
        ),
        g => Ok(g.map(str::to_owned)),
    }
}

/// A filter's text: no control characters (which no queue, type or reason holds, and which
/// PostgreSQL's text cannot take: NUL), else 400 `INVALID_FILTER`.
fn plain_text(name: &str, value: &Option<String>) -> Result<Option<String>, Error> {
    match value {
        Some(v) if v.chars().any(char::is_control) => Err(Error::bad_request(
            "INVALID_FILTER",
            format!("{name} holds a control character"),
        )),
        v => Ok(v.clone()),
    }
}

impl NewBulkAction {
    /// The request as a plan: times absolute (`olderThan` counted from `now`).
    fn plan(&self, now: DateTime<Utc>) -> Result<Plan, Error> {
        let f = &self.filter;
        let target = self.action.target();
        let given = [
            ("group", f.group.is_some(), target != Target::Orders),
            ("queue", f.queue.is_some(), target == Target::DeadLetters),
            ("messageType", f.message_type.is_some(), target != Target::Orders),
            ("reason", f.reason.is_some(), target == Target::DeadLetters),
            ("from", f.from.is_some(), target == Target::DeadLetters),
            ("to", f.to.is_some(), target == Target::DeadLetters),
            ("status", f.status.is_some(), target == Target::Orders),
            ("olderThan", f.older_than.is_some(), target == Target::Orders),
            ("updatedBefore", f.updated_before.is_some(), target == Target::Orders),
            ("throughId", f.through_id.is_some(), target == Target::DeadLetters),
        ];
        let misplaced: Vec<&str> = given
            .into_iter()
            .filter_map(|(name, given, taken)| (given && !taken).then_some(name))
            .collect();
        if !misplaced.is_empty() {
            return Err(Error::unprocessable(
                "INVALID_FILTER",
                format!(
                    "{} does not take {} in its filter",
                    self.action.as_str(),
                    misplaced.join(", ")
                ),
            ));
        }
        let time = |name: &str, value: &Option<String>| -> Result<Option<DateTime<Utc>>, Error> {
            value
                .as_deref()
                .map(|v| {
                    crate::json::date_time::<serde::de::value::Error>(v)
                        .map_err(|e| Error::bad_request("INVALID_TIME", format!("{name}: {e}")))
                })
                .transpose()
        };
        let filter = if target != Target::Orders {
            Filter::Letters(LetterFilter {
                group: group_id(f.group.as_deref())?,
                queue: plain_text("queue", &f.queue)?,
                message_type: plain_text("messageType", &f.message_type)?,
                reason: plain_text("reason", &f.reason)?,
                from: time("from", &f.from)?,
                to: time("to", &f.to)?,
                through_id: match f.through_id {
                    Some(id) if id < 0 => {
                        return Err(Error::bad_request(
                            "INVALID_FILTER",
                            "throughId is a message id: 0 or more",
                        ));
                    }
                    id => id,
                },
            })
        } else {
            let updated_before = match (f.older_than.as_deref(), time("updatedBefore", &f.updated_before)?) {
                (Some(_), Some(_)) => {
                    return Err(Error::unprocessable(
                        "INVALID_FILTER",
                        "give olderThan or updatedBefore, not both",
                    ));
                }
                // A cut-off still ahead would have every chunk take orders placed after the
                // action started (and a parked order retried, parked again and still before
                // it would come round again): it ends no later than now.
                (None, Some(at)) if at > now => {
                    return Err(Error::unprocessable(
                        "INVALID_FILTER",
                        format!(
                            "updatedBefore {} is later than the database's clock ({}): only orders already \
                             unchanged since a past moment can be acted on (mind the time zone: Z is UTC)",
                            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        ),
                    ));
                }
                (None, Some(at)) => at,
                (Some(d), None) => {
                    now - chrono::TimeDelta::from_std(query_duration(d)?)
                        .map_err(|e| Error::bad_request("INVALID_DURATION", e.to_string()))?
                }
                (None, None) if self.action == Action::CancelOrders => {
                    return Err(Error::unprocessable(
                        "INVALID_FILTER",
                        "CANCEL_ORDERS needs olderThan (e.g. 5m) or updatedBefore: only orders unchanged that long are cancelled",
                    ));
                }
                (None, None) => now,
            };
            Filter::Orders(OrderFilter {
                statuses: bulk::order_statuses(self.action, f.status.as_deref())?,
                updated_before,
            })
        };
        Plan::new(self.action, filter, self.chunk_size, self.pause_ms)
    }
}

/// Start a bulk action, or (with `dryRun`) say what it would do. The action runs in chunks
/// (`chunkSize` items per transaction, `pauseMs` after each, and never while more than a chunk
/// waits for the relay), each item acted on once however often it is resumed; follow
/// `Location` for its progress.
#[utoipa::path(post, path = "/api/admin/bulk-actions", operation_id = "startBulkAction", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    request_body = NewBulkAction,
    responses(
        (status = 200, description = "a dry run: what the action would do now; nothing changed", body = DryRun),
        (status = 202, description = "started; follow `Location` for its progress", body = BulkAction,
            headers(("Location" = String, description = "/api/admin/bulk-actions/{id}")),
            links(
                ("getBulkAction" = (operation_id = "getBulkAction", parameters(("id" = "$response.body#/id")))),
                ("cancelBulkAction" = (operation_id = "cancelBulkAction", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, description = "INVALID_GROUP, INVALID_FILTER (a control character, a negative throughId), INVALID_TIME, INVALID_DURATION, INVALID_CHUNK_SIZE, INVALID_PAUSE, INVALID_EXPECTED_MATCHING, INVALID_BODY or MALFORMED_JSON", body = Problem, content_type = PROBLEM),
        (status = 409, description = "BULK_ACTION_CHANGED: more items match than `expectedMatching`; BULK_ACTIONS_BUSY: as many actions as may run at once are running", body = Problem, content_type = PROBLEM),
        (status = 422, description = "INVALID_FILTER: a field the action does not take, a cancel without olderThan or updatedBefore, an updatedBefore later than now; INVALID_STATUS: a status the action cannot move", body = Problem, content_type = PROBLEM),
        (status = 503, description = "BROKER_UNAVAILABLE: a replay's dry run could not ask the broker", body = Problem, content_type = PROBLEM),
    ))]
pub async fn start(State(state): State<AppState>, admin: Admin, Json(req): Json<NewBulkAction>) -> ApiResult<Response> {
    // `olderThan` is counted on the database's clock, the one `updated_at` is written with.
    if req.expected_matching.is_some_and(|n| n < 0) {
        return Err(Error::bad_request("INVALID_EXPECTED_MATCHING", "expectedMatching is a count: 0 or more").into());
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&state.pool).await?;
    let plan = req.plan(now)?;
    if req.dry_run {
        let dry = bulk::dry_run(&state.pool, &state.config.amqp_url, &plan).await?;
        return Ok((StatusCode::OK, Json(dry)).into_response());
    }
    let owner = Uuid::new_v4();
    let created = bulk::create(
        &state.pool,
        &plan,
        req.expected_matching,
        &admin.0.describe_as_actor(),
        owner,
    )
    .await?;
    tracing::info!(
        bulk_action = created.id,
        action = plan.action.as_str(),
        total = created.total,
        by = %created.requested_by,
        "bulk action requested"
    );
    bulk::spawn(
        state.pool.clone(),
        state.config.amqp_url.clone(),
        created.id,
        owner,
        state.shutdown.clone(),
    );
    Ok(super::accepted(
        &created,
        &format!("/api/admin/bulk-actions/{}", created.id),
    ))
}

/// Bulk actions, newest first.
#[utoipa::path(get, path = "/api/admin/bulk-actions", operation_id = "listBulkActions", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])), params(PageParams), responses(
    (status = 200, description = "a page of bulk actions, newest first", body = Page<BulkAction>),
    (status = 400, description = "INVALID_PAGE or INVALID_PAGE_SIZE", body = Problem, content_type = PROBLEM),
))]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<BulkAction>>> {
    let (limit, offset) = page.limit_offset()?;
    let (rows, total) = bulk::list(&mut *state.pool.acquire().await?, limit, offset).await?;
    Ok(Json(Page::new(rows, page, total)))
}

/// One bulk action's progress.
#[utoipa::path(get, path = "/api/admin/bulk-actions/{id}", operation_id = "getBulkAction", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the bulk action's id")), responses(
    (status = 200, description = "the bulk action", body = BulkAction),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "BULK_ACTION_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn show(State(state): State<AppState>, _admin: Admin, Path(id): Path<i64>) -> ApiResult<Json<BulkAction>> {
    let found = bulk::find(&mut *state.pool.acquire().await?, id).await?;
    Ok(Json(found.ok_or_else(|| bulk::not_found(id))?))
}

/// What a bulk action did to each item (dead letter or order), in the order it reached them:
/// the audit of the action, next to who asked for it (`requestedBy`).
#[utoipa::path(get, path = "/api/admin/bulk-actions/{id}/items", operation_id = "listBulkActionItems", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the bulk action's id"), PageParams), responses(
    (status = 200, description = "a page of the items the action acted on or skipped", body = Page<BulkItem>),
    (status = 400, description = "INVALID_PATH, INVALID_PAGE or INVALID_PAGE_SIZE", body = Problem, content_type = PROBLEM),
    (status = 404, description = "BULK_ACTION_NOT_FOUND", body = Problem, content_type = PROBLEM),
))]
pub async fn items(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<BulkItem>>> {
    let (limit, offset) = page.limit_offset()?;
    let mut conn = state.pool.acquire().await?;
    if bulk::find(&mut conn, id).await?.is_none() {
        return Err(bulk::not_found(id).into());
    }
    let (rows, total) = bulk::items(&mut conn, id, limit, offset).await?;
    Ok(Json(Page::new(rows, page, total)))
}

/// Stop a running bulk action: no chunk starts after this answer; what earlier chunks did
/// stays done.
#[utoipa::path(post, path = "/api/admin/bulk-actions/{id}/cancel", operation_id = "cancelBulkAction", tag = "admin",
    security(("bearer" = []), ("admin_cookie" = [])),
    params(("id" = i64, Path, minimum = 1, description = "the bulk action's id")), responses(
    (status = 200, description = "the bulk action, CANCELLED", body = BulkAction),
    (status = 400, description = "INVALID_PATH: the id is not a whole number within int64", body = Problem, content_type = PROBLEM),
    (status = 404, description = "BULK_ACTION_NOT_FOUND", body = Problem, content_type = PROBLEM),
    (status = 409, description = "BULK_ACTION_NOT_RUNNING: already DONE or CANCELLED", body = Problem, content_type = PROBLEM),
))]
pub async fn cancel(State(state): State<AppState>, admin: Admin, Path(id): Path<i64>) -> ApiResult<Json<BulkAction>> {
    let cancelled = bulk::cancel(&mut *state.pool.acquire().await?, id).await?;
    tracing::info!(bulk_action = id, by = %admin.0.describe_as_actor(), "bulk action cancelled");
    Ok(Json(cancelled))
}
