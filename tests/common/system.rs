//! The system as separate OS processes (the API and one process per worker, as in
//! production) on its own database and vhost, a load of orders from careful clients, and the
//! check of every promise once it is at rest: what the fault suite (`tests/faults.rs`) and the
//! upgrade scenarios (`tests/upgrade.rs`) share.

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

use orderflow_shared::messaging::topology;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{cluster, pg_ha::Formation};

pub const ORDERS: usize = 5_000;
pub const CONCURRENCY: usize = 16;
pub const SETTLE: Duration = Duration::from_secs(240);
pub const WORKERS: &[&str] = &["relay", "stock", "coupon", "payment", "order", "recovery"];

/// Where a system runs: the broker (the default node, or the tests' three-node cluster,
/// `super::cluster`, maybe behind proxies) and the database (the default PostgreSQL, or the
/// tests' highly available one, `super::pg_ha`).
#[derive(Debug, Clone)]
pub struct Target {
    /// Each node as the system's processes reach it (their AMQP_URL lists them all).
    pub nodes: Vec<String>,
    /// Each node as the test itself reaches it (settling, draining), never through a proxy.
    pub direct: Vec<String>,
    /// Management APIs, tried in turn (a node may be down).
    pub management: Vec<String>,
    /// The highly available PostgreSQL's DATABASE_URL (database `orderflow`, replaced by the
    /// system's own), or None for the default PostgreSQL.
    pub pg_ha: Option<String>,
    /// The processes create the database and apply their own migrations (as a deployment
    /// does), instead of the test copying a template migrated with this build's migrations.
    /// Always so on the highly available PostgreSQL.
    pub fresh_database: bool,
}

impl Target {
    pub fn default_node() -> Self {
        let node = "amqp://guest:guest@127.0.0.1:5672".to_owned();
        Self {
            nodes: vec![node.clone()],
            direct: vec![node],
            management: vec![super::RABBIT_MGMT.to_owned()],
            pg_ha: None,
            fresh_database: false,
        }
    }

    pub fn cluster() -> Self {
        let nodes: Vec<String> = cluster::NODES.iter().map(|&i| cluster::amqp_node(i)).collect();
        Self {
            nodes: nodes.clone(),
            direct: nodes,
            management: cluster::NODES.iter().map(|&i| cluster::management(i)).collect(),
            pg_ha: None,
            fresh_database: false,
        }
    }

    /// The same, with a database the processes create and migrate themselves.
    pub fn with_fresh_database(self) -> Self {
        Self {
            fresh_database: true,
            ..self
        }
    }

    /// The same broker, with the system's database on the highly available PostgreSQL.
    pub fn on_pg_ha(self, formation: &Formation) -> Self {
        Self {
            pg_ha: Some(formation.url.clone()),
            ..self
        }
    }

    pub fn url(nodes: &[String], vhost: &str) -> String {
        nodes
            .iter()
            .map(|n| format!("{n}/{vhost}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The system under test: its own database and vhost, one OS process per component.
pub struct System {
    pub name: &'static str,
    pub db_name: String,
    pub vhost: String,
    pub target: Target,
    pub env: Vec<(String, String)>,
    /// The APIs clients send orders to, in turn (several while a rolling update runs).
    pub bases: std::sync::Mutex<Vec<String>>,
    turn: AtomicUsize,
    /// Running processes by label (`api`, `stock`, or what a scenario names them).
    pub procs: Mutex<BTreeMap<String, Proc>>,
    pub restarts: AtomicUsize,
    pub starts: AtomicUsize,
    pub log_dir: PathBuf,
    pub pool: sqlx::PgPool,
    pub keys: orderflow_shared::auth::Keys,
    pub http: reqwest::Client,
}

/// One OS process of the system, and how to start it again.
pub struct Proc {
    pub child: Child,
    /// `api`, `all`, or a worker kind.
    pub component: String,
    /// The orderflow binary it runs (this build's, or an earlier release's).
    pub bin: PathBuf,
    /// Environment beside the system's (`HTTP_ADDR` of a second API).
    pub env: Vec<(String, String)>,
}

/// This build's binary.
pub fn this_build() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orderflow"))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl System {
    /// The system with the API and every worker kind as processes of this build.
    pub async fn start(name: &'static str, extra_env: &[(&str, &str)], target: Target) -> Arc<Self> {
        let sys = Self::create(name, extra_env, target).await;
        sys.launch("api", "api", &this_build(), &[]).await;
        for w in WORKERS {
            sys.launch(w, w, &this_build(), &[]).await;
        }
        sys
    }

    /// A database, a vhost and an API address for the system; no process yet
    /// ([`launch`](Self::launch)).
    pub async fn create(name: &'static str, extra_env: &[(&str, &str)], target: Target) -> Arc<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("orderflow_fault_{}", &id[..12]);
        let vhost = format!("orderflow-fault-{}", &id[..12]);
        let database_url = match &target.pg_ha {
            // The processes create it on the primary (from an empty server, as in production).
            Some(url) => url.replacen("/orderflow?", &format!("/{db_name}?"), 1),
            None => {
                if !target.fresh_database {
                    super::create_database(&db_name).await;
                }
                format!("{}/{db_name}", super::PG_BASE)
            }
        };
        super::create_vhost_at(&target.management[0], &vhost).await;
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database_url.clone()),
            ("AMQP_URL".into(), Target::url(&target.nodes, &vhost)),
            ("HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("JWT_SECRET".into(), super::JWT_SECRET.into()),
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
        Arc::new(Self {
            name,
            db_name,
            vhost,
            target,
            env,
            bases: std::sync::Mutex::new(vec![format!("http://127.0.0.1:{port}")]),
            turn: AtomicUsize::new(0),
            procs: Mutex::new(BTreeMap::new()),
            restarts: AtomicUsize::new(0),
            starts: AtomicUsize::new(0),
            log_dir,
            pool: orderflow_shared::db::pool(&database_url, 4).unwrap(),
            keys: orderflow_shared::auth::Keys::new(super::JWT_SECRET),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(CONCURRENCY)
                .build()
                .unwrap(),
        })
    }

    /// The first API's base URL.
    pub fn base(&self) -> String {
        self.bases.lock().unwrap()[0].clone()
    }

    /// The next API a client should send to (round robin over [`bases`](Self::bases)).
    pub fn next_base(&self) -> String {
        let n = self.turn.fetch_add(1, Ordering::Relaxed);
        let bases = self.bases.lock().unwrap();
        bases[n % bases.len()].clone()
    }

    /// Starts process `label` running `component` (`api`, `all` or a worker kind) of `bin`,
    /// with `env` beside the system's; its output goes to a log file of its own.
    pub async fn launch(&self, label: &str, component: &str, bin: &std::path::Path, env: &[(&str, &str)]) {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let child = self.spawn_process(label, component, bin, &env);
        self.procs.lock().await.insert(
            label.to_owned(),
            Proc {
                child,
                component: component.to_owned(),
                bin: bin.to_owned(),
                env,
            },
        );
    }

    fn spawn_process(&self, label: &str, component: &str, bin: &std::path::Path, env: &[(String, String)]) -> Child {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        let log = File::create(self.log_dir.join(format!("{n:03}-{label}.log"))).unwrap();
        let mut cmd = Command::new(bin);
        match component {
            "api" | "all" => cmd.arg(component),
            worker => cmd.args(["worker", worker]),
        };
        cmd.envs(self.env.iter().chain(env).map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Sends `signal` to process `label`, and with `-TERM` or `-KILL` waits for it to end and
    /// forgets it (the supervisor does not bring it back).
    pub async fn retire(&self, label: &str, signal: &str) {
        let Some(mut proc) = self.procs.lock().await.remove(label) else {
            panic!("no process {label}");
        };
        let _ = Command::new("kill")
            .args([signal, &proc.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc.child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "{label} did not stop on {signal}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The processes that exited on their own (nothing retired them).
    pub async fn exited(&self) -> Vec<String> {
        let mut procs = self.procs.lock().await;
        procs
            .iter_mut()
            .filter_map(|(label, p)| p.child.try_wait().ok().flatten().map(|_| label.clone()))
            .collect()
    }

    /// Waits until the API at `base` answers `/readyz` with 200.
    pub async fn wait_ready_at(&self, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "the API at {base} did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every ERROR line in the logs of every process the system ran, with its log's name.
    pub fn error_lines(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.log_dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(" ERROR ")) {
                found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
            }
        }
        found
    }

    pub async fn wait_ready(&self) {
        self.wait_ready_at(&self.base()).await;
    }

    /// Restarts whatever exited (a process manager's job), until `stop` is set.
    pub async fn supervise(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            {
                let mut procs = self.procs.lock().await;
                for (label, proc) in procs.iter_mut() {
                    if proc.child.try_wait().ok().flatten().is_some() {
                        self.restarts.fetch_add(1, Ordering::SeqCst);
                        proc.child = self.spawn_process(label, &proc.component, &proc.bin, &proc.env);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn signal(&self, label: &str, signal: &str) {
        let pid = self.procs.lock().await[label].child.id();
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {label}");
    }

    pub async fn stop(&self) {
        let mut procs = self.procs.lock().await;
        for proc in procs.values() {
            let _ = Command::new("kill")
                .args(["-CONT", &proc.child.id().to_string()])
                .status();
            let _ = Command::new("kill")
                .args(["-TERM", &proc.child.id().to_string()])
                .status();
        }
        for child in procs.values_mut().map(|p| &mut p.child) {
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
            &format!("/api/vhosts/{}", super::enc(&self.vhost)),
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
            None => super::drop_database(&self.db_name).await,
        }
    }

    /// The AMQP_URL the test's own connections use (every node, directly).
    pub fn amqp_url(&self) -> String {
        Target::url(&self.target.direct, &self.vhost)
    }

    /// A management API call answered by the first live node; None when none answers.
    pub async fn management(&self, method: reqwest::Method, path: &str) -> Option<Value> {
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
    pub async fn terminal(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status IN ('CONFIRMED', 'CANCELLED')")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Waits until `more` orders beyond those terminal now (or all `ORDERS`) have become
    /// terminal: the pipeline makes progress (asserted: within 120 s).
    pub async fn progress(&self, more: i64) {
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
            for child in procs.values_mut().map(|p| &mut p.child) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A small deterministic generator (the same load every run).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const RICH_USERS: i64 = 240;
pub const POOR_USERS: i64 = 60;

/// Products, balances and coupons, written straight to the database (with the ledger rows
/// and issue counts the audit expects) so setup is fast and the load is all orders.
pub async fn seed(sys: &System) -> (Vec<i64>, i64, i64) {
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
pub struct Load {
    /// Every order the API answered 202: (user, order id).
    pub placed: Vec<(i64, String)>,
    /// When each 202 came.
    pub accepted_at: Vec<Instant>,
    /// Answers 503 (the database or the API unavailable: the client retried with its key).
    pub unavailable: usize,
    /// Requests that got no answer at all (connection refused or cut, timeout).
    pub unanswered: usize,
}

impl Load {
    /// The longest time without any 202 once the first came: from the last 202 before a fault
    /// to the first one after it.
    pub fn stall(&self) -> Duration {
        let mut at = self.accepted_at.clone();
        at.sort();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// Submits `ORDERS` orders ([`submit_n`]).
pub async fn submit(sys: &Arc<System>, products: &[i64], good: i64, picky: i64, rate: Option<u32>) -> Load {
    submit_n(sys, products, good, picky, rate, ORDERS).await
}

/// Submits `orders` orders with `CONCURRENCY` clients, as fast as they go or, with a `rate`,
/// spread over `orders / rate` seconds (the k-th order leaves no earlier than k / rate seconds
/// after the first). Like a careful client, each retries with the same Idempotency-Key on
/// errors (503 while the database restarts or fails over, refused connections, 409 while its
/// first attempt is in flight).
pub async fn submit_n(
    sys: &Arc<System>,
    products: &[i64],
    good: i64,
    picky: i64,
    rate: Option<u32>,
    orders: usize,
) -> Load {
    submit_round(sys, products, good, picky, rate, orders, "").await
}

/// [`submit_n`] for one more round of orders on the same system: `round` sets their
/// Idempotency-Keys apart from the other rounds'.
pub async fn submit_round(
    sys: &Arc<System>,
    products: &[i64],
    good: i64,
    picky: i64,
    rate: Option<u32>,
    orders: usize,
    round: &str,
) -> Load {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut plan = Vec::with_capacity(orders);
    for n in 0..orders {
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
            format!("{}{round}-{n}", sys.name),
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
                        .post(format!("{}/api/orders", sys.next_base()))
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
pub struct Outcome {
    pub orders: usize,
    pub by_status: BTreeMap<String, i64>,
    pub events_received: usize,
    pub events_distinct: usize,
    pub dead_letters: i64,
    /// Dead letters whose message ran out of deliveries (`x-first-death-reason=delivery_limit`)
    /// rather than being rejected as poison: a healthy order's message here is an order lost to
    /// redeliveries.
    pub redeliveries_dead_lettered: i64,
    /// Redeliveries the broker counted on the system's queues (management statistics, which
    /// lag by up to 5 s; None when no node answered).
    pub redelivered: Option<u64>,
    pub restarts: usize,
    pub settle_s: f64,
    /// The longest time without a 202 while the orders went in.
    pub stall_s: f64,
    /// Answers 503 and requests without an answer while the orders went in (each retried).
    pub unavailable: usize,
    pub unanswered: usize,
}

/// Waits for rest, then checks every promise. Panics with the details when one fails.
pub async fn verify(sys: &System, load: &Load, started: Instant) -> Outcome {
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
    let events: Vec<Value> = super::drain(&sys.amqp_url(), topology::DATA_PLATFORM_QUEUE)
        .await
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    let mut by_order: HashMap<String, HashSet<String>> = HashMap::new();
    for e in &events {
        assert_eq!(e["type"], "order.confirmed");
        // A CloudEvent names its order in `subject`; an earlier release's event (a rolling
        // update) in `orderId`.
        let order = e["subject"].as_str().or(e["orderId"].as_str());
        by_order
            .entry(
                order
                    .unwrap_or_else(|| panic!("an event naming no order: {e}"))
                    .to_owned(),
            )
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
        .management(reqwest::Method::GET, &format!("/api/queues/{}", super::enc(&sys.vhost)))
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
pub async fn queue_depths(sys: &System) -> u64 {
    match orderflow_shared::messaging::stats::queue_stats(&sys.amqp_url()).await {
        Ok(stats) => stats
            .iter()
            .filter(|q| q.name != topology::DATA_PLATFORM_QUEUE && q.name != topology::DEADLINE_QUEUE)
            .map(|q| u64::from(q.messages))
            .sum(),
        Err(_) => u64::MAX,
    }
}
