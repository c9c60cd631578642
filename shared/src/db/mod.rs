//! Database access: pool, creation of the database if missing, migrations, and the queries
//! shared by the API and the workers. Query functions take `&mut PgConnection` so that the
//! caller owns the transaction.

pub mod bulk;
pub mod dead_letters;
pub mod history;
pub mod kept;
pub mod lease;
pub mod orders;
pub mod outbox;
pub mod primary;
pub mod replay;
pub mod stored_json;
pub mod url;

use std::time::{Duration, Instant};

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use sqlx::{
    Connection, Executor, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use self::primary::{Follower, NoPrimary};
pub use self::url::DatabaseUrl;

/// This release's migrations. The database may also hold migrations of a later release (one
/// rolling out beside this one, or one rolled back from): every migration only expands the
/// schema the previous release uses (docs/UPGRADING.md), so this release runs on it instead of
/// refusing it; it still refuses a migration it knows whose text changed.
pub static MIGRATOR: sqlx::migrate::Migrator = {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.ignore_missing = true;
    // The lock is taken by `migrate`, without waiting inside a statement (see there).
    migrator.locking = false;
    migrator
};

/// Applies the migrations the database lacks, one process at a time, and repairs indexes a
/// failed concurrent build left invalid.
///
/// The lock is sqlx's (the same advisory lock, so a previous release starting beside this one
/// still excludes it), but waited for by asking every 100 ms instead of inside a blocking
/// `pg_advisory_lock`: a statement waiting there holds a snapshot, which a `CREATE INDEX
/// CONCURRENTLY` in the migrating process waits for, while it waits for the lock, a deadlock
/// PostgreSQL ends by cancelling one of them. When it cancels the build, the index stays behind
/// invalid (kept up on every write, used by no query) and the migration's rerun, `IF NOT EXISTS`,
/// skips it. So, under the lock, every invalid index of the schema is built again.
///
/// A start that finds nothing to do (every migration applied as written, no index left invalid)
/// takes no lock: a session lock cannot be held through a transaction-mode pooler (its unlock
/// may reach another server session, leaving the lock on a pooled one and every later start
/// waiting for it), so processes behind one start without it once `orderflow migrate` has run
/// on a direct connection (docs/SCALING.md).
pub async fn migrate(conn: &mut PgConnection) -> anyhow::Result<()> {
    if up_to_date(conn).await? {
        return Ok(());
    }
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await?;
    let key = migration_lock_key(&database);
    let asked = Instant::now();
    let mut said = false;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?
    {
        if !said && asked.elapsed() >= Duration::from_secs(10) {
            said = true;
            let holder: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND classid = ($1 >> 32)::int8::oid AND objid = ($1 & 4294967295)::oid AND objsubid = 1",
            )
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
            tracing::warn!(
                ?holder,
                "waiting for another process to finish migrating (the session holding the lock)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let migrated = async {
        MIGRATOR.run(&mut *conn).await.context("applying migrations")?;
        rebuild_invalid_indexes(conn).await
    }
    .await;
    let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await;
    migrated?;
    if !unlocked? {
        tracing::error!(
            "the migration lock was not held by this session when released (a transaction-mode pooler \
             between this process and PostgreSQL?): a pooled server session may keep it, and later \
             starts wait for it (docs/SCALING.md)"
        );
    }
    Ok(())
}

/// Whether every migration of this release is applied with the text it has here, and none of
/// its indexes is invalid: then [`migrate`] has nothing to do. (A migration of a later
/// release in the table is not this release's concern, as for the migrator.)
async fn up_to_date(conn: &mut PgConnection) -> anyhow::Result<bool> {
    let table = MIGRATOR.table_name.as_ref();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(false);
    }
    let applied: std::collections::HashMap<i64, Vec<u8>> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, checksum FROM {table} WHERE success"
    )))
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let all_applied = MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).all(|m| {
        applied
            .get(&m.version)
            .is_some_and(|sum| sum.as_slice() == m.checksum.as_ref())
    });
    Ok(all_applied && invalid_indexes(conn).await?.is_empty())
}

/// The advisory lock sqlx's migrator takes for `database` (sqlx-postgres `generate_lock_id`:
/// 0x3d32ad9e times the database name's CRC-32, the ISO-HDLC/zlib one).
pub fn migration_lock_key(database: &str) -> i64 {
    let mut crc = !0u32;
    for &byte in database.as_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
}

/// Builds again, in place (`REINDEX INDEX CONCURRENTLY`: the table stays writable, and the
/// index is swapped only once the new one is whole), every invalid index of the current schema
/// that orderflow's migrations create; what others build (an operator's index, a REINDEX's
/// leftovers) is not orderflow's to touch. A rebuild that fails is logged and left for the next
/// start.
async fn rebuild_invalid_indexes(conn: &mut PgConnection) -> anyhow::Result<()> {
    for name in invalid_indexes(conn).await? {
        tracing::warn!(index = %name, "an index a cancelled concurrent build left invalid is built again");
        let rebuilt = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "REINDEX INDEX CONCURRENTLY {}",
            quote_ident(&name)
        )))
        .execute(&mut *conn)
        .await;
        if let Err(err) = rebuilt {
            tracing::warn!(index = %name, error = %err, "rebuilding an invalid index failed; the next start tries again");
        }
    }
    Ok(())
}

/// The indexes a migration of this release builds concurrently that are invalid (a cancelled
/// build left them so). Others (an operator's own) are not this code's to rebuild, nor a
/// reason to take the migration lock.
async fn invalid_indexes(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace",
    )
    .fetch_all(&mut *conn)
    .await?;
    let ours = |name: &str| {
        MIGRATOR.iter().any(|m| {
            m.sql
                .as_str()
                .contains(&format!("INDEX CONCURRENTLY IF NOT EXISTS {name} "))
        })
    };
    Ok(invalid.into_iter().filter(|name| ours(name)).collect())
}

/// Parses the URL (one host or several, [`DatabaseUrl`]), finds the node that accepts writes,
/// creates the database there if it does not exist, applies migrations there and returns a
/// pool of at most `max_connections` ([`pool`]). While no node can be used (PostgreSQL may
/// start after us, be restarting, or be failing over) it retries with backoff for up to two
/// minutes.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let parsed = DatabaseUrl::parse(url)?;
    let prepare = || async {
        let (node, admin) = primary::find(&parsed.with_database("postgres"))
            .await
            .context("connecting to PostgreSQL")?;
        create_database_if_missing(admin, parsed.database().context("DATABASE_URL names no database")?).await?;
        // One dedicated connection: migrations hold an advisory lock while several processes
        // start at once, and must not compete with a small pool for connections.
        let mut conn = PgConnection::connect_with(&parsed.nodes[node])
            .await
            .context("connecting to PostgreSQL")?;
        migrate(&mut conn).await?;
        note_later_migrations(&mut conn).await?;
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
                c.downcast_ref::<NoPrimary>().is_some_and(NoPrimary::is_transient)
                    || c.downcast_ref::<sqlx::Error>()
                        .is_some_and(crate::error::is_unavailable)
                    || c.downcast_ref::<sqlx::migrate::MigrateError>().is_some_and(
                        |m| matches!(m, sqlx::migrate::MigrateError::Execute(e) if crate::error::is_unavailable(e)),
                    )
            })
        })
        .notify(|err, delay| tracing::warn!(error = %format!("{err:#}"), ?delay, "PostgreSQL not ready; retrying"))
        .await?;
    pool_with_startup_options(url, max_connections, &[CONNECTION_CHECK]).await
}

/// Every pool's sessions look every 2 s, while a statement runs (a lock wait included),
/// whether their client is still there (PostgreSQL 14's `client_connection_check_interval`).
/// A transaction given up after [`kept::ANSWER_DEADLINE`] closes its connection; without the
/// check the server would go on running it, holding its locks and its backend, until the wait
/// ended by itself, while the retry opens another.
pub const CONNECTION_CHECK: (&str, &str) = ("client_connection_check_interval", "2s");

/// Says (once, at start) when the schema holds migrations of a later release.
async fn note_later_migrations(conn: &mut PgConnection) -> anyhow::Result<()> {
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(&mut *conn)
        .await?;
    let later: Vec<i64> = applied.into_iter().filter(|v| !MIGRATOR.version_exists(*v)).collect();
    if !later.is_empty() {
        tracing::info!(
            migrations = ?later,
            "the schema has migrations of a later release; this release runs on it (each migration only expands the schema, docs/UPGRADING.md)"
        );
    }
    Ok(())
}

/// How long a pooled connection may sit idle before it is checked again when handed out.
const RECHECK_IDLE: Duration = Duration::from_secs(1);

/// A lazily connecting pool of at most `max_connections`: the process starts even while
/// PostgreSQL is down, and requests get 503 until it is back. For a URL with several hosts the
/// pool follows the node that accepts writes ([`primary::Follower`], a task that ends when the
/// pool is closed). Must be called inside a tokio runtime.
pub fn pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    build_pool(DatabaseUrl::parse(url)?, max_connections)
}

/// [`pool`] for the workers. With `generic_plans` (WORKER_GENERIC_PLANS) its connections
/// plan each prepared statement once (`plan_cache_mode = force_generic_plan`, set in their
/// startup options, [`pool_with_startup_options`]). A worker runs a few statements over and
/// over, most of them on arrays of ids, and with the default (`auto`) PostgreSQL plans such a
/// statement again on every call, since only a custom plan knows the array's length;
/// docs/PERFORMANCE.md measures both. The API keeps the default: the best plans of its reads
/// depend on their parameters (a user's page of orders, a search).
pub async fn worker_pool(url: &str, max_connections: u32, generic_plans: bool) -> anyhow::Result<PgPool> {
    let options: &[(&str, &str)] = if generic_plans {
        &[("plan_cache_mode", "force_generic_plan"), CONNECTION_CHECK]
    } else {
        &[CONNECTION_CHECK]
    };
    pool_with_startup_options(url, max_connections, options).await
}

/// [`pool`] whose connections set `options` (`(setting, value)` pairs) at startup, on every
/// node of the URL. One connection is opened first: if the database refuses it (a pooler in
/// front of PostgreSQL that does not pass startup options on, such as PgBouncer unless
/// `options` is in its `ignore_startup_parameters`; a server without the setting) and accepts
/// one without them, the pool goes without, with a warning: a setting for speed must not stop
/// the process. Any other failure is left to the pool's own handling (the database may be
/// restarting).
pub async fn pool_with_startup_options(
    url: &str,
    max_connections: u32,
    options: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    if options.is_empty() {
        return pool(url, max_connections);
    }
    let mut parsed = DatabaseUrl::parse(url)?;
    for node in &mut parsed.nodes {
        *node = node.clone().options(options.iter().copied());
    }
    let with = build_pool(parsed, max_connections)?;
    let refused = match with.acquire().await {
        Err(sqlx::Error::Database(refused)) => refused,
        _ => return Ok(with),
    };
    let without = pool(url, max_connections)?;
    if without.acquire().await.is_err() {
        without.close().await;
        return Ok(with);
    }
    tracing::warn!(
        ?options,
        error = %refused,
        "the database refused these settings at connection startup; this pool runs without them"
    );
    with.close().await;
    Ok(without)
}

/// The pool of [`pool`] for a parsed URL (its nodes' options as given).
fn build_pool(parsed: DatabaseUrl, max_connections: u32) -> anyhow::Result<PgPool> {
    let follower = parsed.is_multi_host().then(|| Follower::new(parsed.clone()));
    let stale = {
        let follower = follower.clone();
        move |age: Duration| follower.as_ref().is_some_and(|f| f.is_stale(age))
    };
    let on_release = stale.clone();
    let mut options = PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        // sqlx checks every connection as it goes back to the pool; checking it again as it
        // comes out is one more round trip per transaction. Only a connection that sat idle
        // long enough to have been cut (a server restart takes longer) is checked again, and
        // one opened before the pool moved to another node is closed instead.
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let stale = stale(meta.age);
            Box::pin(async move {
                if stale {
                    return Ok(false);
                }
                if meta.idle_for >= RECHECK_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        });
    if let Some(follower) = &follower {
        let follower = follower.clone();
        options = options
            .after_connect(move |conn, _meta| {
                let follower = follower.clone();
                Box::pin(async move { follower.admit(conn).await })
            })
            .after_release(move |_conn, meta| {
                let keep = !on_release(meta.age);
                Box::pin(async move { Ok(keep) })
            });
    }
    let pool = options.connect_lazy_with(primary::tuned(parsed.nodes[0].clone()));
    if let Some(follower) = follower {
        tokio::spawn(follower.follow(pool.clone()));
    }
    Ok(pool)
}

/// One connection to the node that accepts writes (for tools that need no pool).
pub async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let parsed = DatabaseUrl::parse(url)?;
    Ok(primary::find(&parsed).await?.1)
}

/// The options of the node that accepts writes now (for a tool that builds a pool of its own).
pub async fn primary_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let parsed = DatabaseUrl::parse(url)?;
    let (node, conn) = primary::find(&parsed).await?;
    conn.close().await.ok();
    Ok(parsed.nodes[node].clone())
}

/// Creates database `name` through `admin` (a connection to another database of the same
/// server) if it does not exist.
async fn create_database_if_missing(mut admin: PgConnection, name: &str) -> anyhow::Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let stmt = format!("CREATE DATABASE {}", quote_ident(name));
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
