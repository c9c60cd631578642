//! Database access: pool, creation of the database if missing, migrations, and the queries
//! shared by the API and the workers. Query functions take `&mut PgConnection` so that the
//! caller owns the transaction.

pub mod orders;
pub mod outbox;
pub mod replay;
pub mod stored_json;

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use sqlx::{
    ConnectOptions, Connection, Executor, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Parses the URL, creates the database if it does not exist, applies migrations and
/// returns a pool of at most `max_connections`. While PostgreSQL is unreachable (it may
/// start after us, or be restarting) it retries with backoff for up to two minutes.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let prepare = || async {
        create_database_if_missing(url).await?;
        // One dedicated connection: migrations hold an advisory lock while several processes
        // start at once, and must not compete with a small pool for connections.
        let mut conn = PgConnection::connect(url).await.context("connecting to PostgreSQL")?;
        MIGRATOR.run(&mut conn).await.context("applying migrations")?;
        conn.close().await.ok();
        anyhow::Ok(())
    };
    prepare
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(Duration::from_secs(120)))
                .without_max_times()
                .with_jitter(),
        )
        .when(|e: &anyhow::Error| {
            e.chain().any(|c| {
                c.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::error::is_unavailable)
                    || c.downcast_ref::<sqlx::migrate::MigrateError>().is_some_and(
                        |m| matches!(m, sqlx::migrate::MigrateError::Execute(e) if crate::error::is_unavailable(e)),
                    )
            })
        })
        .notify(|err, delay| tracing::warn!(error = %format!("{err:#}"), ?delay, "PostgreSQL not ready; retrying"))
        .await?;
    pool(url, max_connections)
}

/// A lazily connecting pool: the process starts even while PostgreSQL is down, and requests
/// get 503 until it is back.
/// How long a pooled connection may sit idle before it is checked again when handed out.
const RECHECK_IDLE: Duration = Duration::from_secs(1);

pub fn pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        // sqlx checks every connection as it goes back to the pool; checking it again as it
        // comes out is one more round trip per transaction. Only a connection that sat idle
        // long enough to have been cut (a server restart takes longer) is checked again.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= RECHECK_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}

/// Connects to the server's `postgres` database and creates the target one if missing.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(url).context("DATABASE_URL is not a valid PostgreSQL URL")?;
    let name = options
        .get_database()
        .context("DATABASE_URL names no database")?
        .to_owned();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .context("connecting to PostgreSQL")?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let stmt = format!("CREATE DATABASE {}", quote_ident(&name));
        match admin.execute(sqlx::AssertSqlSafe(stmt)).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it at the same moment: duplicate_database, or, when the
            // two CREATEs overlap in the catalog, a unique violation on pg_database's name.
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
