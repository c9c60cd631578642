//! The one place where errors become HTTP: RFC 9457 `application/problem+json`
//! `{type, title, status, detail, code}`. Internal errors are logged and answered opaquely.

use axum::{
    extract::rejection::{JsonRejection, PathRejection, QueryRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use orderflow_shared::{Error, ErrorKind};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    #[schema(example = "urn:orderflow:problem:invalid-amount-unit")]
    pub kind: String,
    #[schema(example = "Bad Request")]
    pub title: String,
    #[schema(example = 400)]
    pub status: u16,
    #[schema(example = "a charge must be a multiple of 10 won")]
    pub detail: String,
    /// A stable upper-case code to branch on.
    #[schema(example = "INVALID_AMOUNT_UNIT")]
    pub code: String,
}

impl Problem {
    pub fn new(status: u16, title: &str, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:orderflow:problem:{}", code.to_ascii_lowercase().replace('_', "-")),
            title: title.to_owned(),
            status,
            detail: detail.into(),
            code: code.to_owned(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// The error type of every handler.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self(err.into())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        Self(err.into())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}

impl ApiError {
    pub fn to_problem(&self) -> Problem {
        match &self.0 {
            Error::Client { kind, code, detail } => Problem::new(kind.status(), kind.title(), code, detail.clone()),
            Error::Race(why) => {
                tracing::warn!(%why, "transaction lost a race");
                Problem::new(
                    503,
                    "Service Unavailable",
                    "SERVICE_UNAVAILABLE",
                    "the request met a concurrent change; retry shortly",
                )
            }
            Error::Unavailable(err) => {
                tracing::warn!(error = %err, "database unavailable");
                Problem::new(
                    503,
                    "Service Unavailable",
                    "SERVICE_UNAVAILABLE",
                    "the database is unavailable; retry shortly",
                )
            }
            Error::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                Problem::new(
                    500,
                    "Internal Server Error",
                    "INTERNAL_ERROR",
                    "an unexpected error occurred",
                )
            }
        }
    }
}

/// Whether `err` or one of its sources is a body that was not sent in time
/// ([`crate::admission::BODY_DEADLINE`]).
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| e.is::<crate::admission::BodyTimeout>())
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if timed_out(&rejection) {
            return Self(Error::client(
                ErrorKind::RequestTimeout,
                "BODY_TIMEOUT",
                crate::admission::BodyTimeout,
            ));
        }
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self(Error::client(
                ErrorKind::PayloadTooLarge,
                "PAYLOAD_TOO_LARGE",
                "the request body is larger than this API accepts",
            ));
        }
        // A body in another format is 415 (RFC 9110 §15.5.16), not a malformed request.
        if let JsonRejection::MissingJsonContentType(_) = rejection {
            return Self(Error::client(
                ErrorKind::UnsupportedMediaType,
                "INVALID_CONTENT_TYPE",
                "expected a request body with Content-Type: application/json",
            ));
        }
        let (code, detail) = match &rejection {
            JsonRejection::JsonSyntaxError(e) => (
                "MALFORMED_JSON",
                format!("the body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::JsonDataError(e) => ("INVALID_BODY", e.body_text()),
            other => ("INVALID_BODY", other.body_text()),
        };
        Self(Error::client(ErrorKind::BadRequest, code, detail))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self(Error::bad_request("INVALID_PATH", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self(Error::bad_request("INVALID_QUERY", rejection.body_text()))
    }
}
