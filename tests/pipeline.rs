//! The order pipeline end to end, against the real PostgreSQL and RabbitMQ.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::TestApp;
use orderflow_shared::messaging::topology::DATA_PLATFORM_QUEUE;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_order_without_coupon_is_confirmed_and_published_once() {
    let app = TestApp::spawn().await;
    let product = app.product("Coffee", 1_500, 10).await;
    app.fund(7, 10_000).await;

    let order_id = app.order(7, &[(product, 2)], None).await;
    let order = app.wait_terminal(7, &order_id, WAIT).await;

    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(order["totalAmount"], 3_000);
    assert_eq!(order["discountAmount"], 0);
    assert_eq!(order["paidAmount"], 3_000);
    let path: Vec<_> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(path, ["PENDING", "STOCK_RESERVED", "PAID", "CONFIRMED"]);
    assert_eq!(app.stock(product).await, 8);
    assert_eq!(app.balance(7).await, 7_000);
    let (_, ledger) = app.get("/api/balance/history", &app.token(7)).await;
    assert_eq!(ledger["items"][0]["kind"], "PAYMENT");
    assert_eq!(ledger["items"][0]["amount"], 3_000);
    assert_eq!(ledger["items"][0]["orderId"], order_id.as_str());

    app.wait_quiescent(WAIT).await;
    let events = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    assert_eq!(events.len(), 1);
    let (props, body) = &events[0];
    assert_eq!(body["type"], "order.confirmed");
    // A CloudEvent (structured mode): the order in `subject`.
    assert_eq!(
        (&body["specversion"], &body["source"], &body["subject"]),
        (&json!("1.0"), &json!("/orderflow/orders"), &json!(order_id))
    );
    assert_eq!(
        body["data"],
        json!({
            "userId": 7, "couponId": null,
            "items": [{"productId": product, "quantity": 2, "unitPrice": 1_500}],
            "totalAmount": 3_000, "discountAmount": 0, "paidAmount": 3_000,
            "confirmedAt": body["data"]["confirmedAt"],
        })
    );
    assert_eq!(
        props.message_id().as_ref().map(|s| s.to_string()),
        body["id"].as_str().map(str::to_owned)
    );
    assert_eq!(
        props.kind().as_ref().map(|s| s.to_string()).as_deref(),
        Some("order.confirmed")
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.to_string()),
        Some(order_id.clone())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.to_string()).as_deref(),
        Some("application/cloudevents+json")
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    app.stop().await;
}

/// Reads ledger rows of a user: (kind, amount, order id).
async fn ledger(app: &TestApp, user: i64) -> Vec<(String, i64, Option<uuid::Uuid>)> {
    sqlx::query_as("SELECT kind, amount, order_id FROM balance_ledger WHERE user_id = $1 ORDER BY id")
        .bind(user)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn coupon_status(app: &TestApp, user: i64, coupon: i64) -> String {
    let (_, list) = app.get("/api/coupons", &app.token(user)).await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["couponId"] == coupon)
        .map(|c| c["status"].as_str().unwrap().to_owned())
        .unwrap()
}

fn history(order: &serde_json::Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn fixed_and_percent_coupons_discount_the_payment() {
    let app = TestApp::spawn().await;
    let product = app.product("Tea", 15_000, 10).await;
    let fixed = app
        .coupon(json!({"name": "3000 off", "discountType": "FIXED", "discountValue": 3_000, "quantity": 10}))
        .await;
    let percent = app
        .coupon(json!({"name": "15% off", "discountType": "PERCENT", "discountValue": 15, "quantity": 10}))
        .await;
    for (user, coupon) in [(21, fixed), (22, percent)] {
        let (status, _) = app
            .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
            .await;
        assert_eq!(status, 201);
        app.fund(user, 100_000).await;
    }

    let o1 = app.order(21, &[(product, 2)], Some(fixed)).await;
    let o2 = app.order(22, &[(product, 3)], Some(percent)).await;
    let o1 = app.wait_terminal(21, &o1, WAIT).await;
    let o2 = app.wait_terminal(22, &o2, WAIT).await;

    assert_eq!(
        (
            o1["status"].as_str(),
            o1["totalAmount"].as_i64(),
            o1["discountAmount"].as_i64(),
            o1["paidAmount"].as_i64()
        ),
        (Some("CONFIRMED"), Some(30_000), Some(3_000), Some(27_000))
    );
    // 15% of 45,000 = 6,750
    assert_eq!(
        (
            o2["status"].as_str(),
            o2["totalAmount"].as_i64(),
            o2["discountAmount"].as_i64(),
            o2["paidAmount"].as_i64()
        ),
        (Some("CONFIRMED"), Some(45_000), Some(6_750), Some(38_250))
    );
    assert_eq!(
        history(&o1),
        ["PENDING", "STOCK_RESERVED", "COUPON_APPLIED", "PAID", "CONFIRMED"]
    );
    assert_eq!(app.balance(21).await, 73_000);
    assert_eq!(app.balance(22).await, 61_750);
    assert_eq!(app.stock(product).await, 5);
    assert_eq!(coupon_status(&app, 21, fixed).await, "USED");
    assert_eq!(coupon_status(&app, 22, percent).await, "USED");

    app.wait_quiescent(WAIT).await;
    let events = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    assert_eq!(events.len(), 2);
    let e1 = events.iter().find(|(_, b)| b["subject"] == o1["orderId"]).unwrap();
    assert_eq!(e1.1["data"]["couponId"], fixed);
    assert_eq!(e1.1["data"]["discountAmount"], 3_000);
    assert_eq!(e1.1["data"]["paidAmount"], 27_000);
    app.stop().await;
}

#[tokio::test]
async fn each_failure_reason_cancels_and_gives_everything_back() {
    let app = TestApp::spawn().await;
    let scarce = app.product("Scarce", 1_000, 1).await;
    let plenty = app.product("Plenty", 10_000, 100).await;
    let coupon = app
        .coupon(
            json!({"name": "big spender", "discountType": "FIXED", "discountValue": 1_000,
                                  "quantity": 10, "minOrderAmount": 50_000}),
        )
        .await;
    // User 31: out of stock (wants 2 of 1). Has a coupon the order never reaches.
    // User 32: coupon invalid (order below the coupon's minimum). Stock must come back.
    // User 33: insufficient balance, with a valid coupon. Stock and coupon must come back.
    app.capture("cancelled", "orderflow.events", "order.cancelled").await;
    for user in [31, 32, 33] {
        let (status, _) = app
            .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
            .await;
        assert_eq!(status, 201);
    }
    app.fund(31, 50_000).await;
    app.fund(32, 50_000).await;
    app.fund(33, 5_000).await;

    let o1 = app.order(31, &[(scarce, 2), (plenty, 1)], None).await;
    let o2 = app.order(32, &[(plenty, 2)], Some(coupon)).await;
    let o3 = app.order(33, &[(plenty, 6)], Some(coupon)).await;
    let o1 = app.wait_terminal(31, &o1, WAIT).await;
    let o2 = app.wait_terminal(32, &o2, WAIT).await;
    let o3 = app.wait_terminal(33, &o3, WAIT).await;

    assert_eq!(
        (o1["status"].as_str(), o1["reason"].as_str()),
        (Some("CANCELLED"), Some("OUT_OF_STOCK"))
    );
    assert_eq!(history(&o1), ["PENDING", "CANCELLING", "CANCELLED"]);
    // It held nothing, so the stock worker cancelled it in one transaction: no
    // order.finish-cancel round trip, just the event for the data platform.
    let sent: Vec<String> = sqlx::query_scalar(
        "SELECT message_type FROM outbox WHERE order_ids @> ARRAY[$1::uuid] AND message_type <> 'order.deadline' ORDER BY id",
    )
    .bind(o1["orderId"].as_str().unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(sent, ["stock.reserve", "order.cancelled"]);
    assert_eq!(
        (o2["status"].as_str(), o2["reason"].as_str()),
        (Some("CANCELLED"), Some("COUPON_INVALID"))
    );
    assert_eq!(history(&o2), ["PENDING", "STOCK_RESERVED", "CANCELLING", "CANCELLED"]);
    assert_eq!(
        (o3["status"].as_str(), o3["reason"].as_str()),
        (Some("CANCELLED"), Some("INSUFFICIENT_BALANCE"))
    );
    assert_eq!(
        history(&o3),
        ["PENDING", "STOCK_RESERVED", "COUPON_APPLIED", "CANCELLING", "CANCELLED"]
    );
    for o in [&o1, &o2, &o3] {
        assert_eq!(o["paidAmount"], 0);
    }

    app.wait_quiescent(WAIT).await;
    assert_eq!(
        app.stock(scarce).await,
        1,
        "all-or-nothing: the scarce unit was never taken"
    );
    assert_eq!(app.stock(plenty).await, 100, "reserved stock was released");
    for user in [31, 32, 33] {
        assert_eq!(coupon_status(&app, user, coupon).await, "AVAILABLE");
        assert!(
            ledger(&app, user).await.iter().all(|(kind, _, _)| kind == "CHARGE"),
            "no money moved for {user}"
        );
    }
    assert_eq!(app.balance(31).await, 50_000);
    assert_eq!(app.balance(33).await, 5_000);
    assert!(
        app.drain_queue(DATA_PLATFORM_QUEUE).await.is_empty(),
        "a cancelled order never produces order.confirmed"
    );
    // Each order.cancelled says why and what was given back.
    let events = app.drain_queue("cancelled").await;
    assert_eq!(events.len(), 3);
    let event = |o: &Value| events.iter().find(|(_, b)| b["subject"] == o["orderId"]).unwrap().1["data"].clone();
    let (e1, e2, e3) = (event(&o1), event(&o2), event(&o3));
    assert_eq!(
        (e1["userId"].as_i64(), e1["reason"].as_str()),
        (Some(31), Some("OUT_OF_STOCK"))
    );
    assert_eq!(
        e1["returned"],
        json!({"items": [], "couponId": null, "refundedAmount": 0})
    );
    assert_eq!(e2["reason"], "COUPON_INVALID");
    assert_eq!(
        e2["returned"],
        json!({"items": [{"productId": plenty, "quantity": 2, "unitPrice": 10_000}], "couponId": null, "refundedAmount": 0})
    );
    assert_eq!(e3["reason"], "INSUFFICIENT_BALANCE");
    assert_eq!(
        e3["returned"],
        json!({"items": [{"productId": plenty, "quantity": 6, "unitPrice": 10_000}], "couponId": coupon, "refundedAmount": 0})
    );
    app.stop().await;
}

#[tokio::test]
async fn a_paid_order_that_times_out_is_refunded_and_the_late_confirm_is_refused() {
    // No order worker at first: the order gets as far as PAID and stays there until its
    // deadline (1 s) cancels it; every compensation runs; then the order worker starts, and
    // the order.confirm waiting for it finds the order CANCELLING and changes nothing.
    use orderflow_workers::WorkerKind::*;
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Stock, Coupon, Payment, Recovery],
        order_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let product = app.product("Slow", 5_000, 3).await;
    let coupon = app
        .coupon(json!({"name": "10%", "discountType": "PERCENT", "discountValue": 10, "quantity": 1}))
        .await;
    app.post(&format!("/api/coupons/{coupon}/issue"), &app.token(41), json!({}))
        .await;
    app.fund(41, 20_000).await;
    app.capture("cancelled", "orderflow.events", "order.cancelled").await;

    let id = app.order(41, &[(product, 2)], Some(coupon)).await;
    app.wait_order_row(&id, WAIT, |o| {
        o.status.as_str() == "CANCELLING" && !o.stock_held && !o.coupon_held && o.paid_amount == 0
    })
    .await;
    app.spawn_workers(&[Order]).await;
    let order = app.wait_terminal(41, &id, WAIT).await;

    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("TIMEOUT"))
    );
    assert_eq!(
        history(&order),
        [
            "PENDING",
            "STOCK_RESERVED",
            "COUPON_APPLIED",
            "PAID",
            "CANCELLING",
            "CANCELLED"
        ]
    );
    app.wait_quiescent(WAIT).await;
    assert_eq!(app.balance(41).await, 20_000);
    let cancelled = app.drain_queue("cancelled").await;
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].1["data"]["reason"], "TIMEOUT");
    assert_eq!(
        cancelled[0].1["data"]["returned"],
        json!({"items": [{"productId": product, "quantity": 2, "unitPrice": 5_000}], "couponId": coupon, "refundedAmount": 9_000})
    );
    let entries = ledger(&app, 41).await;
    let order_uuid: uuid::Uuid = id.parse().unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|(_, _, o)| *o == Some(order_uuid))
            .map(|(k, a, _)| (k.as_str(), *a))
            .collect::<Vec<_>>(),
        [("PAYMENT", 9_000), ("REFUND", 9_000)]
    );
    assert_eq!(coupon_status(&app, 41, coupon).await, "AVAILABLE");
    assert_eq!(app.stock(product).await, 3);
    assert!(app.drain_queue(DATA_PLATFORM_QUEUE).await.is_empty());
    app.stop().await;
}

/// 200 users race for 50 units: exactly 50 win.
async fn contention(instances: usize) {
    let app = TestApp::spawn_with(common::Options {
        instances,
        ..Default::default()
    })
    .await;
    let product = app.product("Hot", 2_000, 50).await;
    let users: Vec<i64> = (1001..=1200).collect();
    let mut funding = tokio::task::JoinSet::new();
    for &user in &users {
        let app_http = (app.http.clone(), app.url("/api/balance/charge"), app.token(user));
        funding.spawn(async move {
            let res = app_http
                .0
                .post(app_http.1)
                .bearer_auth(app_http.2)
                .json(&json!({"amount": 10_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        });
    }
    while funding.join_next().await.is_some() {}

    let mut placing = tokio::task::JoinSet::new();
    for &user in &users {
        let (http, url, token) = (app.http.clone(), app.url("/api/orders"), app.token(user));
        placing.spawn(async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", format!("race-{user}"))
                .json(&json!({"items": [{"productId": product, "quantity": 1}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202);
        });
    }
    while placing.join_next().await.is_some() {}
    app.wait_quiescent(Duration::from_secs(60)).await;

    let counts: Vec<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT status, reason, count(*) FROM orders GROUP BY 1, 2 ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        counts,
        [
            ("CANCELLED".to_owned(), Some("OUT_OF_STOCK".to_owned()), 150),
            ("CONFIRMED".to_owned(), None, 50)
        ]
    );
    assert_eq!(app.stock(product).await, 0);
    let (payments, paid, balances): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM balance_ledger WHERE kind = 'PAYMENT'),
                (SELECT coalesce(sum(amount), 0)::bigint FROM balance_ledger WHERE kind = 'PAYMENT'),
                (SELECT sum(balance)::bigint FROM balances)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((payments, paid, balances), (50, 100_000, 200 * 10_000 - 100_000));
    let events = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    let distinct: std::collections::HashSet<_> = events
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(distinct.len(), 50);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_orders_for_fifty_units_confirm_exactly_fifty() {
    contention(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_of_every_worker_give_the_same_exact_outcome() {
    contention(2).await;
}

#[tokio::test]
async fn every_message_delivered_twice_has_no_double_effect() {
    use orderflow_workers::WorkerKind::*;
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Stock, Coupon, Payment, Recovery],
        order_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let product = app.product("Twice", 4_000, 10).await;
    let coupon = app
        .coupon(json!({"name": "1000 off", "discountType": "FIXED", "discountValue": 1_000, "quantity": 5}))
        .await;
    for user in [51, 52] {
        app.post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
            .await;
        app.fund(user, 50_000).await;
    }
    // Order A goes through payment, times out and is compensated (refund, restore, release).
    let a = app.order(51, &[(product, 2)], Some(coupon)).await;
    app.wait_order_row(&a, WAIT, |o| {
        o.status.as_str() == "CANCELLING" && o.paid_amount == 0 && !o.stock_held
    })
    .await;
    app.spawn_workers(&[Order]).await;
    app.wait_terminal(51, &a, WAIT).await;
    // Order B is confirmed (every forward message, and the public event).
    let b = app.order(52, &[(product, 3)], Some(coupon)).await;
    assert_eq!(app.wait_terminal(52, &b, WAIT).await["status"], "CONFIRMED");
    app.wait_quiescent(WAIT).await;
    let first = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    assert_eq!(first.len(), 1);

    // Deliver every message of both orders once more, with their original ids.
    let republished = app.republish_outbox(&a).await + app.republish_outbox(&b).await;
    assert!(republished >= 12, "expected every step's message, got {republished}");
    // Wait until every copy was handled: each is acked as a duplicate (inbox hit), none applied.
    // (The two public events, order.confirmed and order.cancelled, have no consumer here.)
    app.wait_outcomes("duplicate", republished as u64 - 2).await;
    app.wait_quiescent(WAIT).await;

    let a_view = app.wait_terminal(51, &a, WAIT).await;
    let b_view = app.wait_terminal(52, &b, WAIT).await;
    assert_eq!(
        (a_view["status"].as_str(), a_view["reason"].as_str()),
        (Some("CANCELLED"), Some("TIMEOUT"))
    );
    assert_eq!(b_view["status"], "CONFIRMED");
    assert_eq!(history(&a_view).len(), 6);
    assert_eq!(history(&b_view).len(), 5);
    assert_eq!(app.stock(product).await, 7);
    assert_eq!(app.balance(51).await, 50_000);
    assert_eq!(app.balance(52).await, 50_000 - 11_000);
    assert_eq!(ledger(&app, 51).await.len(), 1 + 2, "charge, payment, refund");
    assert_eq!(ledger(&app, 52).await.len(), 1 + 1, "charge, payment");
    assert_eq!(coupon_status(&app, 51, coupon).await, "AVAILABLE");
    assert_eq!(coupon_status(&app, 52, coupon).await, "USED");
    // The data platform got the event twice with one id: once after dedup.
    let again = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["id"], first[0].1["id"]);
    // The popular-products projection counted order B once.
    let (_, popular) = app.get("/api/products/popular", &app.token(1)).await;
    assert_eq!(
        popular,
        json!([{"productId": product, "name": "Twice", "price": 4_000, "quantity": 3}])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_replay_refuse_reuse_and_serialise() {
    let app = TestApp::spawn_with(common::Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let product = app.product("Key", 1_000, 10).await;
    let token = app.token(61);
    let body = json!({"items": [{"productId": product, "quantity": 1}]});
    let send = |key: Option<&'static str>, body: serde_json::Value| {
        let (http, url, token) = (app.http.clone(), app.url("/api/orders"), token.clone());
        async move {
            let mut req = http.post(url).bearer_auth(token).json(&body);
            if let Some(k) = key {
                req = req.header("idempotency-key", k);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let location = res.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
            (status, location, res.json::<serde_json::Value>().await.unwrap())
        }
    };

    let (status, _, problem) = send(None, body.clone()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("IDEMPOTENCY_KEY_REQUIRED"))
    );

    let (s1, l1, first) = send(Some("k-1"), body.clone()).await;
    let (s2, l2, replay) = send(Some("k-1"), body.clone()).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first, replay);
    assert_eq!(l1, l2);
    assert_eq!(l1, Some(format!("/api/orders/{}", first["orderId"].as_str().unwrap())));

    let (s3, _, problem) = send(Some("k-1"), json!({"items": [{"productId": product, "quantity": 2}]})).await;
    assert_eq!((s3, problem["code"].as_str()), (422, Some("IDEMPOTENCY_KEY_REUSED")));

    // 20 at once with one fresh key: one order; every 202 names it; the rest are 409.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        set.spawn(send(Some("k-burst"), body.clone()));
    }
    let mut accepted = std::collections::HashSet::new();
    let (mut ok, mut in_use) = (0, 0);
    while let Some(res) = set.join_next().await {
        let (status, _, body) = res.unwrap();
        match status {
            202 => {
                ok += 1;
                accepted.insert(body["orderId"].as_str().unwrap().to_owned());
            }
            409 => {
                assert_eq!(body["code"], "IDEMPOTENCY_KEY_IN_USE");
                in_use += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok + in_use, 20);
    assert!(ok >= 1);
    assert_eq!(accepted.len(), 1);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = 61")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(orders, 2, "k-1 and k-burst: one order each");

    // Another user's order is 404; the same key for another user is independent.
    let other = app.token(62);
    let (status, problem) = app
        .get(&format!("/api/orders/{}", first["orderId"].as_str().unwrap()), &other)
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("ORDER_NOT_FOUND"))
    );
    app.stop().await;
}

#[tokio::test]
async fn orders_are_validated_before_anything_is_stored() {
    let app = TestApp::spawn_with(common::Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let product = app.product("Valid", 1_000, 10).await;
    let token = app.token(71);
    let cases = [
        (json!({"items": []}), 400, "INVALID_ORDER"),
        (
            json!({"items": [{"productId": product, "quantity": 0}]}),
            400,
            "INVALID_ORDER",
        ),
        (
            json!({"items": [{"productId": product, "quantity": 1001}]}),
            400,
            "INVALID_ORDER",
        ),
        // Valid by the schema, refused by the one rule it cannot state.
        (
            json!({"items": [{"productId": product, "quantity": 1}, {"productId": product, "quantity": 2}]}),
            422,
            "DUPLICATE_ORDER_LINE",
        ),
        (
            json!({"items": (0..51).map(|i| json!({"productId": i + 1, "quantity": 1})).collect::<Vec<_>>()}),
            400,
            "INVALID_ORDER",
        ),
        (
            json!({"items": [{"productId": 999_999, "quantity": 1}]}),
            404,
            "PRODUCT_NOT_FOUND",
        ),
        (
            json!({"items": [{"productId": "one", "quantity": 1}]}),
            400,
            "INVALID_BODY",
        ),
        (
            json!({"items": [{"productId": product, "quantity": 1e12}]}),
            400,
            "INVALID_BODY",
        ),
    ];
    for (i, (body, status, code)) in cases.into_iter().enumerate() {
        let key = format!("v-{i}");
        let res = app
            .request(
                reqwest::Method::POST,
                "/api/orders",
                Some(&token),
                Some(body),
                &[("idempotency-key", &key)],
            )
            .await;
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["code"], code, "case {i}");
    }
    let (status, problem) = app.get("/api/orders/not-a-uuid", &token).await;
    assert_eq!((status.as_u16(), problem["code"].as_str()), (400, Some("INVALID_PATH")));
    let stored: (i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox)")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, (0, 0));
    app.stop().await;
}

#[tokio::test]
async fn popular_products_rank_confirmed_units_of_the_last_72_hours() {
    let app = TestApp::spawn().await;
    let mut products = Vec::new();
    for (i, name) in ["A", "B", "C", "D", "E", "F"].iter().enumerate() {
        products.push(app.product(name, 1_000 * (i as i64 + 1), 1_000).await);
    }
    app.fund(81, 1_000_000).await;
    app.fund(82, 1_000).await; // too poor: its order is cancelled and must not count
    // Confirmed units: A 5, B 3, C 8, D 1, E 2, F 4 (spread over several orders).
    let plan: [(usize, i32); 8] = [(0, 3), (0, 2), (1, 3), (2, 8), (3, 1), (4, 2), (5, 1), (5, 3)];
    let mut ids = Vec::new();
    for (p, q) in plan {
        ids.push(app.order(81, &[(products[p], q)], None).await);
    }
    let cancelled = app.order(82, &[(products[3], 50)], None).await;
    for id in &ids {
        assert_eq!(app.wait_terminal(81, id, WAIT).await["status"], "CONFIRMED");
    }
    assert_eq!(
        app.wait_terminal(82, &cancelled, WAIT).await["reason"],
        "INSUFFICIENT_BALANCE"
    );
    // Units confirmed 73 hours ago are too old to count.
    sqlx::query(
        "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
         VALUES ($1, date_trunc('hour', now() - interval '73 hours'), 500)",
    )
    .bind(products[3])
    .execute(&app.pool)
    .await
    .unwrap();
    app.wait_quiescent(WAIT).await;
    // The projection is written with each confirmation: all 23 confirmed units are in.
    let total: Option<i64> = sqlx::query_scalar("SELECT sum(quantity)::bigint FROM product_sales_hourly")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(total, Some(23 + 500));

    let (status, top) = app.get("/api/products/popular", &app.token(81)).await;
    assert_eq!(status, 200);
    let ranking: Vec<(i64, i64)> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["productId"].as_i64().unwrap(), p["quantity"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        ranking,
        [
            (products[2], 8),
            (products[0], 5),
            (products[5], 4),
            (products[1], 3),
            (products[4], 2)
        ]
    );
    assert_eq!(top[0]["name"], "C");
    assert_eq!(top[0]["price"], 3_000);
    app.stop().await;
}
