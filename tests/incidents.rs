//! Operators in an incident: failure groups and bulk actions, against the real PostgreSQL and
//! RabbitMQ.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Options, TestApp};
use orderflow_workers::WorkerKind;
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn wait_count(app: &TestApp, sql: &str, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = count(app, sql).await;
        if got == n {
            return;
        }
        if Instant::now() >= deadline {
            let states: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY 1")
                .fetch_all(&app.pool)
                .await
                .unwrap();
            panic!("{sql}: {got}, expected {n}; orders: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bulk(app: &TestApp, body: Value) -> (u16, Value) {
    let (status, json) = app
        .call(
            Method::POST,
            "/api/admin/bulk-actions",
            Some(&app.admin_token()),
            Some(body),
        )
        .await;
    (status.as_u16(), json)
}

/// Starts a bulk action and waits until it is no longer RUNNING.
async fn run_bulk(app: &TestApp, body: Value) -> Value {
    let (status, started) = bulk(app, body).await;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_i64().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, action) = app
            .get(&format!("/api/admin/bulk-actions/{id}"), &app.admin_token())
            .await;
        assert_eq!(status, 200, "{action}");
        if action["state"] != "RUNNING" {
            return action;
        }
        assert!(Instant::now() < deadline, "bulk action {id} still running: {action}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn dead_letters_are_grouped_by_cause_and_a_group_replay_settles_every_parked_order() {
    let app = TestApp::spawn().await;
    // A product per order: a release the stock step batched with a reservation of the same
    // product would net to no change of stock and slip past the trigger.
    let mut vases = Vec::new();
    for n in 0..24 {
        vases.push(app.product(&format!("Fragile vase {n}"), 10_000, 10).await);
    }
    // Too little money: payment fails, so each order's stock must be released, and that fails.
    let mut ids = Vec::new();
    app.break_stock("Fragile vase%", ">").await;
    for (user, vase) in (100..).zip(&vases) {
        app.fund(user, 1_000).await;
        ids.push((user, app.order(user, &[(*vase, 1)], None).await));
    }
    // A second cause: bodies no worker can read.
    for _ in 0..3 {
        app.publish_raw("orderflow.work", "stock.reserve", b"{not json", "stock.reserve")
            .await;
    }
    let orders = ids.len() as i64;
    wait_count(
        &app,
        "SELECT count(*) FROM orders WHERE status = 'COMPENSATION_FAILED'",
        orders,
    )
    .await;
    wait_count(&app, "SELECT count(*) FROM dead_letters", orders + 3).await;
    let held: i64 = count(
        &app,
        "SELECT sum(stock)::int8 FROM products WHERE name LIKE 'Fragile vase%'",
    )
    .await;
    assert_eq!(held, 10 * orders - orders, "the releases failed: stock still held");

    let admin = app.admin_token();
    let (status, groups) = app.get("/api/admin/failure-groups", &admin).await;
    assert_eq!(status, 200, "{groups}");
    assert_eq!(groups["total"], 2, "{groups}");
    let items = groups["items"].as_array().unwrap();
    let release = items.iter().find(|g| g["messageType"] == "stock.release").unwrap();
    assert_eq!(release["queue"], "orderflow.stock");
    assert_eq!(release["reason"], "delivery_limit");
    assert_eq!(
        (release["count"].as_i64(), release["new"].as_i64()),
        (Some(orders), Some(orders))
    );
    assert_eq!(release["orders"], orders);
    assert_eq!(release["sampleOrders"].as_array().unwrap().len(), 5);
    assert_eq!(release["sample"]["status"], "NEW");
    // One cause, whatever the product id and the stock numbers in each error.
    let kind = release["errorKind"].as_str().unwrap();
    assert!(kind.contains("product # is misconfigured (stock # -> #)"), "{kind}");
    assert_eq!(release["sample"]["failureGroup"], release["id"]);
    assert!(
        release["sample"]["error"]
            .as_str()
            .unwrap()
            .contains("is misconfigured")
    );
    let poison = items.iter().find(|g| g["reason"] == "rejected").unwrap();
    assert_eq!(
        (poison["count"].as_i64(), poison["orders"].as_i64()),
        (Some(3), Some(0))
    );
    let group = release["id"].as_str().unwrap().to_owned();
    let (_, letters) = app
        .get(&format!("/api/admin/dead-letters?group={group}&size=100"), &admin)
        .await;
    assert_eq!(letters["total"], orders);

    // A dry run says what would happen and changes nothing.
    let (status, dry) = bulk(
        &app,
        json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"group": group}, "dryRun": true}),
    )
    .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(
        (dry["matching"].as_i64(), dry["orders"].as_i64()),
        (Some(orders), Some(orders))
    );
    assert_eq!(dry["notReplayable"], 0);
    let (status, dry) = bulk(
        &app,
        json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"group": poison["id"]}, "dryRun": true}),
    )
    .await;
    assert_eq!((status, dry["notReplayable"].as_i64()), (200, Some(3)), "{dry}");
    assert_eq!(count(&app, "SELECT count(*) FROM bulk_actions").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM dead_letters WHERE status = 'NEW'").await,
        orders + 3
    );

    // The cause is fixed; the group is replayed in chunks of 5.
    app.heal_stock().await;
    let done = run_bulk(
        &app,
        json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"group": group}, "chunkSize": 5, "pauseMs": 0}),
    )
    .await;
    assert_eq!(done["state"], "DONE", "{done}");
    assert_eq!(
        (done["total"].as_i64(), done["done"].as_i64(), done["skipped"].as_i64()),
        (Some(orders), Some(orders), Some(0))
    );
    let by = done["requestedBy"].as_str().unwrap().to_owned();
    assert!(by.starts_with("admin:"), "{by}");
    for (user, id) in &ids {
        let order = app.wait_terminal(*user, id, WAIT).await;
        assert_eq!(
            (order["status"].as_str(), order["reason"].as_str()),
            (Some("CANCELLED"), Some("INSUFFICIENT_BALANCE")),
            "{order}"
        );
    }
    let back: i64 = count(
        &app,
        "SELECT sum(stock)::int8 FROM products WHERE name LIKE 'Fragile vase%'",
    )
    .await;
    assert_eq!(back, 10 * orders, "every release applied once");
    // Each letter replayed once, by the action, on the record.
    let action_id = done["id"].as_i64().unwrap();
    assert_eq!(
        count(
            &app,
            &format!(
                "SELECT count(*) FROM dead_letters WHERE status = 'REPLAYED' AND bulk_action_id = {action_id}
             AND resolved_by = '{by} (bulk action {action_id})'"
            )
        )
        .await,
        orders
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM (SELECT headers->>'x-orderflow-replay-of' AS letter FROM outbox
                      WHERE headers ? 'x-orderflow-replay-of' GROUP BY 1 HAVING count(*) = 1) AS once"
        )
        .await,
        orders
    );
    // The action's audit: each letter, replayed.
    let (_, audit) = app
        .get(&format!("/api/admin/bulk-actions/{action_id}/items?size=100"), &admin)
        .await;
    assert_eq!(audit["total"], orders, "{audit}");
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["outcome"] == "DONE" && i["detail"] == "REPLAYED"),
        "{audit}"
    );
    // Replaying the group again finds nothing left to replay.
    let again = run_bulk(
        &app,
        json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"group": group}}),
    )
    .await;
    assert_eq!(
        (again["state"].as_str(), again["total"].as_i64(), again["done"].as_i64()),
        (Some("DONE"), Some(0), Some(0))
    );

    // The unreadable ones are discarded (kept, for the record).
    let discarded = run_bulk(
        &app,
        json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"group": poison["id"]}}),
    )
    .await;
    assert_eq!(discarded["done"], 3, "{discarded}");
    assert_eq!(
        count(&app, "SELECT count(*) FROM dead_letters WHERE status = 'DISCARDED'").await,
        3
    );
    let (_, groups) = app.get("/api/admin/failure-groups", &admin).await;
    assert_eq!(groups["total"], 0, "nothing NEW is left: {groups}");
    let (_, all) = app.get("/api/admin/failure-groups?status=ALL", &admin).await;
    let replayed = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == group.as_str())
        .unwrap();
    assert_eq!(
        (replayed["replayed"].as_i64(), replayed["new"].as_i64()),
        (Some(orders), Some(0))
    );
    app.stop().await;
}

#[tokio::test]
async fn stuck_orders_are_cancelled_by_filter_and_bad_requests_change_nothing() {
    // No stock worker: orders wait in PENDING.
    let app = TestApp::spawn_with(Options {
        workers: WorkerKind::ALL
            .iter()
            .copied()
            .filter(|k| *k != WorkerKind::Stock)
            .collect(),
        ..Default::default()
    })
    .await;
    let product = app.product("Waiting", 1_000, 50).await;
    app.fund(7, 50_000).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(app.order(7, &[(product, 1)], None).await);
    }
    let admin = app.admin_token();

    // Refused, and nothing created: a filter the action does not take, a cancel without
    // olderThan, a status it cannot move, bad sizes, bad times, unknown fields, non-admins.
    for (body, status, code) in [
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1s", "queue": "x"}}),
            422,
            "INVALID_FILTER",
        ),
        (json!({"action": "CANCEL_ORDERS", "filter": {}}), 422, "INVALID_FILTER"),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1s", "status": "CONFIRMED"}}),
            422,
            "INVALID_STATUS",
        ),
        (
            json!({"action": "RETRY_COMPENSATIONS", "filter": {"status": "PAID"}}),
            422,
            "INVALID_STATUS",
        ),
        (
            json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"olderThan": "1s"}}),
            422,
            "INVALID_FILTER",
        ),
        (
            json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"from": "yesterday"}}),
            400,
            "INVALID_TIME",
        ),
        (
            json!({"action": "REPLAY_DEAD_LETTERS", "filter": {"group": "not-a-group"}}),
            400,
            "INVALID_GROUP",
        ),
        (
            json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"queue": "a\u{0}b"}}),
            400,
            "INVALID_FILTER",
        ),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "8d"}}),
            400,
            "INVALID_DURATION",
        ),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1s"}, "chunkSize": 0}),
            400,
            "INVALID_CHUNK_SIZE",
        ),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1s"}, "pauseMs": -1}),
            400,
            "INVALID_PAUSE",
        ),
        (json!({"action": "EXPLODE"}), 400, "INVALID_BODY"),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1s"}, "extra": 1}),
            400,
            "INVALID_BODY",
        ),
    ] {
        let (got, problem) = bulk(&app, body.clone()).await;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{body}: {problem}"
        );
    }
    let (status, _) = app
        .call(
            Method::POST,
            "/api/admin/bulk-actions",
            Some(&app.token(7)),
            Some(json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "0s"}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, problem) = app.get("/api/admin/dead-letters?group=%00", &admin).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (400, Some("INVALID_GROUP"))
    );
    assert_eq!(count(&app, "SELECT count(*) FROM bulk_actions").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await,
        12
    );

    let (status, dry) = bulk(
        &app,
        json!({"action": "CANCEL_ORDERS", "filter": {"status": "PENDING", "olderThan": "0s"}, "dryRun": true}),
    )
    .await;
    assert_eq!((status, dry["matching"].as_i64()), (200, Some(12)), "{dry}");
    assert_eq!(dry["sample"].as_array().unwrap().len(), 10);
    // Orders changed within the last hour are not "stuck for an hour".
    let (_, none) = bulk(
        &app,
        json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "60m"}, "dryRun": true}),
    )
    .await;
    assert_eq!(none["matching"], 0, "{none}");

    let done = run_bulk(
        &app,
        json!({"action": "CANCEL_ORDERS", "filter": {"status": "PENDING", "olderThan": "0s"}, "chunkSize": 5}),
    )
    .await;
    assert_eq!(
        (done["state"].as_str(), done["total"].as_i64(), done["done"].as_i64()),
        (Some("DONE"), Some(12), Some(12)),
        "{done}"
    );
    for id in &ids {
        let order = app.wait_terminal(7, id, WAIT).await;
        assert_eq!(
            (order["status"].as_str(), order["reason"].as_str()),
            (Some("CANCELLED"), Some("ADMIN_CANCELLED"))
        );
    }
    assert_eq!(app.stock(product).await, 50);
    assert_eq!(app.balance(7).await, 50_000);

    let id = done["id"].as_i64().unwrap();
    let (_, audit) = app.get(&format!("/api/admin/bulk-actions/{id}/items"), &admin).await;
    let mut audited: Vec<String> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(
                (i["outcome"].as_str(), i["detail"].as_str()),
                (Some("DONE"), Some("CANCELLED"))
            );
            i["item"].as_str().unwrap().to_owned()
        })
        .collect();
    audited.sort();
    let mut placed = ids.clone();
    placed.sort();
    assert_eq!(audited, placed, "the audit names every order cancelled");
    let (status, _) = app.get("/api/admin/bulk-actions/999999/items", &admin).await;
    assert_eq!(status.as_u16(), 404);
    let (status, problem) = app
        .call(
            Method::POST,
            &format!("/api/admin/bulk-actions/{id}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("BULK_ACTION_NOT_RUNNING"))
    );
    let (status, problem) = app.get("/api/admin/bulk-actions/999999", &admin).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("BULK_ACTION_NOT_FOUND"))
    );
    let (status, page) = app.get("/api/admin/bulk-actions", &admin).await;
    assert_eq!((status.as_u16(), page["total"].as_i64()), (200, Some(1)));
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_bulk_action_stops_before_its_next_chunk() {
    let app = TestApp::spawn_with(Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let product = app.product("Slow", 1_000, 50).await;
    app.fund(3, 50_000).await;
    for _ in 0..6 {
        app.order(3, &[(product, 1)], None).await;
    }
    // One order per chunk and a long pause: cancelled during the first pause.
    let (status, started) = bulk(
        &app,
        json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "0s"}, "chunkSize": 1, "pauseMs": 10000}),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_i64().unwrap();
    wait_count(&app, &format!("SELECT done FROM bulk_actions WHERE id = {id}"), 1).await;
    let (status, cancelled) = app
        .call(
            Method::POST,
            &format!("/api/admin/bulk-actions/{id}/cancel"),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), cancelled["state"].as_str()),
        (200, Some("CANCELLED")),
        "{cancelled}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'CANCELLED'").await,
        1
    );
    assert_eq!(
        count(&app, &format!("SELECT done FROM bulk_actions WHERE id = {id}")).await,
        1
    );
    app.stop().await;
}

#[tokio::test]
async fn parked_outbox_rows_are_grouped_and_retried_or_discarded_by_group() {
    let app = TestApp::spawn_with(Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    // Rows the relay set aside: three the broker refused for a missing exchange, two it nacked.
    let park = |exchange: &str, error: &str, n: usize| {
        format!(
            "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body, attempts, last_error, parked_at)
             SELECT gen_random_uuid(), '{exchange}', 'stock.reserve', 'stock.reserve', '{{}}', 5, '{error}', now()
             FROM generate_series(1, {n})"
        )
    };
    for (exchange, error, n) in [
        (
            "orderflow.gone",
            "NOT_FOUND - no exchange ''orderflow.gone'' in vhost ''v1''",
            3,
        ),
        ("orderflow.busy", "nacked by the broker after 12 attempts", 2),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(park(exchange, error, n)))
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let admin = app.admin_token();
    let (status, groups) = app.get("/api/admin/failure-groups", &admin).await;
    assert_eq!((status.as_u16(), groups["total"].as_i64()), (200, Some(2)), "{groups}");
    let gone = groups["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["queue"] == "outbox:orderflow.gone/stock.reserve")
        .unwrap()
        .clone();
    assert_eq!(
        (gone["source"].as_str(), gone["reason"].as_str(), gone["count"].as_i64()),
        (Some("PARKED"), Some("parked"), Some(3)),
        "{gone}"
    );
    assert_eq!(
        gone["errorKind"],
        "NOT_FOUND - no exchange 'orderflow.gone' in vhost 'v#'"
    );
    // Parked rows take no dead-letter fields.
    let (status, problem) = bulk(
        &app,
        json!({"action": "RETRY_PARKED", "filter": {"group": gone["id"], "queue": "x"}}),
    )
    .await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("INVALID_FILTER")));
    let (status, dry) = bulk(
        &app,
        json!({"action": "DISCARD_PARKED", "filter": {"group": gone["id"]}, "dryRun": true}),
    )
    .await;
    assert_eq!((status, dry["matching"].as_i64()), (200, Some(3)), "{dry}");

    let discarded = run_bulk(
        &app,
        json!({"action": "DISCARD_PARKED", "filter": {"group": gone["id"]}}),
    )
    .await;
    assert_eq!(
        (discarded["state"].as_str(), discarded["done"].as_i64()),
        (Some("DONE"), Some(3))
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE exchange = 'orderflow.gone' AND discarded_at IS NOT NULL"
        )
        .await,
        3
    );
    let busy = groups["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["queue"] == "outbox:orderflow.busy/stock.reserve")
        .unwrap()
        .clone();
    let retried = run_bulk(&app, json!({"action": "RETRY_PARKED", "filter": {"group": busy["id"]}})).await;
    assert_eq!(
        (retried["state"].as_str(), retried["done"].as_i64()),
        (Some("DONE"), Some(2))
    );
    let id = retried["id"].as_i64().unwrap();
    let (_, audit) = app.get(&format!("/api/admin/bulk-actions/{id}/items"), &admin).await;
    assert_eq!(audit["total"], 2);
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["detail"] == "RETRIED")
    );
    // Given back to the relay (none runs here): unparked, attempts reset, not yet sent.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE exchange = 'orderflow.busy'
             AND parked_at IS NULL AND attempts = 0 AND sent_at IS NULL"
        )
        .await,
        2
    );
    let (_, groups) = app.get("/api/admin/failure-groups", &admin).await;
    assert_eq!(groups["total"], 0, "{groups}");
    app.stop().await;
}

#[tokio::test]
async fn a_bulk_action_is_refused_when_more_match_than_the_operator_confirmed() {
    // No stock worker: accepted orders stay PENDING.
    let app = TestApp::spawn_with(Options {
        workers: vec![WorkerKind::Relay],
        ..Default::default()
    })
    .await;
    let product = app.product("Backlog", 1_000, 10).await;
    for _ in 0..2 {
        app.order(61, &[(product, 1)], None).await;
    }
    let cancel = json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "0s"}});
    let mut dry = cancel.clone();
    dry["dryRun"] = json!(true);
    let (status, shown) = bulk(&app, dry).await;
    assert_eq!((status, shown["matching"].as_i64()), (200, Some(2)), "{shown}");

    // The backlog grows while the operator reads the dialog.
    app.order(61, &[(product, 1)], None).await;
    let mut confirmed = cancel.clone();
    confirmed["expectedMatching"] = shown["matching"].clone();
    let (status, problem) = bulk(&app, confirmed).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("BULK_ACTION_CHANGED")),
        "{problem}"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await,
        3
    );
    assert_eq!(count(&app, "SELECT count(*) FROM bulk_actions").await, 0);

    // As the dashboard confirms: the dry run's own cut-off, so the orders shown and no others.
    let confirmed = json!({"action": "CANCEL_ORDERS", "expectedMatching": 2,
                           "filter": {"updatedBefore": shown["filter"]["updatedBefore"]}});
    let action = run_bulk(&app, confirmed).await;
    assert_eq!(
        (action["state"].as_str(), action["done"].as_i64()),
        (Some("DONE"), Some(2)),
        "{action}"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'CANCELLED'").await,
        2
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await,
        1
    );
    let negative = json!({"action": "CANCEL_ORDERS", "expectedMatching": -1, "filter": {"olderThan": "0s"}});
    let (status, problem) = bulk(&app, negative).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("INVALID_EXPECTED_MATCHING")),
        "{problem}"
    );
    let both = json!({"action": "CANCEL_ORDERS",
                      "filter": {"updatedBefore": shown["filter"]["updatedBefore"], "olderThan": "1s"}});
    let (status, problem) = bulk(&app, both).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("INVALID_FILTER")),
        "{problem}"
    );
    // A cut-off ahead of the clock (a local time written as UTC) would take orders placed while
    // the action runs: refused, nothing started, the pending order left alone.
    let ahead = (chrono::Utc::now() + chrono::TimeDelta::hours(9)).to_rfc3339();
    for action in ["CANCEL_ORDERS", "RETRY_COMPENSATIONS"] {
        let (status, problem) = bulk(&app, json!({"action": action, "filter": {"updatedBefore": ahead}})).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (422, Some("INVALID_FILTER")),
            "{action}: {problem}"
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM bulk_actions").await, 1);
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await,
        1
    );
    app.stop().await;
}

#[tokio::test]
async fn at_most_four_bulk_actions_run_at_once() {
    let app = TestApp::api_only().await;
    sqlx::raw_sql(
        "INSERT INTO dead_letters (fingerprint, message_type, source_queue, reason, body)
         SELECT gen_random_uuid(), 'stock.reserve', 'orderflow.stock', 'rejected', '{}' FROM generate_series(1, 20)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // One letter per chunk, ten seconds between chunks: each stays RUNNING a while.
    let slow = json!({"action": "DISCARD_DEAD_LETTERS", "chunkSize": 1, "pauseMs": 10000});
    let mut ids = Vec::new();
    for _ in 0..orderflow_shared::db::bulk::MAX_RUNNING {
        let (status, started) = bulk(&app, slow.clone()).await;
        assert_eq!(status, 202, "{started}");
        ids.push(started["id"].as_i64().unwrap());
    }
    let (status, problem) = bulk(&app, slow.clone()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("BULK_ACTIONS_BUSY")),
        "{problem}"
    );
    assert_eq!(count(&app, "SELECT count(*) FROM bulk_actions").await, 4);

    // One ends: there is room again.
    let (status, cancelled) = app
        .call(
            Method::POST,
            &format!("/api/admin/bulk-actions/{}/cancel", ids[0]),
            Some(&app.admin_token()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{cancelled}");
    let (status, started) = bulk(&app, slow).await;
    assert_eq!(status, 202, "{started}");
    app.stop().await;
}

#[tokio::test]
async fn a_page_of_a_large_actions_items_is_read_in_order_not_sorted() {
    let app = TestApp::api_only().await;
    sqlx::raw_sql(
        "INSERT INTO bulk_actions (id, action, filter, state, chunk_size, pause_ms, total, requested_by, finished_at)
         VALUES (1, 'DISCARD_DEAD_LETTERS', '{\"kind\": \"messages\"}', 'DONE', 100, 0, 20000, 'admin:test', now());
         INSERT INTO bulk_action_items (bulk_action_id, item, outcome, detail, at)
         SELECT 1, g::text, 'DONE', 'DISCARDED', now() - (20000 - g) * interval '1 millisecond'
           FROM generate_series(1, 20000) g;
         ANALYZE bulk_action_items;",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, page) = app
        .get("/api/admin/bulk-actions/1/items?page=2&size=3", &app.admin_token())
        .await;
    assert_eq!(status, 200, "{page}");
    let items: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"].as_str().unwrap())
        .collect();
    assert_eq!(
        (items, page["total"].as_i64()),
        (vec!["7", "8", "9"], Some(20000)),
        "{page}"
    );

    let statement = orderflow_shared::db::bulk::ITEMS_PAGE;
    for (mode, plan) in app.plans(statement, "int8, int8, int8", "1, 50, 100").await {
        assert!(
            !plan.contains("Sort") && plan.contains("bulk_action_items_order_idx"),
            "{mode}:\n{plan}"
        );
    }
    app.stop().await;
}

/// A failure group that grows while the operator reads the dry run (a bad producer still
/// sending) can still be acted on: the dry run answers with the last letter it counted
/// (`filter.throughId`), and the action confirmed with it covers those letters and no others.
/// Without it the count has grown by the time of the confirmation, every time.
#[tokio::test]
async fn a_growing_failure_group_is_acted_on_as_far_as_the_dry_run_saw() {
    let app = TestApp::api_only().await;
    let letter = "INSERT INTO dead_letters (fingerprint, message_type, source_queue, reason, body)
                  SELECT gen_random_uuid(), 'stock.reserve', 'orderflow.stock', 'rejected', '{}'
                  FROM generate_series(1, $1)";
    let record = |n: i32| {
        let pool = app.pool.clone();
        async move { sqlx::query(letter).bind(n).execute(&pool).await.unwrap() }
    };
    record(3).await;
    let (status, groups) = app.get("/api/admin/failure-groups", &app.admin_token()).await;
    assert_eq!((status.as_u16(), groups["total"].as_i64()), (200, Some(1)), "{groups}");
    let group = groups["items"][0]["id"].clone();
    let (status, dry) = bulk(
        &app,
        json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"group": group}, "dryRun": true}),
    )
    .await;
    assert_eq!((status, dry["matching"].as_i64()), (200, Some(3)), "{dry}");
    let through = dry["filter"]["throughId"].clone();
    assert!(through.is_i64(), "{dry}");

    // A fourth letter of the same cause while the dialog is open.
    record(1).await;
    let (status, problem) = bulk(
        &app,
        json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"group": group}, "expectedMatching": 3}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("BULK_ACTION_CHANGED")),
        "{problem}"
    );
    let done = run_bulk(
        &app,
        json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"group": group, "throughId": through},
               "expectedMatching": 3, "pauseMs": 0}),
    )
    .await;
    assert_eq!(
        (done["state"].as_str(), done["total"].as_i64(), done["done"].as_i64()),
        (Some("DONE"), Some(3), Some(3)),
        "{done}"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM dead_letters WHERE status = 'DISCARDED'").await,
        3
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM dead_letters WHERE status = 'NEW'").await,
        1
    );

    // A negative id, or one on an order action, is refused.
    for (body, expected) in [
        (
            json!({"action": "DISCARD_DEAD_LETTERS", "filter": {"throughId": -1}}),
            400,
        ),
        (
            json!({"action": "CANCEL_ORDERS", "filter": {"olderThan": "1m", "throughId": 5}}),
            422,
        ),
    ] {
        let (status, problem) = bulk(&app, body).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (expected, Some("INVALID_FILTER")),
            "{problem}"
        );
    }
    app.stop().await;
}
