//! `orderflow bench` end to end: a tiny run against the real system must account for every
//! order, and its baseline and coupon rush must add up too; the report's rates, ratios, CPU and
//! wait figures must be present and consistent. Timings are not asserted.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use clap::Parser;
use common::TestApp;
use orderflow_bench::{BenchArgs, Outcome, execute};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(app: &TestApp, extra: &[&str]) -> BenchArgs {
    let base = [
        "bench",
        "--api",
        app.base.as_str(),
        "--timeout",
        "60s",
        "--database-url",
        app.config.database_url.as_str(),
        "--jwt-secret",
        app.config.jwt_secret().0,
    ];
    Cli::try_parse_from(base.iter().chain(extra))
        .expect("valid bench arguments")
        .args
}

/// A CPU report (JSON) divides by `orders` of kind `per`, and every figure in it that could be
/// read is a non-negative number.
fn assert_cpu(cpu: &Value, orders: u64, per: &str) {
    if cpu.is_null() {
        return; // no /proc here
    }
    assert_eq!(cpu["orders"].as_u64(), Some(orders), "{cpu}");
    assert_eq!(cpu["per"], per, "{cpu}");
    assert!(cpu["seconds"].as_f64().unwrap() >= 0.0, "{cpu}");
    for k in ["postgres", "rabbitmq", "orderflow", "bench", "machine"] {
        let v = &cpu["core_ms_per_order"][k];
        assert!(v.is_null() || v.as_f64().unwrap() >= 0.0, "{k} in {cpu}");
    }
    // The bench can always read itself, and the machine.
    assert!(cpu["core_ms_per_order"]["bench"].is_number(), "{cpu}");
    assert!(cpu["core_ms_per_order"]["machine"].is_number(), "{cpu}");
    for k in ["postgres", "rabbitmq", "orderflow", "bench", "machine"] {
        let v = &cpu["switches_per_order"][k];
        assert!(v.is_null() || v.as_f64().unwrap() >= 0.0, "{k} in {cpu}");
    }
    // Whatever ran an order woke threads: the bench's own (it is the system in these tests)
    // and the machine's.
    assert!(cpu["switches_per_order"]["bench"].as_f64().unwrap() > 0.0, "{cpu}");
    assert!(cpu["switches_per_order"]["machine"].as_f64().unwrap() > 0.0, "{cpu}");
    // Null only when not one clock tick passed.
    let busy = &cpu["machine_busy_pct"];
    assert!(
        busy.is_null() || (0.0..=100.0).contains(&busy.as_f64().unwrap()),
        "{cpu}"
    );
}

/// A wait report (JSON): per `orders` of kind `per`, non-negative, its totals matching its
/// events.
fn assert_waits(waits: &Value, orders: u64, per: &str) {
    assert_eq!(waits["orders"].as_u64(), Some(orders), "{waits}");
    assert_eq!(waits["per"], per, "{waits}");
    assert_eq!(waits["interval_ms"].as_f64(), Some(50.0), "{waits}");
    let lock = waits["lock_ms_per_order"].as_f64().unwrap();
    let lwlock = waits["lwlock_ms_per_order"].as_f64().unwrap();
    assert!(lock >= 0.0 && lwlock >= 0.0, "{waits}");
    let events = waits["by_event_ms_per_order"].as_object().unwrap();
    let of = |ty: &str| -> f64 {
        events
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ty}:")))
            .map(|(_, v)| v.as_f64().unwrap())
            .sum()
    };
    // Rounded per event and in total: equal within the rounding.
    assert!(
        (of("Lock") - lock).abs() < 0.01 && (of("LWLock") - lwlock).abs() < 0.01,
        "{waits}"
    );
    assert!(events.values().all(|v| v.as_f64().unwrap() > 0.0), "{waits}");
}

/// A work report (JSON): per `orders` of kind `per`; WAL was written and transactions wrote
/// (at least `min_write_tx` per order: other tests' writes only add to it); the counters
/// PostgreSQL reports late (commits, rows) are present and non-negative.
fn assert_work(work: &Value, orders: u64, per: &str, min_write_tx: f64) {
    assert_eq!(work["orders"].as_u64(), Some(orders), "{work}");
    assert_eq!(work["per"], per, "{work}");
    let f = |k: &str| work[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {work}"));
    assert!(f("write_transactions_per_order") >= min_write_tx, "{work}");
    assert!(f("wal_bytes_per_order") > 0.0, "{work}");
    for k in [
        "commits_per_order",
        "rows_inserted_per_order",
        "rows_updated_per_order",
        "rows_deleted_per_order",
    ] {
        assert!(f(k) >= 0.0, "{k} in {work}");
    }
}

/// Every baseline dropped its schema again.
async fn assert_no_baseline_schema(app: &TestApp) {
    let leftover: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'orderflow_bench_sync_%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(leftover, 0);
}

#[tokio::test]
async fn a_small_bench_accounts_for_every_order() {
    let app = TestApp::spawn().await;
    let json = std::env::temp_dir().join(format!("orderflow-bench-{}.json", app.db_name));
    let json_arg = json.to_string_lossy().into_owned();
    let args = args(
        &app,
        &[
            "--orders",
            "50",
            "--users",
            "10",
            "--products",
            "3",
            "--concurrency",
            "8",
            "--coupon-share",
            "0.3",
            "--baseline",
            "sync",
            "--json",
            &json_arg,
            "--pg-waits",
        ],
    );
    orderflow_bench::run(&args).await.expect("the bench runs");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {report}"));
    assert_eq!(n("orders"), 50);
    assert_eq!(n("confirmed") + n("cancelled") + n("errors"), n("orders"), "{report}");
    assert!(n("confirmed") > 0, "{report}");
    // Funded, stocked and couponed for every order: nothing should fail.
    assert_eq!(n("errors"), 0, "{report}");
    assert_eq!(n("confirmed"), 50, "{report}");
    for k in [
        "duration_s",
        "completed_per_s",
        "accept_p50_ms",
        "accept_p99_ms",
        "accept_api_p50_ms",
        "accept_api_p99_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
    ] {
        assert!(report[k].as_f64().unwrap() > 0.0, "{k} in {report}");
    }
    // The API's own time for an accept (Server-Timing) is part of what the client waited.
    assert!(
        report["accept_api_max_ms"].as_f64().unwrap() <= report["accept_max_ms"].as_f64().unwrap() * 1.001,
        "{report}"
    );
    // The baseline ran the same mix, in a schema of its own that is gone again.
    assert_eq!(n("baseline_orders"), 50);
    assert_eq!(n("baseline_confirmed"), 50, "{report}");
    // Every target of issue 13 from this one file: rates, ratios, CPU and lock waits.
    let f = |k: &str| report[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {report}"));
    assert!(
        f("accept_per_s") > 0.0 && f("baseline_completed_per_s") > 0.0,
        "{report}"
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 0.001 + b.abs() * 0.01;
    assert!(
        close(f("ratio"), f("completed_per_s") / f("baseline_completed_per_s")),
        "{report}"
    );
    assert!(
        close(f("accept_ratio"), f("accept_per_s") / f("baseline_completed_per_s")),
        "{report}"
    );
    assert_cpu(&report["cpu"], 50, "completed");
    assert_cpu(&report["baseline_cpu"], 50, "completed");
    assert_waits(&report["pg_waits"], 50, "completed");
    assert_waits(&report["baseline_pg_waits"], 50, "completed");
    // The pipeline's work: every order wrote (batched, so a transaction may carry several)
    // and its consumers settled messages (this process's registry, the API's /metrics).
    assert_work(&report["work"], 50, "completed", 0.01);
    assert!(
        report["work"]["messages_per_order"].as_f64().unwrap() > 0.0,
        "{}",
        report["work"]
    );
    // The baseline's: at least one transaction that wrote per order.
    assert_eq!(report["baseline_kind"], "sync");
    assert_work(&report["baseline_work"], 50, "completed", 1.0);
    assert_no_baseline_schema(&app).await;
    // The system agrees with what the bench observed.
    let confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(confirmed as u64, n("confirmed"));
    app.stop().await;
}

#[tokio::test]
async fn a_hot_product_run_in_the_open_model_sells_exactly_its_stock() {
    let app = TestApp::spawn().await;
    let args = args(
        &app,
        &[
            "--orders",
            "40",
            "--users",
            "8",
            "--rate",
            "200",
            "--hot",
            "--hot-stock",
            "5",
            // Watched by long-polls, fewer slots than orders: the rest wait their turn.
            "--observe",
            "wait",
            "--wait-connections",
            "10",
        ],
    );
    let Outcome::Orders(report) = execute(&args).await.expect("the bench runs") else {
        panic!("expected an order report");
    };
    assert_eq!(
        report.confirmed + report.cancelled + report.errors,
        report.orders,
        "{report:?}"
    );
    assert_eq!(report.confirmed, 5, "{report:?}");
    assert_eq!(report.cancelled_by_reason.get("OUT_OF_STOCK"), Some(&35), "{report:?}");
    assert_eq!(report.model, "open");
    assert_eq!(
        (report.observe, report.poll_errors, report.poll_rounds),
        ("wait", 0, 0),
        "{report:?}"
    );
    // At least one long-poll per order, and not a poll loop: each answers a status change
    // (PENDING, then at most the steps and the cancel) or the 30 s wait.
    assert!((40..=40 * 6).contains(&report.poll_requests), "{report:?}");
    assert!(report.pg_waits.is_none(), "not asked for");
    assert_cpu(&serde_json::to_value(&report.cpu).unwrap(), 40, "completed");
    app.stop().await;
}

#[tokio::test]
async fn accepting_alone_watches_nothing_and_ends_with_the_last_answer() {
    // No step workers: every order stays PENDING, so there is nothing to watch.
    let app = TestApp::api_only().await;
    let args = args(
        &app,
        &[
            "--orders",
            "30",
            "--users",
            "6",
            "--concurrency",
            "4",
            "--observe",
            "none",
        ],
    );
    let Outcome::Orders(report) = execute(&args).await.expect("the bench runs") else {
        panic!("expected an order report");
    };
    assert_eq!(
        (report.accepted, report.confirmed, report.cancelled, report.errors),
        (30, 0, 0, 0),
        "{report:?}"
    );
    assert!(report.errors_by_kind.is_empty(), "{report:?}");
    assert_eq!((report.observe, report.poll_requests), ("none", 0), "{report:?}");
    assert!(report.accept_per_s > 0.0, "{report:?}");
    // Over when the last answer came, not after waiting out --timeout (60 s here).
    assert_eq!(report.duration_s, report.send_duration_s, "{report:?}");
    assert_cpu(&serde_json::to_value(&report.cpu).unwrap(), 30, "accepted");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pending, 30);
    app.stop().await;
}

#[tokio::test]
async fn a_coupon_rush_issues_exactly_the_coupons_on_offer() {
    let app = TestApp::api_only().await;
    let args = args(&app, &["--coupon-rush", "--users", "60", "--rush-coupons", "10"]);
    let Outcome::CouponRush(report) = execute(&args).await.expect("the rush runs") else {
        panic!("expected a rush report");
    };
    assert_eq!(report.issued, 10, "{report:?}");
    assert_eq!(report.issued_verified, 10, "{report:?}");
    assert_eq!(report.sold_out, 50, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_cpu(&serde_json::to_value(&report.cpu).unwrap(), 60, "requests");
    app.stop().await;
}

/// `--baseline procedure` places the same mix as one PL/pgSQL call per order: with stock for
/// every order and coupons for some, all confirmed; on a hot product, exactly its stock.
#[tokio::test]
async fn the_procedure_baseline_places_the_same_orders_in_one_call_each() {
    let app = TestApp::spawn().await;
    // The first run waits for PostgreSQL's statistics at each end of each phase, so its row
    // counts are exact.
    for (extra, confirmed, out_of_stock) in [
        (
            &[
                "--orders",
                "40",
                "--users",
                "8",
                "--products",
                "2",
                "--coupon-share",
                "0.5",
                "--work-settle",
                "11s",
            ][..],
            40,
            0,
        ),
        (
            &["--orders", "20", "--users", "8", "--hot", "--hot-stock", "5"][..],
            5,
            15,
        ),
    ] {
        let mut a = vec!["--concurrency", "4", "--baseline", "procedure"];
        a.extend_from_slice(extra);
        let Outcome::Orders(report) = execute(&args(&app, &a)).await.expect("the bench runs") else {
            panic!("expected an order report");
        };
        let b = report.baseline.as_ref().expect("a baseline ran");
        assert_eq!(b.baseline_kind, "procedure");
        assert_eq!(b.baseline_errors, 0, "{b:?}");
        assert_eq!(b.baseline_confirmed, confirmed, "{b:?}");
        assert_eq!(
            b.baseline_cancelled_by_reason.get("OUT_OF_STOCK").copied().unwrap_or(0),
            out_of_stock,
            "{b:?}"
        );
        assert_eq!(b.baseline_cancelled, out_of_stock, "{b:?}");
        // The pipeline agrees on the same mix.
        assert_eq!(report.confirmed, confirmed);
        // One call, one transaction that wrote, per order (others' writes only add).
        let w = b.baseline_work.as_ref().unwrap();
        assert!(w.write_transactions_per_order.unwrap() >= 1.0, "{w:?}");
        if confirmed == 40 {
            // Every order confirmed: its row, its item and its ledger row inserted; its
            // product, balance and (for half) coupon updated. The idle system beside it may
            // add a little, never take away.
            let ins = w.rows_inserted_per_order.unwrap();
            let upd = w.rows_updated_per_order.unwrap();
            assert!((3.0..3.5).contains(&ins), "{w:?}");
            assert!((2.5..3.0).contains(&upd), "{w:?}");
        }
    }
    assert_no_baseline_schema(&app).await;
    app.stop().await;
}

/// `--idle` sends nothing and reports what the running system cost per second meanwhile.
#[tokio::test]
async fn an_idle_measurement_sends_nothing() {
    let app = TestApp::spawn().await;
    let Outcome::Idle(report) = execute(&args(&app, &["--idle", "1s"])).await.expect("the bench runs") else {
        panic!("expected an idle report");
    };
    assert!(report.seconds >= 1.0, "{report:?}");
    if let Some(cpu) = &report.cpu_pct_of_a_core {
        let machine = cpu.machine.unwrap();
        assert!((0.0..=200.0).contains(&machine), "{report:?}");
        // The system in this process has timers and polls: its threads woke during the second.
        let switches = report.switches_per_s.as_ref().expect("read with the CPU");
        assert!(switches.bench.unwrap() > 0.0, "{report:?}");
        assert!(switches.machine.unwrap() >= switches.bench.unwrap(), "{report:?}");
    }
    assert!(report.write_transactions_per_s.unwrap() >= 0.0, "{report:?}");
    assert!(report.wal_bytes_per_s.unwrap() >= 0.0, "{report:?}");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(orders, 0);
    app.stop().await;
}

/// `--floor` carries every order through every hop exactly once (one inbox record per message
/// consumed, one outbox row per message, its events' among them, every row marked sent): one
/// statement per hop, a statement at a time (`--floor-split`), or a statement and a message per
/// batch (`--floor-batch`, at a rate where batches form), on the test's own database and vhost,
/// and leaves neither its schema nor its queues behind.
#[tokio::test]
async fn the_floor_carries_every_order_through_every_hop_once_and_cleans_up() {
    let app = TestApp::api_only().await;
    let amqp_url = app.config.amqp_url.clone();
    for (mode, rate, orders) in [
        ("", "200", 40),
        ("--floor-split", "200", 40),
        ("--floor-batch", "2000", 400),
    ] {
        let orders_arg = orders.to_string();
        let mut floor = vec![
            "--floor",
            "--rate",
            rate,
            "--orders",
            &orders_arg,
            "--hops",
            "3",
            "--amqp-url",
            &amqp_url,
        ];
        if !mode.is_empty() {
            floor.push(mode);
        }
        let Outcome::Floor(report) = execute(&args(&app, &floor)).await.expect("the floor runs") else {
            panic!("expected a floor report");
        };
        assert_eq!(
            (
                report.orders,
                report.accepted,
                report.confirmed,
                report.errors,
                report.hops,
                report.split,
                report.batched
            ),
            (
                orders,
                orders,
                orders,
                0,
                3,
                mode == "--floor-split",
                mode == "--floor-batch"
            ),
            "{report:?}"
        );
        let t = report.tables;
        assert_eq!((t.orders_through, t.outbox_unsent), (orders as i64, 0), "{report:?}");
        assert_eq!(
            t.inbox_records + t.event_rows,
            t.outbox_rows,
            "every message but the events consumed once: {report:?}"
        );
        let messages = orders as i64 * 4;
        if report.batched {
            // 400 orders in 0.2 s: batches of more than one order form, whatever the machine.
            assert!(t.outbox_rows < messages && t.event_rows >= 1, "{report:?}");
        } else {
            assert_eq!(
                (t.inbox_records, t.outbox_rows),
                (messages - orders as i64, messages),
                "{report:?}"
            );
            // Four transactions per order at least (the accept and three hops), whatever else wrote.
            assert!(
                report.work.as_ref().unwrap().write_transactions_per_order.unwrap() >= 4.0,
                "{report:?}"
            );
        }
        assert!(
            report.e2e_p50_ms > 0.0 && report.e2e_p99_ms >= report.e2e_p50_ms,
            "{report:?}"
        );
        if let Some(cpu) = &report.cpu {
            // The CPU interval covers the run.
            assert!(cpu.seconds >= report.duration_s, "{report:?}");
            assert_cpu(&serde_json::to_value(cpu).unwrap(), orders, "completed");
        }
    }
    let schemas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'orderflow_bench_floor_%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(schemas, 0, "the floor's schema is dropped");
    let queues = app
        .mgmt(reqwest::Method::GET, &format!("/api/queues/{}", app.vhost))
        .await;
    let left: Vec<&Value> = queues
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["name"].as_str().unwrap().starts_with("orderflow.bench.floor."))
        .collect();
    assert!(left.is_empty(), "the floor's queues are deleted: {left:?}");
    app.stop().await;
}
