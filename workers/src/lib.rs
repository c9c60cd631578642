//! The workers: the outbox relay and one consumer per pipeline step, all on one runtime.

pub mod broker;
pub mod relay;
pub mod retired;
pub mod runtime;
pub mod statistics;
pub mod steps;
pub mod sweep;

use std::{sync::Arc, time::Duration};

use orderflow_shared::{config::Config, db::outbox::Feed};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    runtime::{RuntimeConfig, Step},
    steps::{
        coupon::Coupon, dead_letters::DeadLetters, order::Order, payment::Payment, recovery::Expiry, stock::Stock,
    },
};

/// Every worker process kind (`orderflow worker <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerKind {
    /// Publishes the outbox to RabbitMQ.
    Relay,
    /// Reserves and releases stock.
    Stock,
    /// Applies and restores coupons.
    Coupon,
    /// Charges and refunds balances.
    Payment,
    /// Confirms orders (counting their units for popular products) and finishes cancellations.
    Order,
    /// Cancels orders past their deadline, records dead letters, sweeps for stuck orders (and
    /// keeps the planner's statistics when autovacuum is off, and retires the queues of earlier
    /// releases, `retired`).
    Recovery,
}

impl WorkerKind {
    pub const ALL: &[Self] = &[
        Self::Relay,
        Self::Stock,
        Self::Coupon,
        Self::Payment,
        Self::Order,
        Self::Recovery,
    ];
}

/// Runs one worker until `shutdown`. `feed` carries the rows the steps commit to the relay,
/// when it is the same for both (see [`spawn`]).
pub async fn run(
    kind: WorkerKind,
    pool: PgPool,
    config: &Config,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = RuntimeConfig {
        amqp_url: config.amqp_url.clone(),
        prefetch: config.prefetch,
        concurrency: config.worker_concurrency,
        batch: config.worker_batch,
        linger: config.worker_linger,
        drain_timeout: Duration::from_secs(10),
        feed: feed.clone(),
    };
    match kind {
        WorkerKind::Relay => relay::run(pool, cfg.amqp_url, config.fault_relay_abort_every, feed, shutdown).await,
        WorkerKind::Stock => consume(Stock, pool, cfg, shutdown).await,
        WorkerKind::Coupon => consume(Coupon, pool, cfg, shutdown).await,
        WorkerKind::Payment => consume(Payment, pool, cfg, shutdown).await,
        WorkerKind::Order => consume(Order, pool, cfg, shutdown).await,
        WorkerKind::Recovery => {
            let (expiry, dead, sweep, statistics, retired) = tokio::join!(
                consume(Expiry, pool.clone(), cfg.clone(), shutdown.clone()),
                consume(DeadLetters, pool.clone(), cfg, shutdown.clone()),
                sweep::run(
                    pool.clone(),
                    config.sweep_interval,
                    config.order_timeout,
                    shutdown.clone()
                ),
                statistics::run(pool.clone(), shutdown.clone()),
                retired::run(config.amqp_url.clone(), pool, shutdown),
            );
            expiry.and(dead).and(sweep).and(statistics).and(retired)
        }
    }
}

async fn consume<S: Step>(
    step: S,
    pool: PgPool,
    cfg: RuntimeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    runtime::run(step, pool, cfg, shutdown).await
}

/// Spawns every worker in `kinds` onto `set`; the steps among them hand what they commit to
/// the relay among them (if it leads).
pub fn spawn(
    set: &mut JoinSet<anyhow::Result<()>>,
    kinds: &[WorkerKind],
    pool: &PgPool,
    config: &Config,
    shutdown: &CancellationToken,
) {
    spawn_fed(set, kinds, pool, config, Arc::new(Feed::default()), shutdown);
}

/// [`spawn`], with the feed given: others that write the outbox on the same database in this
/// process (the API's order acceptance) hand their rows over through it too.
pub fn spawn_fed(
    set: &mut JoinSet<anyhow::Result<()>>,
    kinds: &[WorkerKind],
    pool: &PgPool,
    config: &Config,
    feed: Arc<Feed>,
    shutdown: &CancellationToken,
) {
    for &kind in kinds {
        let (pool, config, feed, shutdown) = (pool.clone(), config.clone(), feed.clone(), shutdown.clone());
        set.spawn(async move { run(kind, pool, &config, feed, shutdown).await });
    }
}
