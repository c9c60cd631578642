//! Latency histograms, the reports (JSON and a table) and their rendering.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{cpu::CpuReport, waits::WaitReport, work::WorkReport};

/// Latencies in microseconds, 3 significant digits (0.1% error), up to an hour.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid"))
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn add(&mut self, other: &Self) {
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        ms(self.0.value_at_quantile(q))
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() { 0.0 } else { ms(self.0.max()) }
    }

    pub fn summary(&self) -> Percentiles {
        Percentiles {
            count: self.count(),
            p50_ms: self.quantile_ms(0.50),
            p95_ms: self.quantile_ms(0.95),
            p99_ms: self.quantile_ms(0.99),
            max_ms: self.max_ms(),
        }
    }
}

/// Microseconds to milliseconds, rounded to the microsecond.
fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Rounds to 3 decimals for the JSON report.
fn r3(x: f64) -> f64 {
    (x * 1_000.0).round() / 1_000.0
}

/// Per second, 0 when nothing was timed.
pub fn per_second(count: u64, duration: Duration) -> f64 {
    let s = duration.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// The report of an order run. Counts add up: `confirmed + cancelled + errors == orders`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub scenario: &'static str,
    /// "open" or "closed".
    pub model: &'static str,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub users: u64,
    pub products: u64,
    pub coupon_share: f64,
    pub hot_stock: Option<i64>,

    pub orders: u64,
    pub accepted: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    /// Orders that were refused, failed in transport, parked or not terminal in time.
    pub errors: u64,
    pub cancelled_by_reason: BTreeMap<String, u64>,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Open model: orders sent more than 10 ms after their scheduled time.
    pub late: u64,
    pub max_send_lag_ms: f64,

    /// From the first order sent to the last order's terminal state (seen by the observer, or
    /// earlier when the order's timestamps show it finished before it was seen).
    pub duration_s: f64,
    /// Terminal orders (confirmed + cancelled) per second over `duration_s`.
    pub completed_per_s: f64,
    /// How long sending took, and accepted orders per second over it.
    pub send_duration_s: f64,
    pub accept_per_s: f64,

    pub accept_p50_ms: f64,
    pub accept_p95_ms: f64,
    pub accept_p99_ms: f64,
    pub accept_max_ms: f64,
    /// The same accepts as the API timed them (its `Server-Timing`): without the network, the
    /// bench's own scheduling and the server's connection handling. On a machine the bench
    /// shares, the difference is mostly the bench waiting for a core.
    pub accept_api_p50_ms: f64,
    pub accept_api_p95_ms: f64,
    pub accept_api_p99_ms: f64,
    pub accept_api_max_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p95_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    /// End to end from the order's own timestamps (createdAt -> updatedAt of the terminal
    /// state, as the API serves them): unaffected by polling delay, a lower bound.
    pub recorded_p50_ms: f64,
    pub recorded_p95_ms: f64,
    pub recorded_p99_ms: f64,
    pub recorded_max_ms: f64,

    /// How orders were watched: `poll` (users' order lists) or `wait` (`Prefer: wait` on each
    /// order).
    pub observe: &'static str,
    /// What observing cost: requests (with `wait`, long-polls) and polling rounds (the e2e
    /// resolution is about `duration_s / poll_rounds`; none with `wait`).
    pub poll_requests: u64,
    pub poll_errors: u64,
    pub poll_rounds: u64,
    /// How long a polling round took on average: about how late a terminal state is seen.
    pub poll_round_mean_ms: f64,

    /// CPU per order by process, from the first order sent until the last one was terminal
    /// (null where /proc cannot be read).
    pub cpu: Option<CpuReport>,
    /// PostgreSQL commits, rows and WAL, and the system's consumed messages, per order over
    /// the same span (parts that could not be read are null).
    pub work: Option<WorkReport>,
    /// With `--pg-waits`: what PostgreSQL sessions waited on, per order, over the same span.
    pub pg_waits: Option<WaitReport>,

    #[serde(flatten)]
    pub baseline: Option<BaselineReport>,
}

/// The synchronous baseline beside the pipeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BaselineReport {
    /// Which monolith: `sync` (one transaction, a statement per step) or `procedure` (one
    /// call of a PL/pgSQL function: one round trip per order).
    pub baseline_kind: &'static str,
    pub baseline_concurrency: usize,
    pub baseline_orders: u64,
    pub baseline_confirmed: u64,
    pub baseline_cancelled: u64,
    pub baseline_cancelled_by_reason: BTreeMap<String, u64>,
    pub baseline_errors: u64,
    pub baseline_duration_s: f64,
    pub baseline_completed_per_s: f64,
    pub baseline_p50_ms: f64,
    pub baseline_p95_ms: f64,
    pub baseline_p99_ms: f64,
    pub baseline_max_ms: f64,
    /// CPU per completed baseline order while its orders ran (not while its data loaded).
    pub baseline_cpu: Option<CpuReport>,
    pub baseline_work: Option<WorkReport>,
    pub baseline_pg_waits: Option<WaitReport>,
    /// The pipeline's `completed_per_s` divided by the baseline's.
    pub ratio: f64,
    /// The pipeline's `accept_per_s` divided by the baseline's `completed_per_s`: the target
    /// of a run that only accepts (no step workers).
    pub accept_ratio: f64,
}

/// The parts of a report that are measured (counts come separately).
pub struct Measured<'a> {
    pub accept: &'a Latency,
    pub accept_api: &'a Latency,
    pub e2e: &'a Latency,
    pub recorded: &'a Latency,
    pub duration: Duration,
    pub send_duration: Duration,
    pub max_send_lag: Duration,
}

impl Report {
    /// Fills in the latency, rate and duration fields from the measurements.
    pub fn measure(&mut self, m: &Measured<'_>) {
        let a = m.accept.summary();
        let e = m.e2e.summary();
        self.accept_p50_ms = r3(a.p50_ms);
        self.accept_p95_ms = r3(a.p95_ms);
        self.accept_p99_ms = r3(a.p99_ms);
        self.accept_max_ms = r3(a.max_ms);
        let api = m.accept_api.summary();
        self.accept_api_p50_ms = r3(api.p50_ms);
        self.accept_api_p95_ms = r3(api.p95_ms);
        self.accept_api_p99_ms = r3(api.p99_ms);
        self.accept_api_max_ms = r3(api.max_ms);
        self.e2e_p50_ms = r3(e.p50_ms);
        self.e2e_p95_ms = r3(e.p95_ms);
        self.e2e_p99_ms = r3(e.p99_ms);
        self.e2e_max_ms = r3(e.max_ms);
        let rec = m.recorded.summary();
        self.recorded_p50_ms = r3(rec.p50_ms);
        self.recorded_p95_ms = r3(rec.p95_ms);
        self.recorded_p99_ms = r3(rec.p99_ms);
        self.recorded_max_ms = r3(rec.max_ms);
        self.duration_s = r3(m.duration.as_secs_f64());
        self.completed_per_s = r3(per_second(self.confirmed + self.cancelled, m.duration));
        self.send_duration_s = r3(m.send_duration.as_secs_f64());
        self.accept_per_s = r3(per_second(self.accepted, m.send_duration));
        self.max_send_lag_ms = r3(m.max_send_lag.as_secs_f64() * 1_000.0);
    }

    /// Attaches the baseline and the ratios.
    pub fn with_baseline(mut self, mut b: BaselineReport) -> Self {
        let ratio = |x: f64| {
            if b.baseline_completed_per_s > 0.0 {
                r3(x / b.baseline_completed_per_s)
            } else {
                0.0
            }
        };
        (b.ratio, b.accept_ratio) = (ratio(self.completed_per_s), ratio(self.accept_per_s));
        self.baseline = Some(b);
        self
    }

    /// The human-readable table printed at the end.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let load = match (self.model, self.rate, self.concurrency) {
            ("open", Some(r), _) => format!("open model, {r} orders/s"),
            (_, _, Some(c)) => format!("closed model, {c} clients"),
            _ => self.model.to_owned(),
        };
        let hot = self
            .hot_stock
            .map(|s| format!(", hot product with {s} units"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "orderflow bench: {} orders, {} users, {} products, coupon share {}, {load}{hot}",
            self.orders, self.users, self.products, self.coupon_share
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<22} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "p50", "p95", "p99", "max"
        );
        let row = |out: &mut String, name: &str, p: [f64; 4]| {
            let _ = writeln!(
                out,
                "  {name:<22} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                p[0], p[1], p[2], p[3]
            );
        };
        row(
            &mut out,
            "accept (POST -> 202)",
            [
                self.accept_p50_ms,
                self.accept_p95_ms,
                self.accept_p99_ms,
                self.accept_max_ms,
            ],
        );
        row(
            &mut out,
            "accept, in the API",
            [
                self.accept_api_p50_ms,
                self.accept_api_p95_ms,
                self.accept_api_p99_ms,
                self.accept_api_max_ms,
            ],
        );
        // With `--observe none` nothing saw an order end: no end-to-end rows of zeros.
        if self.observe != "none" {
            row(
                &mut out,
                "end to end (observed)",
                [self.e2e_p50_ms, self.e2e_p95_ms, self.e2e_p99_ms, self.e2e_max_ms],
            );
            row(
                &mut out,
                "e2e (order timestamps)",
                [
                    self.recorded_p50_ms,
                    self.recorded_p95_ms,
                    self.recorded_p99_ms,
                    self.recorded_max_ms,
                ],
            );
        }
        if let Some(b) = &self.baseline {
            row(
                &mut out,
                "baseline transaction",
                [
                    b.baseline_p50_ms,
                    b.baseline_p95_ms,
                    b.baseline_p99_ms,
                    b.baseline_max_ms,
                ],
            );
        }
        let _ = writeln!(out);
        let kv = |m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
                format!(" ({})", parts.join(", "))
            }
        };
        let _ = writeln!(out, "  {:<22} {:>10}", "orders", self.orders);
        let _ = writeln!(out, "  {:<22} {:>10}", "accepted", self.accepted);
        let _ = writeln!(out, "  {:<22} {:>10}", "confirmed", self.confirmed);
        let _ = writeln!(
            out,
            "  {:<22} {:>10}{}",
            "cancelled",
            self.cancelled,
            kv(&self.cancelled_by_reason)
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>10}{}",
            "errors",
            self.errors,
            kv(&self.errors_by_kind)
        );
        if self.model == "open" {
            let _ = writeln!(
                out,
                "  {:<22} {:>10} (max lag {:.1} ms)",
                "sent late (>10 ms)", self.late, self.max_send_lag_ms
            );
        }
        let _ = writeln!(out, "  {:<22} {:>10.2} s", "duration", self.duration_s);
        let alone = self.observe == "none";
        if !alone {
            let _ = writeln!(out, "  {:<22} {:>10.1} orders/s", "completed", self.completed_per_s);
        }
        let _ = writeln!(
            out,
            "  {:<22} {:>10.1} orders/s over {:.2} s",
            "accept rate", self.accept_per_s, self.send_duration_s
        );
        let per_order = self.poll_requests as f64 / (self.confirmed + self.cancelled).max(1) as f64;
        if self.observe == "none" {
            let _ = writeln!(out, "  {:<22} {:>10}", "observer", "none (accepting alone)");
        } else if self.observe == "wait" {
            let _ = writeln!(
                out,
                "  {:<22} {:>10} requests ({per_order:.2} per order) with Prefer: wait, {} errors",
                "observer waiting", self.poll_requests, self.poll_errors
            );
        } else {
            let _ = writeln!(
                out,
                "  {:<22} {:>10} requests ({per_order:.2} per order), {} rounds of {:.0} ms on average, {} errors",
                "observer polling", self.poll_requests, self.poll_rounds, self.poll_round_mean_ms, self.poll_errors
            );
        }
        costs(
            &mut out,
            "",
            self.cpu.as_ref(),
            self.work.as_ref(),
            self.pg_waits.as_ref(),
        );
        if let Some(b) = &self.baseline {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  baseline ({}, {} connections): {} orders, {} confirmed, {} cancelled{}, {} errors in {:.2} s",
                b.baseline_kind,
                b.baseline_concurrency,
                b.baseline_orders,
                b.baseline_confirmed,
                b.baseline_cancelled,
                kv(&b.baseline_cancelled_by_reason),
                b.baseline_errors,
                b.baseline_duration_s
            );
            let _ = writeln!(
                out,
                "  {:<22} {:>10.1} orders/s",
                "baseline completed", b.baseline_completed_per_s
            );
            costs(
                &mut out,
                "baseline ",
                b.baseline_cpu.as_ref(),
                b.baseline_work.as_ref(),
                b.baseline_pg_waits.as_ref(),
            );
            if !alone {
                let _ = writeln!(
                    out,
                    "  {:<22} {:>10.3} (pipeline completed/s / baseline)",
                    "ratio", b.ratio
                );
            }
            let _ = writeln!(
                out,
                "  {:<22} {:>10.3} (pipeline accepted/s / baseline completed/s)",
                "accept ratio", b.accept_ratio
            );
            if self.model == "open" {
                let _ = writeln!(
                    out,
                    "  (open model: the pipeline completes what is offered; the ratio compares capacity only when --rate exceeds it)"
                );
            }
        }
        out
    }
}

/// The CPU, work and wait lines of the table, when measured.
fn costs(
    out: &mut String,
    phase: &str,
    cpu: Option<&CpuReport>,
    work: Option<&WorkReport>,
    waits: Option<&WaitReport>,
) {
    let ms = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    if let Some(c) = cpu {
        let m = &c.core_ms_per_order;
        let busy = c
            .machine_busy_pct
            .map(|b| format!(", machine {b:.0}% busy"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {phase}CPU per {} order, core-ms: postgres {}, rabbitmq {}, orderflow {}, bench {}, machine {} (over {:.2} s{busy})",
            c.per,
            ms(m.postgres),
            ms(m.rabbitmq),
            ms(m.orderflow),
            ms(m.bench),
            ms(m.machine),
            c.seconds,
        );
        let w = &c.switches_per_order;
        let n = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "  {phase}context switches per {} order: postgres {}, rabbitmq {}, orderflow {}, bench {}, machine {}",
            c.per,
            n(w.postgres),
            n(w.rabbitmq),
            n(w.orderflow),
            n(w.bench),
            n(w.machine),
        );
    }
    if let Some(w) = work {
        let n = |x: Option<f64>, d: usize| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));
        let _ = writeln!(
            out,
            "  {phase}work per {} order: {} write transactions, {} commits, rows {} inserted / {} updated / {} deleted, {} WAL bytes, {} messages consumed",
            w.per,
            n(w.write_transactions_per_order, 2),
            n(w.commits_per_order, 2),
            n(w.rows_inserted_per_order, 2),
            n(w.rows_updated_per_order, 2),
            n(w.rows_deleted_per_order, 2),
            n(w.wal_bytes_per_order, 0),
            n(w.messages_per_order, 2),
        );
    }
    if let Some(w) = waits {
        let _ = writeln!(
            out,
            "  {phase}PostgreSQL waits per {} order: Lock {:.3} ms, LWLock {:.3} ms ({} samples every {} ms)",
            w.per, w.lock_ms_per_order, w.lwlock_ms_per_order, w.samples, w.interval_ms
        );
    }
}

/// The report of a coupon rush.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RushReport {
    pub scenario: &'static str,
    pub users: u64,
    pub coupons: u32,
    pub concurrency: Option<usize>,
    pub requests: u64,
    /// 201 answers.
    pub issued: u64,
    /// Users whose coupon list shows the coupon afterwards (must equal `issued`).
    pub issued_verified: u64,
    /// 410 COUPON_SOLD_OUT answers.
    pub sold_out: u64,
    /// Anything else.
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU per request by process while the requests ran.
    pub cpu: Option<CpuReport>,
    pub work: Option<WorkReport>,
    pub pg_waits: Option<WaitReport>,
}

impl RushReport {
    pub fn measure(&mut self, latency: &Latency, duration: Duration) {
        let p = latency.summary();
        self.p50_ms = r3(p.p50_ms);
        self.p95_ms = r3(p.p95_ms);
        self.p99_ms = r3(p.p99_ms);
        self.max_ms = r3(p.max_ms);
        self.duration_s = r3(duration.as_secs_f64());
        self.requests_per_s = r3(per_second(self.requests, duration));
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let at_once = self
            .concurrency
            .map(|c| format!("{c} at a time"))
            .unwrap_or_else(|| "all at once".to_owned());
        let _ = writeln!(
            out,
            "orderflow bench: coupon rush, {} users for {} coupons, {at_once}",
            self.users, self.coupons
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<22} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "p50", "p95", "p99", "max"
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            "issue request", self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  {:<22} {:>10}", "requests", self.requests);
        let _ = writeln!(
            out,
            "  {:<22} {:>10} (verified {})",
            "issued", self.issued, self.issued_verified
        );
        let _ = writeln!(out, "  {:<22} {:>10}", "sold out", self.sold_out);
        let errors: Vec<String> = self.errors_by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let errors = if errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", errors.join(", "))
        };
        let _ = writeln!(out, "  {:<22} {:>10}{errors}", "errors", self.errors);
        let _ = writeln!(out, "  {:<22} {:>10.2} s", "duration", self.duration_s);
        let _ = writeln!(out, "  {:<22} {:>10.1} requests/s", "throughput", self.requests_per_s);
        costs(
            &mut out,
            "",
            self.cpu.as_ref(),
            self.work.as_ref(),
            self.pg_waits.as_ref(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn latency_of(ms: impl IntoIterator<Item = u64>) -> Latency {
        let mut l = Latency::new();
        for m in ms {
            l.record(Duration::from_millis(m));
        }
        l
    }

    /// hdrhistogram keeps 3 significant digits.
    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= expected * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_one_to_a_hundred_ms() {
        let l = latency_of(1..=100);
        let p = l.summary();
        assert_eq!(p.count, 100);
        assert!(close(p.p50_ms, 50.0), "{p:?}");
        assert!(close(p.p95_ms, 95.0), "{p:?}");
        assert!(close(p.p99_ms, 99.0), "{p:?}");
        assert!(close(p.max_ms, 100.0), "{p:?}");
    }

    #[test]
    fn percentiles_see_the_tail() {
        // 990 fast requests and 10 slow ones: p99 is still fast, the max is not.
        let l = latency_of(std::iter::repeat_n(2, 990).chain(std::iter::repeat_n(1_000, 10)));
        assert!(close(l.quantile_ms(0.99), 2.0));
        assert!(close(l.quantile_ms(0.995), 1_000.0));
        assert!(close(l.max_ms(), 1_000.0));
        let mut sum = latency_of([5]);
        sum.add(&l);
        assert_eq!(sum.count(), 1_001);
    }

    #[test]
    fn empty_histograms_report_zero() {
        let p = Latency::new().summary();
        assert_eq!(p, Percentiles::default());
        let mut tiny = Latency::new();
        tiny.record(Duration::ZERO);
        assert_eq!(tiny.count(), 1);
    }

    fn sample() -> Report {
        let mut r = Report {
            scenario: "orders",
            model: "closed",
            rate: None,
            concurrency: Some(32),
            users: 10,
            products: 3,
            coupon_share: 0.2,
            hot_stock: None,
            orders: 100,
            accepted: 99,
            confirmed: 90,
            cancelled: 8,
            errors: 2,
            cancelled_by_reason: BTreeMap::from([("OUT_OF_STOCK".to_owned(), 8)]),
            errors_by_kind: BTreeMap::from([("503 DATABASE_UNAVAILABLE".to_owned(), 1), ("timed out".to_owned(), 1)]),
            late: 0,
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
            observe: "poll",
            poll_requests: 40,
            poll_errors: 0,
            poll_rounds: 12,
            poll_round_mean_ms: 0.0,
            cpu: None,
            work: None,
            pg_waits: None,
            baseline: None,
        };
        r.measure(&Measured {
            accept: &latency_of(1..=100),
            accept_api: &latency_of(1..=50),
            e2e: &latency_of((1..=100).map(|x| x * 10)),
            recorded: &latency_of((1..=100).map(|x| x * 9)),
            duration: Duration::from_secs(2),
            send_duration: Duration::from_millis(1_500),
            max_send_lag: Duration::ZERO,
        });
        r
    }

    #[test]
    fn measured_fields_follow_from_the_inputs() {
        let r = sample();
        assert_eq!(r.duration_s, 2.0);
        assert_eq!(r.completed_per_s, 49.0); // (90 + 8) / 2 s
        assert_eq!(r.accept_per_s, 66.0); // 99 / 1.5 s
        assert!(close(r.accept_p50_ms, 50.0) && close(r.accept_p99_ms, 99.0));
        assert!(close(r.accept_api_p50_ms, 25.0) && close(r.accept_api_p99_ms, 50.0));
        assert!(close(r.e2e_p50_ms, 500.0) && close(r.e2e_p95_ms, 950.0) && close(r.e2e_p99_ms, 990.0));
    }

    #[test]
    fn the_json_report_has_the_agreed_field_names() {
        let json = serde_json::to_value(sample()).unwrap();
        for field in [
            "orders",
            "confirmed",
            "cancelled",
            "errors",
            "duration_s",
            "completed_per_s",
            "accept_p50_ms",
            "accept_p95_ms",
            "accept_p99_ms",
            "accept_api_p50_ms",
            "accept_api_p99_ms",
            "e2e_p50_ms",
            "e2e_p95_ms",
            "e2e_p99_ms",
        ] {
            assert!(json[field].is_number(), "{field} missing: {json}");
        }
        assert_eq!(json["cancelled_by_reason"]["OUT_OF_STOCK"], 8);
        assert!(json.get("ratio").is_none(), "no baseline fields without a baseline");
        assert!(json["accept_per_s"].is_number(), "{json}");
        assert!(json["cpu"].is_null() && json["pg_waits"].is_null(), "{json}");

        let with = sample().with_baseline(BaselineReport {
            baseline_concurrency: 32,
            baseline_orders: 100,
            baseline_confirmed: 92,
            baseline_cancelled: 8,
            baseline_cancelled_by_reason: BTreeMap::new(),
            baseline_errors: 0,
            baseline_duration_s: 0.5,
            baseline_completed_per_s: 196.0,
            baseline_p50_ms: 1.0,
            baseline_p95_ms: 2.0,
            baseline_p99_ms: 3.0,
            baseline_max_ms: 4.0,
            baseline_kind: "sync",
            baseline_cpu: None,
            baseline_work: None,
            baseline_pg_waits: None,
            ratio: 0.0,
            accept_ratio: 0.0,
        });
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["baseline_completed_per_s"], 196.0);
        assert_eq!(json["ratio"], 0.25); // 49 / 196
        assert_eq!(json["accept_ratio"], 0.337); // 66 / 196
        assert_eq!(json["orders"], 100);
    }

    #[test]
    fn the_table_shows_counts_reasons_and_the_ratio() {
        let table = sample().table();
        assert!(table.contains("closed model, 32 clients"), "{table}");
        assert!(table.contains("accept (POST -> 202)"));
        assert!(table.contains("(OUT_OF_STOCK 8)"));
        assert!(table.contains("503 DATABASE_UNAVAILABLE 1"));
        assert!(table.contains("49.0 orders/s"));
        assert!(!table.contains("pipeline / baseline"));
        assert!(!table.contains("sent late"));
        let mut open = sample();
        open.model = "open";
        open.rate = Some(200.0);
        open.concurrency = None;
        assert!(open.table().contains("open model, 200 orders/s"));
        assert!(open.table().contains("sent late"));
        assert!(table.contains("end to end (observed)") && table.contains("observer polling"));
        let mut alone = sample();
        alone.observe = "none";
        let alone = alone.table();
        assert!(!alone.contains("end to end") && !alone.contains("e2e"), "{alone}");
        assert!(!alone.contains("completed  "), "{alone}");
        assert!(alone.contains("none (accepting alone)"), "{alone}");
    }

    #[test]
    fn rush_reports_render() {
        let mut r = RushReport {
            scenario: "coupon_rush",
            users: 1_000,
            coupons: 100,
            concurrency: None,
            requests: 1_000,
            issued: 100,
            issued_verified: 100,
            sold_out: 900,
            errors: 0,
            errors_by_kind: BTreeMap::new(),
            duration_s: 0.0,
            requests_per_s: 0.0,
            p50_ms: 0.0,
            p95_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            cpu: None,
            work: None,
            pg_waits: None,
        };
        r.measure(&latency_of(1..=100), Duration::from_millis(500));
        assert_eq!(r.requests_per_s, 2_000.0);
        let json = serde_json::to_value(&r).unwrap();
        for field in ["issued", "requests_per_s", "p50_ms", "p99_ms", "sold_out"] {
            assert!(json[field].is_number(), "{field}");
        }
        assert!(r.table().contains("all at once"));
        assert!(r.table().contains("2000.0 requests/s"));
    }
}
