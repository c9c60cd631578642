//! `--baseline sync|procedure`: the same order mix done the way a monolith would, on the
//! same database and machine: lock and take stock, use the coupon, debit the balance with
//! its ledger row, write the order and its items.
//!
//! - `sync`: one synchronous PostgreSQL transaction per order, a statement per step from the
//!   client (a failed check after stock was taken rolls back and records the cancelled order
//!   in a second, short transaction).
//! - `procedure`: one call of a PL/pgSQL function per order ([`PROCEDURE_DDL`]), one round
//!   trip: every check first (rows locked in a fixed order), then every write, in the call's
//!   own transaction. The strongest monolith on this database: the client pays one statement.
//!
//! It runs in a schema of its own (`orderflow_bench_sync_<random>`, created with tables that
//! mirror the real ones and dropped afterwards), so it never touches the system's data.
//! HTTP and JSON are not part of it: it is the database work an order needs, done directly.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use indicatif::ProgressBar;
use orderflow_shared::domain::{self, DiscountType};
use sqlx::{PgConnection, PgPool, postgres::PgPoolOptions};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    args::Baseline,
    meter::Meter,
    plan::{self, COUPON_DISCOUNT, Plan},
    report::{BaselineReport, Latency, per_second},
    scratch::Scratch,
};

const SCHEMA_DDL: &str = "
CREATE TABLE products (
    id    BIGINT PRIMARY KEY,
    price BIGINT NOT NULL CHECK (price >= 0),
    stock BIGINT NOT NULL CHECK (stock >= 0)
);
CREATE TABLE balances (
    user_id    BIGINT PRIMARY KEY,
    balance    BIGINT NOT NULL CHECK (balance >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE balance_ledger (
    id            BIGSERIAL PRIMARY KEY,
    user_id       BIGINT NOT NULL,
    kind          TEXT   NOT NULL,
    amount        BIGINT NOT NULL CHECK (amount >= 0),
    balance_after BIGINT NOT NULL CHECK (balance_after >= 0),
    order_id      UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ON balance_ledger (user_id, id DESC);
CREATE UNIQUE INDEX ON balance_ledger (order_id, kind) WHERE order_id IS NOT NULL;
CREATE TABLE coupons (
    id               BIGINT PRIMARY KEY,
    discount_type    TEXT    NOT NULL,
    discount_value   BIGINT  NOT NULL,
    quantity         INTEGER NOT NULL,
    issued           INTEGER NOT NULL,
    expires_at       TIMESTAMPTZ,
    min_order_amount BIGINT  NOT NULL DEFAULT 0
);
CREATE TABLE user_coupons (
    id        BIGSERIAL PRIMARY KEY,
    coupon_id BIGINT NOT NULL REFERENCES coupons (id),
    user_id   BIGINT NOT NULL,
    status    TEXT   NOT NULL DEFAULT 'AVAILABLE',
    order_id  UUID,
    used_at   TIMESTAMPTZ,
    UNIQUE (coupon_id, user_id)
);
CREATE INDEX ON user_coupons (user_id, id DESC);
CREATE TABLE orders (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL,
    status          TEXT   NOT NULL,
    reason          TEXT,
    coupon_id       BIGINT,
    total_amount    BIGINT NOT NULL,
    discount_amount BIGINT NOT NULL,
    paid_amount     BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ON orders (user_id, created_at DESC);
CREATE TABLE order_items (
    order_id   UUID    NOT NULL REFERENCES orders (id),
    product_id BIGINT  NOT NULL REFERENCES products (id),
    quantity   INTEGER NOT NULL,
    unit_price BIGINT  NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
";

/// The order as one PL/pgSQL function: checks first (products locked in id order, then the
/// holder's coupon, then the balance), writes after, so a refused order never undoes
/// anything. Returns `CONFIRMED` or the cancellation reason (the order is recorded either
/// way). The discount follows `domain::discount`.
const PROCEDURE_DDL: &str = "
CREATE FUNCTION place_order(p_order UUID, p_user BIGINT, p_coupon BIGINT,
                            p_products BIGINT[], p_quantities BIGINT[])
RETURNS TEXT LANGUAGE plpgsql AS $fn$
DECLARE
    v_prices   BIGINT[];
    v_total    BIGINT;
    v_short    BOOLEAN;
    v_kind     TEXT;
    v_value    BIGINT;
    v_discount BIGINT := 0;
    v_amount   BIGINT;
    v_balance  BIGINT;
    v_reason   TEXT;
BEGIN
    PERFORM 1 FROM products WHERE id = ANY (p_products) ORDER BY id FOR NO KEY UPDATE;
    SELECT array_agg(p.price ORDER BY i.n), sum(p.price * i.qty)::BIGINT, bool_or(p.stock < i.qty)
      INTO v_prices, v_total, v_short
      FROM unnest(p_products, p_quantities) WITH ORDINALITY AS i (pid, qty, n)
      JOIN products p ON p.id = i.pid;
    IF v_short THEN
        v_reason := 'OUT_OF_STOCK';
    ELSIF p_coupon IS NOT NULL THEN
        SELECT c.discount_type, c.discount_value INTO v_kind, v_value
          FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.coupon_id = p_coupon AND uc.user_id = p_user AND uc.status = 'AVAILABLE'
           AND (c.expires_at IS NULL OR c.expires_at > now()) AND c.min_order_amount <= v_total
           FOR NO KEY UPDATE OF uc;
        IF NOT FOUND THEN
            v_reason := 'COUPON_INVALID';
        ELSE
            v_discount := CASE v_kind WHEN 'PERCENT' THEN (v_total::NUMERIC * v_value / 100)::BIGINT
                                      ELSE v_value END;
            v_discount := least(greatest(v_discount, 0), greatest(v_total, 0));
        END IF;
    END IF;
    v_amount := v_total - v_discount;
    IF v_reason IS NULL THEN
        SELECT balance INTO v_balance FROM balances WHERE user_id = p_user FOR NO KEY UPDATE;
        IF v_balance IS NULL OR v_balance < v_amount THEN
            v_reason := 'INSUFFICIENT_BALANCE';
        END IF;
    END IF;
    IF v_reason IS NOT NULL THEN
        INSERT INTO orders (id, user_id, status, reason, coupon_id, total_amount, discount_amount, paid_amount)
        VALUES (p_order, p_user, 'CANCELLED', v_reason, p_coupon, v_total, 0, 0);
    ELSE
        UPDATE products p SET stock = p.stock - i.qty
          FROM unnest(p_products, p_quantities) AS i (pid, qty) WHERE p.id = i.pid;
        IF p_coupon IS NOT NULL THEN
            UPDATE user_coupons SET status = 'USED', order_id = p_order, used_at = now()
             WHERE coupon_id = p_coupon AND user_id = p_user;
        END IF;
        UPDATE balances SET balance = balance - v_amount, updated_at = now() WHERE user_id = p_user;
        INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id)
        VALUES (p_user, 'PAYMENT', v_amount, v_balance - v_amount, p_order);
        INSERT INTO orders (id, user_id, status, reason, coupon_id, total_amount, discount_amount, paid_amount)
        VALUES (p_order, p_user, 'CONFIRMED', NULL, p_coupon, v_total, v_discount, v_amount);
    END IF;
    INSERT INTO order_items (order_id, product_id, quantity, unit_price)
    SELECT p_order, i.pid, i.qty, i.price
      FROM unnest(p_products, p_quantities, v_prices) AS i (pid, qty, price);
    RETURN coalesce(v_reason, 'CONFIRMED');
END
$fn$;
";

/// How one baseline order ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Confirmed,
    Cancelled(&'static str),
}

#[derive(Default)]
struct Tally {
    latency: Latency,
    confirmed: u64,
    cancelled: BTreeMap<String, u64>,
    errors: u64,
}

/// Runs the baseline of `kind` over `plan` with `concurrency` connections to `database_url`.
pub async fn run(
    database_url: &str,
    kind: Baseline,
    plan: Arc<Plan>,
    concurrency: usize,
    bar: ProgressBar,
    meter: &Meter,
) -> anyhow::Result<BaselineReport> {
    let scratch = Scratch::create(database_url, "orderflow_bench_sync")
        .await
        .context("the baseline's schema")?;
    let result = run_in(database_url, &scratch.name, kind, plan, concurrency, bar, meter).await;
    scratch.drop_after(result).await
}

async fn run_in(
    database_url: &str,
    schema: &str,
    kind: Baseline,
    plan: Arc<Plan>,
    concurrency: usize,
    bar: ProgressBar,
    meter: &Meter,
) -> anyhow::Result<BaselineReport> {
    let options = orderflow_shared::db::primary_options(database_url)
        .await
        .context("connecting to DATABASE_URL for the baseline")?
        .options([("search_path", schema)]);
    // No check as a connection comes out of the pool (sqlx's default pings it, a round trip
    // per order that the system's own pool does not pay either: the monolith gets its best).
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency).unwrap_or(64).max(1))
        .min_connections(u32::try_from(concurrency).unwrap_or(64).max(1))
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .context("opening the baseline pool")?;
    load(&pool, &plan).await.context("loading the baseline data")?;
    if kind == Baseline::Procedure {
        sqlx::raw_sql(PROCEDURE_DDL)
            .execute(&pool)
            .await
            .context("creating the baseline's order function")?;
    }

    let n = plan.orders.len();
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    meter.settle().await;
    let start_mark = meter.mark().await;
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.min(n.max(1)))
        .map(|_| {
            let (pool, plan, next, tally, bar) = (pool.clone(), plan.clone(), next.clone(), tally.clone(), bar.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t = Instant::now();
                    let ended = match kind {
                        Baseline::Sync => place(&pool, &plan, i).await,
                        Baseline::Procedure => call(&pool, &plan, i).await,
                    };
                    let took = t.elapsed();
                    let mut tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match ended {
                        Ok(Ended::Confirmed) => {
                            tally.latency.record(took);
                            tally.confirmed += 1;
                        }
                        Ok(Ended::Cancelled(reason)) => {
                            tally.latency.record(took);
                            *tally.cancelled.entry(reason.to_owned()).or_default() += 1;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "baseline order failed");
                            tally.errors += 1;
                        }
                    }
                    bar.inc(1);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let duration = started.elapsed();
    let mut end_mark = meter.mark().await;
    meter.settle_work(&mut end_mark).await;
    bar.finish_and_clear();
    pool.close().await;

    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let cancelled: u64 = tally.cancelled.values().sum();
    let p = tally.latency.summary();
    let r3 = |x: f64| (x * 1_000.0).round() / 1_000.0;
    let costs = meter.costs(&start_mark, &end_mark, tally.confirmed + cancelled, "completed");
    Ok(BaselineReport {
        baseline_kind: kind.name(),
        baseline_concurrency: concurrency,
        baseline_orders: n as u64,
        baseline_confirmed: tally.confirmed,
        baseline_cancelled: cancelled,
        baseline_cancelled_by_reason: tally.cancelled,
        baseline_errors: tally.errors,
        baseline_duration_s: r3(duration.as_secs_f64()),
        baseline_completed_per_s: r3(per_second(tally.confirmed + cancelled, duration)),
        baseline_p50_ms: r3(p.p50_ms),
        baseline_p95_ms: r3(p.p95_ms),
        baseline_p99_ms: r3(p.p99_ms),
        baseline_max_ms: r3(p.max_ms),
        baseline_cpu: costs.cpu,
        baseline_work: costs.work,
        baseline_pg_waits: costs.pg_waits,
        ratio: 0.0,
        accept_ratio: 0.0,
    })
}

/// Ids in the baseline schema: products, users and coupons are numbered from 1 by index.
fn id(index: usize) -> i64 {
    index as i64 + 1
}

/// The same products, balances (what the charges added up to) and issued coupons as the
/// pipeline run had.
async fn load(pool: &PgPool, plan: &Plan) -> anyhow::Result<()> {
    sqlx::raw_sql(SCHEMA_DDL).execute(pool).await?;
    let ids: Vec<i64> = (0..plan.products.len()).map(id).collect();
    let prices: Vec<i64> = plan.products.iter().map(|p| p.price).collect();
    let stocks: Vec<i64> = plan.products.iter().map(|p| p.stock).collect();
    sqlx::query(
        "INSERT INTO products (id, price, stock) SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[])",
    )
    .bind(&ids)
    .bind(&prices)
    .bind(&stocks)
    .execute(pool)
    .await?;
    let (users, balances): (Vec<i64>, Vec<i64>) = plan
        .funding
        .iter()
        .enumerate()
        .map(|(u, &f)| (id(u), plan::charges(f).iter().sum::<i64>()))
        .unzip();
    sqlx::query("INSERT INTO balances (user_id, balance) SELECT * FROM UNNEST($1::bigint[], $2::bigint[])")
        .bind(&users)
        .bind(&balances)
        .execute(pool)
        .await?;
    let coupon_ids: Vec<i64> = (0..plan.coupons.len()).map(id).collect();
    let quantities: Vec<i32> = plan
        .coupons
        .iter()
        .map(|h| i32::try_from(h.len()).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO coupons (id, discount_type, discount_value, quantity, issued)
         SELECT id, 'FIXED', $3, q, q FROM UNNEST($1::bigint[], $2::int[]) AS t(id, q)",
    )
    .bind(&coupon_ids)
    .bind(&quantities)
    .bind(COUPON_DISCOUNT)
    .execute(pool)
    .await?;
    let (holder_coupons, holders): (Vec<i64>, Vec<i64>) = plan
        .coupons
        .iter()
        .enumerate()
        .flat_map(|(k, hs)| hs.iter().map(move |&u| (id(k), id(u))))
        .unzip();
    sqlx::query("INSERT INTO user_coupons (coupon_id, user_id) SELECT * FROM UNNEST($1::bigint[], $2::bigint[])")
        .bind(&holder_coupons)
        .bind(&holders)
        .execute(pool)
        .await?;
    sqlx::raw_sql("ANALYZE products, balances, coupons, user_coupons")
        .execute(pool)
        .await?;
    Ok(())
}

/// One order in one transaction. A check that fails after stock was taken rolls back and
/// records the cancelled order in a second, short transaction.
async fn place(pool: &PgPool, plan: &Plan, i: usize) -> anyhow::Result<Ended> {
    let o = &plan.orders[i];
    let user_id = id(o.user);
    let coupon_id = o.coupon.map(id);
    let product_ids = vec![id(o.product)];
    let quantities = vec![i64::from(o.quantity)];
    let order_id = Uuid::now_v7();

    let mut tx = pool.begin().await?;
    // Lock the products in id order (no deadlocks) and check every line first.
    let rows: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT id, price, stock FROM products WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(&product_ids)
            .fetch_all(&mut *tx)
            .await?;
    let mut prices = Vec::with_capacity(product_ids.len());
    let mut total = 0i64;
    let mut short = false;
    for (pid, qty) in product_ids.iter().zip(&quantities) {
        let (_, price, stock) = rows
            .iter()
            .find(|r| r.0 == *pid)
            .context("a planned product is missing")?;
        prices.push(*price);
        total += price * qty;
        short |= stock < qty;
    }
    let order = OrderRow {
        id: order_id,
        user_id,
        coupon_id,
        total,
        product_ids: &product_ids,
        quantities: &quantities,
        prices: &prices,
    };
    if short {
        order.insert(&mut tx, "CANCELLED", Some("OUT_OF_STOCK"), 0, 0).await?;
        tx.commit().await?;
        return Ok(Ended::Cancelled("OUT_OF_STOCK"));
    }
    sqlx::query(
        "UPDATE products p SET stock = p.stock - i.qty
         FROM UNNEST($1::bigint[], $2::bigint[]) AS i(pid, qty) WHERE p.id = i.pid",
    )
    .bind(&product_ids)
    .bind(&quantities)
    .execute(&mut *tx)
    .await?;

    let mut discount = 0;
    if let Some(coupon_id) = coupon_id {
        let taken: Option<(String, i64)> = sqlx::query_as(
            "UPDATE user_coupons uc SET status = 'USED', order_id = $3, used_at = now()
             FROM coupons c
             WHERE c.id = uc.coupon_id AND uc.coupon_id = $1 AND uc.user_id = $2 AND uc.status = 'AVAILABLE'
               AND (c.expires_at IS NULL OR c.expires_at > now()) AND c.min_order_amount <= $4
             RETURNING c.discount_type, c.discount_value",
        )
        .bind(coupon_id)
        .bind(user_id)
        .bind(order_id)
        .bind(total)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((kind, value)) = taken else {
            tx.rollback().await?;
            return order.cancel(pool, "COUPON_INVALID").await;
        };
        let kind = DiscountType::parse(&kind).context("unknown discount type")?;
        discount = domain::discount(kind, value, total);
    }

    let amount = total - discount;
    let balance: Option<i64> = sqlx::query_scalar(
        "UPDATE balances SET balance = balance - $2, updated_at = now()
         WHERE user_id = $1 AND balance >= $2 RETURNING balance",
    )
    .bind(user_id)
    .bind(amount)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(balance) = balance else {
        tx.rollback().await?;
        return order.cancel(pool, "INSUFFICIENT_BALANCE").await;
    };
    sqlx::query("INSERT INTO balance_ledger (user_id, kind, amount, balance_after, order_id) VALUES ($1, 'PAYMENT', $2, $3, $4)")
        .bind(user_id)
        .bind(amount)
        .bind(balance)
        .bind(order_id)
        .execute(&mut *tx)
        .await?;
    order.insert(&mut tx, "CONFIRMED", None, discount, amount).await?;
    tx.commit().await?;
    Ok(Ended::Confirmed)
}

/// One order as one call of `place_order` (autocommit: the call is its transaction).
async fn call(pool: &PgPool, plan: &Plan, i: usize) -> anyhow::Result<Ended> {
    let o = &plan.orders[i];
    let ended: String = sqlx::query_scalar("SELECT place_order($1, $2, $3, $4, $5)")
        .bind(Uuid::now_v7())
        .bind(id(o.user))
        .bind(o.coupon.map(id))
        .bind(vec![id(o.product)])
        .bind(vec![i64::from(o.quantity)])
        .fetch_one(pool)
        .await?;
    Ok(match ended.as_str() {
        "CONFIRMED" => Ended::Confirmed,
        "OUT_OF_STOCK" => Ended::Cancelled("OUT_OF_STOCK"),
        "COUPON_INVALID" => Ended::Cancelled("COUPON_INVALID"),
        "INSUFFICIENT_BALANCE" => Ended::Cancelled("INSUFFICIENT_BALANCE"),
        other => anyhow::bail!("place_order returned {other:?}"),
    })
}

struct OrderRow<'a> {
    id: Uuid,
    user_id: i64,
    coupon_id: Option<i64>,
    total: i64,
    product_ids: &'a [i64],
    quantities: &'a [i64],
    prices: &'a [i64],
}

impl OrderRow<'_> {
    async fn insert(
        &self,
        conn: &mut PgConnection,
        status: &str,
        reason: Option<&str>,
        discount: i64,
        paid: i64,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO orders (id, user_id, status, reason, coupon_id, total_amount, discount_amount, paid_amount)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(self.id)
        .bind(self.user_id)
        .bind(status)
        .bind(reason)
        .bind(self.coupon_id)
        .bind(self.total)
        .bind(discount)
        .bind(paid)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price)
             SELECT $1, pid, qty, price FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[]) AS t(pid, qty, price)",
        )
        .bind(self.id)
        .bind(self.product_ids)
        .bind(self.quantities)
        .bind(self.prices)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records the order as cancelled in a transaction of its own.
    async fn cancel(&self, pool: &PgPool, reason: &'static str) -> anyhow::Result<Ended> {
        let mut tx = pool.begin().await?;
        self.insert(&mut tx, "CANCELLED", Some(reason), 0, 0).await?;
        tx.commit().await?;
        Ok(Ended::Cancelled(reason))
    }
}
