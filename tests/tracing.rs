//! One order, one trace: the HTTP request's trace continues through every worker hop.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::TestApp;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use orderflow_shared::{config::LogFormat, telemetry};

#[tokio::test]
async fn every_consumer_span_continues_the_producers_trace() {
    // Installed before the harness's own (which then keeps this one).
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = telemetry::init(LogFormat::Text, provider);

    let app = TestApp::spawn().await;
    let product = app.product("Traced", 1_000, 5).await;
    app.fund(4, 5_000).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = app
        .request(
            reqwest::Method::POST,
            "/api/orders",
            Some(&app.token(4)),
            Some(serde_json::json!({"items": [{"productId": product, "quantity": 1}]})),
            &[
                ("idempotency-key", "traced"),
                ("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01")),
            ],
        )
        .await;
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["orderId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app.wait_terminal(4, &id, Duration::from_secs(30)).await["status"],
        "CONFIRMED"
    );
    app.wait_quiescent(Duration::from_secs(30)).await;

    // The public event carries the same trace.
    let events = app
        .drain_queue(orderflow_shared::messaging::topology::DATA_PLATFORM_QUEUE)
        .await;
    let headers = events[0].0.headers().clone().unwrap();
    let traceparent = match headers.inner().get("traceparent") {
        Some(lapin::types::AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("no traceparent header: {other:?}"),
    };
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");

    // Every worker's delivery span for this order is in the request's trace, and each has a
    // parent (the span that sent its message), never a root of its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let deliveries = loop {
        let spans = exporter.get_finished_spans().unwrap();
        // Consumer spans of single deliveries (a batch's own span is a root that links them).
        let deliveries: Vec<_> = spans
            .into_iter()
            .filter(|s| {
                s.span_kind == opentelemetry::trace::SpanKind::Consumer
                    && !s
                        .attributes
                        .iter()
                        .any(|kv| kv.key.as_str() == "messaging.batch.message_count")
            })
            .collect();
        if deliveries.len() >= 3 {
            break deliveries;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} delivery spans",
            deliveries.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut workers: Vec<String> = Vec::new();
    for span in &deliveries {
        assert_eq!(format!("{:032x}", span.span_context.trace_id()), trace_id, "{span:?}");
        assert_ne!(span.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        let worker = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "worker")
            .map(|kv| kv.value.to_string());
        workers.extend(worker);
    }
    workers.sort();
    assert_eq!(workers, ["order", "payment", "stock"]);
    app.stop().await;
}
