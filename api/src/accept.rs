//! Group commit of order acceptances. `POST /api/orders` hands its validated request to the
//! [`Acceptor`]; requests that arrive while a write is in flight share the next transaction:
//! two statements (claim every idempotency key and read every price; then look up every
//! stored response and, when there is none, insert every order, line, history row,
//! idempotency record and the batch's two messages: one `stock.reserve` and one
//! `order.deadline` naming all its orders) and one commit for the whole batch. Nothing waits
//! for a batch to fill: at low load a batch is one request. Each request still gets exactly
//! its own answer (accepted, replayed, 409 key in flight, 422 key reused, 404 unknown product,
//! 400 total too large). If the batch's transaction fails, its requests are written again one
//! per transaction, so one request's failure is only its own; if the database is unavailable
//! (or the connection died during COMMIT), every request of the batch is answered 503 at once
//! and its retry with the same key settles it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::http::StatusCode;
use orderflow_shared::{
    Error, Result,
    db::{
        kept::{self, Kept},
        outbox::{self, Feed, OutboxMessage},
    },
    domain::OrderStatus,
    messaging::MessageType,
    telemetry::TraceParent,
};
use sqlx::{Connection as _, FromRow, PgConnection, PgPool, Row as _};
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::idempotency::{self, Claim, Locks, Stored, StoredAt};

/// Most requests one transaction accepts.
pub const MAX_BATCH: usize = 512;
/// Accept transactions in flight at once: while one commits, the next batch gathers. (Four
/// made batches of ~5 requests in a closed run of 32 clients, two of ~9, one of ~16; two was
/// as fast as one and keeps a second transaction going while one waits for its commit.)
pub const WRITERS: usize = 2;

/// A validated order request, as the handler hands it over.
#[derive(Debug)]
pub struct Request {
    /// The idempotency claim: user, scope, key and the request as a retry must repeat it.
    pub claim: Claim,
    /// (product id, quantity) per line, each product once.
    pub lines: Vec<(i64, i32)>,
    pub coupon_id: Option<i64>,
    /// The request's trace, which becomes the order's.
    pub trace: TraceParent,
}

/// What accepting produced.
#[derive(Debug)]
pub enum Accepted {
    /// A new order, now PENDING.
    Fresh { order_id: Uuid, total: i64 },
    /// A retry: the first request's response, to send again; nothing was changed.
    Replay(Stored),
}

struct Pending {
    request: Request,
    reply: oneshot::Sender<Result<Accepted>>,
}

/// The handle requests are accepted through (cheap to clone).
#[derive(Clone)]
pub struct Acceptor {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Acceptor {
    /// Starts the writer that drains the queue (on the current tokio runtime). It stops when
    /// every handle is dropped. What it commits to the outbox goes to the relay through `feed`
    /// (one started in this process), or else the relay is asked to read it.
    pub fn start(pool: PgPool, order_timeout: Duration, feed: Option<Arc<Feed>>) -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        let timeout_ms = i64::try_from(order_timeout.as_millis()).unwrap_or(i64::MAX);
        tokio::spawn(dispatch(requests, pool, timeout_ms, feed));
        Self { queue }
    }

    /// Accepts one order request in the next batch's transaction.
    pub async fn accept(&self, request: Request) -> Result<Accepted> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { request, reply })
            .map_err(|_| anyhow::anyhow!("the order acceptor has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the order acceptor dropped a request"))?
    }
}

/// Takes whatever is waiting (up to [`MAX_BATCH`]) as soon as a writer is free. The writers
/// keep their connections between batches ([`Kept`]).
async fn dispatch(
    mut requests: mpsc::UnboundedReceiver<Pending>,
    pool: PgPool,
    timeout_ms: i64,
    feed: Option<Arc<Feed>>,
) {
    let writers = Arc::new(Semaphore::new(WRITERS));
    let kept = Kept::new(pool, WRITERS);
    loop {
        let Ok(writer) = writers.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (kept, feed) = (kept.clone(), feed.clone());
        tokio::spawn(async move {
            write(&kept, feed.as_deref(), batch, timeout_ms).await;
            drop(writer);
        });
    }
}

/// Writes a batch and answers each of its requests; if the batch's transaction fails, each
/// request is written again alone.
async fn write(db: &Kept, feed: Option<&Feed>, batch: Vec<Pending>, timeout_ms: i64) {
    metrics::histogram!(orderflow_shared::metrics::ACCEPT_BATCH).record(batch.len() as f64);
    let requests: Vec<&Request> = batch.iter().map(|p| &p.request).collect();
    let answers = match write_batch(db, feed, &requests, timeout_ms).await {
        Ok(answers) => answers,
        // The database cannot be used (down, failing over, or the connection died during
        // COMMIT, so the outcome is unknown): every request is answered 503 at once, and its
        // retry with the same Idempotency-Key finds its order if the commit did happen. Writing
        // each one again alone would only wait out the outage request by request.
        Err(Error::Unavailable(err)) => {
            tracing::warn!(requests = batch.len(), error = %err, "accept batch failed: database unavailable");
            batch
                .iter()
                .map(|_| {
                    Err(Error::unavailable(
                        "SERVICE_UNAVAILABLE",
                        "the database is unavailable; retry shortly with the same Idempotency-Key",
                    ))
                })
                .collect()
        }
        Err(err) if batch.len() > 1 => {
            tracing::warn!(requests = batch.len(), error = %err, "accept batch failed; writing its requests one by one");
            let mut answers = Vec::with_capacity(batch.len());
            for request in &requests {
                answers.push(match write_batch(db, feed, &[*request], timeout_ms).await {
                    Ok(mut one) => one.pop().unwrap_or_else(|| Err(anyhow::anyhow!("no answer").into())),
                    Err(err) => Err(err),
                });
            }
            answers
        }
        Err(err) => vec![Err(err)],
    };
    for (pending, answer) in batch.into_iter().zip(answers) {
        // A requester that went away (client disconnected) no longer needs its answer.
        let _ = pending.reply.send(answer);
    }
}

/// One transaction for the batch, in four round trips whatever its size: BEGIN; the keys'
/// locks with today's prices ([`CLAIM`]); the lookup of stored responses with every insert
/// ([`PLACE`], which inserts nothing if it found one: a retry is rare, and the batch is then
/// placed again without it); COMMIT. The outer error fails the whole batch, the inner ones
/// answer single requests. The outbox rows it wrote go to the relay through `feed`.
async fn write_batch(
    db: &Kept,
    feed: Option<&Feed>,
    requests: &[&Request],
    timeout_ms: i64,
) -> Result<Vec<Result<Accepted>>> {
    let mut conn = db.acquire().await?;
    let done = tokio::time::timeout(kept::ANSWER_DEADLINE, async {
        let mut tx = conn.begin().await?;
        let (answers, written) = outbox::staged(place(&mut tx, requests, timeout_ms)).await;
        let answers = answers?;
        tx.commit().await?;
        Ok::<_, Error>((answers, written))
    })
    .await;
    let (answers, written) = conn.settle(done)?;
    match feed {
        Some(feed) => feed.hand_over(written),
        None => outbox::committed(),
    }
    Ok(answers)
}

/// [`write_batch`]'s statements, in its transaction.
async fn place(tx: &mut PgConnection, requests: &[&Request], timeout_ms: i64) -> Result<Vec<Result<Accepted>>> {
    let claims: Vec<&Claim> = requests.iter().map(|r| &r.claim).collect();
    let (mut locks, names) = Locks::new(&claims);
    let mut product_ids: Vec<i64> = requests.iter().flat_map(|r| r.lines.iter().map(|(p, _)| *p)).collect();
    product_ids.sort_unstable();
    product_ids.dedup();
    let (got, ids, prices): (Vec<bool>, Vec<i64>, Vec<i64>) = sqlx::query_as(CLAIM.as_str())
        .bind(&names)
        .bind(&product_ids)
        .fetch_one(&mut *tx)
        .await?;
    locks.took(&got);
    let prices: HashMap<i64, i64> = ids.into_iter().zip(prices).collect();
    // Every held key is looked up, priced or not: a retry replays even if it would not price
    // today. Each round answers at least one retry, so this ends.
    let mut priced = Vec::new();
    while !locks.held().is_empty() {
        let mut placed = Placed::default();
        priced = locks
            .held()
            .iter()
            .map(|&i| (i, placed.add(requests[i], &prices)))
            .collect();
        let stored = placed.insert(tx, timeout_ms, locks.lookup_columns()).await?;
        if stored.is_empty() {
            break;
        }
        locks.found(stored);
        priced.clear();
    }
    // Held and priced (`Ok(None)` here) is answered from `priced`. No placeholder error is
    // made for those: an error captures a backtrace where RUST_BACKTRACE is set, which was 2%
    // of the API's CPU when it was made for every accepted request.
    let mut answers: Vec<Option<Result<Accepted>>> = locks
        .into_results()
        .into_iter()
        .map(|claimed| match claimed {
            Ok(Some(stored)) => Some(Ok(Accepted::Replay(stored))),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        })
        .collect();
    for (i, answer) in priced {
        answers[i] = Some(answer);
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.unwrap_or_else(|| Err(anyhow::anyhow!("an accepted request got no answer").into())))
        .collect())
}

/// The claimed keys' advisory locks ([`idempotency::TRY_LOCK`] over `$1`) and the prices of the
/// products in `$2`, in one statement.
static CLAIM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT ARRAY({}), COALESCE(array_agg(id ORDER BY id), '{{}}'), COALESCE(array_agg(price ORDER BY id), '{{}}')
         FROM products WHERE id = ANY($2)",
        idempotency::TRY_LOCK
    )
});

/// The batch's new orders as the column arrays of [`PLACE`].
#[derive(Default)]
struct Placed {
    ids: Vec<Uuid>,
    users: Vec<i64>,
    coupons: Vec<Option<i64>>,
    totals: Vec<i64>,
    traces: Vec<String>,
    line_orders: Vec<Uuid>,
    line_products: Vec<i64>,
    line_quantities: Vec<i32>,
    line_prices: Vec<i64>,
    keys: Vec<String>,
    scopes: Vec<&'static str>,
    requests: Vec<serde_json::Value>,
    responses: Vec<serde_json::Value>,
    headers: Vec<serde_json::Value>,
    /// Each order's trace (aligned with `ids`), for the commands that carry it on.
    trace_parents: Vec<Option<TraceParent>>,
}

impl Placed {
    /// Prices an order at today's prices; 404 for an unknown product, 400 for a total that
    /// does not fit in whole won.
    fn add(&mut self, request: &Request, prices: &HashMap<i64, i64>) -> Result<Accepted> {
        let mut total: i64 = 0;
        let mut unit_prices = Vec::with_capacity(request.lines.len());
        for &(product, quantity) in &request.lines {
            let price = *prices
                .get(&product)
                .ok_or_else(|| Error::not_found("PRODUCT_NOT_FOUND", format!("product {product} does not exist")))?;
            unit_prices.push(price);
            total = price
                .checked_mul(i64::from(quantity))
                .and_then(|line| total.checked_add(line))
                .ok_or_else(|| Error::bad_request("ORDER_TOO_LARGE", "the order total is too large"))?;
        }
        let order_id = Uuid::now_v7();
        for (&(product, quantity), price) in request.lines.iter().zip(unit_prices) {
            self.line_orders.push(order_id);
            self.line_products.push(product);
            self.line_quantities.push(quantity);
            self.line_prices.push(price);
        }
        self.ids.push(order_id);
        self.users.push(request.claim.user_id);
        self.coupons.push(request.coupon_id);
        self.totals.push(total);
        self.traces.push(request.trace.to_string());
        self.trace_parents.push(Some(request.trace));
        self.keys.push(request.claim.key.clone());
        self.scopes.push(request.claim.scope);
        self.requests.push(request.claim.request.clone());
        self.responses
            .push(serde_json::json!({ "orderId": order_id, "status": OrderStatus::Pending }));
        self.headers
            .push(serde_json::json!({ "location": format!("/api/orders/{order_id}") }));
        Ok(Accepted::Fresh { order_id, total })
    }

    /// Looks up the stored responses of `lookup` (users, scopes, keys) and, if there are none,
    /// inserts the batch (its outbox rows [`outbox::stage`]d): returns what it found.
    async fn insert(
        self,
        tx: &mut PgConnection,
        timeout_ms: i64,
        (users, scopes, keys): (Vec<i64>, Vec<&str>, Vec<&str>),
    ) -> Result<Vec<StoredAt>> {
        // The batch's reservation and its deadline (recovery acts on it when it expires).
        let mut messages = OutboxMessage::commands(MessageType::StockReserve, &self.ids, &self.trace_parents)?;
        messages.extend(
            OutboxMessage::commands(MessageType::OrderDeadline, &self.ids, &self.trace_parents)?
                .into_iter()
                .map(|m| m.with_expiration_ms(timeout_ms)),
        );
        let rows = outbox::Columns::new(&messages)
            .bind(sqlx::query(PLACE.as_str()))
            .bind(&self.ids)
            .bind(&self.users)
            .bind(&self.coupons)
            .bind(&self.totals)
            .bind(&self.traces)
            .bind(timeout_ms as f64)
            .bind(&self.line_orders)
            .bind(&self.line_products)
            .bind(&self.line_quantities)
            .bind(&self.line_prices)
            .bind(&self.keys)
            .bind(&self.scopes)
            .bind(&self.requests)
            .bind(StatusCode::ACCEPTED.as_u16() as i16)
            .bind(&self.responses)
            .bind(&self.headers)
            .bind(&users)
            .bind(&scopes)
            .bind(&keys)
            .fetch_all(tx)
            .await?;
        // Either stored responses (nothing was written) or the outbox rows written.
        let mut stored = Vec::new();
        let (mut ids, mut message_ids) = (Vec::new(), Vec::new());
        for row in &rows {
            match row.try_get::<Option<i64>, _>("outbox_id")? {
                Some(id) => {
                    ids.push(id);
                    message_ids.push(row.try_get("message_id")?);
                }
                None => stored.push(StoredAt::from_row(row)?),
            }
        }
        outbox::stage(&messages, &ids, &message_ids);
        Ok(stored)
    }
}

/// Accepting a batch of orders in one statement, unless a key of `$24`..`$26` (users, scopes,
/// keys) has a stored response: then nothing is inserted and the stored responses are the
/// result (rows of [`StoredAt`], `outbox_id` NULL); else the result is the outbox rows written
/// (`outbox_id` and `message_id`). The outbox messages are `$1`..`$7`. Foreign keys are checked
/// at the statement's end, when the order rows exist.
static PLACE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH stored AS ({}),
         placed AS (
             INSERT INTO orders (id, user_id, status, coupon_id, total_amount, trace_parent, deadline_at)
             SELECT id, uid, 'PENDING', cid, total, tp, now() + $13 * interval '1 millisecond'
             FROM UNNEST($8::uuid[], $9::int8[], $10::int8[], $11::int8[], $12::text[]) AS t(id, uid, cid, total, tp)
             WHERE NOT EXISTS (SELECT FROM stored)
             RETURNING id
         ), lines AS (
             INSERT INTO order_items (order_id, product_id, quantity, unit_price)
             SELECT * FROM UNNEST($14::uuid[], $15::int8[], $16::int4[], $17::int8[])
             WHERE NOT EXISTS (SELECT FROM stored)
         ), history AS (
             INSERT INTO order_status_history (order_id, from_status, to_status) SELECT id, NULL, 'PENDING' FROM placed
         ), keys AS (
             INSERT INTO idempotency_keys (user_id, scope, key, request, status_code, response, headers)
             SELECT uid, scope, key, request, $21, response, headers
             FROM UNNEST($9::int8[], $18::text[], $19::text[], $20::jsonb[], $22::jsonb[], $23::jsonb[])
                 AS t(uid, key, scope, request, response, headers)
             WHERE NOT EXISTS (SELECT FROM stored)
         ), sent AS (
             {} WHERE NOT EXISTS (SELECT FROM stored) RETURNING id, message_id
         )
         SELECT at, request, status_code, response, headers, NULL::int8 AS outbox_id, NULL::uuid AS message_id
         FROM stored
         UNION ALL
         SELECT NULL, NULL, NULL, NULL, NULL, id, message_id FROM sent",
        idempotency::stored_query(24),
        outbox::INSERT
    )
});
