//! The one error type. Client-facing variants carry a kind (mapped to an HTTP status in one
//! place, `orderflow_api::problem`) and a stable upper-case code; everything else is
//! logged with context and answered opaquely.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of client error this is; maps 1:1 to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    Gone,
    /// The client did not send its request body in time.
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unprocessable,
    /// A dependency other than the database (the broker) cannot be asked now.
    ServiceUnavailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::RequestTimeout => 408,
            Self::Gone => 410,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unprocessable => 422,
            Self::ServiceUnavailable => 503,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad Request",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Not Found",
            Self::Conflict => "Conflict",
            Self::RequestTimeout => "Request Timeout",
            Self::Gone => "Gone",
            Self::PayloadTooLarge => "Content Too Large",
            Self::UnsupportedMediaType => "Unsupported Media Type",
            Self::Unprocessable => "Unprocessable Content",
            Self::ServiceUnavailable => "Service Unavailable",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem the client can fix or must know about.
    #[error("{code}: {detail}")]
    Client {
        kind: ErrorKind,
        code: &'static str,
        detail: String,
    },
    /// The database cannot be reached right now; retry later (HTTP 503).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The transaction lost a race (for example, stock it planned on was taken since it read
    /// it): rolled back, the same work retried at once succeeds or decides otherwise.
    #[error("lost a race, retry: {0}")]
    Race(String),
    /// Anything else: a bug or an unexpected failure. Logged, never shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn client(kind: ErrorKind, code: &'static str, detail: impl fmt::Display) -> Self {
        Self::Client {
            kind,
            code,
            detail: detail.to_string(),
        }
    }
    pub fn bad_request(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::BadRequest, code, detail)
    }
    pub fn unauthorized(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::Unauthorized, code, detail)
    }
    pub fn forbidden(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::Forbidden, code, detail)
    }
    pub fn not_found(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::NotFound, code, detail)
    }
    pub fn conflict(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::Conflict, code, detail)
    }
    pub fn gone(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::Gone, code, detail)
    }
    pub fn unprocessable(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::Unprocessable, code, detail)
    }
    pub fn unavailable(code: &'static str, detail: impl fmt::Display) -> Self {
        Self::client(ErrorKind::ServiceUnavailable, code, detail)
    }

    /// The stable code of a client error, if this is one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Client { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True when retrying the same operation later may succeed (database or network down).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Race(_))
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if is_race(&err) {
            Self::Race(err.to_string())
        } else if is_unavailable(&err) {
            Self::Unavailable(err)
        } else {
            Self::Internal(anyhow::Error::new(err))
        }
    }
}

/// Whether a database error means the transaction lost to a concurrent one (40001
/// serialization failure, 40P01 deadlock): the same transaction retried can succeed.
pub fn is_race(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| matches!(&*c, "40001" | "40P01")))
}

/// Whether a database error means "the database is not reachable now" rather than "this
/// statement is wrong". Serialization failures and deadlocks count as transient too: the
/// same transaction retried later can succeed.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            // 08: connection exception, 57P01..57P03: admin shutdown / cannot connect now,
            // 40001 serialization failure, 40P01 deadlock, 53300 too many connections,
            // 25006 read-only transaction (the node was demoted: a failover or switchover is
            // under way, and the pool follows the new primary).
            db.code().is_some_and(|c| {
                c.starts_with("08")
                    || matches!(&*c, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300" | "25006")
            })
        }
        _ => false,
    }
}

/// The name of the constraint a database error violated, if any.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}
