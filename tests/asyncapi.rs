//! The messages are a contract: everything a real pipeline run publishes matches the AsyncAPI
//! document the API serves (`GET /asyncapi.json`, kept as `docs/asyncapi.json`). The messages
//! are captured from the broker and checked by `tests/asyncapi/check.mjs` (the official
//! AsyncAPI parser, then every body, header and AMQP property against the document's schemas),
//! run through `scripts/asyncapi.sh`, which installs the pinned parser if needed.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::TestApp;
use lapin::{BasicProperties, options::BasicGetOptions};
use orderflow_shared::messaging::{
    Envelope, MessageType,
    envelope::CommandData,
    topology::{
        DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, EXPIRED_EXCHANGE, EXPIRED_QUEUE, STOCK_QUEUE,
    },
};
use orderflow_workers::steps::dead_letters::table_to_json;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// One message taken from a capture queue, as `check.mjs` reads it.
struct Captured {
    channel: String,
    properties: BasicProperties,
    body: Vec<u8>,
}

impl Captured {
    fn to_json(&self) -> Value {
        common::captured_json(&self.channel, &self.properties, &self.body)
    }

    fn body(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The orders a command names, or the one an event (a CloudEvent: its `subject`) is about.
    fn orders(&self) -> Vec<String> {
        let body = self.body();
        match body["data"]["orderIds"].as_array() {
            Some(ids) => ids.iter().map(|id| id.as_str().unwrap().to_owned()).collect(),
            None => vec![
                body["subject"]
                    .as_str()
                    .or(body["orderId"].as_str())
                    .unwrap()
                    .to_owned(),
            ],
        }
    }
}

/// Takes every message waiting in `queue`, waiting until there are at least `at_least`.
async fn take(app: &TestApp, queue: &str, channel: &str, at_least: usize) -> Vec<Captured> {
    let (conn, amqp) = app.amqp().await;
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    loop {
        match amqp
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(msg) => out.push(Captured {
                channel: channel.to_owned(),
                properties: msg.delivery.properties.clone(),
                body: msg.delivery.data.clone(),
            }),
            None if out.len() >= at_least => break,
            None => {
                assert!(
                    Instant::now() < deadline,
                    "{queue}: {} of {at_least} messages",
                    out.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Runs `scripts/asyncapi.sh DOCUMENT MESSAGES`: (success, its whole output).
fn check(document: &Path, messages: &Path) -> (bool, String) {
    common::run_script("scripts/asyncapi.sh", &[document.as_os_str(), messages.as_os_str()])
}

fn write(path: &Path, value: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// Fetches `GET /asyncapi.json`, checks it is `docs/asyncapi.json` byte for byte, and keeps it
/// as `target/asyncapi/<name>.asyncapi.json`: (its path, the document).
async fn served_document(app: &TestApp, name: &str) -> (PathBuf, Value) {
    let res = app.request(Method::GET, "/asyncapi.json", None, None, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let served = res.text().await.unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::fs::read_to_string(root.join("docs/asyncapi.json")).unwrap() == served,
        "docs/asyncapi.json is not what GET /asyncapi.json serves; regenerate it with \
         `UPDATE_ASYNCAPI=1 cargo test -p orderflow-shared asyncapi`"
    );
    let path = root.join(format!("target/asyncapi/{name}.asyncapi.json"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &served).unwrap();
    (path, serde_json::from_str(&served).unwrap())
}

/// Writes `messages` as `target/asyncapi/<name>.json` and checks them against `document`:
/// every one must pass. Returns them as written.
fn assert_match(document: &Path, name: &str, messages: &[Captured]) -> Vec<Value> {
    let captured: Vec<Value> = messages.iter().map(Captured::to_json).collect();
    let file = document.with_file_name(format!("{name}.json"));
    write(&file, &Value::Array(captured.clone()));
    let (ok, output) = check(document, &file);
    assert!(ok, "the captured messages do not match the document:\n{output}");
    let summary = format!("asyncapi: {} passed, 0 failed", captured.len() + 1);
    assert!(output.lines().any(|l| l == summary), "expected `{summary}`:\n{output}");
    captured
}

#[tokio::test]
async fn the_messages_a_real_run_publishes_match_the_asyncapi_document() {
    // No order worker at first: both orders stop at PAID, so one of them can be cancelled
    // while paid and give everything back (every compensation command), then the order
    // worker confirms the other.
    use orderflow_workers::WorkerKind::*;
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Stock, Coupon, Payment, Recovery],
        ..Default::default()
    })
    .await;

    let (document, doc) = served_document(&app, "pipeline").await;

    // A capture queue on every routing key the document describes, and one on the
    // dead-letter exchange (what reaches orderflow.dead-letters).
    let mut captures = Vec::new();
    for (id, channel) in doc["channels"].as_object().unwrap() {
        let amqp = &channel["bindings"]["amqp"];
        if amqp["is"] == "routingKey" {
            let queue = format!("capture.{id}");
            let exchange = amqp["exchange"]["name"].as_str().unwrap();
            app.capture(&queue, exchange, channel["address"].as_str().unwrap())
                .await;
            captures.push((queue, id.clone()));
        }
    }
    assert_eq!(captures.len(), 11, "{captures:?}");
    app.capture("capture.dead-letters", DEAD_LETTER_EXCHANGE, "").await;

    let product = app.product("Contract", 10_000, 10).await;
    let coupon = app
        .coupon(json!({"name": "1000 off", "discountType": "FIXED", "discountValue": 1_000, "quantity": 2}))
        .await;
    for user in [41, 42] {
        let (status, body) = app
            .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        app.fund(user, 50_000).await;
    }
    let confirmed = app.order(41, &[(product, 2)], Some(coupon)).await;
    app.wait_order_row(&confirmed, WAIT, |o| o.status.as_str() == "PAID")
        .await;
    let cancelled = app.order(42, &[(product, 1)], Some(coupon)).await;
    app.wait_order_row(&cancelled, WAIT, |o| o.status.as_str() == "PAID")
        .await;
    let (status, body) = app
        .admin(Method::POST, &format!("/api/admin/orders/{cancelled}/cancel"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.wait_order_row(&cancelled, WAIT, |o| {
        o.status.as_str() == "CANCELLING" && o.paid_amount == 0 && !o.coupon_held && !o.stock_held
    })
    .await;
    app.spawn_workers(&[Order]).await;
    assert_eq!(app.wait_terminal(41, &confirmed, WAIT).await["status"], "CONFIRMED");
    assert_eq!(app.wait_terminal(42, &cancelled, WAIT).await["status"], "CANCELLED");
    app.wait_quiescent(WAIT).await;

    // Exactly these orders went through each routing key, each once.
    let (a, b) = (confirmed.as_str(), cancelled.as_str());
    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("stock.reserve", vec![a, b]),
        ("coupon.apply", vec![a, b]),
        ("payment.charge", vec![a, b]),
        ("order.confirm", vec![a, b]),
        ("order.deadline", vec![a, b]),
        ("payment.refund", vec![b]),
        ("coupon.restore", vec![b]),
        ("stock.release", vec![b]),
        ("order.finish-cancel", vec![b]),
        ("order.confirmed", vec![a]),
        ("order.cancelled", vec![b]),
    ]);
    let mut messages = Vec::new();
    for (queue, channel) in &captures {
        let want = &expected[channel.as_str()];
        let taken = take(&app, queue, channel, 1).await;
        let mut orders: Vec<String> = taken.iter().flat_map(Captured::orders).collect();
        orders.sort();
        let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(orders, want, "orders named on {channel}");
        messages.extend(taken);
    }

    // A dead letter: a command about an order that does not exist, rejected by the stock
    // worker and dead-lettered by RabbitMQ.
    let missing = Uuid::now_v7();
    let poison = Envelope::new(
        MessageType::StockReserve,
        Some(missing),
        CommandData::new(&[missing], &[]),
    );
    app.publish_raw(
        "",
        STOCK_QUEUE,
        &serde_json::to_vec(&poison).unwrap(),
        MessageType::StockReserve.as_str(),
    )
    .await;
    let dead = take(&app, "capture.dead-letters", DEAD_LETTER_QUEUE, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body()["id"], poison.id.to_string());
    messages.extend(dead);
    app.stop().await;

    // Everything captured matches the document the server served.
    let captured = assert_match(&document, "pipeline", &messages);
    // And the public events are CloudEvents as the SDKs' RabbitMQ binding reads them.
    let public: Vec<Value> = captured
        .iter()
        .filter(|m| m["channel"] == "order.confirmed" || m["channel"] == "order.cancelled")
        .cloned()
        .collect();
    assert_eq!(public.len(), 2);
    common::assert_cloudevents("pipeline", &public);

    // And the check is not a formality: a renamed field, a field of the wrong type, a wrong
    // AMQP property and a missing trace header each fail it.
    let mut drifted = captured.clone();
    let mut edit = |channel: &str, change: &dyn Fn(&mut Value)| {
        let m = drifted.iter_mut().find(|m| m["channel"] == channel).unwrap();
        let mut body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
        change(&mut body);
        m["body"] = Value::from(body.to_string());
    };
    edit("order.confirmed", &|body| {
        let user = body["data"]["userId"].take();
        body["data"].as_object_mut().unwrap().remove("userId");
        body["data"]["userID"] = user;
    });
    edit("order.cancelled", &|body| {
        body["data"]["returned"]["refundedAmount"] = json!("10000");
    });
    edit("stock.reserve", &|body| {
        body["occurredAt"] = json!("2026-11-21T10:00:00Z")
    });
    let m = drifted.iter_mut().find(|m| m["channel"] == "payment.charge").unwrap();
    m["properties"]["delivery_mode"] = json!(1);
    let m = drifted.iter_mut().find(|m| m["channel"] == "order.confirm").unwrap();
    m["headers"].as_object_mut().unwrap().remove("traceparent");
    let file = document.with_file_name("drifted.json");
    write(&file, &Value::Array(drifted));
    let (ok, output) = check(&document, &file);
    assert!(!ok, "drifted messages passed:\n{output}");
    let summary = format!("asyncapi: {} passed, 5 failed", captured.len() + 1 - 5);
    assert!(output.lines().any(|l| l == summary), "expected `{summary}`:\n{output}");
    for needle in [
        "additionalProperty\":\"userID\"",
        "/data/returned/refundedAmount must be integer",
        "/occurredAt must match pattern",
        "/delivery_mode must be equal to constant",
        "must have required property 'traceparent'",
    ] {
        assert!(output.contains(needle), "expected {needle:?} in:\n{output}");
    }
}

#[tokio::test]
async fn an_expired_deadline_matches_the_asyncapi_document() {
    // No stock worker: the order waits until its deadline expires into the recovery worker's
    // queue, and the recovery worker cancels it.
    use orderflow_workers::WorkerKind::*;
    let app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Order, Recovery],
        order_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let (document, _) = served_document(&app, "expired").await;
    app.capture("capture.expired", EXPIRED_EXCHANGE, "").await;
    app.capture("capture.cancelled", EVENTS_EXCHANGE, "order.cancelled")
        .await;

    let product = app.product("Late", 5_000, 1).await;
    let order = app.order(43, &[(product, 1)], None).await;
    let body = app.wait_terminal(43, &order, WAIT).await;
    assert_eq!(
        (body["status"].as_str(), body["reason"].as_str()),
        (Some("CANCELLED"), Some("TIMEOUT"))
    );
    app.wait_quiescent(WAIT).await;

    let mut messages = take(&app, "capture.expired", EXPIRED_QUEUE, 1).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].orders(), std::slice::from_ref(&order));
    assert_eq!(messages[0].properties.expiration(), &None);
    let x_death = table_to_json(messages[0].properties.headers().as_ref().unwrap());
    assert_eq!(x_death["x-first-death-reason"], "expired");
    let cancelled = take(&app, "capture.cancelled", "order.cancelled", 1).await;
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].body()["data"]["reason"], "TIMEOUT");
    messages.extend(cancelled);
    app.stop().await;

    assert_match(&document, "expired", &messages);
}
