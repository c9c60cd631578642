//! Idempotency keys (IETF draft semantics), per user and scope, in the caller's transaction:
//! - a key seen before with the same request replays the stored response;
//! - with another request it is 422 `IDEMPOTENCY_KEY_REUSED`;
//! - while another request with the key is still in flight it is 409 `IDEMPOTENCY_KEY_IN_USE`.
//!
//! The in-flight check is a transaction-scoped advisory lock on the key, so a crash can never
//! leave a key stuck "in progress": the lock dies with the transaction.

use axum::{
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use orderflow_shared::{Error, Result};
use sqlx::PgConnection;

/// A response stored under a key, replayed on retries.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Stored {
    pub request: serde_json::Value,
    pub status_code: i16,
    pub response: serde_json::Value,
    pub headers: serde_json::Value,
}

impl IntoResponse for Stored {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status_code as u16).unwrap_or(StatusCode::OK);
        let mut res = (status, axum::Json(self.response)).into_response();
        if let Some(headers) = self.headers.as_object() {
            for (name, value) in headers {
                if let (Ok(n), Some(Ok(v))) = (
                    HeaderName::try_from(name.as_str()),
                    value.as_str().map(HeaderValue::from_str),
                ) {
                    res.headers_mut().insert(n, v);
                }
            }
        }
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        res
    }
}

/// One request's claim on an idempotency key.
#[derive(Debug, Clone)]
pub struct Claim {
    pub user_id: i64,
    pub scope: &'static str,
    pub key: String,
    /// The request as it will be compared with a retry's.
    pub request: serde_json::Value,
}

impl Claim {
    /// Claims the key for this transaction. `Some(stored)` means: replay it, do nothing else.
    pub async fn begin(&self, conn: &mut PgConnection) -> Result<Option<Stored>> {
        let lock_name = format!("{}\u{1f}{}\u{1f}{}", self.user_id, self.scope, self.key);
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(&lock_name)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Err(Error::conflict(
                "IDEMPOTENCY_KEY_IN_USE",
                "a request with this Idempotency-Key is still being processed; retry shortly",
            ));
        }
        let stored: Option<Stored> = sqlx::query_as(
            "SELECT request, status_code, response, headers FROM idempotency_keys
             WHERE user_id = $1 AND scope = $2 AND key = $3",
        )
        .bind(self.user_id)
        .bind(self.scope)
        .bind(&self.key)
        .fetch_optional(&mut *conn)
        .await?;
        match stored {
            Some(s) if s.request == self.request => Ok(Some(s)),
            Some(_) => Err(Error::unprocessable(
                "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was used with a different request",
            )),
            None => Ok(None),
        }
    }

    /// Stores the first request's response, in the same transaction as its effect.
    pub async fn finish(
        &self,
        conn: &mut PgConnection,
        status: StatusCode,
        response: &serde_json::Value,
        headers: serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO idempotency_keys (user_id, scope, key, request, status_code, response, headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(self.user_id)
        .bind(self.scope)
        .bind(&self.key)
        .bind(&self.request)
        .bind(status.as_u16() as i16)
        .bind(response)
        .bind(headers)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// What a request under an idempotency claim produced.
pub enum Claimed {
    /// A retry: the first request's response, to send again; nothing was changed.
    Replay(Stored),
    /// A first request: its response; its effects are in the transaction.
    Fresh(axum::response::Response),
}

/// Ends the request's transaction explicitly: commit a fresh request, roll back a replay or
/// an error. (A dropped transaction is rolled back lazily, and until then its advisory lock
/// would answer an immediate retry with a spurious 409.)
pub async fn end(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    result: Result<Claimed, Error>,
) -> Result<axum::response::Response, crate::problem::ApiError> {
    match result {
        Ok(Claimed::Fresh(res)) => {
            tx.commit().await?;
            orderflow_shared::db::outbox::committed();
            Ok(res)
        }
        Ok(Claimed::Replay(stored)) => {
            tx.rollback().await?;
            Ok(stored.into_response())
        }
        Err(err) => {
            let _ = tx.rollback().await;
            Err(err.into())
        }
    }
}
