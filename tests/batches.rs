//! Deliveries that wait together are handled in one transaction: the outcome must be exactly
//! the one they would have had one by one, duplicates and poison included.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestApp;
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// `orderflow_step_batch_size` for `step`: (transactions, deliveries).
fn batches(step: &str) -> (f64, f64) {
    let text = orderflow_shared::metrics::render();
    let value = |name: &str| {
        let prefix = format!("orderflow_step_batch_size_{name}{{step=\"{step}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("count"), value("sum"))
}

/// Waits until `n` sessions of the test's database wait for a heavyweight lock.
async fn wait_lock_waiters(app: &TestApp, n: i64, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_backlog_handled_in_batches_ends_exactly_as_one_by_one() {
    use orderflow_workers::WorkerKind::*;
    // One delivery at a time per worker, so the order of the queue is the order of the
    // effects, and the stock worker starts late, in front of a backlog.
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Coupon, Order, Recovery],
        concurrency: 1,
        ..Default::default()
    })
    .await;
    let scarce = app.product("Scarce", 1_000, 10).await;
    let plenty = app.product("Plenty", 500, 100).await;
    let users: Vec<i64> = (2001..=2024).collect();
    let broke = [2003, 2007];
    for &user in &users {
        if !broke.contains(&user) {
            app.fund(user, 1_500).await;
        }
    }
    // Placed one after another: the queue holds their reservations in this order.
    let mut orders = Vec::new();
    for &user in &users {
        orders.push(app.order(user, &[(scarce, 1), (plenty, 1)], None).await);
    }
    // The first order's reservation once more (same message id), another reservation for it
    // (a new id: stale by the time it runs), and one for no order.
    app.wait_quiescent_outbox().await;
    assert_eq!(app.republish_outbox(&orders[0]).await, 1);
    let again = json!({"id": uuid::Uuid::now_v7(), "type": "stock.reserve", "occurredAt": "2026-11-21T10:00:00.000Z",
                       "orderId": orders[0], "data": {}});
    app.publish_raw(
        "orderflow.work",
        "stock.reserve",
        again.to_string().as_bytes(),
        "stock.reserve",
    )
    .await;
    let missing = uuid::Uuid::new_v4();
    let poison_id = uuid::Uuid::now_v7();
    let poison = json!({"id": poison_id, "type": "stock.reserve", "occurredAt": "2026-11-21T10:00:00.000Z",
                        "orderId": missing, "data": {}});
    app.publish_raw(
        "orderflow.work",
        "stock.reserve",
        poison.to_string().as_bytes(),
        "stock.reserve",
    )
    .await;

    // The stock worker works through the whole backlog before payment starts, so the units
    // the unfunded orders give back come after it (in the queue's order, as one by one).
    app.spawn_workers(&[Stock]).await;
    let deadline = Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        > 0
    {
        assert!(Instant::now() < deadline, "the backlog was not worked through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.spawn_workers(&[Payment]).await;
    app.wait_quiescent(WAIT).await;

    // Serially: the first ten reserve the scarce product; two of them cannot pay and give
    // their units back after the backlog has been refused; the other fourteen find none.
    let mut outcome = Vec::new();
    for (&user, id) in users.iter().zip(&orders) {
        let view = app.wait_terminal(user, id, WAIT).await;
        outcome.push((
            user,
            view["status"].as_str().unwrap().to_owned(),
            view["reason"].as_str().map(str::to_owned),
        ));
    }
    for (user, status, reason) in &outcome {
        let want = match user {
            2003 | 2007 => ("CANCELLED", Some("INSUFFICIENT_BALANCE")),
            ..=2010 => ("CONFIRMED", None),
            _ => ("CANCELLED", Some("OUT_OF_STOCK")),
        };
        assert_eq!((status.as_str(), reason.as_deref()), want, "user {user}");
    }
    assert_eq!(app.stock(scarce).await, 2);
    assert_eq!(app.stock(plenty).await, 100 - 8);
    for &user in &users {
        let want = if user > 2010 { 1_500 } else { 0 };
        assert_eq!(app.balance(user).await, want, "user {user}");
    }
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_ledger WHERE kind = 'PAYMENT'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(payments, 8);

    // The copy and the late reservation changed nothing; the message for no order was
    // dead-lettered and left no inbox record (a replay of it would be handled again).
    app.wait_outcomes("duplicate", 2).await;
    let deadline = Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letters WHERE order_id = $1")
        .bind(missing)
        .fetch_one(&app.pool)
        .await
        .unwrap()
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the message for no order was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = 'stock' AND message_id = $1")
        .bind(poison_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, 0);

    // And it did go in batches: fewer stock transactions than deliveries.
    let (transactions, deliveries) = batches("stock");
    assert!(
        transactions > 0.0 && deliveries > transactions,
        "stock: {deliveries} deliveries in {transactions} transactions"
    );
    app.stop().await;
}

#[tokio::test]
async fn one_poison_order_in_a_message_about_several_never_cancels_its_neighbours() {
    use orderflow_workers::WorkerKind::*;
    // No stock worker yet: the three orders wait at PENDING while their reservations are
    // replaced by one message naming all three and an order that does not exist.
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Coupon, Payment, Order, Recovery],
        ..Default::default()
    })
    .await;
    let product = app.product("Neighbours", 1_000, 10).await;
    let mut orders = Vec::new();
    for user in 3001..=3003 {
        app.fund(user, 1_000).await;
        orders.push(app.order(user, &[(product, 1)], None).await);
    }
    app.wait_quiescent_outbox().await;
    let (conn, channel) = app.amqp().await;
    channel
        .queue_purge("orderflow.stock".into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    // The middle order cannot be reserved (a stand-in for any failure that is its own).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE orders ADD CONSTRAINT poison CHECK (id <> '{}' OR status <> 'STOCK_RESERVED')",
        orders[1]
    )))
    .execute(&app.pool)
    .await
    .unwrap();
    let missing = uuid::Uuid::now_v7();
    let mut named: Vec<String> = orders.clone();
    named.push(missing.to_string());
    let message = json!({"id": uuid::Uuid::now_v7(), "type": "stock.reserve", "occurredAt": "2026-11-30T10:00:00.000Z",
                         "data": {"orderIds": named}});
    app.publish_raw(
        "orderflow.work",
        "stock.reserve",
        message.to_string().as_bytes(),
        "stock.reserve",
    )
    .await;
    app.spawn_workers(&[Stock]).await;

    // The neighbours go through; the poison order fails alone until its own message is
    // dead-lettered, which cancels it; the missing order is dead-lettered alone.
    assert_eq!(app.wait_terminal(3001, &orders[0], WAIT).await["status"], "CONFIRMED");
    assert_eq!(app.wait_terminal(3003, &orders[2], WAIT).await["status"], "CONFIRMED");
    let poisoned = app.wait_terminal(3002, &orders[1], WAIT).await;
    assert_eq!(
        (poisoned["status"].as_str(), poisoned["reason"].as_str()),
        (Some("CANCELLED"), Some("PROCESSING_FAILED"))
    );
    app.wait_quiescent(WAIT).await;
    assert_eq!(app.stock(product).await, 8);
    assert_eq!(app.balance(3002).await, 1_000);
    let letters: Vec<(Vec<uuid::Uuid>, String)> =
        sqlx::query_as("SELECT order_ids, reason FROM dead_letters ORDER BY order_ids[1]")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let mut want = vec![
        (vec![orders[1].parse().unwrap()], "delivery_limit".to_owned()),
        (vec![missing], "rejected".to_owned()),
    ];
    want.sort();
    let mut got = letters;
    got.sort();
    assert_eq!(got, want);
    app.stop().await;
}

/// Transactions that reserved stock: a stock batch writes every order's history row in one
/// transaction, so its rows share one `xmin` (counted in the test's own database, so tests
/// running in one process do not disturb it).
async fn stock_transactions(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM order_status_history WHERE to_status = 'STOCK_RESERVED'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// WORKER_LINGER: while another batch of a worker is in flight, the next one also takes what
/// arrives within the linger; with nothing in flight a batch starts at once.
#[tokio::test]
async fn a_busy_worker_lingers_for_a_larger_batch_and_an_idle_one_never_waits() {
    const LINGER: Duration = Duration::from_secs(4);
    let app = TestApp::spawn_with(common::Options {
        concurrency: 2,
        linger: LINGER,
        ..Default::default()
    })
    .await;
    let held = app.product("Held", 100, 10).await;
    let free = app.product("Free", 100, 10).await;
    for user in 3001..=3005 {
        app.fund(user, 1_000).await;
    }

    // Idle: an order goes through every hop without waiting for the linger.
    let started = Instant::now();
    let first = app.order(3001, &[(free, 1)], None).await;
    assert_eq!(app.wait_terminal(3001, &first, WAIT).await["status"], "CONFIRMED");
    assert!(
        started.elapsed() < LINGER,
        "an order on an idle system took {:?}: some hop waited for its linger",
        started.elapsed()
    );
    let before = stock_transactions(&app).await;

    // Busy: the stock batch of the next order blocks on a product row the test holds (NO KEY:
    // placing the order still takes its key-share lock)...
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR NO KEY UPDATE")
        .bind(held)
        .execute(&mut *lock)
        .await
        .unwrap();
    let blocked = app.order(3002, &[(held, 1)], None).await;
    wait_lock_waiters(&app, 1, "the stock batch never waited for the held product").await;
    // ... so the three orders placed one after another meanwhile make one batch, not three.
    let mut rest = Vec::new();
    for user in 3003..=3005 {
        rest.push((user, app.order(user, &[(free, 1)], None).await));
    }
    for (user, order) in &rest {
        assert_eq!(app.wait_terminal(*user, order, WAIT).await["status"], "CONFIRMED");
    }
    lock.commit().await.unwrap();
    assert_eq!(app.wait_terminal(3002, &blocked, WAIT).await["status"], "CONFIRMED");

    assert_eq!(
        stock_transactions(&app).await - before,
        2,
        "stock batches while one was blocked"
    );
    assert_eq!(app.stock(free).await, 6);
    assert_eq!(app.stock(held).await, 9);
    app.stop().await;
}

/// A move between in-flight statuses rewrites the order row in place (a heap-only tuple: no
/// index entries), and only the move that ends the order touches the indexes
/// (migrations/20261201000104_orders_hot_updates.sql). Counted by PostgreSQL for this
/// transaction alone.
#[tokio::test]
async fn an_order_moving_between_in_flight_statuses_is_updated_in_place() {
    let app = TestApp::api_only().await;
    let product = app.product("Widget", 1_000, 10).await;
    app.fund(3001, 10_000).await;
    let order_id: uuid::Uuid = app.order(3001, &[(product, 1)], None).await.parse().unwrap();
    let mut tx = app.pool.begin().await.unwrap();
    let mut moved = Vec::new();
    for to in ["STOCK_RESERVED", "PAID", "CONFIRMED"] {
        sqlx::query("UPDATE orders SET status = $2, stock_held = true, updated_at = now() WHERE id = $1")
            .bind(order_id)
            .bind(to)
            .execute(&mut *tx)
            .await
            .unwrap();
        let counts: (i64, i64) =
            sqlx::query_as("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'orders'")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        moved.push(counts);
    }
    // (updates, of which in place): two in place, then the end of the order with its indexes.
    assert_eq!(moved, vec![(1, 1), (2, 2), (3, 2)]);
    tx.rollback().await.unwrap();
    app.stop().await;
}

/// Requests that share one accept transaction each get the answer they would have had alone:
/// a retry replays its first answer, a key reused with another request is 422, the second of
/// two requests with one key is 409, an unknown product is 404, and the new orders are placed
/// once each, together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_accept_batch_answers_each_request_as_if_it_were_alone() {
    let app = TestApp::api_only().await;
    let product = app.product("Batched", 1_000, 100).await;
    let token = app.token(4001);
    let body = |quantity: i32| json!({"items": [{"productId": product, "quantity": quantity}]});
    let send = |key: &'static str, body: serde_json::Value| {
        let (http, url, token) = (app.http.clone(), app.url("/api/orders"), token.clone());
        async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (
                res.status().as_u16(),
                replayed,
                res.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, _, first) = send("first", body(1)).await;
    assert_eq!(status, 202);
    assert_eq!(send("other", body(1)).await.0, 202);

    // Both accept writers wait on the product row the test holds (placing an order takes a
    // key-share lock on its products), so what arrives meanwhile queues for one batch.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
        .bind(product)
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut blockers = tokio::task::JoinSet::new();
    for (n, key) in [(1, "blocker-1"), (2, "blocker-2")] {
        blockers.spawn(send(key, body(1)));
        wait_lock_waiters(&app, n, "an accept writer never waited for the held product").await;
    }
    let mix = [
        ("fresh-1", body(1)),
        ("fresh-2", body(2)),
        ("first", body(1)),
        ("other", body(5)),
        ("twin", body(1)),
        ("twin", body(1)),
        ("ghost", json!({"items": [{"productId": 999_999, "quantity": 1}]})),
    ];
    let mut sent = tokio::task::JoinSet::new();
    for (i, (key, body)) in mix.into_iter().enumerate() {
        sent.spawn({
            let answer = send(key, body);
            async move { (i, key, answer.await) }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.rollback().await.unwrap();
    while let Some(done) = blockers.join_next().await {
        assert_eq!(done.unwrap().0, 202);
    }
    let mut answers = Vec::new();
    while let Some(done) = sent.join_next().await {
        answers.push(done.unwrap());
    }
    answers.sort_by_key(|(i, ..)| *i);
    let code = |a: &serde_json::Value| a["code"].as_str().map(str::to_owned);
    let mut placed = Vec::new();
    let mut twins = Vec::new();
    for (_, key, (status, replayed, answer)) in &answers {
        match *key {
            "fresh-1" | "fresh-2" => {
                assert_eq!((*status, *replayed), (202, false), "{key}: {answer}");
                placed.push(answer["orderId"].as_str().unwrap().to_owned());
            }
            "first" => assert_eq!((*status, *replayed, answer), (202, true, &first), "{key}"),
            "other" => assert_eq!(
                (*status, code(answer)),
                (422, Some("IDEMPOTENCY_KEY_REUSED".to_owned())),
                "{key}: {answer}"
            ),
            "twin" => twins.push((*status, answer.clone())),
            "ghost" => assert_eq!(
                (*status, code(answer)),
                (404, Some("PRODUCT_NOT_FOUND".to_owned())),
                "{key}: {answer}"
            ),
            _ => unreachable!(),
        }
    }
    twins.sort_by_key(|(status, _)| *status);
    assert_eq!((twins[0].0, twins[1].0), (202, 409), "{twins:?}");
    assert_eq!(code(&twins[1].1).as_deref(), Some("IDEMPOTENCY_KEY_IN_USE"));
    placed.push(twins[0].1["orderId"].as_str().unwrap().to_owned());

    // Exactly the orders answered 202 exist: first, other, two blockers, two fresh, one twin;
    // the three new ones of the mix in one transaction.
    let ids: Vec<uuid::Uuid> = placed.iter().map(|id| id.parse().unwrap()).collect();
    let (orders, transactions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE user_id = 4001),
                (SELECT count(DISTINCT xmin::text) FROM orders WHERE id = ANY($1))",
    )
    .bind(&ids)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((orders, transactions), (7, 1));
    app.stop().await;
}

/// `GET /api/orders`, the route shops poll: its pages and `total` (the user's exact number of
/// orders) after accept batches that share users, after orders written by another writer (by
/// hand, in one statement for two users) and after one deleted by hand; a page past the end
/// still carries the total, a user without orders has 0; with `Prefer: count=none` the same
/// pages come without `total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_order_list_pages_and_counts_each_users_orders_whoever_wrote_them() {
    let app = TestApp::api_only().await;
    let product = app.product("Listed", 100, 1_000).await;
    // Sent at once, so accept batches can hold several users' orders.
    let line = [(product, 1)];
    let users = std::iter::repeat_n(5001_i64, 12)
        .chain(std::iter::repeat_n(5002, 9))
        .chain([5003]);
    let ids = futures_util::future::join_all(users.map(|user| app.order(user, &line, None))).await;
    let placed: std::collections::BTreeSet<String> = ids[..12].iter().cloned().collect();
    let page_of = |user: i64, page: u32| {
        let token = app.token(user);
        let app = &app;
        async move {
            let (status, body) = app.get(&format!("/api/orders?page={page}&size=5"), &token).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let listed = |user: i64, page: u32| {
        let page = page_of(user, page);
        async move {
            let body = page.await;
            (body["items"].as_array().unwrap().len(), body["total"].as_i64().unwrap())
        }
    };
    // The pages together list each of the user's orders once.
    let mut paged = Vec::new();
    for page in 0..3 {
        let body = page_of(5001, page).await;
        assert_eq!(body["total"], 12);
        paged.extend(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["orderId"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(paged.len(), 12);
    assert_eq!(paged.into_iter().collect::<std::collections::BTreeSet<_>>(), placed);
    assert_eq!(listed(5002, 1).await, (4, 9));
    assert_eq!(listed(5003, 0).await, (1, 1));
    assert_eq!(listed(5003, 7).await, (0, 1), "a page past the end");
    assert_eq!(listed(5004, 0).await, (0, 0), "a user without orders");

    // Another writer: two orders inserted by hand for one user, one for another, in one statement.
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, total_amount, deadline_at)
         SELECT gen_random_uuid(), u, 'PENDING', 100, now() + interval '1 minute' FROM unnest($1::int8[]) AS u",
    )
    .bind([5003_i64, 5003, 5004])
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(listed(5003, 0).await, (3, 3));
    assert_eq!(listed(5004, 0).await, (1, 1));

    // An order deleted by hand (with what refers to it) is no longer counted.
    sqlx::raw_sql(
        "WITH gone AS (SELECT id FROM orders WHERE user_id = 5002 ORDER BY created_at LIMIT 1),
              lines AS (DELETE FROM order_items WHERE order_id IN (SELECT id FROM gone)),
              history AS (DELETE FROM order_status_history WHERE order_id IN (SELECT id FROM gone))
         DELETE FROM orders WHERE id IN (SELECT id FROM gone)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(listed(5002, 0).await, (5, 8));

    // `Prefer: count=none` (RFC 7240): the same pages without `total`, and it says so; a
    // `count` preference it does not understand is ignored.
    let token = app.token(5001);
    let uncounted = |page: u32, prefer: &'static str| {
        let (app, token) = (&app, token.clone());
        async move {
            let res = app
                .request(
                    Method::GET,
                    &format!("/api/orders?page={page}&size=5"),
                    Some(&token),
                    None,
                    &[("prefer", prefer)],
                )
                .await;
            assert_eq!(res.status(), 200);
            let header = |name: &str| res.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(header("vary").as_deref(), Some("prefer"), "counted or not");
            let applied = header("preference-applied");
            (applied, res.json::<Value>().await.unwrap())
        }
    };
    for page in 0..4 {
        let counted = page_of(5001, page).await;
        let (applied, body) = uncounted(page, "count=none").await;
        assert_eq!(applied.as_deref(), Some("count=none"));
        assert_eq!(body.get("total"), None, "{body}");
        assert_eq!(body["items"], counted["items"], "page {page}");
        assert_eq!(body["items"].as_array().unwrap().len(), [5, 5, 2, 0][page as usize]);
    }
    for not_understood in ["count=exact", "count=NONE", "count=exact, count=none"] {
        let (applied, body) = uncounted(0, not_understood).await;
        assert_eq!((applied, body["total"].as_i64()), (None, Some(12)), "{not_understood}");
    }

    app.stop().await;
}

/// Two orders of one user with the same coupon reach the coupon worker together, the first
/// below the coupon's minimum order amount: as one by one in id order, the first is refused
/// and the second takes the coupon (not both refused because the first was tried alone). The
/// coupon worker (one batch at a time) is held on a third order's coupon, which the test
/// locks, until both are waiting, so they make one batch.
#[tokio::test]
async fn a_coupon_batch_gives_the_coupon_to_the_first_order_that_meets_its_minimum() {
    let app = TestApp::spawn_with(common::Options {
        concurrency: 1,
        ..Default::default()
    })
    .await;
    let product = app.product("Gift box", 1_000, 10).await;
    let gift = app
        .coupon(
            json!({"name": "500 off 2000", "discountType": "FIXED", "discountValue": 500,
                       "quantity": 10, "minOrderAmount": 2_000}),
        )
        .await;
    let plain = app
        .coupon(json!({"name": "100 off", "discountType": "FIXED", "discountValue": 100, "quantity": 10}))
        .await;
    for (user, coupon) in [(31, gift), (32, plain)] {
        let (status, _) = app
            .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
            .await;
        assert_eq!(status, 201);
        app.fund(user, 10_000).await;
    }
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM user_coupons WHERE user_id = 32 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let blocker = app.order(32, &[(product, 1)], Some(plain)).await;
    wait_lock_waiters(&app, 1, "the coupon worker never waited for the held coupon").await;

    let small = app.order(31, &[(product, 1)], Some(gift)).await;
    let large = app.order(31, &[(product, 3)], Some(gift)).await;
    assert!(small < large, "ids are in accept order");
    let deadline = Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE user_id = 31 AND status = 'STOCK_RESERVED'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        < 2
    {
        assert!(Instant::now() < deadline, "the stock worker did not reserve both");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.wait_quiescent_outbox().await;
    // Both delivered to the waiting worker: none left ready in the queue.
    let (conn, channel) = app.amqp().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    while channel
        .queue_declare("orderflow.coupon".into(), passive, Default::default())
        .await
        .unwrap()
        .message_count()
        > 0
    {
        assert!(Instant::now() < deadline, "the coupon worker was not sent both");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // read off the connection
    holder.rollback().await.unwrap();

    assert_eq!(app.wait_terminal(32, &blocker, WAIT).await["status"], "CONFIRMED");
    let small = app.wait_terminal(31, &small, WAIT).await;
    assert_eq!(
        (small["status"].as_str(), small["reason"].as_str()),
        (Some("CANCELLED"), Some("COUPON_INVALID")),
        "{small}"
    );
    let large = app.wait_terminal(31, &large, WAIT).await;
    assert_eq!(
        (
            large["status"].as_str(),
            large["discountAmount"].as_i64(),
            large["paidAmount"].as_i64()
        ),
        (Some("CONFIRMED"), Some(500), Some(2_500)),
        "{large}"
    );
    assert_eq!(app.balance(31).await, 7_500);
    assert_eq!(app.stock(product).await, 6);
    // And the two were decided in one transaction: their coupon history rows share it.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT h.xmin::text) FROM order_status_history h JOIN orders o ON o.id = h.order_id
         WHERE o.user_id = 31 AND h.from_status = 'STOCK_RESERVED'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(transactions, 1);
    app.stop().await;
}

/// A message about `orders` as a worker decodes it.
fn command(
    kind: orderflow_shared::messaging::MessageType,
    orders: &[uuid::Uuid],
) -> orderflow_workers::runtime::Incoming {
    orderflow_workers::runtime::Incoming {
        kind,
        envelope: orderflow_shared::messaging::Envelope {
            id: uuid::Uuid::now_v7(),
            kind: kind.as_str().to_owned(),
            occurred_at: chrono::Utc::now(),
            order_id: None,
            data: json!({ "orderIds": orders }),
        },
        trace: None,
        order_ids: orders.to_vec(),
        order_traces: vec![None; orders.len()],
    }
}

/// Runs `step` on `batch` in a transaction of its own (as the runtime does, the inbox aside), in
/// a task; the number of outcomes once it committed.
fn handle_in_task<S: orderflow_workers::runtime::Step>(
    app: &TestApp,
    step: S,
    batch: Vec<orderflow_workers::runtime::Incoming>,
) -> tokio::task::JoinHandle<usize> {
    let pool = app.pool.clone();
    tokio::spawn(async move {
        let batch: Vec<&_> = batch.iter().collect();
        let mut tx = pool.begin().await.unwrap();
        let outcomes = step.handle(&mut tx, &batch, 1).await.unwrap();
        tx.commit().await.unwrap();
        outcomes.len()
    })
}

/// A payment batch that refunds one user and charges another takes both balances' locks in
/// user order: a batch refunding user 2 and charging user 1 and one doing the reverse never
/// hold what the other waits for (a deadlock PostgreSQL would end after a second). Shown by
/// the lock it does not take: waiting for user 1's balance, the batch holds no lock on user 2's.
#[tokio::test]
async fn a_payment_batch_takes_its_balance_locks_in_user_order() {
    use orderflow_shared::messaging::MessageType;
    // No workers: the orders stay where the test puts them.
    let app = TestApp::spawn_with(common::Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let product = app.product("Kettle", 1_000, 10).await;
    app.fund(1, 5_000).await;
    app.fund(2, 5_000).await;
    let refunded: uuid::Uuid = app.order(2, &[(product, 1)], None).await.parse().unwrap();
    let charged: uuid::Uuid = app.order(1, &[(product, 1)], None).await.parse().unwrap();
    // As a paid order being cancelled and an order with its stock reserved are.
    sqlx::query("UPDATE orders SET status = 'CANCELLING', paid_amount = total_amount WHERE id = $1")
        .bind(refunded)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET status = 'STOCK_RESERVED', stock_held = true WHERE id = $1")
        .bind(charged)
        .execute(&app.pool)
        .await
        .unwrap();

    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM balances WHERE user_id = 1 FOR NO KEY UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let batch = handle_in_task(
        &app,
        orderflow_workers::steps::payment::Payment,
        vec![
            command(MessageType::PaymentRefund, &[refunded]),
            command(MessageType::PaymentCharge, &[charged]),
        ],
    );
    wait_lock_waiters(&app, 1, "the batch waits for user 1's balance").await;
    let user_2_free: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM balances WHERE user_id = 2 FOR NO KEY UPDATE SKIP LOCKED")
            .fetch_optional(&app.pool)
            .await
            .unwrap();
    assert_eq!(user_2_free, Some(1), "user 2's balance is not locked before user 1's");
    holder.commit().await.unwrap();
    assert_eq!(batch.await.unwrap(), 2);

    // Both applied, once.
    let balances: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, balance FROM balances ORDER BY user_id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(balances, vec![(1, 4_000), (2, 6_000)]);
    let statuses: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM orders WHERE id = ANY($1) ORDER BY id")
            .bind(vec![refunded, charged])
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let status = |id| statuses.iter().find(|(o, _)| *o == id).map(|(_, s)| s.as_str());
    assert_eq!((status(refunded), status(charged)), (Some("CANCELLING"), Some("PAID")));
    app.stop().await;
}

/// The coupon step's restores and applies likewise take their user coupons' locks in one key
/// order (coupon, user): a batch restoring user 2's coupon 2 and applying user 1's coupon 1,
/// waiting for coupon 1, holds no lock on coupon 2.
#[tokio::test]
async fn a_coupon_batch_takes_its_user_coupon_locks_in_key_order() {
    use orderflow_shared::messaging::MessageType;
    let app = TestApp::spawn_with(common::Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let product = app.product("Teapot", 1_000, 10).await;
    let coupon = || app.coupon(json!({"name": "tea", "discountType": "FIXED", "discountValue": 100, "quantity": 10}));
    let (first, second) = (coupon().await, coupon().await);
    for (coupon, user) in [(first, 1), (second, 2)] {
        let (status, _) = app
            .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), Value::Null)
            .await;
        assert!(status.is_success(), "{status}");
    }
    let applying: uuid::Uuid = app.order(1, &[(product, 1)], Some(first)).await.parse().unwrap();
    let restoring: uuid::Uuid = app.order(2, &[(product, 1)], Some(second)).await.parse().unwrap();
    // As an order whose coupon was applied, now being cancelled, and one waiting for its coupon.
    sqlx::query("UPDATE orders SET status = 'CANCELLING', coupon_held = true WHERE id = $1")
        .bind(restoring)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE user_coupons SET status = 'USED', order_id = $1, used_at = now() WHERE coupon_id = $2")
        .bind(restoring)
        .bind(second)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET status = 'STOCK_RESERVED', stock_held = true WHERE id = $1")
        .bind(applying)
        .execute(&app.pool)
        .await
        .unwrap();

    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM user_coupons WHERE coupon_id = $1 FOR NO KEY UPDATE")
        .bind(first)
        .execute(&mut *holder)
        .await
        .unwrap();
    let batch = handle_in_task(
        &app,
        orderflow_workers::steps::coupon::Coupon,
        vec![
            command(MessageType::CouponRestore, &[restoring]),
            command(MessageType::CouponApply, &[applying]),
        ],
    );
    wait_lock_waiters(&app, 1, "the batch waits for coupon 1").await;
    let second_free: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM user_coupons WHERE coupon_id = $1 FOR NO KEY UPDATE SKIP LOCKED")
            .bind(second)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
    assert_eq!(second_free, Some(1), "coupon 2 is not locked before coupon 1");
    holder.commit().await.unwrap();
    assert_eq!(batch.await.unwrap(), 2);

    let coupons: Vec<(i64, String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT coupon_id, status, order_id FROM user_coupons ORDER BY coupon_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        coupons,
        vec![
            (first, "USED".to_owned(), Some(applying)),
            (second, "AVAILABLE".to_owned(), None)
        ]
    );
    app.stop().await;
}
