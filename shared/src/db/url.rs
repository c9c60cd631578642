//! DATABASE_URL as libpq reads it (PostgreSQL's "Connection URIs", libpq §34.1.1), including
//! the multi-host form a highly available PostgreSQL hands out (what `pg_autoctl show uri`
//! prints):
//!
//! ```text
//! postgres://user:password@h1:5432,h2:5433,[::1]:5434/orderflow?target_session_attrs=read-write&sslmode=require
//! ```
//!
//! sqlx reads one host; each host here becomes the sqlx options of one node (same user,
//! password, database and parameters). libpq's own parameters that sqlx does not know are
//! read here: `target_session_attrs` (`any`, `read-write` or `primary`: every orderflow
//! process writes, so with several hosts it always looks for the node that accepts writes;
//! `read-only`, `standby` and `prefer-standby` are refused), `load_balance_hosts` (`disable`,
//! `random`) and `connect_timeout` (seconds, per host). `sslmode` is libpq's (`disable`,
//! `allow`, `prefer`, `require`, `verify-ca`, `verify-full`, TLS by rustls); without one,
//! orderflow does not use TLS (`disable`), as it always has for its default local URL, where
//! libpq would try it first (`prefer`).

use std::{fmt, str::FromStr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// The default PostgreSQL port, for a host given without one.
pub const DEFAULT_PORT: u16 = 5432;
/// How long connecting to one host may take when the URL gives no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed DATABASE_URL: one node per host, in the URL's order.
#[derive(Clone)]
pub struct DatabaseUrl {
    /// `host:port` of each node, for logs (no credentials).
    pub hosts: Vec<String>,
    /// The sqlx options of each node, in the same order.
    pub nodes: Vec<PgConnectOptions>,
    /// Whether the node must accept writes (`read-write`, `primary`, or several hosts).
    pub needs_writes: bool,
    /// `load_balance_hosts=random`: try the hosts in a random order.
    pub random_order: bool,
    /// How long connecting to one host may take.
    pub connect_timeout: Duration,
}

/// What is wrong with a DATABASE_URL, naming the part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(pub String);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DATABASE_URL: {}", self.0)
    }
}

impl std::error::Error for UrlError {}

fn bad(what: impl Into<String>) -> UrlError {
    UrlError(what.into())
}

impl DatabaseUrl {
    /// Parses a libpq connection URI with one or more hosts. Errors name the part that is
    /// wrong (the scheme, a host, a port, a parameter), never the password.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad("expected postgres://[user[:password]@]host[:port][,host[:port]...][/database][?parameters]")
        })?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(bad(format!(
                "the scheme is {scheme:?}; expected postgres or postgresql"
            )));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };

        // libpq's own parameters, taken out before sqlx reads the rest.
        let mut needs_writes = false;
        let mut random_order = false;
        let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        let mut has_ssl_mode = false;
        let mut kept = Vec::new();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "target_session_attrs" => {
                    needs_writes = match value {
                        "any" => false,
                        "read-write" | "primary" => true,
                        "read-only" | "standby" | "prefer-standby" => {
                            return Err(bad(format!(
                                "target_session_attrs={value}: orderflow writes, so it needs read-write (or primary, or any)"
                            )));
                        }
                        other => {
                            return Err(bad(format!(
                                "target_session_attrs={other:?} is not one of any, read-write, primary"
                            )));
                        }
                    }
                }
                "load_balance_hosts" => {
                    random_order = match value {
                        "disable" => false,
                        "random" => true,
                        other => return Err(bad(format!("load_balance_hosts={other:?} is not disable or random"))),
                    }
                }
                "connect_timeout" => {
                    let secs: u64 = value.parse().ok().filter(|s| (1..=3_600).contains(s)).ok_or_else(|| {
                        bad(format!(
                            "connect_timeout={value:?} is not a whole number of seconds, 1..=3600"
                        ))
                    })?;
                    connect_timeout = Duration::from_secs(secs);
                }
                "host" | "hostaddr" | "port" if host_list.contains(',') => {
                    return Err(bad(format!(
                        "{key}= cannot be combined with several hosts: give each as host:port in the URL"
                    )));
                }
                "sslmode" | "ssl-mode" => {
                    has_ssl_mode = true;
                    PgSslMode::from_str(value).map_err(|_| {
                        bad(format!(
                            "sslmode={value:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ))
                    })?;
                    kept.push(pair);
                }
                _ => kept.push(pair),
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();

        let mut hosts = Vec::new();
        let mut nodes = Vec::new();
        let several = host_list.contains(',');
        for (i, host) in host_list.split(',').enumerate() {
            let (name, port) = split_host(host).map_err(|why| {
                if several {
                    bad(format!("host {} of the list ({host:?}): {why}", i + 1))
                } else {
                    bad(format!("the host {host:?}: {why}"))
                }
            })?;
            let node_url = format!("{scheme}://{userinfo}{name}:{port}{path}{query}");
            let mut options =
                PgConnectOptions::from_str(&node_url).map_err(|e| bad(redact_sqlx(&e.to_string(), url)))?;
            if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
                // A socket address wants the bare address, not the URL's bracketed form.
                options = options.host(v6);
            }
            if !has_ssl_mode {
                options = options.ssl_mode(PgSslMode::Disable);
            }
            hosts.push(format!("{name}:{port}"));
            nodes.push(options);
        }
        Ok(Self {
            needs_writes: needs_writes || nodes.len() > 1,
            hosts,
            nodes,
            random_order,
            connect_timeout,
        })
    }

    /// Whether the URL names several hosts (a highly available PostgreSQL).
    pub fn is_multi_host(&self) -> bool {
        self.nodes.len() > 1
    }

    /// The same nodes with another database (e.g. `postgres`, to create the target one).
    pub fn with_database(&self, database: &str) -> Self {
        let mut other = self.clone();
        other.nodes = other.nodes.into_iter().map(|n| n.database(database)).collect();
        other
    }

    /// The database every node is asked for.
    pub fn database(&self) -> Option<&str> {
        self.nodes.first().and_then(PgConnectOptions::get_database)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("hosts", &self.hosts)
            .field("needs_writes", &self.needs_writes)
            .field("random_order", &self.random_order)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; the host percent-decoded by sqlx later.
fn split_host(host: &str) -> Result<(String, u16), String> {
    if host.is_empty() {
        return Err("empty (a host name or address is needed)".into());
    }
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("an IPv6 address needs its closing ']'")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("[{addr}] is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected ':port' after ']'")?),
        };
        (format!("[{addr}]"), port)
    } else {
        match host.rsplit_once(':') {
            Some((name, _)) if name.contains(':') => {
                return Err("an IPv6 address must be in brackets: [::1]:5432".into());
            }
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() {
        return Err("empty host name before the port".into());
    }
    if name.contains(['/', '?', '#', '@', ' ']) {
        return Err("a host name cannot contain '/', '?', '#', '@' or spaces".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p:?} is not a number within 1..=65535"))?,
    };
    Ok((name, port))
}

/// sqlx's message about a URL, without a password it might quote.
fn redact_sqlx(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => message.replace(p, "***"),
        None => message.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<DatabaseUrl, String> {
        DatabaseUrl::parse(url).map_err(|e| e.to_string())
    }

    #[test]
    fn one_host_reads_as_sqlx_reads_it() {
        let u = parse("postgres://postgres@127.0.0.1:5432/orderflow").unwrap();
        assert_eq!(u.hosts, ["127.0.0.1:5432"]);
        assert!(!u.is_multi_host() && !u.needs_writes);
        let n = &u.nodes[0];
        assert_eq!(
            (n.get_host(), n.get_port(), n.get_database()),
            ("127.0.0.1", 5432, Some("orderflow"))
        );
        assert_eq!(n.get_username(), "postgres");
        assert!(matches!(n.get_ssl_mode(), PgSslMode::Disable));
        assert_eq!(parse("postgresql://u@db/x").unwrap().hosts, ["db:5432"]);
    }

    #[test]
    fn several_hosts_with_ports_ipv6_and_percent_encoding() {
        let u = parse(
            "postgres://us%40er:p%2Fss%3Aw@h1:6001,localhost:6002,[::1]:6003,[fe80::1]/my%20db\
             ?target_session_attrs=read-write&sslmode=require&connect_timeout=2&load_balance_hosts=random\
             &application_name=orderflow",
        )
        .unwrap();
        assert_eq!(u.hosts, ["h1:6001", "localhost:6002", "[::1]:6003", "[fe80::1]:5432"]);
        assert!(u.is_multi_host() && u.needs_writes && u.random_order);
        assert_eq!(u.connect_timeout, Duration::from_secs(2));
        for n in &u.nodes {
            assert_eq!(n.get_username(), "us@er");
            assert_eq!(n.get_database(), Some("my db"));
            assert!(matches!(n.get_ssl_mode(), PgSslMode::Require));
            assert_eq!(n.get_application_name(), Some("orderflow"));
        }
        assert_eq!(u.nodes[2].get_host(), "::1");
        // Several hosts always look for the writable one, whatever target_session_attrs says.
        assert!(parse("postgres://h1,h2/db").unwrap().needs_writes);
        assert!(
            parse("postgres://h1/db?target_session_attrs=primary")
                .unwrap()
                .needs_writes
        );
        assert!(!parse("postgres://h1/db?target_session_attrs=any").unwrap().needs_writes);
        // Debug output names hosts, never credentials.
        assert!(!format!("{u:?}").contains("p/ss"));
        assert_eq!(
            parse("postgres://a,b/db").unwrap().with_database("postgres").database(),
            Some("postgres")
        );
    }

    #[test]
    fn bad_urls_name_the_part_that_is_wrong() {
        let cases = [
            ("localhost:5432/db", "expected postgres://"),
            ("mysql://h/db", "the scheme is \"mysql\""),
            ("postgres://h1,,h2/db", "host 2 of the list (\"\"): empty"),
            (
                "postgres://h1:99999,h2/db",
                "host 1 of the list (\"h1:99999\"): port \"99999\"",
            ),
            ("postgres://h1:0/db", "port \"0\""),
            ("postgres://h1,h2:x/db", "host 2 of the list (\"h2:x\"): port \"x\""),
            ("postgres://::1:5432/db", "IPv6 address must be in brackets"),
            ("postgres://[::1:5432/db", "closing ']'"),
            ("postgres://[nothost]:1/db", "[nothost] is not an IPv6 address"),
            ("postgres://[::1]x/db", "expected ':port' after ']'"),
            ("postgres://:5432/db", "empty host name"),
            ("postgres://h1,h2/db?target_session_attrs=standby", "orderflow writes"),
            (
                "postgres://h1/db?target_session_attrs=sometimes",
                "not one of any, read-write, primary",
            ),
            ("postgres://h1/db?load_balance_hosts=yes", "load_balance_hosts"),
            ("postgres://h1/db?connect_timeout=0", "connect_timeout"),
            ("postgres://h1/db?sslmode=maybe", "sslmode=\"maybe\""),
            (
                "postgres://h1,h2/db?port=5",
                "port= cannot be combined with several hosts",
            ),
        ];
        for (url, want) in cases {
            let err = parse(url).err().unwrap_or_else(|| panic!("{url} parsed"));
            assert!(err.contains(want), "{url}: {err}");
            assert!(err.starts_with("DATABASE_URL: "), "{err}");
        }
        // The password never appears in an error.
        let err = parse("postgres://u:s3cret@h1:70000,h2/db").err().unwrap();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
