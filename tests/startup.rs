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
