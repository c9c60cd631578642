//! The identity provider's signing keys: its JWKS (RFC 7517), found through its OpenID
//! discovery document (OpenID Connect Discovery 1.0 §4) unless AUTH_JWKS_URL names it, fetched
//! over HTTP(S) and cached.
//!
//! - Keys are chosen by `kid` (a token without one: the only key that fits its algorithm).
//! - An unknown `kid` (the provider rotated its keys) refreshes the set, at most once every
//!   [`MIN_REFRESH`] whatever the traffic: a flood of tokens with made-up `kid`s costs the
//!   provider one request per interval, not one per token.
//! - The set is kept for as long as the response's `Cache-Control: max-age` says, within
//!   [`MIN_MAX_AGE`]..=[`MAX_MAX_AGE`] ([`DEFAULT_MAX_AGE`] without one); then the next token
//!   refreshes it. A refresh that fails keeps the last good set: while the provider is down,
//!   tokens signed with known keys keep working, and a new `kid` is refused with a reason.
//! - Each key is usable only with the algorithms its type allows (RSA: RS*/PS*; EC P-256:
//!   ES256, P-384: ES384; Ed25519: EdDSA) and, if it names one, its own `alg` (RFC 8725 §3.1).
//!   Symmetric (`oct`) keys and keys meant for encryption are ignored.

use std::{
    sync::{Arc, RwLock},
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
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse},
};

use super::header_values;

/// The least time between two fetches of the key set.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// How long a key set is kept when the response says nothing.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Bounds on what `Cache-Control` may ask for.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(30);
pub const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long one request to the provider may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
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
    issuer: String,
    /// AUTH_JWKS_URL, or what discovery said.
    jwks_uri: RwLock<Option<String>>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    set: RwLock<Arc<KeySet>>,
    /// Held while fetching; the time of the last attempt.
    refresh: tokio::sync::Mutex<Option<Instant>>,
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
        Self {
            issuer: issuer.to_owned(),
            jwks_uri: RwLock::new(jwks_uri.map(str::to_owned)),
            http: Client::builder(TokioExecutor::new()).build(connector),
            set: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                fetched: None,
                max_age: DEFAULT_MAX_AGE,
            })),
            refresh: tokio::sync::Mutex::new(None),
        }
    }

    /// The key for a token signed with `alg` under `kid`.
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, KeyError> {
        let current = self.current();
        let stale = current.fetched.is_none_or(|at| at.elapsed() >= current.max_age);
        if !stale && let Some(key) = find(&current, kid, alg) {
            return Ok(key);
        }
        // Unknown here, or kept too long: ask the provider (at most every MIN_REFRESH).
        let asked = self.refresh().await;
        let refreshed = self.current();
        match (find(&refreshed, kid, alg), asked) {
            (Some(key), _) => Ok(key),
            (None, Err(why)) => Err(KeyError::Unreachable(why)),
            (None, Ok(())) => Err(KeyError::Unknown),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        self.set
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Fetches the key set unless another caller did (or tried) within [`MIN_REFRESH`]. Ok when
    /// the set is fresh from the provider (now or a moment ago); the reason otherwise.
    async fn refresh(&self) -> Result<(), String> {
        let mut last = self.refresh.lock().await;
        if let Some(at) = *last
            && at.elapsed() < MIN_REFRESH
        {
            // Someone asked a moment ago: their answer (or its absence) stands.
            let current = self.current();
            return match current.fetched {
                Some(fetched) if fetched >= at => Ok(()),
                _ => Err("the identity provider was asked a moment ago and did not answer".to_owned()),
            };
        }
        *last = Some(Instant::now());
        match self.fetch().await {
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
        }
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
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("{uri} is not a JWK set: {e}"))?;
        let keys: Vec<Arc<Key>> = set
            .keys
            .iter()
            .filter(|jwk| !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)))
            .filter_map(|jwk| {
                let algorithms = allowed(jwk)?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
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
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let (body, _) = self.get(&url).await?;
        let doc: Discovery =
            serde_json::from_slice(&body).map_err(|e| format!("{url} is not a discovery document: {e}"))?;
        if doc.issuer != self.issuer {
            return Err(format!(
                "{url} names issuer {:?}, not {:?} (AUTH_ISSUER must be the provider's issuer exactly)",
                doc.issuer, self.issuer
            ));
        }
        Ok(doc.jwks_uri)
    }

    /// GETs `url`: the body (at most 1 MiB) and its `Cache-Control`.
    async fn get(&self, url: &str) -> Result<(Bytes, Option<String>), String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let request = async {
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
        };
        tokio::time::timeout(FETCH_TIMEOUT, request)
            .await
            .map_err(|_| format!("{url} did not answer within {FETCH_TIMEOUT:?}"))?
    }
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
mod tests {
    use super::*;

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
