//! Prometheus metrics on the API (and the same recorder the workers write to).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::TestApp;
use orderflow_shared::{
    db::history::StatusCounts,
    domain::OrderStatus,
    messaging::stats::{CONNECTION_NAME, QueueStats},
};
use reqwest::Method;

/// The value of the first sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_messages_steps_orders_and_queues() {
    let app = TestApp::spawn().await;
    let product = app.product("Metered", 1_000, 5).await;
    app.fund(3, 5_000).await;
    let id = app.order(3, &[(product, 1)], None).await;
    assert_eq!(
        app.wait_terminal(3, &id, Duration::from_secs(30)).await["status"],
        "CONFIRMED"
    );
    let (status, _) = app.get("/api/products/999999", &app.token(3)).await;
    assert_eq!(status, 404);

    // Gauges are sampled every 200 ms in tests: wait until they show the confirmed order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let res = app.http.get(app.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = res.text().await.unwrap();
        // Gauges are sampled together: wait for a sample taken at rest.
        if sample(&text, "orderflow_orders{status=\"CONFIRMED\"}") == Some(1.0)
            && sample(&text, "orderflow_outbox_unsent ") == Some(0.0)
            && sample(&text, "orderflow_queue_consumers{queue=\"orderflow.stock\"}") == Some(1.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "orders gauge never showed the order:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(
        sample(
            &text,
            "orderflow_http_requests_total{route=\"/api/orders\",status=\"202\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "orderflow_http_requests_total{route=\"/api/products/{id}\",status=\"404\"}"
        ),
        Some(1.0)
    );
    assert!(text.contains("orderflow_http_request_duration_seconds_bucket{route=\"/api/orders\""));
    for queue in ["orderflow.stock", "orderflow.payment", "orderflow.order"] {
        let line = format!("orderflow_messages_total{{queue=\"{queue}\",outcome=\"acked\"}}");
        assert_eq!(sample(&text, &line), Some(1.0), "{line}");
    }
    assert!(text.contains("orderflow_step_duration_seconds_count{step=\"stock\"} 1"));
    assert_eq!(sample(&text, "orderflow_orders{status=\"PENDING\"}"), Some(0.0));
    assert_eq!(sample(&text, "orderflow_dead_letters "), Some(0.0));
    assert_eq!(sample(&text, "orderflow_outbox_unsent "), Some(0.0));
    assert_eq!(
        sample(&text, "orderflow_queue_consumers{queue=\"orderflow.stock\"}"),
        Some(1.0)
    );
    assert!(sample(&text, "orderflow_queue_depth{queue=\"data-platform.orders\"}").is_some());
    app.stop().await;
}

/// The broker's connections named `name` in the app's vhost, as the management API lists them
/// now (their `name`s, which the broker makes from the client's address and port, so a new
/// connection has a new one). The listing lags by a few seconds.
async fn listed(app: &TestApp, name: &str) -> BTreeSet<String> {
    let listed = app
        .mgmt(
            Method::GET,
            &format!("/api/vhosts/{}/connections", common::enc(&app.vhost)),
        )
        .await;
    listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["client_properties"]["connection_name"] == name)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

/// [`listed`], once the listing (refreshed every 5 s) has not changed for 6 s and holds at
/// least one.
async fn settled_connections(app: &TestApp, name: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (BTreeSet::new(), Instant::now());
    loop {
        let now = listed(app, name).await;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if !last.is_empty() && since.elapsed() >= Duration::from_secs(6) {
            return last;
        }
        assert!(Instant::now() < deadline, "the listing never settled: {last:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The gauge and trend samplers (every 200 ms in tests) and the dashboard's overview read the
/// queues over one connection kept between reads, not one per read; when the broker closes it,
/// the next read opens another and answers.
#[tokio::test]
async fn queue_reads_keep_one_connection_and_replace_it_when_it_closes() {
    let app = TestApp::api_only().await;
    let kept = settled_connections(&app, CONNECTION_NAME).await;
    assert_eq!(kept.len(), 1, "one connection for every queue read: {kept:?}");

    let closed = kept.first().unwrap();
    app.mgmt(Method::DELETE, &format!("/api/connections/{}", common::enc(closed)))
        .await;
    // The overview reads the queues too: it answers with them at once (the read that finds the
    // connection closed opens another).
    let (status, body) = app.get("/api/admin/overview", &app.admin_token()).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["brokerError"].is_null() && !body["queues"].as_array().unwrap().is_empty(),
        "{body}"
    );
    let replaced = settled_connections(&app, CONNECTION_NAME).await;
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(!replaced.contains(closed), "a new connection replaced {closed}");
    app.stop().await;
}

/// The name of a connection called [`CONNECTION_NAME`] in the app's vhost that is not in
/// `excluded`, once [`listed`] shows one.
async fn listed_except(app: &TestApp, excluded: &BTreeSet<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(name) = listed(app, CONNECTION_NAME).await.difference(excluded).next() {
            return name.clone();
        }
        assert!(Instant::now() < deadline, "no connection but {excluded:?} is listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads that meet the broker closing the kept connection answer as any other (the read that
/// finds it closed tries a fresh connection), rather than failing once while this process has
/// not yet seen the close. Reads go on back to back while the broker closes it, so one of them
/// is always in flight when the close arrives; a new connection listed in its place shows the
/// reads did meet the close.
#[tokio::test]
async fn reads_that_meet_the_broker_closing_the_kept_connection_answer() {
    let app = TestApp::api_only().await;
    let mut excluded = settled_connections(&app, CONNECTION_NAME).await;
    let stats = Arc::new(QueueStats::new(&app.config.amqp_url));
    let queues = stats.read().await.unwrap().len();
    assert!(queues > 0);
    let mut ours = listed_except(&app, &excluded).await;
    for round in 0..2 {
        let stop = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn({
            let (stats, stop) = (stats.clone(), stop.clone());
            async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    answers.push(stats.read().await.map(|q| q.len()).map_err(|e| format!("{e:#}")));
                }
                answers
            }
        });
        app.mgmt(Method::DELETE, &format!("/api/connections/{}", common::enc(&ours)))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let answers = reader.await.unwrap();
        assert!(answers.len() > 1, "round {round}: {answers:?}");
        assert!(answers.iter().all(|a| *a == Ok(queues)), "round {round}: {answers:?}");
        excluded.insert(ours);
        ours = listed_except(&app, &excluded).await;
    }
    stats.close().await;
    app.stop().await;
}

/// Writes an order in `status` (its row and the status row that moved it there) on `conn`.
async fn order_in(conn: &mut sqlx::PgConnection, status: &str) {
    sqlx::query(
        "WITH o AS (INSERT INTO orders (id, user_id, status, total_amount, deadline_at)
                    VALUES (gen_random_uuid(), 1, $1, 100, now()) RETURNING id)
         INSERT INTO order_status_history (order_id, from_status, to_status)
         SELECT id, CASE $1 WHEN 'CANCELLED' THEN 'CANCELLING' WHEN 'CONFIRMED' THEN 'PAID' WHEN 'PAID' THEN 'STOCK_RESERVED' END, $1
         FROM o",
    )
    .bind(status)
    .execute(conn)
    .await
    .unwrap();
}

/// Orders per status by a full count of the orders table, in [`OrderStatus::ALL`]'s order.
async fn full_count(pool: &sqlx::PgPool) -> Vec<(OrderStatus, i64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
        .fetch_all(pool)
        .await
        .unwrap();
    OrderStatus::ALL
        .iter()
        .map(|&s| (s, rows.iter().find(|(r, _)| r == s.as_str()).map_or(0, |(_, n)| *n)))
        .collect()
}

/// The count of `status` in `counted`.
fn n(counted: &[(OrderStatus, i64)], status: OrderStatus) -> i64 {
    counted.iter().find(|(s, _)| *s == status).unwrap().1
}

/// Orders per status as the gauges and the overview count them (in flight through their
/// index, ended ones in full once, then from the status rows written since) are exactly what a
/// full count of the orders table says at every step: for orders ended before the first count,
/// one whose transaction wrote before the count and committed after it, one that committed
/// between that transaction's start and the count, and orders in flight.
#[tokio::test]
async fn orders_per_status_are_counted_in_full_once_then_from_what_changed() {
    let app = TestApp::api_only().await;
    let full_count = async || full_count(&app.pool).await;
    let counts = StatusCounts::default();
    let mut conn = app.pool.acquire().await.unwrap();
    for status in ["CONFIRMED", "CONFIRMED", "CANCELLED", "PAID", "PENDING"] {
        order_in(&mut conn, status).await;
    }
    let mut open = app.pool.begin().await.unwrap();
    order_in(&mut open, "CONFIRMED").await;
    order_in(&mut conn, "CANCELLED").await;

    let first = counts.read(&app.pool).await.unwrap();
    assert_eq!(first, full_count().await);
    assert_eq!(
        (n(&first, OrderStatus::Confirmed), n(&first, OrderStatus::Cancelled)),
        (2, 2)
    );

    open.commit().await.unwrap();
    assert_eq!(counts.read(&app.pool).await.unwrap(), full_count().await);
    order_in(&mut conn, "CONFIRMED").await;
    sqlx::query("UPDATE orders SET status = 'CONFIRMED' WHERE status = 'PAID'")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO order_status_history (order_id, from_status, to_status)
         SELECT id, 'PAID', 'CONFIRMED' FROM orders WHERE status = 'CONFIRMED'
             AND NOT EXISTS (SELECT 1 FROM order_status_history h WHERE h.order_id = orders.id AND h.to_status = 'CONFIRMED')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let last = counts.read(&app.pool).await.unwrap();
    assert_eq!(last, full_count().await);
    assert_eq!(
        (
            n(&last, OrderStatus::Confirmed),
            n(&last, OrderStatus::Cancelled),
            n(&last, OrderStatus::Pending)
        ),
        (5, 2, 1)
    );
    assert_eq!(counts.read(&app.pool).await.unwrap(), last, "nothing counted twice");
    drop(conn);
    app.stop().await;
}

/// What the windows over the status rows cannot see (here orders moved to CONFIRMED by hand,
/// with no status row) is counted at the next full count: never while the recount interval has
/// not passed, at once when it has.
#[tokio::test]
async fn ended_orders_are_counted_in_full_again_after_the_recount_interval() {
    let app = TestApp::api_only().await;
    let (waiting, due) = (
        StatusCounts::recounting_after(Duration::MAX),
        StatusCounts::recounting_after(Duration::ZERO),
    );
    let mut conn = app.pool.acquire().await.unwrap();
    for status in ["CONFIRMED", "PENDING", "PENDING"] {
        order_in(&mut conn, status).await;
    }
    for counts in [&waiting, &due] {
        let first = counts.read(&app.pool).await.unwrap();
        assert_eq!(first, full_count(&app.pool).await);
        assert_eq!(
            (n(&first, OrderStatus::Confirmed), n(&first, OrderStatus::Pending)),
            (1, 2)
        );
    }

    sqlx::query("UPDATE orders SET status = 'CONFIRMED' WHERE status = 'PENDING'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let unseen = waiting.read(&app.pool).await.unwrap();
    assert_eq!(
        (n(&unseen, OrderStatus::Confirmed), n(&unseen, OrderStatus::Pending)),
        (1, 0),
        "in flight is counted anew each time; ended orders moved by hand wait for the full count"
    );
    let recounted = due.read(&app.pool).await.unwrap();
    assert_eq!(recounted, full_count(&app.pool).await);
    assert_eq!(
        (
            n(&recounted, OrderStatus::Confirmed),
            n(&recounted, OrderStatus::Pending)
        ),
        (3, 0)
    );
    assert_eq!(due.read(&app.pool).await.unwrap(), recounted, "nothing counted twice");
    drop(conn);
    app.stop().await;
}
