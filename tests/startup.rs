//! Starting many processes at once against a database that does not exist yet (a fresh
//! deployment: every worker container starts together), and the pools a process starts with.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{PG_ADMIN_URL, PG_BASE};
use orderflow_shared::db;
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn eight_processes_starting_together_create_and_migrate_one_database() {
    let name = format!("orderflow_startup_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{PG_BASE}/{name}");
    // Concurrent on one task: the race is in PostgreSQL, between the eight connections.
    let starts = (0..8).map(|_| orderflow_shared::db::connect_and_migrate(&url, 2));
    for start in futures_util::future::join_all(starts).await {
        start.unwrap();
    }
    let pool = orderflow_shared::db::pool(&url, 2).unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, orderflow_shared::db::MIGRATOR.iter().count());
    // No index is left invalid: a process waiting for the lock holds no snapshot a concurrent
    // build waits for, and one cancelled anyway would be built again.
    let invalid: Vec<String> =
        sqlx::query_scalar("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(invalid, Vec::<String>::new());
    pool.close().await;
    let mut admin = PgConnection::connect(PG_ADMIN_URL).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn migrating_takes_sqlx_s_own_lock_and_builds_again_an_index_left_invalid() {
    let name = format!("orderflow_startup_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{PG_BASE}/{name}");
    let pool = db::connect_and_migrate(&url, 2).await.unwrap();
    // Its sessions notice a client that went away while a statement runs (a transaction given
    // up after the answer deadline ends on the server too).
    let check: String = sqlx::query_scalar("SHOW client_connection_check_interval")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(check, "2s");
    pool.close().await;

    // The lock a previous release's migrator takes (sqlx's, blocking) is the one this
    // release asks for: while sqlx holds it, it is not to be had.
    let mut sqlx_migrator = PgConnection::connect(&url).await.unwrap();
    sqlx::migrate::Migrate::lock(&mut sqlx_migrator).await.unwrap();
    let mut other = PgConnection::connect(&url).await.unwrap();
    let try_lock = "SELECT pg_try_advisory_lock($1)";
    let key = db::migration_lock_key(&name);
    let got: bool = sqlx::query_scalar(try_lock)
        .bind(key)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(!got, "the same lock as sqlx's");
    sqlx::migrate::Migrate::unlock(&mut sqlx_migrator).await.unwrap();
    let got: bool = sqlx::query_scalar(try_lock)
        .bind(key)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(got);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut other)
        .await
        .unwrap();

    // An index a cancelled concurrent build left invalid is built again at the next start.
    let valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'outbox_discarded_idx'::regclass";
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'outbox_discarded_idx'::regclass")
        .execute(&mut other)
        .await
        .unwrap();
    db::connect_and_migrate(&url, 2).await.unwrap().close().await;
    let rebuilt: bool = sqlx::query_scalar(valid).fetch_one(&mut other).await.unwrap();
    assert!(rebuilt);
    sqlx_migrator.close().await.unwrap();
    other.close().await.unwrap();
    let mut admin = PgConnection::connect(PG_ADMIN_URL).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// A start with nothing to migrate takes no lock: behind a transaction-mode pooler a session
/// lock can be left on a pooled server session, and every later start would wait for it. Here
/// the lock is held by another session (as a pooled one would keep it): a start on an
/// up-to-date schema goes ahead; one with a migration to apply still waits for it.
#[tokio::test]
async fn a_start_with_nothing_to_migrate_takes_no_lock() {
    let name = format!("orderflow_startup_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{PG_BASE}/{name}");
    db::connect_and_migrate(&url, 2).await.unwrap().close().await;
    let mut holder = PgConnection::connect(&url).await.unwrap();
    sqlx::migrate::Migrate::lock(&mut holder).await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), db::connect_and_migrate(&url, 2))
        .await
        .expect("a start with nothing to migrate waited for the lock")
        .unwrap()
        .close()
        .await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A migration undone (one that may run again: it sets a column default), so a start has
    // one to apply, and waits for the lock.
    let undone = 20261207000003_i64;
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(undone)
        .execute(&mut holder)
        .await
        .unwrap();
    let waiting = db::connect_and_migrate(&url, 2);
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut waiting)
            .await
            .is_err(),
        "a start with a migration to apply went past the lock"
    );
    sqlx::migrate::Migrate::unlock(&mut holder).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap()
        .close()
        .await;
    let applied: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = $1 AND success)")
            .bind(undone)
            .fetch_one(&mut holder)
            .await
            .unwrap();
    assert!(applied);
    holder.close().await.unwrap();
    let mut admin = PgConnection::connect(PG_ADMIN_URL).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// A rolling update: this release starts on a schema a later release already migrated (its
/// migrations are expand-only, docs/UPGRADING.md) and runs on it; it still refuses a schema in
/// which one of its own migrations was changed.
#[tokio::test]
async fn a_schema_with_a_later_release_s_migrations_is_run_on_and_a_changed_one_refused() {
    let name = format!("orderflow_startup_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{PG_BASE}/{name}");
    orderflow_shared::db::connect_and_migrate(&url, 2)
        .await
        .unwrap()
        .close()
        .await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The later release's migration: a column this release does not know, and its record.
    sqlx::query("ALTER TABLE orders ADD COLUMN later_release_note TEXT")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'a later release', true, '\\x00', 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let pool = orderflow_shared::db::connect_and_migrate(&url, 2).await.unwrap();
    sqlx::query("SELECT count(*) FROM orders").execute(&pool).await.unwrap();
    pool.close().await;

    // One of this release's own migrations, changed: refused, not run on.
    let first = orderflow_shared::db::MIGRATOR.iter().next().unwrap().version;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x01' WHERE version = $1")
        .bind(first)
        .execute(&mut conn)
        .await
        .unwrap();
    let refused = orderflow_shared::db::connect_and_migrate(&url, 2).await.err().unwrap();
    assert!(
        format!("{refused:#}").contains("was previously applied but has been modified"),
        "{refused:#}"
    );
    conn.close().await.unwrap();
    let mut admin = PgConnection::connect(PG_ADMIN_URL).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// The workers' pool asks for generic plans in every connection's startup options, also on
/// the node a multi-host pool moves to (here the first host is down, so every connection comes
/// after the move), and leaves the server's setting alone when told not to
/// (WORKER_GENERIC_PLANS=false); the API's pool never asks.
#[tokio::test]
async fn the_workers_pool_plans_generically_unless_told_not_to() {
    let server: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut PgConnection::connect(PG_ADMIN_URL).await.unwrap())
        .await
        .unwrap();
    assert_ne!(
        server, "force_generic_plan",
        "the server's own setting would hide the difference"
    );
    let moved = "postgres://postgres@127.0.0.1:1,127.0.0.1:5432/postgres";
    for (pool, expected) in [
        (db::worker_pool(PG_ADMIN_URL, 2, true).await, "force_generic_plan"),
        (db::worker_pool(moved, 2, true).await, "force_generic_plan"),
        (db::worker_pool(PG_ADMIN_URL, 2, false).await, server.as_str()),
        (db::pool(PG_ADMIN_URL, 2), server.as_str()),
    ] {
        let pool = pool.unwrap();
        assert_eq!(show_plan_cache_mode(&pool).await, expected);
        pool.close().await;
    }
}

/// A setting the database refuses at connection startup (as a pooler that does not pass startup
/// options on refuses `plan_cache_mode`) leaves the pool without it, working, instead of without
/// connections.
#[tokio::test]
async fn a_startup_option_the_database_refuses_is_left_out() {
    let pool = db::pool_with_startup_options(PG_ADMIN_URL, 2, &[("no_such_setting", "1")])
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
    assert_eq!(one, 1);
    pool.close().await;
    // The control: the same option on a plain connection is refused.
    let refused = PgConnection::connect_with(
        &PG_ADMIN_URL
            .parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .options([("no_such_setting", "1")]),
    )
    .await;
    assert!(matches!(refused, Err(sqlx::Error::Database(_))), "{refused:?}");
}

/// `SHOW plan_cache_mode` on one of the pool's connections, retried while the pool has none
/// (a multi-host pool finds its node first).
async fn show_plan_cache_mode(pool: &sqlx::PgPool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::query_scalar("SHOW plan_cache_mode").fetch_one(pool).await {
            Ok(mode) => return mode,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(err) => panic!("no connection within 20 s: {err}"),
        }
    }
}
