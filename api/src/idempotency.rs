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
        claim_all(conn, &[self]).await?.pop().unwrap_or(Ok(None))
    }

    fn lock_name(&self) -> String {
        format!("{}\u{1f}{}\u{1f}{}", self.user_id, self.scope, self.key)
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

/// Claims several keys for this transaction at once, in two statements whatever their number
/// (group commit): per claim, `Ok(Some(stored))` to replay, `Ok(None)` for a first request,
/// 409 `IDEMPOTENCY_KEY_IN_USE` while another request holds the key (including an earlier
/// claim in `claims` with the same user, scope and key), 422 `IDEMPOTENCY_KEY_REUSED` for
/// the key with another request.
pub async fn claim_all(conn: &mut PgConnection, claims: &[&Claim]) -> Result<Vec<Result<Option<Stored>>>> {
    let in_use = || {
        Error::conflict(
            "IDEMPOTENCY_KEY_IN_USE",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )
    };
    let mut results: Vec<Result<Option<Stored>>> = Vec::with_capacity(claims.len());
    let mut seen = std::collections::HashSet::new();
    let mut names = Vec::new();
    let mut asked = Vec::new();
    for (i, claim) in claims.iter().enumerate() {
        let name = claim.lock_name();
        if seen.insert(name.clone()) {
            names.push(name);
            asked.push(i);
            results.push(Ok(None));
        } else {
            results.push(Err(in_use()));
        }
    }
    // The in-flight check first, then the lookup in a statement of its own: it must see
    // whatever a previous holder of the lock committed before releasing it.
    let locked: Vec<bool> =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended(k, 0)) FROM UNNEST($1::text[]) AS k")
            .bind(&names)
            .fetch_all(&mut *conn)
            .await?;
    let mut lookup = Vec::new();
    for (&i, got) in asked.iter().zip(locked) {
        if got {
            lookup.push(i);
        } else {
            results[i] = Err(in_use());
        }
    }
    if lookup.is_empty() {
        return Ok(results);
    }
    let users: Vec<i64> = lookup.iter().map(|&i| claims[i].user_id).collect();
    let scopes: Vec<&str> = lookup.iter().map(|&i| claims[i].scope).collect();
    let keys: Vec<&str> = lookup.iter().map(|&i| claims[i].key.as_str()).collect();
    let stored: Vec<(i64, Stored)> = sqlx::query_as::<_, StoredAt>(
        "SELECT t.n - 1 AS at, s.request, s.status_code, s.response, s.headers
         FROM UNNEST($1::int8[], $2::text[], $3::text[]) WITH ORDINALITY AS t(uid, scope, key, n)
         JOIN idempotency_keys s ON s.user_id = t.uid AND s.scope = t.scope AND s.key = t.key",
    )
    .bind(&users)
    .bind(&scopes)
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|s| (s.at, s.stored))
    .collect();
    for (at, stored) in stored {
        let i = lookup[at as usize];
        results[i] = if stored.request == claims[i].request {
            Ok(Some(stored))
        } else {
            Err(Error::unprocessable(
                "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was used with a different request",
            ))
        };
    }
    Ok(results)
}

#[derive(sqlx::FromRow)]
struct StoredAt {
    at: i64,
    #[sqlx(flatten)]
    stored: Stored,
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
