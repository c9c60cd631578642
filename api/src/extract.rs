//! Extractors whose rejections are problem documents, and the principals (bearer token, or the
//! ops dashboard's admin cookie).

use axum::{
    extract::{FromRequest, FromRequestParts},
    http::{HeaderMap, header, request::Parts},
};
use orderflow_shared::{Error, auth::Principal};

use crate::{AppState, header_grammar, problem::ApiError};

/// `axum::Json` with problem-document rejections.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` with problem-document rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` with problem-document rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The caller, from a valid bearer token.
#[derive(Debug, Clone)]
pub struct User {
    pub principal: Principal,
    /// When the token expires (`exp`, seconds since the epoch): what runs on after the
    /// handler (an event stream) ends then.
    pub expires_at: i64,
}

impl User {
    pub fn id(&self) -> i64 {
        self.principal.user_id
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        let caller = state.auth.verify(&state.pool, token).await?;
        Ok(Self {
            principal: caller.principal,
            expires_at: caller.expires_at,
        })
    }
}

/// A caller whose token makes an admin (`role: "admin"` with the shared secret, AUTH_ADMIN_CLAIM
/// with the identity provider): from the bearer header, or else from the ops dashboard's
/// session cookie ([`ADMIN_COOKIE`]). A bearer header always wins.
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);

/// The HttpOnly cookie in which the ops dashboard keeps an admin token (see `routes::ops`).
pub const ADMIN_COOKIE: &str = "orderflow_admin";

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = match cookie(&parts.headers, ADMIN_COOKIE) {
            // A bearer token the client sends wins; any other Authorization (a proxy's Basic
            // credentials, which the browser sends with every request) is not orderflow's.
            Some(token) if !header_grammar::is_bearer(&parts.headers) => {
                if !parts.method.is_safe() {
                    same_origin(&parts.headers)?;
                }
                state.auth.verify(&state.pool, token).await?.principal
            }
            _ => User::from_request_parts(parts, state).await?.principal,
        };
        if !principal.admin {
            return Err(Error::forbidden("ADMIN_REQUIRED", "this route needs an admin token").into());
        }
        Ok(Self(principal))
    }
}

pub use crate::header_grammar::cookie;

/// SameSite=Strict keeps the cookie off cross-site requests, but another port of the same host
/// is the same site. A browser says where a request comes from (`Sec-Fetch-Site`, `Origin`);
/// a cookie-authenticated change is accepted only from the same origin. Clients that send
/// neither header (curl, scripts) are not browsers and cannot be tricked into sending it.
/// Logging in and out set the cookie, so they are held to the same rule: another site's form
/// could otherwise end an operator's session mid-incident, or swap in a session of its own.
/// `CROSS_ORIGIN_REQUEST` (403) otherwise.
pub fn same_origin(headers: &HeaderMap) -> Result<(), Error> {
    if from_same_origin(headers) {
        Ok(())
    } else {
        Err(Error::forbidden(
            "CROSS_ORIGIN_REQUEST",
            "a cookie-authenticated change must come from the dashboard's own origin",
        ))
    }
}

/// The `Origin`'s host and port must be the request's `Host`, or the `X-Forwarded-Host` a
/// reverse proxy that rewrites `Host` sets (another site's page cannot set that header on a
/// request it makes cross-origin without the dashboard's consent, CORS, which it never gives).
fn from_same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site == "same-origin";
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some((_, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false;
    };
    let forwarded = headers
        .get("x-forwarded-host")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split(',').next())
        .map(str::trim);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    [host, forwarded].into_iter().flatten().any(|h| h == authority)
}

/// The token of `Authorization: Bearer <token>` ([`header_grammar::bearer_token`]).
fn bearer(headers: &HeaderMap) -> Result<&str, Error> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(Error::unauthorized(
            "MISSING_TOKEN",
            "send Authorization: Bearer <token>",
        ));
    }
    header_grammar::bearer_token(headers)
        .ok_or_else(|| Error::unauthorized("INVALID_TOKEN", "the Authorization header is not a bearer token"))
}

/// The optional `Idempotency-Key` header, sent once: 1..=255 characters, either bare (visible
/// ASCII other than `"`, what most clients send) or as the sf-string the IETF draft makes it
/// (RFC 8941 §3.3.3: in double quotes, spaces allowed, `\"` and `\\` escaped; the key is the
/// string with its escapes undone, so `"abc"` and `abc` are one key). Exactly
/// [`IDEMPOTENCY_KEY_PATTERN`]; anything else, or the header twice, is a 400
/// `INVALID_IDEMPOTENCY_KEY`.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

/// [`IdempotencyKey`]'s grammar as an OpenAPI `pattern`.
pub const IDEMPOTENCY_KEY_PATTERN: &str = r#"^(?:[!#-~]{1,255}|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$"#;

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let invalid = |detail: &str| Error::bad_request("INVALID_IDEMPOTENCY_KEY", detail.to_owned());
        let value = header_grammar::single(&parts.headers, "idempotency-key")
            .map_err(|_| invalid("send one Idempotency-Key header, not several"))?;
        let Some(value) = value else {
            return Ok(Self(None));
        };
        let bytes = value.as_bytes();
        let key = if bytes.first() == Some(&b'"') {
            header_grammar::sf_string(bytes)
        } else {
            bytes
                .iter()
                .all(|b| b.is_ascii_graphic() && *b != b'"')
                .then(|| String::from_utf8_lossy(bytes).into_owned())
        };
        let key = key.filter(|k| (1..=255).contains(&k.len())).ok_or_else(|| {
            invalid(
                "Idempotency-Key must be 1 to 255 visible ASCII characters other than '\"', or a quoted sf-string of 1 to 255 characters",
            )
        })?;
        Ok(Self(Some(key)))
    }
}

impl IdempotencyKey {
    pub fn required(self) -> Result<String, Error> {
        self.0
            .ok_or_else(|| Error::bad_request("IDEMPOTENCY_KEY_REQUIRED", "send an Idempotency-Key header"))
    }
}
