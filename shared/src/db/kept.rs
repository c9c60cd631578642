//! Connections a busy loop keeps between its transactions.
//!
//! sqlx's pool checks every connection it takes back with a round trip (a `Sync`, answered by
//! `ReadyForQuery`; sqlx-core's `PoolConnection::return_to_pool`). At the rates shops really
//! run, a step's transaction is a handful of round trips (BEGIN, inbox, lock, its statements,
//! COMMIT), so that check is one more of them, and every round trip wakes an idle backend and
//! this process (docs/PERFORMANCE.md, "the floor"). [`Kept`] holds up to `max` connections out
//! of the pool after their transaction committed and hands the most recently used one to the
//! next transaction: it skips the check and meets a backend whose caches are warm.
//!
//! A kept connection goes back through the pool, and so through its checks (the failover
//! follower's among them, see [`super::pool`]), once it has been out of the pool for
//! [`KEEP_FOR`] or unused for [`IDLE`]; a connection whose transaction did not commit goes
//! back at once, together with every other kept one (a failure may mean the node went away).

use std::{
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use sqlx::{PgConnection, PgPool, Postgres, pool::PoolConnection};
use tokio::sync::Notify;

/// How long a connection may be out of the pool and still be kept or handed out again (an
/// unused one is given back at most [`IDLE`] after that): a pool that moved to another node
/// (failover) finds its old connections within about this long.
pub const KEEP_FOR: Duration = Duration::from_secs(1);
/// Longest a transaction on a kept connection may go without its answers: the busy loops
/// (the accept writers, the workers' steps) run their transactions within it (see
/// [`KeptConnection::settle`]). A primary that vanished without closing its connections
/// (power lost, cut off from the network) answers nothing, and with no TCP keepalive the wait
/// would last until the kernel gives up on the connection, about 15 minutes, holding the loop
/// (order intake stops once both accept writers wait) long after a failover moved the pool to
/// the new primary. Far above any transaction of theirs: they take milliseconds.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Longest a kept connection waits unused: a quiet loop gives its connections back.
pub const IDLE: Duration = Duration::from_millis(250);

/// Up to `max` connections kept out of `pool` between transactions (see the module).
pub struct Kept {
    pool: PgPool,
    max: usize,
    /// How long a kept connection may wait unused ([`IDLE`] unless set).
    idle_for: Duration,
    idle: Mutex<Vec<Idle>>,
    /// Wakes the reaper when the first connection is kept, and when this is dropped.
    reaper: Arc<Notify>,
}

struct Idle {
    conn: PoolConnection<Postgres>,
    /// When it left the pool.
    taken: Instant,
    /// When its last transaction committed.
    used: Instant,
}

impl Idle {
    fn expires(&self, idle_for: Duration) -> Instant {
        (self.used + idle_for).min(self.taken + KEEP_FOR)
    }
}

impl Kept {
    /// Keeps up to `max` connections of `pool`. Spawns the task that gives back the ones due
    /// (it ends with this), so it must be called inside a tokio runtime.
    pub fn new(pool: PgPool, max: usize) -> Arc<Self> {
        Self::with_idle(pool, max, IDLE)
    }

    /// [`Kept::new`], keeping an unused connection for `idle_for` instead of [`IDLE`].
    pub fn with_idle(pool: PgPool, max: usize, idle_for: Duration) -> Arc<Self> {
        let kept = Arc::new(Self {
            pool,
            max,
            idle_for,
            idle: Mutex::new(Vec::new()),
            reaper: Arc::new(Notify::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&kept), kept.reaper.clone()));
        kept
    }

    /// The pool the connections come from, for work that does not need a kept one.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The most recently used kept connection, or one from the pool.
    ///
    /// # Errors
    /// The pool's (no connection within its acquire timeout, the database unavailable).
    pub async fn acquire(&self) -> sqlx::Result<KeptConnection<'_>> {
        let now = Instant::now();
        let reuse = {
            let mut idle = self.lock();
            let mut found = None;
            while let Some(one) = idle.pop() {
                if one.expires(self.idle_for) > now {
                    found = Some(one);
                    break;
                }
                // Dropped here: back to the pool (checked there).
            }
            found
        };
        let (conn, taken) = match reuse {
            Some(one) => (one.conn, one.taken),
            None => (self.pool.acquire().await?, now),
        };
        Ok(KeptConnection {
            home: self,
            conn: Some(conn),
            taken,
        })
    }

    /// How many connections are kept now (out of the pool, waiting for a transaction).
    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Gives every kept connection back to the pool.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }

    fn put(&self, conn: PoolConnection<Postgres>, taken: Instant) {
        let used = Instant::now();
        if used >= taken + KEEP_FOR {
            return; // out long enough: back to the pool
        }
        let mut idle = self.lock();
        if idle.len() >= self.max {
            return;
        }
        idle.push(Idle { conn, taken, used });
        if idle.len() == 1 {
            self.reaper.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic while holding the lock leaves a valid Vec: use it.
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.reaper.notify_one();
    }
}

/// Gives back kept connections as they come due; ends when the [`Kept`] is gone.
async fn reap(kept: Weak<Kept>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(kept) = kept.upgrade() else { return };
            let now = Instant::now();
            let mut idle = kept.lock();
            idle.retain(|one| one.expires(kept.idle_for) > now);
            idle.iter().map(|one| one.expires(kept.idle_for)).min()
        };
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => wake.notified().await,
        }
    }
}

/// A connection out of a [`Kept`]. [`KeptConnection::keep`] after a commit keeps it for the
/// next transaction; dropped otherwise, it goes back to the pool, and so does every kept one.
pub struct KeptConnection<'a> {
    home: &'a Kept,
    conn: Option<PoolConnection<Postgres>>,
    taken: Instant,
}

impl KeptConnection<'_> {
    /// Keeps the connection for the next transaction. Only after a commit: the connection
    /// must be idle, outside any transaction.
    pub fn keep(mut self) {
        if let Some(conn) = self.conn.take() {
            self.home.put(conn, self.taken);
        }
    }

    /// Gives up on a connection whose node did not answer within [`ANSWER_DEADLINE`]: it is
    /// closed (within sqlx's 5 s close timeout) instead of going back to the pool, where the
    /// pool's check of it would wait as long again, and so is every kept one (its node may be
    /// gone). The server ends the transaction it was running within 2 s of the close
    /// ([`super::CONNECTION_CHECK`]). Returns the error the transaction fails with: the database unavailable, so
    /// transient (retried by a step; answered 503 by the accept path, whose retry with the same
    /// Idempotency-Key settles whether the commit happened).
    fn abandon(mut self) -> crate::Error {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
        // The kept ones are closed too, not given back: the pool's check of a connection to a
        // node that vanished would hold its slot as long as the kernel keeps the connection.
        for mut idle in std::mem::take(&mut *self.home.lock()) {
            idle.conn.close_on_drop();
        }
        unanswered(ANSWER_DEADLINE)
    }
}

impl KeptConnection<'_> {
    /// Settles the connection by the outcome of a transaction run on it within
    /// [`ANSWER_DEADLINE`] (`tokio::time::timeout(ANSWER_DEADLINE, work).await`): committed, it
    /// is kept for the next transaction; failed, it goes back to the pool (with every kept
    /// one); without an answer in time it is [abandoned](Self::abandon), and the outcome is the
    /// error of a database that did not answer (transient).
    ///
    /// `work` must end with a commit when it succeeds (see [`keep`](Self::keep)).
    pub fn settle<T, E: From<crate::Error>>(
        self,
        done: Result<Result<T, E>, tokio::time::error::Elapsed>,
    ) -> Result<T, E> {
        match done {
            Ok(Ok(committed)) => {
                self.keep();
                Ok(committed)
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(self.abandon().into()),
        }
    }
}

/// `work`'s outcome, or once it went [`ANSWER_DEADLINE`] without one, the error of a database
/// that did not answer (transient). For work on connections straight from the pool (the
/// sweep, a step's split and park, the loops that poll: the API's waiters and streams, the
/// samplers, the lease resumer): the connection it held goes back to the pool, which closes it
/// unchecked once it has moved to a new primary (`super::primary`), as it will have by then
/// for a multi-host URL (it looks every 0.5 s).
pub async fn answered<T>(work: impl Future<Output = crate::Result<T>>) -> crate::Result<T> {
    answered_within(ANSWER_DEADLINE, work).await
}

/// [`answered`] with a deadline of its own, for work that takes longer than a round trip (a
/// rebuild, a full count).
pub async fn answered_within<T>(deadline: Duration, work: impl Future<Output = crate::Result<T>>) -> crate::Result<T> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| Err(unanswered(deadline)))
}

/// [`answered`] for a query's own future (a `sqlx` error becomes the crate's).
pub async fn answered_query<T>(query: impl Future<Output = sqlx::Result<T>>) -> crate::Result<T> {
    answered(async { Ok(query.await?) }).await
}

/// The database did not answer within `deadline`: unavailable, so transient.
fn unanswered(deadline: Duration) -> crate::Error {
    crate::Error::Unavailable(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the database did not answer within {deadline:?}"),
    )))
}

impl Deref for KeptConnection<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a connection until kept or dropped")
    }
}

impl DerefMut for KeptConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a connection until kept or dropped")
    }
}

impl Drop for KeptConnection<'_> {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.home.clear();
        }
    }
}
