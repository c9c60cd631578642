//! Per-user rate limits on the write routes (issue 12, item 9): exactly the quota passes,
//! the rest is a 429 problem with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit`
//! fields, nothing is stored for a refused request, other users and admin writes are not
//! affected, and 0 turns the limits off. Against the real API and PostgreSQL.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{sync::Arc, time::Duration};

use common::{Options, TestApp};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use tokio::{sync::Barrier, task::JoinSet};

/// The API alone, with `quota` writes per `window` for each user and route.
async fn app_with(quota: u32, window: Duration) -> TestApp {
    TestApp::spawn_with(Options {
        workers: vec![],
        rate_limit: (quota, window),
        ..Options::default()
    })
    .await
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn send(app: &TestApp, path: &str, token: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
    let res = app.request(Method::POST, path, Some(token), Some(body), headers).await;
    Answer {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.json().await.unwrap_or(Value::Null),
    }
}

async fn place(app: &TestApp, token: &str, product: i64) -> Answer {
    let key = uuid::Uuid::new_v4().to_string();
    send(
        app,
        "/api/orders",
        token,
        json!({"items": [{"productId": product, "quantity": 1}]}),
        &[("idempotency-key", &key)],
    )
    .await
}

async fn charge(app: &TestApp, token: &str) -> Answer {
    send(app, "/api/balance/charge", token, json!({"amount": 1_000}), &[]).await
}

/// Checks a refusal: 429 problem `RATE_LIMITED`, `Retry-After` within `1..=max_wait` s, and
/// the IETF fields naming `policy` with `r=0` and `t` equal to `Retry-After`.
fn assert_refused(answer: &Answer, policy: &str, quota: u32, window: u64, max_wait: u64) {
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some("application/problem+json"));
    assert_eq!(answer.body["code"], "RATE_LIMITED", "{}", answer.body);
    assert_eq!(answer.body["status"], 429);
    assert_eq!(answer.body["type"], "urn:orderflow:problem:rate-limited");
    let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=max_wait).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        answer.header("ratelimit-policy"),
        Some(format!("\"{policy}\";q={quota};w={window}").as_str())
    );
    assert_eq!(
        answer.header("ratelimit"),
        Some(format!("\"{policy}\";r=0;t={retry}").as_str())
    );
}

/// The `r` of an accepted answer's `RateLimit` field.
fn remaining(answer: &Answer, policy: &str) -> u32 {
    let field = answer.header("ratelimit").unwrap();
    let rest = field.strip_prefix(&format!("\"{policy}\";r=")).unwrap();
    rest.split(';').next().unwrap().parse().unwrap()
}

async fn count(app: &TestApp, sql: &'static str, user: i64) -> i64 {
    sqlx::query_scalar(sql).bind(user).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test]
async fn orders_past_the_quota_are_refused_with_the_fields_and_leave_nothing_behind() {
    let app = app_with(5, Duration::from_secs(60)).await;
    let product = app.product("Keyboard", 1_000, 1_000).await;
    let (alice, bob) = (app.token(101), app.token(102));

    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(place(&app, &alice, product).await);
    }
    let accepted: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::ACCEPTED).collect();
    assert_eq!(accepted.len(), 5);
    // The first five pass, counting down; the last three are refused.
    assert_eq!(
        accepted.iter().map(|a| remaining(a, "orders")).collect::<Vec<_>>(),
        [4, 3, 2, 1, 0]
    );
    for a in &accepted {
        assert_eq!(a.header("ratelimit-policy"), Some("\"orders\";q=5;w=60"));
    }
    for refused in &answers[5..] {
        // One request comes back every 60 s / 5 = 12 s.
        assert_refused(refused, "orders", 5, 60, 12);
    }

    // Nothing of the refused requests was stored: five orders, their history, two outbox
    // rows each, five idempotency keys.
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE user_id = $1", 101).await,
        5
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE order_ids && ARRAY(SELECT id FROM orders WHERE user_id = $1)",
            101
        )
        .await,
        10
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM idempotency_keys WHERE user_id = $1", 101).await,
        5
    );

    // Another user has a quota of their own.
    for _ in 0..5 {
        assert_eq!(place(&app, &bob, product).await.status, StatusCode::ACCEPTED);
    }
    assert_refused(&place(&app, &bob, product).await, "orders", 5, 60, 12);
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE user_id = $1", 102).await,
        5
    );
    app.stop().await;
}

#[tokio::test]
async fn each_write_route_has_its_own_quota_and_reads_and_admin_writes_have_none() {
    let app = app_with(3, Duration::from_secs(30)).await;
    let token = app.token(201);

    // Charges: exactly three pass.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let answer = charge(&app, &token).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_refused(&answer, "charges", 3, 30, 10);
        }
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(app.balance(201).await, 3_000);
    assert_eq!(
        count(&app, "SELECT count(*) FROM balance_ledger WHERE user_id = $1", 201).await,
        3
    );

    // Coupon issues: a quota of their own (the charges used none of it). Admin writes (five
    // coupons) are not limited.
    let mut coupons = Vec::new();
    for i in 0..5 {
        coupons.push(
            app.coupon(json!({"name": format!("c{i}"), "discountType": "FIXED", "discountValue": 100, "quantity": 10}))
                .await,
        );
    }
    let mut statuses = Vec::new();
    for coupon in &coupons {
        let answer = send(&app, &format!("/api/coupons/{coupon}/issue"), &token, json!({}), &[]).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_refused(&answer, "coupon-issues", 3, 30, 10);
        } else {
            assert_eq!(answer.header("ratelimit-policy"), Some("\"coupon-issues\";q=3;w=30"));
        }
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses, [201, 201, 201, 429, 429]);
    assert_eq!(
        count(&app, "SELECT count(*) FROM user_coupons WHERE user_id = $1", 201).await,
        3
    );
    let issued: i64 = sqlx::query_scalar("SELECT sum(issued)::bigint FROM coupons")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(issued, 3);

    // Orders: still a full quota of three.
    let product = app.product("Mouse", 1_000, 100).await;
    for _ in 0..3 {
        assert_eq!(place(&app, &token, product).await.status, StatusCode::ACCEPTED);
    }
    assert_refused(&place(&app, &token, product).await, "orders", 3, 30, 10);

    // Cancels: a quota of their own (the orders used none of it); a refused cancel is
    // answered before the order is even looked up.
    let missing = uuid::Uuid::now_v7();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let answer = send(&app, &format!("/api/orders/{missing}/cancel"), &token, json!({}), &[]).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_refused(&answer, "order-cancels", 3, 30, 10);
        } else {
            assert_eq!(answer.header("ratelimit-policy"), Some("\"order-cancels\";q=3;w=30"));
        }
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses, [404, 404, 404, 429, 429]);

    // Reads are never limited and carry no fields.
    for _ in 0..10 {
        let res = app.request(Method::GET, "/api/balance", Some(&token), None, &[]).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().get("ratelimit").is_none());
    }

    // Without a valid token the route answers 401, untouched by the limiter.
    let res = app
        .request(
            Method::POST,
            "/api/balance/charge",
            Some("not-a-token"),
            Some(json!({"amount": 1_000})),
            &[],
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().get("ratelimit").is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_burst_at_once_lets_exactly_the_quota_through() {
    let app = app_with(4, Duration::from_secs(60)).await;
    let token = app.token(301);
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let req = app
            .http
            .post(app.url("/api/balance/charge"))
            .bearer_auth(&token)
            .json(&json!({"amount": 1_000}));
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            req.send().await.unwrap().status()
        });
    }
    let statuses = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 4);
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count(),
        16
    );
    assert_eq!(app.balance(301).await, 4_000);
    app.stop().await;
}

#[tokio::test]
async fn a_refused_user_is_accepted_again_after_retry_after() {
    // Two per 2 s: one request comes back every second.
    let app = app_with(2, Duration::from_secs(2)).await;
    let token = app.token(401);
    assert_eq!(charge(&app, &token).await.status, StatusCode::OK);
    assert_eq!(charge(&app, &token).await.status, StatusCode::OK);
    let refused = charge(&app, &token).await;
    assert_refused(&refused, "charges", 2, 2, 1);
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let again = charge(&app, &token).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(remaining(&again, "charges"), 0);
    assert_eq!(app.balance(401).await, 3_000);
    app.stop().await;
}

/// RATE_LIMIT_WRITES and RATE_LIMIT_WINDOW as `orderflow` parses them with no flag given.
fn production_defaults() -> (u32, Duration) {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: orderflow_shared::config::Config,
    }
    let config = <Cli as clap::Parser>::try_parse_from(["orderflow"]).unwrap().config;
    (config.rate_limit_writes, config.rate_limit_window)
}

#[tokio::test]
async fn the_defaults_leave_a_coupon_rush_and_a_busy_shopper_alone() {
    let (quota, window) = production_defaults();
    assert_eq!((quota, window), (100, Duration::from_secs(10)));
    let app = app_with(quota, window).await;
    // A rush: 200 users, one request each, all at once.
    let coupon = app
        .coupon(json!({"name": "rush", "discountType": "PERCENT", "discountValue": 10, "quantity": 50}))
        .await;
    let tokens: Vec<String> = (1_000..1_200).map(|u| app.token(u)).collect();
    let barrier = Arc::new(Barrier::new(tokens.len()));
    let mut set = JoinSet::new();
    for token in tokens {
        let req = app
            .http
            .post(app.url(&format!("/api/coupons/{coupon}/issue")))
            .bearer_auth(token);
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            req.send().await.unwrap().status()
        });
    }
    let statuses = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CREATED).count(), 50);
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::GONE).count(), 150);

    // One shopper sending 60 orders as fast as one connection goes (far more than a person
    // does) is not limited by the defaults (100 per 10 s).
    let product = app.product("Pen", 1_000, 1_000).await;
    let token = app.token(2_000);
    for _ in 0..60 {
        let answer = place(&app, &token, product).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
        assert_eq!(answer.header("ratelimit-policy"), Some("\"orders\";q=100;w=10"));
    }
    app.stop().await;
}

#[tokio::test]
async fn zero_turns_the_limits_off() {
    let app = app_with(0, Duration::from_secs(10)).await;
    let token = app.token(501);
    for _ in 0..150 {
        let answer = charge(&app, &token).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert!(answer.header("ratelimit").is_none());
        assert!(answer.header("ratelimit-policy").is_none());
    }
    assert_eq!(app.balance(501).await, 150_000);
    app.stop().await;
}
