//! Recovery: dead letters, parked compensations, admin actions and the sweep, against the
//! real PostgreSQL and RabbitMQ.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Options, TestApp};
use orderflow_workers::WorkerKind::{self, *};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn wait_dead_letters(app: &TestApp, n: i64) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if count >= n {
            let (status, page) = app
                .get("/api/admin/dead-letters?size=100&status=ALL", &app.admin_token())
                .await;
            assert_eq!(status, 200, "{page}");
            return page["items"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "only {count} of {n} dead letters recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn poison_in_every_work_queue_is_dead_lettered_recorded_and_the_queues_keep_flowing() {
    let app = TestApp::spawn().await;
    let missing = uuid::Uuid::now_v7();
    let mut published = 0;
    for (key, kind) in [
        ("stock.reserve", "stock.reserve"),
        ("coupon.apply", "coupon.apply"),
        ("payment.charge", "payment.charge"),
        ("order.confirm", "order.confirm"),
    ] {
        app.publish_raw("orderflow.work", key, b"{not json", kind).await;
        let unknown = json!({"id": uuid::Uuid::now_v7(), "type": "stock.explode", "occurredAt": "2026-11-21T10:00:00.000Z",
                             "orderId": missing, "data": {}});
        app.publish_raw("orderflow.work", key, unknown.to_string().as_bytes(), "stock.explode")
            .await;
        let valid = json!({"id": uuid::Uuid::now_v7(), "type": kind, "occurredAt": "2026-11-21T10:00:00.000Z",
                           "orderId": missing, "data": {}});
        app.publish_raw("orderflow.work", key, valid.to_string().as_bytes(), kind)
            .await;
        published += 3;
    }
    let letters = wait_dead_letters(&app, published).await;
    assert_eq!(letters.len(), published as usize);
    for queue in [
        "orderflow.stock",
        "orderflow.coupon",
        "orderflow.payment",
        "orderflow.order",
    ] {
        let from: Vec<_> = letters.iter().filter(|l| l["sourceQueue"] == queue).collect();
        assert_eq!(from.len(), 3, "three dead letters from {queue}");
        assert!(from.iter().all(|l| l["reason"] == "rejected" && l["status"] == "NEW"));
        assert!(from.iter().any(|l| l["body"] == "{not json"));
    }

    // The pipeline still works.
    let product = app.product("After poison", 1_000, 5).await;
    app.fund(5, 5_000).await;
    let id = app.order(5, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(5, &id, WAIT).await["status"], "CONFIRMED");

    // A malformed dead letter cannot be replayed; it can be discarded.
    let bad = letters.iter().find(|l| l["body"] == "{not json").unwrap()["id"]
        .as_i64()
        .unwrap();
    let (status, problem) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{bad}/replay"))
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("DEAD_LETTER_NOT_REPLAYABLE"))
    );
    let (status, _) = app
        .admin(Method::DELETE, &format!("/api/admin/dead-letters/{bad}"))
        .await;
    assert_eq!(status.as_u16(), 204);
    let (_, page) = app.get("/api/admin/dead-letters", &app.admin_token()).await;
    assert_eq!(page["total"], published - 1, "the NEW list no longer shows it");
    app.stop().await;
}

#[tokio::test]
async fn a_step_that_keeps_failing_is_dead_lettered_and_its_order_cancelled_then_replay_changes_nothing() {
    let app = TestApp::spawn().await;
    let product = app.product("Cursed", 1_000, 5).await;
    app.fund(6, 5_000).await;
    app.break_stock("Cursed", "<").await;

    let id = app.order(6, &[(product, 1)], None).await;
    let order = app.wait_terminal(6, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("PROCESSING_FAILED"))
    );
    let letters = wait_dead_letters(&app, 1).await;
    let letter = &letters[0];
    assert_eq!(letter["sourceQueue"], "orderflow.stock");
    assert_eq!(letter["messageType"], "stock.reserve");
    assert_eq!(letter["reason"], "delivery_limit");
    assert_eq!(letter["orderId"], id.as_str());

    // Healed and replayed: the order is already cancelled, so the replay is refused by the
    // state guard; nothing is taken.
    app.heal_stock().await;
    let letter_id = letter["id"].as_i64().unwrap();
    let (status, replayed) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{letter_id}/replay"))
        .await;
    assert_eq!(status.as_u16(), 202, "{replayed}");
    assert_eq!(replayed["status"], "REPLAYED");
    let (status, problem) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{letter_id}/replay"))
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("DEAD_LETTER_RESOLVED"))
    );
    app.wait_quiescent(WAIT).await;
    // The replayed message is handled as stale (the order is cancelled); nothing moves.
    app.wait_outcomes("duplicate", 1).await;
    assert_eq!(app.stock(product).await, 5);
    assert_eq!(app.balance(6).await, 5_000);
    assert_eq!(app.wait_terminal(6, &id, WAIT).await["status"], "CANCELLED");
    app.stop().await;
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_is_parked_and_an_operator_retries_it() {
    let app = TestApp::spawn().await;
    let product = app.product("Fragile", 10_000, 5).await;
    app.fund(8, 1_000).await; // too little: payment fails, stock must be released
    app.break_stock("Fragile", ">").await;

    let id = app.order(8, &[(product, 2)], None).await;
    app.wait_order_row(&id, WAIT, |o| o.status.as_str() == "COMPENSATION_FAILED")
        .await;
    assert_eq!(app.stock(product).await, 3, "the release failed: stock still held");
    let (status, parked) = app
        .get("/api/admin/orders?status=COMPENSATION_FAILED", &app.admin_token())
        .await;
    assert_eq!(status, 200);
    assert_eq!(parked["total"], 1);
    assert_eq!(parked["items"][0]["orderId"], id.as_str());
    assert_eq!(parked["items"][0]["stockHeld"], true);
    assert_eq!(parked["items"][0]["reason"], "INSUFFICIENT_BALANCE");

    app.heal_stock().await;
    let (status, body) = app.admin(Method::POST, &format!("/api/admin/orders/{id}/retry")).await;
    assert_eq!((status.as_u16(), body["status"].as_str()), (202, Some("CANCELLING")));
    let order = app.wait_terminal(8, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("INSUFFICIENT_BALANCE"))
    );
    let path: Vec<_> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        path,
        [
            "PENDING",
            "STOCK_RESERVED",
            "CANCELLING",
            "COMPENSATION_FAILED",
            "CANCELLING",
            "CANCELLED"
        ]
    );
    assert_eq!(app.stock(product).await, 5);
    let (status, problem) = app.admin(Method::POST, &format!("/api/admin/orders/{id}/retry")).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("ORDER_NOT_RETRYABLE"))
    );
    app.stop().await;
}

fn without(kinds: &[WorkerKind]) -> Vec<WorkerKind> {
    WorkerKind::ALL.iter().copied().filter(|k| !kinds.contains(k)).collect()
}

#[tokio::test]
async fn an_operator_finds_a_stuck_order_and_cancels_it() {
    // No stock worker: orders wait in PENDING.
    let mut app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        ..Default::default()
    })
    .await;
    let product = app.product("Stuck", 1_000, 5).await;
    app.fund(9, 5_000).await;
    let id = app.order(9, &[(product, 1)], None).await;

    let admin = app.admin_token();
    let (status, stuck) = app.get("/api/admin/orders?stuck=true&olderThan=0s", &admin).await;
    assert_eq!(status, 200);
    assert_eq!(stuck["items"][0]["orderId"], id.as_str());
    assert_eq!(stuck["items"][0]["status"], "PENDING");
    let (status, problem) = app.get("/api/admin/orders?status=NOPE", &admin).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (400, Some("INVALID_STATUS"))
    );
    let (status, _) = app.get("/api/admin/orders", &app.token(9)).await;
    assert_eq!(status, 403);

    let (status, body) = app
        .call(
            Method::POST,
            &format!("/api/admin/orders/{id}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!((status.as_u16(), body["status"].as_str()), (202, Some("CANCELLED")));
    let order = app.wait_terminal(9, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("ADMIN_CANCELLED"))
    );
    let (status, problem) = app
        .call(
            Method::POST,
            &format!("/api/admin/orders/{id}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("ORDER_NOT_CANCELLABLE"))
    );
    let missing = uuid::Uuid::now_v7();
    let (status, problem) = app
        .call(
            Method::POST,
            &format!("/api/admin/orders/{missing}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("ORDER_NOT_FOUND"))
    );

    // The stock worker arrives late: its reserve finds the order cancelled and takes nothing.
    app.spawn_workers(&[Stock]).await;
    app.wait_quiescent(WAIT).await;
    app.wait_outcomes("duplicate", 1).await;
    assert_eq!(app.stock(product).await, 5);
    app.stop().await;
}

/// A deadline message that comes before the order's deadline (forged, or replayed by hand:
/// the broker expires real ones no sooner) cancels nothing; the order goes on.
#[tokio::test]
async fn a_deadline_message_before_the_deadline_cancels_nothing() {
    // No stock worker: the order stays PENDING, its deadline a minute away.
    let app = TestApp::spawn_with(Options {
        workers: vec![Relay, Recovery],
        ..Default::default()
    })
    .await;
    let product = app.product("Early deadline", 1_000, 5).await;
    let order = app.order(5, &[(product, 1)], None).await;
    let message_id = uuid::Uuid::now_v7();
    let body = json!({
        "id": message_id, "type": "order.deadline", "occurredAt": "2026-12-05T10:00:00.000Z",
        "data": {"orderIds": [order]},
    });
    common::raw_amqp::publish(
        &app.config.amqp_url,
        common::raw_amqp::Message {
            exchange: orderflow_shared::messaging::topology::EXPIRED_EXCHANGE,
            routing_key: "",
            message_id: &message_id.to_string(),
            correlation_id: None,
            headers: &common::raw_amqp::table::<&str>(&[]),
            body: body.to_string().as_bytes(),
        },
    )
    .await;
    // Handled (recorded in the recovery worker's inbox), and the order untouched.
    app.wait_until(
        "the deadline message was never handled",
        WAIT,
        &format!("EXISTS (SELECT FROM inbox WHERE message_id = '{message_id}')"),
    )
    .await;
    let (status, body) = app.get(&format!("/api/orders/{order}"), &app.token(5)).await;
    assert_eq!(
        (status.as_u16(), body["status"].as_str()),
        (200, Some("PENDING")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_sweep_cancels_an_order_whose_deadline_message_was_lost() {
    // No stock worker (the order stays PENDING) and the deadline message is purged: only the
    // sweep (every second in tests, on database time) can notice the order is overdue.
    let app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        order_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let product = app.product("Forgotten", 1_000, 5).await;
    let id = app.order(10, &[(product, 1)], None).await;
    app.wait_quiescent_outbox().await;
    let (conn, ch) = app.amqp().await;
    let purged = ch
        .queue_purge("orderflow.deadline".into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    assert_eq!(purged, 1, "the deadline message was waiting");

    let order = app.wait_terminal(10, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("TIMEOUT"))
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_api_answers_503_problems_while_the_database_is_unreachable() {
    // An API whose database is down (nothing listens on port 1): every route that needs it
    // answers a 503 problem document within the pool's acquire timeout, never a hang or 500.
    let app = common::TestApp::api_only().await;
    let mut config = app.config.clone();
    config.database_url = "postgres://postgres@127.0.0.1:1/orderflow".to_owned();
    let pool = orderflow_shared::db::pool(&config.database_url, 2).unwrap();
    let state = orderflow_api::AppState::new(pool, std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(orderflow_api::serve(listener, state, shutdown.clone()));
    let keys = orderflow_shared::auth::Keys::new(common::JWT_SECRET);
    let http = reqwest::Client::new();
    for (method, path) in [
        (Method::GET, "/api/balance"),
        (Method::GET, "/api/products"),
        (Method::GET, "/readyz"),
    ] {
        let started = Instant::now();
        let res = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(keys.issue(1, false, 60).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path} took {:?}",
            started.elapsed()
        );
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(res.headers()["retry-after"], "1");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "SERVICE_UNAVAILABLE");
        assert_eq!(problem["status"], 503);
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test]
async fn the_sweep_prunes_old_bookkeeping_and_keeps_what_may_still_be_needed() {
    let app = TestApp::api_only().await;
    sqlx::query(
        "INSERT INTO idempotency_keys (user_id, scope, key, request, status_code, response, created_at)
         VALUES (1, 's', 'old', '{}', 200, '{}', now() - interval '49 hours'),
                (1, 's', 'day', '{}', 200, '{}', now() - interval '25 hours')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at)
         VALUES ('stock', gen_random_uuid(), now() - interval '8 days'), ('stock', gen_random_uuid(), now())",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body, sent_at)
         VALUES (gen_random_uuid(), 'x', 'k', 'k', '{}', now() - interval '2 days'),
                (gen_random_uuid(), 'x', 'k', 'k', '{}', NULL)",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    assert_eq!(
        orderflow_workers::sweep::prune(&app.pool, Duration::from_secs(60))
            .await
            .unwrap(),
        3
    );
    let left: (Vec<String>, i64, i64) = (
        sqlx::query_scalar("SELECT key FROM idempotency_keys")
            .fetch_all(&app.pool)
            .await
            .unwrap(),
        sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
    );
    assert_eq!(left, (vec!["day".to_owned()], 1, 1));
    app.stop().await;
}

/// When the deadline messages fail (a blocked deadline queue, a broker that lost them), the
/// sweep cancels every order past its deadline in one go, not 200 per interval (20 a second at
/// the default 10 s, far behind a shop at a few hundred orders a second).
#[tokio::test]
async fn a_sweep_cancels_every_order_past_its_deadline_not_one_batch() {
    let app = TestApp::api_only().await;
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, total_amount, deadline_at)
         SELECT gen_random_uuid(), 1 + g % 50, 'PENDING', 100, now() - interval '1 minute' FROM generate_series(1, 1001) g
         UNION ALL SELECT gen_random_uuid(), 1, 'PENDING', 100, now() + interval '1 hour'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let counts = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*) FILTER (WHERE status = 'CANCELLED' AND reason = 'TIMEOUT'),
                    count(*) FILTER (WHERE status = 'PENDING') FROM orders",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let timeout = Duration::from_secs(60);
    // Out of time at once: one batch.
    let first = orderflow_workers::sweep::sweep(&app.pool, timeout, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(first.timed_out, 200);
    assert_eq!(counts().await, (200, 802));
    // With time: every order past its deadline, and none other.
    let rest = orderflow_workers::sweep::sweep(&app.pool, timeout, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(rest.timed_out, 801);
    assert_eq!(counts().await, (1_001, 1));
    app.stop().await;
}

#[tokio::test]
async fn a_pass_prunes_every_row_due_not_one_batch_per_table() {
    // More rows come due than one batch per table (5,000) removes: a shop at a few hundred
    // orders a second writes more than that per sweep interval.
    let app = TestApp::api_only().await;
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body, sent_at)
         SELECT gen_random_uuid(), 'x', 'k', 'k', '{}'::bytea, now() - interval '2 days' FROM generate_series(1, 12001)
         UNION ALL SELECT gen_random_uuid(), 'x', 'k', 'k', '{}'::bytea, now() - interval '23 hours'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at)
         SELECT 'stock', gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 7000)
         UNION ALL SELECT 'stock', gen_random_uuid(), now() - interval '6 days'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let left = || async {
        sqlx::query_as::<_, (i64, i64)>("SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM inbox)")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };

    // Out of time at once: one batch from each table.
    let one_round = orderflow_workers::sweep::prune(&app.pool, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(one_round, 10_000);
    assert_eq!(left().await, (7_002, 2_001));
    // With time: everything due, and nothing that is not.
    let rest = orderflow_workers::sweep::prune(&app.pool, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(rest, 9_001);
    assert_eq!(left().await, (1, 1));
    app.stop().await;
}

#[tokio::test]
async fn with_autovacuum_off_the_recovery_worker_analyzes_tables_that_grew() {
    let app = TestApp::api_only().await;
    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let analyzed = orderflow_workers::statistics::analyze_stale(&app.pool).await.unwrap();
    if autovacuum == "on" {
        // Autovacuum keeps the statistics; the worker leaves them alone.
        assert_eq!(analyzed, None);
        app.stop().await;
        return;
    }
    sqlx::query(
        "INSERT INTO products (name, price, stock, initial_stock)
         SELECT 'p' || n, 100, 1, 1 FROM generate_series(1, 500) AS n",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // pg_stat counters are sent when a transaction ends; give the collector a moment.
    let deadline = Instant::now() + WAIT;
    let tables = loop {
        let tables = orderflow_workers::statistics::analyze_stale(&app.pool)
            .await
            .unwrap()
            .unwrap();
        if tables.iter().any(|t| t.ends_with(".products")) {
            break tables;
        }
        assert!(Instant::now() < deadline, "products was never analyzed: {tables:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(tables.iter().any(|t| t.ends_with(".products")), "{tables:?}");
    let reltuples: f32 = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 'products'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(reltuples, 500.0);
    // Analyzed, it is not analyzed again until it changes.
    let again = orderflow_workers::statistics::analyze_stale(&app.pool)
        .await
        .unwrap()
        .unwrap();
    assert!(!again.iter().any(|t| t.ends_with(".products")), "{again:?}");
    app.stop().await;
}

#[tokio::test]
async fn deadlines_of_orders_accepted_apart_go_out_together() {
    // No stock worker and the default ORDER_TIMEOUT (a minute): the deadline messages wait in
    // their queue, where the test reads them. Each order is accepted on its own (its own
    // accept batch, so its own deadline row); the relay gathers the rows that come within a
    // second into one message.
    let app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        ..Default::default()
    })
    .await;
    let product = app.product("Patient", 1_000, 10).await;
    let started = Instant::now();
    let mut orders = Vec::new();
    for user in 1..=5 {
        orders.push(app.order(user, &[(product, 1)], None).await);
    }
    let spread = started.elapsed();
    app.wait_quiescent_outbox().await;
    let (rows, unsent): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE sent_at IS NULL) FROM outbox WHERE message_type = 'order.deadline'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((rows, unsent), (5, 0), "one row per accept batch, each marked sent");

    let (conn, ch) = app.amqp().await;
    let mut named = Vec::new();
    let mut messages = 0;
    while let Some(msg) = ch
        .basic_get(
            "orderflow.deadline".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        messages += 1;
        let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
        assert_eq!(body["type"], "order.deadline");
        for id in body["data"]["orderIds"].as_array().unwrap() {
            named.push(id.as_str().unwrap().to_owned());
        }
        let expiration = msg.delivery.properties.expiration().as_ref().map(|e| e.to_string());
        assert_eq!(expiration.as_deref(), Some("60000"), "ORDER_TIMEOUT, from the publish");
    }
    let _ = conn.close(200, "bye".into()).await;
    named.sort();
    orders.sort();
    assert_eq!(named, orders, "every order named once");
    // One message per second of accepting, and one more for where the seconds fell.
    let most = (spread.as_secs() + 2).min(5) as i64;
    assert!(
        (1..=most).contains(&messages),
        "{messages} deadline messages for 5 orders accepted within {spread:?}"
    );
    app.stop().await;
}

/// A deadline message about several orders whose batch fails is split into one message per
/// order, and those go straight to the recovery queue (the deadline has passed): sent back to
/// the deadline queue without an expiration, they would wait at its head for ever, holding every
/// later deadline behind them. The sweep is kept out of the way (an hour apart), so only the
/// deadline messages can cancel the orders.
#[tokio::test]
async fn a_failed_batch_of_deadlines_is_split_into_messages_that_still_expire_the_orders() {
    let app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        order_timeout: Duration::from_secs(2),
        sweep_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    // The first status change of any order fails, once: the recovery worker's first batch.
    sqlx::raw_sql(
        "CREATE SEQUENCE first_change;
         CREATE FUNCTION fail_first_change() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('first_change') = 1 THEN RAISE EXCEPTION 'the first status change fails'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER fail_first_change BEFORE UPDATE ON orders FOR EACH ROW
           WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION fail_first_change();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let product = app.product("Late", 1_000, 10).await;
    // Accepted together: their deadlines go out as one message.
    let item = [(product, 1)];
    let (a, b, c) = tokio::join!(
        app.order(1, &item, None),
        app.order(2, &item, None),
        app.order(3, &item, None)
    );
    for (user, id) in [(1, &a), (2, &b), (3, &c)] {
        let order = app.wait_terminal(user, id, WAIT).await;
        assert_eq!(
            (order["status"].as_str(), order["reason"].as_str()),
            (Some("CANCELLED"), Some("TIMEOUT")),
            "{order}"
        );
    }
    let failed: i64 = sqlx::query_scalar("SELECT last_value FROM first_change")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(failed > 1, "the injected failure fired");
    let parts: Vec<(String, Vec<uuid::Uuid>)> = sqlx::query_as(
        "SELECT exchange, order_ids FROM outbox WHERE message_type = 'order.deadline' AND cardinality(order_ids) = 1
         AND exchange <> 'orderflow.deadline' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(parts.len(), 3, "one part per order: {parts:?}");
    assert!(
        parts.iter().all(|(exchange, _)| exchange == "orderflow.expired"),
        "{parts:?}"
    );
    app.wait_quiescent_outbox().await;
    let (conn, channel) = app.amqp().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let waiting = channel
        .queue_declare("orderflow.deadline".into(), passive, Default::default())
        .await
        .unwrap()
        .message_count();
    assert_eq!(waiting, 0, "nothing left waiting in the deadline queue");
    let _ = conn.close(200, "bye".into()).await;
    app.stop().await;
}

/// A dead letter about a compensation the order no longer waits for (its stock was given back
/// since, as by a copy the sweep re-sent) leaves the order to the compensation in flight, which
/// finishes the cancellation; parked, the order would have waited for an operator, and that
/// compensation would have found it in another state. (A compensation the order still waits for
/// parks it: `a_compensation_that_keeps_failing_is_parked_and_an_operator_retries_it` above.)
#[tokio::test]
async fn a_dead_compensation_the_order_no_longer_waits_for_does_not_park_it() {
    let mut app = TestApp::spawn_with(Options {
        workers: without(&[Order]),
        ..Default::default()
    })
    .await;
    let product = app.product("Returned", 1_000, 5).await;
    // No balance: the payment fails, the stock goes back, and the order waits, CANCELLING,
    // for the order worker to finish it.
    let id = app.order(41, &[(product, 1)], None).await;
    app.wait_order_row(&id, WAIT, |o| o.status.as_str() == "CANCELLING" && !o.stock_held)
        .await;
    let letter = json!({"id": uuid::Uuid::now_v7(), "type": "stock.release",
                        "occurredAt": "2026-12-07T10:00:00.000Z", "orderId": id, "data": {}});
    app.publish_raw(
        "",
        "orderflow.dead-letters",
        letter.to_string().as_bytes(),
        "stock.release",
    )
    .await;
    wait_dead_letters(&app, 1).await;
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "CANCELLING");
    app.spawn_workers(&[Order]).await;
    let order = app.wait_terminal(41, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("INSUFFICIENT_BALANCE")),
        "{order}"
    );
    assert_eq!(app.stock(product).await, 5);
    app.stop().await;
}

/// Publishes a forged dead letter: a `kind` command naming `order`, as if it had died in
/// `queue` (`x-first-death-queue`), straight into the dead-letter queue.
async fn forge_dead_letter(app: &TestApp, kind: &str, order: &str, queue: &str) {
    let id = uuid::Uuid::now_v7().to_string();
    let body = json!({"id": id, "type": kind, "occurredAt": "2026-12-07T10:00:00.000Z",
                      "orderId": order, "data": {"orderIds": [order]}});
    let headers = common::raw_amqp::table(&[("x-first-death-queue", common::raw_amqp::long_string(queue.as_bytes()))]);
    common::raw_amqp::publish(
        &app.config.amqp_url,
        common::raw_amqp::Message {
            exchange: "",
            routing_key: "orderflow.dead-letters",
            message_id: &id,
            correlation_id: None,
            headers: &headers,
            body: body.to_string().as_bytes(),
        },
    )
    .await;
}

async fn order_status(app: &TestApp, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, reason FROM orders WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_dead_forward_step_cancels_only_the_orders_still_waiting_for_it() {
    // No order worker: a paid order waits, PAID, for its `order.confirm`.
    let mut app = TestApp::spawn_with(Options {
        workers: without(&[Order]),
        ..Default::default()
    })
    .await;
    let product = app.product("Moved on", 1_000, 5).await;
    app.fund(42, 5_000).await;
    let id = app.order(42, &[(product, 2)], None).await;
    app.wait_order_row(&id, WAIT, |o| o.status.as_str() == "PAID").await;

    // A `stock.reserve` for it died (a duplicate whose twin reserved the stock): the order is
    // past that step, so the letter is recorded and the order left alone.
    forge_dead_letter(&app, "stock.reserve", &id, "orderflow.stock").await;
    wait_dead_letters(&app, 1).await;
    assert_eq!(order_status(&app, &id).await, ("PAID".to_owned(), None));

    // Its `order.confirm` died: that is the message it waits for, so it is cancelled and
    // everything it took goes back.
    forge_dead_letter(&app, "order.confirm", &id, "orderflow.order").await;
    wait_dead_letters(&app, 2).await;
    assert_eq!(
        order_status(&app, &id).await,
        ("CANCELLING".to_owned(), Some("PROCESSING_FAILED".to_owned()))
    );
    app.spawn_workers(&[Order]).await;
    let order = app.wait_terminal(42, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("PROCESSING_FAILED")),
        "{order}"
    );
    assert_eq!(app.stock(product).await, 5);
    assert_eq!(app.balance(42).await, 5_000);
    app.stop().await;
}

#[tokio::test]
async fn replaying_a_compensation_resumes_only_the_orders_parked_waiting_for_it() {
    let app = TestApp::spawn().await;
    let product = app.product("Parked", 10_000, 5).await;
    app.fund(43, 1_000).await; // too little: payment fails, stock must be released
    app.break_stock("Parked", ">").await;
    let id = app.order(43, &[(product, 2)], None).await;
    app.wait_order_row(&id, WAIT, |o| o.status.as_str() == "COMPENSATION_FAILED")
        .await;
    let letters = wait_dead_letters(&app, 1).await;
    assert_eq!(letters[0]["messageType"], "stock.release");
    let release = letters[0]["id"].as_i64().unwrap();

    // A `payment.refund` letter for the same order (it was never paid): replaying it must not
    // take the order out of the operator's hands, nor the stock it still holds.
    forge_dead_letter(&app, "payment.refund", &id, "orderflow.payment").await;
    let letters = wait_dead_letters(&app, 2).await;
    let refund = letters.iter().find(|l| l["messageType"] == "payment.refund").unwrap()["id"]
        .as_i64()
        .unwrap();
    let (status, body) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{refund}/replay"))
        .await;
    assert_eq!(status.as_u16(), 202, "{body}");
    assert_eq!(
        order_status(&app, &id).await,
        (
            "COMPENSATION_FAILED".to_owned(),
            Some("INSUFFICIENT_BALANCE".to_owned())
        )
    );

    // The letter it is parked on, replayed once the stock is healed, finishes it.
    app.heal_stock().await;
    let (status, body) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{release}/replay"))
        .await;
    assert_eq!(status.as_u16(), 202, "{body}");
    let order = app.wait_terminal(43, &id, WAIT).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("INSUFFICIENT_BALANCE")),
        "{order}"
    );
    assert_eq!(app.stock(product).await, 5);
    assert_eq!(app.balance(43).await, 1_000);
    app.stop().await;
}
