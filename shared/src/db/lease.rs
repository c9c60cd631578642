//! Leased jobs: long work an operator starts (an event replay, a bulk action) kept as a row
//! with a `state` (RUNNING until it ends) and a lease (`lease_owner`, `lease_until`). Whoever
//! holds the lease runs the job and renews the lease as it goes; a RUNNING job whose lease ran
//! out (its runner died or stopped) is resumed by any API process ([`Jobs::resume`]). The
//! tables differ in what they hold; this is what they share.

use std::time::Duration;

use sqlx::{FromRow, PgConnection, PgPool, postgres::PgRow};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Result;

/// How long a runner's claim on a job lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often an API process looks for jobs to resume.
pub const RESUME_EVERY: Duration = Duration::from_secs(5);

/// A table of leased jobs (`id`, `state`, `lease_owner`, `lease_until`, `updated_at`,
/// `finished_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jobs {
    table: &'static str,
    /// What one job is called in logs.
    what: &'static str,
}

/// `event_replays` (`db::replay`).
pub const EVENT_REPLAYS: Jobs = Jobs {
    table: "event_replays",
    what: "replay",
};
/// `bulk_actions` (`db::bulk`).
pub const BULK_ACTIONS: Jobs = Jobs {
    table: "bulk_actions",
    what: "bulk action",
};

/// The lease's length as SQL binds it (milliseconds, times `interval '1 millisecond'`).
pub fn lease_ms() -> f64 {
    LEASE.as_millis() as f64
}

impl Jobs {
    fn sql(self, text: &str) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(text.replace("{table}", self.table))
    }

    pub async fn find<T>(self, conn: &mut PgConnection, id: i64) -> Result<Option<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(self.sql("SELECT * FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(conn)
            .await?)
    }

    /// Jobs, newest first, and how many there are.
    pub async fn list<T>(self, conn: &mut PgConnection, limit: i64, offset: i64) -> Result<(Vec<T>, i64)>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let rows = sqlx::query_as(self.sql("SELECT * FROM {table} ORDER BY id DESC LIMIT $1 OFFSET $2"))
            .bind(limit)
            .bind(offset)
            .fetch_all(&mut *conn)
            .await?;
        let total = sqlx::query_scalar(self.sql("SELECT count(*) FROM {table}"))
            .fetch_one(conn)
            .await?;
        Ok((rows, total))
    }

    /// Moves a RUNNING job to CANCELLED; None when it is not RUNNING (or does not exist).
    pub async fn cancel<T>(self, conn: &mut PgConnection, id: i64) -> Result<Option<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(self.sql(
            "UPDATE {table} SET state = 'CANCELLED', finished_at = now(), updated_at = now()
             WHERE id = $1 AND state = 'RUNNING' RETURNING *",
        ))
        .bind(id)
        .fetch_optional(conn)
        .await?)
    }

    /// Takes the lease of a RUNNING job that nobody else holds (or that is `owner`'s already).
    /// SKIP LOCKED: a step of the job in progress holds its row, so its runner is alive, and a
    /// would-be resumer goes away instead of queueing behind it with a pooled connection.
    pub async fn claim<T>(self, pool: &PgPool, id: i64, owner: Uuid) -> Result<Option<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(self.sql(
            "UPDATE {table} SET lease_owner = $2, lease_until = now() + $3 * interval '1 millisecond', updated_at = now()
             WHERE id = (SELECT id FROM {table}
                         WHERE id = $1 AND state = 'RUNNING'
                           AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())
                         FOR UPDATE SKIP LOCKED)
             RETURNING *",
        ))
        .bind(id)
        .bind(owner)
        .bind(lease_ms())
        .fetch_optional(pool)
        .await?)
    }

    /// Extends `owner`'s lease; false when it no longer holds it.
    pub async fn renew(self, pool: &PgPool, id: i64, owner: Uuid) -> Result<bool> {
        let kept = sqlx::query(self.sql(
            "UPDATE {table} SET lease_until = now() + $3 * interval '1 millisecond'
             WHERE id = $1 AND lease_owner = $2",
        ))
        .bind(id)
        .bind(owner)
        .bind(lease_ms())
        .execute(pool)
        .await?
        .rows_affected();
        Ok(kept > 0)
    }

    /// Gives up `owner`'s lease, so another process resumes the job at once.
    pub async fn release(self, pool: &PgPool, id: i64, owner: Uuid) -> Result<()> {
        sqlx::query(
            self.sql("UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2"),
        )
        .bind(id)
        .bind(owner)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Runs until `shutdown`: every [`RESUME_EVERY`], calls `spawn(id, new owner)` for each
    /// RUNNING job whose runner is gone (no lease, or an expired one).
    pub async fn resume(self, pool: PgPool, shutdown: CancellationToken, spawn: impl Fn(i64, Uuid)) {
        let mut ticker = tokio::time::interval(RESUME_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            // Within the answer deadline: a runner stuck on a primary that vanished loses its
            // lease, and this is what hands the job to a runner on the new one.
            let orphans = super::kept::answered_query(
                sqlx::query_scalar(self.sql(
                    "SELECT id FROM {table}
                     WHERE state = 'RUNNING' AND (lease_owner IS NULL OR lease_until < now()) ORDER BY id",
                ))
                .fetch_all(&pool),
            )
            .await;
            match orphans {
                Ok(ids) => ids.into_iter().for_each(|id| spawn(id, Uuid::new_v4())),
                Err(err) => tracing::warn!(error = %err, "cannot look for a {} to resume; will retry", self.what),
            }
        }
    }
}
