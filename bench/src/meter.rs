//! What a phase of the run cost beyond time: CPU by process ([`cpu`]), database and broker
//! work ([`work`]) and, with `--pg-waits`, PostgreSQL wait events ([`waits`]). A [`Mark`] is
//! taken where a phase starts and ends.

use std::time::Duration;

use crate::{
    args::Settings,
    cpu::{CpuReport, Probe, Snapshot},
    waits::{Sampler, Totals, WaitReport},
    work::{self, Counters, WorkProbe, WorkReport},
};

pub struct Meter {
    cpu: Option<Probe>,
    work: WorkProbe,
    /// `--work-settle`.
    settle: Duration,
    waits: Option<Sampler>,
}

/// The counters at one moment.
pub struct Mark {
    cpu: Option<Snapshot>,
    work: Counters,
    waits: Option<Totals>,
}

/// What one phase cost per order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Costs {
    pub cpu: Option<CpuReport>,
    pub work: Option<WorkReport>,
    pub pg_waits: Option<WaitReport>,
}

impl Meter {
    /// Starts the wait-event sampler if asked; CPU is read wherever /proc can be.
    pub async fn start(settings: &Settings, database_url: &str) -> anyhow::Result<Self> {
        let waits = match settings.pg_waits {
            Some(every) => Some(Sampler::start(database_url, every).await?),
            None => None,
        };
        Ok(Self {
            cpu: Probe::new(settings.system_pids.clone()),
            work: WorkProbe::start(database_url, &settings.api).await,
            settle: settings.work_settle,
            waits,
        })
    }

    /// The counters now: the database's and the broker's are read first (two round trips),
    /// then CPU, so the CPU interval is the phase's.
    pub async fn mark(&self) -> Mark {
        let work = self.work.counters().await;
        Mark {
            cpu: self.cpu.as_ref().map(Probe::snapshot),
            work,
            waits: self.waits.as_ref().map(Sampler::totals),
        }
    }

    /// Before a phase's first mark: lets PostgreSQL's statistics of what came before arrive
    /// (`--work-settle`), so they are not counted in the phase.
    pub async fn settle(&self) {
        if !self.settle.is_zero() {
            tokio::time::sleep(self.settle).await;
        }
    }

    /// After a phase's last mark: lets the phase's own statistics arrive, then reads the
    /// database's and the broker's counters again (CPU and waits stay as marked).
    pub async fn settle_work(&self, mark: &mut Mark) {
        if !self.settle.is_zero() {
            tokio::time::sleep(self.settle).await;
            mark.work = self.work.counters().await;
        }
    }

    /// Per order between two marks; `per` says what was counted ("completed", ...).
    pub fn costs(&self, from: &Mark, to: &Mark, orders: u64, per: &'static str) -> Costs {
        Costs {
            cpu: match (&self.cpu, &from.cpu, &to.cpu) {
                (Some(p), Some(a), Some(b)) => Some(p.report(a, b, orders, per)),
                _ => None,
            },
            work: Some(work::report(&from.work, &to.work, orders, per)),
            pg_waits: match (&self.waits, &from.waits, &to.waits) {
                (Some(s), Some(a), Some(b)) => Some(s.report(a, b, orders, per)),
                _ => None,
            },
        }
    }

    pub async fn stop(self) {
        self.work.stop().await;
        if let Some(s) = self.waits {
            s.stop().await;
        }
    }
}
