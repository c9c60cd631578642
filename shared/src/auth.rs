//! Bearer tokens: HS256 JWTs whose `sub` is a positive integer user id, with a required
//! `exp`, and `role: "admin"` for admin routes.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: i64,
    pub admin: bool,
}

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

    /// Signs a token for `user_id`, valid for `ttl_secs`.
    pub fn issue(&self, user_id: i64, admin: bool, ttl_secs: i64) -> Result<String> {
        if user_id <= 0 {
            return Err(Error::bad_request(
                "INVALID_USER_ID",
                "user id must be a positive integer",
            ));
        }
        let claims = Claims {
            sub: user_id.to_string(),
            exp: chrono::Utc::now().timestamp() + ttl_secs,
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
            .filter(|id| *id > 0)
            .ok_or_else(|| Error::unauthorized("INVALID_TOKEN", "the token subject is not a positive user id"))?;
        let principal = Principal {
            user_id,
            admin: data.claims.role.as_deref() == Some("admin"),
        };
        Ok((principal, data.claims.exp))
    }
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
                admin: true
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
        Ok(())
    }
}
