//! What a phase of the run cost beyond time: CPU by process ([`cpu`]) and, with `--pg-waits`,
//! PostgreSQL wait events ([`waits`]). A [`Mark`] is taken where a phase starts and ends.

use crate::{
    args::Settings,
    cpu::{CpuReport, Probe, Snapshot},
    waits::{Sampler, Totals, WaitReport},
};

pub struct Meter {
    cpu: Option<Probe>,
    waits: Option<Sampler>,
}

/// The counters at one moment.
pub struct Mark {
    cpu: Option<Snapshot>,
    waits: Option<Totals>,
}

/// What one phase cost per order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Costs {
    pub cpu: Option<CpuReport>,
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
            waits,
        })
    }

    pub fn mark(&self) -> Mark {
        Mark {
            cpu: self.cpu.as_ref().map(Probe::snapshot),
            waits: self.waits.as_ref().map(Sampler::totals),
        }
    }

    /// Per order between two marks; `per` says what was counted ("completed", ...).
    pub fn costs(&self, from: &Mark, to: &Mark, orders: u64, per: &'static str) -> Costs {
        Costs {
            cpu: match (&self.cpu, &from.cpu, &to.cpu) {
                (Some(p), Some(a), Some(b)) => Some(p.report(a, b, orders, per)),
                _ => None,
            },
            pg_waits: match (&self.waits, &from.waits, &to.waits) {
                (Some(s), Some(a), Some(b)) => Some(s.report(a, b, orders, per)),
                _ => None,
            },
        }
    }

    pub async fn stop(self) {
        if let Some(s) = self.waits {
            s.stop().await;
        }
    }
}
