//! `orderflow bench` end to end: a tiny run against the real system must account for every
//! order, and its baseline and coupon rush must add up too. Timings are not asserted.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use clap::Parser;
use common::TestApp;
use orderflow::bench::{BenchArgs, Outcome, execute};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(app: &TestApp, extra: &[&str]) -> BenchArgs {
    let base = ["bench", "--api", app.base.as_str(), "--timeout", "60s"];
    Cli::try_parse_from(base.iter().chain(extra))
        .expect("valid bench arguments")
        .args
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
        ],
    );
    orderflow::bench::run(&app.config, &args).await.expect("the bench runs");

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
        "e2e_p50_ms",
        "e2e_p99_ms",
    ] {
        assert!(report[k].as_f64().unwrap() > 0.0, "{k} in {report}");
    }
    // The baseline ran the same mix, in a schema of its own that is gone again.
    assert_eq!(n("baseline_orders"), 50);
    assert_eq!(n("baseline_confirmed"), 50, "{report}");
    assert!(report["baseline_ratio"].as_f64().unwrap() > 0.0);
    let leftover: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'orderflow_bench_sync_%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(leftover, 0);
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
        ],
    );
    let Outcome::Orders(report) = execute(&app.config, &args).await.expect("the bench runs") else {
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
    app.stop().await;
}

#[tokio::test]
async fn a_coupon_rush_issues_exactly_the_coupons_on_offer() {
    let app = TestApp::api_only().await;
    let args = args(&app, &["--coupon-rush", "--users", "60", "--rush-coupons", "10"]);
    let Outcome::CouponRush(report) = execute(&app.config, &args).await.expect("the rush runs") else {
        panic!("expected a rush report");
    };
    assert_eq!(report.issued, 10, "{report:?}");
    assert_eq!(report.issued_verified, 10, "{report:?}");
    assert_eq!(report.sold_out, 50, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    app.stop().await;
}
