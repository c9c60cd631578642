//! Replays of `order.confirmed`: publish again, with their original event ids and bodies, the
//! events of the orders confirmed in a window, for a consumer that lost them (issue 15).
//!
//! - **Where the originals live.** Every `order.confirmed` written to the outbox is kept in
//!   `confirmed_events` (order id, event id, `data.confirmedAt`, headers, the exact body
//!   bytes) by the order worker, in the transaction that confirmed the order
//!   (`workers/src/steps/order.rs`; migration `20261201000102_event_replays.sql`). The outbox's own rows are pruned a day
//!   after they were published; these are kept as long as the orders.
//! - **Window.** `[from, to)` of `data.confirmedAt` (RFC 3339), `from < to`, at most
//!   [`MAX_WINDOW_DAYS`] days; an end in the future is cut at the moment the replay is created
//!   (what comes later is being published live). Bounds of any precision; event times are
//!   whole milliseconds ([`millis`]), so the replay keeps and shows its bounds rounded up to
//!   the millisecond, which holds exactly the same events.
//! - **Through the outbox, in chunks.** A replay writes at most `chunkSize` events at a time
//!   into the outbox (same message id, same body bytes, the original headers plus
//!   [`REPLAY_HEADER`] naming the replay), waits until the relay has published them (or parked
//!   the ones the broker refuses), pauses `pauseMs`, waits while more than a chunk's worth of
//!   other messages wait for the relay (live orders first: the replay never makes a backlog
//!   grow), and goes on from a keyset cursor (`confirmed_at, order_id`). So it is never more
//!   than one chunk ahead of live traffic in the relay's queue, and its rate is at most
//!   `chunkSize / (publish time + pauseMs)`.
//! - **Progress and cancel.** The `event_replays` row says the state (RUNNING, DONE,
//!   CANCELLED), the window, `total` (events in the window when it was created), `enqueued`,
//!   `published`, `parked`, when it started and finished. Cancelling takes effect before the
//!   next chunk (the chunk's transaction locks the row and checks the state); a chunk already
//!   written is still published.
//! - **Who runs it.** Whoever created it (the API process, or `orderflow events replay` in the
//!   foreground) holds a lease on the row ([`LEASE`], renewed at every step). Every API
//!   process looks every [`RESUME_EVERY`] for RUNNING replays whose lease ran out (their
//!   runner died or stopped) and resumes them where the row says; a chunk written but not yet
//!   counted (`pending`) is waited for first, so nothing is counted twice.
//!
//! Delivery stays at least once: a consumer dedupes by event id, which is exactly what makes a
//! replay safe.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Error, Result,
    db::{
        lease::{EVENT_REPLAYS, lease_ms},
        outbox,
    },
    messaging::{MessageType, envelope::millis},
};

/// The header a replayed event carries (the replay's id), besides its original ones. The
/// body and the message id are the original's.
pub const REPLAY_HEADER: &str = "x-orderflow-event-replay";
/// Longest window one replay may cover.
pub const MAX_WINDOW_DAYS: i64 = 31;
/// Events written to the outbox per chunk, unless asked otherwise (1..=[`MAX_CHUNK_SIZE`]).
pub const DEFAULT_CHUNK_SIZE: i32 = 100;
pub const MAX_CHUNK_SIZE: i32 = 1_000;
/// Pause after each chunk is published, unless asked otherwise (0..=[`MAX_PAUSE_MS`]).
pub const DEFAULT_PAUSE_MS: i32 = 100;
/// Kept below [`LEASE`], so a pausing runner never loses its lease.
pub const MAX_PAUSE_MS: i32 = 10_000;
pub use super::lease::{LEASE, RESUME_EVERY};
/// How often a runner looks whether its chunk has been published.
const POLL: Duration = Duration::from_millis(20);
/// How often a pausing runner looks whether its replay was cancelled.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often a runner that gives way to a relay backlog looks again.
const BACKLOG_POLL: Duration = Duration::from_millis(50);
/// How often a runner that waits for the relay renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ReplayState {
    /// Publishing, or waiting to be resumed.
    Running,
    /// Every event of the window was published (or parked).
    Done,
    /// Stopped by an operator; what it had written to the outbox is still published.
    Cancelled,
}

impl ReplayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Done => "DONE",
            Self::Cancelled => "CANCELLED",
        }
    }
}

impl TryFrom<String> for ReplayState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "RUNNING" => Ok(Self::Running),
            "DONE" => Ok(Self::Done),
            "CANCELLED" => Ok(Self::Cancelled),
            _ => Err(format!("unknown replay state {s:?}")),
        }
    }
}

/// One replay, as `GET /api/admin/events/replays/{id}` shows it. Counts are events; times are
/// RFC 3339 UTC.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub state: ReplayState,
    /// Start of the window (inclusive), on `data.confirmedAt`.
    #[serde(rename = "from", with = "millis")]
    #[sqlx(rename = "window_from")]
    #[schema(value_type = String, format = DateTime)]
    pub window_from: DateTime<Utc>,
    /// End of the window (exclusive); a requested end in the future is cut at `startedAt`.
    #[serde(rename = "to", with = "millis")]
    #[sqlx(rename = "window_to")]
    #[schema(value_type = String, format = DateTime)]
    pub window_to: DateTime<Utc>,
    /// Events written to the outbox at a time.
    pub chunk_size: i32,
    /// Pause after each chunk is published, in milliseconds.
    pub pause_ms: i32,
    /// Events in the window when the replay was created.
    pub total: i64,
    /// Events written to the outbox so far.
    pub enqueued: i64,
    /// Events the broker confirmed so far.
    pub published: i64,
    /// Events the broker kept refusing: parked for an operator (`/api/admin/outbox/parked`).
    pub parked: i64,
    /// Who asked: `admin:<user id>` (`admin:<user id> (<issuer>#<sub>)` for a user of the identity
    /// provider) or `cli`.
    pub requested_by: String,
    #[serde(rename = "startedAt")]
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub cursor_at: DateTime<Utc>,
    #[serde(skip)]
    pub cursor_order: Uuid,
    /// Outbox ids of the last chunk, until it is published.
    #[serde(skip)]
    pub pending: Vec<i64>,
    #[serde(skip)]
    pub lease_owner: Option<Uuid>,
}

/// A validated request for a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub chunk_size: i32,
    pub pause_ms: i32,
}

impl Plan {
    /// Checks a request made at `now`: RFC 3339 times (`INVALID_TIME`), `from < to` once `to`
    /// is cut at `now` (`INVALID_WINDOW`), at most [`MAX_WINDOW_DAYS`] days
    /// (`WINDOW_TOO_LONG`), a chunk size within 1..=[`MAX_CHUNK_SIZE`] (`INVALID_CHUNK_SIZE`)
    /// and a pause within 0..=[`MAX_PAUSE_MS`] (`INVALID_PAUSE`). A field on its own is a 400;
    /// the two that compare fields with each other or with the clock (`INVALID_WINDOW`,
    /// `WINDOW_TOO_LONG`) are 422, as a request valid by the schema is never a 400.
    pub fn parse(
        from: &str,
        to: &str,
        chunk_size: Option<i64>,
        pause_ms: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Self> {
        // Cut to the microsecond PostgreSQL keeps, so the window compared is the one stored.
        let time = |name: &str, value: &str| {
            DateTime::parse_from_rfc3339(value.trim())
                .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
                .map_err(|e| {
                    Error::bad_request(
                        "INVALID_TIME",
                        format!("{name} {value:?} is not an RFC 3339 time (e.g. 2026-11-21T10:00:00Z): {e}"),
                    )
                })
        };
        let from = time("from", from)?;
        let to = time("to", to)?.min(now.trunc_subsecs(6));
        if from >= to {
            return Err(Error::unprocessable(
                "INVALID_WINDOW",
                format!(
                    "from must be before to (and before now, {})",
                    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
            ));
        }
        if to - from > TimeDelta::days(MAX_WINDOW_DAYS) {
            return Err(Error::unprocessable(
                "WINDOW_TOO_LONG",
                format!("a replay covers at most {MAX_WINDOW_DAYS} days; split the window"),
            ));
        }
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
        // Event times are whole milliseconds, so the bounds rounded up to one hold exactly the
        // same events (possibly none: [t + 0.2 ms, t + 0.7 ms) holds no whole millisecond), and
        // are what the replay shows.
        Ok(Self {
            from: millis::ceil(from),
            to: millis::ceil(to),
            chunk_size: chunk_size as i32,
            pause_ms: pause_ms as i32,
        })
    }
}

/// Creates a RUNNING replay of `plan` (counting its events), leased to `owner` when given (the
/// caller runs it next with [`run`]); without an owner an API process resumes it.
/// Creates a RUNNING replay of `plan`'s window. `REPLAY_OVERLAPS` (409) when a running replay
/// covers part of the window (the same events twice: a double-click, two operators), nothing
/// created.
pub async fn create(conn: &mut PgConnection, plan: &Plan, requested_by: &str, owner: Option<Uuid>) -> Result<Replay> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    // One creation at a time, so two cannot both find the window free.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('orderflow.event_replays.create'))")
        .execute(&mut *tx)
        .await?;
    // (id, window, whether nobody runs it: no lease, or one that ran out)
    let running: Option<(i64, DateTime<Utc>, DateTime<Utc>, bool)> = sqlx::query_as(
        "SELECT id, window_from, window_to, lease_owner IS NULL OR lease_until < now() FROM event_replays
         WHERE state = 'RUNNING' AND window_from < $2 AND window_to > $1 ORDER BY id LIMIT 1",
    )
    .bind(plan.from)
    .bind(plan.to)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((id, from, to, orphaned)) = running {
        let unrun = if orphaned {
            " (nobody runs it now: an API process resumes it within seconds of starting, or \
             `orderflow events replay --resume` runs it)"
        } else {
            ""
        };
        return Err(Error::conflict(
            "REPLAY_OVERLAPS",
            format!(
                "replay {id} is replaying {} to {}, which overlaps this window{unrun}: wait for it or cancel it",
                from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                to.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        ));
    }
    let created = sqlx::query_as(
        "INSERT INTO event_replays (window_from, window_to, chunk_size, pause_ms, total, cursor_at, cursor_order,
                                    requested_by, lease_owner, lease_until)
         VALUES ($1, $2, $3, $4,
                 (SELECT count(*) FROM confirmed_events WHERE confirmed_at >= $1 AND confirmed_at < $2),
                 $1, '00000000-0000-0000-0000-000000000000', $5, $6,
                 CASE WHEN $6::uuid IS NOT NULL THEN now() + $7 * interval '1 millisecond' END)
         RETURNING *",
    )
    .bind(plan.from)
    .bind(plan.to)
    .bind(plan.chunk_size)
    .bind(plan.pause_ms)
    .bind(requested_by)
    .bind(owner)
    .bind(lease_ms())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(created)
}

pub async fn find(conn: &mut PgConnection, id: i64) -> Result<Option<Replay>> {
    EVENT_REPLAYS.find(conn, id).await
}

/// Replays, newest first, and how many there are.
pub async fn list(conn: &mut PgConnection, limit: i64, offset: i64) -> Result<(Vec<Replay>, i64)> {
    EVENT_REPLAYS.list(conn, limit, offset).await
}

/// Cancels a RUNNING replay: no chunk is written after this commits. `REPLAY_NOT_FOUND`
/// (404), `REPLAY_NOT_RUNNING` (409: already DONE or CANCELLED).
pub async fn cancel(conn: &mut PgConnection, id: i64) -> Result<Replay> {
    if let Some(replay) = EVENT_REPLAYS.cancel(&mut *conn, id).await? {
        return Ok(replay);
    }
    match find(conn, id).await? {
        Some(replay) => Err(Error::conflict(
            "REPLAY_NOT_RUNNING",
            format!("replay {id} is already {}", replay.state.as_str()),
        )),
        None => Err(not_found(id)),
    }
}

pub fn not_found(id: i64) -> Error {
    Error::not_found("REPLAY_NOT_FOUND", format!("replay {id} does not exist"))
}

/// Runs replay `id` as `owner` until it is DONE or CANCELLED, another runner holds it, or
/// `shutdown` (then the lease is given up, so another process resumes it at once). Calls
/// `progress` after each step. Returns the replay as last seen (None: no such replay).
pub async fn run(
    pool: &PgPool,
    id: i64,
    owner: Uuid,
    shutdown: &CancellationToken,
    mut progress: impl FnMut(&Replay),
) -> Result<Option<Replay>> {
    let Some(mut replay) = EVENT_REPLAYS.claim::<Replay>(pool, id, owner).await? else {
        // Not RUNNING, or someone else runs it.
        return find(&mut *pool.acquire().await?, id).await;
    };
    tracing::info!(replay = id, from = %replay.window_from, to = %replay.window_to, total = replay.total, "replaying order.confirmed");
    progress(&replay);
    loop {
        if !replay.pending.is_empty() {
            let full = replay.pending.len() >= replay.chunk_size as usize;
            match wait_published(pool, &replay, owner, shutdown).await? {
                Some(counted) => replay = counted,
                None => break,
            }
            progress(&replay);
            if replay.state != ReplayState::Running {
                break;
            }
            // After a full chunk there may be more: let live traffic through first.
            if full && !give_way(pool, &replay, owner, shutdown).await? {
                break;
            }
        }
        replay = next_chunk(pool, id, owner).await?;
        progress(&replay);
        if replay.state != ReplayState::Running || replay.lease_owner != Some(owner) {
            break;
        }
    }
    if shutdown.is_cancelled() && replay.state == ReplayState::Running {
        EVENT_REPLAYS.release(pool, id, owner).await?;
    }
    tracing::info!(
        replay = id,
        state = replay.state.as_str(),
        enqueued = replay.enqueued,
        published = replay.published,
        parked = replay.parked,
        "replay stopped"
    );
    Ok(Some(replay))
}

/// Waits until the relay has published (or parked) every row of the pending chunk, renewing
/// the lease meanwhile, then counts them. None: the lease was lost, or `shutdown`.
async fn wait_published(
    pool: &PgPool,
    replay: &Replay,
    owner: Uuid,
    shutdown: &CancellationToken,
) -> Result<Option<Replay>> {
    let mut renewed = tokio::time::Instant::now();
    loop {
        // Rows pruned since (published over a day ago) count as published.
        let (waiting, parked): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE sent_at IS NULL AND parked_at IS NULL),
                    count(*) FILTER (WHERE sent_at IS NULL AND parked_at IS NOT NULL)
             FROM outbox WHERE id = ANY($1)",
        )
        .bind(&replay.pending)
        .fetch_one(pool)
        .await?;
        if waiting == 0 {
            let published = replay.pending.len() as i64 - parked;
            return Ok(sqlx::query_as(
                "UPDATE event_replays SET published = published + $3, parked = parked + $4, pending = '{}',
                        lease_until = now() + $5 * interval '1 millisecond', updated_at = now()
                 WHERE id = $1 AND lease_owner = $2 AND pending = $6
                 RETURNING *",
            )
            .bind(replay.id)
            .bind(owner)
            .bind(published)
            .bind(parked)
            .bind(lease_ms())
            .bind(&replay.pending)
            .fetch_optional(pool)
            .await?);
        }
        if renewed.elapsed() >= RENEW_EVERY {
            if !EVENT_REPLAYS.renew(pool, replay.id, owner).await? {
                return Ok(None);
            }
            renewed = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Gives way to live traffic before the next chunk: sleeps the replay's pause, then waits
/// while more than a chunk's worth of messages wait for the relay (it is behind; live orders
/// go first, the replay never makes a backlog grow). Meanwhile it looks every
/// [`CHECK_EVERY`] whether the replay was cancelled (then it returns at once: the next
/// chunk's transaction sees it) and renews the lease. False on `shutdown` or a lost lease.
async fn give_way(pool: &PgPool, replay: &Replay, owner: Uuid, shutdown: &CancellationToken) -> Result<bool> {
    let paused_until = tokio::time::Instant::now() + Duration::from_millis(replay.pause_ms.max(0) as u64);
    let mut renewed = tokio::time::Instant::now();
    loop {
        let left = paused_until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() && !outbox::backlog_exceeds(pool, i64::from(replay.chunk_size)).await? {
            return Ok(true);
        }
        let nap = if left.is_zero() {
            BACKLOG_POLL
        } else {
            left.min(CHECK_EVERY)
        };
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
        let running: bool = sqlx::query_scalar("SELECT state = 'RUNNING' FROM event_replays WHERE id = $1")
            .bind(replay.id)
            .fetch_one(pool)
            .await?;
        if !running {
            return Ok(true);
        }
        if renewed.elapsed() >= RENEW_EVERY {
            if !EVENT_REPLAYS.renew(pool, replay.id, owner).await? {
                return Ok(false);
            }
            renewed = tokio::time::Instant::now();
        }
    }
}

/// Writes the next chunk of the window into the outbox and moves the cursor past it, in one
/// transaction that first locks the replay row (so a cancel that committed before it stops
/// it, and a runner that lost its lease to another writes nothing and stops). An empty chunk ends the replay
/// (DONE). Returns the replay as it is left.
async fn next_chunk(pool: &PgPool, id: i64, owner: Uuid) -> Result<Replay> {
    let mut tx = pool.begin().await?;
    let replay: Replay = sqlx::query_as("SELECT * FROM event_replays WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if replay.state != ReplayState::Running || replay.lease_owner != Some(owner) {
        tx.rollback().await?;
        return Ok(replay);
    }
    let chunk: (Vec<i64>, Option<DateTime<Utc>>, Option<Uuid>) = sqlx::query_as(
        "WITH chunk AS (
             SELECT order_id, event_id, confirmed_at, headers,
                    -- An event an earlier release published as its envelope goes out as the
                    -- CloudEvent it stands for (same id, type, time, subject and data).
                    CASE WHEN b ? 'specversion' THEN body
                         ELSE convert_to(jsonb_build_object(
                                  'specversion', '1.0', 'id', b->'id', 'source', $9::text, 'type', b->'type',
                                  'time', b->'occurredAt', 'subject', b->'orderId',
                                  'datacontenttype', 'application/json', 'data', b->'data')::text, 'UTF8')
                    END AS body
             FROM confirmed_events, LATERAL (SELECT convert_from(body, 'UTF8')::jsonb AS b) AS parsed
             WHERE (confirmed_at, order_id) > ($1, $2) AND confirmed_at < $3
             ORDER BY confirmed_at, order_id LIMIT $4
         ), sent AS (
             INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_ids, headers, body)
             SELECT event_id, $5, $6, $6, ARRAY[order_id], headers || jsonb_build_object($7::text, $8::text), body
             FROM chunk ORDER BY confirmed_at, order_id
             RETURNING id
         )
         SELECT ARRAY(SELECT id FROM sent ORDER BY id), last.confirmed_at, last.order_id
         FROM (SELECT 1) AS one
         LEFT JOIN (SELECT confirmed_at, order_id FROM chunk ORDER BY confirmed_at DESC, order_id DESC LIMIT 1) AS last ON true",
    )
    .bind(replay.cursor_at)
    .bind(replay.cursor_order)
    .bind(replay.window_to)
    .bind(i64::from(replay.chunk_size))
    .bind(MessageType::OrderConfirmed.exchange())
    .bind(MessageType::OrderConfirmed.as_str())
    .bind(REPLAY_HEADER)
    .bind(id.to_string())
    .bind(crate::messaging::envelope::EVENT_SOURCE)
    .fetch_one(&mut *tx)
    .await?;
    let (ids, last_at, last_order) = chunk;
    let replay: Replay = sqlx::query_as(
        "UPDATE event_replays SET cursor_at = COALESCE($2, cursor_at), cursor_order = COALESCE($3, cursor_order),
                enqueued = enqueued + cardinality($4::int8[]), pending = $4,
                state = CASE WHEN cardinality($4::int8[]) = 0 THEN 'DONE' ELSE state END,
                finished_at = CASE WHEN cardinality($4::int8[]) = 0 THEN now() END,
                lease_until = now() + $5 * interval '1 millisecond', updated_at = now()
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(last_at)
    .bind(last_order)
    .bind(&ids)
    .bind(lease_ms())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if !ids.is_empty() {
        outbox::committed();
    }
    Ok(replay)
}

/// Runs in every API process until `shutdown`: every [`RESUME_EVERY`], resumes each RUNNING
/// replay whose runner is gone (no lease, or an expired one), each in a task of its own.
pub async fn resume(pool: PgPool, shutdown: CancellationToken) {
    let resumer = pool.clone();
    EVENT_REPLAYS
        .resume(pool, shutdown.clone(), |id, owner| {
            spawn(resumer.clone(), id, owner, shutdown.clone())
        })
        .await;
}

/// Runs replay `id` as `owner` in a task of its own (see [`run`]).
pub fn spawn(pool: PgPool, id: i64, owner: Uuid, shutdown: CancellationToken) {
    tokio::spawn(async move {
        if let Err(err) = run(&pool, id, owner, &shutdown, |_| {}).await {
            // The lease runs out and a process resumes it from where the row says.
            tracing::warn!(replay = id, error = %err, "replay interrupted; it will be resumed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn code(r: Result<Plan>) -> Option<&'static str> {
        r.err().and_then(|e| e.code())
    }

    #[test]
    fn a_plan_checks_times_window_chunk_and_pause() {
        let now = at("2026-12-01T12:00:00Z");
        let plan = Plan::parse("2026-12-01T10:00:00Z", "2026-12-01T11:00:00+00:00", None, None, now);
        assert_eq!(
            plan.ok(),
            Some(Plan {
                from: at("2026-12-01T10:00:00Z"),
                to: at("2026-12-01T11:00:00Z"),
                chunk_size: DEFAULT_CHUNK_SIZE,
                pause_ms: DEFAULT_PAUSE_MS
            })
        );
        // An end in the future is cut at now.
        let cut = Plan::parse("2026-12-01T10:00:00Z", "2027-01-01T00:00:00Z", Some(5), Some(0), now);
        assert_eq!(cut.map(|p| (p.to, p.chunk_size, p.pause_ms)).ok(), Some((now, 5, 0)));
        assert_eq!(
            code(Plan::parse("yesterday", "2026-12-01T11:00:00Z", None, None, now)),
            Some("INVALID_TIME")
        );
        assert_eq!(
            code(Plan::parse("2026-12-01T10:00:00Z", "2026-12-01", None, None, now)),
            Some("INVALID_TIME")
        );
        let same = Plan::parse("2026-12-01T10:00:00Z", "2026-12-01T10:00:00Z", None, None, now);
        assert_eq!(code(same), Some("INVALID_WINDOW"));
        // Apart by less than the microsecond PostgreSQL keeps: the same instant once stored.
        let within = Plan::parse(
            "2026-12-01T10:00:00.0000001Z",
            "2026-12-01T10:00:00.0000009Z",
            None,
            None,
            now,
        );
        assert_eq!(code(within), Some("INVALID_WINDOW"));
        let future = Plan::parse("2026-12-02T10:00:00Z", "2026-12-03T10:00:00Z", None, None, now);
        assert_eq!(code(future), Some("INVALID_WINDOW"));
        let long = Plan::parse("2026-10-01T00:00:00Z", "2026-12-01T00:00:00Z", None, None, now);
        assert_eq!(code(long), Some("WINDOW_TOO_LONG"));
        let ok = "2026-12-01T10:00:00Z";
        assert_eq!(
            code(Plan::parse(ok, "2026-12-01T11:00:00Z", Some(0), None, now)),
            Some("INVALID_CHUNK_SIZE")
        );
        assert_eq!(
            code(Plan::parse(ok, "2026-12-01T11:00:00Z", Some(1_001), None, now)),
            Some("INVALID_CHUNK_SIZE")
        );
        assert_eq!(
            code(Plan::parse(ok, "2026-12-01T11:00:00Z", None, Some(-1), now)),
            Some("INVALID_PAUSE")
        );
        assert_eq!(
            code(Plan::parse(ok, "2026-12-01T11:00:00Z", None, Some(10_001), now)),
            Some("INVALID_PAUSE")
        );
    }
}
