//! Bearer tokens signed with the shared secret: HS256 JWTs whose `sub` is a user id
//! (1..[`FIRST_PROVIDER_USER_ID`]), with a required `exp`, and `role: "admin"` for admin routes.
//! Who the caller is ([`Principal`]), whichever verifier said so (the API also verifies an
//! identity provider's tokens: `orderflow_api::auth`).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Who is calling: taken from the token, never from a path or body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// orderflow's user id: the token's `sub` (shared secret), or the id the provider's
    /// (issuer, `sub`) was given on first sight.
    pub user_id: i64,
    pub admin: bool,
    /// The identity provider's name for the caller; `None` for a shared-secret token.
    pub identity: Option<std::sync::Arc<Identity>>,
}

impl Principal {
    /// How audit records name the caller: `42`, or `1000000000001 (<issuer>#<sub>)` for a user of
    /// the identity provider.
    pub fn describe(&self) -> String {
        match &self.identity {
            Some(id) => format!("{} ({}#{})", self.user_id, id.issuer, id.subject),
            None => self.user_id.to_string(),
        }
    }

    /// An admin as audit records name them: `admin:42`, `admin:1000000000001 (<issuer>#<sub>)`.
    pub fn describe_as_actor(&self) -> String {
        format!("admin:{}", self.describe())
    }
}

/// A user as an identity provider knows them: its issuer and their `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
}

/// The first user id given to identity-provider users (on first sight, in order); ids below it
/// are the shared-secret tokens' (`sub` 1..=999,999,999,999), so the two never meet.
pub const FIRST_PROVIDER_USER_ID: i64 = 1_000_000_000_000;

/// The longest lifetime `orderflow token --ttl` may ask for: 10 years, in seconds.
pub const MAX_TOKEN_TTL_SECS: i64 = 10 * 366 * 24 * 3600;

#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Keys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token that is not valid yet must not be accepted (RFC 7519 §4.1.5).
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Signs a token for `user_id`, valid for `ttl_secs` (negative: already expired, for
    /// tests). `ttl_secs` must lie within +-[`MAX_TOKEN_TTL_SECS`]: `exp` is computed with
    /// checked arithmetic and never wraps.
    pub fn issue(&self, user_id: i64, admin: bool, ttl_secs: i64) -> Result<String> {
        if !(1..FIRST_PROVIDER_USER_ID).contains(&user_id) {
            return Err(Error::bad_request(
                "INVALID_USER_ID",
                format!("user id must be 1 to {}", FIRST_PROVIDER_USER_ID - 1),
            ));
        }
        if !(-MAX_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&ttl_secs) {
            return Err(Error::bad_request(
                "INVALID_TTL",
                format!("a token lives at most {MAX_TOKEN_TTL_SECS} seconds (10 years)"),
            ));
        }
        let exp = chrono::Utc::now()
            .timestamp()
            .checked_add(ttl_secs)
            .ok_or_else(|| Error::bad_request("INVALID_TTL", "the token's expiry is out of range"))?;
        let claims = Claims {
            sub: user_id.to_string(),
            exp,
            role: admin.then(|| "admin".to_owned()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(anyhow::anyhow!("signing a token failed: {e}")))
    }

    /// Verifies signature, algorithm (HS256 only; `alg: none` is refused) and expiry.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        self.verify_with_expiry(token).map(|(principal, _)| principal)
    }

    /// As [`Keys::verify`], also returning the token's `exp` (Unix seconds): what a session
    /// cookie holding the token may live for.
    pub fn verify_with_expiry(&self, token: &str) -> Result<(Principal, i64)> {
        check_header(token)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => Error::unauthorized("TOKEN_EXPIRED", "the token has expired"),
                _ => Error::unauthorized("INVALID_TOKEN", "the bearer token is not valid"),
            }
        })?;
        let user_id: i64 = data
            .claims
            .sub
            .parse()
            .ok()
            .filter(|id| (1..FIRST_PROVIDER_USER_ID).contains(id))
            .ok_or_else(|| {
                Error::unauthorized(
                    "INVALID_TOKEN",
                    format!("the token subject is not a user id 1 to {}", FIRST_PROVIDER_USER_ID - 1),
                )
            })?;
        let principal = Principal {
            user_id,
            admin: data.claims.role.as_deref() == Some("admin"),
            identity: None,
        };
        Ok((principal, data.claims.exp))
    }
}

/// The JOSE header checks that come before any signature check (RFC 7515, RFC 8725), and the
/// header itself:
/// - `crit` names header extensions the recipient must understand or else reject the token
///   (RFC 7515 §4.1.11); orderflow understands none, so a token with `crit` (for example
///   `b64: false` of RFC 7797, which changes what was signed) is refused;
/// - the algorithm is checked against the key's allowlist by the verifier itself
///   (`Validation::algorithms`: HS256 only for the shared secret; `alg: none` never, RFC 8725
///   §3.1), and keys are never taken from the token (`jku`, `jwk`, `x5u` are ignored).
pub fn check_header(token: &str) -> Result<jsonwebtoken::Header> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| Error::unauthorized("INVALID_TOKEN", "the bearer token is not valid"))?;
    if let Some(crit) = &header.crit {
        return Err(Error::unauthorized(
            "INVALID_TOKEN",
            format!(
                "the token marks header extensions {crit:?} critical, and orderflow understands none (RFC 7515 §4.1.11)"
            ),
        ));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify() -> Result<()> {
        let keys = Keys::new("secret");
        let p = keys.verify(&keys.issue(42, true, 60)?)?;
        assert_eq!(
            p,
            Principal {
                user_id: 42,
                admin: true,
                identity: None,
            }
        );
        let p = keys.verify(&keys.issue(7, false, 60)?)?;
        assert!(!p.admin);
        Ok(())
    }

    #[test]
    fn bad_tokens_are_refused() -> Result<()> {
        let keys = Keys::new("secret");
        let other = Keys::new("other");
        let code = |t: &str| keys.verify(t).err().and_then(|e| e.code());
        assert_eq!(code(&other.issue(1, false, 60)?), Some("INVALID_TOKEN"));
        assert_eq!(code(&keys.issue(1, false, -120)?), Some("TOKEN_EXPIRED"));
        assert_eq!(code("garbage"), Some("INVALID_TOKEN"));
        // alg none: header {"alg":"none","typ":"JWT"}, payload {"sub":"1","exp":9999999999}
        assert_eq!(
            code("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIxIiwiZXhwIjo5OTk5OTk5OTk5fQ."),
            Some("INVALID_TOKEN")
        );
        assert!(keys.issue(0, false, 60).is_err());
        // A lifetime that would overflow `exp` is refused, never wrapped into the past.
        for ttl in [i64::MAX, i64::MIN, MAX_TOKEN_TTL_SECS + 1] {
            assert_eq!(
                keys.issue(1, false, ttl).err().and_then(|e| e.code()),
                Some("INVALID_TTL")
            );
        }
        assert!(keys.issue(1, false, MAX_TOKEN_TTL_SECS).is_ok());
        Ok(())
    }

    #[test]
    fn critical_header_extensions_are_refused() -> Result<()> {
        let keys = Keys::new("secret");
        let claims = Claims {
            sub: "1".into(),
            exp: chrono::Utc::now().timestamp() + 60,
            role: None,
        };
        let sign = |crit: Option<Vec<String>>| {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = crit;
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"secret"))
                .map_err(|e| Error::Internal(e.into()))
        };
        assert!(keys.verify(&sign(None)?).is_ok());
        for crit in [vec!["x-policy".to_owned()], vec!["b64".to_owned()], vec![]] {
            let err = keys.verify(&sign(Some(crit.clone()))?).err();
            assert_eq!(err.as_ref().and_then(Error::code), Some("INVALID_TOKEN"), "{crit:?}");
            assert!(err.is_some_and(|e| e.to_string().contains("7515")), "{crit:?}");
        }
        Ok(())
    }
}
