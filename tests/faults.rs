//! The fault suite: the whole system as separate processes (API and one process per
//! worker, as in production) under 5,000 orders, with one fault injected per scenario. After
//! the load, the system must come to rest with every order terminal, the audit clean, each
//! confirmed order's event on the data-platform queue exactly once after dedup, and no order
//! counted twice.
//!
//! Scenarios 1-6 run on the default RabbitMQ node and restart the shared PostgreSQL and
//! RabbitMQ, so they are `#[ignore]`d in the parallel run and executed one at a time afterwards
//! by `scripts/test.sh`: `cargo nextest run --test faults --run-ignored only --test-threads 1
//! -E 'not test(/_cluster_/)'`. Scenarios 7-10 (`fault_N_cluster_...`) run on the tests'
//! three-node cluster (`common::cluster`, which scripts/test.sh starts once for all of them)
//! and touch only its nodes: `-E 'test(/_cluster_/)'`.
//! docs/RELIABILITY.md records each scenario and its last numbers.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    cluster::{self, Cluster},
    pg_ha::{self, Formation},
};
use orderflow_shared::messaging::topology;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const ORDERS: usize = 5_000;
const CONCURRENCY: usize = 16;
const SETTLE: Duration = Duration::from_secs(240);
const WORKERS: &[&str] = &["relay", "stock", "coupon", "payment", "order", "recovery"];

/// Where a system runs: the broker (the default node, or the tests' three-node cluster,
/// `common::cluster`, maybe behind proxies) and the database (the default PostgreSQL, or the
/// tests' highly available one, `common::pg_ha`).
#[derive(Debug, Clone)]
struct Target {
    /// Each node as the system's processes reach it (their AMQP_URL lists them all).
    nodes: Vec<String>,
    /// Each node as the test itself reaches it (settling, draining), never through a proxy.
    direct: Vec<String>,
    /// Management APIs, tried in turn (a node may be down).
    management: Vec<String>,
    /// The highly available PostgreSQL's DATABASE_URL (database `orderflow`, replaced by the
    /// system's own), or None for the default PostgreSQL.
    pg_ha: Option<String>,
}

impl Target {
    fn default_node() -> Self {
        let node = "amqp://guest:guest@127.0.0.1:5672".to_owned();
        Self {
            nodes: vec![node.clone()],
            direct: vec![node],
            management: vec![common::RABBIT_MGMT.to_owned()],
            pg_ha: None,
        }
    }

    fn cluster() -> Self {
        let nodes: Vec<String> = cluster::NODES.iter().map(|&i| cluster::amqp_node(i)).collect();
        Self {
            nodes: nodes.clone(),
            direct: nodes,
            management: cluster::NODES.iter().map(|&i| cluster::management(i)).collect(),
            pg_ha: None,
        }
    }

    /// The same broker, with the system's database on the highly available PostgreSQL.
    fn on_pg_ha(self, formation: &Formation) -> Self {
        Self {
            pg_ha: Some(formation.url.clone()),
            ..self
        }
    }

    fn url(nodes: &[String], vhost: &str) -> String {
        nodes
            .iter()
            .map(|n| format!("{n}/{vhost}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The system under test: its own database and vhost, one OS process per component.
struct System {
    name: &'static str,
    db_name: String,
    vhost: String,
    target: Target,
    env: Vec<(String, String)>,
    base: String,
    procs: Mutex<BTreeMap<String, Child>>,
    restarts: AtomicUsize,
    starts: AtomicUsize,
    log_dir: PathBuf,
    pool: sqlx::PgPool,
    keys: orderflow_shared::auth::Keys,
    http: reqwest::Client,
}

impl System {
    async fn start(name: &'static str, extra_env: &[(&str, &str)], target: Target) -> Arc<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("orderflow_fault_{}", &id[..12]);
        let vhost = format!("orderflow-fault-{}", &id[..12]);
        let database_url = match &target.pg_ha {
            // The processes create it on the primary (from an empty server, as in production).
            Some(url) => url.replacen("/orderflow?", &format!("/{db_name}?"), 1),
            None => {
                common::create_database(&db_name).await;
                format!("{}/{db_name}", common::PG_BASE)
            }
        };
        common::create_vhost_at(&target.management[0], &vhost).await;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database_url.clone()),
            ("AMQP_URL".into(), Target::url(&target.nodes, &vhost)),
            ("HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("JWT_SECRET".into(), common::JWT_SECRET.into()),
            ("DB_POOL_SIZE".into(), "6".into()),
            ("SWEEP_INTERVAL".into(), "1s".into()),
            ("ORDER_TIMEOUT".into(), "60s".into()),
            ("RUST_LOG".into(), "info,sqlx=warn,lapin=warn".into()),
        ];
        for (k, v) in extra_env {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-logs").join(name);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).unwrap();
        let sys = Arc::new(Self {
            name,
            db_name,
            vhost,
            target,
            env,
            base: format!("http://127.0.0.1:{port}"),
            procs: Mutex::new(BTreeMap::new()),
            restarts: AtomicUsize::new(0),
            starts: AtomicUsize::new(0),
            log_dir,
            pool: orderflow_shared::db::pool(&database_url, 4).unwrap(),
            keys: orderflow_shared::auth::Keys::new(common::JWT_SECRET),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(CONCURRENCY)
                .build()
                .unwrap(),
        });
        {
            let mut procs = sys.procs.lock().await;
            procs.insert("api".into(), sys.spawn("api"));
            for w in WORKERS {
                procs.insert((*w).into(), sys.spawn(w));
            }
        }
        sys
    }

    fn spawn(&self, component: &str) -> Child {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        let log = File::create(self.log_dir.join(format!("{n:03}-{component}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
        if component == "api" {
            cmd.arg("api");
        } else {
            cmd.args(["worker", component]);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "API did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restarts whatever exited (a process manager's job), until `stop` is set.
    async fn supervise(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            {
                let mut procs = self.procs.lock().await;
                let exited: Vec<String> = procs
                    .iter_mut()
                    .filter_map(|(k, c)| c.try_wait().ok().flatten().map(|_| k.clone()))
                    .collect();
                for name in exited {
                    self.restarts.fetch_add(1, Ordering::SeqCst);
                    procs.insert(name.clone(), self.spawn(&name));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn signal(&self, component: &str, signal: &str) {
        let pid = self.procs.lock().await[component].id();
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {component}");
    }

    async fn stop(&self) {
        let mut procs = self.procs.lock().await;
        for child in procs.values() {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for child in procs.values_mut() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pool.close().await;
        self.management(
            reqwest::Method::DELETE,
            &format!("/api/vhosts/{}", common::enc(&self.vhost)),
        )
        .await;
        match &self.target.pg_ha {
            Some(url) => {
                let mut admin = orderflow_shared::db::connect(&url.replacen("/orderflow?", "/postgres?", 1))
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    orderflow_shared::db::quote_ident(&self.db_name)
                )))
                .execute(&mut admin)
                .await
                .unwrap();
            }
            None => common::drop_database(&self.db_name).await,
        }
    }

    /// The AMQP_URL the test's own connections use (every node, directly).
    fn amqp_url(&self) -> String {
        Target::url(&self.target.direct, &self.vhost)
    }

    /// A management API call answered by the first live node; None when none answers.
    async fn management(&self, method: reqwest::Method, path: &str) -> Option<Value> {
        // Deleting a vhost with quorum queues on three nodes may take a while.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        for base in &self.target.management {
            let res = http
                .request(method.clone(), format!("{base}{path}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
            if let Ok(res) = res
                && res.status().is_success()
            {
                return Some(res.json().await.unwrap_or(Value::Null));
            }
        }
        None
    }

    /// How many orders are terminal now.
    async fn terminal(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status IN ('CONFIRMED', 'CANCELLED')")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Waits until `more` orders beyond those terminal now (or all `ORDERS`) have become
    /// terminal: the pipeline makes progress (asserted: within 120 s).
    async fn progress(&self, more: i64) {
        let target = (self.terminal().await + more).min(ORDERS as i64);
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.terminal().await < target {
            assert!(
                Instant::now() < deadline,
                "{more} more orders not terminal within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// A failed scenario must not leave its processes running (they would hold connections).
impl Drop for System {
    fn drop(&mut self) {
        if let Ok(mut procs) = self.procs.try_lock() {
            for child in procs.values_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A small deterministic generator (the same load every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const RICH_USERS: i64 = 240;
const POOR_USERS: i64 = 60;

/// Products, balances and coupons, written straight to the database (with the ledger rows
/// and issue counts the audit expects) so setup is fast and the load is all orders.
async fn seed(sys: &System) -> (Vec<i64>, i64, i64) {
    let mut products = Vec::new();
    for i in 0..20 {
        let (price, stock) = if i < 15 {
            (1_000 + 250 * i, 100_000)
        } else {
            (3_000, 15)
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO products (name, price, stock, initial_stock) VALUES ($1, $2, $3, $3) RETURNING id",
        )
        .bind(format!("product-{i}"))
        .bind(price)
        .bind(stock)
        .fetch_one(&sys.pool)
        .await
        .unwrap();
        products.push(id);
    }
    sqlx::query(
        "WITH u AS (SELECT g AS user_id, CASE WHEN g <= $1 THEN 5000000 ELSE 1000 END AS amount
                    FROM generate_series(1, $1 + $2) g),
              b AS (INSERT INTO balances (user_id, balance) SELECT user_id, amount FROM u)
         INSERT INTO balance_ledger (user_id, kind, amount, balance_after) SELECT user_id, 'CHARGE', amount, amount FROM u",
    )
    .bind(RICH_USERS)
    .bind(POOR_USERS)
    .execute(&sys.pool)
    .await
    .unwrap();
    let users = RICH_USERS + POOR_USERS;
    let good: i64 = sqlx::query_scalar(
        "INSERT INTO coupons (name, discount_type, discount_value, quantity, issued) VALUES ('good', 'PERCENT', 10, $1, $1) RETURNING id",
    )
    .bind(users as i32)
    .fetch_one(&sys.pool)
    .await
    .unwrap();
    let picky: i64 = sqlx::query_scalar(
        "INSERT INTO coupons (name, discount_type, discount_value, quantity, issued, min_order_amount)
         VALUES ('picky', 'FIXED', 500, $1, $1, 100000000) RETURNING id",
    )
    .bind(users as i32)
    .fetch_one(&sys.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO user_coupons (coupon_id, user_id) SELECT c, g FROM unnest($1::bigint[]) c, generate_series(1, $2) g")
        .bind(vec![good, picky])
        .bind(users)
        .execute(&sys.pool)
        .await
        .unwrap();
    (products, good, picky)
}

/// What the clients saw while placing the orders.
#[derive(Debug, Default)]
struct Load {
    /// Every order the API answered 202: (user, order id).
    placed: Vec<(i64, String)>,
    /// When each 202 came.
    accepted_at: Vec<Instant>,
    /// Answers 503 (the database or the API unavailable: the client retried with its key).
    unavailable: usize,
    /// Requests that got no answer at all (connection refused or cut, timeout).
    unanswered: usize,
}

impl Load {
    /// The longest time without any 202 once the first came: from the last 202 before a fault
    /// to the first one after it.
    fn stall(&self) -> Duration {
        let mut at = self.accepted_at.clone();
        at.sort();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// Submits `ORDERS` orders with `CONCURRENCY` clients, as fast as they go or, with a `rate`,
/// spread over `ORDERS / rate` seconds (the k-th order leaves no earlier than k / rate seconds
/// after the first). Like a careful client, each retries with the same Idempotency-Key on
/// errors (503 while the database restarts or fails over, refused connections, 409 while its
/// first attempt is in flight).
async fn submit(sys: &Arc<System>, products: &[i64], good: i64, picky: i64, rate: Option<u32>) -> Load {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut plan = Vec::with_capacity(ORDERS);
    for n in 0..ORDERS {
        let user = 1 + rng.below((RICH_USERS + POOR_USERS) as u64) as i64;
        let lines = 1 + rng.below(3) as usize;
        let mut chosen = HashSet::new();
        let mut items = Vec::new();
        while items.len() < lines {
            let p = products[rng.below(products.len() as u64) as usize];
            if chosen.insert(p) {
                items.push(json!({"productId": p, "quantity": 1 + rng.below(3)}));
            }
        }
        let coupon = match rng.below(20) {
            0..=3 => Some(good),
            4 => Some(picky),
            _ => None,
        };
        plan.push((
            user,
            format!("{}-{n}", sys.name),
            json!({"items": items, "couponId": coupon}),
        ));
    }
    let plan = Arc::new(Mutex::new(plan));
    let (first, taken) = (tokio::time::Instant::now(), Arc::new(AtomicUsize::new(0)));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (sys, plan, taken) = (sys.clone(), plan.clone(), taken.clone());
        clients.spawn(async move {
            let mut load = Load::default();
            loop {
                let Some((user, key, body)) = plan.lock().await.pop() else {
                    break;
                };
                if let Some(rate) = rate {
                    let k = taken.fetch_add(1, Ordering::SeqCst) as f64;
                    tokio::time::sleep_until(first + Duration::from_secs_f64(k / f64::from(rate))).await;
                }
                let token = sys.keys.issue(user, false, 3600).unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let res = sys
                        .http
                        .post(format!("{}/api/orders", sys.base))
                        .bearer_auth(&token)
                        .header("idempotency-key", &key)
                        .json(&body)
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status() == 202 => {
                            load.accepted_at.push(Instant::now());
                            let v: Value = r.json().await.unwrap();
                            load.placed.push((user, v["orderId"].as_str().unwrap().to_owned()));
                            break;
                        }
                        Ok(r) if r.status().is_client_error() && r.status() != 409 => {
                            panic!("order refused: {} {}", r.status(), r.text().await.unwrap_or_default())
                        }
                        Ok(r) if r.status().is_server_error() => {
                            assert_eq!(r.status(), 503, "never a 500: {}", r.text().await.unwrap_or_default());
                            load.unavailable += 1;
                            assert!(Instant::now() < deadline, "could not place an order within 120 s");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        _ => {
                            load.unanswered += usize::from(res.is_err());
                            assert!(Instant::now() < deadline, "could not place an order within 120 s");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            load
        });
    }
    let mut load = Load::default();
    while let Some(res) = clients.join_next().await {
        let one = res.unwrap();
        load.placed.extend(one.placed);
        load.accepted_at.extend(one.accepted_at);
        load.unavailable += one.unavailable;
        load.unanswered += one.unanswered;
    }
    load
}

/// What a scenario ended with, printed for docs/RELIABILITY.md.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct Outcome {
    orders: usize,
    by_status: BTreeMap<String, i64>,
    events_received: usize,
    events_distinct: usize,
    dead_letters: i64,
    /// Dead letters whose message ran out of deliveries (`x-first-death-reason=delivery_limit`)
    /// rather than being rejected as poison: a healthy order's message here is an order lost to
    /// redeliveries.
    redeliveries_dead_lettered: i64,
    /// Redeliveries the broker counted on the system's queues (management statistics, which
    /// lag by up to 5 s; None when no node answered).
    redelivered: Option<u64>,
    restarts: usize,
    settle_s: f64,
    /// The longest time without a 202 while the orders went in.
    stall_s: f64,
    /// Answers 503 and requests without an answer while the orders went in (each retried).
    unavailable: usize,
    unanswered: usize,
}

/// Waits for rest, then checks every promise. Panics with the details when one fails.
async fn verify(sys: &System, load: &Load, started: Instant) -> Outcome {
    let placed = &load.placed;
    let ids: HashSet<&str> = placed.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), placed.len(), "two requests produced the same order id");

    // 1. Rest: every order terminal, outbox drained, every queue empty.
    let settle_from = Instant::now();
    let deadline = settle_from + SETTLE;
    loop {
        let (open, unsent, parked): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders WHERE status NOT IN ('CONFIRMED', 'CANCELLED')),
                    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND discarded_at IS NULL),
                    (SELECT count(*) FROM orders WHERE status = 'COMPENSATION_FAILED')",
        )
        .fetch_one(&sys.pool)
        .await
        .unwrap_or((-1, -1, 0));
        assert_eq!(parked, 0, "an order is parked as COMPENSATION_FAILED");
        let depth = queue_depths(sys).await;
        if open == 0 && unsent == 0 && depth == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rest after {SETTLE:?}: {open} open orders, {unsent} unsent, {depth} queued"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settle_s = settle_from.elapsed().as_secs_f64();

    // 2. Exactly the placed orders exist (retries with a key never made a second order).
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&sys.pool)
        .await
        .unwrap();
    assert_eq!(stored as usize, placed.len(), "orders stored vs accepted");
    let ids: Vec<uuid::Uuid> = placed.iter().map(|(_, id)| id.parse().unwrap()).collect();
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(&sys.pool)
        .await
        .unwrap();
    assert_eq!(found as usize, placed.len(), "an order answered 202 is missing");

    // 3. The audit is clean (run as an operator would, before the events queue is drained).
    let audit = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("audit")
        .envs(sys.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "audit found violations:\n{}\n{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );

    // 4. Each confirmed order's event arrived, exactly once after dedup by event id.
    let confirmed: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM orders WHERE status = 'CONFIRMED'")
            .fetch_all(&sys.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    let events: Vec<Value> = common::drain(&sys.amqp_url(), topology::DATA_PLATFORM_QUEUE)
        .await
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    let mut by_order: HashMap<String, HashSet<String>> = HashMap::new();
    for e in &events {
        assert_eq!(e["type"], "order.confirmed");
        by_order
            .entry(e["orderId"].as_str().unwrap().to_owned())
            .or_default()
            .insert(e["id"].as_str().unwrap().to_owned());
    }
    let event_orders: HashSet<String> = by_order.keys().cloned().collect();
    assert_eq!(
        event_orders.difference(&confirmed).count(),
        0,
        "an event for an order that is not confirmed"
    );
    assert_eq!(
        confirmed.difference(&event_orders).count(),
        0,
        "a confirmed order without its event"
    );
    assert!(
        by_order.values().all(|ids| ids.len() == 1),
        "an order with two different event ids"
    );

    // 5. No order counted twice: the popular-products projection equals the confirmed units.
    let (projected, sold): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT sum(quantity)::bigint FROM product_sales_hourly),
                (SELECT sum(i.quantity)::bigint FROM order_items i JOIN orders o ON o.id = i.order_id WHERE o.status = 'CONFIRMED')",
    )
    .fetch_one(&sys.pool)
    .await
    .unwrap();
    assert_eq!(
        projected.unwrap_or(0),
        sold.unwrap_or(0),
        "sales projection vs confirmed units"
    );

    let by_status: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT status || coalesce('/' || reason, ''), count(*) FROM orders GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&sys.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let (dead_letters, redeliveries_dead_lettered): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE reason = 'delivery_limit') FROM dead_letters")
            .fetch_one(&sys.pool)
            .await
            .unwrap();
    let redelivered = sys
        .management(
            reqwest::Method::GET,
            &format!("/api/queues/{}", common::enc(&sys.vhost)),
        )
        .await
        .and_then(|queues| {
            queues
                .as_array()
                .map(|qs| qs.iter().filter_map(|q| q["message_stats"]["redeliver"].as_u64()).sum())
        });
    let outcome = Outcome {
        orders: placed.len(),
        by_status,
        events_received: events.len(),
        events_distinct: by_order.len(),
        dead_letters,
        redeliveries_dead_lettered,
        redelivered,
        restarts: sys.restarts.load(Ordering::SeqCst),
        settle_s,
        stall_s: load.stall().as_secs_f64(),
        unavailable: load.unavailable,
        unanswered: load.unanswered,
    };
    println!(
        "scenario {}: {outcome:?}; total {:.1}s",
        sys.name,
        started.elapsed().as_secs_f64()
    );
    outcome
}

/// Messages waiting in every queue the system consumes (and the dead-letter queue); `MAX`
/// while the broker cannot be asked.
async fn queue_depths(sys: &System) -> u64 {
    match orderflow_shared::messaging::stats::queue_stats(&sys.amqp_url()).await {
        Ok(stats) => stats
            .iter()
            .filter(|q| q.name != topology::DATA_PLATFORM_QUEUE && q.name != topology::DEADLINE_QUEUE)
            .map(|q| u64::from(q.messages))
            .sum(),
        Err(_) => u64::MAX,
    }
}

/// Runs one scenario on the default node: start, seed, load with `fault` running beside it,
/// verify, stop.
async fn scenario<F, Fut>(name: &'static str, env: &[(&str, &str)], fault: F) -> Outcome
where
    F: FnOnce(Arc<System>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    scenario_on(Target::default_node(), name, env, None, fault).await
}

/// Runs one scenario with its vhost on `target`, the orders at `rate` per second if given.
async fn scenario_on<F, Fut>(
    target: Target,
    name: &'static str,
    env: &[(&str, &str)],
    rate: Option<u32>,
    fault: F,
) -> Outcome
where
    F: FnOnce(Arc<System>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sys = System::start(name, env, target).await;
    let done = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(sys.clone().supervise(injected.clone()));
    sys.wait_ready().await;
    let (products, good, picky) = seed(&sys).await;
    let injector = tokio::spawn(fault(sys.clone(), done.clone()));
    let started = Instant::now();
    let load = submit(&sys, &products, good, picky, rate).await;
    done.store(true, Ordering::SeqCst);
    // A fault may go on after the orders are in (to land while they settle).
    injector.await.unwrap();
    injected.store(true, Ordering::SeqCst);
    supervisor.await.unwrap();
    // Anything still down comes back before settling (a process manager would do this).
    let done_again = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(sys.clone().supervise(done_again.clone()));
    let outcome = verify(&sys, &load, started).await;
    done_again.store(true, Ordering::SeqCst);
    supervisor.await.unwrap();
    sys.stop().await;
    outcome
}

fn confirmed(o: &Outcome) -> i64 {
    o.by_status.get("CONFIRMED").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_1_workers_killed_with_sigkill_and_restarted() {
    let outcome = scenario("1-kill-workers", &[], |sys, done| async move {
        let mut rng = Rng(42);
        // At least three kills, however fast the orders go in: the later ones land while
        // they settle.
        let mut kills = 0;
        while !done.load(Ordering::SeqCst) || kills < 3 {
            kills += 1;
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let victim = WORKERS[rng.below(WORKERS.len() as u64) as usize];
            sys.signal(victim, "-KILL").await; // the supervisor restarts it
        }
    })
    .await;
    assert!(outcome.restarts >= 3, "the fault was injected: {outcome:?}");
    assert!(confirmed(&outcome) > 0);
}

fn service(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd} {args:?} failed");
}

fn pg_cluster(action: &str, extra: &[&str]) {
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let version = version.to_string_lossy().into_owned();
    let mut args = vec!["--skip-systemctl-redirect", version.as_str(), "main", action];
    args.extend_from_slice(extra);
    service("pg_ctlcluster", &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_2_rabbitmq_restarted_mid_load() {
    let outcome = scenario("2-restart-rabbitmq", &[], |_sys, _done| async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Stop and start the node's RabbitMQ application: every connection drops, quorum
        // queues recover from disk.
        tokio::task::spawn_blocking(|| {
            service("rabbitmqctl", &["stop_app"]);
            std::thread::sleep(Duration::from_secs(3));
            service("rabbitmqctl", &["start_app"]);
            service("rabbitmqctl", &["await_startup"]);
        })
        .await
        .unwrap();
    })
    .await;
    assert!(confirmed(&outcome) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_3_postgresql_restarted_mid_load() {
    let outcome = scenario("3-restart-postgresql", &[], |_sys, _done| async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Immediate mode: no checkpoint, every session killed mid-transaction.
        tokio::task::spawn_blocking(|| {
            pg_cluster("stop", &["-m", "immediate"]);
            std::thread::sleep(Duration::from_secs(2));
            pg_cluster("start", &[]);
        })
        .await
        .unwrap();
    })
    .await;
    assert!(confirmed(&outcome) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_4_poison_in_every_work_queue() {
    // Published straight into each queue (default exchange): poison on the public events
    // exchange would reach the data platform's queue too, which is not ours to poison.
    const POISONED: &[(&str, &str)] = &[
        ("orderflow.stock", "stock.reserve"),
        ("orderflow.coupon", "coupon.apply"),
        ("orderflow.payment", "payment.charge"),
        ("orderflow.order", "order.confirm"),
        ("orderflow.recovery.expired", "order.deadline"),
    ];
    let outcome = scenario("4-poison", &[], |sys, _done| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let conn = lapin::Connection::connect(&sys.amqp_url(), Default::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for (queue, kind) in POISONED {
            let missing = json!({"id": uuid::Uuid::now_v7(), "type": kind,
                                 "occurredAt": "2026-11-21T10:00:00.000Z", "orderId": uuid::Uuid::now_v7(), "data": {}});
            let unknown = json!({"id": uuid::Uuid::now_v7(), "type": "order.explode",
                                 "occurredAt": "2026-11-21T10:00:00.000Z", "orderId": uuid::Uuid::now_v7(), "data": {}});
            for body in [b"{\"truncated".to_vec(), unknown.to_string().into_bytes(), missing.to_string().into_bytes()] {
                let props = lapin::BasicProperties::default().with_message_id(uuid::Uuid::now_v7().to_string().into());
                ch.basic_publish("".into(), (*queue).into(), Default::default(), &body, props)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    })
    .await;
    // Every poison message was dead-lettered and recorded (and nothing else was).
    assert_eq!(outcome.dead_letters, (POISONED.len() * 3) as i64, "{outcome:?}");
    assert!(confirmed(&outcome) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_5_worker_paused_past_the_deadline() {
    let outcome = scenario("5-pause-payment", &[("ORDER_TIMEOUT", "3s")], |sys, _done| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        sys.signal("payment", "-STOP").await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        sys.signal("payment", "-CONT").await;
    })
    .await;
    assert!(
        outcome.by_status.get("CANCELLED/TIMEOUT").copied().unwrap_or(0) > 0,
        "{outcome:?}"
    );
    assert!(confirmed(&outcome) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fault suite: run alone, after the parallel tests (scripts/test.sh)"]
async fn fault_6_relay_killed_between_confirm_and_mark() {
    // The relay aborts its process after every 7th confirmed batch, before marking it sent;
    // the restarted relay publishes that batch again.
    let outcome = scenario(
        "6-relay-crash",
        &[("ORDERFLOW_FAULT_RELAY_ABORT_EVERY", "7")],
        |_sys, _done| async {},
    )
    .await;
    assert!(
        outcome.restarts >= 2,
        "the relay crashed and was restarted: {outcome:?}"
    );
    assert!(outcome.events_received >= outcome.events_distinct);
    assert!(confirmed(&outcome) > 0);
}

// --- The same faults at cluster scale ------------------------------------------------------------
// The system on the tests' three-node RabbitMQ cluster (`common::cluster`, started through
// scripts/cluster.sh), every process given the three addresses. scripts/test.sh starts the
// cluster once for all of these (and tests/cluster.rs) and stops it afterwards; each scenario
// leaves the three nodes running, so the next one starts on a whole cluster.

/// Runs a scenario on the cluster (started here if it is down), then checks what every cluster
/// scenario promises besides the usual: no message dead-lettered (there is no poison here, so
/// any dead letter is a healthy order lost to redeliveries) and all three nodes back.
async fn cluster_scenario<F, Fut>(
    target: Target,
    name: &'static str,
    env: &[(&str, &str)],
    rate: Option<u32>,
    fault: F,
) -> Outcome
where
    F: FnOnce(Arc<System>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cluster = tokio::task::spawn_blocking(Cluster::ensure).await.unwrap();
    let outcome = scenario_on(target, name, env, rate, fault).await;
    assert_eq!(outcome.dead_letters, 0, "healthy orders dead-lettered: {outcome:?}");
    assert_eq!(
        outcome.by_status.get("CANCELLED/PROCESSING_FAILED"),
        None,
        "{outcome:?}"
    );
    assert!(confirmed(&outcome) > 0, "{outcome:?}");
    assert_eq!(running_nodes().await, 3, "the scenario left a node down");
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
    outcome
}

/// Each node's (1..=3) work queues it leads in the system's vhost.
async fn work_queue_leaders(sys: &System) -> BTreeMap<u16, Vec<String>> {
    let queues = sys
        .management(
            reqwest::Method::GET,
            &format!("/api/queues/{}", common::enc(&sys.vhost)),
        )
        .await
        .expect("no management API answered");
    let mut by_node: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for q in queues.as_array().unwrap() {
        let name = q["name"].as_str().unwrap();
        let work = topology::QUEUES
            .iter()
            .any(|spec| spec.name == name && spec.kind == topology::QueueKind::Work);
        if let (true, Some(node)) = (work, q["leader"].as_str().and_then(cluster::index_of)) {
            by_node.entry(node).or_default().push(name.to_owned());
        }
    }
    by_node
}

/// The node leading `queue` in the system's vhost.
async fn leader_of(sys: &System, queue: &str) -> u16 {
    let q = sys
        .management(
            reqwest::Method::GET,
            &format!("/api/queues/{}/{}", common::enc(&sys.vhost), common::enc(queue)),
        )
        .await
        .expect("no management API answered");
    q["leader"].as_str().and_then(cluster::index_of).unwrap()
}

/// `cluster.sh <command> <node>` off the async threads; returns how long it took.
async fn cluster_sh(command: &'static str, node: u16) -> Duration {
    let started = Instant::now();
    tokio::task::spawn_blocking(move || cluster::script(&[command, &node.to_string()]))
        .await
        .unwrap();
    started.elapsed()
}

/// How many nodes of the cluster are running, as the first management API to answer says.
async fn running_nodes() -> usize {
    let http = reqwest::Client::new();
    for i in cluster::NODES {
        let res = http
            .get(format!("{}/api/nodes", cluster::management(i)))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
        if let Ok(res) = res
            && let Ok(nodes) = res.json::<Value>().await
            && let Some(nodes) = nodes.as_array()
        {
            return nodes.iter().filter(|n| n["running"] == true).count();
        }
    }
    0
}

fn kill_node(i: u16) {
    let pid = cluster::pid(i).expect("node's pid file");
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 node {i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "cluster fault suite: needs the three-node cluster (scripts/test.sh runs it)"]
async fn fault_7_cluster_work_queue_leader_killed() {
    cluster_scenario(
        Target::cluster(),
        "7-cluster-kill-leader",
        &[],
        None,
        |sys, _done| async move {
            sys.progress(300).await;
            // The node leading most work queues dies at once: the queues it leads elect new
            // leaders on the other two, and the processes connected to it reconnect there.
            let leaders = work_queue_leaders(&sys).await;
            // (Between nodes leading as many, the one leading the first step's queue.)
            let (&victim, queues) = leaders
                .iter()
                .max_by_key(|(_, qs)| (qs.len(), qs.iter().any(|q| q == topology::STOCK_QUEUE)))
                .unwrap();
            println!("work queue leaders {leaders:?}: kill -9 node {victim}, leader of {queues:?}");
            kill_node(victim);
            // Orders go on on two nodes, then the node comes back and rejoins.
            sys.progress(500).await;
            let back = cluster_sh("start-node", victim).await;
            println!("node {victim} back in {back:?}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "cluster fault suite: needs the three-node cluster (scripts/test.sh runs it)"]
async fn fault_8_cluster_node_stopped_past_the_deadline() {
    // A node away for longer than ORDER_TIMEOUT: deadline messages expire while it is gone
    // (the one it led among them elects a new leader, which expires and dead-letters them),
    // and when it returns its replicas catch up instead of bringing anything back twice.
    const TIMEOUT: Duration = Duration::from_secs(10);
    cluster_scenario(
        Target::cluster(),
        "8-cluster-stop-node",
        &[("ORDER_TIMEOUT", "10s")],
        // Paced (~50 s of orders), so that the pipeline has no backlog of its own: an order
        // that times out here timed out because of the node.
        Some(100),
        |sys, _done| async move {
            sys.progress(300).await;
            let victim = leader_of(&sys, topology::DEADLINE_QUEUE).await;
            let took = cluster_sh("stop-node", victim).await;
            let stopped = Instant::now();
            println!(
                "node {victim} (leader of {}) stopped in {took:?}",
                topology::DEADLINE_QUEUE
            );
            sys.progress(300).await;
            // Down for longer than ORDER_TIMEOUT, by definition of the scenario.
            tokio::time::sleep((TIMEOUT + Duration::from_secs(5)).saturating_sub(stopped.elapsed())).await;
            let back = cluster_sh("start-node", victim).await;
            println!(
                "node {victim} down {:?}, back in {back:?}",
                stopped.elapsed().saturating_sub(back)
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "cluster fault suite: needs the three-node cluster (scripts/test.sh runs it)"]
async fn fault_9_cluster_rolling_restart() {
    // The orders spread over ~110 s, so that all three restarts happen while they flow.
    let rate = Some(45);
    cluster_scenario(
        Target::cluster(),
        "9-cluster-rolling-restart",
        &[],
        rate,
        |sys, _done| async move {
            // One node at a time, as an upgrade would: stop it once no quorum queue needs it for
            // its majority (cluster.sh stop-node waits for that), start it, see orders progress.
            for node in cluster::NODES {
                sys.progress(250).await;
                let stop = cluster_sh("stop-node", node).await;
                let start = cluster_sh("start-node", node).await;
                println!("rolling restart: node {node}: stopped in {stop:?}, back in {start:?}");
            }
        },
    )
    .await;
}

/// A TCP proxy in front of one broker node: the system's processes reach the node through it,
/// and [`cut`](Self::cut) resets every connection it carries at once (RST both ways), as a
/// failing link or a restarted load balancer would.
struct Proxy {
    port: u16,
    live: AtomicUsize,
    cut: std::sync::Mutex<tokio_util::sync::CancellationToken>,
}

impl Proxy {
    async fn start(target: u16) -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Self {
            port: listener.local_addr().unwrap().port(),
            live: AtomicUsize::new(0),
            cut: Default::default(),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (p, cut) = (p.clone(), p.cut.lock().unwrap().clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    p.live.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                    }
                    p.live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        proxy
    }

    fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Resets every connection open now; returns how many.
    fn cut(&self) -> usize {
        let live = self.connections();
        std::mem::take(&mut *self.cut.lock().unwrap()).cancel();
        live
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "cluster fault suite: needs the three-node cluster (scripts/test.sh runs it)"]
async fn fault_10_cluster_connections_cut_with_deliveries_unacked() {
    // The processes reach each node through a proxy. While orders flow, the connections to
    // one node (the one carrying the most) are reset every 2 s, a link that keeps failing:
    // the consumers on them lose their channels with deliveries unacked, which a quorum
    // queue returns (RabbitMQ 3.10 counts that as a delivery, x-delivery-count + 1), and the
    // processes reconnect, on another node or on the same one. No order may be dead-lettered
    // for it (cluster_scenario checks).
    let mut proxies = Vec::new();
    for i in cluster::NODES {
        proxies.push(Proxy::start(cluster::amqp_port(i)).await);
    }
    let mut target = Target::cluster();
    target.nodes = proxies
        .iter()
        .map(|p| format!("amqp://guest:guest@127.0.0.1:{}", p.port))
        .collect();
    let cuts = Arc::new(AtomicUsize::new(0));
    let counted = cuts.clone();
    cluster_scenario(
        target,
        "10-cluster-cut-connections",
        &[],
        None,
        |sys, done| async move {
            sys.progress(200).await;
            let mut cut_connections = 0;
            while !done.load(Ordering::SeqCst) || counted.load(Ordering::SeqCst) < 10 {
                let (node, proxy) = proxies.iter().enumerate().max_by_key(|(_, p)| p.connections()).unwrap();
                let n = proxy.cut();
                cut_connections += n;
                counted.fetch_add(1, Ordering::SeqCst);
                println!("cut {n} connections to node {}", node + 1);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            println!(
                "{} cuts, {cut_connections} connections reset",
                counted.load(Ordering::SeqCst)
            );
        },
    )
    .await;
    assert!(cuts.load(Ordering::SeqCst) >= 10);
}

// --- A highly available PostgreSQL (pg_auto_failover: a monitor, a primary and a synchronous
// secondary; `common::pg_ha`, which scripts/test.sh starts once for these scenarios). The system
// gets the multi-host DATABASE_URL and must follow the primary through each fault: every order
// answered 202 exists exactly once, every order ends terminal, the audit is clean. The verdicts
// of `verify` hold; these check the fault happened and print the stall and the 503s.

/// Runs a scenario on the formation (and `target`'s broker), then leaves the formation whole
/// again (both nodes up, one primary, one synchronous secondary) for the next one.
async fn pg_ha_scenario<F, Fut>(target: Target, name: &'static str, fault: F) -> Outcome
where
    F: FnOnce(Arc<System>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let formation = tokio::task::spawn_blocking(Formation::ensure).await.unwrap();
    let outcome = scenario_on(target.on_pg_ha(&formation), name, &[], None, fault).await;
    tokio::task::spawn_blocking(move || {
        pg_ha::script(&["start"]);
        drop(formation);
    })
    .await
    .unwrap();
    assert!(confirmed(&outcome) > 0, "{outcome:?}");
    outcome
}

/// Runs pg-ha.sh off the async threads.
async fn pg_ha_sh(args: &'static [&'static str]) -> String {
    tokio::task::spawn_blocking(move || pg_ha::script(args)).await.unwrap()
}

/// Kills the primary's keeper and postmaster (a lost machine) once orders flow, waits for the
/// secondary's promotion, and brings the lost node back as the new secondary.
async fn lose_the_primary(sys: Arc<System>) {
    sys.progress(300).await;
    let killed = pg_ha::node_of(&pg_ha_sh(&["kill-primary"]).await);
    let lost = Instant::now();
    let promoted = pg_ha::node_of(&pg_ha_sh(&["wait-primary", "90"]).await);
    assert_ne!(killed, promoted, "the other node took over");
    println!(
        "primary node {killed} lost; node {promoted} writable after {:?}",
        lost.elapsed()
    );
    // The pipeline moves on the new primary before the old one is back.
    sys.progress(300).await;
    let back: &'static [&'static str] = if killed == 1 {
        &["start-node", "1"]
    } else {
        &["start-node", "2"]
    };
    pg_ha_sh(back).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "pg-ha fault suite: needs the highly available PostgreSQL (scripts/test.sh runs it)"]
async fn fault_11_pg_ha_primary_lost_under_load() {
    let outcome = pg_ha_scenario(Target::default_node(), "11-pg-ha-primary-lost", |sys, _done| {
        lose_the_primary(sys)
    })
    .await;
    assert!(outcome.stall_s > 1.0, "the failover stalled nothing: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "pg-ha fault suite: needs the highly available PostgreSQL (scripts/test.sh runs it)"]
async fn fault_12_pg_ha_switchover_under_load() {
    pg_ha_scenario(Target::default_node(), "12-pg-ha-switchover", |sys, _done| async move {
        sys.progress(300).await;
        let before = pg_ha::node_of(&pg_ha_sh(&["primary"]).await);
        let after = pg_ha::node_of(&pg_ha_sh(&["switchover"]).await);
        assert_ne!(before, after, "the primary moved");
        sys.progress(300).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "pg-ha fault suite: needs the highly available PostgreSQL (scripts/test.sh runs it)"]
async fn fault_13_pg_ha_secondary_lost_under_load() {
    pg_ha_scenario(
        Target::default_node(),
        "13-pg-ha-secondary-lost",
        |sys, _done| async move {
            sys.progress(300).await;
            let primary = pg_ha::node_of(&pg_ha_sh(&["primary"]).await);
            let killed = pg_ha::node_of(&pg_ha_sh(&["kill-secondary"]).await);
            assert_ne!(primary, killed);
            // The primary goes on alone (asynchronous) once the monitor sees the secondary gone.
            sys.progress(500).await;
            assert_eq!(
                pg_ha::node_of(&pg_ha_sh(&["primary"]).await),
                primary,
                "no failover for a lost secondary"
            );
            let back: &'static [&'static str] = if killed == 1 {
                &["start-node", "1"]
            } else {
                &["start-node", "2"]
            };
            pg_ha_sh(back).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "cluster fault suite: needs the three-node cluster and the highly available PostgreSQL (scripts/test.sh runs both)"]
async fn fault_14_cluster_pg_ha_primary_lost_with_the_broker_cluster() {
    let cluster = tokio::task::spawn_blocking(Cluster::ensure).await.unwrap();
    let outcome = pg_ha_scenario(Target::cluster(), "14-cluster-pg-ha-primary-lost", |sys, _done| {
        lose_the_primary(sys)
    })
    .await;
    assert!(outcome.stall_s > 1.0, "the failover stalled nothing: {outcome:?}");
    assert_eq!(running_nodes().await, 3);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}
