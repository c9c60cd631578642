//! Declaring the topology on a broker that already has the queues (a running deployment,
//! created by an earlier version without the cluster placement arguments) changes nothing and
//! fails nothing: RabbitMQ 3.10 answers a redeclare with different arguments
//! PRECONDITION_FAILED, so existing queues are left as they are.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use lapin::{
    ConnectionProperties,
    options::QueueDeclareOptions,
    types::{FieldTable, ShortString},
};
use orderflow_shared::messaging::{self, topology};
use reqwest::Method;

const PLACEMENT: [&str; 2] = ["x-quorum-initial-group-size", "x-queue-leader-locator"];

#[tokio::test]
async fn queues_of_an_earlier_version_are_left_as_they_are_and_new_ones_get_every_argument() {
    let vhost = format!(
        "orderflow-test-topology-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    common::create_vhost(&vhost).await;
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let conn = messaging::connect(&url, ConnectionProperties::default()).await.unwrap();

    // An earlier version created the stock queue with the arguments of its time.
    let legacy = &topology::QUEUES[0];
    let mut old_args = legacy.arguments();
    let mut inner = old_args.inner().clone();
    for key in PLACEMENT {
        inner.remove(&ShortString::from(key));
    }
    old_args = FieldTable::from(inner);
    let channel = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(legacy.name.into(), durable, old_args.clone())
        .await
        .unwrap();
    // A redeclare with today's arguments is what RabbitMQ refuses.
    let refused = channel
        .queue_declare(legacy.name.into(), durable, legacy.arguments())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("PRECONDITION_FAILED"), "{refused}");

    // The topology declares fine, twice, around the existing queue.
    topology::declare(&conn).await.unwrap();
    topology::declare(&conn).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;

    let queues = common::mgmt(Method::GET, &format!("/api/queues/{vhost}"), None).await;
    let queues = queues.as_array().unwrap();
    assert_eq!(queues.len(), topology::QUEUES.len());
    for q in queues {
        let args = q["arguments"].as_object().unwrap();
        let placed = PLACEMENT.iter().all(|k| args.contains_key(*k));
        if q["name"] == legacy.name {
            assert!(!placed, "the existing queue was changed: {args:?}");
            assert_eq!(args["x-delivery-limit"], topology::DELIVERY_LIMIT);
        } else {
            assert!(placed, "{} lacks the placement arguments: {args:?}", q["name"]);
            assert_eq!(args["x-queue-leader-locator"], "balanced");
            assert_eq!(args["x-quorum-initial-group-size"], topology::QUORUM_INITIAL_GROUP_SIZE);
        }
    }
    // Bindings are declared for the existing queue too.
    let bindings = common::mgmt(
        Method::GET,
        &format!("/api/queues/{vhost}/{}/bindings", legacy.name),
        None,
    )
    .await;
    let keys: Vec<&str> = bindings
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["source"] == legacy.exchange)
        .map(|b| b["routing_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), legacy.routing_keys.len(), "{keys:?}");
    common::mgmt(Method::DELETE, &format!("/api/vhosts/{vhost}"), None).await;
}
