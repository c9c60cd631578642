//! The outbox relay, against the real PostgreSQL and RabbitMQ: one relay publishes at a time
//! (the holder of a session advisory lock), another stands by without publishing anything, and
//! takes over when the leader's session ends; each row goes out once and is marked sent.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Options, TestApp};
use orderflow_workers::relay::LEADER_LOCK;
use sqlx::Connection as _;

const WAIT: Duration = Duration::from_secs(30);
const ORDERS: i64 = 6;

#[tokio::test]
async fn a_standing_by_relay_publishes_nothing_and_takes_over_when_the_leaders_session_ends() {
    use orderflow_workers::WorkerKind::*;
    let mut app = TestApp::spawn_with(Options {
        workers: vec![Stock, Payment, Order],
        ..Default::default()
    })
    .await;
    // Another relay leads: this session holds the lock.
    let mut leader = app.pool.acquire().await.unwrap().detach();
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(LEADER_LOCK.0)
        .bind(LEADER_LOCK.1)
        .execute(&mut leader)
        .await
        .unwrap();
    app.spawn_workers(&[Relay]).await;
    app.capture("confirmed", "orderflow.events", "order.confirmed").await;
    let product = app.product("Tea", 500, 100).await;
    let mut orders = Vec::new();
    for user in 1..=ORDERS {
        app.fund(user, 1_000).await;
        orders.push(app.order(user, &[(product, 1)], None).await);
    }

    // The standing-by relay asks for the lock every second: three chances to publish wrongly.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (pending, sent, unsent): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING'),
                (SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL),
                (SELECT count(*) FROM outbox WHERE sent_at IS NULL)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((pending, sent), (ORDERS, 0), "a relay published while another led");
    assert!(unsent >= 2, "each order's stock.reserve and deadline wait: {unsent}");

    // The leader's session ends (a crash, a lost connection): the standing-by relay takes over.
    leader.close().await.unwrap();
    for (user, id) in (1..=ORDERS).zip(&orders) {
        let order = app.wait_terminal(user, id, WAIT).await;
        assert_eq!(order["status"], "CONFIRMED", "{order}");
    }
    app.wait_quiescent(WAIT).await;
    app.wait_quiescent_outbox().await;

    // Each order's event went out once (a row published twice would be a second message),
    // and every row is marked sent (in bulk, shortly after the broker confirmed it).
    let events = app.drain_queue("confirmed").await;
    let mut subjects: Vec<&str> = events.iter().map(|(_, e)| e["subject"].as_str().unwrap()).collect();
    subjects.sort_unstable();
    let mut want: Vec<&str> = orders.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(subjects, want);
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(unsent, 0);
    app.stop().await;
}
