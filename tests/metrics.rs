//! Prometheus metrics on the API (and the same recorder the workers write to).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestApp;

/// The value of the first sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_messages_steps_orders_and_queues() {
    let app = TestApp::spawn().await;
    let product = app.product("Metered", 1_000, 5).await;
    app.fund(3, 5_000).await;
    let id = app.order(3, &[(product, 1)], None).await;
    assert_eq!(
        app.wait_terminal(3, &id, Duration::from_secs(30)).await["status"],
        "CONFIRMED"
    );
    let (status, _) = app.get("/api/products/999999", &app.token(3)).await;
    assert_eq!(status, 404);

    // Gauges are sampled every 200 ms in tests: wait until they show the confirmed order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let res = app.http.get(app.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = res.text().await.unwrap();
        // Gauges are sampled together: wait for a sample taken at rest.
        if sample(&text, "orderflow_orders{status=\"CONFIRMED\"}") == Some(1.0)
            && sample(&text, "orderflow_outbox_unsent ") == Some(0.0)
            && sample(&text, "orderflow_queue_consumers{queue=\"orderflow.stock\"}") == Some(1.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "orders gauge never showed the order:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(
        sample(
            &text,
            "orderflow_http_requests_total{route=\"/api/orders\",status=\"202\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "orderflow_http_requests_total{route=\"/api/products/{id}\",status=\"404\"}"
        ),
        Some(1.0)
    );
    assert!(text.contains("orderflow_http_request_duration_seconds_bucket{route=\"/api/orders\""));
    for queue in ["orderflow.stock", "orderflow.payment", "orderflow.order"] {
        let line = format!("orderflow_messages_total{{queue=\"{queue}\",outcome=\"acked\"}}");
        assert_eq!(sample(&text, &line), Some(1.0), "{line}");
    }
    assert!(text.contains("orderflow_step_duration_seconds_count{step=\"stock\"} 1"));
    assert_eq!(sample(&text, "orderflow_orders{status=\"PENDING\"}"), Some(0.0));
    assert_eq!(sample(&text, "orderflow_dead_letters "), Some(0.0));
    assert_eq!(sample(&text, "orderflow_outbox_unsent "), Some(0.0));
    assert_eq!(
        sample(&text, "orderflow_queue_consumers{queue=\"orderflow.stock\"}"),
        Some(1.0)
    );
    assert!(sample(&text, "orderflow_queue_depth{queue=\"data-platform.orders\"}").is_some());
    app.stop().await;
}
