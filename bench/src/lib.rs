//! `orderflow bench`: load against a running system, through its HTTP API only (plus
//! DATABASE_URL for the synchronous baseline and `--pg-waits`). Its own crate, linked into
//! the `orderflow` binary: tooling, kept apart from the product's code.
//!
//! 1. Setup through the public API ([`setup`]): products, coupons, balances, issued coupons,
//!    for an order mix fixed beforehand ([`plan`]).
//! 2. Load ([`load`]): the open model (`--rate`) or the closed model (`--concurrency`),
//!    measuring accept latency (POST -> 202).
//! 3. Observe ([`observe`]): every accepted order is watched from the outside until it is
//!    terminal, giving end-to-end latency (202 -> terminal state seen).
//! 4. Optionally the synchronous baseline ([`baseline`]) over the same mix, directly against
//!    DATABASE_URL, and the ratio between the two.
//! 5. Report ([`report`]): a table on stdout and, with `--json FILE`, a JSON file. Each phase
//!    (the pipeline's load, the baseline, the rush) is also metered ([`meter`]): CPU by
//!    process from /proc ([`cpu`]) and, with `--pg-waits`, PostgreSQL wait events ([`waits`]).
//!
//! `--coupon-rush` runs [`rush`] instead, `--idle` measures the system doing nothing ([`idle`]),
//! `--floor` what the design's guarantees alone cost per order, without the system ([`floor`]).

pub mod args;
mod baseline;
mod client;
pub mod cpu;
pub mod floor;
pub mod idle;
mod load;
mod meter;
pub mod observe;
mod plan;
mod progress;
pub mod report;
mod rush;
mod scratch;
mod setup;
pub mod waits;
pub mod work;

use std::{collections::BTreeMap, sync::Arc};

use anyhow::Context;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

pub use self::args::BenchArgs;
use self::{
    args::{LoadModel, Observe, OrderSettings, Scenario},
    client::Api,
    meter::Meter,
    observe::{Final, Observer, ObserverStats, PollObserver, WaitObserver},
    plan::Plan,
    progress::Progress,
    report::{Latency, Measured, Report, RushReport},
};

/// What a run produced (made once per run, so its size does not matter).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Orders(Report),
    CouponRush(RushReport),
    Idle(idle::IdleReport),
    Floor(floor::FloorReport),
}

impl Outcome {
    pub fn table(&self) -> String {
        match self {
            Self::Orders(r) => r.table(),
            Self::CouponRush(r) => r.table(),
            Self::Idle(r) => r.table(),
            Self::Floor(r) => r.table(),
        }
    }

    pub fn to_json(&self) -> serde_json::Result<String> {
        match self {
            Self::Orders(r) => serde_json::to_string_pretty(r),
            Self::CouponRush(r) => serde_json::to_string_pretty(r),
            Self::Idle(r) => serde_json::to_string_pretty(r),
            Self::Floor(r) => serde_json::to_string_pretty(r),
        }
    }
}

/// Runs the benchmark, prints the table and writes the JSON report if asked.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let outcome = execute(args).await?;
    println!("{}", outcome.table());
    if let Some(path) = &args.json {
        let json = outcome.to_json()?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Runs the benchmark and returns its report (nothing printed but progress).
pub async fn execute(args: &BenchArgs) -> anyhow::Result<Outcome> {
    let settings = args.validate()?;
    let (secret, default) = args.jwt_secret();
    // Only the scenarios that call the API sign tokens.
    if default && matches!(settings.scenario, Scenario::Orders(_) | Scenario::CouponRush(_)) {
        eprintln!("warning: JWT_SECRET is not set; signing with the development secret, as the system must too");
    }
    let progress = Progress::new();
    let meter = Meter::start(&settings, &args.database_url).await?;
    let outcome: anyhow::Result<Outcome> = async {
        match &settings.scenario {
            Scenario::Orders(s) => orders(&args.database_url, &settings.api, secret, s, &progress, &meter)
                .await
                .map(Outcome::Orders),
            Scenario::CouponRush(s) => {
                let connections = s.concurrency.unwrap_or(usize::try_from(s.users).unwrap_or(1_000));
                let api = Api::new(&settings.api, secret, connections)?;
                api.health().await?;
                rush::run(&api, s, &progress, &meter).await.map(Outcome::CouponRush)
            }
            Scenario::Idle(duration) => Ok(Outcome::Idle(idle::run(*duration, &meter).await)),
            Scenario::Floor(s) => floor::run(&args.database_url, s, &progress, &meter)
                .await
                .map(Outcome::Floor),
        }
    }
    .await;
    meter.stop().await;
    outcome
}

/// How long `--observe wait` asks the API to hold each request (its maximum).
const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Terminal states as the observer saw them.
#[derive(Default)]
struct Seen {
    e2e: Latency,
    recorded: Latency,
    confirmed: u64,
    cancelled: BTreeMap<String, u64>,
    parked: BTreeMap<String, u64>,
    /// When the last order became terminal.
    last: Option<Instant>,
}

async fn orders(
    database_url: &str,
    api_url: &str,
    secret: &str,
    s: &OrderSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<Report> {
    let plan = Arc::new(Plan::new(s));
    let n = plan.orders.len() as u64;
    let senders = match s.model {
        LoadModel::Closed { concurrency } => concurrency,
        LoadModel::Open { .. } => s.max_in_flight.min(1_024),
    };
    let watchers = match s.observe {
        Observe::Poll => s.poll_concurrency,
        Observe::Wait => s.wait_connections,
        Observe::None => 0,
    };
    let api = Api::new(api_url, secret, senders + watchers)?;
    api.health().await?;
    let fixture = Arc::new(
        setup::run(&api, &plan, progress)
            .await
            .context("setting up through the API")?,
    );

    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let tokens = Arc::new(fixture.tokens.clone());
    let mut observing = match s.observe {
        Observe::Poll => tokio::spawn(
            PollObserver {
                api: api.clone(),
                tokens,
                interval: s.poll_interval,
                concurrency: s.poll_concurrency,
            }
            .run(watch_rx, done_tx, stop.clone()),
        ),
        Observe::Wait => tokio::spawn(
            WaitObserver {
                api: api.clone(),
                tokens,
                connections: s.wait_connections,
                wait: WAIT,
            }
            .run(watch_rx, done_tx, stop.clone()),
        ),
        Observe::None => tokio::spawn(async move {
            drop((watch_rx, done_tx));
            ObserverStats::default()
        }),
    };
    let sent_bar = progress.bar("sent", n);
    let done_bar = progress.bar("terminal", n);
    let collecting = tokio::spawn(async move {
        let mut seen = Seen::default();
        while let Some(t) = done_rx.recv().await {
            seen.e2e
                .record(t.observed_at.saturating_duration_since(t.watch.accepted_at));
            if let Some(d) = t.recorded {
                seen.recorded.record(d);
            }
            match t.outcome {
                Final::Confirmed => seen.confirmed += 1,
                Final::Cancelled(reason) => *seen.cancelled.entry(reason).or_default() += 1,
                Final::Parked(state) => *seen.parked.entry(state).or_default() += 1,
            }
            // When it became terminal: when it was seen, or earlier if its own timestamps say
            // so (accept + recorded processing time, late by at most the accept latency), so
            // the observer's polling delay does not stretch the run.
            let done = t
                .recorded
                .map_or(t.observed_at, |r| t.observed_at.min(t.watch.accepted_at + r));
            seen.last = seen.last.max(Some(done));
            done_bar.inc(1);
        }
        done_bar.finish_and_clear();
        seen
    });

    meter.settle().await;
    let load_mark = meter.mark().await;
    let started = Instant::now();
    let sent = load::send_all(
        api.clone(),
        plan.clone(),
        fixture.clone(),
        s.model,
        s.max_in_flight,
        watch_tx,
        sent_bar,
    )
    .await;
    let deadline = Instant::now() + s.timeout;
    let observed = tokio::select! {
        r = &mut observing => r.context("the observer failed")?,
        () = tokio::time::sleep_until(deadline) => {
            stop.cancel();
            observing.await.context("the observer failed")?
        }
    };
    let seen = collecting.await.context("collecting terminal states failed")?;
    let ended = Instant::now();
    let mut end_mark = meter.mark().await;
    meter.settle_work(&mut end_mark).await;

    let cancelled: u64 = seen.cancelled.values().sum();
    let parked: u64 = seen.parked.values().sum();
    let timed_out = match s.observe {
        Observe::None => 0,
        _ => sent.accepted.saturating_sub(seen.confirmed + cancelled + parked),
    };
    let mut errors_by_kind = sent.errors.clone();
    for (state, count) in &seen.parked {
        *errors_by_kind.entry(state.clone()).or_default() += count;
    }
    if timed_out > 0 {
        errors_by_kind.insert(format!("not terminal within {:?}", s.timeout), timed_out);
    }
    let errors: u64 = errors_by_kind.values().sum();
    // Until the last order became terminal; until we gave up when some never got there.
    let end = if timed_out > 0 {
        ended
    } else {
        seen.last.unwrap_or(started + sent.duration)
    };

    let (model, rate, concurrency) = match s.model {
        LoadModel::Open { rate } => ("open", Some(rate), None),
        LoadModel::Closed { concurrency } => ("closed", None, Some(concurrency)),
    };
    let mut report = Report {
        scenario: "orders",
        model,
        rate,
        concurrency,
        users: s.users,
        products: s.products,
        coupon_share: s.coupon_share,
        hot_stock: s.hot_stock,
        orders: n,
        accepted: sent.accepted,
        confirmed: seen.confirmed,
        cancelled,
        errors,
        cancelled_by_reason: seen.cancelled,
        errors_by_kind,
        late: sent.late,
        max_send_lag_ms: 0.0,
        duration_s: 0.0,
        completed_per_s: 0.0,
        send_duration_s: 0.0,
        accept_per_s: 0.0,
        accept_p50_ms: 0.0,
        accept_p95_ms: 0.0,
        accept_p99_ms: 0.0,
        accept_max_ms: 0.0,
        accept_api_p50_ms: 0.0,
        accept_api_p95_ms: 0.0,
        accept_api_p99_ms: 0.0,
        accept_api_max_ms: 0.0,
        e2e_p50_ms: 0.0,
        e2e_p95_ms: 0.0,
        e2e_p99_ms: 0.0,
        e2e_max_ms: 0.0,
        recorded_p50_ms: 0.0,
        recorded_p95_ms: 0.0,
        recorded_p99_ms: 0.0,
        recorded_max_ms: 0.0,
        observe: match s.observe {
            Observe::Poll => "poll",
            Observe::Wait => "wait",
            Observe::None => "none",
        },
        poll_requests: observed.requests,
        poll_errors: observed.errors,
        poll_rounds: observed.rounds,
        poll_round_mean_ms: if observed.rounds > 0 {
            (observed.busy.as_secs_f64() * 1_000.0 / observed.rounds as f64).round()
        } else {
            0.0
        },
        cpu: None,
        work: None,
        pg_waits: None,
        baseline: None,
    };
    report.measure(&Measured {
        accept: &sent.accept,
        accept_api: &sent.accept_api,
        e2e: &seen.e2e,
        recorded: &seen.recorded,
        duration: end.saturating_duration_since(started),
        send_duration: sent.duration,
        max_send_lag: sent.max_lag,
    });
    // Per completed order; per accepted one when none completed (no step workers running).
    let completed = report.confirmed + report.cancelled;
    let (count, per) = if completed > 0 {
        (completed, "completed")
    } else {
        (report.accepted, "accepted")
    };
    let costs = meter.costs(&load_mark, &end_mark, count, per);
    report.cpu = costs.cpu;
    report.work = costs.work;
    report.pg_waits = costs.pg_waits;

    if let (Some(kind), Some(connections)) = (s.baseline, s.baseline_concurrency) {
        let bar = progress.bar("baseline", n);
        let b = baseline::run(database_url, kind, plan.clone(), connections, bar, meter)
            .await
            .with_context(|| format!("the {} baseline failed", kind.name()))?;
        report = report.with_baseline(b);
    }
    Ok(report)
}
