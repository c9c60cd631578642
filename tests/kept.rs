//! Connections kept between transactions (`db::kept`), against the real PostgreSQL: a
//! committed transaction's connection serves the next one (the same backend), is given back
//! once idle or once out of the pool for long enough, and a transaction that did not commit
//! gives back every kept connection.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestApp;
use orderflow_shared::db::kept::{IDLE, KEEP_FOR, Kept};

/// Longer than any stall of a busy test machine: what must still be kept is.
const LONG_IDLE: Duration = Duration::from_secs(30);
use sqlx::{Connection as _, PgConnection, PgPool, postgres::PgPoolOptions};

/// The backend a committed transaction on `conn` ran on.
async fn backend(conn: &mut PgConnection) -> i32 {
    let mut tx = conn.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    pid
}

/// A pool of its own on the app's database (the app's is shared with its API).
async fn pool(app: &TestApp) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&app.config.database_url)
        .await
        .unwrap()
}

/// Waits (up to 5 s) until `done`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_back(pool: &PgPool) -> bool {
    pool.num_idle() == pool.size() as usize
}

#[tokio::test]
async fn a_committed_connection_serves_the_next_transaction_until_idle_or_out_too_long() {
    let app = TestApp::api_only().await;
    let pool = pool(&app).await;
    let kept = Kept::with_idle(pool.clone(), 2, LONG_IDLE);

    // Two transactions in a row run on one backend, the connection kept out of the pool between.
    let mut conn = kept.acquire().await.unwrap();
    let first = backend(&mut conn).await;
    conn.keep();
    assert_eq!(kept.held(), 1);
    assert_eq!(
        pool.size() as usize - pool.num_idle(),
        1,
        "the kept one is out of the pool"
    );
    let mut conn = kept.acquire().await.unwrap();
    assert_eq!(kept.held(), 0);
    assert_eq!(backend(&mut conn).await, first);
    conn.keep();

    // Unused for IDLE, it goes back to the pool.
    let short = Kept::new(pool.clone(), 2);
    let mut conn = short.acquire().await.unwrap();
    backend(&mut conn).await;
    conn.keep();
    drop(kept);
    tokio::time::sleep(IDLE).await;
    until("given back when idle", || short.held() == 0 && all_back(&pool)).await;

    // Out of the pool for KEEP_FOR, it is not kept again, however busy.
    let kept = Kept::with_idle(pool.clone(), 2, LONG_IDLE);
    let mut conn = kept.acquire().await.unwrap();
    backend(&mut conn).await;
    tokio::time::sleep(KEEP_FOR).await;
    backend(&mut conn).await;
    conn.keep();
    assert_eq!(kept.held(), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_transaction_that_did_not_commit_gives_back_every_kept_connection() {
    let app = TestApp::api_only().await;
    let pool = pool(&app).await;
    let kept = Kept::with_idle(pool.clone(), 2, LONG_IDLE);
    // Three batches in flight at once; at most two are kept.
    let (mut a, mut b, mut c) = (
        kept.acquire().await.unwrap(),
        kept.acquire().await.unwrap(),
        kept.acquire().await.unwrap(),
    );
    backend(&mut a).await;
    let second = backend(&mut b).await;
    backend(&mut c).await;
    a.keep();
    b.keep();
    c.keep();
    assert_eq!(kept.held(), 2);

    // The most recently kept one comes out first; its transaction fails.
    let mut failing = kept.acquire().await.unwrap();
    assert_eq!(backend(&mut failing).await, second);
    let mut tx = failing.begin().await.unwrap();
    assert!(sqlx::query("SELECT 1/0").execute(&mut *tx).await.is_err());
    drop(tx);
    drop(failing);
    assert_eq!(kept.held(), 0, "a failure gives back the other kept connection too");

    // The pool has them all again, and they work (the failed one was rolled back).
    until("all back in the pool", || all_back(&pool)).await;
    let mut conn = kept.acquire().await.unwrap();
    assert!(backend(&mut conn).await > 0);
    app.stop().await;
}
