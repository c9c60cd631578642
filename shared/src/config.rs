//! Configuration: one typed struct, read once in `main` from flags or same-named environment
//! variables. Nothing else reads the environment.

use std::{net::SocketAddr, time::Duration};

/// The secret used when JWT_SECRET is not set: fine on a laptop, logged as a warning.
pub const DEV_JWT_SECRET: &str = "orderflow-dev-secret-do-not-use-in-production";
/// DATABASE_URL when unset (also the default of the tools: audit, bench).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orderflow";
/// AMQP_URL when unset.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL; the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL
    )]
    pub database_url: String,

    /// RabbitMQ URL; a vhost in the path is honoured (`%2f` is the default vhost). Several
    /// nodes of one cluster: comma-separated URLs; a process connects to a live one (random
    /// order) and moves to another when it dies.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = DEFAULT_AMQP_URL,
        value_parser = crate::messaging::nodes::parse_amqp_urls
    )]
    pub amqp_url: String,

    /// Address the HTTP API listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// HS256 secret for bearer tokens. Unset: a development default (logged as a warning).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// How long an order may stay in flight before recovery cancels it (e.g. 60s, 500ms).
    #[arg(long, env = "ORDER_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub order_timeout: Duration,

    /// How often the recovery sweep looks for orders past their deadline.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Unacknowledged deliveries the broker may push to each consumer.
    #[arg(long, env = "PREFETCH", default_value_t = 64)]
    pub prefetch: u16,

    /// Transactions (batches of deliveries) each worker runs at once. Few: a step's batch
    /// handles every order waiting with a constant number of statements, and concurrent
    /// batches of one step mostly meet on the same rows (products, buckets); while one
    /// commits, the next one gathers.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2)]
    pub worker_concurrency: usize,

    /// Deliveries a worker may handle in one transaction when they are already waiting
    /// (1 turns batching off). A batch never waits to fill: at low load it is one delivery.
    #[arg(long, env = "WORKER_BATCH", default_value_t = 32)]
    pub worker_batch: usize,

    /// Maximum PostgreSQL connections per pool (`all` has two: the API's and the workers').
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// Address of a worker process's metrics listener (the API serves /metrics itself).
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP/HTTP endpoint for traces; tracing export is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// Per-user rate limit on each write route (`POST /api/orders`, `POST /api/balance/charge`,
    /// `POST /api/coupons/{id}/issue`): requests one user may send to one route per
    /// RATE_LIMIT_WINDOW, all at once at most, then one more every window/limit (GCRA). Over
    /// it: 429 `RATE_LIMITED` (RFC 6585) with `Retry-After`. 0 turns the limits off.
    #[arg(
        long,
        env = "RATE_LIMIT_WRITES",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(0..=1_000_000)
    )]
    pub rate_limit_writes: u32,

    /// The window of RATE_LIMIT_WRITES: whole seconds, 1s..=1h (e.g. 10s, 1m).
    #[arg(long, env = "RATE_LIMIT_WINDOW", default_value = "10s", value_parser = parse_rate_window)]
    pub rate_limit_window: Duration,

    /// Fault injection, for the fault suite only: the relay aborts its process after the
    /// broker confirmed every Nth batch and before marking it sent (0: never).
    #[arg(long, env = "ORDERFLOW_FAULT_RELAY_ABORT_EVERY", default_value_t = 0, hide = true)]
    pub fault_relay_abort_every: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// The JWT secret and whether it is the development default.
    pub fn jwt_secret(&self) -> (&str, bool) {
        match self.jwt_secret.as_deref() {
            Some(s) if !s.is_empty() => (s, false),
            _ => (DEV_JWT_SECRET, true),
        }
    }
}

// Never print secrets or credentials in URLs.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("http_addr", &self.http_addr)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("order_timeout", &self.order_timeout)
            .field("sweep_interval", &self.sweep_interval)
            .field("prefetch", &self.prefetch)
            .field("worker_concurrency", &self.worker_concurrency)
            .field("worker_batch", &self.worker_batch)
            .field("db_pool_size", &self.db_pool_size)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("rate_limit_writes", &self.rate_limit_writes)
            .field("rate_limit_window", &self.rate_limit_window)
            .finish_non_exhaustive()
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`, in each URL of a
/// comma-separated list.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Parses `250ms`, `60s`, `5m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 60s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    }
}

/// A rate-limit window: a duration of whole seconds within 1 s..=1 h (the IETF RateLimit
/// fields give windows in whole seconds).
pub fn parse_rate_window(s: &str) -> Result<Duration, String> {
    let window = parse_duration(s)?;
    if window.subsec_nanos() != 0 || !(1..=3_600).contains(&window.as_secs()) {
        return Err(format!("invalid rate-limit window {s:?}: whole seconds within 1s..=1h"));
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("abc").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("orderflow").chain(args.iter().copied())).map(|c| c.config)
    }

    #[test]
    fn rate_limits_and_broker_lists_are_flags_with_defaults() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.rate_limit_writes, 100);
        assert_eq!(defaults.rate_limit_window, Duration::from_secs(10));
        let off = parse(&["--rate-limit-writes", "0", "--rate-limit-window", "1m"]).unwrap();
        assert_eq!(
            (off.rate_limit_writes, off.rate_limit_window),
            (0, Duration::from_secs(60))
        );
        assert!(parse(&["--rate-limit-writes", "1000001"]).is_err());
        assert!(parse(&["--rate-limit-window", "250ms"]).is_err());
        let list = "amqp://g:g@h1:5672/%2f,amqp://g:g@h2:5672/%2f";
        assert_eq!(parse(&["--amqp-url", list]).unwrap().amqp_url, list);
        assert!(parse(&["--amqp-url", "amqp://g:g@h1/%2f,nonsense://x"]).is_err());
    }

    #[test]
    fn rate_windows_are_whole_seconds_up_to_an_hour() {
        assert_eq!(parse_rate_window("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_rate_window("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_rate_window("60m"), Ok(Duration::from_secs(3_600)));
        assert!(parse_rate_window("0s").is_err());
        assert!(parse_rate_window("1500ms").is_err());
        assert!(parse_rate_window("61m").is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqp://a:one@h1/%2f,amqp://b:two@h2/%2f"),
            "amqp://a:***@h1/%2f,amqp://b:***@h2/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
    }
}
