//! The identity provider's signing keys: its JWKS (RFC 7517), found through its OpenID
//! discovery document (OpenID Connect Discovery 1.0 §4) unless AUTH_JWKS_URL names it, fetched
//! over HTTP(S) and cached.
//!
//! - Keys are chosen by `kid` (a token without one: the only key that fits its algorithm).
//! - An unknown `kid` (the provider rotated its keys) refreshes the set, at most once every
//!   [`MIN_REFRESH`] after the last attempt ended, whatever the traffic: a flood of tokens with
//!   made-up `kid`s costs the provider one request per interval, not one per token. Tokens
//!   that arrive while a fetch is running wait for that fetch and take its outcome: no token
//!   waits for more than one fetch, which takes at most [`FETCH_TIMEOUT`] (discovery
//!   included), however the provider fails (refusing, hanging, answering slowly).
//! - The set is kept for as long as the response's `Cache-Control: max-age` says, within
//!   [`MIN_MAX_AGE`]..=[`MAX_MAX_AGE`] ([`DEFAULT_MAX_AGE`] without one); then a token whose key
//!   it holds is verified with it at once while the set is refreshed in the background. A
//!   refresh that fails keeps the last good set: while the provider is down, tokens signed
//!   with known keys keep working, and a token with a new `kid` cannot be verified
//!   ([`KeyError::Unreachable`]: answered 503, to be retried, not refused).
//! - An entry of the set this code cannot read (a member of the wrong type, a key type it does
//!   not know) is skipped, with a warning, not the set (RFC 7517 §5).
//! - Each key is usable only with the algorithms its type allows (RSA: RS*/PS*; EC P-256:
//!   ES256, P-384: ES384; Ed25519: EdDSA) and, if it names one, its own `alg` (RFC 8725 §3.1).
//!   Symmetric (`oct`) keys and keys meant for encryption are ignored.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};

use super::header_values;

/// The least time between two fetches of the key set.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// How long a key set is kept when the response says nothing.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Bounds on what `Cache-Control` may ask for.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(30);
pub const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long one fetch of the key set may take, discovery included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest discovery document or key set read.
const MAX_BODY: usize = 1 << 20;

/// One usable key.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    /// The algorithms it may verify.
    algorithms: Vec<Algorithm>,
}

/// The keys as last fetched.
struct KeySet {
    keys: Vec<Arc<Key>>,
    fetched: Option<Instant>,
    max_age: Duration,
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The provider publishes no key with this `kid` that fits the token's algorithm.
    Unknown,
    /// No such key is known, and the provider could not be asked (down, or asked a moment ago).
    Unreachable(String),
}

/// The provider's keys, fetched on demand and cached (cheap to share behind an `Arc`).
pub struct Jwks {
    inner: Arc<Inner>,
}

/// What a [`Jwks`] shares with its background refreshes.
struct Inner {
    issuer: String,
    /// AUTH_JWKS_URL, or what discovery said.
    jwks_uri: RwLock<Option<String>>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    set: RwLock<Arc<KeySet>>,
    /// Held while fetching; the last attempt.
    refresh: tokio::sync::Mutex<Option<Attempt>>,
    /// A background refresh is on its way (one at a time, however many tokens find the set stale).
    refreshing: AtomicBool,
}

/// A finished fetch of the key set.
struct Attempt {
    ended: Instant,
    /// Ok: the set was replaced; otherwise why not.
    outcome: Result<(), String>,
}

impl Jwks {
    /// Keys of `issuer`, from `jwks_uri` if given, else from its discovery document. Nothing is
    /// fetched until a token needs a key.
    pub fn new(issuer: &str, jwks_uri: Option<&str>) -> Self {
        // ring, as sqlx's TLS uses: aws-lc-rs would add a long C build. (Post-quantum key
        // exchange, which rustls 0.23.48 marks ring's provider deprecated for, protects
        // nothing here: these requests fetch public keys.)
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                })
                .with_no_client_auth()
            });
        let connector = match tls {
            Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build(),
            // ring supports the safe defaults; this cannot fail, but plain HTTP still works.
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .build(),
        };
        let inner = Inner {
            issuer: issuer.to_owned(),
            jwks_uri: RwLock::new(jwks_uri.map(str::to_owned)),
            http: Client::builder(TokioExecutor::new()).build(connector),
            set: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                fetched: None,
                max_age: DEFAULT_MAX_AGE,
            })),
            refresh: tokio::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The key for a token signed with `alg` under `kid`. Waits for at most one fetch of the
    /// key set (at most [`FETCH_TIMEOUT`]), and for none when the cached set holds the key.
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, KeyError> {
        let current = self.inner.current();
        let stale = current.fetched.is_none_or(|at| at.elapsed() >= current.max_age);
        if let Some(key) = find(&current, kid, alg) {
            if stale {
                self.refresh_in_background();
            }
            return Ok(key);
        }
        // Unknown here: ask the provider (at most every MIN_REFRESH), or take the answer of
        // the fetch already running. In a task of its own: a client that goes away must not
        // cancel a fetch that others queue behind (the next one would start another).
        let inner = self.inner.clone();
        let arrived = Instant::now();
        let asked = tokio::spawn(async move { inner.refresh(arrived).await })
            .await
            .unwrap_or_else(|err| Err(format!("the key set refresh failed: {err}")));
        let refreshed = self.inner.current();
        match (find(&refreshed, kid, alg), asked) {
            (Some(key), _) => Ok(key),
            (None, Err(why)) => Err(KeyError::Unreachable(why)),
            (None, Ok(())) => Err(KeyError::Unknown),
        }
    }

    /// Starts a refresh unless one was started and has not ended (then its result will do).
    fn refresh_in_background(&self) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Lowers the flag however the refresh ends (a panic included).
        struct Done(Arc<Inner>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.refreshing.store(false, Ordering::Release);
            }
        }
        let done = Done(self.inner.clone());
        tokio::spawn(async move {
            let _ = done.0.refresh(Instant::now()).await;
        });
    }
}

impl Inner {
    fn current(&self) -> Arc<KeySet> {
        self.set
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Fetches the key set for a caller that asked at `arrived`, unless an attempt ended since
    /// (a fetch that was running when it asked) or less than [`MIN_REFRESH`] before: then that
    /// attempt's outcome stands. Ok when the set is fresh from the provider; the reason
    /// otherwise.
    async fn refresh(&self, arrived: Instant) -> Result<(), String> {
        let mut last = self.refresh.lock().await;
        if let Some(attempt) = &*last
            && (attempt.ended >= arrived || attempt.ended.elapsed() < MIN_REFRESH)
        {
            return attempt
                .outcome
                .clone()
                .map_err(|why| format!("the identity provider was asked a moment ago: {why}"));
        }
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .unwrap_or_else(|_| Err(format!("the identity provider did not answer within {FETCH_TIMEOUT:?}")));
        let outcome = match fetched {
            Ok(set) => {
                metrics::counter!("orderflow_auth_jwks_fetches_total", "outcome" => "ok").increment(1);
                if let Ok(mut current) = self.set.write() {
                    *current = Arc::new(set);
                }
                Ok(())
            }
            Err(why) => {
                metrics::counter!("orderflow_auth_jwks_fetches_total", "outcome" => "failed").increment(1);
                tracing::warn!(issuer = %self.issuer, error = %why, "could not fetch the identity provider's keys; keeping the last ones");
                Err(why)
            }
        };
        *last = Some(Attempt {
            ended: Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let uri = match self.jwks_uri.read().ok().and_then(|u| u.clone()) {
            Some(uri) => uri,
            None => {
                let uri = self.discover().await?;
                if let Ok(mut known) = self.jwks_uri.write() {
                    *known = Some(uri.clone());
                }
                uri
            }
        };
        let (body, cache_control) = self.get(&uri).await?;
        // Each key on its own: a key this code cannot read (a member of the wrong type, a
        // newer key type) is skipped, not the set with it (RFC 7517 §5).
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let set: RawSet = serde_json::from_slice(&body).map_err(|e| format!("{uri} is not a JWK set: {e}"))?;
        let published = set.keys.len();
        let readable: Vec<Jwk> = set
            .keys
            .into_iter()
            .filter_map(|jwk| serde_json::from_value::<Jwk>(jwk).ok())
            .collect();
        if readable.len() < published {
            tracing::warn!(
                issuer = %self.issuer,
                skipped = published - readable.len(),
                "the identity provider's key set has entries that cannot be read; they are skipped"
            );
        }
        let keys: Vec<Arc<Key>> = readable
            .into_iter()
            .filter(|jwk| !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)))
            .filter_map(|jwk| {
                let algorithms = allowed(&jwk)?;
                let key = DecodingKey::from_jwk(&jwk).ok()?;
                Some(Arc::new(Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                    algorithms,
                }))
            })
            .collect();
        Ok(KeySet {
            keys,
            fetched: Some(Instant::now()),
            max_age: max_age(cache_control.as_deref()),
        })
    }

    /// The `jwks_uri` of the issuer's discovery document, whose `issuer` must be the issuer
    /// exactly (OpenID Connect Discovery 1.0 §4.3).
    async fn discover(&self) -> Result<String, String> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = discovery_url(&self.issuer);
        let (body, _) = self.get(&url).await?;
        let doc: Discovery =
            serde_json::from_slice(&body).map_err(|e| format!("{url} is not a discovery document: {e}"))?;
        if doc.issuer != self.issuer {
            return Err(format!(
                "{url} names issuer {:?}, not {:?} (AUTH_ISSUER must be the provider's issuer exactly)",
                doc.issuer, self.issuer
            ));
        }
        orderflow_shared::config::check_key_url(&doc.jwks_uri)
            .map_err(|why| format!("{url} names a jwks_uri that {why}"))?;
        Ok(doc.jwks_uri)
    }

    /// GETs `url`: the body (at most 1 MiB) and its `Cache-Control` (the caller bounds the time).
    async fn get(&self, url: &str) -> Result<(Bytes, Option<String>), String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let response = self.http.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let cache_control = header_values(response.headers(), hyper::header::CACHE_CONTROL);
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok((body, cache_control))
    }
}

/// Where `issuer` publishes its discovery document: "any terminating / MUST be removed before
/// appending /.well-known/openid-configuration" (OpenID Connect Discovery 1.0 §4.1); the issuer
/// itself is compared with tokens as given.
pub fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// The key of `set` for `kid` that may verify `alg`; without a `kid`, the only one that may.
fn find(set: &KeySet, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    let mut fitting = set.keys.iter().filter(|k| k.algorithms.contains(&alg));
    match kid {
        Some(kid) => fitting.find(|k| k.kid.as_deref() == Some(kid)).map(|k| k.key.clone()),
        None => {
            let first = fitting.next()?;
            fitting.next().is_none().then(|| first.key.clone())
        }
    }
}

/// The algorithms a JWK may verify: what its key type allows, narrowed to its own `alg` when
/// it names one. `None` for keys orderflow never verifies with (symmetric, unknown types).
fn allowed(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
        // Symmetric keys, and types this version does not know.
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(by_type),
        Some(named) => {
            // KeyAlgorithm and Algorithm share their names (`RS256`, ...).
            let name = serde_json::to_value(named).ok()?;
            let named: Algorithm = name.as_str()?.parse().ok()?;
            by_type.contains(&named).then(|| vec![named])
        }
    }
}

/// How long a key set may be kept: `max-age` of `Cache-Control` within bounds (`no-store` and
/// `no-cache` as the least), else the default.
pub fn max_age(cache_control: Option<&str>) -> Duration {
    let Some(value) = cache_control else {
        return DEFAULT_MAX_AGE;
    };
    let mut age = None;
    for directive in crate::header_grammar::list_elements(value.as_bytes()) {
        let directive = String::from_utf8_lossy(directive).to_ascii_lowercase();
        if directive == "no-store" || directive == "no-cache" {
            return MIN_MAX_AGE;
        }
        if let Some(secs) = directive.strip_prefix("max-age=") {
            let secs = secs.trim_matches('"');
            if !secs.is_empty() && secs.bytes().all(|b| b.is_ascii_digit()) {
                age = Some(Duration::from_secs(secs.parse().unwrap_or(u64::MAX)));
            }
        }
    }
    age.unwrap_or(DEFAULT_MAX_AGE).clamp(MIN_MAX_AGE, MAX_MAX_AGE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// A provider that takes connections and never answers; counts the connections.
    async fn hanging_provider() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        });
        (url, connections)
    }

    /// A provider answering `GET <path>` from `routes` (404 otherwise), one request per
    /// connection; its base URL.
    async fn provider(routes: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes = Arc::new(routes);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.ends_with(b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or_default();
                    let (status, body) = match routes(path) {
                        Some(body) => ("200 OK", body),
                        None => ("404 Not Found", String::new()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        base
    }

    #[tokio::test]
    async fn an_issuer_ending_in_a_slash_is_discovered_and_compared_as_it_is() {
        let jwk = serde_json::json!({"keys": [{"kty": "RSA", "kid": "k", "n": "sXch", "e": "AQAB"}]}).to_string();
        // The issuer names the provider's own address, known once it listens.
        let issuer = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let named = issuer.clone();
        let url = provider(move |path| {
            let issuer = named.get()?.clone();
            match path {
                "/.well-known/openid-configuration" => {
                    Some(serde_json::json!({"issuer": issuer, "jwks_uri": format!("{}jwks", issuer)}).to_string())
                }
                "/jwks" => Some(jwk.clone()),
                _ => None,
            }
        })
        .await;
        let with_slash = format!("{url}/");
        issuer.set(with_slash.clone()).unwrap();
        let jwks = Jwks::new(&with_slash, None);
        assert!(jwks.key(Some("k"), Algorithm::RS256).await.is_ok());
    }

    #[tokio::test]
    async fn a_key_this_code_cannot_read_is_skipped_not_the_set() {
        let set = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": 5, "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "odd", "use": 1, "n": "sXch", "e": "AQAB"},
            {"kty": "OKP+future", "kid": "new", "x": "AA"},
            {"kty": "RSA", "kid": "k", "n": "sXch", "e": "AQAB"},
        ]})
        .to_string();
        let url = provider(move |path| (path == "/jwks").then(|| set.clone())).await;
        let jwks = Jwks::new(&url, Some(&format!("{url}/jwks")));
        assert!(jwks.key(Some("k"), Algorithm::RS256).await.is_ok());
        assert!(matches!(
            jwks.key(Some("odd"), Algorithm::RS256).await,
            Err(KeyError::Unknown)
        ));
    }

    #[tokio::test]
    async fn a_discovered_key_set_over_plain_http_to_another_host_is_refused() {
        let issuer = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let named = issuer.clone();
        let url = provider(move |path| {
            (path == "/.well-known/openid-configuration").then(|| {
                serde_json::json!({"issuer": named.get().unwrap(), "jwks_uri": "http://idp.example/jwks"}).to_string()
            })
        })
        .await;
        issuer.set(url.clone()).unwrap();
        let jwks = Jwks::new(&url, None);
        match jwks.key(Some("k"), Algorithm::RS256).await {
            Err(KeyError::Unreachable(why)) => assert!(why.contains("jwks_uri"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tokens_never_wait_for_more_than_one_fetch_of_a_hanging_provider() {
        let (url, connections) = hanging_provider().await;
        let jwks = Jwks::new("http://idp", Some(&url));
        let started = Instant::now();
        let asked = futures_util::future::join_all((0..4).map(|_| jwks.key(Some("x"), Algorithm::RS256))).await;
        for answer in asked {
            assert!(matches!(answer, Err(KeyError::Unreachable(_))), "{answer:?}");
        }
        // One fetch, its timeout, and every token answered with it (one after another, they
        // took 5, 10, 15 and 20 s, a connection each).
        assert!(
            started.elapsed() < FETCH_TIMEOUT + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Right after it, a new kid is refused at once, without asking again.
        let again = Instant::now();
        assert!(matches!(
            jwks.key(Some("y"), Algorithm::RS256).await,
            Err(KeyError::Unreachable(_))
        ));
        assert!(again.elapsed() < Duration::from_secs(1));
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cancel_the_fetch_others_wait_for() {
        let (url, connections) = hanging_provider().await;
        let jwks = Jwks::new("http://idp", Some(&url));
        // Callers that give up after 100 ms each (clients that disconnect), one after another.
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(100), jwks.key(Some("x"), Algorithm::RS256)).await;
        }
        // One fetch went on for all of them; a caller now takes its outcome when it ends.
        let started = Instant::now();
        assert!(matches!(
            jwks.key(Some("x"), Algorithm::RS256).await,
            Err(KeyError::Unreachable(_))
        ));
        assert!(started.elapsed() < FETCH_TIMEOUT, "{:?}", started.elapsed());
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_known_key_of_a_stale_set_is_used_at_once_while_the_set_is_refreshed() {
        let (url, connections) = hanging_provider().await;
        let jwks = Jwks::new("http://idp", Some(&url));
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(serde_json::json!({"kty": "RSA", "kid": "k", "n": "sXch", "e": "AQAB"})).unwrap();
        let key = Key {
            kid: Some("k".into()),
            key: DecodingKey::from_jwk(&jwk).unwrap(),
            algorithms: vec![Algorithm::RS256],
        };
        *jwks.inner.set.write().unwrap() = Arc::new(KeySet {
            keys: vec![Arc::new(key)],
            fetched: Some(Instant::now()),
            max_age: Duration::ZERO, // stale at once
        });
        let started = Instant::now();
        for _ in 0..20 {
            assert!(jwks.key(Some("k"), Algorithm::RS256).await.is_ok());
        }
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        // The refresh went on in the background: one fetch for the twenty tokens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn cache_control_is_honoured_within_bounds() {
        assert_eq!(max_age(None), DEFAULT_MAX_AGE);
        assert_eq!(max_age(Some("public, max-age=600")), Duration::from_secs(600));
        assert_eq!(max_age(Some("max-age=1")), MIN_MAX_AGE);
        assert_eq!(max_age(Some("max-age=99999999999999999999999")), MAX_MAX_AGE);
        assert_eq!(max_age(Some("no-store")), MIN_MAX_AGE);
        assert_eq!(max_age(Some("private, no-cache, max-age=600")), MIN_MAX_AGE);
        assert_eq!(max_age(Some("max-age=soon")), DEFAULT_MAX_AGE);
    }

    #[test]
    fn keys_verify_only_the_algorithms_their_type_and_alg_allow() {
        let jwk = |json: serde_json::Value| {
            serde_json::from_value::<jsonwebtoken::jwk::Jwk>(json).unwrap_or_else(|e| panic!("{e}"))
        };
        let rsa = serde_json::json!({"kty": "RSA", "n": "sXch", "e": "AQAB"});
        assert_eq!(allowed(&jwk(rsa.clone())).map(|a| a.len()), Some(6));
        let mut rs256 = rsa;
        rs256["alg"] = "RS256".into();
        assert_eq!(allowed(&jwk(rs256)), Some(vec![Algorithm::RS256]));
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"});
        assert_eq!(allowed(&jwk(ec.clone())), Some(vec![Algorithm::ES256]));
        let mut mismatched = ec;
        mismatched["alg"] = "RS256".into();
        assert_eq!(allowed(&jwk(mismatched)), None);
        // A symmetric key in a JWKS verifies nothing: HS* is the shared secret's alone.
        assert_eq!(allowed(&jwk(serde_json::json!({"kty": "oct", "k": "c2VjcmV0"}))), None);
    }
}
