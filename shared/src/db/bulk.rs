//! Bulk actions (issue 28): what an operator does to thousands of dead letters or orders at
//! once, safely while live traffic flows.
//!
//! - **Actions.** [`Action::ReplayDeadLetters`] and [`Action::DiscardDeadLetters`] act on the
//!   NEW dead letters matching a [`LetterFilter`] (a failure group, a queue, a message type, a
//!   broker reason, a window of `recordedAt`); [`Action::CancelOrders`] cancels
//!   (ADMIN_CANCELLED) the orders in a cancellable status unchanged since a moment;
//!   [`Action::RetryCompensations`] moves COMPENSATION_FAILED orders back to CANCELLING and
//!   sends the compensation each still needs; [`Action::RetryParked`] and
//!   [`Action::DiscardParked`] give the outbox rows the relay parked (the broker kept refusing
//!   them) of a failure group back to the relay, or discard them. The rules are those of the one-item routes:
//!   a replay is the one `dead_letters::replay` does; a cancel the one `orders::cancel` does.
//! - **Dry run.** [`dry_run`] says what an action would do (how many items, how many orders,
//!   a sample; for a replay, how many letters could not be replayed and why) and changes
//!   nothing.
//! - **Chunks.** An action acts on at most `chunkSize` items per transaction; the transaction
//!   moves them out of the filter (a letter leaves NEW; an order leaves its status) and counts
//!   them, so an item is acted on once whatever crashes, and a letter replayed twice is one
//!   replay. After each chunk it pauses `pauseMs`, then waits while more than a chunk's worth
//!   of messages wait for the relay: live orders go first, an action never makes a backlog grow.
//! - **Progress, cancel, resume.** The `bulk_actions` row holds the state (RUNNING, DONE,
//!   CANCELLED), `total` (matching when created), `done`, `skipped` (letters that could not be
//!   replayed: left NEW, the last reason kept) and who asked. Cancelling takes effect before
//!   the next chunk. Whoever runs an action holds a lease ([`LEASE`], renewed at every chunk);
//!   every API process looks every [`RESUME_EVERY`] for RUNNING actions whose lease ran out and
//!   resumes them.
//! - **Audit.** The row names who asked and what; `bulk_action_items` holds, per item (dead
//!   letter or order), what the action did or why it skipped it, written in the chunk's
//!   transaction; every letter it resolved names the action and who asked (`resolvedBy`,
//!   `bulkActionId`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Error, Result,
    db::{
        dead_letters::{self, Destinations, Letter},
        lease::{BULK_ACTIONS, lease_ms},
        orders::{self, OrderRow, Transitions},
        outbox,
    },
    domain::{CancelReason, OrderStatus},
};

/// Items per transaction, unless asked otherwise (1..=[`MAX_CHUNK_SIZE`]).
pub const DEFAULT_CHUNK_SIZE: i32 = 100;
pub const MAX_CHUNK_SIZE: i32 = 1_000;
/// Pause after each chunk, unless asked otherwise (0..=[`MAX_PAUSE_MS`]).
pub const DEFAULT_PAUSE_MS: i32 = 100;
/// Below [`LEASE`], so a pausing runner never loses its lease.
pub const MAX_PAUSE_MS: i32 = 10_000;
pub use super::lease::{LEASE, RESUME_EVERY};
/// How often a waiting runner looks again (cancelled? backlog gone?).
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How often a waiting runner renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A relay backlog an action waits out before its next chunk: a chunk's worth, but never less
/// than this (under steady load a few rows always wait, and a chunk of 1 must not stall).
const BACKLOG_FLOOR: i64 = 100;
/// The longest an action waits for a backlog before its next chunk (a relay that is down or
/// far behind must not stall it for good; its chunks stay small).
const MAX_GIVE_WAY: Duration = Duration::from_secs(10);
/// Chunks that may fail in a row before the action is FAILED.
const MAX_FAILURES: i32 = 10;
/// Items a dry run lists.
const SAMPLE: i64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Publish the matching NEW dead letters again (each marked REPLAYED).
    ReplayDeadLetters,
    /// Mark the matching NEW dead letters DISCARDED (kept for the record, never published).
    DiscardDeadLetters,
    /// Cancel (ADMIN_CANCELLED) the matching in-flight orders; their compensations run.
    CancelOrders,
    /// Move the matching COMPENSATION_FAILED orders back to CANCELLING and send the
    /// compensation each still needs.
    RetryCompensations,
    /// Give the matching parked outbox rows back to the relay (attempts reset).
    RetryParked,
    /// Mark the matching parked outbox rows discarded (kept, never published).
    DiscardParked,
}

/// What an action acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// NEW dead letters (a [`LetterFilter`]).
    DeadLetters,
    /// Parked outbox rows (a [`LetterFilter`]: `group` and `messageType` only).
    Parked,
    /// Orders (an [`OrderFilter`]).
    Orders,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReplayDeadLetters => "REPLAY_DEAD_LETTERS",
            Self::DiscardDeadLetters => "DISCARD_DEAD_LETTERS",
            Self::CancelOrders => "CANCEL_ORDERS",
            Self::RetryCompensations => "RETRY_COMPENSATIONS",
            Self::RetryParked => "RETRY_PARKED",
            Self::DiscardParked => "DISCARD_PARKED",
        }
    }

    pub fn target(self) -> Target {
        match self {
            Self::ReplayDeadLetters | Self::DiscardDeadLetters => Target::DeadLetters,
            Self::RetryParked | Self::DiscardParked => Target::Parked,
            Self::CancelOrders | Self::RetryCompensations => Target::Orders,
        }
    }
}

impl TryFrom<String> for Action {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s)).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    /// Acting, or waiting to be resumed.
    Running,
    /// Nothing matching is left (or every letter left could not be replayed: `skipped`).
    Done,
    /// Stopped by an operator; what its chunks did stays done.
    Cancelled,
    /// Ten chunks in a row failed (`lastError` says why); what earlier chunks did stays done.
    Failed,
}

impl TryFrom<String> for State {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "RUNNING" => Ok(Self::Running),
            "DONE" => Ok(Self::Done),
            "CANCELLED" => Ok(Self::Cancelled),
            "FAILED" => Ok(Self::Failed),
            _ => Err(format!("unknown bulk action state {s:?}")),
        }
    }
}

/// Which dead letters (NEW ones only); every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LetterFilter {
    /// A failure group's id (`GET /api/admin/failure-groups`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The queue the letters died in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// The broker's reason: delivery_limit, rejected, expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Recorded at or after this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    /// Recorded before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    /// Dead letters only: those with an id up to this one. A dry run answers with the newest
    /// letter's id when it counted, so that the action confirmed covers what the operator was
    /// shown, not letters that joined the group while they read it (a group that grows through
    /// an incident could otherwise never be confirmed: more would match every time). (Not for
    /// parked rows: an outbox row's id is from when it was written, long before it was parked.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub through_id: Option<i64>,
}

/// Which orders: in one of `statuses`, last changed before `updatedBefore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderFilter {
    pub statuses: Vec<String>,
    pub updated_before: DateTime<Utc>,
}

/// What an action acts on, as stored (times absolute: a resumed action matches what the
/// original request meant, not "older than" counted from the resume). `kind` says which:
/// `orders`, or `messages` (dead letters or parked outbox rows, as the action says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Filter {
    Orders(OrderFilter),
    #[serde(rename = "messages")]
    Letters(LetterFilter),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub action: Action,
    pub filter: Filter,
    pub chunk_size: i32,
    pub pause_ms: i32,
}

impl Plan {
    /// Checks chunk size (`INVALID_CHUNK_SIZE`, 400) and pause (`INVALID_PAUSE`, 400), and that
    /// the filter fits the action (`INVALID_FILTER`, 422).
    pub fn new(action: Action, filter: Filter, chunk_size: Option<i64>, pause_ms: Option<i64>) -> Result<Self> {
        let chunk_size = chunk_size.unwrap_or(i64::from(DEFAULT_CHUNK_SIZE));
        if !(1..=i64::from(MAX_CHUNK_SIZE)).contains(&chunk_size) {
            return Err(Error::bad_request(
                "INVALID_CHUNK_SIZE",
                format!("chunkSize must be 1 to {MAX_CHUNK_SIZE}"),
            ));
        }
        let pause_ms = pause_ms.unwrap_or(i64::from(DEFAULT_PAUSE_MS));
        if !(0..=i64::from(MAX_PAUSE_MS)).contains(&pause_ms) {
            return Err(Error::bad_request(
                "INVALID_PAUSE",
                format!("pauseMs must be 0 to {MAX_PAUSE_MS}"),
            ));
        }
        let fits = match &filter {
            Filter::Letters(_) => action.target() != Target::Orders,
            Filter::Orders(_) => action.target() == Target::Orders,
        };
        if !fits {
            return Err(Error::unprocessable(
                "INVALID_FILTER",
                format!(
                    "{} takes a filter of {}",
                    action.as_str(),
                    if action.target() == Target::Orders {
                        "orders"
                    } else {
                        "messages"
                    }
                ),
            ));
        }
        Ok(Self {
            action,
            filter,
            chunk_size: chunk_size as i32,
            pause_ms: pause_ms as i32,
        })
    }
}

/// The statuses `action` may take orders from: a cancel, any cancellable one (or those of
/// them asked for); a retry, COMPENSATION_FAILED. `INVALID_STATUS` (422) for any other.
pub fn order_statuses(action: Action, asked: Option<&str>) -> Result<Vec<String>> {
    let allowed: &[OrderStatus] = match action {
        Action::CancelOrders => OrderStatus::CANCELLABLE,
        _ => &[OrderStatus::CompensationFailed],
    };
    match asked {
        None => Ok(allowed.iter().map(|s| s.as_str().to_owned()).collect()),
        Some(s) => match OrderStatus::parse(s).filter(|s| allowed.contains(s)) {
            Some(status) => Ok(vec![status.as_str().to_owned()]),
            None => Err(Error::unprocessable(
                "INVALID_STATUS",
                format!(
                    "{} takes orders in {}; {s:?} is not one of them",
                    action.as_str(),
                    allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        },
    }
}

/// One bulk action, as `GET /api/admin/bulk-actions/{id}` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkAction {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub action: Action,
    #[sqlx(json)]
    pub filter: Filter,
    #[sqlx(try_from = "String")]
    pub state: State,
    pub chunk_size: i32,
    pub pause_ms: i32,
    /// Items matching when the action was created.
    pub total: i64,
    /// Items acted on so far.
    pub done: i64,
    /// Dead letters that matched but could not be replayed (left NEW); `lastSkip` says why.
    pub skipped: i64,
    pub last_skip: Option<String>,
    /// Chunks that failed in a row (database or broker down), and the last error.
    pub failures: i32,
    pub last_error: Option<String>,
    /// Who asked: `admin:<user id>`.
    pub requested_by: String,
    #[serde(rename = "startedAt")]
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub cursor_id: i64,
    #[serde(skip)]
    pub upto_id: i64,
    #[serde(skip)]
    pub lease_owner: Option<Uuid>,
}

/// What an action would do now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    pub action: Action,
    pub filter: Filter,
    /// Items it would act on (dead letters or orders).
    pub matching: i64,
    /// Distinct orders concerned.
    pub orders: i64,
    /// The first few item ids (dead letter ids as strings, or order ids).
    pub sample: Vec<String>,
    /// For a replay: letters that could not be replayed now (left NEW), and the first reason.
    pub not_replayable: Option<i64>,
    pub not_replayable_reason: Option<String>,
}

/// `WHERE` of the NEW letters matching `$1`..`$6` (group, queue, type, reason, from, to).
const LETTERS: &str = "status = 'NEW'
      AND ($1::text IS NULL OR failure_group = $1) AND ($2::text IS NULL OR source_queue = $2)
      AND ($3::text IS NULL OR message_type = $3) AND ($4::text IS NULL OR reason = $4)
      AND ($5::timestamptz IS NULL OR recorded_at >= $5) AND ($6::timestamptz IS NULL OR recorded_at < $6)";

/// A parked outbox row's failure group: where it was to go, its type, and the kind of the
/// broker's refusal (the `failure_group` SQL function, as for dead letters).
pub const PARKED_GROUP: &str =
    "failure_group('outbox:' || exchange || '/' || routing_key, message_type, 'parked', last_error)";

/// `WHERE` of the parked rows matching `$1` (group) and `$2` (type); the other fields of a
/// [`LetterFilter`] are refused for parked rows by the API.
fn parked_where() -> String {
    format!(
        "parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL
          AND ($1::text IS NULL OR {PARKED_GROUP} = $1) AND ($2::text IS NULL OR message_type = $2)"
    )
}

fn bind_parked<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    f: &'q LetterFilter,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(&f.group).bind(&f.message_type)
}

/// `WHERE` of the orders matching `$1` (statuses) and `$2` (changed before).
const ORDERS: &str = "in_flight AND status = ANY($1) AND updated_at < $2";

fn bind_letters<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    f: &'q LetterFilter,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(&f.group)
        .bind(&f.queue)
        .bind(&f.message_type)
        .bind(&f.reason)
        .bind(f.from)
        .bind(f.to)
}

/// How many items match (messages up to id `upto`) and how many distinct orders they concern.
async fn count(conn: &mut PgConnection, target: Target, filter: &Filter, upto: i64) -> Result<(i64, i64)> {
    Ok(match filter {
        Filter::Letters(f) if target == Target::Parked => {
            let parked = format!("{} AND id <= $3", parked_where());
            bind_parked(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*), (SELECT count(DISTINCT o) FROM outbox r, unnest(r.order_ids) o WHERE {parked})
                     FROM outbox WHERE {parked}"
                ))),
                f,
            )
            .bind(upto)
            .fetch_one(conn)
            .await?
        }
        Filter::Letters(f) => {
            bind_letters(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*), (SELECT count(DISTINCT o) FROM dead_letters d, unnest(d.order_ids) o
                                       WHERE {LETTERS} AND id <= $7)
                     FROM dead_letters WHERE {LETTERS} AND id <= $7"
                ))),
                f,
            )
            .bind(upto)
            .fetch_one(conn)
            .await?
        }
        Filter::Orders(f) => {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM orders WHERE {ORDERS}"
            )))
            .bind(&f.statuses)
            .bind(f.updated_before)
            .fetch_one(conn)
            .await?;
            (n, n)
        }
    })
}

/// The last message id `plan` covers: the newest dead letter or outbox row now, or the
/// filter's `through_id` if earlier; 0 for orders (not counted by id).
async fn last_id(conn: &mut PgConnection, plan: &Plan) -> Result<i64> {
    let newest: i64 = match plan.action.target() {
        Target::DeadLetters => sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM dead_letters"),
        Target::Parked => sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox"),
        Target::Orders => return Ok(0),
    }
    .fetch_one(&mut *conn)
    .await?;
    Ok(match &plan.filter {
        Filter::Letters(LetterFilter {
            through_id: Some(through),
            ..
        }) => newest.min(*through),
        _ => newest,
    })
}

/// What `plan` would do now; changes nothing. A replay's destinations are asked of the broker.
pub async fn dry_run(pool: &PgPool, amqp_url: &str, plan: &Plan) -> Result<DryRun> {
    let mut conn = pool.acquire().await?;
    let upto = last_id(&mut conn, plan).await?;
    let (matching, orders) = count(&mut conn, plan.action.target(), &plan.filter, upto).await?;
    let mut filter = plan.filter.clone();
    if let (Filter::Letters(f), Target::DeadLetters) = (&mut filter, plan.action.target()) {
        f.through_id = Some(upto);
    }
    let mut dry = DryRun {
        action: plan.action,
        filter,
        matching,
        orders,
        sample: Vec::new(),
        not_replayable: None,
        not_replayable_reason: None,
    };
    match &plan.filter {
        Filter::Letters(f) if plan.action.target() == Target::Parked => {
            let ids: Vec<i64> = bind_parked(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM outbox WHERE {} AND id <= $3 ORDER BY id LIMIT {SAMPLE}",
                    parked_where()
                ))),
                f,
            )
            .bind(upto)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|(id,): (i64,)| id)
            .collect();
            dry.sample = ids.iter().map(i64::to_string).collect();
        }
        Filter::Letters(f) if plan.action != Action::ReplayDeadLetters => {
            let ids: Vec<i64> = bind_letters(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM dead_letters WHERE {LETTERS} AND id <= $7 ORDER BY id LIMIT {SAMPLE}"
                ))),
                f,
            )
            .bind(upto)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|(id,): (i64,)| id)
            .collect();
            dry.sample = ids.iter().map(i64::to_string).collect();
        }
        Filter::Letters(f) => {
            // Streamed: a group may hold many thousands of letters, each with its body.
            let mut letters = bind_letters(
                sqlx::query_as::<_, Letter>(sqlx::AssertSqlSafe(format!(
                    "SELECT * FROM dead_letters WHERE {LETTERS} AND id <= $7 ORDER BY id"
                ))),
                f,
            )
            .bind(upto)
            .fetch(&mut *conn);
            let mut destinations = Destinations::new(amqp_url);
            let mut refused = 0;
            while let Some(letter) = futures_util::TryStreamExt::try_next(&mut letters).await? {
                if dry.sample.len() < SAMPLE as usize {
                    dry.sample.push(letter.id.to_string());
                }
                if let Err(err) = destinations.of(&letter).await {
                    if err.code() != Some("DEAD_LETTER_NOT_REPLAYABLE") {
                        return Err(err);
                    }
                    refused += 1;
                    dry.not_replayable_reason.get_or_insert_with(|| err.to_string());
                }
            }
            dry.not_replayable = Some(refused);
        }
        Filter::Orders(f) => {
            let ids: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM orders WHERE {ORDERS} ORDER BY id LIMIT $3"
            )))
            .bind(&f.statuses)
            .bind(f.updated_before)
            .bind(SAMPLE)
            .fetch_all(&mut *conn)
            .await?;
            dry.sample = ids.iter().map(Uuid::to_string).collect();
        }
    }
    Ok(dry)
}

/// Creates a RUNNING action (counting what matches), leased to `owner` (the caller runs it
/// next with [`spawn`]).
/// Most bulk actions RUNNING at once: each holds a runner polling the database and
/// competes with the pipeline for it, and an incident needs a few, not hundreds.
pub const MAX_RUNNING: i64 = 4;

/// Creates a RUNNING action for `plan`, counting what it covers now. Errors:
/// `BULK_ACTION_CHANGED` (409) when more than `at_most` items match (the dry run the operator
/// confirmed showed fewer), `BULK_ACTIONS_BUSY` (409) when [`MAX_RUNNING`] are running.
pub async fn create(
    pool: &PgPool,
    plan: &Plan,
    at_most: Option<i64>,
    requested_by: &str,
    owner: Uuid,
) -> Result<BulkAction> {
    let mut tx = pool.begin().await?;
    // One creation at a time, so two cannot both see room for one more.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('orderflow.bulk_actions.create'))")
        .execute(&mut *tx)
        .await?;
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM bulk_actions WHERE state = 'RUNNING'")
        .fetch_one(&mut *tx)
        .await?;
    if running >= MAX_RUNNING {
        return Err(Error::conflict(
            "BULK_ACTIONS_BUSY",
            format!("{running} bulk actions are running, the most at once: wait for one to end or cancel one"),
        ));
    }
    let upto = last_id(&mut tx, plan).await?;
    let (total, _) = count(&mut tx, plan.action.target(), &plan.filter, upto).await?;
    if let Some(confirmed) = at_most.filter(|&n| total > n) {
        return Err(Error::conflict(
            "BULK_ACTION_CHANGED",
            format!("{total} items match now, more than the {confirmed} confirmed: run the dry run again"),
        ));
    }
    let created = sqlx::query_as(
        "INSERT INTO bulk_actions (action, filter, chunk_size, pause_ms, total, requested_by, lease_owner, lease_until,
                                   upto_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8 * interval '1 millisecond', $9)
         RETURNING *",
    )
    .bind(plan.action.as_str())
    .bind(sqlx::types::Json(&plan.filter))
    .bind(plan.chunk_size)
    .bind(plan.pause_ms)
    .bind(total)
    .bind(requested_by)
    .bind(owner)
    .bind(lease_ms())
    .bind(upto)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(created)
}

pub async fn find(conn: &mut PgConnection, id: i64) -> Result<Option<BulkAction>> {
    BULK_ACTIONS.find(conn, id).await
}

/// Actions, newest first, and how many there are.
pub async fn list(conn: &mut PgConnection, limit: i64, offset: i64) -> Result<(Vec<BulkAction>, i64)> {
    BULK_ACTIONS.list(conn, limit, offset).await
}

pub fn not_found(id: i64) -> Error {
    Error::not_found("BULK_ACTION_NOT_FOUND", format!("bulk action {id} does not exist"))
}

/// Cancels a RUNNING action: no chunk starts after this commits. `BULK_ACTION_NOT_FOUND`
/// (404), `BULK_ACTION_NOT_RUNNING` (409).
pub async fn cancel(conn: &mut PgConnection, id: i64) -> Result<BulkAction> {
    if let Some(action) = BULK_ACTIONS.cancel(&mut *conn, id).await? {
        return Ok(action);
    }
    match find(conn, id).await? {
        Some(action) => Err(Error::conflict(
            "BULK_ACTION_NOT_RUNNING",
            format!(
                "bulk action {id} is already {}",
                format!("{:?}", action.state).to_uppercase()
            ),
        )),
        None => Err(not_found(id)),
    }
}

/// Runs action `id` as `owner` until it is DONE or CANCELLED, another runner holds it, or
/// `shutdown` (then the lease is given up, so another process resumes it at once).
pub async fn run(pool: &PgPool, amqp_url: &str, id: i64, owner: Uuid, shutdown: &CancellationToken) -> Result<()> {
    let claimed: Option<BulkAction> = BULK_ACTIONS.claim(pool, id, owner).await?;
    let Some(mut action) = claimed else {
        return Ok(());
    };
    tracing::info!(
        bulk_action = id,
        action = action.action.as_str(),
        total = action.total,
        "bulk action running"
    );
    let mut destinations = Destinations::new(amqp_url);
    while action.state == State::Running && action.lease_owner == Some(owner) && !shutdown.is_cancelled() {
        let acted;
        (action, acted) = chunk(pool, id, owner, &mut destinations).await?;
        if action.state == State::Running && acted > 0 && !give_way(pool, &action, owner, shutdown).await? {
            break;
        }
    }
    if shutdown.is_cancelled() {
        BULK_ACTIONS.release(pool, id, owner).await?;
    }
    tracing::info!(
        bulk_action = id,
        state = ?action.state,
        done = action.done,
        skipped = action.skipped,
        "bulk action stopped"
    );
    Ok(())
}

/// One chunk, in one transaction that first locks the action's row (a cancel committed before
/// it stops it; a runner that lost its lease writes nothing). Returns the action as left and
/// how many items it acted on. A chunk that finds nothing ends the action (DONE).
async fn chunk(pool: &PgPool, id: i64, owner: Uuid, destinations: &mut Destinations<'_>) -> Result<(BulkAction, u64)> {
    let mut tx = pool.begin().await?;
    let action: BulkAction = sqlx::query_as("SELECT * FROM bulk_actions WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if action.state != State::Running || action.lease_owner != Some(owner) {
        tx.rollback().await?;
        return Ok((action, 0));
    }
    let by = format!("{} (bulk action {id})", action.requested_by);
    let limit = i64::from(action.chunk_size);
    let mut step = Step::default();
    match &action.filter {
        Filter::Letters(f) if action.action.target() == Target::Parked => {
            // In id order behind a cursor: a row the relay parks again is not retried again
            // by the same action.
            let set = if action.action == Action::RetryParked {
                "parked_at = NULL, retry_at = NULL, attempts = 0"
            } else {
                "discarded_at = now()"
            };
            let ids: Vec<i64> = bind_parked(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "WITH chunk AS (SELECT id FROM outbox WHERE {} AND id > $3 AND id <= $5 ORDER BY id LIMIT $4 FOR UPDATE)
                     UPDATE outbox SET {set} FROM chunk WHERE outbox.id = chunk.id RETURNING outbox.id",
                    parked_where()
                ))),
                f,
            )
            .bind(action.cursor_id)
            .bind(limit)
            .bind(action.upto_id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(id,): (i64,)| id)
            .collect();
            step.found = ids.len() as u64;
            step.cursor = ids.iter().max().copied();
            let what = if action.action == Action::RetryParked {
                "RETRIED"
            } else {
                "DISCARDED"
            };
            for id in ids {
                step.done(id.to_string(), what.to_owned());
            }
        }
        Filter::Letters(f) => {
            // Letters are taken in id order behind a cursor, so one that cannot be replayed
            // (left NEW) is looked at once.
            let letters: Vec<Letter> = bind_letters(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT * FROM dead_letters WHERE {LETTERS} AND id > $7 AND id <= $9 ORDER BY id LIMIT $8 FOR UPDATE"
                ))),
                f,
            )
            .bind(action.cursor_id)
            .bind(limit)
            .bind(action.upto_id)
            .fetch_all(&mut *tx)
            .await?;
            step.found = letters.len() as u64;
            step.cursor = letters.last().map(|l| l.id);
            if action.action == Action::ReplayDeadLetters {
                // A replayed compensation moves its parked orders: lock every such order of
                // the chunk at once, in id order, as every transaction that locks several
                // orders does, rather than letter by letter (which could deadlock with a step).
                let mut parked: Vec<Uuid> = letters
                    .iter()
                    .filter(|l| dead_letters::is_compensation(l))
                    .flat_map(|l| l.order_ids.iter().copied())
                    .collect();
                parked.sort_unstable();
                parked.dedup();
                orders::lock_all(&mut tx, &parked).await?;
                for letter in &letters {
                    match dead_letters::replay(&mut tx, letter, destinations, &by, Some(id)).await {
                        Ok(()) => step.done(letter.id.to_string(), "REPLAYED".to_owned()),
                        Err(err) if err.code() == Some("DEAD_LETTER_NOT_REPLAYABLE") => {
                            step.skipped(letter.id.to_string(), err.to_string());
                        }
                        Err(err) => return Err(err),
                    }
                }
            } else {
                let ids: Vec<i64> = letters.iter().map(|l| l.id).collect();
                for discarded in dead_letters::resolve(&mut tx, &ids, "DISCARDED", &by, Some(id)).await? {
                    step.done(discarded.to_string(), "DISCARDED".to_owned());
                }
            }
        }
        Filter::Orders(f) => {
            // Each order leaves the filter as it is acted on, so no cursor is needed. Locked in
            // id order, as every transaction that locks several orders does (no deadlocks); a
            // row a step changed meanwhile is checked again and left out.
            let found: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT * FROM orders WHERE {ORDERS} ORDER BY id LIMIT $3 FOR NO KEY UPDATE"
            )))
            .bind(&f.statuses)
            .bind(f.updated_before)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            step.found = found.len() as u64;
            let mut moves = Transitions::new();
            for order in found {
                let item = order.id.to_string();
                let to = match action.action {
                    Action::CancelOrders => moves.cancel(order, CancelReason::AdminCancelled)?,
                    _ => {
                        moves.reopen(order, OrderStatus::Cancelling);
                        OrderStatus::Cancelling
                    }
                };
                step.done(item, to.as_str().to_owned());
            }
            moves.apply(&mut tx).await?;
        }
    }
    // The chunk's audit rows, and the action's counts from them, in one statement.
    let (items, outcomes, details) = step.columns();
    let action: BulkAction = sqlx::query_as(
        "WITH items AS (
             INSERT INTO bulk_action_items (bulk_action_id, item, outcome, detail)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[])
             RETURNING outcome
         )
         UPDATE bulk_actions SET
                done = done + (SELECT count(*) FROM items WHERE outcome = 'DONE'),
                skipped = skipped + (SELECT count(*) FROM items WHERE outcome = 'SKIPPED'),
                last_skip = COALESCE($8, last_skip),
                cursor_id = COALESCE($5, cursor_id), failures = 0,
                state = CASE WHEN $6 THEN 'DONE' ELSE state END,
                finished_at = CASE WHEN $6 THEN now() END,
                lease_until = now() + $7 * interval '1 millisecond', updated_at = now()
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(items)
    .bind(outcomes)
    .bind(details)
    .bind(step.cursor)
    .bind(step.found == 0)
    .bind(lease_ms())
    .bind(step.last_skip())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let acted = step.acted();
    if acted > 0 {
        outbox::committed();
    }
    Ok((action, acted))
}

/// What one chunk did.
#[derive(Default)]
struct Step {
    /// Items the chunk's query found (none: the action is DONE).
    found: u64,
    cursor: Option<i64>,
    /// (item, DONE or SKIPPED, what was done or why not), for `bulk_action_items`, from which
    /// the action's counts are taken.
    items: Vec<(String, &'static str, String)>,
}

impl Step {
    fn done(&mut self, item: String, what: String) {
        self.items.push((item, "DONE", what));
    }

    fn skipped(&mut self, item: String, why: String) {
        self.items.push((item, "SKIPPED", why));
    }

    /// Items acted on.
    fn acted(&self) -> u64 {
        self.items.iter().filter(|(_, outcome, _)| *outcome == "DONE").count() as u64
    }

    /// The last item skipped, and why.
    fn last_skip(&self) -> Option<String> {
        let (item, _, why) = self.items.iter().rev().find(|(_, outcome, _)| *outcome == "SKIPPED")?;
        Some(format!("{item}: {why}"))
    }

    /// The items as three aligned columns, as `unnest` takes them.
    fn columns(&self) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for (item, outcome, detail) in &self.items {
            columns.0.push(item.as_str());
            columns.1.push(*outcome);
            columns.2.push(detail.as_str());
        }
        columns
    }
}

/// One item a bulk action acted on or skipped (`GET /api/admin/bulk-actions/{id}/items`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkItem {
    /// The dead letter's id or the order's id.
    pub item: String,
    /// DONE or SKIPPED.
    pub outcome: String,
    /// What was done (REPLAYED, DISCARDED, CANCELLING, CANCELLED) or why the item was skipped.
    pub detail: String,
    pub at: DateTime<Utc>,
}

/// A page of action `$1`'s items in the order they were acted on: `$2` rows from row `$3`
/// (read in that order from `bulk_action_items_order_idx`, not sorted per page).
pub const ITEMS_PAGE: &str = "SELECT item, outcome, detail, at FROM bulk_action_items WHERE bulk_action_id = $1
     ORDER BY at, item LIMIT $2 OFFSET $3";

/// The items of action `id`, in the order it reached them, and how many there are.
pub async fn items(conn: &mut PgConnection, id: i64, limit: i64, offset: i64) -> Result<(Vec<BulkItem>, i64)> {
    let rows = sqlx::query_as(ITEMS_PAGE)
        .bind(id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM bulk_action_items WHERE bulk_action_id = $1")
        .bind(id)
        .fetch_one(conn)
        .await?;
    Ok((rows, total))
}

/// Gives way to live traffic after a chunk: sleeps the action's pause, then waits while more
/// than a chunk's worth of messages wait for the relay. Meanwhile it looks whether the action
/// was cancelled (then it returns at once: the next chunk's transaction sees it) and renews
/// the lease. False on `shutdown` or a lost lease.
async fn give_way(pool: &PgPool, action: &BulkAction, owner: Uuid, shutdown: &CancellationToken) -> Result<bool> {
    let paused_until = tokio::time::Instant::now() + Duration::from_millis(action.pause_ms.max(0) as u64);
    let given_up_at = paused_until + MAX_GIVE_WAY;
    let mut renewed = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= paused_until
            && (now >= given_up_at
                || !outbox::backlog_exceeds(pool, i64::from(action.chunk_size).max(BACKLOG_FLOOR)).await?)
        {
            return Ok(true);
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
        let running: bool = sqlx::query_scalar("SELECT state = 'RUNNING' FROM bulk_actions WHERE id = $1")
            .bind(action.id)
            .fetch_one(pool)
            .await?;
        if !running {
            return Ok(true);
        }
        if renewed.elapsed() >= RENEW_EVERY {
            if !BULK_ACTIONS.renew(pool, action.id, owner).await? {
                return Ok(false);
            }
            renewed = tokio::time::Instant::now();
        }
    }
}

/// Runs in every API process until `shutdown`: every [`RESUME_EVERY`], resumes each RUNNING
/// action whose runner is gone (no lease, or an expired one).
pub async fn resume(pool: PgPool, amqp_url: String, shutdown: CancellationToken) {
    let resumer = pool.clone();
    BULK_ACTIONS
        .resume(pool, shutdown.clone(), |id, owner| {
            spawn(resumer.clone(), amqp_url.clone(), id, owner, shutdown.clone())
        })
        .await;
}

/// Runs action `id` as `owner` in a task of its own (see [`run`]). A chunk that fails is
/// counted on the row with its error and the lease given up, so any API process resumes the
/// action within [`RESUME_EVERY`]; after [`MAX_FAILURES`] in a row it is FAILED.
pub fn spawn(pool: PgPool, amqp_url: String, id: i64, owner: Uuid, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let Err(err) = run(&pool, &amqp_url, id, owner, &shutdown).await else {
            return;
        };
        tracing::warn!(bulk_action = id, error = %err, "bulk action chunk failed; it will be resumed");
        let recorded = sqlx::query(
            "UPDATE bulk_actions SET failures = failures + 1, last_error = $3, lease_owner = NULL, lease_until = NULL,
                    state = CASE WHEN failures + 1 >= $4 THEN 'FAILED' ELSE state END,
                    finished_at = CASE WHEN failures + 1 >= $4 THEN now() END, updated_at = now()
             WHERE id = $1 AND lease_owner = $2 AND state = 'RUNNING'",
        )
        .bind(id)
        .bind(owner)
        .bind(err.to_string())
        .bind(MAX_FAILURES)
        .execute(&pool)
        .await;
        if let Err(err) = recorded {
            // The lease runs out and a process resumes it from where the row says.
            tracing::warn!(bulk_action = id, error = %err, "cannot record the failure; the lease will run out");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_checks_sizes_and_that_the_filter_fits_the_action() {
        let letters = Filter::Letters(LetterFilter::default());
        let orders = Filter::Orders(OrderFilter {
            statuses: vec!["PENDING".into()],
            updated_before: Utc::now(),
        });
        assert!(Plan::new(Action::ReplayDeadLetters, letters.clone(), None, None).is_ok());
        assert!(Plan::new(Action::CancelOrders, orders.clone(), Some(1000), Some(0)).is_ok());
        let code = |r: Result<Plan>| r.err().and_then(|e| e.code());
        assert_eq!(
            code(Plan::new(Action::CancelOrders, letters.clone(), None, None)),
            Some("INVALID_FILTER")
        );
        assert_eq!(
            code(Plan::new(Action::DiscardDeadLetters, orders, None, None)),
            Some("INVALID_FILTER")
        );
        assert_eq!(
            code(Plan::new(Action::ReplayDeadLetters, letters.clone(), Some(0), None)),
            Some("INVALID_CHUNK_SIZE")
        );
        assert_eq!(
            code(Plan::new(Action::ReplayDeadLetters, letters, None, Some(10_001))),
            Some("INVALID_PAUSE")
        );
    }

    #[test]
    fn statuses_are_those_the_action_may_move() {
        assert_eq!(
            order_statuses(Action::CancelOrders, None).map(|s| s.len()).ok(),
            Some(4)
        );
        assert_eq!(
            order_statuses(Action::CancelOrders, Some("PAID")).ok(),
            Some(vec!["PAID".to_owned()])
        );
        let code = |r: Result<Vec<String>>| r.err().and_then(|e| e.code());
        assert_eq!(
            code(order_statuses(Action::CancelOrders, Some("CONFIRMED"))),
            Some("INVALID_STATUS")
        );
        assert_eq!(
            code(order_statuses(Action::CancelOrders, Some("nope"))),
            Some("INVALID_STATUS")
        );
        assert_eq!(
            order_statuses(Action::RetryCompensations, None).ok(),
            Some(vec!["COMPENSATION_FAILED".to_owned()])
        );
        assert_eq!(
            code(order_statuses(Action::RetryCompensations, Some("PAID"))),
            Some("INVALID_STATUS")
        );
    }

    #[test]
    fn a_stored_filter_reads_back_as_what_it_was() {
        let orders = Filter::Orders(OrderFilter {
            statuses: vec!["PAID".into()],
            updated_before: Utc::now(),
        });
        let letters = Filter::Letters(LetterFilter {
            queue: Some("orderflow.stock".into()),
            ..LetterFilter::default()
        });
        for f in [orders, letters, Filter::Letters(LetterFilter::default())] {
            let back: Filter =
                serde_json::from_value(serde_json::to_value(&f).unwrap_or_default()).unwrap_or_else(|_| {
                    Filter::Letters(LetterFilter {
                        reason: Some("unreadable".into()),
                        ..LetterFilter::default()
                    })
                });
            assert_eq!(back, f);
        }
    }
}
