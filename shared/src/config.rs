//! Configuration: one typed struct, read once in `main` from flags or same-named environment
//! variables. Nothing else reads the environment.

use std::{net::SocketAddr, time::Duration};

use clap::builder::RangedU64ValueParser;

use crate::Error;

/// The secret used when JWT_SECRET is not set: fine on a laptop, logged as a warning.
pub const DEV_JWT_SECRET: &str = "orderflow-dev-secret-do-not-use-in-production";
/// DATABASE_URL when unset (also the default of the tools: audit, bench).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orderflow";
/// AMQP_URL when unset.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// ORDER_TIMEOUT bounds. Below 100 ms every order would time out before its first step; a
/// day is far past any order's honest processing time (and the deadline message's per-message
/// TTL stays far below RabbitMQ's limit).
pub const ORDER_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(24 * 3600));
/// SWEEP_INTERVAL bounds: a timer period of zero is meaningless (and tokio's `interval` panics
/// on it); a sweep less often than hourly leaves timed-out orders in flight for too long.
pub const SWEEP_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));
/// TREND_SAMPLE_INTERVAL bounds: at 1 s the hour is 3,600 samples (a few hundred KB per
/// dashboard fetch), the most the charts need; at 10 min the hour is six points.
pub const TREND_SAMPLE_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
/// The longest duration a query string may ask for (`stuckAfter`, `olderThan`): 7 days.
/// Such a filter only ever compares with the last change of an order still in flight, and an
/// order is cancelled after ORDER_TIMEOUT (at most a day): a week covers every honest
/// question and keeps `now() - duration` far inside PostgreSQL's timestamp range.
pub const MAX_QUERY_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest duration any other flag may ask for (`orderflow bench --timeout`, ...): 7 days.
pub const MAX_DURATION: Duration = MAX_QUERY_DURATION;

/// HTTP_HEADER_TIMEOUT bounds: under a second a slow mobile client could not send its headers;
/// over ten minutes a connection that sends nothing holds its slot for too long.
pub const HTTP_HEADER_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
/// HTTP_MAX_CONNECTIONS at most: each connection is a file descriptor, and the process needs
/// some of its own for the database and the broker.
pub const MAX_HTTP_CONNECTIONS: u64 = 1_000_000;

/// WORKER_CONCURRENCY at most: permits of a semaphore, each a transaction in flight.
pub const MAX_WORKER_CONCURRENCY: u64 = 1_024;
/// WORKER_BATCH at most: deliveries in one transaction's arrays.
pub const MAX_WORKER_BATCH: u64 = 1_000;
/// WORKER_LINGER at most: every hop of an order may wait this long.
pub const MAX_WORKER_LINGER: Duration = Duration::from_secs(1);
/// DB_POOL_SIZE at most (PostgreSQL's own default `max_connections` is 100).
pub const MAX_DB_POOL_SIZE: u64 = 1_000;

#[derive(Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL (libpq's form); the database is created if missing and migrated at
    /// start. Several hosts for a highly available PostgreSQL
    /// (`postgres://h1:p1,h2:p2/db?target_session_attrs=read-write`): every process writes to
    /// the one that accepts writes and follows it through failovers. `sslmode` as libpq reads
    /// it (TLS by rustls); none means no TLS.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        value_parser = parse_database_url
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

    /// How long a client may take to send a request's head (request line and headers),
    /// counted from when its connection is ready for the next request, so also how long a
    /// kept-alive connection may stay idle; then the connection is closed. 1s..=10m. Applies
    /// to the API's and a worker's metrics listener.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_http_header_timeout)]
    pub http_header_timeout: Duration,

    /// Connections a listener serves at once; beyond it, new connections wait in the kernel's
    /// backlog until one closes, so clients cannot take the file descriptors the process needs
    /// for its database and broker connections (keep it well under `ulimit -n`). 1..=1000000.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 4_096,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_HTTP_CONNECTIONS))]
    pub http_max_connections: usize,

    /// HS256 secret for bearer tokens (development and tests; `orderflow token` signs with it).
    /// Unset: a development default (logged as a warning), and only while no AUTH_ISSUER is
    /// set: with an identity provider, HS256 tokens are accepted only with a secret of yours.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The OpenID issuer whose tokens are accepted (e.g. `https://login.example.com/realms/shop`):
    /// its discovery document (`<issuer>/.well-known/openid-configuration`) names the JWKS,
    /// and a token's `iss` must equal it exactly, a trailing `/` included. `https://`, or
    /// `http://` to this machine ([`check_key_url`]). Needs AUTH_AUDIENCE.
    #[arg(long, env = "AUTH_ISSUER", requires = "auth_audience", value_parser = parse_http_url)]
    pub auth_issuer: Option<String>,

    /// The issuer's JWKS, when it publishes no discovery document (or to skip it). Needs
    /// AUTH_ISSUER (a token's `iss` is still checked against it).
    #[arg(long, env = "AUTH_JWKS_URL", requires = "auth_issuer", value_parser = parse_http_url)]
    pub auth_jwks_url: Option<String>,

    /// The audience a token must name in `aud` (this API's client id or resource); several,
    /// comma-separated: any of them.
    #[arg(long, env = "AUTH_AUDIENCE", requires = "auth_issuer")]
    pub auth_audience: Option<String>,

    /// Which identity-provider tokens are admins: `claim=value`, the claim a dotted path
    /// (`roles=orderflow-admin`, `realm_access.roles=orderflow-admin` for Keycloak,
    /// `scope=orderflow:admin`); a list claim must contain the value, a string claim must hold
    /// it as one of its space-separated words. Unset: no provider token is an admin.
    #[arg(long, env = "AUTH_ADMIN_CLAIM", requires = "auth_issuer", value_parser = parse_admin_claim)]
    pub auth_admin_claim: Option<String>,

    /// How long an order may stay in flight before recovery cancels it (e.g. 60s, 500ms);
    /// 100ms..=24h.
    #[arg(long, env = "ORDER_TIMEOUT", default_value = "60s", value_parser = parse_order_timeout)]
    pub order_timeout: Duration,

    /// How often the recovery sweep looks for orders past their deadline; 100ms..=1h.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "10s", value_parser = parse_sweep_interval)]
    pub sweep_interval: Duration,

    /// How often the API samples the pipeline for the ops dashboard's "last hour" charts
    /// (orders accepted/confirmed/cancelled, latencies, dead letters, queue depths); it keeps
    /// the last hour of samples in memory. 1s..=10m.
    #[arg(
        long,
        env = "TREND_SAMPLE_INTERVAL",
        default_value = "10s",
        value_parser = parse_trend_sample_interval
    )]
    pub trend_sample_interval: Duration,

    /// Unacknowledged deliveries the broker may push to each consumer.
    #[arg(long, env = "PREFETCH", default_value_t = 64)]
    pub prefetch: u16,

    /// Transactions (batches of deliveries) each worker runs at once; 1..=1024. Few: a step's
    /// batch handles every order waiting with a constant number of statements, and concurrent
    /// batches of one step mostly meet on the same rows (products, buckets); while one
    /// commits, the next one gathers.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_WORKER_CONCURRENCY))]
    pub worker_concurrency: usize,

    /// Deliveries a worker may handle in one transaction when they are already waiting
    /// (1 turns batching off). A batch never waits to fill: at low load it is one delivery.
    /// 1..=1000.
    #[arg(long, env = "WORKER_BATCH", default_value_t = 32,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_WORKER_BATCH))]
    pub worker_batch: usize,

    /// While another batch of the same worker is in flight (the machine is busy), a new batch
    /// also takes the deliveries that arrive within this time before it starts; with nothing
    /// in flight a batch starts at once. 0ms..=1s; 0 turns it off. Under load a hop's batches
    /// grow instead of its transactions multiplying, which leaves the CPU to the API's accepts
    /// (docs/PERFORMANCE.md).
    #[arg(long, env = "WORKER_LINGER", default_value = "10ms", value_parser = parse_worker_linger)]
    pub worker_linger: Duration,

    /// Maximum PostgreSQL connections per pool (`all` has two: the API's and the workers');
    /// 1..=1000.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16,
          value_parser = RangedU64ValueParser::<u32>::new().range(1..=MAX_DB_POOL_SIZE))]
    pub db_pool_size: u32,

    /// Whether the workers' connections ask PostgreSQL to plan each prepared statement once
    /// (`plan_cache_mode=force_generic_plan` in the connection's startup options; see
    /// `db::worker_pool`). If the database refuses the option (a pooler such as PgBouncer), the
    /// workers go without it, with a warning; `false` does not ask. Either way without it the
    /// server's setting applies.
    #[arg(long, env = "WORKER_GENERIC_PLANS", default_value_t = true, action = clap::ArgAction::Set)]
    pub worker_generic_plans: bool,

    /// Address of a worker process's metrics listener (the API serves /metrics itself).
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP/HTTP endpoint for traces; tracing export is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// Per-user rate limit on each write route (`POST /api/orders`, `POST /api/orders/{id}/cancel`,
    /// `POST /api/balance/charge`, `POST /api/coupons/{id}/issue`): requests one user may send to one route per
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
    /// The HS256 secret tokens may be signed with: JWT_SECRET, or the development default
    /// while no identity provider is configured; `None` with an issuer and no JWT_SECRET.
    pub fn hs256_secret(&self) -> Option<&str> {
        match self.jwt_secret.as_deref() {
            Some(s) if !s.is_empty() => Some(s),
            _ if self.auth_issuer.is_some() => None,
            _ => Some(DEV_JWT_SECRET),
        }
    }

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
            .field("http_header_timeout", &self.http_header_timeout)
            .field("http_max_connections", &self.http_max_connections)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("auth_issuer", &self.auth_issuer)
            .field("auth_jwks_url", &self.auth_jwks_url)
            .field("auth_audience", &self.auth_audience)
            .field("auth_admin_claim", &self.auth_admin_claim)
            .field("order_timeout", &self.order_timeout)
            .field("sweep_interval", &self.sweep_interval)
            .field("trend_sample_interval", &self.trend_sample_interval)
            .field("prefetch", &self.prefetch)
            .field("worker_concurrency", &self.worker_concurrency)
            .field("worker_batch", &self.worker_batch)
            .field("worker_linger", &self.worker_linger)
            .field("db_pool_size", &self.db_pool_size)
            .field("worker_generic_plans", &self.worker_generic_plans)
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

/// AUTH_ISSUER, AUTH_JWKS_URL: an `https://` URL with a host and no fragment, kept exactly as
/// given (an issuer is compared with a token's `iss` as it is, trailing `/` included: Auth0's
/// and Entra's end in one). `http://` only for a loopback host, see [`check_key_url`].
pub fn parse_http_url(s: &str) -> Result<String, String> {
    check_key_url(s).map(|()| s.to_owned())
}

/// Whether `url` may be where signing keys come from: `https://` with a host and no fragment,
/// or `http://` to a loopback host (`localhost`, 127.0.0.0/8, `[::1]`: a provider on the same
/// machine). Keys fetched over plain HTTP from elsewhere could be replaced by anyone on the
/// path, who could then sign tokens, an admin's among them. Err says what is wrong.
pub fn check_key_url(url: &str) -> Result<(), String> {
    let (rest, secure) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (rest, true),
        (None, Some(rest)) => (rest, false),
        _ => return Err(format!("{url:?} is not an https:// URL")),
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.is_empty() || url.contains(['#', ' ']) {
        return Err(format!("{url:?} is not an https:// URL with a host"));
    }
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
    };
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !secure && !loopback {
        return Err(format!(
            "{url:?} is plain http:// to another host: keys fetched so could be replaced on the way (use https://; http:// is for a provider on this machine)"
        ));
    }
    Ok(())
}

/// AUTH_ADMIN_CLAIM: `path=value`, the path dot-separated claim names.
pub fn parse_admin_claim(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((path, value)) if !value.is_empty() && !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => {
            Ok(s.to_owned())
        }
        _ => Err(format!("{s:?} is not claim=value (e.g. roles=orderflow-admin)")),
    }
}

/// DATABASE_URL, checked at start ([`crate::db::DatabaseUrl`]); kept as given.
pub fn parse_database_url(s: &str) -> Result<String, String> {
    crate::db::DatabaseUrl::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Parses a duration: a whole number without sign or leading zeros, then a unit `ms`, `s`
/// or `m` (none: seconds), e.g. `250ms`, `60s`, `5m`, `30`. The number is multiplied with
/// checked arithmetic, and the result must lie within `min..=max`: a number too large for
/// `u64` or a product that overflows is out of range, never wrapped.
///
/// [`duration_pattern`] is the same grammar and bounds as a regular expression.
pub fn parse_duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        _ => return Err(format!("invalid duration {s:?}: expected e.g. 500ms, 60s, 5m")),
    };
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return Err(format!("invalid duration {s:?}: expected e.g. 500ms, 60s, 5m"));
    }
    let out_of_range = || format!("duration {s:?} is out of range: {}..={}", show(min), show(max));
    // Only digits are left, so the one way to fail is a number too large for u64.
    let n: u64 = digits.parse().map_err(|_| out_of_range())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(out_of_range)?;
    let duration = Duration::from_millis(ms);
    if duration < min || duration > max {
        return Err(out_of_range());
    }
    Ok(duration)
}

/// [`parse_duration_within`] `0..=`[`MAX_DURATION`], surrounding whitespace ignored: for flags.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), Duration::ZERO, MAX_DURATION)
}

/// ORDER_TIMEOUT: [`ORDER_TIMEOUT_RANGE`].
pub fn parse_order_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), ORDER_TIMEOUT_RANGE.0, ORDER_TIMEOUT_RANGE.1)
}

/// SWEEP_INTERVAL: [`SWEEP_INTERVAL_RANGE`].
pub fn parse_sweep_interval(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), SWEEP_INTERVAL_RANGE.0, SWEEP_INTERVAL_RANGE.1)
}

/// HTTP_HEADER_TIMEOUT: [`HTTP_HEADER_TIMEOUT_RANGE`].
pub fn parse_http_header_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), HTTP_HEADER_TIMEOUT_RANGE.0, HTTP_HEADER_TIMEOUT_RANGE.1)
}

/// TREND_SAMPLE_INTERVAL: [`TREND_SAMPLE_INTERVAL_RANGE`].
pub fn parse_trend_sample_interval(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), TREND_SAMPLE_INTERVAL_RANGE.0, TREND_SAMPLE_INTERVAL_RANGE.1)
}

/// WORKER_LINGER: `0ms..=`[`MAX_WORKER_LINGER`].
pub fn parse_worker_linger(s: &str) -> Result<Duration, String> {
    parse_duration_within(s.trim(), Duration::ZERO, MAX_WORKER_LINGER)
}

/// A duration from a query string (`stuckAfter`, `olderThan`): exactly the grammar of
/// [`parse_duration_within`] (no whitespace), `0..=`[`MAX_QUERY_DURATION`]; anything else is a
/// 400 `INVALID_DURATION`.
pub fn query_duration(s: &str) -> Result<Duration, Error> {
    parse_duration_within(s, Duration::ZERO, MAX_QUERY_DURATION).map_err(|e| Error::bad_request("INVALID_DURATION", e))
}

/// A regular expression (ECMA-262, anchored) that matches exactly the strings
/// [`parse_duration_within`] accepts with `min` zero and this `max`: for an OpenAPI `pattern`.
pub fn duration_pattern(max: Duration) -> String {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    format!(
        "^(?:(?:{})s?|(?:{})ms|(?:{})m)$",
        up_to(ms / 1_000),
        up_to(ms),
        up_to(ms / 60_000)
    )
}

/// An alternation matching the decimal numbers `0..=n` without leading zeros.
fn up_to(n: u64) -> String {
    let digits: Vec<u8> = n.to_string().bytes().map(|b| b - b'0').collect();
    let k = digits.len();
    let mut alternatives = vec!["0".to_owned()];
    if k >= 2 {
        // Every number with fewer digits than n.
        alternatives.push(format!("[1-9][0-9]{{0,{}}}", k - 2));
    }
    // Numbers with as many digits as n: n's first i digits, then a smaller digit, then any.
    for (i, &d) in digits.iter().enumerate() {
        let low = u8::from(i == 0);
        if d > low {
            let class = if d - 1 == low {
                low.to_string()
            } else {
                format!("[{low}-{}]", d - 1)
            };
            let prefix: String = digits[..i].iter().map(|d| char::from(b'0' + d)).collect();
            let rest = k - i - 1;
            let tail = if rest > 0 {
                format!("[0-9]{{{rest}}}")
            } else {
                String::new()
            };
            alternatives.push(format!("{prefix}{class}{tail}"));
        }
    }
    if n > 0 {
        alternatives.push(n.to_string());
    }
    alternatives.join("|")
}

/// `90s`, `1500ms`, `2m`: the largest unit that shows the duration exactly.
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
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
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration(" 60s "), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "2h", "abc", "", "s", "-1s", "+1s", "1.5s", "060s", "1 s", "1S", "1sec", "ms",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_never_overflow_or_wrap() {
        // 307445734561825861 minutes is 2^64 + 44 seconds' worth of milliseconds: the
        // multiplication used to wrap to 44 s.
        for huge in [
            "300000000000s",
            "18446744073709551615s",
            "18446744073709551616",
            "307445734561825861m",
            "99999999999999999999999999ms",
            "604801s",
        ] {
            let err = query_duration(huge).err().and_then(|e| e.code());
            assert_eq!(err, Some("INVALID_DURATION"), "{huge}");
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert_eq!(query_duration("604800s").ok(), Some(MAX_QUERY_DURATION));
        assert_eq!(query_duration("10080m").ok(), Some(MAX_QUERY_DURATION));
        assert_eq!(query_duration("604800000ms").ok(), Some(MAX_QUERY_DURATION));
        assert!(query_duration("604800001ms").is_err());
        assert!(query_duration("10081m").is_err());
        // No trimming in a query string: the schema's pattern has no room for spaces.
        assert!(query_duration(" 5s").is_err());
    }

    #[test]
    fn config_durations_are_bounded() {
        assert_eq!(parse_order_timeout("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_order_timeout("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_order_timeout("1440m"), Ok(Duration::from_secs(86_400)));
        for bad in [
            "0",
            "99ms",
            "1441m",
            "86401",
            "18446744073709551615s",
            "307445734561825861m",
        ] {
            let err = parse_order_timeout(bad).unwrap_err();
            assert!(err.contains("out of range: 100ms..=1440m"), "{bad}: {err}");
        }
        assert_eq!(parse_sweep_interval("10s"), Ok(Duration::from_secs(10)));
        for bad in ["0", "0ms", "61m", "3601s"] {
            assert!(parse_sweep_interval(bad).is_err(), "{bad}");
        }
    }

    /// The OpenAPI pattern and the parser agree on every string near every boundary.
    #[test]
    fn the_duration_pattern_matches_exactly_what_parses() {
        for max in [
            MAX_QUERY_DURATION,
            Duration::from_secs(1),
            Duration::from_millis(999),
            Duration::from_secs(90),
            Duration::from_secs(100_000),
            Duration::ZERO,
        ] {
            let pattern = duration_pattern(max);
            let re = regex::Regex::new(&pattern).unwrap();
            let ms = max.as_millis() as u64;
            let mut numbers: Vec<String> = vec!["".into(), "00".into(), "01".into(), "007".into()];
            for base in [
                0,
                1,
                ms / 60_000,
                ms / 1_000,
                ms,
                u64::MAX / 1_000,
                u64::MAX / 60_000,
                u64::MAX,
            ] {
                for delta in 0..12u64 {
                    numbers.push(base.saturating_add(delta).to_string());
                    numbers.push(base.saturating_sub(delta).to_string());
                }
                // Same length as base, other digits.
                numbers.push(base.to_string().replace(|c: char| c != '0', "9"));
            }
            numbers.extend((0..2_000u64).map(|n| n.to_string()));
            numbers.push("18446744073709551616".into());
            numbers.push("99999999999999999999999".into());
            for n in &numbers {
                for unit in ["", "s", "ms", "m", "h", " s", "S"] {
                    let s = format!("{n}{unit}");
                    assert_eq!(
                        re.is_match(&s),
                        parse_duration_within(&s, Duration::ZERO, max).is_ok(),
                        "{s:?} against {pattern}"
                    );
                }
            }
        }
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
    fn the_http_limits_have_defaults_and_bounds() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.http_header_timeout, Duration::from_secs(30));
        assert_eq!(defaults.http_max_connections, 4_096);
        let set = parse(&["--http-header-timeout", "5s", "--http-max-connections", "10"]).unwrap();
        assert_eq!(
            (set.http_header_timeout, set.http_max_connections),
            (Duration::from_secs(5), 10)
        );
        for bad in [
            ["--http-header-timeout", "500ms"],
            ["--http-header-timeout", "11m"],
            ["--http-max-connections", "0"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
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
    fn signing_keys_come_over_https_or_from_this_machine() {
        for ok in [
            "https://login.example.com/realms/shop",
            "https://tenant.auth0.com/",
            "http://127.0.0.1:8080",
            "http://localhost/jwks",
            "http://[::1]:9000/",
            "http://127.1.2.3",
        ] {
            assert_eq!(parse_http_url(ok).as_deref(), Ok(ok), "kept exactly as given");
        }
        for bad in [
            "http://idp.example.com",
            "http://10.0.0.1/jwks",
            "http://localhost.evil.example/",
            "http://127.0.0.1@evil.example/",
            "ftp://idp.example.com",
            "https://",
            "https:///path",
            "https://idp.example.com/#frag",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_identity_provider_needs_its_audience_and_turns_the_development_secret_off() {
        let issuer = "https://login.example.com/realms/shop/";
        assert!(parse(&["--auth-issuer", issuer]).is_err(), "AUTH_AUDIENCE is required");
        assert!(parse(&["--auth-audience", "shop"]).is_err(), "AUTH_ISSUER is required");
        assert!(parse(&["--auth-issuer", "login.example.com", "--auth-audience", "shop"]).is_err());
        assert!(
            parse(&[
                "--auth-issuer",
                issuer,
                "--auth-audience",
                "shop",
                "--auth-admin-claim",
                "roles"
            ])
            .is_err()
        );
        let with = parse(&[
            "--auth-issuer",
            issuer,
            "--auth-audience",
            "shop",
            "--auth-admin-claim",
            "realm_access.roles=admin",
        ])
        .unwrap();
        assert_eq!(
            with.auth_issuer.as_deref(),
            Some(issuer),
            "as given, its trailing / kept"
        );
        assert_eq!(with.hs256_secret(), None, "no development secret beside a provider");
        let both = parse(&[
            "--auth-issuer",
            issuer,
            "--auth-audience",
            "shop",
            "--jwt-secret",
            "s3cret",
        ])
        .unwrap();
        assert_eq!(both.hs256_secret(), Some("s3cret"));
        assert_eq!(parse(&[]).unwrap().hs256_secret(), Some(DEV_JWT_SECRET));
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
