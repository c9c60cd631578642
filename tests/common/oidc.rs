//! A real OpenID provider for the tests: `tests/oidc/provider.mjs`, the npm package
//! `oauth2-mock-server` (pinned in tests/oidc/package.json; `npm ci --prefix tests/oidc`, which
//! scripts/test.sh runs) with test-only control endpoints (minting, key rotation, downtime,
//! fetch counts). One provider process per test, on a port of its own, stopped on drop.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

pub struct Provider {
    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub issuer: String,
    child: Child,
    http: reqwest::Client,
}

impl Provider {
    /// Starts a provider; panics with what to do when its packages are not installed.
    pub fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            dir.join("node_modules/oauth2-mock-server").is_dir(),
            "the test OpenID provider is not installed: npm ci --prefix tests/oidc"
        );
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .env("PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let issuer = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the provider did not start: {line:?}"))
            .to_owned();
        Self {
            issuer,
            child,
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.issuer));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    /// A token signed with the provider's current key for `alg` (or `kid`), with exactly
    /// `claims` (plus `iss`, `iat` and `exp` where absent) and extra header fields.
    pub async fn token(&self, alg: &str, kid: Option<&str>, claims: Value, header: Value) -> String {
        let mut body = json!({"alg": alg, "claims": claims, "header": header});
        if let Some(kid) = kid {
            body["kid"] = json!(kid);
        }
        self.call(reqwest::Method::POST, "/control/token", Some(body)).await["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A new current key for `alg`; the older ones stay published. Returns its kid.
    pub async fn rotate(&self, alg: &str) -> String {
        self.call(reqwest::Method::POST, "/control/rotate", Some(json!({"alg": alg})))
            .await["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Stops publishing key `kid`.
    pub async fn drop_key(&self, kid: &str) {
        self.call(reqwest::Method::POST, "/control/drop", Some(json!({"kid": kid})))
            .await;
    }

    /// The current kid of each algorithm.
    pub async fn current_kid(&self, alg: &str) -> String {
        self.call(reqwest::Method::GET, "/control/keys", None).await["current"][alg]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Discovery and JWKS answer 503 while down.
    pub async fn set_down(&self, down: bool) {
        let path = if down { "/control/down" } else { "/control/up" };
        self.call(reqwest::Method::POST, path, None).await;
    }

    /// (JWKS fetches, discovery fetches) so far.
    pub async fn fetches(&self) -> (u64, u64) {
        let stats = self.call(reqwest::Method::GET, "/control/stats", None).await;
        (
            stats["jwksFetches"].as_u64().unwrap(),
            stats["discoveryFetches"].as_u64().unwrap(),
        )
    }

    /// The PEM (SPKI) of the current RS256 public key.
    pub async fn public_key_pem(&self) -> String {
        self.call(reqwest::Method::GET, "/control/public-key", None).await["pem"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Claims the token endpoint puts in its next tokens (`sub`, `roles`, ...).
    pub async fn next_token_claims(&self, claims: Value) {
        self.call(reqwest::Method::POST, "/control/next-token-claims", Some(claims))
            .await;
    }

    /// A token from the standard token endpoint (client credentials), for `audience` (letters,
    /// digits, `-` and `_`: it goes into the form as it is).
    pub async fn token_endpoint(&self, audience: &str) -> String {
        assert!(
            audience
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let discovery: Value = self
            .http
            .get(format!("{}/.well-known/openid-configuration", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let res: Value = self
            .http
            .post(discovery["token_endpoint"].as_str().unwrap())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&client_id=shop-frontend&client_secret=secret&aud={audience}"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        res["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
