//! `orderflow audit`: checks every invariant of DESIGN.md §5 and prints one JSON report.
//!
//! The database checks run in one `REPEATABLE READ, READ ONLY` transaction: every check sees
//! the same snapshot, and since each pipeline step changes an order and its effect in one
//! transaction, the stock, balance, coupon and order checks hold even while orders are in
//! flight. The broker is read *before* that snapshot is taken, so every event found on the
//! data-platform queue belongs to an order the snapshot already sees as CONFIRMED.
//!
//! Each check is one function returning a [`Check`]; where practical one set-based query
//! yields the violations as JSON objects with a `kind` and the ids of the entities involved.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::{
    Channel, Connection, ConnectionProperties, ErrorKind,
    options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
};
use orderflow_shared::{
    db,
    domain::{BALANCE_MAX, OrderStatus},
    messaging::topology::{DATA_PLATFORM_QUEUE, DEAD_LETTER_QUEUE},
};
use serde_json::{Map, Value, json};
use sqlx::{ConnectOptions, PgConnection, PgPool};

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Skip the data-platform events check (the only one that reads messages).
    #[arg(long)]
    pub skip_events: bool,
    /// Audit a running system: skip the liveness check (orders in flight, unsent outbox
    /// rows and waiting dead letters are normal then), and do not count a confirmed order's
    /// event as missing while it may still be on its way.
    #[arg(long)]
    pub allow_in_flight: bool,
    /// Violations listed per check; all of them are counted.
    #[arg(long, default_value_t = 50)]
    pub max_listed: usize,
}

impl Default for AuditArgs {
    fn default() -> Self {
        Self {
            skip_events: false,
            allow_in_flight: false,
            max_listed: 50,
        }
    }
}

/// Every allowed transition of the order state machine (DESIGN.md §2).
pub const TRANSITIONS: &[(OrderStatus, OrderStatus)] = {
    use OrderStatus::*;
    &[
        (Pending, StockReserved),
        (Pending, Cancelling),
        (StockReserved, CouponApplied),
        (StockReserved, Paid),
        (StockReserved, Cancelling),
        (CouponApplied, Paid),
        (CouponApplied, Cancelling),
        (Paid, Confirmed),
        (Paid, Cancelling),
        (Cancelling, Cancelled),
        (Cancelling, CompensationFailed),
        (CompensationFailed, Cancelling),
    ]
};

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    /// Why the check did not run (it then counts as passed: nothing was found wrong).
    pub skipped: Option<String>,
    /// Every violation found; only the first `max_listed` are in `violations`.
    pub violation_count: u64,
    pub violations: Vec<Value>,
    /// Facts that are not violations (e.g. duplicate deliveries).
    pub info: Map<String, Value>,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            skipped: None,
            violation_count: 0,
            violations: Vec::new(),
            info: Map::new(),
        }
    }

    fn skipped(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            skipped: Some(reason.into()),
            ..Self::new(name)
        }
    }

    pub fn ok(&self) -> bool {
        self.violation_count == 0
    }

    /// Counts a violation, listing it while fewer than `max` are listed.
    fn push(&mut self, max: usize, violation: Value) {
        self.violation_count += 1;
        if self.violations.len() < max {
            self.violations.push(violation);
        }
    }

    /// Violations (listed ones only) of one `kind`.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.violations.iter().filter(move |v| v["kind"] == kind)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "ok": self.ok(),
            "skipped": self.skipped,
            "violationCount": self.violation_count,
            "violations": self.violations,
            "info": self.info,
        })
    }
}

/// The whole audit: clean when every check passed.
#[derive(Debug, Clone)]
pub struct Report {
    pub clean: bool,
    pub checked_at: DateTime<Utc>,
    pub counts: Value,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "clean": self.clean,
            "checkedAt": self.checked_at,
            "counts": self.counts,
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Runs the audit and prints the report; Ok(true) when clean.
pub async fn run(database_url: &str, amqp_url: &str, args: &AuditArgs) -> anyhow::Result<bool> {
    let pool = db::pool(database_url, 2)?;
    // Logs share stdout with the report: keep sqlx's slow-statement warnings out of it.
    pool.set_connect_options((*pool.connect_options()).clone().disable_statement_logging());
    let report = audit(&pool, Some(amqp_url), args).await;
    pool.close().await;
    let report = report?;
    println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    Ok(report.clean)
}

/// Checks every invariant against the database behind `pool` and, when `amqp_url` is given,
/// the broker. Errors only when the database cannot be read; an unreachable broker skips
/// what needs it, with the reason.
pub async fn audit(pool: &PgPool, amqp_url: Option<&str>, opts: &AuditArgs) -> anyhow::Result<Report> {
    let checked_at = Utc::now();
    let max = opts.max_listed;
    // In flight, only an event whose outbox row was marked sent before the queue is read
    // must be on it; later ones may be missed by the read.
    let published: Option<BTreeSet<String>> = if opts.allow_in_flight && !opts.skip_events {
        let sent: Vec<String> = sqlx::query_scalar(
            "SELECT order_ids[1]::text FROM outbox WHERE message_type = 'order.confirmed' AND sent_at IS NOT NULL",
        )
        .fetch_all(pool)
        .await
        .context("reading from PostgreSQL")?;
        Some(sent.into_iter().collect())
    } else {
        None
    };
    let broker = read_broker(amqp_url, !opts.skip_events, !opts.allow_in_flight).await;

    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut counts = counts(&mut tx).await?;
    let mut checks = vec![
        stock(&mut tx, max).await?,
        balance(&mut tx, max).await?,
        coupons(&mut tx, max).await?,
        orders(&mut tx, max).await?,
        sales(&mut tx, max).await?,
    ];
    checks.push(match &broker.events {
        _ if opts.skip_events => Check::skipped("events", "--skip-events"),
        Err(reason) => Check::skipped("events", reason.clone()),
        Ok(read) => {
            counts["dataPlatformMessages"] = json!(read.messages.len());
            events(&mut tx, read, published.as_ref(), max).await?
        }
    });
    checks.push(if opts.allow_in_flight {
        Check::skipped("liveness", "--allow-in-flight")
    } else {
        if let Ok(Some(n)) = broker.dead_letters {
            counts["deadLettersWaiting"] = json!(n);
        }
        liveness(&mut tx, &broker.dead_letters, max).await?
    });
    tx.rollback().await?;

    Ok(Report {
        clean: checks.iter().all(Check::ok),
        checked_at,
        counts,
        checks,
    })
}

/// Wraps a query whose rows are single JSON violations `v`: yields the first `$1` of them,
/// ordered by kind, each with the total count.
macro_rules! listed {
    ($violations:expr) => {
        concat!(
            "SELECT t.v, count(*) OVER () FROM (",
            $violations,
            ") AS t(v) ORDER BY t.v->>'kind', t.v::text LIMIT $1"
        )
    };
}

/// Runs a query built with `listed!` (the listing limit bound as `$1`) into a check.
async fn listed<'q>(
    tx: &mut PgConnection,
    name: &'static str,
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, (Value, i64), sqlx::postgres::PgArguments>,
) -> anyhow::Result<Check> {
    let rows = query
        .fetch_all(&mut *tx)
        .await
        .with_context(|| format!("running the {name} check"))?;
    let mut check = Check::new(name);
    check.violation_count = rows.first().map_or(0, |(_, total)| *total as u64);
    check.violations = rows.into_iter().map(|(v, _)| v).collect();
    Ok(check)
}

fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

/// Sizes of what was audited, so a clean report also says how much it looked at.
async fn counts(tx: &mut PgConnection) -> anyhow::Result<Value> {
    let (by_status, mut counts): (Value, Value) = sqlx::query_as(
        "SELECT COALESCE((SELECT jsonb_object_agg(status, n) FROM (SELECT status, count(*) AS n FROM orders GROUP BY status) s), '{}'),
                jsonb_build_object(
                    'orders', (SELECT count(*) FROM orders),
                    'products', (SELECT count(*) FROM products),
                    'users', (SELECT count(*) FROM (SELECT user_id FROM balances UNION SELECT user_id FROM balance_ledger
                                                     UNION SELECT user_id FROM orders UNION SELECT user_id FROM user_coupons) u),
                    'coupons', (SELECT count(*) FROM coupons),
                    'userCoupons', (SELECT count(*) FROM user_coupons),
                    'ledgerEntries', (SELECT count(*) FROM balance_ledger),
                    'outboxUnsent', (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND discarded_at IS NULL))",
    )
    .fetch_one(&mut *tx)
    .await?;
    // Every known status, zero when absent, plus any unknown one found.
    let mut statuses: Map<String, Value> = OrderStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), json!(0)))
        .collect();
    if let Value::Object(found) = by_status {
        statuses.extend(found);
    }
    counts["ordersByStatus"] = Value::Object(statuses);
    Ok(counts)
}

/// Invariant 1: stock is never negative and is conserved: what is on hand plus what orders
/// hold is what was ever put in.
async fn stock(tx: &mut PgConnection, max: usize) -> anyhow::Result<Check> {
    let query = sqlx::query_as(listed!(
        "SELECT jsonb_build_object(
                    'kind', CASE WHEN p.stock < 0 THEN 'negative_stock' ELSE 'stock_not_conserved' END,
                    'productId', p.id, 'stock', p.stock,
                    'expected', p.initial_stock + p.restocked - COALESCE(h.held, 0),
                    'initialStock', p.initial_stock, 'restocked', p.restocked, 'heldByOrders', COALESCE(h.held, 0))
         FROM products p
         LEFT JOIN (SELECT i.product_id, sum(i.quantity)::bigint AS held
                    FROM order_items i JOIN orders o ON o.id = i.order_id
                    WHERE o.stock_held GROUP BY i.product_id) h ON h.product_id = p.id
         WHERE p.stock < 0 OR p.stock <> p.initial_stock + p.restocked - COALESCE(h.held, 0)"
    ))
    .bind(limit(max));
    listed(tx, "stock", query).await
}

/// The popular-products projection counts every confirmed order once: per product, the units
/// in `product_sales_hourly` are the units of its CONFIRMED orders (the order worker adds them
/// in the transaction that confirms the order, so this holds in any snapshot, in flight too).
/// An upgrade that strands confirmed orders' counts (a retired queue nobody drains) shows here.
async fn sales(tx: &mut PgConnection, max: usize) -> anyhow::Result<Check> {
    let query = sqlx::query_as(listed!(
        "SELECT jsonb_build_object(
                    'kind', 'sales_not_counted_once', 'productId', COALESCE(s.product_id, c.product_id),
                    'projected', COALESCE(s.units, 0), 'confirmedUnits', COALESCE(c.units, 0))
         FROM (SELECT product_id, sum(quantity)::bigint AS units FROM product_sales_hourly GROUP BY product_id) s
         FULL JOIN (SELECT i.product_id, sum(i.quantity)::bigint AS units
                    FROM order_items i JOIN orders o ON o.id = i.order_id
                    WHERE o.status = 'CONFIRMED' GROUP BY i.product_id) c ON c.product_id = s.product_id
         WHERE COALESCE(s.units, 0) <> COALESCE(c.units, 0)"
    ))
    .bind(limit(max));
    listed(tx, "sales", query).await
}

/// Invariant 2: the ledger proves every balance; terminal orders were paid (or refunded)
/// exactly as their state says. A user with ledger rows but no balance row has balance 0.
async fn balance(tx: &mut PgConnection, max: usize) -> anyhow::Result<Check> {
    let query = sqlx::query_as(listed!(
        "WITH ledger AS (
             SELECT user_id, sum(CASE kind WHEN 'PAYMENT' THEN -amount ELSE amount END)::bigint AS total
             FROM balance_ledger GROUP BY user_id
         ), per_order AS (
             SELECT order_id, min(user_id) AS user_id, max(user_id) AS other_user_id,
                    count(*) FILTER (WHERE kind = 'PAYMENT') AS payments,
                    COALESCE(sum(amount) FILTER (WHERE kind = 'PAYMENT'), 0)::bigint AS paid,
                    count(*) FILTER (WHERE kind = 'REFUND') AS refunds,
                    COALESCE(sum(amount) FILTER (WHERE kind = 'REFUND'), 0)::bigint AS refunded
             FROM balance_ledger WHERE order_id IS NOT NULL GROUP BY order_id
         ), terminal AS (
             SELECT o.id, o.user_id, o.status, o.paid_amount, COALESCE(p.payments, 0) AS payments,
                    COALESCE(p.paid, 0) AS paid, COALESCE(p.refunds, 0) AS refunds, COALESCE(p.refunded, 0) AS refunded
             FROM orders o LEFT JOIN per_order p ON p.order_id = o.id
             WHERE o.status IN ('CONFIRMED', 'CANCELLED')
         )
         SELECT jsonb_build_object(
                    'kind', CASE WHEN b.balance < 0 THEN 'negative_balance' ELSE 'balance_differs_from_ledger' END,
                    'userId', COALESCE(b.user_id, l.user_id), 'balance', b.balance, 'ledgerSum', COALESCE(l.total, 0))
         FROM balances b FULL JOIN ledger l ON l.user_id = b.user_id
         WHERE COALESCE(b.balance, 0) <> COALESCE(l.total, 0) OR b.balance < 0
         UNION ALL
         SELECT jsonb_build_object('kind', 'charge_above_cap', 'ledgerId', id, 'userId', user_id, 'balanceAfter', balance_after)
         FROM balance_ledger WHERE kind = 'CHARGE' AND balance_after > $2
         UNION ALL
         SELECT jsonb_build_object(
                    'kind', CASE status WHEN 'CONFIRMED' THEN 'confirmed_payment_wrong' ELSE 'cancelled_payment_not_refunded' END,
                    'orderId', id, 'userId', user_id, 'paidAmount', paid_amount, 'payments', payments, 'paid', paid,
                    'refunds', refunds, 'refunded', refunded)
         FROM terminal
         WHERE CASE status WHEN 'CONFIRMED' THEN NOT (payments = 1 AND paid = paid_amount AND refunds = 0)
                           ELSE paid <> refunded END
         UNION ALL
         SELECT jsonb_build_object('kind', 'ledger_order_mismatch', 'orderId', p.order_id,
                                   'ledgerUserIds', jsonb_build_array(p.user_id, p.other_user_id), 'orderUserId', o.user_id)
         FROM per_order p LEFT JOIN orders o ON o.id = p.order_id
         WHERE o.id IS NULL OR p.user_id <> o.user_id OR p.other_user_id <> o.user_id"
    ))
    .bind(limit(max))
    .bind(BALANCE_MAX);
    listed(tx, "balance", query).await
}

/// Invariant 3: `issued` counts the issued rows and never exceeds `quantity`; a user coupon
/// is USED exactly when one non-cancelled order holds it, and then points at that order.
async fn coupons(tx: &mut PgConnection, max: usize) -> anyhow::Result<Check> {
    let query = sqlx::query_as(listed!(
        "WITH issued AS (
             SELECT coupon_id, count(*) AS n FROM user_coupons GROUP BY coupon_id
         ), holders AS (
             SELECT coupon_id, user_id, count(*) AS n, array_agg(id ORDER BY id) AS ids
             FROM orders WHERE coupon_held AND status <> 'CANCELLED' AND coupon_id IS NOT NULL
             GROUP BY coupon_id, user_id
         ), held AS (
             SELECT uc.*, COALESCE(h.n, 0) AS n, COALESCE(h.ids, '{}') AS ids
             FROM user_coupons uc LEFT JOIN holders h ON h.coupon_id = uc.coupon_id AND h.user_id = uc.user_id
         )
         SELECT jsonb_build_object(
                    'kind', CASE WHEN COALESCE(i.n, 0) > c.quantity THEN 'issued_above_quantity' ELSE 'issued_count_wrong' END,
                    'couponId', c.id, 'issued', c.issued, 'rows', COALESCE(i.n, 0), 'quantity', c.quantity)
         FROM coupons c LEFT JOIN issued i ON i.coupon_id = c.id
         WHERE c.issued <> COALESCE(i.n, 0) OR COALESCE(i.n, 0) > c.quantity
         UNION ALL
         SELECT jsonb_build_object(
                    'kind', CASE WHEN status = 'USED' AND n = 0 THEN 'used_but_not_held'
                                 WHEN status <> 'USED' THEN 'held_but_not_used'
                                 WHEN n > 1 THEN 'held_by_several_orders'
                                 ELSE 'used_by_another_order' END,
                    'userCouponId', id, 'couponId', coupon_id, 'userId', user_id, 'status', status,
                    'orderId', order_id, 'heldBy', to_jsonb(ids))
         FROM held
         WHERE NOT ((status = 'USED' AND n = 1 AND order_id IS NOT DISTINCT FROM ids[1])
                    OR (status = 'AVAILABLE' AND n = 0))
         UNION ALL
         SELECT jsonb_build_object('kind', 'held_but_never_issued', 'couponId', h.coupon_id, 'userId', h.user_id,
                                   'heldBy', to_jsonb(h.ids))
         FROM holders h
         WHERE NOT EXISTS (SELECT 1 FROM user_coupons uc WHERE uc.coupon_id = h.coupon_id AND uc.user_id = h.user_id)"
    ))
    .bind(limit(max));
    listed(tx, "coupons", query).await
}

/// Invariant 4: each order's history is a walk of the state machine from PENDING that ends
/// in its current status, and a terminal order holds exactly what its state promises.
async fn orders(tx: &mut PgConnection, max: usize) -> anyhow::Result<Check> {
    let (from, to): (Vec<&str>, Vec<&str>) = TRANSITIONS.iter().map(|(f, t)| (f.as_str(), t.as_str())).unzip();
    let known: Vec<&str> = OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
    let query = sqlx::query_as(listed!(
        "WITH h AS (
             SELECT id, order_id, from_status, to_status,
                    row_number() OVER w AS n, lag(to_status) OVER w AS previous,
                    count(*) OVER (PARTITION BY order_id) AS steps
             FROM order_status_history WINDOW w AS (PARTITION BY order_id ORDER BY id)
         ), allowed AS (
             SELECT * FROM UNNEST($2::text[], $3::text[]) AS a(from_status, to_status)
         )
         SELECT jsonb_build_object('kind', 'unknown_status', 'orderId', id, 'status', status)
         FROM orders WHERE status <> ALL($4::text[])
         UNION ALL
         SELECT jsonb_build_object('kind', 'no_history', 'orderId', o.id, 'status', o.status)
         FROM orders o WHERE NOT EXISTS (SELECT 1 FROM order_status_history x WHERE x.order_id = o.id)
         UNION ALL
         SELECT jsonb_build_object('kind', 'history_not_from_pending', 'orderId', order_id, 'historyId', id,
                                   'from', from_status, 'to', to_status)
         FROM h WHERE n = 1 AND (from_status IS NOT NULL OR to_status <> 'PENDING')
         UNION ALL
         SELECT jsonb_build_object('kind', 'history_broken', 'orderId', order_id, 'historyId', id,
                                   'from', from_status, 'to', to_status, 'previousTo', previous)
         FROM h WHERE n > 1 AND from_status IS DISTINCT FROM previous
         UNION ALL
         SELECT jsonb_build_object('kind', 'illegal_transition', 'orderId', order_id, 'historyId', id,
                                   'from', from_status, 'to', to_status)
         FROM h WHERE n > 1 AND NOT EXISTS (SELECT 1 FROM allowed a WHERE a.from_status = h.from_status AND a.to_status = h.to_status)
         UNION ALL
         SELECT jsonb_build_object('kind', 'status_differs_from_history', 'orderId', o.id, 'status', o.status,
                                   'historyStatus', h.to_status, 'historyId', h.id)
         FROM h JOIN orders o ON o.id = h.order_id
         WHERE h.n = h.steps AND h.to_status <> o.status
         UNION ALL
         SELECT jsonb_build_object('kind', 'confirmed_holds_wrong', 'orderId', id, 'stockHeld', stock_held,
                                   'couponId', coupon_id, 'couponHeld', coupon_held, 'paidAmount', paid_amount,
                                   'expectedPaidAmount', total_amount - discount_amount)
         FROM orders
         WHERE status = 'CONFIRMED'
           AND (NOT stock_held OR coupon_held <> (coupon_id IS NOT NULL) OR paid_amount <> total_amount - discount_amount)
         UNION ALL
         SELECT jsonb_build_object('kind', 'cancelled_holds_something', 'orderId', id, 'stockHeld', stock_held,
                                   'couponHeld', coupon_held, 'paidAmount', paid_amount, 'reason', reason)
         FROM orders
         WHERE status = 'CANCELLED' AND (stock_held OR coupon_held OR paid_amount <> 0 OR reason IS NULL)"
    ))
    .bind(limit(max))
    .bind(from)
    .bind(to)
    .bind(known);
    listed(tx, "orders", query).await
}

/// A message read from a queue and given back.
#[derive(Debug, Clone)]
struct Peeked {
    message_id: Option<String>,
    body: Vec<u8>,
}

/// What the data-platform queue held. `exists` is false when the queue was never declared.
struct QueueRead {
    exists: bool,
    messages: Vec<Peeked>,
    /// Whether the queue was seen holding them all again before the audit went on.
    given_back: bool,
}

/// What the broker showed; `Err` holds why a queue could not be read (what needs it is
/// skipped, with that reason). `Ok(None)`: the queue does not exist.
struct BrokerView {
    events: Result<QueueRead, String>,
    dead_letters: Result<Option<u32>, String>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the broker to show given-back messages as ready again.
const GIVE_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the data-platform queue (if `events`) and counts the dead-letter queue (if
/// `dead_letters`), read-only: nothing is declared, acked or consumed.
async fn read_broker(url: Option<&str>, events: bool, dead_letters: bool) -> BrokerView {
    let not_read = |reason: &str| BrokerView {
        events: Err(reason.to_owned()),
        dead_letters: Err(reason.to_owned()),
    };
    let Some(url) = url.filter(|_| events || dead_letters) else {
        return not_read("no broker to read");
    };
    let props = ConnectionProperties::default().with_connection_name("orderflow-audit".into());
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, orderflow_shared::messaging::connect(url, props)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => return not_read(&format!("broker unreachable: {err}")),
        Err(_) => return not_read("broker unreachable: connecting timed out"),
    };
    let view = BrokerView {
        events: if events {
            peek(&conn, DATA_PLATFORM_QUEUE)
                .await
                .map_err(|e| format!("reading {DATA_PLATFORM_QUEUE}: {e}"))
        } else {
            Err("not asked for".to_owned())
        },
        dead_letters: if dead_letters {
            ready_count(&conn, DEAD_LETTER_QUEUE)
                .await
                .map_err(|e| format!("reading {DEAD_LETTER_QUEUE}: {e}"))
        } else {
            Err("not asked for".to_owned())
        },
    };
    let _ = conn.close(200, "audit done".into()).await;
    view
}

/// The ready messages of `queue` (a passive declare), None when it does not exist.
async fn ready_count(conn: &Connection, queue: &str) -> lapin::Result<Option<u32>> {
    let channel = conn.create_channel().await?;
    let ready = passive_declare(&channel, queue).await?;
    let _ = channel.close(200, "audit done".into()).await;
    Ok(ready)
}

/// A queue's ready messages, None when it does not exist (the broker then closes the
/// channel).
async fn passive_declare(channel: &Channel, queue: &str) -> lapin::Result<Option<u32>> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
    {
        Ok(q) => Ok(Some(q.message_count())),
        Err(err) => match err.kind() {
            ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Ok(None),
            _ => Err(err),
        },
    }
}

/// Reads every ready message of `queue` without consuming it: `basic.get` without auto-ack
/// holds each one unacknowledged (so none is fetched twice), then one `nack(multiple,
/// requeue)` gives them all back (a failure half-way closes the channel, which gives them
/// back too). The broker requeues asynchronously, so this waits until the queue shows them
/// ready again: whoever reads it next sees every message. They come back marked redelivered.
async fn peek(conn: &Connection, queue: &str) -> lapin::Result<QueueRead> {
    let channel = conn.create_channel().await?;
    let Some(ready) = passive_declare(&channel, queue).await? else {
        return Ok(QueueRead {
            exists: false,
            messages: Vec::new(),
            given_back: true,
        });
    };
    let mut messages = Vec::new();
    let mut last_tag = None;
    for _ in 0..ready {
        let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        last_tag = Some(msg.delivery.delivery_tag);
        messages.push(Peeked {
            message_id: msg.delivery.properties.message_id().as_ref().map(|s| s.to_string()),
            body: msg.delivery.data,
        });
    }
    let mut given_back = true;
    if let Some(tag) = last_tag {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
        let deadline = tokio::time::Instant::now() + GIVE_BACK_TIMEOUT;
        while passive_declare(&channel, queue).await?.unwrap_or(0) < messages.len() as u32 {
            if tokio::time::Instant::now() >= deadline {
                // E.g. a consumer took some of them: they are not lost, only not ready.
                given_back = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    channel.close(200, "audit done".into()).await?;
    Ok(QueueRead {
        exists: true,
        messages,
        given_back,
    })
}

/// Invariant 5: the distinct `order.confirmed` event ids on the data-platform queue match
/// the CONFIRMED orders one to one, and each event says what the order says. Delivery is at
/// least once, so the same event id seen more than once is only counted (`info`).
async fn events(
    tx: &mut PgConnection,
    read: &QueueRead,
    published_before_read: Option<&BTreeSet<String>>,
    max: usize,
) -> anyhow::Result<Check> {
    let mut check = Check::new("events");
    if !read.exists {
        check.info.insert("queueMissing".into(), json!(DATA_PLATFORM_QUEUE));
    }
    if !read.given_back {
        check.info.insert("givenBackNotConfirmed".into(), json!(true));
    }
    let messages = &read.messages;

    // order id -> event id -> the event's body (first delivery).
    let mut seen: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut deliveries = 0u64;
    for msg in messages {
        let body: Option<Value> = serde_json::from_slice(&msg.body).ok();
        let field = |name: &str| body.as_ref().and_then(|b| b[name].as_str()).map(str::to_owned);
        // A CloudEvent names its order in `subject`; an event an earlier release published
        // (still on the queue after an upgrade) in `orderId`.
        let order = field("subject").or_else(|| field("orderId"));
        let (Some(event_id), Some(order_id)) = (field("id").or_else(|| msg.message_id.clone()), order) else {
            check.push(max, json!({"kind": "undecodable_message", "messageId": msg.message_id}));
            continue;
        };
        if field("type").as_deref() != Some("order.confirmed") {
            check.push(max, json!({"kind": "unexpected_message_type", "eventId": event_id, "orderId": order_id, "type": field("type")}));
            continue;
        }
        deliveries += 1;
        seen.entry(order_id)
            .or_default()
            .entry(event_id)
            .or_insert_with(|| body.map_or(Value::Null, |mut b| b["data"].take()));
    }
    let distinct: u64 = seen.values().map(|ids| ids.len() as u64).sum();

    // What each confirmed order's event must say.
    let confirmed: Vec<(String, Value)> = sqlx::query_as(
        "SELECT o.id::text,
                jsonb_build_object('userId', o.user_id, 'couponId', o.coupon_id, 'totalAmount', o.total_amount,
                                   'discountAmount', o.discount_amount, 'paidAmount', o.paid_amount,
                                   'items', (SELECT COALESCE(jsonb_agg(jsonb_build_object('productId', i.product_id,
                                                 'quantity', i.quantity, 'unitPrice', i.unit_price) ORDER BY i.product_id), '[]')
                                             FROM order_items i WHERE i.order_id = o.id))
         FROM orders o WHERE o.status = 'CONFIRMED' ORDER BY o.id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("running the events check")?;

    let mut pending = 0u64;
    for (order_id, expected) in &confirmed {
        match seen.remove(order_id) {
            None if published_before_read.is_some_and(|p| !p.contains(order_id)) => pending += 1,
            None => check.push(max, json!({"kind": "missing_event", "orderId": order_id})),
            Some(ids) if ids.len() > 1 => check.push(
                max,
                json!({"kind": "several_event_ids", "orderId": order_id, "eventIds": ids.keys().collect::<Vec<_>>()}),
            ),
            Some(ids) => {
                for (event_id, data) in ids {
                    let differs = differing_fields(expected, &data);
                    if !differs.is_empty() {
                        check.push(max, json!({"kind": "event_differs_from_order", "orderId": order_id, "eventId": event_id, "fields": differs}));
                    }
                }
            }
        }
    }
    // What is left are events of orders that are not CONFIRMED.
    if !seen.is_empty() {
        let ids: Vec<&str> = seen.keys().map(String::as_str).collect();
        let statuses: BTreeMap<String, String> =
            sqlx::query_as("SELECT id::text, status FROM orders WHERE id::text = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        for (order_id, event_ids) in &seen {
            check.push(
                max,
                json!({
                    "kind": "event_for_unconfirmed_order", "orderId": order_id,
                    "status": statuses.get(order_id), "eventIds": event_ids.keys().collect::<Vec<_>>(),
                }),
            );
        }
    }
    check.info.insert("messagesRead".into(), json!(messages.len()));
    check.info.insert("distinctEvents".into(), json!(distinct));
    check
        .info
        .insert("duplicateDeliveries".into(), json!(deliveries - distinct));
    check.info.insert("confirmedOrders".into(), json!(confirmed.len()));
    if published_before_read.is_some() {
        check.info.insert("eventsPending".into(), json!(pending));
    }
    Ok(check)
}

/// The fields of an event's `data` that differ from the order (items compared by product).
fn differing_fields(expected: &Value, data: &Value) -> Vec<String> {
    let by_product = |items: &Value| {
        let mut items = items.as_array().cloned().unwrap_or_default();
        items.sort_by_key(|i| i["productId"].as_i64());
        items
    };
    let Some(expected) = expected.as_object() else {
        return vec![];
    };
    expected
        .iter()
        .filter(|(name, want)| match name.as_str() {
            "items" => by_product(want) != by_product(&data[name.as_str()]),
            _ => data[name.as_str()] != **want,
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Invariant 6, at rest: every order is terminal (COMPENSATION_FAILED needs an operator),
/// the outbox is drained and no dead letter waits unrecorded in the dead-letter queue.
async fn liveness(
    tx: &mut PgConnection,
    dead_letters: &Result<Option<u32>, String>,
    max: usize,
) -> anyhow::Result<Check> {
    let query = sqlx::query_as(listed!(
        "SELECT jsonb_build_object('kind', 'order_not_terminal', 'orderId', id, 'status', status,
                                   'reason', reason, 'deadlineAt', deadline_at)
         FROM orders WHERE in_flight
         UNION ALL
         SELECT jsonb_build_object('kind', CASE WHEN parked_at IS NULL THEN 'outbox_unsent' ELSE 'outbox_parked' END,
                                   'outboxId', id, 'messageType', message_type, 'orderIds', order_ids,
                                   'createdAt', created_at, 'lastError', last_error)
         FROM outbox WHERE sent_at IS NULL AND discarded_at IS NULL"
    ))
    .bind(limit(max));
    let mut check = listed(tx, "liveness", query).await?;
    match dead_letters {
        Ok(Some(0)) => {}
        Ok(None) => {
            check
                .info
                .insert("deadLetterQueueMissing".into(), json!(DEAD_LETTER_QUEUE));
        }
        Ok(Some(n)) => check.push(
            max,
            json!({"kind": "dead_letters_waiting", "queue": DEAD_LETTER_QUEUE, "messages": n}),
        ),
        Err(reason) => {
            check.info.insert("deadLetterQueueSkipped".into(), json!(reason));
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_cover_the_state_machine() {
        // Every non-terminal state can move on; nothing leaves a terminal state.
        for s in OrderStatus::ALL {
            let leaves = TRANSITIONS.iter().any(|(f, _)| f == s);
            assert_eq!(leaves, !s.is_terminal(), "{s}");
        }
    }

    #[test]
    fn event_payload_differences_are_named() {
        let expected = json!({"userId": 1, "couponId": null, "paidAmount": 10,
                              "items": [{"productId": 1, "quantity": 1}, {"productId": 2, "quantity": 2}]});
        let same = json!({"userId": 1, "couponId": null, "paidAmount": 10, "confirmedAt": "x",
                          "items": [{"productId": 2, "quantity": 2}, {"productId": 1, "quantity": 1}]});
        assert!(differing_fields(&expected, &same).is_empty());
        let other = json!({"userId": 1, "paidAmount": 11, "items": []});
        assert_eq!(differing_fields(&expected, &other), ["items", "paidAmount"]);
    }

    #[test]
    fn listing_counts_everything_but_lists_at_most_max() {
        let mut check = Check::new("x");
        for i in 0..5 {
            check.push(3, json!({"kind": "k", "i": i}));
        }
        assert_eq!(
            (check.violation_count, check.violations.len(), check.ok()),
            (5, 3, false)
        );
    }
}
