//! Traces as a trace backend receives them: the system runs as separate processes exporting
//! OTLP/HTTP to a small receiver that decodes each export with the official protocol
//! definitions (`tests/otlp/receiver.py`, opentelemetry-proto pinned), and the spans follow the
//! OpenTelemetry conventions: HTTP SERVER spans; for each message a PRODUCER `create` span
//! (its creation context), a CONSUMER `process` span per delivery (and per order of a command
//! about several orders, and per batch), and the relay's CLIENT `publish` spans linking the
//! messages they carried, with the messaging attributes. One order's spans, from the POST to
//! its `order.confirmed`, form one trace, batched hops included.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::system::{System, Target};
use serde_json::{Value, json};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Orders placed at once, the traced one among them (batched with others, not always first).
const ORDERS: i64 = 12;

/// The receiver, listening; killed on drop.
struct Receiver {
    child: std::process::Child,
    spans: PathBuf,
    url: String,
}

impl Receiver {
    fn start() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let spans = root.join(format!("target/otlp/spans-{}.jsonl", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(spans.parent().unwrap()).unwrap();
        let mut child = Command::new("bash")
            .arg(root.join("scripts/otlp-receiver.sh"))
            .arg(&spans)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("no receiver: {line:?}"));
        Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            spans,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The script execs python: its pid is the receiver's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_is_one_trace_in_the_opentelemetry_http_and_messaging_conventions() {
    let receiver = Receiver::start();
    let sys = System::start(
        "otlp",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url)],
        Target::default_node(),
    )
    .await;
    sys.wait_ready().await;
    let product: i64 = sqlx::query_scalar(
        "INSERT INTO products (name, price, stock, initial_stock) VALUES ('traced', 1000, 100, 100) RETURNING id",
    )
    .fetch_one(&sys.pool)
    .await
    .unwrap();
    for user in 1..=ORDERS {
        sqlx::query("INSERT INTO balances (user_id, balance) VALUES ($1, 10000)")
            .bind(user)
            .execute(&sys.pool)
            .await
            .unwrap();
    }
    // The traced order (the client sends its traceparent) and more beside it.
    let place = |user: i64, traceparent: Option<String>| {
        let sys = &sys;
        async move {
            let mut req = sys
                .http
                .post(format!("{}/api/orders", sys.base()))
                .bearer_auth(sys.keys.issue(user, false, 600).unwrap())
                .header("idempotency-key", format!("otlp-{user}"))
                .json(&json!({"items": [{"productId": product, "quantity": 1}]}));
            if let Some(tp) = traceparent {
                req = req.header("traceparent", tp);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 202);
            res.json::<Value>().await.unwrap()["orderId"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    // All at once while the stock worker is paused: it then takes their reservations as one
    // batch and sends one payment command about several orders, whose traces go on through
    // its `data.traceparents`.
    sys.signal("stock", "-STOP").await;
    futures_util::future::join_all(
        (1..=ORDERS).map(|u| place(u, (u == ORDERS / 2).then(|| format!("00-{TRACE}-00f067aa0ba902b7-01")))),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    sys.signal("stock", "-CONT").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
            .fetch_one(&sys.pool)
            .await
            .unwrap();
        if done == ORDERS {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {ORDERS} confirmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shutting down flushes every process's spans.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sys.stop().await;
    let spans = receiver.spans();
    let in_trace: Vec<&Value> = spans.iter().filter(|s| s["traceId"] == TRACE).collect();
    let attr = |s: &Value, k: &str| s["attributes"][k].clone();

    // The HTTP server span.
    let server = in_trace
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_SERVER")
        .unwrap_or_else(|| panic!("no server span in the trace: {in_trace:#?}"));
    assert_eq!(server["name"], "POST /api/orders");
    assert_eq!(
        server["parentSpanId"], "00f067aa0ba902b7",
        "the client's span is its parent"
    );
    for (k, v) in [
        ("http.request.method", json!("POST")),
        ("http.route", json!("/api/orders")),
        ("url.path", json!("/api/orders")),
        ("http.response.status_code", json!(202)),
    ] {
        assert_eq!(attr(server, k), v, "{k}: {server}");
    }

    // Each message the order's steps sent was created in a PRODUCER span (`create`), a child
    // of the span that decided to send it; a CONSUMER span per step the order went through is
    // a child of its message's creation span: one trace from the POST to the confirmation.
    let ids: HashSet<&str> = in_trace.iter().map(|s| s["spanId"].as_str().unwrap()).collect();
    let creations: HashMap<&str, &&Value> = in_trace
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_PRODUCER")
        .map(|s| (s["spanId"].as_str().unwrap(), s))
        .collect();
    for s in creations.values() {
        assert!(s["name"].as_str().unwrap().starts_with("create orderflow."), "{s}");
        assert!(ids.contains(s["parentSpanId"].as_str().unwrap()), "an orphan: {s}");
        for (k, v) in [
            ("messaging.system", json!("rabbitmq")),
            ("messaging.operation.type", json!("create")),
            ("messaging.operation.name", json!("create")),
        ] {
            assert_eq!(attr(s, k), v, "{k}: {s}");
        }
    }
    let consumers: Vec<&&Value> = in_trace.iter().filter(|s| s["kind"] == "SPAN_KIND_CONSUMER").collect();
    let keys: HashSet<String> = consumers
        .iter()
        .map(|s| {
            attr(s, "messaging.rabbitmq.destination.routing_key")
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for key in ["stock.reserve", "payment.charge", "order.confirm"] {
        assert!(keys.contains(key), "no consumer span for {key}: {keys:?}");
    }
    for s in &consumers {
        assert_eq!(s["name"], "process orderflow.work", "{s}");
        let parent = creations
            .get(s["parentSpanId"].as_str().unwrap())
            .unwrap_or_else(|| panic!("not a child of a creation span: {s}"));
        assert_eq!(
            attr(parent, "messaging.rabbitmq.destination.routing_key"),
            attr(s, "messaging.rabbitmq.destination.routing_key"),
            "{s}"
        );
        for (k, v) in [
            ("messaging.system", json!("rabbitmq")),
            ("messaging.operation.type", json!("process")),
            ("messaging.operation.name", json!("process")),
            ("messaging.destination.name", json!("orderflow.work")),
        ] {
            assert_eq!(attr(s, k), v, "{k}: {s}");
        }
        assert!(
            attr(s, "messaging.message.id")
                .as_str()
                .is_some_and(|id| id.len() == 36),
            "{s}"
        );
        assert!(
            attr(s, "messaging.rabbitmq.message.delivery_tag").as_i64().is_some(),
            "{s}"
        );
    }

    // The paused stock worker sent one payment command about several orders.
    assert!(
        spans.iter().any(|s| s["kind"] == "SPAN_KIND_CONSUMER"
            && attr(s, "messaging.rabbitmq.destination.routing_key") == "payment.charge"
            && int(&attr(s, "orders")).is_some_and(|n| n > 1)),
        "no payment command about several orders"
    );

    // The relay's CLIENT spans, one per batch it published (`send`, RabbitMQ's `publish`),
    // each linking the creation span of every message it carried.
    let created: HashSet<&str> = spans
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_PRODUCER")
        .map(|s| s["spanId"].as_str().unwrap())
        .collect();
    let publishes: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "SPAN_KIND_CLIENT").collect();
    assert!(!publishes.is_empty(), "no publish span");
    for s in &publishes {
        assert!(s["name"].as_str().unwrap().starts_with("publish"), "{s}");
        for (k, v) in [
            ("messaging.system", json!("rabbitmq")),
            ("messaging.operation.type", json!("send")),
            ("messaging.operation.name", json!("publish")),
        ] {
            assert_eq!(attr(s, k), v, "{k}: {s}");
        }
        let links = s["links"].as_array().unwrap();
        assert_eq!(s["droppedLinks"], 0, "{s}");
        let count = attr(s, "messaging.batch.message_count").as_i64().unwrap_or(1);
        assert_eq!(count as usize, links.len(), "a link per message: {s}");
        for l in links {
            let id = l["spanId"].as_str().unwrap();
            assert!(
                created.contains(id),
                "a link to no creation span: {s}\nthe linked span: {:?}\nspans by kind: {:?}\nexport errors: {}",
                spans.iter().find(|x| x["spanId"] == id),
                spans.iter().fold(HashMap::<&str, usize>::new(), |mut m, x| {
                    *m.entry(x["kind"].as_str().unwrap()).or_default() += 1;
                    m
                }),
                export_errors()
            );
        }
    }
    // The traced order's order.confirmed went out: its creation span, linked by a publish.
    let event = in_trace
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_PRODUCER" && s["name"] == "create orderflow.events")
        .unwrap_or_else(|| panic!("no order.confirmed created in the trace"));
    assert!(
        publishes
            .iter()
            .flat_map(|s| s["links"].as_array().unwrap())
            .any(|l| l["spanId"] == event["spanId"]),
        "the traced order's order.confirmed was not published: {event}"
    );

    // Every order's trace is linked by some publish; every span kind is a known one.
    let linked: HashSet<&str> = spans
        .iter()
        .flat_map(|s| s["links"].as_array().unwrap())
        .map(|l| l["traceId"].as_str().unwrap())
        .collect();
    let traces_of_orders: HashMap<&str, usize> = spans
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_SERVER" && s["name"] == "POST /api/orders")
        .map(|s| (s["traceId"].as_str().unwrap(), 1))
        .collect();
    assert_eq!(traces_of_orders.len() as i64, ORDERS);
    for trace in traces_of_orders.keys() {
        assert!(linked.contains(trace), "no publish links order trace {trace}");
        // Every order's trace goes on through each step, batched or not.
        let steps: HashSet<&str> = spans
            .iter()
            .filter(|s| s["traceId"] == *trace && s["kind"] == "SPAN_KIND_CONSUMER")
            .filter_map(|s| s["attributes"]["messaging.rabbitmq.destination.routing_key"].as_str())
            .collect();
        for key in ["stock.reserve", "payment.charge", "order.confirm"] {
            assert!(steps.contains(key), "order trace {trace} has no {key} span: {steps:?}");
        }
    }
    assert!(
        spans.iter().all(|s| [
            "SPAN_KIND_SERVER",
            "SPAN_KIND_CONSUMER",
            "SPAN_KIND_PRODUCER",
            "SPAN_KIND_CLIENT",
            "SPAN_KIND_INTERNAL"
        ]
        .contains(&s["kind"].as_str().unwrap())),
        "unexpected span kinds"
    );
    assert!(spans.iter().all(|s| s["service"] == "orderflow"));
}

/// What the system's processes logged about exporting spans (the OpenTelemetry SDK's own
/// warnings and errors), to tell a lost export from a span never made.
fn export_errors() -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-logs/otlp");
    let mut found = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in log
            .lines()
            .filter(|l| l.contains("opentelemetry") && !l.contains(" INFO "))
        {
            found.push_str(&format!("\n{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// An integer attribute, however the exporter typed it (an unsigned one may come as a string).
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}
