//! The ops dashboard's trends (`GET /api/admin/trends`): the API samples the pipeline every
//! TREND_SAMPLE_INTERVAL (1 s in tests) and keeps the last hour; the samples' sums are the
//! orders placed, exactly, against the real PostgreSQL and RabbitMQ.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn sum(samples: &[Value], path: &[&str]) -> i64 {
    samples
        .iter()
        .map(|s| path.iter().fold(s, |v, k| &v[*k]).as_i64().unwrap_or(0))
        .sum()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// GETs `{base}/api/admin/trends` until its newest sample ends after `after`.
async fn trends_after(app: &TestApp, base: &str, after: DateTime<Utc>) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = app
            .http
            .get(format!("{base}/api/admin/trends"))
            .bearer_auth(app.admin_token())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        if body["samples"]
            .as_array()
            .unwrap()
            .last()
            .is_some_and(|s| time(&s["end"]) > after)
        {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sample past {after}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shape every answer keeps: oldest first, windows back to back, within the hour.
fn assert_bounded(body: &Value) {
    assert_eq!(body["intervalMs"], 1000);
    assert_eq!(body["windowSeconds"], 3600);
    assert_eq!(body["maxSamples"], 3600);
    let samples = body["samples"].as_array().unwrap();
    assert!(samples.len() <= 3600);
    let newest = time(&samples.last().unwrap()["end"]);
    for pair in samples.windows(2) {
        assert_eq!(pair[0]["end"], pair[1]["start"], "windows back to back");
    }
    for s in samples {
        assert!(time(&s["start"]) <= time(&s["end"]), "{s}");
        assert!(newest - time(&s["end"]) < chrono::Duration::hours(1), "{s}");
        for key in ["e2e"] {
            if !s[key].is_null() {
                assert!(
                    s[key]["p50Ms"].as_i64().unwrap() <= s[key]["p99Ms"].as_i64().unwrap(),
                    "{s}"
                );
            }
        }
    }
}

#[tokio::test]
async fn trends_count_every_order_once_with_latencies_and_queue_depths() {
    let app = TestApp::spawn().await;

    // Admins only.
    let (status, _) = app.call(Method::GET, "/api/admin/trends", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, problem) = app
        .call(Method::GET, "/api/admin/trends", Some(&app.token(7)), None)
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("ADMIN_REQUIRED"))
    );

    // 5 orders that confirm, 3 that are cancelled for INSUFFICIENT_BALANCE.
    let product = app.product("Trend lamp", 1_000, 100).await;
    app.fund(1, 10_000).await;
    app.fund(2, 1_000).await;
    let mut placed = Vec::new();
    for _ in 0..5 {
        placed.push((1, app.order(1, &[(product, 1)], None).await));
    }
    for _ in 0..3 {
        placed.push((2, app.order(2, &[(product, 2)], None).await));
    }
    for (user, id) in &placed {
        app.wait_terminal(*user, id, WAIT).await;
    }
    app.wait_quiescent(WAIT).await;
    let settled: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    let body = trends_after(&app, &app.base, settled).await;
    assert_bounded(&body);
    let samples = body["samples"].as_array().unwrap();
    assert!(
        samples.iter().all(|s| s["backfilled"] == false),
        "a fresh database has no hour to backfill"
    );
    assert_eq!(
        (
            sum(samples, &["accepted"]),
            sum(samples, &["confirmed"]),
            sum(samples, &["cancelled"]),
            sum(samples, &["deadLetters"])
        ),
        (8, 5, 3, 0),
        "{body}"
    );
    // Every order reserved stock; the 5 that could pay were paid and confirmed; no coupons.
    assert_eq!(sum(samples, &["steps", "stockReserved", "count"]), 8);
    assert_eq!(sum(samples, &["steps", "couponApplied", "count"]), 0);
    assert_eq!(sum(samples, &["steps", "paid", "count"]), 5);
    assert_eq!(sum(samples, &["steps", "confirmed", "count"]), 5);
    assert_eq!(sum(samples, &["e2e", "count"]), 5);
    for s in samples.iter().filter(|s| !s["e2e"].is_null()) {
        let (p50, p99) = (s["e2e"]["p50Ms"].as_i64().unwrap(), s["e2e"]["p99Ms"].as_i64().unwrap());
        assert!(0 < p50 && p50 <= p99 && p99 < 30_000, "{s}");
        for step in ["stockReserved", "paid", "confirmed"] {
            let step = &s["steps"][step];
            if !step.is_null() {
                assert!(
                    step["p50Ms"].as_i64().unwrap() <= step["p99Ms"].as_i64().unwrap(),
                    "{s}"
                );
            }
        }
    }
    // Rates are the counts over each window's length.
    for s in samples {
        let seconds = (time(&s["end"]) - time(&s["start"])).num_microseconds().unwrap() as f64 / 1e6;
        if seconds > 0.0 {
            let rate = s["acceptedPerSecond"].as_f64().unwrap();
            assert!((rate * seconds - s["accepted"].as_f64().unwrap()).abs() < 1e-6, "{s}");
        }
    }
    // Queue depths from the broker: every queue of the topology, summed.
    let newest = samples.last().unwrap();
    let queues = newest["queues"].as_object().unwrap();
    assert!(
        queues.contains_key("orderflow.stock") && queues.contains_key("orderflow.deadline"),
        "{newest}"
    );
    let total: i64 = queues.values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(newest["queueDepth"].as_i64(), Some(total));

    // History outside the hour is never counted; inside it, an API that starts later finds it
    // (backfill): one order accepted two hours ago, one half an hour ago.
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, total_amount, deadline_at, created_at, updated_at)
         SELECT id, 1, 'PENDING', 1000, now() + interval '1 day', now() - ago, now() - ago
         FROM (VALUES (gen_random_uuid(), interval '2 hours'), (gen_random_uuid(), interval '30 minutes')) v(id, ago);
         ",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO order_status_history (order_id, to_status, at)
         SELECT id, 'PENDING', created_at FROM orders WHERE created_at < now() - interval '10 minutes'",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    // A second API on the same database, with a broker it cannot reach: its samples have no
    // queue depths, and its first ones are the hour rebuilt from history.
    let mut config = app.config.clone();
    config.amqp_url = "amqp://guest:secret@127.0.0.1:1/%2f".to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(orderflow_api::serve(
        listener,
        orderflow_api::AppState::new(app.pool.clone(), Arc::new(config)),
        shutdown.clone(),
    ));
    let started: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let body = trends_after(&app, &base, started + chrono::Duration::seconds(2)).await;
    assert_bounded(&body);
    let samples = body["samples"].as_array().unwrap();
    let backfilled: Vec<Value> = samples.iter().filter(|s| s["backfilled"] == true).cloned().collect();
    assert!(!backfilled.is_empty(), "{body}");
    assert!(
        backfilled
            .iter()
            .all(|s| s["queues"].is_null() && s["queueDepth"].is_null())
    );
    let first = time(&backfilled[0]["start"]);
    assert!(
        (Utc::now() - first) > chrono::Duration::minutes(29) && (Utc::now() - first) < chrono::Duration::minutes(31),
        "the backfill starts at the first status change of the hour: {first}"
    );
    assert_eq!(
        (
            sum(samples, &["accepted"]),
            sum(samples, &["confirmed"]),
            sum(samples, &["cancelled"])
        ),
        (9, 5, 3),
        "the half-hour-old order counts, the two-hour-old one does not"
    );
    assert_eq!(sum(samples, &["e2e", "count"]), 5);
    let live = samples.iter().filter(|s| s["backfilled"] == false);
    assert!(live.clone().count() >= 1);
    assert!(
        live.clone().all(|s| s["queues"].is_null()),
        "the broker cannot be asked"
    );

    shutdown.cancel();
    let _ = server.await;

    // The first API's live windows never counted the back-dated rows.
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let body = trends_after(&app, &app.base, now).await;
    assert_eq!(sum(body["samples"].as_array().unwrap(), &["accepted"]), 8);
    app.stop().await;
}
