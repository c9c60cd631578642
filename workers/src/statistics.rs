//! Planner statistics for a database whose autovacuum is off.
//!
//! The pipeline's statements are prepared once per connection, and after five runs PostgreSQL
//! keeps a generic plan. A generic plan made while the tables were nearly empty (a fresh
//! deployment, every benchmark) scans them whole and hash-joins, and it is kept until the
//! table's statistics change: measured here, a batch's transitions went from well under a
//! millisecond to 8.5 ms once `orders` held 10,000 rows. Autovacuum's autoanalyze refreshes the
//! statistics (and so the plans) as tables grow; with autovacuum off nothing does. So the
//! recovery worker does it: every second it analyzes each table that changed past autovacuum's
//! default threshold (50 rows + 10% modified since the last analysis) and either doubled or
//! halved in size since then (what turns a plan over) or was last analyzed a minute ago or more
//! (autovacuum's default naptime). Analyzing every table past the threshold every second, as
//! autoanalyze's threshold alone would have it, cost a quarter of PostgreSQL's CPU in a
//! 20-second run at 700 orders/s on a fresh database: a growing table passes 10% every second.
//! It samples 3,000 rows (statistics target 10, not the default 100): what turns a plan over is
//! a table's size, which a small sample and the page count give as well, and at 1,679 orders/s
//! the analyses then took 0.38-0.46 s of PostgreSQL's time in 20 s instead of 0.92-1.41 s, the
//! longest 65 ms instead of 190 (a burst that held one of two cores). With autovacuum on it
//! does nothing.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the tables are looked at.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until `shutdown`.
pub async fn run(pool: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        match orderflow_shared::db::kept::answered_query(analyze_stale(&pool)).await {
            Ok(None) => break, // autovacuum is on: it keeps the statistics.
            Ok(Some(tables)) if !tables.is_empty() => tracing::debug!(?tables, "analyzed"),
            Ok(Some(_)) => {}
            Err(err) => tracing::debug!(error = %err, "could not refresh planner statistics"),
        }
    }
    Ok(())
}

/// Analyzes the tables that changed enough since their last analysis, each with a 3,000-row
/// sample. `None` when autovacuum is on (nothing to do, ever).
pub async fn analyze_stale(pool: &PgPool) -> sqlx::Result<Option<Vec<String>>> {
    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await?;
    if autovacuum == "on" {
        return Ok(None);
    }
    // reltuples is the row count at the last analysis (-1: never analyzed).
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(s.schemaname) || '.' || quote_ident(s.relname)
         FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
         WHERE s.schemaname = current_schema()
           AND s.n_mod_since_analyze > 50 + 0.1 * s.n_live_tup
           AND (s.n_live_tup > 2 * greatest(c.reltuples, 0) + 50
                OR s.n_live_tup < c.reltuples / 2 - 50
                OR greatest(s.last_analyze, s.last_autoanalyze) IS NULL
                OR greatest(s.last_analyze, s.last_autoanalyze) < now() - interval '1 minute')",
    )
    .fetch_all(pool)
    .await?;
    for table in &stale {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL default_statistics_target = 10")
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}")))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(Some(stale))
}
