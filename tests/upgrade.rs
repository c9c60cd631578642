//! Rolling upgrades: the previous release and this one running side by side on one database
//! and vhost, under orders at 100/s (a quarter of them with a coupon), in each mix a rolling
//! update produces. Each scenario ends as the fault suite's do (every order terminal, the
//! audit clean, including the popular-products projection; every order answered 202 stored
//! once; every confirmed order's event exactly once after dedup) and, besides, with no process
//! that died on its own and no ERROR line in either release's logs.
//!
//! The previous release is built from this repository's history by
//! `scripts/previous-release.sh` (the pin is named there, one release back);
//! `ORDERFLOW_PREVIOUS_BIN` points at the binary. scripts/test.sh builds it and runs these one
//! at a time (`#[ignore]`d in the parallel run: they take a minute each).
//!
//! The pinned release (7e07758) cannot start on a newer schema, so its processes here are
//! started before this release migrates, and never restarted after (that case, an old worker
//! restarting on the migrated schema and a roll-back, is tested once the pin is a release that
//! carries the promise: this one).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::{path::PathBuf, sync::Arc, time::Instant};

use common::system::{Load, Outcome, System, Target, WORKERS, free_port, seed, submit_n, this_build, verify};

/// Orders per scenario, sent at [`RATE`] per second.
const ORDERS: usize = 3_000;
const RATE: u32 = 100;

fn previous() -> PathBuf {
    let bin = std::env::var_os("ORDERFLOW_PREVIOUS_BIN")
        .expect("ORDERFLOW_PREVIOUS_BIN: the previous release's binary (bash scripts/previous-release.sh builds it)");
    let bin = PathBuf::from(bin);
    assert!(bin.is_file(), "{} is not a file", bin.display());
    bin
}

/// Runs one upgrade: `steps` drives the processes while the orders go in.
async fn upgrade<F, Fut>(name: &'static str, first: &[(&str, &str)], steps: F) -> Outcome
where
    F: FnOnce(Arc<System>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let previous = previous();
    // The previous release creates the database and migrates it, as its deployment did.
    let sys = System::create(name, &[], Target::default_node().with_fresh_database()).await;
    for (label, component) in first {
        sys.launch(label, component, &previous, &[]).await;
    }
    sys.wait_ready().await;
    let (products, good, picky) = seed(&sys).await;
    let started = Instant::now();
    let load = {
        let sys = sys.clone();
        tokio::spawn(async move { submit_n(&sys, &products, good, picky, Some(RATE), ORDERS).await })
    };
    steps(sys.clone()).await;
    let load: Load = load.await.unwrap();
    let outcome = verify(&sys, &load, started).await;
    assert_eq!(sys.exited().await, Vec::<String>::new(), "processes died on their own");
    let errors = sys.error_lines();
    assert!(errors.is_empty(), "ERROR lines in the logs:\n{}", errors.join("\n"));
    sys.stop().await;
    assert!(
        outcome.by_status.get("CONFIRMED").copied().unwrap_or(0) > 0,
        "{outcome:?}"
    );
    outcome
}

/// Adds an API of this release beside the running one(s) and sends orders to it too.
async fn add_api(sys: &System, label: &str) -> String {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    sys.launch(label, "api", &this_build(), &[("HTTP_ADDR", &addr)]).await;
    let base = format!("http://{addr}");
    sys.wait_ready_at(&base).await;
    sys.bases.lock().unwrap().push(base.clone());
    base
}

/// Takes the first API out of the clients' rotation, then stops it gracefully.
async fn retire_first_api(sys: &System, label: &str) {
    let first = sys.base();
    sys.bases.lock().unwrap().retain(|b| *b != first);
    sys.retire(label, "-TERM").await;
}

/// Starts this release's instance of every worker kind beside the running ones.
async fn add_workers(sys: &System) {
    for w in WORKERS {
        sys.launch(&format!("{w}-new"), w, &this_build(), &[]).await;
    }
}

/// Stops the previous release's workers gracefully, one kind at a time, orders flowing between.
async fn retire_workers(sys: &System) {
    for w in WORKERS {
        sys.retire(w, "-TERM").await;
        sys.progress(100).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "upgrade suite: needs the previous release (scripts/test.sh builds it)"]
async fn upgrade_1_previous_all_killed_with_orders_in_flight_then_this_release() {
    upgrade("u1-kill-then-start", &[("all", "all")], |sys| async move {
        sys.progress(500).await;
        sys.retire("all", "-KILL").await;
        // Same address: clients retry until it answers again.
        sys.launch("all-new", "all", &this_build(), &[]).await;
        sys.progress(500).await;
    })
    .await;
}

/// The API first: this release's API migrates the schema under the previous release's
/// processes (previous API and workers on the new schema), then takes all the traffic (this
/// API with the previous workers); then this release's workers run beside the previous ones
/// (two releases of each kind), which stop one kind at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "upgrade suite: needs the previous release (scripts/test.sh builds it)"]
async fn upgrade_2_rolling_api_first_then_workers_kind_by_kind() {
    let first: Vec<(&str, &str)> = std::iter::once(("api", "api"))
        .chain(WORKERS.iter().map(|w| (*w, *w)))
        .collect();
    upgrade("u2-rolling-api-first", &first, |sys| async move {
        sys.progress(300).await;
        add_api(&sys, "api-new").await;
        sys.progress(300).await;
        retire_first_api(&sys, "api").await;
        sys.progress(300).await;
        add_workers(&sys).await;
        sys.progress(200).await;
        retire_workers(&sys).await;
    })
    .await;
}

/// The workers first: this release's workers migrate the schema and run beside the previous
/// ones, which stop one kind at a time (the previous API with this release's workers); then
/// this release's API joins and the previous one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "upgrade suite: needs the previous release (scripts/test.sh builds it)"]
async fn upgrade_3_rolling_workers_first_then_the_api() {
    let first: Vec<(&str, &str)> = std::iter::once(("api", "api"))
        .chain(WORKERS.iter().map(|w| (*w, *w)))
        .collect();
    upgrade("u3-rolling-workers-first", &first, |sys| async move {
        sys.progress(300).await;
        add_workers(&sys).await;
        sys.progress(200).await;
        retire_workers(&sys).await;
        sys.progress(300).await;
        add_api(&sys, "api-new").await;
        sys.progress(200).await;
        retire_first_api(&sys, "api").await;
    })
    .await;
}
