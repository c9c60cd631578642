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

/// A response: status and JSON body (Null when it was not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
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
        let res = req.send().await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// `GET path` with `Prefer: wait=N` (RFC 7240 §4.3, N whole seconds): the API holds the
    /// answer until what it concerns changes or N seconds pass.
    pub async fn get_waiting(&self, path: &str, token: &str, wait: Duration) -> Result<Reply, reqwest::Error> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("prefer", format!("wait={}", wait.as_secs()))
            .send()
            .await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
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
