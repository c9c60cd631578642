//! A thin HTTP client for the orderflow API: bearer tokens, JSON in and out, and problem
//! codes turned into short error labels for the report.

use std::time::Duration;

use anyhow::Context;
use orderflow_shared::auth::Keys;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Tokens live this long: longer than any run.
const TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    keys: Keys,
}

/// A response: status, JSON body (Null when it was not JSON) and the API's own time for it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    /// What the API said it spent (its `Server-Timing: app;dur=D`), when it said.
    pub server: Option<Duration>,
}

impl Reply {
    async fn read(res: reqwest::Response) -> Result<Self, reqwest::Error> {
        let status = res.status();
        let server = res
            .headers()
            .get_all("server-timing")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(app_duration);
        let bytes = res.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Self { status, body, server })
    }

    /// A short label for the report: `409 IDEMPOTENCY_KEY_IN_USE`, `503`, ...
    pub fn label(&self) -> String {
        match self.body.get("code").and_then(Value::as_str) {
            Some(code) => format!("{} {code}", self.status.as_u16()),
            None => self.status.as_u16().to_string(),
        }
    }
}

impl Api {
    pub fn new(base: &str, secret: &str, connections: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(connections.max(8))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base.to_owned(),
            keys: Keys::new(secret),
        })
    }

    pub fn token(&self, user_id: i64, admin: bool) -> anyhow::Result<String> {
        Ok(self.keys.issue(user_id, admin, TOKEN_TTL_SECS)?)
    }

    /// Sends one request. Transport failures are errors; any HTTP status is a reply.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Reply, reqwest::Error> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        Reply::read(req.send().await?).await
    }

    /// `GET path` with `Prefer: wait=N` (RFC 7240 §4.3, N whole seconds): the API holds the
    /// answer until what it concerns changes or N seconds pass.
    pub async fn get_waiting(&self, path: &str, token: &str, wait: Duration) -> Result<Reply, reqwest::Error> {
        self.get_preferring(path, token, &format!("wait={}", wait.as_secs()))
            .await
    }

    /// `GET path` with `Prefer: <preference>` (RFC 7240).
    pub async fn get_preferring(&self, path: &str, token: &str, preference: &str) -> Result<Reply, reqwest::Error> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("prefer", preference)
            .send()
            .await?;
        Reply::read(res).await
    }

    /// A setup call that must answer `want`.
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: &Value,
        want: StatusCode,
    ) -> anyhow::Result<Value> {
        let reply = self
            .call(method, path, token, Some(body), None)
            .await
            .with_context(|| format!("calling {path} at {}", self.base))?;
        if reply.status == StatusCode::UNAUTHORIZED {
            anyhow::bail!(
                "{path} answered 401 {}: does JWT_SECRET match the system's?",
                reply.body
            );
        }
        anyhow::ensure!(reply.status == want, "{path} answered {}: {}", reply.status, reply.body);
        Ok(reply.body)
    }

    /// Checks that the API answers at all before anything else is done.
    pub async fn health(&self) -> anyhow::Result<()> {
        let res = self
            .http
            .get(format!("{}/api/products?size=1", self.base))
            .send()
            .await
            .with_context(|| format!("the API at {} does not answer", self.base))?;
        anyhow::ensure!(
            res.status().is_success(),
            "the API at {} answered {}",
            self.base,
            res.status()
        );
        Ok(())
    }
}

/// A short label for a transport failure.
pub fn transport_label(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "transport: timeout".to_owned()
    } else if e.is_connect() {
        "transport: connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "transport: body".to_owned()
    } else {
        "transport: request".to_owned()
    }
}

/// The `dur` of the `app` metric in a `Server-Timing` header value (W3C Server Timing: metrics
/// separated by commas, each a name and `;param=value` pairs, `dur` in milliseconds).
fn app_duration(header: &str) -> Option<Duration> {
    header.split(',').find_map(|metric| {
        let mut parts = metric.split(';').map(str::trim);
        if parts.next()? != "app" {
            return None;
        }
        parts.find_map(|param| {
            let (name, value) = param.split_once('=')?;
            let ms: f64 = value.trim().trim_matches('"').parse().ok()?;
            (name.trim() == "dur" && ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1_000.0))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_time_is_read_from_server_timing() {
        let ms = |s: &str| app_duration(s).map(|d| d.as_secs_f64() * 1_000.0);
        assert_eq!(ms("app;dur=4.25"), Some(4.25));
        assert_eq!(ms("db;dur=1, app;desc=\"api\";dur=\"12.5\""), Some(12.5));
        assert_eq!(ms("db;dur=3"), None);
        assert_eq!(ms("app"), None);
        assert_eq!(ms("app;dur=-1"), None);
        assert_eq!(ms("app;dur=soon"), None);
        assert_eq!(ms("apps;dur=2"), None);
    }
}
