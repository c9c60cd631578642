//! The command line of `orderflow bench` and its validation into [`Settings`].

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail, ensure};
use orderflow_shared::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEV_JWT_SECRET, parse_duration};

/// Load a running system with orders (or a coupon rush) and report throughput and latency.
// No Debug: it holds the JWT secret.
#[derive(Clone, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the running API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,

    /// The HS256 secret the system verifies bearer tokens with: the bench signs its users'
    /// tokens. Unset: the development secret (the system's default too).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The system's PostgreSQL database: the baseline runs there (in a schema of its own)
    /// and --pg-waits samples its sessions. Nothing else is read from it.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Orders to submit.
    #[arg(long, default_value_t = 1_000)]
    pub orders: u64,

    /// Distinct users placing orders (default 100; 1,000 with --coupon-rush).
    #[arg(long)]
    pub users: Option<u64>,

    /// Distinct products ordered (each order is one line of 1-2 units).
    #[arg(long, default_value_t = 10, conflicts_with = "hot")]
    pub products: u64,

    /// Open model: submit this many orders per second, whatever the responses do.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,

    /// Closed model: this many clients, each sending its next order after the previous
    /// one was accepted (default 32 when --rate is not given).
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Fraction of orders that use a coupon (0..=1).
    #[arg(long, default_value_t = 0.0)]
    pub coupon_share: f64,

    /// All orders for one product with limited stock (--hot-stock units), one unit each.
    #[arg(long)]
    pub hot: bool,

    /// Units of the hot product.
    #[arg(long, default_value_t = 100, requires = "hot")]
    pub hot_stock: i64,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also run the same order mix as a monolith would, directly against DATABASE_URL (in a
    /// schema of its own, dropped afterwards): `sync`, one transaction per order with a
    /// statement per step; `procedure`, one call of a PL/pgSQL function per order.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,

    /// Connections the baseline uses (default: --concurrency up to 16; 16 with --rate).
    #[arg(long, requires = "baseline")]
    pub baseline_concurrency: Option<usize>,

    /// Instead of orders: --users users race for --rush-coupons coupons at once.
    #[arg(long, conflicts_with_all = ["hot", "baseline", "rate", "coupon_share"])]
    pub coupon_rush: bool,

    /// Instead of orders: measure what the running system costs doing nothing for this long
    /// (CPU by process group, database and broker work per second).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION",
          conflicts_with_all = ["hot", "baseline", "rate", "coupon_share", "coupon_rush", "concurrency"])]
    pub idle: Option<Duration>,

    /// Instead of orders through the system: the floor under its cost ([`crate::floor`]):
    /// --orders orders at --rate, each accepted and carried through --hops hops that do only
    /// what the design's guarantees require (inbox, outbox, synchronous commit, a persistent
    /// message on a quorum queue with a publisher confirm, ack after commit), in this process.
    /// Needs DATABASE_URL and AMQP_URL, not the system.
    #[arg(long, requires = "rate",
          conflicts_with_all = ["hot", "baseline", "coupon_share", "coupon_rush", "concurrency", "idle", "pg_waits"])]
    pub floor: bool,

    /// Hops each order of --floor goes through after it was accepted (the pipeline's card needs
    /// at least three: stock, payment, order).
    #[arg(long, default_value_t = 3, requires = "floor")]
    pub hops: u32,

    /// --floor with each transaction a statement at a time (BEGIN, a statement per table,
    /// COMMIT) instead of one statement: what the extra round trips cost.
    #[arg(long, requires = "floor")]
    pub floor_split: bool,

    /// --floor batched as the pipeline batches: what waits when one of two writers is free
    /// (orders to accept, deliveries to handle), up to 64, is one statement and one message.
    #[arg(long, requires = "floor", conflicts_with = "floor_split")]
    pub floor_batch: bool,

    /// The broker --floor uses (a queue of its own, deleted afterwards).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,

    /// Coupons on offer in the coupon rush.
    #[arg(long, default_value_t = 100, requires = "coupon_rush")]
    pub rush_coupons: u32,

    /// How long to wait, after the last order was sent, for every order to be terminal.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Pause between two polling rounds of the order observer.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Polling requests the observer keeps in flight at most.
    #[arg(long, default_value_t = 8)]
    pub poll_concurrency: usize,

    /// How the bench learns that an order is terminal: `poll` each user's order list, or
    /// `wait` on each order (`GET /api/orders/{id}` with `Prefer: wait=30`, RFC 7240), which
    /// the API answers when the order's status changes; `none` measures accepting alone.
    #[arg(long, value_enum, default_value_t = Observe::Poll)]
    pub observe: Observe,

    /// With `--observe wait`: requests waiting at once at most (each holds a connection);
    /// orders beyond wait for a slot, oldest first.
    #[arg(long, default_value_t = 1_000)]
    pub wait_connections: usize,

    /// Open model: requests in flight at most; an order that has to wait for a slot is late.
    #[arg(long, default_value_t = 2_048)]
    pub max_in_flight: usize,

    /// Seed of the order mix (products, quantities); the same seed gives the same mix.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// The system's processes, for its CPU per order (comma-separated pids). Default: every
    /// process named `orderflow` on this machine except the bench itself. CPU is read from
    /// /proc, so only for a system on the bench's machine.
    #[arg(long, value_delimiter = ',', value_name = "PID,...")]
    pub system_pids: Vec<u32>,

    /// Sample the wait events of the sessions on DATABASE_URL's database (pg_stat_activity)
    /// and report the time they spent waiting on locks per completed order.
    #[arg(long)]
    pub pg_waits: bool,

    /// Wait this long before a phase's first mark and after its last before reading
    /// PostgreSQL's statistics (commits, rows): its backends report them up to a second late
    /// while busy and up to 10 s late once idle, so 11s makes them exact (and adds twice that
    /// to every phase). 0s: read at once, off by up to a second's work at each end.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub work_settle: Duration,

    /// How often --pg-waits samples.
    #[arg(long, default_value = "50ms", value_parser = parse_duration, requires = "pg_waits")]
    pub pg_waits_interval: Duration,
}

/// How accepted orders are watched until they are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Observe {
    /// Poll each user's order list (`GET /api/orders`), backing off on old orders.
    Poll,
    /// Long-poll each order (`GET /api/orders/{id}`, `Prefer: wait=30`).
    Wait,
    /// Watch nothing: the run ends with the last answer (`--timeout` does not apply), nothing
    /// counts as completed, and CPU is per accepted order over the sending only (what the relay
    /// publishes after the last answer is left out). For a system that only accepts (no step
    /// workers, every order stays PENDING), where watching would only load the API.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// One synchronous PostgreSQL transaction per order, a statement per step.
    Sync,
    /// One call of a PL/pgSQL function per order: one round trip.
    Procedure,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Procedure => "procedure",
        }
    }
}

/// How orders are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadModel {
    /// Orders per second on a fixed schedule.
    Open { rate: f64 },
    /// A fixed number of clients, each waiting for its previous order to be accepted.
    Closed { concurrency: usize },
}

impl LoadModel {
    pub fn describe(&self) -> String {
        match self {
            Self::Open { rate } => format!("open model, {rate} orders/s"),
            Self::Closed { concurrency } => format!("closed model, {concurrency} clients"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Scenario {
    Orders(OrderSettings),
    CouponRush(RushSettings),
    /// Two marks this far apart, nothing sent.
    Idle(Duration),
    Floor(FloorSettings),
}

/// `--floor`: orders carried through hops that do only what the guarantees require.
#[derive(Debug, Clone, PartialEq)]
pub struct FloorSettings {
    pub orders: u64,
    /// Orders per second.
    pub rate: f64,
    pub hops: u32,
    /// Each transaction a statement at a time rather than one statement.
    pub split: bool,
    /// What waits taken as one statement and one message (`--floor-batch`).
    pub batched: bool,
    pub amqp_url: String,
    /// How long to wait, after the last order was sent, for every order to go through.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderSettings {
    pub orders: u64,
    pub users: u64,
    pub products: u64,
    pub model: LoadModel,
    pub coupon_share: f64,
    /// `Some(stock)` for the hot-product scenario.
    pub hot_stock: Option<i64>,
    pub baseline: Option<Baseline>,
    pub baseline_concurrency: Option<usize>,
    pub timeout: Duration,
    pub poll_interval: Duration,
    pub poll_concurrency: usize,
    pub observe: Observe,
    pub wait_connections: usize,
    pub max_in_flight: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RushSettings {
    pub users: u64,
    pub coupons: u32,
    /// Requests in flight at most; `None` sends every user's request at once.
    pub concurrency: Option<usize>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Base URL without a trailing slash.
    pub api: String,
    pub json: Option<PathBuf>,
    pub scenario: Scenario,
    /// The system's pids for CPU accounting; empty: found by name.
    pub system_pids: Vec<u32>,
    /// `Some(interval)`: sample PostgreSQL wait events that often.
    pub pg_waits: Option<Duration>,
    /// How long PostgreSQL's statistics are given to arrive at each end of a phase.
    pub work_settle: Duration,
}

/// Users per run at most: user ids are drawn from a block of this size.
pub const MAX_USERS: u64 = 100_000;
/// Orders per run at most (everything is kept in memory).
pub const MAX_ORDERS: u64 = 10_000_000;

impl BenchArgs {
    pub fn validate(&self) -> anyhow::Result<Settings> {
        let api = self.api.trim().trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&api).with_context(|| format!("--api {api:?} is not a URL"))?;
        ensure!(matches!(url.scheme(), "http" | "https"), "--api must be an http:// URL");
        ensure!(self.poll_concurrency >= 1, "--poll-concurrency must be at least 1");
        ensure!(
            (1..=10_000).contains(&self.wait_connections),
            "--wait-connections must be 1..=10000"
        );
        ensure!(!self.timeout.is_zero(), "--timeout must be positive");
        if let Some(c) = self.concurrency {
            ensure!((1..=10_000).contains(&c), "--concurrency must be 1..=10000");
        }
        let scenario = if self.floor {
            ensure!(
                (1..=MAX_ORDERS).contains(&self.orders),
                "--orders must be 1..={MAX_ORDERS}"
            );
            ensure!((1..=100).contains(&self.hops), "--hops must be 1..=100");
            let rate = self.rate.unwrap_or_default();
            ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 1e6,
                "--rate must be within (0, 1000000]"
            );
            Scenario::Floor(FloorSettings {
                orders: self.orders,
                rate,
                hops: self.hops,
                split: self.floor_split,
                batched: self.floor_batch,
                amqp_url: self.amqp_url.clone(),
                timeout: self.timeout,
            })
        } else if let Some(d) = self.idle {
            ensure!(
                (Duration::from_secs(1)..=Duration::from_secs(3_600)).contains(&d),
                "--idle must be within 1s..=1h"
            );
            Scenario::Idle(d)
        } else if self.coupon_rush {
            let users = self.users.unwrap_or(1_000);
            ensure!((1..=MAX_USERS).contains(&users), "--users must be 1..={MAX_USERS}");
            ensure!(
                (1..=10_000_000).contains(&self.rush_coupons),
                "--rush-coupons must be 1..=10000000"
            );
            Scenario::CouponRush(RushSettings {
                users,
                coupons: self.rush_coupons,
                concurrency: self.concurrency,
            })
        } else {
            let users = self.users.unwrap_or(100);
            ensure!(
                (1..=MAX_ORDERS).contains(&self.orders),
                "--orders must be 1..={MAX_ORDERS}"
            );
            ensure!((1..=MAX_USERS).contains(&users), "--users must be 1..={MAX_USERS}");
            ensure!((1..=10_000).contains(&self.products), "--products must be 1..=10000");
            ensure!(
                self.coupon_share.is_finite() && (0.0..=1.0).contains(&self.coupon_share),
                "--coupon-share must be within 0..=1"
            );
            ensure!(self.max_in_flight >= 1, "--max-in-flight must be at least 1");
            let model = match (self.rate, self.concurrency) {
                (Some(_), Some(_)) => bail!("give either --rate or --concurrency, not both"),
                (Some(rate), None) => {
                    ensure!(
                        rate.is_finite() && rate > 0.0 && rate <= 1e6,
                        "--rate must be within (0, 1000000]"
                    );
                    LoadModel::Open { rate }
                }
                (None, c) => LoadModel::Closed {
                    concurrency: c.unwrap_or(32),
                },
            };
            let hot_stock = if self.hot {
                ensure!(
                    (0..=1_000_000_000).contains(&self.hot_stock),
                    "--hot-stock must be 0..=1000000000"
                );
                Some(self.hot_stock)
            } else {
                None
            };
            let baseline_concurrency = self.baseline.map(|_| {
                self.baseline_concurrency.unwrap_or(match model {
                    LoadModel::Closed { concurrency } => concurrency.min(16),
                    LoadModel::Open { .. } => 16,
                })
            });
            if let Some(c) = baseline_concurrency {
                ensure!((1..=256).contains(&c), "--baseline-concurrency must be 1..=256");
            }
            Scenario::Orders(OrderSettings {
                orders: self.orders,
                users,
                products: if self.hot { 1 } else { self.products },
                model,
                coupon_share: self.coupon_share,
                hot_stock,
                baseline: self.baseline,
                baseline_concurrency,
                timeout: self.timeout,
                poll_interval: self.poll_interval,
                poll_concurrency: self.poll_concurrency,
                observe: self.observe,
                wait_connections: self.wait_connections,
                max_in_flight: self.max_in_flight,
                seed: self.seed,
            })
        };
        ensure!(
            self.work_settle <= Duration::from_secs(60),
            "--work-settle must be within 0s..=60s"
        );
        let pg_waits = self.pg_waits.then_some(self.pg_waits_interval);
        if let Some(every) = pg_waits {
            ensure!(
                (Duration::from_millis(5)..=Duration::from_secs(10)).contains(&every),
                "--pg-waits-interval must be within 5ms..=10s"
            );
        }
        Ok(Settings {
            api,
            json: self.json.clone(),
            scenario,
            system_pids: self.system_pids.clone(),
            pg_waits,
            work_settle: self.work_settle,
        })
    }

    /// The JWT secret to sign with, and whether it is the development default.
    pub fn jwt_secret(&self) -> (&str, bool) {
        match self.jwt_secret.as_deref() {
            Some(s) if !s.is_empty() => (s, false),
            _ => (DEV_JWT_SECRET, true),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
    }

    fn settings(args: &[&str]) -> anyhow::Result<Settings> {
        parse(args).map_err(anyhow::Error::from)?.validate()
    }

    fn orders(args: &[&str]) -> OrderSettings {
        match settings(args).unwrap().scenario {
            Scenario::Orders(o) => o,
            _ => panic!("expected the order scenario"),
        }
    }

    #[test]
    fn defaults_are_a_closed_model_with_32_clients() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.api, "http://127.0.0.1:8080");
        assert_eq!(s.json, None);
        let Scenario::Orders(o) = s.scenario else { panic!() };
        assert_eq!(o.orders, 1_000);
        assert_eq!(o.users, 100);
        assert_eq!(o.products, 10);
        assert_eq!(o.model, LoadModel::Closed { concurrency: 32 });
        assert_eq!(o.coupon_share, 0.0);
        assert_eq!(o.hot_stock, None);
        assert_eq!(o.baseline_concurrency, None);
        assert_eq!(o.timeout, Duration::from_secs(120));
        assert_eq!(s.system_pids, Vec::<u32>::new());
        assert_eq!(s.pg_waits, None);
    }

    #[test]
    fn every_flag_is_read() {
        let s = settings(&[
            "--api",
            "http://localhost:9000/",
            "--orders",
            "2000",
            "--users",
            "200",
            "--products",
            "5",
            "--concurrency",
            "8",
            "--coupon-share",
            "0.25",
            "--json",
            "out.json",
            "--baseline",
            "sync",
            "--timeout",
            "30s",
            "--poll-interval",
            "10ms",
            "--observe",
            "wait",
            "--wait-connections",
            "300",
            "--seed",
            "7",
            "--system-pids",
            "12,34",
            "--pg-waits",
            "--pg-waits-interval",
            "100ms",
        ])
        .unwrap();
        assert_eq!(s.api, "http://localhost:9000");
        assert_eq!(s.json.as_deref(), Some(std::path::Path::new("out.json")));
        let Scenario::Orders(o) = s.scenario else { panic!() };
        assert_eq!((o.orders, o.users, o.products), (2_000, 200, 5));
        assert_eq!(o.model, LoadModel::Closed { concurrency: 8 });
        assert_eq!(o.coupon_share, 0.25);
        assert_eq!(o.baseline_concurrency, Some(8));
        assert_eq!(o.timeout, Duration::from_secs(30));
        assert_eq!(o.poll_interval, Duration::from_millis(10));
        assert_eq!((o.observe, o.wait_connections), (Observe::Wait, 300));
        assert_eq!(o.seed, 7);
        assert_eq!(s.system_pids, vec![12, 34]);
        assert_eq!(s.pg_waits, Some(Duration::from_millis(100)));
        assert_eq!(
            settings(&["--pg-waits"]).unwrap().pg_waits,
            Some(Duration::from_millis(50))
        );
        assert!(
            parse(&["--pg-waits-interval", "10ms"]).is_err(),
            "--pg-waits-interval needs --pg-waits"
        );
    }

    #[test]
    fn the_connections_are_the_benchs_own_flags() {
        let a = parse(&["--database-url", "postgres://x@h/db", "--jwt-secret", "s3cret"]).unwrap();
        assert_eq!(a.database_url, "postgres://x@h/db");
        assert_eq!(a.jwt_secret(), ("s3cret", false));
        let a = parse(&["--jwt-secret", ""]).unwrap();
        assert_eq!(a.jwt_secret(), (DEV_JWT_SECRET, true));
    }

    #[test]
    fn rate_selects_the_open_model() {
        let o = orders(&["--rate", "250", "--baseline", "sync"]);
        assert_eq!(o.model, LoadModel::Open { rate: 250.0 });
        assert_eq!(o.baseline_concurrency, Some(16));
        let o = orders(&["--rate", "250", "--baseline", "sync", "--baseline-concurrency", "4"]);
        assert_eq!(o.baseline_concurrency, Some(4));
    }

    #[test]
    fn either_monolith_can_be_the_baseline() {
        let o = orders(&["--concurrency", "64", "--baseline", "procedure"]);
        assert_eq!(o.baseline, Some(Baseline::Procedure));
        assert_eq!(o.baseline_concurrency, Some(16));
        assert_eq!(orders(&["--baseline", "sync"]).baseline, Some(Baseline::Sync));
        assert_eq!(orders(&[]).baseline, None);
    }

    #[test]
    fn the_floor_needs_a_rate_and_nothing_of_the_order_mix() {
        assert_eq!(
            settings(&[
                "--floor",
                "--rate",
                "35",
                "--orders",
                "1400",
                "--amqp-url",
                "amqp://h/v"
            ])
            .unwrap()
            .scenario,
            Scenario::Floor(FloorSettings {
                orders: 1_400,
                rate: 35.0,
                hops: 3,
                split: false,
                batched: false,
                amqp_url: "amqp://h/v".to_owned(),
                timeout: Duration::from_secs(120),
            })
        );
        assert!(parse(&["--floor"]).is_err());
        assert!(parse(&["--floor", "--rate", "35", "--baseline", "sync"]).is_err());
        assert!(parse(&["--floor", "--rate", "35", "--coupon-share", "0.2"]).is_err());
        assert!(settings(&["--floor", "--rate", "35", "--hops", "0"]).is_err());
        assert!(parse(&["--hops", "2", "--rate", "35"]).is_err());
        assert!(parse(&["--floor-split", "--rate", "35"]).is_err());
        assert!(parse(&["--floor-batch", "--rate", "35"]).is_err());
        assert!(parse(&["--floor", "--rate", "35", "--floor-split", "--floor-batch"]).is_err());
        assert!(parse(&["--floor", "--rate", "35", "--pg-waits"]).is_err());
    }

    #[test]
    fn idle_sends_nothing_for_a_while() {
        assert_eq!(
            settings(&["--idle", "30s"]).unwrap().scenario,
            Scenario::Idle(Duration::from_secs(30))
        );
        assert!(settings(&["--idle", "0s"]).is_err());
        assert!(settings(&["--idle", "2h"]).is_err());
        assert!(parse(&["--idle", "5s", "--rate", "10"]).is_err());
        assert!(parse(&["--idle", "5s", "--coupon-rush"]).is_err());
    }

    #[test]
    fn rate_and_concurrency_exclude_each_other() {
        assert!(parse(&["--rate", "10", "--concurrency", "4"]).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "-5"],
            &["--rate", "NaN"],
            &["--concurrency", "0"],
            &["--orders", "0"],
            &["--users", "0"],
            &["--products", "0"],
            &["--coupon-share", "1.5"],
            &["--coupon-share", "-0.1"],
            &["--api", "not a url"],
            &["--api", "ftp://host"],
            &["--hot", "--hot-stock", "-1"],
            &["--timeout", "0s"],
            &["--poll-concurrency", "0"],
            &["--pg-waits", "--pg-waits-interval", "1ms"],
            &["--work-settle", "61s"],
        ] {
            assert!(settings(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&["--timeout", "2h"]).is_err());
        assert!(parse(&["--baseline", "async"]).is_err());
    }

    #[test]
    fn hot_means_one_product_with_limited_stock() {
        let o = orders(&["--hot", "--orders", "10000"]);
        assert_eq!(o.products, 1);
        assert_eq!(o.hot_stock, Some(100));
        assert_eq!(orders(&["--hot", "--hot-stock", "5"]).hot_stock, Some(5));
        assert!(parse(&["--hot", "--products", "3"]).is_err());
        assert!(parse(&["--hot-stock", "5"]).is_err(), "--hot-stock needs --hot");
    }

    #[test]
    fn coupon_rush_has_its_own_defaults_and_conflicts() {
        let s = settings(&["--coupon-rush"]).unwrap();
        assert_eq!(
            s.scenario,
            Scenario::CouponRush(RushSettings {
                users: 1_000,
                coupons: 100,
                concurrency: None
            })
        );
        let s = settings(&[
            "--coupon-rush",
            "--users",
            "50",
            "--rush-coupons",
            "5",
            "--concurrency",
            "10",
        ])
        .unwrap();
        assert_eq!(
            s.scenario,
            Scenario::CouponRush(RushSettings {
                users: 50,
                coupons: 5,
                concurrency: Some(10)
            })
        );
        assert!(parse(&["--coupon-rush", "--hot"]).is_err());
        assert!(parse(&["--coupon-rush", "--baseline", "sync"]).is_err());
        assert!(parse(&["--coupon-rush", "--rate", "5"]).is_err());
        assert!(settings(&["--coupon-rush", "--rush-coupons", "0"]).is_err());
        assert!(
            parse(&["--rush-coupons", "5"]).is_err(),
            "--rush-coupons needs --coupon-rush"
        );
    }
}
