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
//! So a hop is one round trip and one commit to PostgreSQL and one message published,
//! confirmed, delivered and acked; an order is three hops and four messages by default. Its
//! connections are taken and given back without sqlx's pool, which checks every connection
//! (a round trip) as it goes back: the pipeline keeps its step connections out of the pool
//! between transactions for the same reason. `--floor-split` does each transaction a statement
//! at a time instead (BEGIN, a statement per table, COMMIT: five round trips per hop, four per
//! accept), which prices the round trips a step spends beyond one.
//!
//! `--floor-batch` batches as the pipeline does: whatever is waiting when one of two writers
//! is free (orders to accept, deliveries of the hop's queue), up to [`MAX_BATCH`], is one
//! statement, one transaction and one message (two when the batch holds orders past their last
//! hop: the event goes to the other queue); each delivery is acked on its own after the commit.
//! Without it every order is a statement and a message of its own at every hop, so at rates
//! where the pipeline batches the plain floor is not a floor of every design; the batched one
//! is.
//!
//! Left out, so the floor stays below what the pipeline must do: HTTP and sign-in, the order's
//! items, stock, coupon and balance, status history, deadline messages, watching orders.
//! Everything runs in this process (the bench column of the CPU report), in a schema of its own
//! (`orderflow_bench_floor_<random>`, dropped afterwards) and queues of its own with the
//! pipeline's queue arguments (`orderflow.bench.floor.<random>` and `<that>.events`, deleted
//! afterwards).

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::{FutureExt, StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use orderflow_shared::{
    db,
    messaging::{
        self,
        topology::{QueueKind, QueueSpec},
    },
};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use uuid::Uuid;

use crate::{
    args::FloorSettings,
    cpu::CpuReport,
    meter::Meter,
    progress::Progress,
    report::{Latency, per_second},
    scratch::Scratch,
    work::WorkReport,
};

/// PostgreSQL connections of a run, and hops in flight at most.
pub const CONNECTIONS: u32 = 8;

/// With `--floor-batch`: the most orders accepted, or deliveries handled, in one statement (the
/// pipeline caps its batches too, at 512 accepts and `WORKER_BATCH` deliveries; at the rates
/// the floor is run at, batches stay far below either).
pub const MAX_BATCH: usize = 64;
/// With `--floor-batch`: batches of one kind in flight at once (the pipeline's two accept
/// writers and `WORKER_CONCURRENCY`); what arrives meanwhile waits for the next batch.
const BATCH_WRITERS: usize = 2;

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

/// With `--floor-batch`: `$1` the orders, `$2` the message id of their first hop, `$3` the
/// first order (the outbox row's): the outbox row's id.
const BATCH_ACCEPT: &str = "WITH o AS (INSERT INTO orders (id, hop) SELECT unnest($1::uuid[]), 0)
    INSERT INTO outbox (message_id, order_id, hop) VALUES ($2, $3, 1) RETURNING id";

/// With `--floor-batch`: `$1` the delivered messages' ids; per order carried, `$2` the message
/// that carried it, `$3` the order, `$4` the hop it carries it to; `$5` and `$6` the ids of
/// the next messages (to the hops' queue, and the events of orders past `$7`, the last hop).
/// Returns the orders that moved with the hop each moved to, and the next outbox rows (ids and
/// message ids, aligned).
const BATCH_HOP: &str = "WITH fresh AS (
        INSERT INTO inbox (message_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING RETURNING message_id
    ),
    m AS (
        SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::int4[]) AS m(message_id, order_id, hop)
        WHERE m.message_id IN (SELECT message_id FROM fresh)
    ),
    moved AS (
        UPDATE orders o SET hop = m.hop, updated_at = now() FROM m
        WHERE o.id = m.order_id AND o.hop = m.hop - 1 RETURNING o.id, m.hop
    ),
    next AS (
        INSERT INTO outbox (message_id, order_id, hop)
        SELECT CASE WHEN hop >= $7 THEN $6 ELSE $5 END, (array_agg(id))[1], max(hop) + 1
        FROM moved GROUP BY hop >= $7
        RETURNING id, message_id
    )
    SELECT mv.ids, mv.hops, nx.ids, nx.message_ids
    FROM (SELECT COALESCE(array_agg(id), '{}') AS ids, COALESCE(array_agg(hop), '{}') AS hops FROM moved) mv,
         (SELECT COALESCE(array_agg(id), '{}') AS ids, COALESCE(array_agg(message_id), '{}') AS message_ids
          FROM next) nx";

/// How long the relay gathers confirmed rows before marking them sent in one statement.
const MARK_EVERY: Duration = Duration::from_millis(100);

/// How long the end of a run waits for the consumer and the relay to finish.
const WIND_DOWN: Duration = Duration::from_secs(10);

/// An order a message carries: the order, the hop it carries it to, and when it was accepted
/// (microseconds since the run began, for the end-to-end latency). A message's body is a list
/// of these (one without `--floor-batch`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Body {
    order: Uuid,
    hop: i32,
    t: u64,
}

/// An outbox row handed to the relay: its message carries `body`, to the events queue if
/// `event` (the orders went through their last hop).
struct Row {
    id: i64,
    message_id: Uuid,
    body: Vec<Body>,
    event: bool,
}

/// What became of an order: through every hop after this long, or failed (an accept or a hop
/// returned an error; it is not retried).
type Ending = Result<Duration, ()>;

/// What a floor run measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FloorReport {
    pub scenario: &'static str,
    pub rate: f64,
    pub hops: u32,
    /// Whether each hop was a transaction of a statement per table (`--floor-split`).
    pub split: bool,
    /// Whether what was waiting went as one statement and message (`--floor-batch`).
    pub batched: bool,
    pub orders: u64,
    pub accepted: u64,
    /// Orders that went through every hop ("confirmed", so reports read it like an order run's).
    pub confirmed: u64,
    pub cancelled: u64,
    /// Accepts and hops that failed (each order's first failure; such an order goes no further;
    /// with `--floor-batch`, a hop that failed counts the deliveries of its batch).
    pub errors: u64,
    pub duration_s: f64,
    pub accept_per_s: f64,
    pub completed_per_s: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// CPU per completed order; the `bench` group is this process, doing all of it.
    pub cpu: Option<CpuReport>,
    pub work: Option<WorkReport>,
    /// What the run left in its tables before they were dropped. Every effect once: `orders`
    /// through, an inbox record per message consumed and an outbox row per message (without
    /// `--floor-batch`: `orders x hops` and `orders x (hops + 1)`, the event), none unsent.
    pub tables: Tables,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, sqlx::FromRow)]
pub struct Tables {
    pub orders_through: i64,
    pub inbox_records: i64,
    pub outbox_rows: i64,
    /// Outbox rows of the orders' events (past their last hop): the messages nobody here consumes.
    pub event_rows: i64,
    pub outbox_unsent: i64,
}

impl FloorReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "floor{}{}: {} orders at {}/s through {} hops: {} through, {} errors, in {:.1} s ({:.1}/s); \
             e2e p50 {:.1} ms, p99 {:.1} ms\n",
            if self.split { " (a statement per table)" } else { "" },
            if self.batched { " (batched)" } else { "" },
            self.orders,
            self.rate,
            self.hops,
            self.confirmed,
            self.errors,
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
            let w = &c.switches_per_order;
            let n = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
            out += &format!(
                "  context switches per order: postgres {}, rabbitmq {}, this process {}, machine {}\n",
                n(w.postgres),
                n(w.rabbitmq),
                n(w.bench),
                n(w.machine)
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

/// PostgreSQL connections handed out and taken back without sqlx's pool (see the module's
/// docs): a connection is taken for one transaction and goes back as it is.
struct Conns {
    idle: Mutex<Vec<PgConnection>>,
    free: Arc<Semaphore>,
}

/// A connection taken from [`Conns`]; it goes back when dropped.
struct Taken {
    conn: Option<PgConnection>,
    conns: Arc<Conns>,
    _permit: OwnedSemaphorePermit,
}

impl Conns {
    async fn open(options: &PgConnectOptions, n: u32) -> anyhow::Result<Arc<Self>> {
        let mut idle = Vec::new();
        for _ in 0..n {
            idle.push(PgConnection::connect_with(options).await?);
        }
        Ok(Arc::new(Self {
            free: Arc::new(Semaphore::new(idle.len())),
            idle: Mutex::new(idle),
        }))
    }

    async fn take(self: &Arc<Self>) -> anyhow::Result<Taken> {
        let permit = self.free.clone().acquire_owned().await?;
        let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Ok(Taken {
            conn: Some(conn.context("no idle connection behind a permit")?),
            conns: self.clone(),
            _permit: permit,
        })
    }
}

impl Deref for Taken {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Taken {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.conns.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        }
    }
}

/// Runs the floor: its queues and schema, `orders` sent at `rate`, until each went through
/// every hop or failed (or `timeout` after the last was sent); removes both, whatever happened.
pub async fn run(
    database_url: &str,
    s: &FloorSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<FloorReport> {
    let suffix = &Uuid::new_v4().simple().to_string()[..12];
    let queue = format!("orderflow.bench.floor.{suffix}");
    let events = format!("{queue}.events");
    let broker = messaging::connect(&s.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to AMQP_URL")?;
    let result = async {
        let setup = broker.create_channel().await?;
        for (name, kind) in [(&queue, QueueKind::Work), (&events, QueueKind::Terminal)] {
            let spec = QueueSpec {
                name: "",
                exchange: "",
                routing_keys: &[],
                kind,
            };
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            setup
                .queue_declare(name.as_str().into(), durable, spec.arguments())
                .await?;
        }
        let _ = setup.close(200, "declared".into()).await;
        in_schema(database_url, &broker, [&queue, &events], s, progress, meter).await
    }
    .await;
    // On a channel of its own: a failed declare closed the first one.
    if let Ok(cleanup) = broker.create_channel().await {
        for name in [&queue, &events] {
            if let Err(err) = cleanup
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                tracing::warn!(queue = %name, error = %err, "could not delete the floor's queue");
            }
        }
        let _ = cleanup.close(200, "deleted".into()).await;
    }
    let _ = broker.close(200, "floor done".into()).await;
    result
}

/// The run in a schema of its own, dropped afterwards.
async fn in_schema(
    database_url: &str,
    broker: &lapin::Connection,
    queues: [&str; 2],
    s: &FloorSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<FloorReport> {
    let scratch = Scratch::create(database_url, "orderflow_bench_floor")
        .await
        .context("the floor's schema")?;
    let schema = scratch.name.as_str();
    let result = async {
        let mut options = db::primary_options(database_url)
            .await?
            .options([("search_path", schema)]);
        if s.batched {
            // A statement over arrays is planned again on every call unless generic plans are
            // forced, as the pipeline's workers do (`db::worker_pool`); the plain floor's
            // statements get their generic plans by themselves.
            options = options.options([("plan_cache_mode", "force_generic_plan")]);
        }
        let conns = Conns::open(&options, CONNECTIONS).await?;
        sqlx::raw_sql(SCHEMA_DDL).execute(&mut *conns.take().await?).await?;
        drive(&conns, broker, queues, s, progress, meter).await
    }
    .await;
    scratch.drop_after(result).await
}

async fn drive(
    conns: &Arc<Conns>,
    broker: &lapin::Connection,
    [queue, events]: [&str; 2],
    s: &FloorSettings,
    progress: &Progress,
    meter: &Meter,
) -> anyhow::Result<FloorReport> {
    let publisher = broker.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer_channel = broker.create_channel().await?;
    consumer_channel.basic_qos(64, BasicQosOptions::default()).await?;
    let mut deliveries = consumer_channel
        .basic_consume(
            queue.into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let last_hop = i32::try_from(s.hops)?;
    let (to_relay, relay_rx) = mpsc::unbounded_channel::<Row>();
    let relay = tokio::spawn(relay(
        conns.clone(),
        publisher,
        [queue.to_owned(), events.to_owned()],
        relay_rx,
    ));
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<Ending>();
    let accepted = Arc::new(AtomicU64::new(0));

    meter.settle().await;
    let from = meter.mark().await;
    // After the settle: the sending schedule and the latencies count from here.
    let started = Instant::now();

    // The hops: without --floor-batch each delivery in a task of its own, as many at once as
    // there are connections (a task waits for one); with it, what has arrived by the time one of
    // the writers is free, as one batch. Ends when the consumer is cancelled or its channel fails.
    let consuming = {
        let (conns, to_relay, ended_tx) = (conns.clone(), to_relay.clone(), ended_tx.clone());
        let (split, batched) = (s.split, s.batched);
        let writers = Arc::new(Semaphore::new(if batched {
            BATCH_WRITERS
        } else {
            Semaphore::MAX_PERMITS
        }));
        tokio::spawn(async move {
            let mut failed = false;
            while let Some(next) = deliveries.next().await {
                let mut batch = match next {
                    Ok(delivery) => vec![delivery],
                    Err(err) => {
                        tracing::warn!(error = %err, "the floor's consumer failed");
                        break;
                    }
                };
                let Ok(writer) = writers.clone().acquire_owned().await else {
                    break;
                };
                while batched && batch.len() < MAX_BATCH {
                    match deliveries.next().now_or_never() {
                        Some(Some(Ok(delivery))) => batch.push(delivery),
                        Some(Some(Err(err))) => {
                            tracing::warn!(error = %err, "the floor's consumer failed");
                            failed = true;
                            break;
                        }
                        _ => break,
                    }
                }
                let (conns, to_relay, ended_tx) = (conns.clone(), to_relay.clone(), ended_tx.clone());
                tokio::spawn(async move {
                    let _writer = writer;
                    let hops = if batched {
                        hop_batch(&conns, &to_relay, batch, last_hop, started).await
                    } else {
                        let delivery = batch.pop().expect("one delivery");
                        hop(&conns, &to_relay, delivery, last_hop, started, split)
                            .await
                            .map(|through| through.into_iter().collect())
                            .map_err(|err| (err, 1))
                    };
                    match hops {
                        Ok(through) => through.into_iter().for_each(|t| {
                            let _ = ended_tx.send(Ok(t));
                        }),
                        Err((err, orders)) => {
                            tracing::warn!(error = %err, "floor hop failed");
                            (0..orders).for_each(|_| {
                                let _ = ended_tx.send(Err(()));
                            });
                        }
                    }
                });
                if failed {
                    break;
                }
            }
        })
    };
    let bar = progress.bar("through", s.orders);
    let mut sending = {
        let (conns, to_relay, ended_tx, accepted) = (conns.clone(), to_relay.clone(), ended_tx, accepted.clone());
        let (orders, rate, split, batched) = (s.orders, s.rate, s.split, s.batched);
        tokio::spawn(async move {
            // With --floor-batch the orders due go to the accept writers, which take what waits.
            let (to_accept, waiting) = mpsc::unbounded_channel::<u64>();
            if batched {
                let (conns, to_relay, ended_tx, accepted) =
                    (conns.clone(), to_relay.clone(), ended_tx.clone(), accepted.clone());
                tokio::spawn(accept_batches(conns, to_relay, ended_tx, accepted, waiting));
            }
            for i in 0..orders {
                tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
                if batched {
                    let _ = to_accept.send(since(started));
                    continue;
                }
                let (conns, to_relay, ended_tx, accepted) =
                    (conns.clone(), to_relay.clone(), ended_tx.clone(), accepted.clone());
                tokio::spawn(async move {
                    match accept(&conns, &to_relay, started, split).await {
                        Ok(()) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "floor accept failed");
                            let _ = ended_tx.send(Err(()));
                        }
                    }
                });
            }
            // Sent: the timeout counts from here in either mode, whatever the accepts are doing.
            drop(to_accept);
        })
    };
    drop(to_relay);

    let (mut e2e, mut errors) = (Latency::new(), 0_u64);
    let mut sent_at: Option<Instant> = None;
    while e2e.count() + errors < s.orders {
        let give_up = sent_at.map(|at| at + s.timeout);
        tokio::select! {
            ending = ended.recv() => match ending {
                Some(Ok(through)) => {
                    e2e.record(through);
                    bar.inc(1);
                }
                Some(Err(())) => errors += 1,
                None => break,
            },
            _ = &mut sending, if sent_at.is_none() => sent_at = Some(Instant::now()),
            () = tokio::time::sleep_until(give_up.unwrap_or(started)), if give_up.is_some() => break,
        }
    }
    let duration = started.elapsed();
    sending.abort();
    // Cancelled before its queue is deleted (DESIGN.md: a delete meeting a cancel in flight
    // crashes the channel); hops in flight finish, then the relay publishes and marks what they
    // handed over, which is part of what the orders cost.
    let _ = consumer_channel
        .basic_cancel("floor".into(), BasicCancelOptions::default())
        .await;
    if tokio::time::timeout(WIND_DOWN, consuming).await.is_err() {
        tracing::warn!("the floor's consumer did not end");
    }
    match tokio::time::timeout(WIND_DOWN, relay).await {
        Ok(Ok(publisher)) => drop(publisher.close(200, "floor done".into()).await),
        _ => tracing::warn!("the floor's relay did not end; its last rows stay unmarked"),
    }
    let _ = consumer_channel.close(200, "floor done".into()).await;
    let mut to = meter.mark().await;
    meter.settle_work(&mut to).await;
    bar.finish_and_clear();
    let through = e2e.count();
    let tables = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE hop = $1) AS orders_through,
                (SELECT count(*) FROM inbox) AS inbox_records,
                (SELECT count(*) FROM outbox) AS outbox_rows,
                (SELECT count(*) FROM outbox WHERE hop > $1) AS event_rows,
                (SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS outbox_unsent",
    )
    .bind(last_hop)
    .fetch_one(&mut *conns.take().await?)
    .await?;
    let costs = meter.costs(&from, &to, through.max(1), "completed");
    let accepted = accepted.load(Ordering::Relaxed);
    let r3 = |x: f64| (x * 1_000.0).round() / 1_000.0;
    Ok(FloorReport {
        scenario: "floor",
        rate: s.rate,
        hops: s.hops,
        split: s.split,
        batched: s.batched,
        orders: s.orders,
        accepted,
        confirmed: through,
        cancelled: 0,
        errors,
        duration_s: r3(duration.as_secs_f64()),
        accept_per_s: r3(per_second(accepted, duration)),
        completed_per_s: r3(per_second(through, duration)),
        e2e_p50_ms: r3(e2e.quantile_ms(0.5)),
        e2e_p99_ms: r3(e2e.quantile_ms(0.99)),
        cpu: costs.cpu,
        work: costs.work,
        tables,
    })
}

/// Accepts one order: its row and its first outbox row in one statement, the row to the relay.
async fn accept(
    conns: &Arc<Conns>,
    to_relay: &mpsc::UnboundedSender<Row>,
    started: Instant,
    split: bool,
) -> anyhow::Result<()> {
    let (order, message_id) = (Uuid::new_v4(), Uuid::now_v7());
    let t = since(started);
    let mut conn = conns.take().await?;
    let id: i64 = if split {
        let mut tx = conn.begin().await?;
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
            .fetch_one(&mut *conn)
            .await?
    };
    drop(conn);
    let _ = to_relay.send(Row {
        id,
        message_id,
        body: vec![Body { order, hop: 1, t }],
        event: false,
    });
    Ok(())
}

/// Microseconds since `started`.
fn since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// With `--floor-batch`: accepts the orders due (each its time since the start) as they wait,
/// what waits when one of the writers is free as one statement and one message. Ends when no
/// order is left to accept.
async fn accept_batches(
    conns: Arc<Conns>,
    to_relay: mpsc::UnboundedSender<Row>,
    ended_tx: mpsc::UnboundedSender<Ending>,
    accepted: Arc<AtomicU64>,
    mut waiting: mpsc::UnboundedReceiver<u64>,
) {
    let writers = Arc::new(Semaphore::new(BATCH_WRITERS));
    while let Some(first) = waiting.recv().await {
        let Ok(writer) = writers.clone().acquire_owned().await else {
            return;
        };
        let mut due = vec![first];
        while due.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(t) => due.push(t),
                Err(_) => break,
            }
        }
        let (conns, to_relay, ended_tx, accepted) =
            (conns.clone(), to_relay.clone(), ended_tx.clone(), accepted.clone());
        tokio::spawn(async move {
            let _writer = writer;
            let n = due.len();
            match accept_batch(&conns, &to_relay, due).await {
                Ok(()) => {
                    accepted.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "floor accept failed");
                    (0..n).for_each(|_| {
                        let _ = ended_tx.send(Err(()));
                    });
                }
            }
        });
    }
}

/// With `--floor-batch`: one statement for the orders (each its time since the start), one
/// message carrying them all to their first hop.
async fn accept_batch(conns: &Arc<Conns>, to_relay: &mpsc::UnboundedSender<Row>, due: Vec<u64>) -> anyhow::Result<()> {
    let body: Vec<Body> = due
        .into_iter()
        .map(|t| Body {
            order: Uuid::new_v4(),
            hop: 1,
            t,
        })
        .collect();
    let orders: Vec<Uuid> = body.iter().map(|b| b.order).collect();
    let message_id = Uuid::now_v7();
    let id: i64 = sqlx::query_scalar(BATCH_ACCEPT)
        .bind(&orders)
        .bind(message_id)
        .bind(orders[0])
        .fetch_one(&mut *conns.take().await?)
        .await?;
    let _ = to_relay.send(Row {
        id,
        message_id,
        body,
        event: false,
    });
    Ok(())
}

/// One hop of one delivery: the statement, the next row to the relay, the ack after the commit.
/// Returns the order's end-to-end latency if this hop was its last.
async fn hop(
    conns: &Arc<Conns>,
    to_relay: &mpsc::UnboundedSender<Row>,
    delivery: Delivery,
    last_hop: i32,
    started: Instant,
    split: bool,
) -> anyhow::Result<Option<Duration>> {
    let message_id = message_id(&delivery)?;
    let [body]: [Body; 1] = serde_json::from_slice::<Vec<Body>>(&delivery.data)?
        .try_into()
        .map_err(|b: Vec<Body>| anyhow::anyhow!("a message of {} orders without --floor-batch", b.len()))?;
    let next_id = Uuid::now_v7();
    let mut conn = conns.take().await?;
    let (moved, next): (bool, Option<i64>) = if split {
        let mut tx = conn.begin().await?;
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
            .fetch_one(&mut *conn)
            .await?
    };
    drop(conn);
    if let Some(id) = next {
        let _ = to_relay.send(Row {
            id,
            message_id: next_id,
            body: vec![Body {
                hop: body.hop + 1,
                ..body
            }],
            event: body.hop == last_hop,
        });
    }
    // Through once its last hop committed, whatever becomes of the ack.
    let through =
        (moved && body.hop == last_hop).then(|| started.elapsed().saturating_sub(Duration::from_micros(body.t)));
    if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %err, "floor ack failed");
    }
    Ok(through)
}

/// A delivered message's id.
fn message_id(delivery: &Delivery) -> anyhow::Result<Uuid> {
    Ok(delivery
        .properties
        .message_id()
        .as_ref()
        .context("a message without an id")?
        .as_str()
        .parse()?)
}

/// With `--floor-batch`: the deliveries in one statement (their inbox records, the orders they
/// carry moved on, one outbox row per next message), their next messages to the relay, each
/// acked after the commit. Returns the end-to-end latencies of the orders through; or the error
/// with how many orders the batch carried (its deliveries, if a body could not be read), which
/// go no further.
async fn hop_batch(
    conns: &Arc<Conns>,
    to_relay: &mpsc::UnboundedSender<Row>,
    deliveries: Vec<Delivery>,
    last_hop: i32,
    started: Instant,
) -> Result<Vec<Duration>, (anyhow::Error, usize)> {
    let mut messages = Vec::with_capacity(deliveries.len());
    let mut carried: Vec<(Uuid, Body)> = Vec::new();
    for delivery in &deliveries {
        let read = message_id(delivery).and_then(|id| Ok((id, serde_json::from_slice::<Vec<Body>>(&delivery.data)?)));
        let (id, bodies) = read.map_err(|err| (err, deliveries.len()))?;
        messages.push(id);
        carried.extend(bodies.into_iter().map(|body| (id, body)));
    }
    let (to_queue, to_events) = (Uuid::now_v7(), Uuid::now_v7());
    let statement = async {
        let (carriers, orders, hops): (Vec<Uuid>, Vec<Uuid>, Vec<i32>) =
            carried.iter().map(|(id, b)| (*id, b.order, b.hop)).collect();
        let row: (Vec<Uuid>, Vec<i32>, Vec<i64>, Vec<Uuid>) = sqlx::query_as(BATCH_HOP)
            .bind(&messages)
            .bind(&carriers)
            .bind(&orders)
            .bind(&hops)
            .bind(to_queue)
            .bind(to_events)
            .bind(last_hop)
            .fetch_one(&mut *conns.take().await?)
            .await?;
        anyhow::Ok(row)
    };
    let (moved, moved_to, next_ids, next_messages) = statement.await.map_err(|err| (err, carried.len()))?;
    // By order and hop: a redelivered message beside the next hop's could carry an order twice.
    let moved: std::collections::HashSet<(Uuid, i32)> = moved.into_iter().zip(moved_to).collect();
    let (mut onward, mut through) = (Vec::new(), Vec::new());
    for (_, body) in carried.into_iter().filter(|(_, b)| moved.contains(&(b.order, b.hop))) {
        if body.hop == last_hop {
            through.push(started.elapsed().saturating_sub(Duration::from_micros(body.t)));
        }
        onward.push(Body {
            hop: body.hop + 1,
            ..body
        });
    }
    for (id, message_id) in next_ids.into_iter().zip(next_messages) {
        let event = message_id == to_events;
        let body: Vec<Body> = onward.iter().filter(|b| (b.hop > last_hop) == event).copied().collect();
        let _ = to_relay.send(Row {
            id,
            message_id,
            body,
            event,
        });
    }
    for delivery in deliveries {
        if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %err, "floor ack failed");
        }
    }
    Ok(through)
}

/// Publishes each row handed over with a publisher confirm (a row past the last hop to the
/// events queue) and marks the confirmed ones sent, in one statement per [`MARK_EVERY`]; ends
/// when no sender is left and everything is marked, and gives its channel back.
async fn relay(
    conns: Arc<Conns>,
    channel: Channel,
    [queue, events]: [String; 2],
    mut rows: mpsc::UnboundedReceiver<Row>,
) -> Channel {
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
                    let to = if row.event { &events } else { &queue };
                    let published = channel
                        .basic_publish(
                            "".into(),
                            to.as_str().into(),
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
            _ = tick.tick() => mark(&conns, &mut confirmed).await,
        }
    }
    mark(&conns, &mut confirmed).await;
    channel
}

async fn mark(conns: &Arc<Conns>, confirmed: &mut Vec<i64>) {
    if confirmed.is_empty() {
        return;
    }
    let marked = async {
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
            .bind(&*confirmed)
            .execute(&mut *conns.take().await?)
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = marked {
        tracing::warn!(error = %err, "floor could not mark rows sent");
    }
    confirmed.clear();
}
