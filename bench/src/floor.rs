//! `--floor`: what the design's guarantees alone cost per order, with nothing else around
//! them, on the same database, broker and machine: the floor under the pipeline's cost at a
//! given rate, so a report can say how much of an order's CPU is the guarantees and how much
//! the code.
//!
//! An order here is accepted and then carried through `--hops` hops, each what DESIGN.md
//! requires of a step and nothing more:
//!
//! - accepting: one statement in its own transaction (synchronous commit) writes the order
//!   and its first outbox row, which is handed to the relay in process;
//! - the relay publishes each row persistent (delivery mode 2) to a quorum queue with a
//!   publisher confirm and marks confirmed rows sent, all the rows confirmed within 100 ms in
//!   one statement;
//! - a hop consumes the message and, in one statement and its own transaction, records it in
//!   the inbox, moves the order one hop on (guarded by the hop it was at) and writes the next
//!   outbox row; it acks after the commit; the row goes to the relay. The last hop's row is the
//!   order's event for the data platform, published to a second quorum queue nobody consumes
//!   (as the pipeline's `data-platform.orders` while no data platform reads it).
//!
//! So a hop is one round trip and one commit to PostgreSQL, one message published, confirmed,
//! delivered and acked, and an order three hops and four messages by default. `--floor-split` does each transaction a statement at a time instead
//! (BEGIN, a statement per table, COMMIT: five round trips per hop, four per accept), which is
//! what the round trips a step spends beyond one cost. Left out, so the floor stays below what the pipeline must do: HTTP and
//! sign-in, the order's items, stock, coupon and balance, deadline messages, events to the data
//! platform, status history and any batching. Everything runs in this process (the bench
//! column of the CPU report), in a schema of its own (`orderflow_bench_floor_<random>`, dropped
//! afterwards) and queues of its own (`orderflow.bench.floor.<random>` and `<that>.events`,
//! deleted afterwards).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::{db::quote_ident, messaging};
use serde::{Deserialize, Serialize};
use sqlx::{Executor, PgPool, postgres::PgPoolOptions};
use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};
use uuid::Uuid;

use crate::{
    args::FloorSettings,
    cpu::CpuReport,
    meter::Meter,
    progress::Progress,
    report::{Latency, per_second},
    work::WorkReport,
};

const SCHEMA_DDL: &str = "
CREATE TABLE orders (
    id          UUID PRIMARY KEY,
    hop         INTEGER NOT NULL,
    accepted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ
);
CREATE TABLE inbox (
    message_id   UUID PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    message_id UUID NOT NULL UNIQUE,
    order_id   UUID NOT NULL,
    hop        INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at    TIMESTAMPTZ
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
";

/// `$1` order id, `$2` message id of its first hop: the outbox row's id.
const ACCEPT: &str = "WITH o AS (INSERT INTO orders (id, hop) VALUES ($1, 0))
    INSERT INTO outbox (message_id, order_id, hop) VALUES ($2, $1, 1) RETURNING id";

/// With `--floor-split`, the same work a statement at a time in an explicit transaction
/// (BEGIN, one statement per table, COMMIT), as a step that plans in the client does.
const SPLIT_ORDER: &str = "INSERT INTO orders (id, hop) VALUES ($1, 0)";
const SPLIT_OUTBOX: &str = "INSERT INTO outbox (message_id, order_id, hop) VALUES ($1, $2, $3) RETURNING id";
const SPLIT_INBOX: &str = "INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING";
const SPLIT_MOVE: &str = "UPDATE orders SET hop = $2, updated_at = now() WHERE id = $1 AND hop = $2 - 1";

/// `$1` the delivered message's id, `$2` the order, `$3` the hop it carries the order to, `$4`
/// the next message's id (the event after the last hop): whether the order moved, and the next
/// outbox row.
const HOP: &str = "WITH fresh AS (
        INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING message_id
    ),
    moved AS (
        UPDATE orders SET hop = $3, updated_at = now()
        WHERE id = $2 AND hop = $3 - 1 AND EXISTS (SELECT FROM fresh) RETURNING id
    ),
    next AS (
        INSERT INTO outbox (message_id, order_id, hop) SELECT $4, id, $3 + 1 FROM moved RETURNING id
    )
    SELECT EXISTS (SELECT FROM moved), (SELECT id FROM next)";

/// How long the relay gathers confirmed rows before marking them sent in one statement.
const MARK_EVERY: Duration = Duration::from_millis(100);

/// The message body: the order, the hop it carries it to, and when it was accepted
/// (microseconds since the run began, for the end-to-end latency).
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    order: Uuid,
    hop: i32,
    t: u64,
}

/// An outbox row handed to the relay.
struct Row {
    id: i64,
    message_id: Uuid,
    body: Body,
}

/// What a floor run measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FloorReport {
    pub scenario: &'static str,
    pub rate: f64,
    pub hops: u32,
    /// Whether each hop was a transaction of a statement per table (`--floor-split`).
    pub split: bool,
    pub orders: u64,
    /// Orders that went through every hop ("confirmed", so reports read it like an order run's).
    pub confirmed: u64,
    pub cancelled: u64,
    pub duration_s: f64,
    pub completed_per_s: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// CPU per completed order; the `bench` group is this process, doing all of it.
    pub cpu: Option<CpuReport>,
    pub work: Option<WorkReport>,
    /// Always null (kept for reports that read an order run's fields).
    pub pg_waits: Option<()>,
    /// What the run left in its tables before they were dropped: orders at their last hop,
    /// inbox records, outbox rows and those of them not marked sent. Every effect once:
    /// `orders` through, `orders x hops` records, `orders x (hops + 1)` rows (the event), none
    /// unsent.
    pub tables: Tables,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, sqlx::FromRow)]
pub struct Tables {
    pub orders_through: i64,
    pub inbox_records: i64,
    pub outbox_rows: i64,
    pub outbox_unsent: i64,
}

impl FloorReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "floor{}: {} orders at {}/s through {} hops: {} through in {:.1} s ({:.1}/s); e2e p50 {:.1} ms, p99 {:.1} ms\n",
            if self.split { " (a statement per table)" } else { "" },
            self.orders,
            self.rate,
            self.hops,
            self.confirmed,
            self.duration_s,
            self.completed_per_s,
            self.e2e_p50_ms,
            self.e2e_p99_ms
        );
        let n = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        if let Some(c) = &self.cpu {
            let m = &c.core_ms_per_order;
            out += &format!(
                "  CPU per order, core-ms: postgres {}, rabbitmq {}, this process {}, machine {}\n",
                n(m.postgres),
                n(m.rabbitmq),
                n(m.bench),
                n(m.machine)
            );
        }
        if let Some(w) = &self.work {
            out += &format!(
                "  per order: {} commits, {} write transactions, {} WAL bytes\n",
                n(w.commits_per_order),
                n(w.write_transactions_per_order),
                n(w.wal_bytes_per_order.map(f64::round))
            );
        }
        out
    }
}

/// Runs the floor: sets up its schema and queue, sends `orders` at `rate`, waits until each
/// went through every hop (or `timeout` after the last was sent), removes both.
pub async fn run(
    database_url: &str,
    s: &FloorSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<FloorReport> {
    let suffix = Uuid::new_v4().simple().to_string();
    let schema = format!("orderflow_bench_floor_{}", &suffix[..12]);
    let queue = format!("orderflow.bench.floor.{}", &suffix[..12]);
    let events = format!("{queue}.events");
    let admin = PgPool::connect(database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {}", quote_ident(&schema))))
        .await
        .context("creating the floor's schema")?;
    let conn = messaging::connect(&s.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to AMQP_URL")?;
    let result = async {
        let setup = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        for name in [&queue, &events] {
            setup
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args.clone(),
                )
                .await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(s.connections)
            .min_connections(s.connections)
            .connect_with(
                database_url
                    .parse::<sqlx::postgres::PgConnectOptions>()?
                    .options([("search_path", schema.as_str())]),
            )
            .await?;
        pool.execute(SCHEMA_DDL).await?;
        let report = drive(&pool, &conn, [&queue, &events], s, progress, meter).await;
        pool.close().await;
        for name in [&queue, &events] {
            let _ = setup
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        // Closed here, before the connection: a channel dropped as the connection closes fails
        // to close and lapin logs that as a connection error.
        let _ = setup.close(200, "floor done".into()).await;
        report
    }
    .await;
    let _ = conn.close(200, "floor done".into()).await;
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            quote_ident(&schema)
        )))
        .await;
    result
}

async fn drive(
    pool: &PgPool,
    conn: &lapin::Connection,
    [queue, events]: [&str; 2],
    s: &FloorSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<FloorReport> {
    let publisher = conn.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer_channel = conn.create_channel().await?;
    consumer_channel.basic_qos(64, BasicQosOptions::default()).await?;
    let mut deliveries = consumer_channel
        .basic_consume(
            queue.into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let (to_relay, relay_rx) = mpsc::unbounded_channel::<Row>();
    let relay = tokio::spawn(relay(
        pool.clone(),
        publisher,
        [queue.to_owned(), events.to_owned()],
        i32::try_from(s.hops)?,
        relay_rx,
    ));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Duration>();
    meter.settle().await;
    let from = meter.mark().await;
    // After the settle: the sending schedule and the latencies count from here.
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(s.connections as usize));
    let failures = Arc::new(AtomicU64::new(0));

    // The hops: each delivery in a task of its own, as many at once as there are connections.
    let consuming = {
        let (pool, to_relay, permits, failures, hops) = (
            pool.clone(),
            to_relay.clone(),
            permits.clone(),
            failures.clone(),
            s.hops,
        );
        let split = s.split;
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (pool, to_relay, done_tx, failures) =
                    (pool.clone(), to_relay.clone(), done_tx.clone(), failures.clone());
                tokio::spawn(async move {
                    if let Err(err) = hop(&pool, &to_relay, &done_tx, delivery, hops, started, split).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %err, "floor hop failed");
                    }
                    drop(permit);
                });
            }
        })
    };

    let bar = progress.bar("through", s.orders);
    let sending = {
        let (pool, to_relay, failures) = (pool.clone(), to_relay.clone(), failures.clone());
        let (orders, rate, split) = (s.orders, s.rate, s.split);
        tokio::spawn(async move {
            for i in 0..orders {
                tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
                let (pool, to_relay, failures) = (pool.clone(), to_relay.clone(), failures.clone());
                tokio::spawn(async move {
                    if let Err(err) = accept(&pool, &to_relay, started, split).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %err, "floor accept failed");
                    }
                });
            }
        })
    };
    drop(to_relay);

    let mut e2e = Latency::new();
    let mut last_sent = None;
    let mut sending = Some(sending);
    while e2e.count() < s.orders {
        let deadline = last_sent.map(|at: Instant| at + s.timeout);
        tokio::select! {
            d = done_rx.recv() => match d {
                Some(d) => {
                    e2e.record(d);
                    bar.inc(1);
                }
                None => break,
            },
            _ = async { sending.as_mut().expect("polled only while sending").await }, if sending.is_some() => {
                sending = None;
                last_sent = Some(Instant::now());
            }
            () = async { tokio::time::sleep_until(deadline.expect("set")).await }, if deadline.is_some() => break,
        }
    }
    let duration = started.elapsed();
    // Channels close when their last handle goes (closing one twice is a connection error).
    consuming.abort();
    drop(consumer_channel);
    // The relay ends once every hop holding a sender has finished: its last marks are part of
    // what the orders cost.
    let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    let mut to = meter.mark().await;
    meter.settle_work(&mut to).await;
    bar.finish_and_clear();
    let through = e2e.count();
    let tables = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE hop = $1) AS orders_through,
                (SELECT count(*) FROM inbox) AS inbox_records,
                (SELECT count(*) FROM outbox) AS outbox_rows,
                (SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS outbox_unsent",
    )
    .bind(i32::try_from(s.hops)?)
    .fetch_one(pool)
    .await?;
    let costs = meter.costs(&from, &to, through.max(1), "completed");
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        tracing::warn!(failed, "some accepts or hops failed; their orders are not counted");
    }
    let r3 = |x: f64| (x * 1_000.0).round() / 1_000.0;
    Ok(FloorReport {
        scenario: "floor",
        rate: s.rate,
        hops: s.hops,
        split: s.split,
        orders: s.orders,
        confirmed: through,
        cancelled: 0,
        duration_s: r3(duration.as_secs_f64()),
        completed_per_s: r3(per_second(through, duration)),
        e2e_p50_ms: r3(e2e.quantile_ms(0.5)),
        e2e_p99_ms: r3(e2e.quantile_ms(0.99)),
        cpu: costs.cpu,
        work: costs.work,
        pg_waits: None,
        tables,
    })
}

/// Accepts one order: its row and its first outbox row in one statement, the row to the relay.
async fn accept(
    pool: &PgPool,
    to_relay: &mpsc::UnboundedSender<Row>,
    started: Instant,
    split: bool,
) -> anyhow::Result<()> {
    let (order, message_id) = (Uuid::new_v4(), Uuid::now_v7());
    let t = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let id: i64 = if split {
        let mut tx = pool.begin().await?;
        sqlx::query(SPLIT_ORDER).bind(order).execute(&mut *tx).await?;
        let id = sqlx::query_scalar(SPLIT_OUTBOX)
            .bind(message_id)
            .bind(order)
            .bind(1)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        id
    } else {
        sqlx::query_scalar(ACCEPT)
            .bind(order)
            .bind(message_id)
            .fetch_one(pool)
            .await?
    };
    let _ = to_relay.send(Row {
        id,
        message_id,
        body: Body { order, hop: 1, t },
    });
    Ok(())
}

/// One hop of one delivery: the statement, the next row to the relay, the ack after the commit.
async fn hop(
    pool: &PgPool,
    to_relay: &mpsc::UnboundedSender<Row>,
    done: &mpsc::UnboundedSender<Duration>,
    delivery: Delivery,
    hops: u32,
    started: Instant,
    split: bool,
) -> anyhow::Result<()> {
    let body: Body = serde_json::from_slice(&delivery.data)?;
    let message_id: Uuid = delivery
        .properties
        .message_id()
        .as_ref()
        .context("a message without an id")?
        .as_str()
        .parse()?;
    let next_id = Uuid::now_v7();
    let last = i32::try_from(hops)?;
    let (moved, next): (bool, Option<i64>) = if split {
        let mut tx = pool.begin().await?;
        let fresh = sqlx::query(SPLIT_INBOX)
            .bind(message_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let moved = fresh
            && sqlx::query(SPLIT_MOVE)
                .bind(body.order)
                .bind(body.hop)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        let next = if moved {
            Some(
                sqlx::query_scalar(SPLIT_OUTBOX)
                    .bind(next_id)
                    .bind(body.order)
                    .bind(body.hop + 1)
                    .fetch_one(&mut *tx)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        (moved, next)
    } else {
        sqlx::query_as(HOP)
            .bind(message_id)
            .bind(body.order)
            .bind(body.hop)
            .bind(next_id)
            .fetch_one(pool)
            .await?
    };
    if let Some(id) = next {
        let _ = to_relay.send(Row {
            id,
            message_id: next_id,
            body: Body {
                order: body.order,
                hop: body.hop + 1,
                t: body.t,
            },
        });
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    if moved && body.hop == last {
        let _ = done.send(started.elapsed().saturating_sub(Duration::from_micros(body.t)));
    }
    Ok(())
}

/// Publishes each row handed over with a publisher confirm (a row past the last hop to the
/// events queue) and marks the confirmed ones sent, in one statement per [`MARK_EVERY`]; ends
/// when no sender is left and everything is marked.
async fn relay(
    pool: PgPool,
    channel: Channel,
    [queue, events]: [String; 2],
    hops: i32,
    mut rows: mpsc::UnboundedReceiver<Row>,
) {
    let mut confirms = FuturesUnordered::new();
    let mut confirmed: Vec<i64> = Vec::new();
    let mut tick = tokio::time::interval(MARK_EVERY);
    let mut open = true;
    while open || !confirms.is_empty() {
        tokio::select! {
            row = rows.recv(), if open => match row {
                Some(row) => {
                    let body = serde_json::to_vec(&row.body).expect("a body serialises");
                    let props = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2)
                        .with_message_id(row.message_id.to_string().into());
                    let published = channel
                        .basic_publish(
                            "".into(),
                            if row.body.hop > hops { events.as_str() } else { queue.as_str() }.into(),
                            BasicPublishOptions { mandatory: true, immediate: false },
                            &body,
                            props,
                        )
                        .await;
                    match published {
                        Ok(confirm) => confirms.push(async move { (row.id, confirm.await) }),
                        Err(err) => tracing::warn!(error = %err, "floor publish failed"),
                    }
                }
                None => open = false,
            },
            Some((id, confirm)) = confirms.next() => match confirm {
                Ok(Confirmation::Ack(None)) => confirmed.push(id),
                other => tracing::warn!(outcome = ?other, "floor message not confirmed"),
            },
            _ = tick.tick() => mark(&pool, &mut confirmed).await,
        }
    }
    mark(&pool, &mut confirmed).await;
}

async fn mark(pool: &PgPool, confirmed: &mut Vec<i64>) {
    if confirmed.is_empty() {
        return;
    }
    if let Err(err) = sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
        .bind(&*confirmed)
        .execute(pool)
        .await
    {
        tracing::warn!(error = %err, "floor could not mark rows sent");
    }
    confirmed.clear();
}
