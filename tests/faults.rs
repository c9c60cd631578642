//! The fault suite: the whole system as separate processes (API and one process per
//! worker, as in production) under a few thousand orders, with one fault injected per
//! scenario. After the load, the system must come to rest with every order terminal, the
//! audit clean, each confirmed order's event on the data-platform queue exactly once after
//! dedup, and no order counted twice.
//!
//! These tests restart the shared PostgreSQL and RabbitMQ, so they are `#[ignore]`d in the
//! parallel run and executed one at a time afterwards by `scripts/test.sh`:
//! `cargo nextest run --test faults --run-ignored only --test-threads 1`.
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

use orderflow_shared::messaging::topology;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const ORDERS: usize = 2_000;
const CONCURRENCY: usize = 16;
const SETTLE: Duration = Duration::from_secs(240);
const WORKERS: &[&str] = &["relay", "stock", "coupon", "payment", "order", "recovery"];

/// The system under test: its own database and vhost, one OS process per component.
struct System {
    name: &'static str,
    db_name: String,
    vhost: String,
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
    async fn start(name: &'static str, extra_env: &[(&str, &str)]) -> Arc<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("orderflow_fault_{}", &id[..12]);
        let vhost = format!("orderflow-fault-{}", &id[..12]);
        common::create_database(&db_name).await;
        common::create_vhost(&vhost).await;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let database_url = format!("{}/{db_name}", common::PG_BASE);
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database_url.clone()),
            ("AMQP_URL".into(), format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")),
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
        let _ = common::mgmt(
            reqwest::Method::DELETE,
            &format!("/api/vhosts/{}", common::enc(&self.vhost)),
            None,
        )
        .await;
        common::drop_database(&self.db_name).await;
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
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

/// Submits `ORDERS` orders with `CONCURRENCY` clients. Like a careful client, each retries
/// with the same Idempotency-Key on errors (503 while the database restarts, refused
/// connections, 409 while its first attempt is in flight). Returns (user, order id).
async fn submit(sys: &Arc<System>, products: &[i64], good: i64, picky: i64) -> Vec<(i64, String)> {
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
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (sys, plan) = (sys.clone(), plan.clone());
        clients.spawn(async move {
            let mut placed = Vec::new();
            loop {
                let Some((user, key, body)) = plan.lock().await.pop() else {
                    break;
                };
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
                            let v: Value = r.json().await.unwrap();
                            placed.push((user, v["orderId"].as_str().unwrap().to_owned()));
                            break;
                        }
                        Ok(r) if r.status().is_client_error() && r.status() != 409 => {
                            panic!("order refused: {} {}", r.status(), r.text().await.unwrap_or_default())
                        }
                        _ => {
                            assert!(Instant::now() < deadline, "could not place an order within 120 s");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            placed
        });
    }
    let mut placed = Vec::new();
    while let Some(res) = clients.join_next().await {
        placed.extend(res.unwrap());
    }
    placed
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
    restarts: usize,
    settle_s: f64,
}

/// Waits for rest, then checks every promise. Panics with the details when one fails.
async fn verify(sys: &System, placed: &[(i64, String)], started: Instant) -> Outcome {
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
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&sys.pool)
        .await
        .unwrap();
    let outcome = Outcome {
        orders: placed.len(),
        by_status,
        events_received: events.len(),
        events_distinct: by_order.len(),
        dead_letters,
        restarts: sys.restarts.load(Ordering::SeqCst),
        settle_s,
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

/// Runs one scenario: start, seed, load with `fault` running beside it, verify, stop.
async fn scenario<F, Fut>(name: &'static str, env: &[(&str, &str)], fault: F) -> Outcome
where
    F: FnOnce(Arc<System>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sys = System::start(name, env).await;
    let done = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(sys.clone().supervise(injected.clone()));
    sys.wait_ready().await;
    let (products, good, picky) = seed(&sys).await;
    let injector = tokio::spawn(fault(sys.clone(), done.clone()));
    let started = Instant::now();
    let placed = submit(&sys, &products, good, picky).await;
    done.store(true, Ordering::SeqCst);
    // A fault may go on after the orders are in (to land while they settle).
    injector.await.unwrap();
    injected.store(true, Ordering::SeqCst);
    supervisor.await.unwrap();
    // Anything still down comes back before settling (a process manager would do this).
    let done_again = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(sys.clone().supervise(done_again.clone()));
    let outcome = verify(&sys, &placed, started).await;
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
