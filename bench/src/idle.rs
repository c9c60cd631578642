//! `--idle DURATION`: what the running system costs while nothing happens, the floor every
//! order's share of CPU stands on at low load. No setup, no orders: two marks `DURATION`
//! apart, CPU by process group as a percentage of one core, context switches and database and
//! broker work per second.

use std::time::Duration;

use serde::Serialize;

use crate::{cpu::ByGroup, meter::Meter};

/// What doing nothing cost, per second.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub seconds: f64,
    /// CPU by process group in percent of one core (null where /proc cannot be read; the
    /// `bench` group is the bench's own process).
    pub cpu_pct_of_a_core: Option<ByGroup>,
    /// Context switches per second by process group (a lower bound for a group, exact for the
    /// machine: see [`crate::cpu`]): what the system's timers and polls wake.
    pub switches_per_s: Option<ByGroup>,
    pub write_transactions_per_s: Option<f64>,
    pub commits_per_s: Option<f64>,
    pub wal_bytes_per_s: Option<f64>,
    pub messages_per_s: Option<f64>,
}

/// Waits `duration` between two marks.
pub async fn run(duration: Duration, meter: &Meter) -> IdleReport {
    let from = meter.mark().await;
    tokio::time::sleep(duration).await;
    let to = meter.mark().await;
    // Per "order" = in total over the interval.
    let costs = meter.costs(&from, &to, 1, "interval");
    let seconds = costs.cpu.as_ref().map_or(duration.as_secs_f64(), |c| c.seconds);
    let per_s = |x: Option<f64>| x.map(|v| (v / seconds * 100.0).round() / 100.0);
    // core-ms over the interval -> percent of a core: / (seconds * 1000) * 100.
    let pct = |x: Option<f64>| x.map(|ms| (ms / seconds / 10.0 * 100.0).round() / 100.0);
    let work = costs.work;
    IdleReport {
        scenario: "idle",
        seconds: (seconds * 1_000.0).round() / 1_000.0,
        switches_per_s: costs.cpu.as_ref().map(|c| {
            let w = &c.switches_per_order;
            let rate = |x: Option<f64>| x.map(|n| (n / seconds * 10.0).round() / 10.0);
            ByGroup {
                postgres: rate(w.postgres),
                rabbitmq: rate(w.rabbitmq),
                orderflow: rate(w.orderflow),
                bench: rate(w.bench),
                machine: rate(w.machine),
            }
        }),
        cpu_pct_of_a_core: costs.cpu.map(|c| {
            let m = c.core_ms_per_order;
            ByGroup {
                postgres: pct(m.postgres),
                rabbitmq: pct(m.rabbitmq),
                orderflow: pct(m.orderflow),
                bench: pct(m.bench),
                machine: pct(m.machine),
            }
        }),
        write_transactions_per_s: per_s(work.as_ref().and_then(|w| w.write_transactions_per_order)),
        commits_per_s: per_s(work.as_ref().and_then(|w| w.commits_per_order)),
        wal_bytes_per_s: per_s(work.as_ref().and_then(|w| w.wal_bytes_per_order)).map(f64::round),
        messages_per_s: per_s(work.as_ref().and_then(|w| w.messages_per_order)),
    }
}

impl IdleReport {
    pub fn table(&self) -> String {
        let n = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut out = format!("idle for {:.1} s\n", self.seconds);
        if let Some(c) = &self.cpu_pct_of_a_core {
            out += &format!(
                "  CPU, % of a core: postgres {}, rabbitmq {}, orderflow {}, machine {}\n",
                n(c.postgres),
                n(c.rabbitmq),
                n(c.orderflow),
                n(c.machine)
            );
        }
        if let Some(w) = &self.switches_per_s {
            let n = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
            out += &format!(
                "  context switches per second: postgres {}, rabbitmq {}, orderflow {}, machine {}\n",
                n(w.postgres),
                n(w.rabbitmq),
                n(w.orderflow),
                n(w.machine)
            );
        }
        out += &format!(
            "  per second: {} write transactions, {} commits, {} WAL bytes, {} messages consumed\n",
            n(self.write_transactions_per_s),
            n(self.commits_per_s),
            n(self.wal_bytes_per_s),
            n(self.messages_per_s)
        );
        out
    }
}
