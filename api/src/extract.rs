//! Extractors whose rejections are problem documents, and the bearer-token principals.

use axum::{
    extract::{FromRequest, FromRequestParts},
    http::{HeaderMap, header, request::Parts},
};
use orderflow_shared::{Error, auth::Principal};

use crate::{AppState, problem::ApiError};

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
#[derive(Debug, Clone, Copy)]
pub struct User(pub Principal);

impl User {
    pub fn id(&self) -> i64 {
        self.0.user_id
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        Ok(Self(state.keys.verify(token)?))
    }
}

/// A caller whose token has `role: "admin"`.
#[derive(Debug, Clone, Copy)]
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let User(principal) = User::from_request_parts(parts, state).await?;
        if !principal.admin {
            return Err(Error::forbidden("ADMIN_REQUIRED", "this route needs an admin token").into());
        }
        Ok(Self(principal))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, Error> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| Error::unauthorized("MISSING_TOKEN", "send Authorization: Bearer <token>"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::unauthorized("INVALID_TOKEN", "the Authorization header is not a bearer token"))
}

/// The optional `Idempotency-Key` header: 1..=255 visible ASCII characters.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .map(|k| k.trim().trim_matches('"'))
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                Error::bad_request(
                    "INVALID_IDEMPOTENCY_KEY",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            })?;
        Ok(Self(Some(key.to_owned())))
    }
}

impl IdempotencyKey {
    pub fn required(self) -> Result<String, Error> {
        self.0
            .ok_or_else(|| Error::bad_request("IDEMPOTENCY_KEY_REQUIRED", "send an Idempotency-Key header"))
    }
}
