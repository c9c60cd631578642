//! Balance: query, charge rules, the 10,000,000 cap, the ledger, idempotent charges and
//! concurrent charges, against the real API and PostgreSQL.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::{sync::Barrier, task::JoinSet};

/// Sends a request and returns status, content type and the JSON body.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, String, reqwest::header::HeaderMap, Value) {
    let res = app.request(method, path, Some(token), body, headers).await;
    let status = res.status();
    let headers = res.headers().clone();
    let content_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, content_type, headers, body)
}

/// Asserts a problem document with the given status and code.
fn assert_problem(status: StatusCode, content_type: &str, body: &Value, want: StatusCode, code: &str) {
    common::assert_problem(&(status, content_type.to_owned(), body.clone()), want, code);
}

/// (balance row value or 0, number of ledger rows, sum of CHARGE rows) straight from the database.
async fn db_state(app: &TestApp, user: i64) -> (i64, i64, i64) {
    let balance: Option<i64> = sqlx::query_scalar("SELECT balance FROM balances WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
    let (rows, sum): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(amount), 0)::bigint FROM balance_ledger WHERE user_id = $1 AND kind = 'CHARGE'",
    )
    .bind(user)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    (balance.unwrap_or(0), rows, sum)
}

async fn charge(app: &TestApp, user: i64, amount: Value) -> (StatusCode, String, Value) {
    let (status, ct, _, body) = send(
        app,
        Method::POST,
        "/api/balance/charge",
        &app.token(user),
        Some(json!({ "amount": amount })),
        &[],
    )
    .await;
    (status, ct, body)
}

#[tokio::test]
async fn a_new_user_has_a_zero_balance_and_an_empty_history() {
    let app = TestApp::api_only().await;
    let (status, body) = app.get("/api/balance", &app.token(42)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"userId": 42, "balance": 0}));

    let (status, body) = app.get("/api/balance/history", &app.token(42)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"items": [], "page": 0, "size": 20, "total": 0}));
    // Reading creates nothing.
    assert_eq!(db_state(&app, 42).await, (0, 0, 0));
    app.stop().await;
}

#[tokio::test]
async fn a_charge_adds_to_the_balance_and_writes_one_ledger_row() {
    let app = TestApp::api_only().await;
    let (status, _, body) = charge(&app, 5, json!(1_000)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"userId": 5, "balance": 1_000}));
    let (status, _, body) = charge(&app, 5, json!(100_000)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"userId": 5, "balance": 101_000}));
    let (_, _, body) = charge(&app, 5, json!(12_340)).await;
    assert_eq!(body["balance"], 113_340);

    assert_eq!(app.balance(5).await, 113_340);
    assert_eq!(db_state(&app, 5).await, (113_340, 3, 113_340));
    // Another user is untouched.
    assert_eq!(app.balance(6).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_user_comes_from_the_token_never_from_the_body() {
    let app = TestApp::api_only().await;
    let (status, body) = app
        .post(
            "/api/balance/charge",
            &app.token(5),
            json!({"amount": 2_000, "userId": 99, "user_id": 99}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"userId": 5, "balance": 2_000}));
    assert_eq!(app.balance(99).await, 0);
    assert_eq!(db_state(&app, 99).await, (0, 0, 0));
    app.stop().await;
}

#[tokio::test]
async fn charge_rules_refuse_with_exact_codes_and_change_nothing() {
    let app = TestApp::api_only().await;
    app.fund(8, 50_000).await;
    let before = db_state(&app, 8).await;
    assert_eq!(before, (50_000, 1, 50_000));

    let cases: &[(i64, &str)] = &[
        (1_005, "INVALID_AMOUNT_UNIT"),
        (1_001, "INVALID_AMOUNT_UNIT"),
        (99_999, "INVALID_AMOUNT_UNIT"),
        (990, "AMOUNT_BELOW_MINIMUM"),
        (10, "AMOUNT_BELOW_MINIMUM"),
        (0, "AMOUNT_BELOW_MINIMUM"),
        (-1_000, "AMOUNT_BELOW_MINIMUM"),
        (-9_007_199_254_740_990, "AMOUNT_BELOW_MINIMUM"),
        // The first rule broken in the shop's order wins: unit, minimum, maximum.
        (123, "INVALID_AMOUNT_UNIT"),
        (999, "INVALID_AMOUNT_UNIT"),
        (-5, "INVALID_AMOUNT_UNIT"),
        (100_005, "INVALID_AMOUNT_UNIT"),
        (9_007_199_254_740_991, "INVALID_AMOUNT_UNIT"),
        // Integers beyond I-JSON's exact range (RFC 7493 §2.2) are not read at all.
        (i64::MIN, "INVALID_BODY"),
        (i64::MAX, "INVALID_BODY"),
        (9_007_199_254_740_992, "INVALID_BODY"),
        (100_010, "AMOUNT_ABOVE_MAXIMUM"),
        (1_000_000, "AMOUNT_ABOVE_MAXIMUM"),
        (9_007_199_254_740_990, "AMOUNT_ABOVE_MAXIMUM"),
        (9_223_372_036_854_775_800, "INVALID_BODY"),
    ];
    for (amount, code) in cases {
        let (status, ct, body) = charge(&app, 8, json!(amount)).await;
        assert_problem(status, &ct, &body, StatusCode::BAD_REQUEST, code);
    }
    assert_eq!(db_state(&app, 8).await, before);
    assert_eq!(app.balance(8).await, 50_000);
    let (_, history) = app.get("/api/balance/history", &app.token(8)).await;
    assert_eq!(history["total"], 1);

    // The boundaries themselves are allowed.
    let (status, _, body) = charge(&app, 8, json!(1_000)).await;
    assert_eq!((status, &body["balance"]), (StatusCode::OK, &json!(51_000)), "{body}");
    let (status, _, body) = charge(&app, 8, json!(100_000)).await;
    assert_eq!((status, &body["balance"]), (StatusCode::OK, &json!(151_000)), "{body}");
    assert_eq!(db_state(&app, 8).await, (151_000, 3, 151_000));
    app.stop().await;
}

#[tokio::test]
async fn the_balance_may_reach_exactly_ten_million_and_no_more() {
    let app = TestApp::api_only().await;
    app.fund(9, 9_900_000).await;
    let (status, _, body) = charge(&app, 9, json!(99_000)).await;
    assert_eq!(
        (status, &body["balance"]),
        (StatusCode::OK, &json!(9_999_000)),
        "{body}"
    );

    // 9,999,000 + 1,010 = 10,000,010: over the cap.
    let (status, ct, body) = charge(&app, 9, json!(1_010)).await;
    assert_problem(status, &ct, &body, StatusCode::CONFLICT, "BALANCE_LIMIT_EXCEEDED");
    assert_eq!(db_state(&app, 9).await, (9_999_000, 100, 9_999_000));

    // Exactly 10,000,000 is allowed.
    let (status, _, body) = charge(&app, 9, json!(1_000)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"userId": 9, "balance": 10_000_000}));

    // Full: even the smallest charge is refused, and nothing changes.
    let (status, ct, body) = charge(&app, 9, json!(1_000)).await;
    assert_problem(status, &ct, &body, StatusCode::CONFLICT, "BALANCE_LIMIT_EXCEEDED");
    assert_eq!(app.balance(9).await, 10_000_000);
    assert_eq!(db_state(&app, 9).await, (10_000_000, 101, 10_000_000));
    let (_, history) = app.get("/api/balance/history?size=1", &app.token(9)).await;
    assert_eq!(history["total"], 101);
    assert_eq!(history["items"][0]["balanceAfter"], 10_000_000);
    assert_eq!(history["items"][0]["amount"], 1_000);
    app.stop().await;
}

#[tokio::test]
async fn history_is_newest_first_and_paginated() {
    let app = TestApp::api_only().await;
    let token = app.token(11);
    for amount in [1_000, 2_000, 3_000, 4_000, 5_000] {
        let (status, body) = app
            .post("/api/balance/charge", &token, json!({ "amount": amount }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Someone else's charge never shows up.
    app.fund(12, 7_000).await;

    let amounts = |body: &Value| -> Vec<i64> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["amount"].as_i64().unwrap())
            .collect()
    };
    let (status, body) = app.get("/api/balance/history?page=0&size=2", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(amounts(&body), [5_000, 4_000]);
    assert_eq!(
        (body["page"].as_i64(), body["size"].as_i64(), body["total"].as_i64()),
        (Some(0), Some(2), Some(5))
    );
    let first = &body["items"][0];
    assert_eq!(first["kind"], "CHARGE");
    assert_eq!(first["balanceAfter"], 15_000);
    assert_eq!(first["orderId"], Value::Null);
    assert!(first["id"].is_i64());
    assert!(
        first["createdAt"]
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        "{first}"
    );

    let (_, body) = app.get("/api/balance/history?page=1&size=2", &token).await;
    assert_eq!(amounts(&body), [3_000, 2_000]);
    assert_eq!(body["page"], 1);
    let (_, body) = app.get("/api/balance/history?page=2&size=2", &token).await;
    assert_eq!(amounts(&body), [1_000]);
    assert_eq!(body["items"][0]["balanceAfter"], 1_000);
    let (status, body) = app.get("/api/balance/history?page=3&size=2", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(amounts(&body), Vec::<i64>::new());
    assert_eq!(body["total"], 5);

    // Defaults, and the running balance across the whole ledger.
    let (_, body) = app.get("/api/balance/history", &token).await;
    assert_eq!(amounts(&body), [5_000, 4_000, 3_000, 2_000, 1_000]);
    let after: Vec<i64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["balanceAfter"].as_i64().unwrap())
        .collect();
    assert_eq!(after, [15_000, 10_000, 6_000, 3_000, 1_000]);
    assert_eq!((body["page"].as_i64(), body["size"].as_i64()), (Some(0), Some(20)));

    // Size is 1..=100 and page 0..=1,000,000: outside, a 400 problem (never clamped);
    // malformed values too.
    for (query, code) in [
        ("size=0", "INVALID_PAGE_SIZE"),
        ("size=101", "INVALID_PAGE_SIZE"),
        ("size=1000", "INVALID_PAGE_SIZE"),
        ("size=2147483648", "INVALID_PAGE_SIZE"),
        ("page=1000001", "INVALID_PAGE"),
        ("page=4294967295&size=100", "INVALID_PAGE"),
    ] {
        let (status, ct, _, body) = send(
            &app,
            Method::GET,
            &format!("/api/balance/history?{query}"),
            &token,
            None,
            &[],
        )
        .await;
        assert_problem(status, &ct, &body, StatusCode::BAD_REQUEST, code);
    }
    for query in ["page=-1", "size=abc", "page=1.5", "page=99999999999999999999"] {
        let (status, ct, _, body) = send(
            &app,
            Method::GET,
            &format!("/api/balance/history?{query}"),
            &token,
            None,
            &[],
        )
        .await;
        assert_problem(status, &ct, &body, StatusCode::BAD_REQUEST, "INVALID_QUERY");
    }
    // The farthest page is simply empty.
    let (status, body) = app.get("/api/balance/history?page=1000000&size=100", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn an_idempotent_charge_applies_once_and_replays_the_first_response() {
    let app = TestApp::api_only().await;
    let token = app.token(21);
    let key = [("Idempotency-Key", "charge-7f3a")];
    let (status, _, headers, first) = send(
        &app,
        Method::POST,
        "/api/balance/charge",
        &token,
        Some(json!({"amount": 5_000})),
        &key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first, json!({"userId": 21, "balance": 5_000}));
    assert!(headers.get("idempotent-replayed").is_none());

    // A charge without a key in between moves the balance on; the replay still shows the
    // first response, not the current balance.
    app.fund(21, 1_000).await;
    for _ in 0..3 {
        let (status, ct, headers, replay) = send(
            &app,
            Method::POST,
            "/api/balance/charge",
            &token,
            Some(json!({"amount": 5_000})),
            &key,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{replay}");
        assert_eq!(ct, "application/json");
        assert_eq!(replay, first);
        assert_eq!(
            headers.get("idempotent-replayed").and_then(|v| v.to_str().ok()),
            Some("true")
        );
    }
    assert_eq!(app.balance(21).await, 6_000);
    assert_eq!(db_state(&app, 21).await, (6_000, 2, 6_000));

    // Same key, different request: 422 and nothing applied.
    let (status, ct, _, body) = send(
        &app,
        Method::POST,
        "/api/balance/charge",
        &token,
        Some(json!({"amount": 6_000})),
        &key,
    )
    .await;
    assert_problem(
        status,
        &ct,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "IDEMPOTENCY_KEY_REUSED",
    );
    assert_eq!(db_state(&app, 21).await, (6_000, 2, 6_000));

    // Keys are per user: another user's identical key is a new charge.
    let (status, _, headers, other) = send(
        &app,
        Method::POST,
        "/api/balance/charge",
        &app.token(22),
        Some(json!({"amount": 5_000})),
        &key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{other}");
    assert_eq!(other, json!({"userId": 22, "balance": 5_000}));
    assert!(headers.get("idempotent-replayed").is_none());

    // A refused charge stores nothing under its key: once the reason is gone, a retry applies.
    app.fund(23, 9_950_000).await;
    let key = [("Idempotency-Key", "near-the-cap")];
    let token = app.token(23);
    let (status, ct, _, body) = send(
        &app,
        Method::POST,
        "/api/balance/charge",
        &token,
        Some(json!({"amount": 60_000})),
        &key,
    )
    .await;
    assert_problem(status, &ct, &body, StatusCode::CONFLICT, "BALANCE_LIMIT_EXCEEDED");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE user_id = 23")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(db_state(&app, 23).await, (9_950_000, 100, 9_950_000));

    // Malformed keys are refused before anything happens.
    let long = "k".repeat(256);
    for bad in [long.as_str(), "", "has space", "caf\u{e9}"] {
        let res = app
            .http
            .post(app.url("/api/balance/charge"))
            .bearer_auth(app.token(24))
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .json(&json!({"amount": 1_000}))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let ct = res.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = res.json().await.unwrap();
        assert_problem(status, &ct, &body, StatusCode::BAD_REQUEST, "INVALID_IDEMPOTENCY_KEY");
    }
    assert_eq!(db_state(&app, 24).await, (0, 0, 0));
    // 255 characters is fine.
    let key255 = "k".repeat(255);
    let (status, _, _, body) = send(
        &app,
        Method::POST,
        "/api/balance/charge",
        &app.token(24),
        Some(json!({"amount": 1_000})),
        &[("Idempotency-Key", key255.as_str())],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_retries_with_one_key_apply_once() {
    let app = TestApp::api_only().await;
    let token = app.token(31);
    let barrier = Arc::new(Barrier::new(20));
    let mut set = JoinSet::new();
    for _ in 0..20 {
        let req = app
            .http
            .post(app.url("/api/balance/charge"))
            .bearer_auth(&token)
            .header("Idempotency-Key", "one-key")
            .json(&json!({"amount": 3_000}));
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let res = req.send().await.unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        });
    }
    let results = set.join_all().await;
    for (status, body) in &results {
        match *status {
            StatusCode::OK => assert_eq!(*body, json!({"userId": 31, "balance": 3_000})),
            StatusCode::CONFLICT => assert_eq!(body["code"], "IDEMPOTENCY_KEY_IN_USE", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(results.iter().any(|(s, _)| *s == StatusCode::OK));
    assert_eq!(db_state(&app, 31).await, (3_000, 1, 3_000));
    app.stop().await;
}

/// Fires `n` charges of `amount` for `user` all at once; returns the statuses and bodies.
async fn charge_burst(app: &TestApp, user: i64, n: usize, amount: i64) -> Vec<(StatusCode, Value)> {
    let token = app.token(user);
    let barrier = Arc::new(Barrier::new(n));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let req = app
            .http
            .post(app.url("/api/balance/charge"))
            .bearer_auth(&token)
            .json(&json!({ "amount": amount }));
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let res = req.send().await.unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        });
    }
    set.join_all().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hundred_simultaneous_charges_add_up_exactly() {
    let app = TestApp::api_only().await;
    let results = charge_burst(&app, 41, 100, 1_000).await;
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(
        ok,
        100,
        "{:?}",
        results.iter().filter(|(s, _)| *s != StatusCode::OK).collect::<Vec<_>>()
    );

    assert_eq!(app.balance(41).await, 100_000);
    assert_eq!(db_state(&app, 41).await, (100_000, 100, 100_000));
    // Every charge saw its own balance: the responses and the ledger are 1,000..=100,000, each once.
    let mut seen: Vec<i64> = results.iter().map(|(_, b)| b["balance"].as_i64().unwrap()).collect();
    seen.sort_unstable();
    let expected: Vec<i64> = (1..=100).map(|i| i * 1_000).collect();
    assert_eq!(seen, expected);
    let after: Vec<i64> = sqlx::query_scalar("SELECT balance_after FROM balance_ledger WHERE user_id = 41 ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(after, expected);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_charges_near_the_cap_stop_exactly_at_it() {
    let app = TestApp::api_only().await;
    app.fund(42, 9_950_000).await;
    let results = charge_burst(&app, 42, 100, 1_000).await;
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = results
        .iter()
        .filter(|(s, b)| *s == StatusCode::CONFLICT && b["code"] == "BALANCE_LIMIT_EXCEEDED")
        .count();
    assert_eq!((ok, refused), (50, 50));
    assert_eq!(app.balance(42).await, 10_000_000);
    assert_eq!(db_state(&app, 42).await, (10_000_000, 150, 10_000_000));
    app.stop().await;
}
