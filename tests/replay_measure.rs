//! Measures a replay of `order.confirmed` (issue 15, item 3): its rate in events per second
//! and what it does to the latency of live orders confirmed meanwhile. Not a pass/fail test
//! (it is `#[ignore]`d, so CI never runs it); run it on a quiet machine and read its table:
//!
//! ```sh
//! cargo nextest run --profile ci --test replay_measure --run-ignored only --no-capture
//! REPLAY_EVENTS=20000 LIVE_RATE=50 REPLAY_SETTINGS=100:100,20:20 cargo nextest run ...
//! # defaults: 5,000 events, 40 orders/s, settings (chunkSize:pauseMs) 100:100,20:20,1000:0
//! ```
//!
//! The whole system runs in the test process (API, relay, every worker), against the local
//! PostgreSQL and RabbitMQ, like every integration test. The replayed events are synthetic
//! (orders written as CONFIRMED with their kept event, a body of the real shape and size), so
//! that thousands of them cost seconds to set up; live orders go through the real pipeline
//! at a fixed rate. End-to-end latency is measured in the database (the CONFIRMED history
//! row's time minus the order's creation time), accept latency at the client.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed measurement

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinSet;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Live {
    accept_ms: Vec<f64>,
    ids: Vec<String>,
}

/// Places orders at `rate` per second until `until` resolves (checked before each order).
async fn live_load(app: Arc<TestApp>, product: i64, rate: u64, stop: tokio::sync::watch::Receiver<bool>) -> Live {
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut set = JoinSet::new();
    let mut n = 0u64;
    while !*stop.borrow() {
        ticker.tick().await;
        let app = app.clone();
        let user = 1 + (n % 50) as i64;
        n += 1;
        set.spawn(async move {
            let started = Instant::now();
            let id = app.order(user, &[(product, 1)], None).await;
            (started.elapsed().as_secs_f64() * 1_000.0, id)
        });
    }
    let mut live = Live {
        accept_ms: Vec::new(),
        ids: Vec::new(),
    };
    for (ms, id) in set.join_all().await {
        live.accept_ms.push(ms);
        live.ids.push(id);
    }
    live
}

/// End-to-end milliseconds (accepted to CONFIRMED) of `ids`, sorted.
async fn e2e_ms(app: &TestApp, ids: &[String]) -> Vec<f64> {
    app.wait_quiescent(Duration::from_secs(120)).await;
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM h.at - o.created_at) * 1000)::float8
         FROM orders o JOIN order_status_history h ON h.order_id = o.id AND h.to_status = 'CONFIRMED'
         WHERE o.id::text = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(ms.len(), ids.len(), "every live order confirmed");
    ms.sort_by(f64::total_cmp);
    ms
}

/// How long the live orders' messages waited for the relay (written to published), sorted.
async fn relay_ms(app: &TestApp, ids: &[String]) -> Vec<f64> {
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM sent_at - created_at) * 1000)::float8 FROM outbox
         WHERE order_ids && $1::text[]::uuid[] AND sent_at IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    ms.sort_by(f64::total_cmp);
    ms
}

fn line(phase: &str, rate: Option<f64>, live: &Live, e2e: &[f64], relay: &[f64]) -> String {
    let mut accept = live.accept_ms.clone();
    accept.sort_by(f64::total_cmp);
    format!(
        "| {phase} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {:.1} / {:.1} |",
        rate.map_or("-".to_owned(), |r| format!("{r:.0}")),
        live.ids.len(),
        percentile(&accept, 0.5),
        percentile(&accept, 0.99),
        percentile(e2e, 0.5),
        percentile(e2e, 0.95),
        percentile(e2e, 0.99),
        e2e.last().copied().unwrap_or(f64::NAN),
        percentile(relay, 0.5),
        percentile(relay, 0.99),
    )
}

/// Live orders alone for 8 s; prints their line.
async fn baseline(app: &Arc<TestApp>, product: i64, rate: u64) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(live_load(app.clone(), product, rate, stopped));
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.send(true).unwrap();
    let live = load.await.unwrap();
    let e2e = e2e_ms(app, &live.ids).await;
    let relay = relay_ms(app, &live.ids).await;
    println!("{}", line("no replay", None, &live, &e2e, &relay));
}

/// Runs a replay of `[from, to)` with `chunk`/`pause` under live load; returns (events/s,
/// live orders, their end-to-end latencies, their messages' waits for the relay).
async fn replay_under_load(
    app: &Arc<TestApp>,
    product: i64,
    rate: u64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    chunk: i64,
    pause: i64,
) -> (f64, Live, Vec<f64>, Vec<f64>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(live_load(app.clone(), product, rate, stopped));
    let body = json!({
        "from": from.to_rfc3339_opts(SecondsFormat::Micros, true),
        "to": to.to_rfc3339_opts(SecondsFormat::Micros, true),
        "chunkSize": chunk, "pauseMs": pause,
    });
    let (status, started) = app
        .call(
            Method::POST,
            "/api/admin/events/replay",
            Some(&app.admin_token()),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_i64().unwrap();
    let done: Value = loop {
        let (_, r) = app
            .get(&format!("/api/admin/events/replays/{id}"), &app.admin_token())
            .await;
        if r["state"] != "RUNNING" {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.send(true).unwrap();
    let live = load.await.unwrap();
    assert_eq!(done["state"], "DONE", "{done}");
    assert_eq!(done["published"], started["total"], "{done}");
    let took = done["finishedAt"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap()
        - done["startedAt"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
    let rate = done["published"].as_f64().unwrap() / (took.num_microseconds().unwrap() as f64 / 1e6);
    let e2e = e2e_ms(app, &live.ids).await;
    let relay = relay_ms(app, &live.ids).await;
    (rate, live, e2e, relay)
}

#[tokio::test]
#[ignore = "a measurement, not a check: run it by hand (see the module docs)"]
async fn replay_rate_and_live_order_latency() {
    let events = env_or("REPLAY_EVENTS", 5_000) as i64;
    let rate = env_or("LIVE_RATE", 40);
    let app = Arc::new(TestApp::spawn().await);
    let product = app.product("Live", 1_000, 10_000_000).await;
    for user in 1..=50 {
        app.fund(user, 1_000_000).await;
    }
    // The kept events of `events` confirmed orders, an hour ago, with bodies of the real shape.
    let to = Utc::now() - chrono::TimeDelta::minutes(30);
    let from = to - chrono::TimeDelta::hours(1);
    sqlx::query(
        "WITH o AS (
             INSERT INTO orders (id, user_id, status, total_amount, paid_amount, stock_held, deadline_at, created_at, updated_at)
             SELECT gen_random_uuid(), 900000 + n % 1000, 'CONFIRMED', 30000, 30000, true, $2, $2, $2
             FROM generate_series(1, $1) AS n
             RETURNING id, user_id
         )
         INSERT INTO confirmed_events (order_id, event_id, confirmed_at, headers, body)
         SELECT o.id, gen_random_uuid(), t.at, jsonb_build_object('traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'),
                convert_to(jsonb_build_object('id', gen_random_uuid(), 'type', 'order.confirmed',
                    'occurredAt', to_char(t.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), 'orderId', o.id,
                    'data', jsonb_build_object('userId', o.user_id, 'couponId', 7,
                        'items', jsonb_build_array(jsonb_build_object('productId', 1, 'quantity', 2, 'unitPrice', 15000)),
                        'totalAmount', 30000, 'discountAmount', 3000, 'paidAmount', 27000,
                        'confirmedAt', to_char(t.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')))::text, 'UTF8')
         FROM o, LATERAL (SELECT $2 + random() * ($3 - $2) AS at) t",
    )
    .bind(events)
    .bind(from)
    .bind(to)
    .execute(&app.pool)
    .await
    .unwrap();

    println!("replay of {events} events, live orders at {rate}/s (debug build unless run with --release)");
    println!(
        "| phase | replay events/s | live orders | accept p50 / p99 ms | end-to-end p50 / p95 / p99 / max ms | relay wait p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|");
    // Each replay between two baselines (live orders alone for 8 s): the machine is shared,
    // and only a replay compared with its neighbours says something.
    baseline(&app, product, rate).await;
    let settings = std::env::var("REPLAY_SETTINGS").unwrap_or_else(|_| "100:100,20:20,1000:0".to_owned());
    for setting in settings.split(',') {
        let (chunk, pause) = setting.split_once(':').unwrap();
        let (chunk, pause): (i64, i64) = (chunk.parse().unwrap(), pause.parse().unwrap());
        let (r, live, e2e, relay) = replay_under_load(&app, product, rate, from, to, chunk, pause).await;
        let phase = format!("replay chunk {chunk}, pause {pause} ms");
        println!("{}", line(&phase, Some(r), &live, &e2e, &relay));
        baseline(&app, product, rate).await;
    }
    Arc::into_inner(app).unwrap().stop().await;
}
