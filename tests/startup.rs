//! Starting many processes at once against a database that does not exist yet (a fresh
//! deployment: every worker container starts together).
#![allow(clippy::unwrap_used)]

mod common;

use common::{PG_ADMIN_URL, PG_BASE};
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
    pool.close().await;
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

/// The workers' pool asks for generic plans in every connection's startup options (one host or
/// several, so also on the node a multi-host pool follows), and leaves the server's setting
/// alone when told not to (WORKER_GENERIC_PLANS=false, for a pooler that refuses startup
/// options); the API's pool never asks.
#[tokio::test]
async fn the_workers_pool_plans_generically_unless_told_not_to() {
    let two_hosts = format!("{PG_BASE},127.0.0.1:5432/postgres");
    let server: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut PgConnection::connect(PG_ADMIN_URL).await.unwrap())
        .await
        .unwrap();
    for (pool, expected) in [
        (
            orderflow_shared::db::worker_pool(PG_ADMIN_URL, 2, true),
            "force_generic_plan",
        ),
        (
            orderflow_shared::db::worker_pool(&two_hosts, 2, true),
            "force_generic_plan",
        ),
        (
            orderflow_shared::db::worker_pool(PG_ADMIN_URL, 2, false),
            server.as_str(),
        ),
        (orderflow_shared::db::pool(PG_ADMIN_URL, 2), server.as_str()),
    ] {
        let pool = pool.unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(mode, expected);
        pool.close().await;
    }
    assert_ne!(
        server, "force_generic_plan",
        "the server's own setting hides the difference"
    );
}
