//! `orderflow audit` against a real pipeline: clean after real orders, and each kind of
//! corruption reported under the right check with the right entity id.

#![allow(clippy::unwrap_used)] // a failed call is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestApp;
use orderflow::audit::{self, AuditArgs, Check, Report};
use orderflow_shared::messaging::topology::{DATA_PLATFORM_QUEUE, DEAD_LETTER_QUEUE, WORK_EXCHANGE};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const CHECKS: [&str; 7] = ["stock", "balance", "coupons", "orders", "sales", "events", "liveness"];

async fn run_audit(app: &TestApp, opts: &AuditArgs) -> Report {
    audit::audit(&app.pool, Some(&app.config.amqp_url), opts).await.unwrap()
}

fn check<'a>(report: &'a Report, name: &str) -> &'a Check {
    report.check(name).unwrap_or_else(|| panic!("no check {name}"))
}

fn assert_clean(report: &Report) {
    assert!(report.clean, "{:#}", report.to_json());
    let names: Vec<_> = report.checks.iter().map(|c| c.name).collect();
    assert_eq!(names, CHECKS);
}

/// Asserts that only `name` failed, with a violation of `kind` whose `field` is `id`.
fn assert_only(report: &Report, name: &str, kind: &str, field: &str, id: Value) {
    assert!(!report.clean);
    for c in &report.checks {
        if c.name == name {
            assert!(
                c.of_kind(kind).any(|v| v[field] == id),
                "expected {kind} with {field} = {id} under {name}: {:#}",
                c.to_json()
            );
        } else {
            assert!(c.ok(), "only {name} should fail, but {} did: {:#}", c.name, c.to_json());
        }
    }
}

async fn exec(app: &TestApp, sql: &'static str) {
    sqlx::query(sql).execute(&app.pool).await.unwrap();
}

async fn issue(app: &TestApp, user: i64, coupon: i64) {
    let (status, body) = app
        .post(&format!("/api/coupons/{coupon}/issue"), &app.token(user), json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Orders that confirm (with and without a coupon) and cancel (out of stock, insufficient
/// balance after a coupon was applied), settled. Returns (widget, scarce, confirmed ids,
/// cancelled ids, coupon).
async fn settled_orders(app: &TestApp) -> (i64, i64, [String; 2], [String; 2], i64) {
    let widget = app.product("Widget", 1_000, 10).await;
    let scarce = app.product("Scarce", 2_000, 1).await;
    let coupon = app
        .coupon(json!({"name": "500 off", "discountType": "FIXED", "discountValue": 500, "quantity": 5}))
        .await;
    issue(app, 51, coupon).await;
    issue(app, 54, coupon).await;
    for (user, amount) in [(51, 10_000), (52, 10_000), (53, 10_000), (54, 1_000)] {
        app.fund(user, amount).await;
    }
    let with_coupon = app.order(51, &[(widget, 2)], Some(coupon)).await;
    let without = app.order(52, &[(widget, 1), (scarce, 1)], None).await;
    assert_eq!(app.wait_terminal(51, &with_coupon, WAIT).await["status"], "CONFIRMED");
    assert_eq!(app.wait_terminal(52, &without, WAIT).await["status"], "CONFIRMED");
    let out_of_stock = app.order(53, &[(scarce, 1)], None).await;
    let too_poor = app.order(54, &[(widget, 3)], Some(coupon)).await;
    assert_eq!(
        app.wait_terminal(53, &out_of_stock, WAIT).await["reason"],
        "OUT_OF_STOCK"
    );
    assert_eq!(
        app.wait_terminal(54, &too_poor, WAIT).await["reason"],
        "INSUFFICIENT_BALANCE"
    );
    app.wait_quiescent(WAIT).await;
    (widget, scarce, [with_coupon, without], [out_of_stock, too_poor], coupon)
}

async fn ready_messages(app: &TestApp, queue: &str) -> u32 {
    let (conn, channel) = app.amqp().await;
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

#[tokio::test]
async fn a_settled_pipeline_is_clean_and_each_corruption_is_reported_where_it_belongs() {
    let app = TestApp::spawn().await;
    let (widget, scarce, [o1, o2], [o3, _o4], coupon) = settled_orders(&app).await;
    let opts = AuditArgs::default();

    let report = run_audit(&app, &opts).await;
    assert_clean(&report);
    assert_eq!(report.counts["ordersByStatus"]["CONFIRMED"], 2, "{}", report.counts);
    assert_eq!(report.counts["ordersByStatus"]["CANCELLED"], 2);
    assert_eq!(report.counts["ordersByStatus"]["PENDING"], 0);
    assert_eq!(report.counts["products"], 2);
    assert_eq!(report.counts["dataPlatformMessages"], 2);
    let events = check(&report, "events");
    assert_eq!(
        (
            events.info["distinctEvents"].as_u64(),
            events.info["duplicateDeliveries"].as_u64()
        ),
        (Some(2), Some(0))
    );
    // Reading the data-platform queue gives every message back.
    let again = run_audit(&app, &opts).await;
    assert_clean(&again);
    assert_eq!(ready_messages(&app, DATA_PLATFORM_QUEUE).await, 2);

    // Stock that came from nowhere.
    sqlx::query("UPDATE products SET stock = stock + 1 WHERE id = $1")
        .bind(widget)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_only(
        &run_audit(&app, &opts).await,
        "stock",
        "stock_not_conserved",
        "productId",
        json!(widget),
    );
    sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = $1")
        .bind(widget)
        .execute(&app.pool)
        .await
        .unwrap();

    // A confirmed order whose units the popular-products projection never counted (as when
    // an upgrade strands a retired queue's messages), then one counted twice.
    sqlx::query("UPDATE product_sales_hourly SET quantity = quantity - 1 WHERE product_id = $1")
        .bind(widget)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_only(
        &run_audit(&app, &opts).await,
        "sales",
        "sales_not_counted_once",
        "productId",
        json!(widget),
    );
    sqlx::query("UPDATE product_sales_hourly SET quantity = quantity + 2 WHERE product_id = $1")
        .bind(widget)
        .execute(&app.pool)
        .await
        .unwrap();
    let report = run_audit(&app, &opts).await;
    let sales = check(&report, "sales");
    assert_eq!(
        sales.violations[0]["projected"].as_i64(),
        sales.violations[0]["confirmedUnits"].as_i64().map(|u| u + 1)
    );
    sqlx::query("UPDATE product_sales_hourly SET quantity = quantity - 1 WHERE product_id = $1")
        .bind(widget)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_clean(&run_audit(&app, &opts).await);

    // A payment that left no ledger row: the balance is no longer proven, and the
    // confirmed order has no PAYMENT.
    exec(
        &app,
        "CREATE TABLE saved_ledger AS SELECT * FROM balance_ledger WHERE kind = 'PAYMENT' AND user_id = 51",
    )
    .await;
    exec(
        &app,
        "DELETE FROM balance_ledger WHERE id IN (SELECT id FROM saved_ledger)",
    )
    .await;
    let report = run_audit(&app, &opts).await;
    assert_only(&report, "balance", "balance_differs_from_ledger", "userId", json!(51));
    assert_only(&report, "balance", "confirmed_payment_wrong", "orderId", json!(o1));
    exec(&app, "INSERT INTO balance_ledger SELECT * FROM saved_ledger").await;
    exec(&app, "DROP TABLE saved_ledger").await;

    // A coupon handed back while its order is still CONFIRMED and holds it.
    let (uc_id, order_id): (i64, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT id, order_id FROM user_coupons WHERE coupon_id = $1 AND user_id = 51")
            .bind(coupon)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(order_id.map(|u| u.to_string()), Some(o1.clone()));
    sqlx::query("UPDATE user_coupons SET status = 'AVAILABLE', order_id = NULL, used_at = NULL WHERE id = $1")
        .bind(uc_id)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_only(
        &run_audit(&app, &opts).await,
        "coupons",
        "held_but_not_used",
        "userCouponId",
        json!(uc_id),
    );
    sqlx::query("UPDATE user_coupons SET status = 'USED', order_id = $2::uuid, used_at = now() WHERE id = $1")
        .bind(uc_id)
        .bind(&o1)
        .execute(&app.pool)
        .await
        .unwrap();

    // A coupon counted as issued that no one has.
    sqlx::query("UPDATE coupons SET issued = issued + 1 WHERE id = $1")
        .bind(coupon)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_only(
        &run_audit(&app, &opts).await,
        "coupons",
        "issued_count_wrong",
        "couponId",
        json!(coupon),
    );
    sqlx::query("UPDATE coupons SET issued = issued - 1 WHERE id = $1")
        .bind(coupon)
        .execute(&app.pool)
        .await
        .unwrap();

    // A history step the state machine does not have, after CONFIRMED.
    let (bogus,): (i64,) = sqlx::query_as(
        "INSERT INTO order_status_history (order_id, from_status, to_status) VALUES ($1::uuid, 'CONFIRMED', 'PAID') RETURNING id",
    )
    .bind(&o2)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let report = run_audit(&app, &opts).await;
    assert_only(&report, "orders", "illegal_transition", "historyId", json!(bogus));
    assert_only(&report, "orders", "status_differs_from_history", "orderId", json!(o2));
    sqlx::query("DELETE FROM order_status_history WHERE id = $1")
        .bind(bogus)
        .execute(&app.pool)
        .await
        .unwrap();

    // A cancelled order that still claims its stock: reported by the orders check, and the
    // stock it claims no longer adds up.
    sqlx::query("UPDATE orders SET stock_held = true WHERE id = $1::uuid")
        .bind(&o3)
        .execute(&app.pool)
        .await
        .unwrap();
    let report = run_audit(&app, &opts).await;
    assert!(
        check(&report, "orders")
            .of_kind("cancelled_holds_something")
            .any(|v| v["orderId"] == json!(o3))
    );
    assert!(
        check(&report, "stock")
            .of_kind("stock_not_conserved")
            .any(|v| v["productId"] == json!(scarce))
    );
    sqlx::query("UPDATE orders SET stock_held = false WHERE id = $1::uuid")
        .bind(&o3)
        .execute(&app.pool)
        .await
        .unwrap();

    // An event that no longer says what the order says.
    sqlx::query("UPDATE order_items SET unit_price = unit_price + 1 WHERE order_id = $1::uuid")
        .bind(&o1)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_only(
        &run_audit(&app, &opts).await,
        "events",
        "event_differs_from_order",
        "orderId",
        json!(o1),
    );
    sqlx::query("UPDATE order_items SET unit_price = unit_price - 1 WHERE order_id = $1::uuid")
        .bind(&o1)
        .execute(&app.pool)
        .await
        .unwrap();

    // The data platform never got the events; then they are re-published (the same event
    // ids), once and then once more: a duplicate delivery is information, not a violation.
    assert_eq!(app.drain_queue(DATA_PLATFORM_QUEUE).await.len(), 2);
    let report = run_audit(&app, &opts).await;
    assert_only(&report, "events", "missing_event", "orderId", json!(o1));
    assert_only(&report, "events", "missing_event", "orderId", json!(o2));
    app.republish_outbox(&o1).await;
    app.republish_outbox(&o2).await;
    app.republish_outbox(&o2).await;
    // The re-published internal commands reach the workers, who recognise them.
    let report = wait_clean(&app, &opts).await;
    assert_eq!(check(&report, "events").info["duplicateDeliveries"], 1);
    assert_eq!(check(&report, "events").info["distinctEvents"], 2);

    // An event for an order that is not confirmed.
    sqlx::query("UPDATE orders SET status = 'CANCELLED' WHERE id = $1::uuid")
        .bind(&o2)
        .execute(&app.pool)
        .await
        .unwrap();
    let report = run_audit(&app, &opts).await;
    assert!(
        check(&report, "events")
            .of_kind("event_for_unconfirmed_order")
            .any(|v| v["orderId"] == json!(o2))
    );
    sqlx::query("UPDATE orders SET status = 'CONFIRMED' WHERE id = $1::uuid")
        .bind(&o2)
        .execute(&app.pool)
        .await
        .unwrap();

    assert_clean(&run_audit(&app, &opts).await);
    app.stop().await;
}

/// Audits until clean (work in flight settles), failing after `WAIT`.
async fn wait_clean(app: &TestApp, opts: &AuditArgs) -> Report {
    let deadline = Instant::now() + WAIT;
    loop {
        let report = run_audit(app, opts).await;
        if report.clean {
            return report;
        }
        assert!(Instant::now() < deadline, "never clean: {:#}", report.to_json());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn orders_in_flight_and_dead_letters_fail_liveness_unless_in_flight_is_allowed() {
    // No order worker: a paid order waits for confirmation. No recovery worker: nothing
    // records dead letters or cancels the order.
    use orderflow_workers::WorkerKind::*;
    let app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Stock, Coupon, Payment],
        order_timeout: Duration::from_secs(600),
        ..Default::default()
    })
    .await;
    let product = app.product("Waiting", 1_000, 5).await;
    app.fund(61, 10_000).await;
    let order = app.order(61, &[(product, 2)], None).await;
    app.wait_order_row(&order, WAIT, |o| o.status.as_str() == "PAID").await;
    app.publish_raw(WORK_EXCHANGE, "stock.reserve", b"{not json", "stock.reserve")
        .await;
    let deadline = Instant::now() + WAIT;
    while ready_messages(&app, DEAD_LETTER_QUEUE).await == 0 {
        assert!(Instant::now() < deadline, "the poison message was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let report = run_audit(&app, &AuditArgs::default()).await;
    let liveness = check(&report, "liveness");
    assert!(
        liveness
            .of_kind("order_not_terminal")
            .any(|v| v["orderId"] == json!(order) && v["status"] == "PAID")
    );
    assert!(
        liveness
            .of_kind("dead_letters_waiting")
            .any(|v| v["queue"] == DEAD_LETTER_QUEUE)
    );
    // The stock the paid order holds, its payment and its history all add up meanwhile.
    assert_only(&report, "liveness", "order_not_terminal", "orderId", json!(order));

    let in_flight = AuditArgs {
        allow_in_flight: true,
        ..AuditArgs::default()
    };
    let report = run_audit(&app, &in_flight).await;
    assert_clean(&report);
    assert!(check(&report, "liveness").skipped.is_some());
    assert_eq!(
        ready_messages(&app, DEAD_LETTER_QUEUE).await,
        1,
        "the audit only counts dead letters"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_skips_the_events_check_and_skip_events_is_honoured() {
    let app = TestApp::spawn().await;
    let product = app.product("Plain", 1_000, 5).await;
    app.fund(71, 10_000).await;
    let order = app.order(71, &[(product, 1)], None).await;
    app.wait_terminal(71, &order, WAIT).await;
    app.wait_quiescent(WAIT).await;

    let report = audit::audit(
        &app.pool,
        Some("amqp://guest:guest@127.0.0.1:1/%2f"),
        &AuditArgs::default(),
    )
    .await
    .unwrap();
    assert!(report.clean, "{:#}", report.to_json());
    let events = check(&report, "events");
    assert!(
        events.skipped.as_deref().is_some_and(|r| r.contains("unreachable")),
        "{:#}",
        events.to_json()
    );
    assert!(check(&report, "liveness").info.contains_key("deadLetterQueueSkipped"));

    // With the events gone, only --skip-events keeps the audit clean.
    app.drain_queue(DATA_PLATFORM_QUEUE).await;
    assert!(!run_audit(&app, &AuditArgs::default()).await.clean);
    let report = run_audit(
        &app,
        &AuditArgs {
            skip_events: true,
            ..AuditArgs::default()
        },
    )
    .await;
    assert_clean(&report);
    assert_eq!(check(&report, "events").skipped.as_deref(), Some("--skip-events"));
    app.stop().await;
}

#[tokio::test]
async fn the_binary_exits_0_when_clean_and_1_with_the_violations_listed() {
    let app = TestApp::spawn().await;
    let product = app.product("Binary", 1_000, 5).await;
    app.fund(81, 10_000).await;
    let order = app.order(81, &[(product, 2)], None).await;
    app.wait_terminal(81, &order, WAIT).await;
    app.wait_quiescent(WAIT).await;

    let run = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .arg("audit")
            .env("DATABASE_URL", &app.config.database_url)
            .env("AMQP_URL", &app.config.amqp_url)
            .env_remove("RUST_LOG")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}): {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), report)
    };
    let (code, report) = run().await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["clean"], true);
    assert_eq!(report["checks"].as_array().unwrap().len(), CHECKS.len());
    assert!(report["checkedAt"].is_string());

    sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = $1")
        .bind(product)
        .execute(&app.pool)
        .await
        .unwrap();
    let (code, report) = run().await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["clean"], false);
    let stock = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "stock")
        .unwrap();
    assert_eq!(
        (stock["ok"].as_bool(), stock["violationCount"].as_u64()),
        (Some(false), Some(1))
    );
    assert_eq!(stock["violations"][0]["productId"], product);
    assert_eq!(stock["violations"][0]["expected"], 3);
    assert_eq!(stock["violations"][0]["stock"], 2);
    app.stop().await;
}

#[tokio::test]
async fn a_busy_pipeline_with_two_instances_of_every_worker_audits_clean() {
    // 80 users race for 30 units with 20 coupons; a quarter cannot pay. Audited once while
    // orders are in flight (allowed) and once at rest.
    let app = TestApp::spawn_with(common::Options {
        instances: 2,
        ..Default::default()
    })
    .await;
    let product = app.product("Hot", 2_000, 30).await;
    let coupon = app
        .coupon(json!({"name": "10%", "discountType": "PERCENT", "discountValue": 10, "quantity": 20}))
        .await;
    let users: Vec<i64> = (2001..=2080).collect();
    for &user in &users {
        if user % 4 != 0 {
            app.fund(user, 10_000).await;
        }
        if user <= 2020 {
            issue(&app, user, coupon).await;
        }
    }
    let mut placing = tokio::task::JoinSet::new();
    for &user in &users {
        let (http, url, token) = (app.http.clone(), app.url("/api/orders"), app.token(user));
        let coupon = (user <= 2020).then_some(coupon);
        placing.spawn(async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", format!("busy-{user}"))
                .json(&json!({"items": [{"productId": product, "quantity": 1}], "couponId": coupon}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202);
        });
    }
    let in_flight = run_audit(
        &app,
        &AuditArgs {
            allow_in_flight: true,
            ..AuditArgs::default()
        },
    )
    .await;
    while placing.join_next().await.is_some() {}
    assert!(in_flight.clean, "{:#}", in_flight.to_json());
    app.wait_quiescent(Duration::from_secs(60)).await;

    let report = run_audit(&app, &AuditArgs::default()).await;
    assert_clean(&report);
    let confirmed = report.counts["ordersByStatus"]["CONFIRMED"].as_i64().unwrap();
    assert_eq!(
        confirmed + report.counts["ordersByStatus"]["CANCELLED"].as_i64().unwrap(),
        80
    );
    assert!(confirmed > 0 && confirmed <= 30, "{}", report.counts);
    assert_eq!(check(&report, "events").info["distinctEvents"], confirmed);
    app.stop().await;
}

#[tokio::test]
async fn a_paid_order_cancelled_by_its_deadline_audits_clean() {
    // The timeout path: PAID, then CANCELLING with a refund, the coupon and the stock given
    // back; the late confirm is refused once the order worker starts.
    use orderflow_workers::WorkerKind::*;
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Stock, Coupon, Payment, Recovery],
        order_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let product = app.product("Slow", 5_000, 3).await;
    let coupon = app
        .coupon(json!({"name": "10%", "discountType": "PERCENT", "discountValue": 10, "quantity": 1}))
        .await;
    issue(&app, 91, coupon).await;
    app.fund(91, 20_000).await;
    let id = app.order(91, &[(product, 2)], Some(coupon)).await;
    app.wait_order_row(&id, WAIT, |o| {
        o.status.as_str() == "CANCELLING" && !o.stock_held && !o.coupon_held && o.paid_amount == 0
    })
    .await;
    app.spawn_workers(&[Order]).await;
    assert_eq!(app.wait_terminal(91, &id, WAIT).await["reason"], "TIMEOUT");
    app.wait_quiescent(WAIT).await;

    let report = wait_clean(&app, &AuditArgs::default()).await;
    assert_eq!(report.counts["ordersByStatus"]["CANCELLED"], 1);
    assert_eq!(report.counts["ledgerEntries"], 3, "charge, payment, refund");
    app.stop().await;
}
