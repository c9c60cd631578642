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

/// Where the deployment's user may configure only orderflow's own names, the data platform's
/// queue, created by someone else, is used as it is (ACCESS_REFUSED on the declare, then found
/// by a passive one); while it is missing, the start fails with that refusal instead of going
/// on without the queue.
#[tokio::test]
async fn a_queue_the_user_may_not_configure_is_used_as_it_is_and_missing_it_fails_the_start() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let vhost = format!("orderflow-test-topology-{id}");
    let user = format!("orderflow-test-limited-{id}");
    common::create_vhost(&vhost).await;
    common::mgmt(
        Method::PUT,
        &format!("/api/users/{user}"),
        Some(serde_json::json!({"password": "limited", "tags": ""})),
    )
    .await;
    common::mgmt(
        Method::PUT,
        &format!("/api/permissions/{vhost}/{user}"),
        Some(serde_json::json!({"configure": "^orderflow\\.", "write": ".*", "read": ".*"})),
    )
    .await;
    let limited = format!("amqp://{user}:limited@127.0.0.1:5672/{vhost}");

    let conn = messaging::connect(&limited, ConnectionProperties::default())
        .await
        .unwrap();
    let refused = topology::declare(&conn).await.unwrap_err();
    assert!(refused.to_string().contains("ACCESS_REFUSED"), "{refused}");
    let _ = conn.close(200, "bye".into()).await;

    // The broker's administrator declares everything, the data platform's queue with it.
    let admin = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let conn = messaging::connect(&admin, ConnectionProperties::default())
        .await
        .unwrap();
    topology::declare(&conn).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;

    let conn = messaging::connect(&limited, ConnectionProperties::default())
        .await
        .unwrap();
    topology::declare(&conn).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    let queues = common::mgmt(Method::GET, &format!("/api/queues/{vhost}"), None).await;
    assert_eq!(queues.as_array().unwrap().len(), topology::QUEUES.len());

    common::mgmt(Method::DELETE, &format!("/api/vhosts/{vhost}"), None).await;
    common::mgmt(Method::DELETE, &format!("/api/users/{user}"), None).await;
}

/// A queue of an earlier release that this one no longer consumes (`orderflow.sales`, whose
/// worker counted popular products before the order worker did) is retired once nothing
/// consumes it: the work its stranded messages stood for is redone (the projection rebuilt from
/// the confirmed orders) and the queue deleted, so the audit's sales check is clean again.
#[tokio::test]
async fn a_retired_queue_is_drained_into_its_successor_once_its_consumers_are_gone() {
    use orderflow_workers::retired::{SALES_QUEUE, retire_all};
    let app = common::TestApp::spawn().await;
    let product = app.product("Counted", 100, 100).await;
    let mut orders = Vec::new();
    for user in 1..=3 {
        app.fund(user, 1_000).await;
        let id = app.order(user, &[(product, 2)], None).await;
        assert_eq!(
            app.wait_terminal(user, &id, std::time::Duration::from_secs(30)).await["status"],
            "CONFIRMED"
        );
        orders.push(id);
    }
    // The earlier release: its sales queue, bound to the events, with two confirmations its
    // sales worker never counted (and the projection without their units).
    let (conn, channel) = app.amqp().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(SALES_QUEUE.into(), durable, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            SALES_QUEUE.into(),
            topology::EVENTS_EXCHANGE.into(),
            "order.confirmed".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for id in &orders[..2] {
        app.publish_raw(
            "",
            SALES_QUEUE,
            format!(r#"{{"orderId":"{id}"}}"#).as_bytes(),
            "order.confirmed",
        )
        .await;
    }
    sqlx::query("UPDATE product_sales_hourly SET quantity = quantity - 4 WHERE product_id = $1")
        .bind(product)
        .execute(&app.pool)
        .await
        .unwrap();
    let sales_check = || async {
        let report = orderflow::audit::audit(
            &app.pool,
            None,
            &orderflow::audit::AuditArgs {
                skip_events: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        report.check("sales").unwrap().violation_count
    };
    assert_eq!(sales_check().await, 1);

    // While the earlier release's sales worker still consumes it, it is left alone.
    let consumer = channel
        .basic_consume(
            SALES_QUEUE.into(),
            "earlier-sales-worker".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(retire_all(&app.config.amqp_url, &app.pool).await.unwrap().is_empty());
    drop(consumer);
    channel
        .basic_cancel("earlier-sales-worker".into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;

    // Gone: the queue deleted, every confirmed unit counted once.
    assert_eq!(
        retire_all(&app.config.amqp_url, &app.pool).await.unwrap(),
        [SALES_QUEUE]
    );
    assert!(
        !orderflow_shared::messaging::stats::exists(
            &app.config.amqp_url,
            orderflow_shared::messaging::stats::Destination::Queue(SALES_QUEUE)
        )
        .await
        .unwrap()
    );
    assert_eq!(sales_check().await, 0);
    let units: i64 = sqlx::query_scalar("SELECT sum(quantity)::bigint FROM product_sales_hourly WHERE product_id = $1")
        .bind(product)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(units, 6);
    // And the next confirmation counts on top.
    app.fund(4, 1_000).await;
    let id = app.order(4, &[(product, 1)], None).await;
    app.wait_terminal(4, &id, std::time::Duration::from_secs(30)).await;
    assert_eq!(sales_check().await, 0);
    app.stop().await;
}

/// The rebuild behind a retired sales queue recounts past hours without holding back a
/// confirmation: only the last two hours are recounted under the projection's lock. Here the
/// past hours' part is held up (a row of an old bucket locked by the test) while an order goes
/// through; it is confirmed meanwhile, and the projection comes out exact, bucket by bucket.
#[tokio::test]
async fn rebuilding_past_hours_of_sales_holds_back_no_confirmation() {
    use orderflow_workers::retired::rebuild_sales;
    use std::time::Duration;
    let app = common::TestApp::spawn().await;
    let product = app.product("Counted", 100, 100).await;
    let mut orders = Vec::new();
    for (user, units) in [(1, 2), (2, 3)] {
        app.fund(user, 1_000).await;
        let id = app.order(user, &[(product, units)], None).await;
        assert_eq!(
            app.wait_terminal(user, &id, Duration::from_secs(30)).await["status"],
            "CONFIRMED"
        );
        orders.push(id);
    }
    // The first order was confirmed five hours ago (its units in that hour's bucket, which the
    // projection has wrong), the second this hour.
    sqlx::query(
        "UPDATE order_status_history SET at = at - interval '5 hours'
         WHERE order_id = $1::uuid AND to_status = 'CONFIRMED'",
    )
    .bind(&orders[0])
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
         SELECT $1, date_trunc('hour', at), 7 FROM order_status_history
         WHERE order_id = $2::uuid AND to_status = 'CONFIRMED'",
    )
    .bind(product)
    .bind(&orders[0])
    .execute(&app.pool)
    .await
    .unwrap();
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM product_sales_hourly WHERE bucket < now() - interval '4 hours' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let rebuild = tokio::spawn({
        let pool = app.pool.clone();
        async move { rebuild_sales(&pool).await }
    });
    app.wait_until(
        "the rebuild waits for the old bucket's row",
        Duration::from_secs(10),
        "EXISTS (SELECT 1 FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM product_sales_hourly%')",
    )
    .await;
    app.fund(3, 1_000).await;
    let third = app.order(3, &[(product, 4)], None).await;
    assert_eq!(
        app.wait_terminal(3, &third, Duration::from_secs(20)).await["status"],
        "CONFIRMED",
        "a confirmation waited on the rebuild"
    );
    holder.commit().await.unwrap();
    rebuild.await.unwrap().unwrap();
    // (The orders of this hour may straddle an hour's start: the last two hours together.)
    let (past, recent): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(quantity) FILTER (WHERE bucket < now() - interval '4 hours'), 0)::bigint,
                coalesce(sum(quantity) FILTER (WHERE bucket >= now() - interval '2 hours'), 0)::bigint
         FROM product_sales_hourly WHERE product_id = $1",
    )
    .bind(product)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((past, recent), (2, 7));
    app.stop().await;
}
