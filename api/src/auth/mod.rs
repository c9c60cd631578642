//! Who is calling: a bearer JWT, verified by the verifier its header names and by no other.
//!
//! - `HS256`: the shared secret (JWT_SECRET; `orderflow token` signs with it; the development
//!   default only while no identity provider is configured). Claims: `sub` a user id,
//!   `exp`, `role: "admin"` (`orderflow_shared::auth::Keys`).
//! - `RS256`/`RS384`/`RS512`, `PS*`, `ES256`/`ES384`, `EdDSA`: the identity provider of
//!   AUTH_ISSUER, by the key its JWKS publishes under the token's `kid` ([`jwks`]). Claims:
//!   `iss` exactly AUTH_ISSUER, `aud` naming AUTH_AUDIENCE, `exp` required, `nbf` and `iat`
//!   not in the future (30 s of leeway for clocks), `sub` a string: the caller is (issuer,
//!   `sub`), mapped to an orderflow user id on first sight ([`identities`]). Admin per
//!   AUTH_ADMIN_CLAIM.
//! - Anything else (`none`, an algorithm whose verifier is not configured, an `HS*` token
//!   when only a provider is) is refused: a token is never checked against a key of another
//!   kind (RFC 8725 §2.1, §3.1: an `HS256` token signed with a provider's public key is
//!   refused, not verified with that key as a secret). A `crit` header is refused first (RFC
//!   7515 §4.1.11).
//!
//! Every refusal is a 401 problem with a code and a reason; none is a 500 or a hang (the
//! provider is asked at most every few seconds, for at most 5 s).

pub mod identities;
pub mod jwks;

use std::{sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, Validation};
use orderflow_shared::{
    Error, Result,
    auth::{Identity, Keys, Principal, check_header},
    config::Config,
};
use serde_json::Value;
use sqlx::PgPool;

use self::{
    identities::Identities,
    jwks::{Jwks, KeyError},
};

/// How far a provider's clock may be from ours for `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// The algorithms a provider token may use.
const PROVIDER_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A verified caller and when its token expires (Unix seconds).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub expires_at: i64,
}

/// The identity provider of AUTH_ISSUER.
pub struct Provider {
    pub issuer: String,
    audiences: Vec<String>,
    /// AUTH_ADMIN_CLAIM: the claim's path and the value that makes an admin.
    admin: Option<(Vec<String>, String)>,
    keys: Jwks,
}

/// Verifies bearer tokens (cheap to share behind an `Arc`).
pub struct Authenticator {
    secret: Option<Keys>,
    provider: Option<Provider>,
    identities: Identities,
}

impl Authenticator {
    /// From the configuration: the shared secret ([`Config::hs256_secret`]) and the provider
    /// (AUTH_ISSUER, AUTH_JWKS_URL, AUTH_AUDIENCE, AUTH_ADMIN_CLAIM; clap checked them).
    pub fn from_config(config: &Config) -> Self {
        let provider = config.auth_issuer.as_deref().map(|issuer| Provider {
            issuer: issuer.to_owned(),
            audiences: config
                .auth_audience
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
            admin: config.auth_admin_claim.as_deref().and_then(|claim| {
                let (path, value) = claim.split_once('=')?;
                Some((path.split('.').map(str::to_owned).collect(), value.to_owned()))
            }),
            keys: Jwks::new(issuer, config.auth_jwks_url.as_deref()),
        });
        Self {
            secret: config.hs256_secret().map(Keys::new),
            provider,
            identities: Identities::default(),
        }
    }

    /// The configured identity provider's issuer, if any.
    pub fn issuer(&self) -> Option<&str> {
        self.provider.as_ref().map(|p| p.issuer.as_str())
    }

    /// Verifies `token` with the verifier its header names (see the module documentation).
    /// A provider's user is mapped to an orderflow user id through `pool` on first sight.
    pub async fn verify(&self, pool: &PgPool, token: &str) -> Result<Caller> {
        let header = check_header(token)?;
        if header.alg == Algorithm::HS256 {
            let secret = self.secret.as_ref().ok_or_else(|| {
                Error::unauthorized(
                    "INVALID_TOKEN",
                    "HS256 tokens are not accepted here: sign in with the identity provider",
                )
            })?;
            let (principal, expires_at) = secret.verify_with_expiry(token)?;
            return Ok(Caller { principal, expires_at });
        }
        let (Some(provider), true) = (&self.provider, PROVIDER_ALGORITHMS.contains(&header.alg)) else {
            return Err(Error::unauthorized(
                "INVALID_TOKEN",
                format!("tokens signed with {:?} are not accepted here", header.alg),
            ));
        };
        let key = provider
            .keys
            .key(header.kid.as_deref(), header.alg)
            .await
            .map_err(|e| match e {
                KeyError::Unknown => Error::unauthorized(
                    "UNKNOWN_SIGNING_KEY",
                    "the identity provider publishes no key for this token's kid and algorithm",
                ),
                // Not a refusal: the token may be good (signed with a key the provider just
                // rotated in). The reason, which names the provider's URLs, is logged where the
                // fetch failed, not told to an anonymous caller.
                KeyError::Unreachable(_) => Error::unavailable(
                    "IDENTITY_PROVIDER_UNAVAILABLE",
                    "the token's signing key is not known here yet, and the identity provider cannot be asked now; retry shortly",
                ),
            })?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&provider.issuer]);
        validation.set_audience(&provider.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY.as_secs();
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(refusal)?;
        let claims = data.claims;
        let now = chrono::Utc::now().timestamp();
        if numeric_date(&claims["iat"]).is_some_and(|iat| iat > now + LEEWAY.as_secs() as i64) {
            return Err(Error::unauthorized(
                "INVALID_TOKEN",
                "the token was issued in the future (iat)",
            ));
        }
        // Stored as text: PostgreSQL refuses a NUL, and no subject needs a control character.
        let subject = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control))
            .ok_or_else(|| {
                Error::unauthorized(
                    "INVALID_TOKEN",
                    "the token's sub is not a string of 1 to 255 bytes without control characters",
                )
            })?;
        let identity = Identity {
            issuer: provider.issuer.clone(),
            subject: subject.to_owned(),
        };
        let user_id = self.identities.user_id(pool, &identity).await?;
        Ok(Caller {
            principal: Principal {
                user_id,
                admin: provider.is_admin(&claims),
                identity: Some(Arc::new(identity)),
            },
            expires_at: numeric_date(&claims["exp"]).unwrap_or(now),
        })
    }
}

/// A NumericDate claim in whole seconds: RFC 7519 §2 allows a fraction (cut off here) and
/// jsonwebtoken accepts any number, so one past `i64` is taken as `i64::MAX`.
fn numeric_date(claim: &Value) -> Option<i64> {
    claim.as_i64().or_else(|| claim.as_f64().map(|secs| secs as i64))
}

impl Provider {
    /// Whether the claims make an admin (AUTH_ADMIN_CLAIM): the claim at the path is a list
    /// holding the value, or a string holding it as one of its space-separated words.
    fn is_admin(&self, claims: &Value) -> bool {
        let Some((path, value)) = &self.admin else {
            return false;
        };
        let claim = path.iter().try_fold(claims, |v, name| v.get(name));
        match claim {
            Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(value)),
            Some(Value::String(words)) => words.split(' ').any(|w| w == value),
            _ => false,
        }
    }
}

/// What a failed verification tells the client.
fn refusal(err: jsonwebtoken::errors::Error) -> Error {
    use jsonwebtoken::errors::ErrorKind as K;
    let why = match err.kind() {
        K::ExpiredSignature => return Error::unauthorized("TOKEN_EXPIRED", "the token has expired"),
        K::ImmatureSignature => "the token is not valid yet (nbf)",
        K::InvalidAudience => "the token is not meant for this API (aud)",
        K::InvalidIssuer => "the token comes from another issuer (iss)",
        K::MissingRequiredClaim(_) => "the token lacks a required claim (exp, iss, aud, sub)",
        K::InvalidSignature => "the token's signature does not verify",
        _ => "the bearer token is not valid",
    };
    Error::unauthorized("INVALID_TOKEN", why)
}

/// Every value of header `name`, joined as one list (`, `).
pub(crate) fn header_values(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(admin: Option<&str>) -> Provider {
        Provider {
            issuer: "http://idp".into(),
            audiences: vec!["shop".into()],
            admin: admin.and_then(|claim| {
                let (path, value) = claim.split_once('=')?;
                Some((path.split('.').map(str::to_owned).collect(), value.to_owned()))
            }),
            keys: Jwks::new("http://idp", None),
        }
    }

    #[test]
    fn the_admin_claim_is_read_by_its_path() {
        let claims = serde_json::json!({
            "roles": ["user", "orderflow-admin"],
            "scope": "openid orders orderflow:admin",
            "realm_access": {"roles": ["orderflow-admin"]},
            "other": "orderflow-administrator",
        });
        assert!(provider(Some("roles=orderflow-admin")).is_admin(&claims));
        assert!(provider(Some("scope=orderflow:admin")).is_admin(&claims));
        assert!(provider(Some("realm_access.roles=orderflow-admin")).is_admin(&claims));
        assert!(!provider(Some("other=orderflow-admin")).is_admin(&claims));
        assert!(!provider(Some("missing.path=x")).is_admin(&claims));
        assert!(!provider(None).is_admin(&claims));
    }
}
