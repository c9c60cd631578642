//! Replaying `order.confirmed` (issue 15, item 3): a consumer that missed a window of events
//! gets exactly the missing ones again, with their original ids and bytes, while new orders
//! keep confirming; progress, cancel, validation, resumption, and the command line. Against
//! the real API, workers, PostgreSQL and RabbitMQ.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use common::{TestApp, assert_problem, send};
use orderflow::{
    audit::{self, AuditArgs},
    events::{self, ReplayArgs},
};
use orderflow_shared::db::replay::{REPLAY_HEADER, ReplayState};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A message as the consumer received it.
#[derive(Debug, Clone)]
struct Received {
    message_id: String,
    /// The replay that sent it again, if it is a replay.
    replay: Option<String>,
    body: Vec<u8>,
    json: Value,
}

impl Received {
    /// The order a CloudEvent is about: its `subject`.
    fn order_id(&self) -> String {
        self.json["subject"].as_str().unwrap().to_owned()
    }

    fn event_id(&self) -> String {
        self.json["id"].as_str().unwrap().to_owned()
    }
}

/// Takes every message now in `queue`, with its exact bytes.
async fn drain_raw(app: &TestApp, queue: &str) -> Vec<Received> {
    let (conn, channel) = app.amqp().await;
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let props = &msg.delivery.properties;
        let replay = props.headers().as_ref().and_then(|h| {
            h.inner().get(REPLAY_HEADER).map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
        });
        out.push(Received {
            message_id: props.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            replay,
            json: serde_json::from_slice(&msg.delivery.data).unwrap(),
            body: msg.delivery.data.clone(),
        });
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Places `n` orders of one unit each for users `first_user..`, in parallel; returns their ids.
async fn place(app: &Arc<TestApp>, product: i64, first_user: i64, n: i64) -> Vec<String> {
    let mut set = JoinSet::new();
    for user in first_user..first_user + n {
        let app = app.clone();
        set.spawn(async move { app.order(user, &[(product, 1)], None).await });
    }
    set.join_all().await
}

async fn wait_confirmed(app: &TestApp, ids: &[String]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE id::text = ANY($1) AND status = 'CONFIRMED'")
                .bind(ids)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if n == ids.len() as i64 {
            return;
        }
        assert!(Instant::now() < deadline, "only {n} of {} confirmed", ids.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_replay(app: &TestApp, body: Value) -> (StatusCode, Option<String>, Value) {
    let res = app
        .request(
            Method::POST,
            "/api/admin/events/replay",
            Some(&app.admin_token()),
            Some(body),
            &[],
        )
        .await;
    let status = res.status();
    let location = res.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
    (status, location, res.json().await.unwrap())
}

/// Polls the replay until `pred` holds; returns it.
async fn wait_replay(app: &TestApp, id: i64, mut pred: impl FnMut(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, replay) = app
            .get(&format!("/api/admin/events/replays/{id}"), &app.admin_token())
            .await;
        assert_eq!(status, StatusCode::OK, "{replay}");
        if pred(&replay) {
            return replay;
        }
        assert!(Instant::now() < deadline, "replay never got there: {replay}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Event ids by order id, as the confirming transactions wrote them.
async fn original_events(app: &TestApp) -> BTreeMap<String, (String, Vec<u8>)> {
    let rows: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT order_id::text, event_id::text, body FROM confirmed_events")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(o, e, b)| (o, (e, b))).collect()
}

#[tokio::test]
async fn a_consumer_that_missed_a_window_gets_exactly_the_missing_events_while_orders_keep_confirming() {
    let app = Arc::new(TestApp::spawn().await);
    app.capture("consumer", "orderflow.events", "order.confirmed").await;
    let product = app.product("Mug", 1_000, 10_000).await;
    for user in 1..=120 {
        app.fund(user, 10_000).await;
    }

    // Before the window, in it, after it.
    let before = place(&app, product, 1, 10).await;
    wait_confirmed(&app, &before).await;
    let from = Utc::now();
    let missed = place(&app, product, 11, 25).await;
    wait_confirmed(&app, &missed).await;
    let to = Utc::now();
    let after = place(&app, product, 36, 10).await;
    wait_confirmed(&app, &after).await;
    app.wait_quiescent(WAIT).await;

    // The consumer received all 45 but lost those confirmed in [from, to).
    let first = drain_raw(&app, "consumer").await;
    assert_eq!(first.len(), 45);
    let (lost, kept): (Vec<Received>, Vec<Received>) = first.into_iter().partition(|m| {
        let at: DateTime<Utc> = m.json["data"]["confirmedAt"].as_str().unwrap().parse().unwrap();
        at >= from && at < to
    });
    let lost_orders: BTreeSet<String> = lost.iter().map(Received::order_id).collect();
    assert_eq!(lost_orders, missed.iter().cloned().collect::<BTreeSet<_>>());

    // The replay, with small chunks, while new orders keep coming.
    let (status, location, started) = start_replay(
        &app,
        json!({"from": rfc3339(from), "to": rfc3339(to), "chunkSize": 7, "pauseMs": 30}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_i64().unwrap();
    assert_eq!(location, Some(format!("/api/admin/events/replays/{id}")));
    assert_eq!(started["state"], "RUNNING");
    assert_eq!(started["total"], 25);
    assert_eq!(started["chunkSize"], 7);
    assert_eq!(started["pauseMs"], 30);
    assert_eq!(started["requestedBy"], "admin:1000000");
    assert!(started["finishedAt"].is_null());
    let live = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for user in 46..66 {
                ids.push(app.order(user, &[(product, 1)], None).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    let mut progress = Vec::new();
    let done = wait_replay(&app, id, |r| {
        progress.push(r["published"].as_i64().unwrap());
        r["state"] != "RUNNING"
    })
    .await;
    let live = live.await.unwrap();
    wait_confirmed(&app, &live).await;
    app.wait_quiescent(WAIT).await;
    assert_eq!(done["state"], "DONE", "{done}");
    assert_eq!(
        (
            done["total"].as_i64(),
            done["enqueued"].as_i64(),
            done["published"].as_i64(),
            done["parked"].as_i64()
        ),
        (Some(25), Some(25), Some(25), Some(0)),
        "{done}"
    );
    assert!(
        done["finishedAt"].is_string() && done["startedAt"].is_string(),
        "{done}"
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "published only grows: {progress:?}"
    );
    // The window as kept: its bounds rounded up to the millisecond (the same events).
    assert_eq!(
        done["from"].as_str().unwrap(),
        orderflow_shared::messaging::envelope::millis::ceil(from).to_rfc3339_opts(SecondsFormat::Millis, true)
    );

    // What the consumer got now: the 25 it missed, as they were first sent (same message id,
    // same bytes), marked as this replay, and the live orders' events, not replays.
    let second = drain_raw(&app, "consumer").await;
    let originals = original_events(&app).await;
    let (replayed, live_events): (Vec<Received>, Vec<Received>) = second.into_iter().partition(|m| m.replay.is_some());
    assert_eq!(replayed.len(), 25, "each missing event once");
    for m in &replayed {
        assert_eq!(m.replay.as_deref(), Some(id.to_string().as_str()));
        let (event_id, body) = &originals[&m.order_id()];
        assert_eq!(&m.event_id(), event_id);
        assert_eq!(&m.message_id, event_id);
        assert_eq!(&m.body, body, "the replayed body is the original, byte for byte");
        let lost = lost.iter().find(|l| l.order_id() == m.order_id()).unwrap();
        assert_eq!(m.body, lost.body, "and what the consumer would have received");
    }
    assert_eq!(
        replayed.iter().map(Received::order_id).collect::<BTreeSet<_>>(),
        lost_orders
    );
    assert_eq!(
        live_events.iter().map(Received::order_id).collect::<BTreeSet<_>>(),
        live.iter().cloned().collect::<BTreeSet<_>>()
    );

    // After dedup by event id the consumer holds exactly one event per confirmed order, each
    // with the id its confirmation fixed.
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    for m in kept.iter().chain(&replayed).chain(&live_events) {
        if let Some(order) = by_id.insert(m.event_id(), m.order_id()) {
            assert_eq!(order, m.order_id());
        }
    }
    assert_eq!(by_id.len(), 65);
    for (event, order) in &by_id {
        assert_eq!(&originals[order].0, event);
    }
    let confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(confirmed, 65);

    // The listing shows it; the audit is clean (the data platform's queue holds the replayed
    // events twice, with the same ids: duplicates, not violations).
    let (status, page) = app.get("/api/admin/events/replays", &app.admin_token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], id);
    let report = audit::audit(&app.pool, Some(&app.config.amqp_url), &AuditArgs::default())
        .await
        .unwrap();
    assert!(report.clean, "{:#}", report.to_json());
    assert_eq!(report.check("events").unwrap().info["duplicateDeliveries"], 25);
    // Every event on the data platform's queue, the replayed ones too, is a CloudEvent as the
    // SDKs' RabbitMQ binding reads it.
    let platform = drain_captured(&app, "data-platform.orders").await;
    assert_eq!(platform.len(), 65 + 25);
    common::assert_cloudevents("replay", &platform);
    Arc::into_inner(app).unwrap().stop().await;
}

/// Every message in `queue`, as `common::captured_json` writes them (properties and all).
async fn drain_captured(app: &TestApp, queue: &str) -> Vec<Value> {
    let (conn, channel) = app.amqp().await;
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(common::captured_json(
            queue,
            &msg.delivery.properties,
            &msg.delivery.data,
        ));
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Events an earlier release recorded as its envelope (`{"id", "type", "occurredAt",
/// "orderId", "data"}`) are replayed as the CloudEvents they stand for: the same id, `time` its
/// `occurredAt`, `subject` its `orderId`, the same data.
#[tokio::test]
async fn an_event_an_earlier_release_recorded_is_replayed_as_the_cloudevent_it_stands_for() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.product("Kept", 100, 100).await;
    app.fund(1, 1_000).await;
    let from = Utc::now();
    let ids = place(&app, product, 1, 1).await;
    wait_confirmed(&app, &ids).await;
    app.wait_quiescent(WAIT).await;
    drain_raw(&app, "data-platform.orders").await;
    // As the earlier release kept it.
    let (event_id, body): (String, Vec<u8>) =
        sqlx::query_as("SELECT event_id::text, body FROM confirmed_events WHERE order_id = $1::uuid")
            .bind(&ids[0])
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let event: Value = serde_json::from_slice(&body).unwrap();
    let legacy = json!({
        "id": event["id"], "type": "order.confirmed", "occurredAt": event["time"],
        "orderId": event["subject"], "data": event["data"],
    });
    sqlx::query("UPDATE confirmed_events SET body = $2 WHERE order_id = $1::uuid")
        .bind(&ids[0])
        .bind(serde_json::to_vec(&legacy).unwrap())
        .execute(&app.pool)
        .await
        .unwrap();

    let (status, _, replay) = start_replay(&app, json!({"from": rfc3339(from), "to": rfc3339(Utc::now())})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replay}");
    wait_replay(&app, replay["id"].as_i64().unwrap(), |r| {
        r["state"] == "DONE" && r["published"] == 1
    })
    .await;
    let replayed = drain_captured(&app, "data-platform.orders").await;
    assert_eq!(replayed.len(), 1);
    common::assert_cloudevents("replay-legacy", &replayed);
    let again: Value = serde_json::from_str(replayed[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(again["id"], event_id.as_str());
    assert_eq!(
        (&again["time"], &again["subject"], &again["data"]),
        (&event["time"], &event["subject"], &event["data"])
    );
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn a_replay_shows_its_progress_stops_when_cancelled_and_refuses_bad_requests() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.product("Pen", 500, 1_000).await;
    for user in 1..=12 {
        app.fund(user, 1_000).await;
    }
    let from = Utc::now();
    let ids = place(&app, product, 1, 12).await;
    wait_confirmed(&app, &ids).await;
    app.wait_quiescent(WAIT).await;

    // One event per chunk and a long pause: cancelled during the first pause.
    let (status, _, started) = start_replay(
        &app,
        json!({"from": rfc3339(from), "to": rfc3339(Utc::now()), "chunkSize": 1, "pauseMs": 1_000}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_i64().unwrap();
    assert_eq!(started["total"], 12);
    // The same window again (a double-click) while it runs: refused, nothing created.
    let (status, _, problem) = start_replay(
        &app,
        json!({"from": rfc3339(from - chrono::TimeDelta::hours(1)), "to": rfc3339(from + chrono::TimeDelta::milliseconds(1))}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("REPLAY_OVERLAPS")),
        "{problem}"
    );
    let replays: i64 = sqlx::query_scalar("SELECT count(*) FROM event_replays")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(replays, 1);
    wait_replay(&app, id, |r| r["published"] == 1).await;
    let cancel = format!("/api/admin/events/replays/{id}/cancel");
    let (status, cancelled) = app.admin(Method::POST, &cancel).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert!(cancelled["finishedAt"].is_string());
    let again = send(&app, Method::POST, &cancel, Some(&app.admin_token()), None).await;
    assert_problem(&again, StatusCode::CONFLICT, "REPLAY_NOT_RUNNING");
    // Nothing is written after the cancel: wait past the pause, then count.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, after) = app
        .get(&format!("/api/admin/events/replays/{id}"), &app.admin_token())
        .await;
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE headers ->> $1 = $2")
        .bind(REPLAY_HEADER)
        .bind(id.to_string())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        (
            after["state"].as_str(),
            after["enqueued"].as_i64(),
            after["published"].as_i64()
        ),
        (Some("CANCELLED"), Some(1), Some(1)),
        "{after}"
    );
    assert_eq!(written, 1);

    // Refusals, each a problem document.
    let admin = app.admin_token();
    let now = Utc::now();
    let bad = |body: Value| {
        let app = app.clone();
        let admin = admin.clone();
        async move { send(&app, Method::POST, "/api/admin/events/replay", Some(&admin), Some(body)).await }
    };
    let window = |from: DateTime<Utc>, to: DateTime<Utc>| json!({"from": rfc3339(from), "to": rfc3339(to)});
    assert_problem(
        &bad(window(now, now - chrono::TimeDelta::hours(1))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "INVALID_WINDOW",
    );
    assert_problem(
        &bad(window(
            now + chrono::TimeDelta::hours(1),
            now + chrono::TimeDelta::hours(2),
        ))
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "INVALID_WINDOW",
    );
    assert_problem(
        &bad(window(now - chrono::TimeDelta::days(40), now)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "WINDOW_TOO_LONG",
    );
    assert_problem(
        &bad(json!({"from": "yesterday", "to": rfc3339(now)})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_TIME",
    );
    // The schema's one spelling: no impossible dates, no lower-case `t`, no surrounding blanks.
    for time in ["0000-00-00T00:00:00Z", "2026-11-21t10:00:00Z", " 2026-11-21T10:00:00Z"] {
        assert_problem(
            &bad(json!({"from": time, "to": rfc3339(now)})).await,
            StatusCode::BAD_REQUEST,
            "INVALID_TIME",
        );
    }
    // Integers as JSON Schema reads them: 100.0 is 100.
    let (month_ago, day_later) = (now - chrono::TimeDelta::days(30), now - chrono::TimeDelta::days(29));
    let accepted = bad(json!({"from": rfc3339(month_ago), "to": rfc3339(day_later), "chunkSize": 100.0})).await;
    assert_eq!(
        (accepted.0, accepted.2["total"].as_i64()),
        (StatusCode::ACCEPTED, Some(0)),
        "{}",
        accepted.2
    );
    assert_problem(
        &bad(json!({"from": rfc3339(now), "to": 42})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_BODY",
    );
    assert_problem(
        &bad(json!({"from": rfc3339(now)})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_BODY",
    );
    let hour_ago = now - chrono::TimeDelta::hours(1);
    assert_problem(
        &bad(json!({"from": rfc3339(hour_ago), "to": rfc3339(now), "chunkSize": 0})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_CHUNK_SIZE",
    );
    assert_problem(
        &bad(json!({"from": rfc3339(hour_ago), "to": rfc3339(now), "pauseMs": 60_000})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_PAUSE",
    );
    assert_problem(
        &bad(json!({"from": rfc3339(hour_ago), "to": rfc3339(now), "speed": "max"})).await,
        StatusCode::BAD_REQUEST,
        "INVALID_BODY",
    );
    let user = app.token(1);
    let body = Some(window(hour_ago, now));
    assert_problem(
        &send(
            &app,
            Method::POST,
            "/api/admin/events/replay",
            Some(&user),
            body.clone(),
        )
        .await,
        StatusCode::FORBIDDEN,
        "ADMIN_REQUIRED",
    );
    assert_problem(
        &send(&app, Method::POST, "/api/admin/events/replay", None, body).await,
        StatusCode::UNAUTHORIZED,
        "MISSING_TOKEN",
    );
    for path in ["/api/admin/events/replays/999", "/api/admin/events/replays/999/cancel"] {
        let method = if path.ends_with("cancel") {
            Method::POST
        } else {
            Method::GET
        };
        assert_problem(
            &send(&app, method, path, Some(&admin), None).await,
            StatusCode::NOT_FOUND,
            "REPLAY_NOT_FOUND",
        );
    }
    assert_problem(
        &send(&app, Method::GET, "/api/admin/events/replays/abc", Some(&admin), None).await,
        StatusCode::BAD_REQUEST,
        "INVALID_PATH",
    );
    let replays: i64 = sqlx::query_scalar("SELECT count(*) FROM event_replays")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        replays, 2,
        "no refused request created a replay (the first and chunkSize 100.0 did)"
    );
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn the_command_line_runs_the_same_replay_and_api_processes_resume_one_nobody_runs() {
    let app = Arc::new(TestApp::spawn().await);
    app.capture("consumer", "orderflow.events", "order.confirmed").await;
    let product = app.product("Cup", 500, 1_000).await;
    for user in 1..=8 {
        app.fund(user, 1_000).await;
    }
    let from = Utc::now();
    let ids = place(&app, product, 1, 8).await;
    wait_confirmed(&app, &ids).await;
    let to = Utc::now();
    app.wait_quiescent(WAIT).await;
    assert_eq!(drain_raw(&app, "consumer").await.len(), 8);
    let args = ReplayArgs {
        from: Some(rfc3339(from)),
        to: Some(rfc3339(to)),
        chunk_size: 3,
        pause_ms: 0,
        detach: false,
        resume: None,
    };
    let url = app.config.database_url.clone();

    // In the foreground: three chunks, progress reported as it goes, DONE.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ended = {
        let seen = seen.clone();
        events::replay(&url, &args, &CancellationToken::new(), move |r| {
            seen.lock().unwrap().push((r.state, r.enqueued, r.published));
        })
        .await
        .unwrap()
    };
    assert_eq!(
        (ended.state, ended.total, ended.enqueued, ended.published),
        (ReplayState::Done, 8, 8, 8)
    );
    assert_eq!(ended.requested_by, "cli");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&(ReplayState::Running, 3, 3)) && seen.contains(&(ReplayState::Running, 6, 6)),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&(ReplayState::Done, 8, 8)));

    // Detached: nobody holds it; an API process resumes it within a few seconds.
    let detached = events::replay(
        &url,
        &ReplayArgs {
            detach: true,
            ..args.clone()
        },
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(detached.state, ReplayState::Running);
    let resumed = wait_replay(&app, detached.id, |r| r["state"] == "DONE").await;
    assert_eq!(resumed["published"], 8);

    // A runner that died mid-way: one chunk written, not yet counted, lease run out. The
    // resumer waits for that chunk, counts it once, and goes on from the cursor.
    let (from, to) = (args.from.clone().unwrap(), args.to.clone().unwrap());
    let plan = orderflow_shared::db::replay::Plan::parse(&from, &to, Some(3), Some(0), Utc::now()).unwrap();
    let dead = {
        let mut conn = app.pool.acquire().await.unwrap();
        orderflow_shared::db::replay::create(&mut conn, &plan, "cli", Some(uuid::Uuid::new_v4()))
            .await
            .unwrap()
    };
    let first_chunk: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, order_ids, headers, body)
         SELECT event_id, 'orderflow.events', 'order.confirmed', 'order.confirmed', ARRAY[order_id],
                headers || jsonb_build_object($1::text, $2::text), body
         FROM confirmed_events WHERE confirmed_at >= $3 AND confirmed_at < $4 ORDER BY confirmed_at, order_id LIMIT 3
         RETURNING id",
    )
    .bind(REPLAY_HEADER)
    .bind(dead.id.to_string())
    .bind(plan.from)
    .bind(plan.to)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE event_replays SET enqueued = 3, pending = $2, lease_until = now() - interval '1 second',
                (cursor_at, cursor_order) = (SELECT confirmed_at, order_id FROM confirmed_events
                                             WHERE confirmed_at >= $3 AND confirmed_at < $4
                                             ORDER BY confirmed_at, order_id OFFSET 2 LIMIT 1)
         WHERE id = $1",
    )
    .bind(dead.id)
    .bind(&first_chunk)
    .bind(plan.from)
    .bind(plan.to)
    .execute(&app.pool)
    .await
    .unwrap();
    let resumed = wait_replay(&app, dead.id, |r| r["state"] == "DONE").await;
    assert_eq!(
        (resumed["enqueued"].as_i64(), resumed["published"].as_i64()),
        (Some(8), Some(8)),
        "{resumed}"
    );

    // A runner killed while no API process was up to resume it: `--resume` runs it here.
    let orphan = {
        let mut conn = app.pool.acquire().await.unwrap();
        orderflow_shared::db::replay::create(&mut conn, &plan, "cli", Some(uuid::Uuid::new_v4()))
            .await
            .unwrap()
    };
    sqlx::query("UPDATE event_replays SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(orphan.id)
        .execute(&app.pool)
        .await
        .unwrap();
    let resume = |id| ReplayArgs {
        from: None,
        to: None,
        resume: Some(id),
        ..args.clone()
    };
    match events::replay(&url, &resume(orphan.id), &CancellationToken::new(), |_| {}).await {
        Ok(ended) => assert_eq!(
            (ended.id, ended.state, ended.published),
            (orphan.id, ReplayState::Done, 8)
        ),
        // This test's API process looks for such replays every 5 s and may claim it first.
        Err(err) => {
            assert!(err.to_string().contains("being run by another process"), "{err:#}");
            wait_replay(&app, orphan.id, |r| r["state"] == "DONE").await;
        }
    }
    for (id, says) in [(orphan.id, "nothing to resume"), (i64::MAX, "there is no replay")] {
        let err = events::replay(&url, &resume(id), &CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains(says), "{err:#}");
    }

    // Stopped from the command line (Ctrl-C): cancelled, nothing more written.
    let stop = CancellationToken::new();
    let slow = ReplayArgs {
        chunk_size: 1,
        pause_ms: 10_000,
        ..args.clone()
    };
    let stopped = {
        let stop2 = stop.clone();
        events::replay(&url, &slow, &stop, move |r| {
            if r.published >= 1 {
                stop2.cancel();
            }
        })
        .await
        .unwrap()
    };
    assert_eq!((stopped.state, stopped.enqueued), (ReplayState::Cancelled, 1));

    // Each replay delivered its events once more, with the original ids.
    app.wait_quiescent(WAIT).await;
    let got = drain_raw(&app, "consumer").await;
    let mut per_replay: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in &got {
        per_replay
            .entry(m.replay.clone().unwrap())
            .or_default()
            .insert(m.event_id());
    }
    let originals: BTreeSet<String> = original_events(&app).await.into_values().map(|(e, _)| e).collect();
    assert_eq!(got.len(), 8 + 8 + 8 + 8 + 1);
    for id in [ended.id, detached.id, dead.id, orphan.id] {
        assert_eq!(per_replay[&id.to_string()], originals, "replay {id}");
    }
    assert_eq!(per_replay[&stopped.id.to_string()].len(), 1);
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_replay_routes() {
    let app = TestApp::api_only().await;
    let (status, doc) = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = &doc["paths"];
    for (path, method, statuses) in [
        (
            "/api/admin/events/replay",
            "post",
            &["202", "400", "401", "403", "409"][..],
        ),
        ("/api/admin/events/replays", "get", &["200", "400", "401", "403"]),
        ("/api/admin/events/replays/{id}", "get", &["200", "401", "403", "404"]),
        (
            "/api/admin/events/replays/{id}/cancel",
            "post",
            &["200", "401", "403", "404", "409"],
        ),
    ] {
        let op = &paths[path][method];
        assert!(op.is_object(), "{method} {path} missing");
        for status in statuses {
            assert!(op["responses"].get(*status).is_some(), "{method} {path} lacks {status}");
        }
    }
    assert!(paths["/api/admin/events/replay"]["post"]["requestBody"].is_object());
    let replay = &doc["components"]["schemas"]["Replay"]["properties"];
    for field in [
        "id",
        "state",
        "from",
        "to",
        "total",
        "enqueued",
        "published",
        "parked",
        "startedAt",
        "finishedAt",
    ] {
        assert!(replay.get(field).is_some(), "Replay schema lacks {field}: {replay}");
    }
    for internal in ["pending", "cursorAt", "leaseOwner"] {
        assert!(replay.get(internal).is_none(), "Replay schema shows {internal}");
    }
    app.stop().await;
}

/// One time precision (issue 22): events show `confirmedAt` to the millisecond, and a replay's
/// window holds exactly the events whose shown time falls in it, at any precision of the
/// window's bounds: [t, t + 0.5 ms) holds the events shown at t, [t + 0.5 ms, t + 1 ms) none.
#[tokio::test]
async fn a_window_holds_exactly_the_events_whose_shown_time_falls_in_it() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.product("Precise", 100, 1_000).await;
    for user in 1..=8 {
        app.fund(user, 1_000).await;
    }
    // One at a time, so they confirm at different milliseconds.
    let mut ids = Vec::new();
    for user in 1..=8 {
        let id = app.order(user, &[(product, 1)], None).await;
        app.wait_terminal(user, &id, WAIT).await;
        ids.push(id);
    }
    let events = drain_raw(&app, "data-platform.orders").await;
    assert_eq!(events.len(), 8);
    let shown: Vec<DateTime<Utc>> = events
        .iter()
        .map(|e| {
            let text = e.json["data"]["confirmedAt"].as_str().unwrap();
            assert_eq!(text.len(), "2026-12-05T10:00:00.123Z".len(), "{text}");
            DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
        })
        .collect();
    let micros = |n: i64| chrono::TimeDelta::microseconds(n);
    for &t in &shown {
        for (from, to) in [
            (t, t + micros(500)),
            (t + micros(500), t + micros(1_000)),
            (t - micros(500), t + micros(500)),
            (t + micros(300), t + micros(1_300)),
            (t - micros(1), t),
            (t + micros(1), t + micros(1_001)),
        ] {
            let want = shown.iter().filter(|&&e| from <= e && e < to).count();
            let (status, _, replay) = start_replay(&app, json!({"from": rfc3339(from), "to": rfc3339(to)})).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{replay}");
            assert_eq!(replay["total"], want, "[{}, {}): {replay}", rfc3339(from), rfc3339(to));
            wait_replay(&app, replay["id"].as_i64().unwrap(), |r| r["state"] == "DONE").await;
        }
    }
    // The stored times are the shown ones.
    let stored: Vec<DateTime<Utc>> = sqlx::query_scalar("SELECT confirmed_at FROM confirmed_events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    let mut shown_sorted = shown.clone();
    shown_sorted.sort();
    assert_eq!(stored_sorted, shown_sorted);
    Arc::into_inner(app).unwrap().stop().await;
}
