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
    let (mut locks, names) = Locks::new(claims);
    let got: Vec<bool> = sqlx::query_scalar(TRY_LOCK).bind(&names).fetch_all(&mut *conn).await?;
    locks.took(&got);
    if locks.held().is_empty() {
        return Ok(locks.into_results());
    }
    // The lookup in a statement of its own, after the locks: it must see whatever a previous
    // holder of a lock committed before releasing it.
    let (users, scopes, keys) = locks.lookup_columns();
    let stored: Vec<StoredAt> = sqlx::query_as(LOOKUP.as_str())
        .bind(&users)
        .bind(&scopes)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
    locks.found(stored);
    Ok(locks.into_results())
}

static LOOKUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| stored_query(1));

/// Takes a transaction-scoped advisory lock per name of `$1::text[]` if it is free: one bool
/// per name, in order.
pub const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtextextended(k, 0))
     FROM UNNEST($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n";

/// The stored responses of the keys in the arrays `$first` (users), `$first+1` (scopes) and
/// `$first+2` (keys): rows of `at` (the key's index in the arrays) and the [`Stored`] columns.
/// Run it in a statement after [`TRY_LOCK`]'s.
pub fn stored_query(first: usize) -> String {
    format!(
        "SELECT t.n - 1 AS at, s.request, s.status_code, s.response, s.headers
         FROM UNNEST(${}::int8[], ${}::text[], ${}::text[]) WITH ORDINALITY AS t(uid, scope, key, n)
         JOIN idempotency_keys s ON s.user_id = t.uid AND s.scope = t.scope AND s.key = t.key",
        first,
        first + 1,
        first + 2
    )
}

/// A stored response, with the index of its key in the looked-up arrays.
#[derive(sqlx::FromRow)]
pub struct StoredAt {
    at: i64,
    #[sqlx(flatten)]
    stored: Stored,
}

/// Claims on their way through [`TRY_LOCK`] and [`stored_query`], for callers that run those
/// inside statements of their own (the group-committed accept).
pub struct Locks<'c> {
    claims: &'c [&'c Claim],
    results: Vec<Result<Option<Stored>>>,
    /// The claims whose names went to the lock statement, in its order.
    asked: Vec<usize>,
    /// The claims whose key this transaction holds and that no stored response answered yet.
    held: Vec<usize>,
}

impl<'c> Locks<'c> {
    /// The claims, and the lock names to try (a repeat of an earlier claim's key is 409 at once).
    pub fn new(claims: &'c [&'c Claim]) -> (Self, Vec<String>) {
        let mut seen = std::collections::HashSet::new();
        let (mut names, mut asked, mut results) = (Vec::new(), Vec::new(), Vec::with_capacity(claims.len()));
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
        let locks = Self {
            claims,
            results,
            asked,
            held: Vec::new(),
        };
        (locks, names)
    }

    /// Records [`TRY_LOCK`]'s answers: a key held elsewhere is 409.
    pub fn took(&mut self, got: &[bool]) {
        self.held.clear();
        for (&i, &got) in self.asked.iter().zip(got) {
            if got {
                self.held.push(i);
            } else {
                self.results[i] = Err(in_use());
            }
        }
    }

    /// The claims still open: their keys are held here and no stored response has answered them.
    pub fn held(&self) -> &[usize] {
        &self.held
    }

    /// The held claims' users, scopes and keys, as [`stored_query`] reads them.
    pub fn lookup_columns(&self) -> (Vec<i64>, Vec<&'static str>, Vec<&'c str>) {
        let claims = self.claims;
        (
            self.held.iter().map(|&i| claims[i].user_id).collect(),
            self.held.iter().map(|&i| claims[i].scope).collect(),
            self.held.iter().map(|&i| claims[i].key.as_str()).collect(),
        )
    }

    /// Answers the claims [`stored_query`] found (over [`lookup_columns`](Self::lookup_columns)):
    /// the same request replays, another is 422. They are no longer held.
    pub fn found(&mut self, stored: Vec<StoredAt>) {
        for StoredAt { at, stored } in stored {
            let Some(&i) = usize::try_from(at).ok().and_then(|at| self.held.get(at)) else {
                continue;
            };
            self.results[i] = if stored.request == self.claims[i].request {
                Ok(Some(stored))
            } else {
                Err(Error::unprocessable(
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with a different request",
                ))
            };
        }
        let results = &self.results;
        self.held.retain(|&i| matches!(results[i], Ok(None)));
    }

    /// Per claim: `Ok(Some(stored))` to replay, `Ok(None)` for a first request (held), or 409/422.
    pub fn into_results(self) -> Vec<Result<Option<Stored>>> {
        self.results
    }
}

fn in_use() -> Error {
    Error::conflict(
        "IDEMPOTENCY_KEY_IN_USE",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

/// Claims `claim`'s key, if the request sent one: `Some(stored)` means replay it and do
/// nothing else (see [`Claim::begin`]).
pub async fn previous(claim: Option<&Claim>, conn: &mut PgConnection) -> Result<Option<Stored>> {
    match claim {
        Some(claim) => claim.begin(conn).await,
        None => Ok(None),
    }
}

/// A first request's answer, `200` with `value` as JSON, stored under `claim` (if the request
/// sent a key) in the transaction of its effect, for its retries to get it again.
pub async fn answer_ok<T: serde::Serialize>(
    claim: Option<&Claim>,
    conn: &mut PgConnection,
    value: &T,
) -> Result<Claimed> {
    if let Some(claim) = claim {
        let body = serde_json::to_value(value).map_err(anyhow::Error::from)?;
        claim.finish(conn, StatusCode::OK, &body, serde_json::json!({})).await?;
    }
    Ok(Claimed::Fresh(axum::Json(value).into_response()))
}

/// What a request under an idempotency claim produced.
pub enum Claimed {
    /// A retry: the first request's response, to send again; nothing was changed.
    Replay(Stored),
    /// A first request: its response; its effects are in the transaction.
    Fresh(axum::response::Response),
}

/// A COMMIT that got no answer (the connection was lost while committing) may have been
/// applied: the client is told so (503 `COMMIT_OUTCOME_UNKNOWN`), not to retry blindly, which
/// for a request sent without an Idempotency-Key (a charge, a restock) would apply it twice.
/// Any other failure is what it is.
fn commit_failed(err: Error) -> Error {
    match err {
        Error::Unavailable(cause) => {
            tracing::warn!(error = %cause, "the database stopped answering during COMMIT");
            Error::unavailable(
                "COMMIT_OUTCOME_UNKNOWN",
                "the database stopped answering while the change was committed, so it may have been applied: \
                 retry only with the same Idempotency-Key (which answers what was done), or check before retrying",
            )
        }
        other => other,
    }
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
            tx.commit().await.map_err(|err| commit_failed(err.into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_without_an_answer_is_reported_as_of_unknown_outcome() {
        let lost = Error::Unavailable(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()));
        assert_eq!(commit_failed(lost).code(), Some("COMMIT_OUTCOME_UNKNOWN"));
        let refused = Error::conflict("BALANCE_LIMIT_EXCEEDED", "over");
        assert_eq!(commit_failed(refused).code(), Some("BALANCE_LIMIT_EXCEEDED"));
    }
}
