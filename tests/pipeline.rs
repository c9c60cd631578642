//! The order pipeline end to end, against the real PostgreSQL and RabbitMQ.

mod common;

use std::time::Duration;

use common::TestApp;
use orderflow_shared::messaging::topology::DATA_PLATFORM_QUEUE;
use serde_json::json;

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
    let path: Vec<_> = order["history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap().to_owned()).collect();
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
    assert_eq!(body["orderId"], order_id.as_str());
    assert_eq!(body["data"], json!({
        "userId": 7, "couponId": null,
        "items": [{"productId": product, "quantity": 2, "unitPrice": 1_500}],
        "totalAmount": 3_000, "discountAmount": 0, "paidAmount": 3_000,
        "confirmedAt": body["data"]["confirmedAt"],
    }));
    assert_eq!(props.message_id().as_ref().map(|s| s.to_string()), body["id"].as_str().map(str::to_owned));
    assert_eq!(props.kind().as_ref().map(|s| s.to_string()).as_deref(), Some("order.confirmed"));
    assert_eq!(props.correlation_id().as_ref().map(|s| s.to_string()), Some(order_id.clone()));
    assert_eq!(props.content_type().as_ref().map(|s| s.to_string()).as_deref(), Some("application/json"));
    assert_eq!(*props.delivery_mode(), Some(2));
    app.stop().await;
}
