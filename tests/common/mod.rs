//! The integration-test harness. Each test gets the real system, isolated:
//! - its own PostgreSQL database, copied from a template migrated once per migration set;
//! - its own RabbitMQ vhost (created through the management API), so queues never mix;
//! - the API on port 0 and the workers it asks for, in-process, on those two.
//!
//! `stop()` shuts everything down gracefully and drops the database and the vhost.

#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;
pub mod oidc;
pub mod pg_ha;
pub mod proxy;
pub mod raw_amqp;
pub mod system;

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use orderflow_shared::{
    auth::Keys,
    config::{Config, LogFormat},
    db::quote_ident,
};
use orderflow_workers::WorkerKind;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";
pub const RABBIT_MGMT: &str = "http://127.0.0.1:15672";
pub const JWT_SECRET: &str = "test-secret";

pub struct Options {
    pub workers: Vec<WorkerKind>,
    /// How many instances of each worker to run.
    pub instances: usize,
    pub order_timeout: Duration,
    /// SWEEP_INTERVAL.
    pub sweep_interval: Duration,
    pub api: bool,
    /// Deliveries each worker handles at once.
    pub concurrency: usize,
    /// WORKER_LINGER.
    pub linger: Duration,
    /// RATE_LIMIT_WRITES and RATE_LIMIT_WINDOW. By default far above what any test writes for
    /// one user (some fire 100+ charges for one user at once to test races, which the
    /// production default of 100 per 10 s would refuse), so the layer runs in every test
    /// without refusing anything; `tests/rate_limits.rs` sets its own and checks the defaults.
    pub rate_limit: (u32, Duration),
    /// Where the test's vhost lives: the local default node unless a test brings a cluster.
    pub broker: Broker,
    /// An identity provider whose tokens the API accepts (AUTH_ISSUER and friends).
    pub auth: Option<AuthProvider>,
    /// HTTP_HEADER_TIMEOUT.
    pub http_header_timeout: Duration,
    /// HTTP_MAX_CONNECTIONS.
    pub http_max_connections: usize,
    /// A port in front of PostgreSQL (a [`proxy::Proxy`]): DATABASE_URL names it first, then
    /// PostgreSQL itself, as two nodes of which the first to accept writes is the primary.
    pub database_front: Option<u16>,
}

/// AUTH_ISSUER, AUTH_AUDIENCE and AUTH_ADMIN_CLAIM for a test.
#[derive(Debug, Clone)]
pub struct AuthProvider {
    pub issuer: String,
    pub audience: String,
    pub admin_claim: Option<String>,
}

/// A RabbitMQ deployment to put a test's vhost on.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Each node's AMQP URL without a path (`amqp://guest:guest@127.0.0.1:5672`); the test's
    /// AMQP_URL lists them all, with its vhost.
    pub nodes: Vec<String>,
    /// A management API base URL of the deployment (any node of a cluster).
    pub management: String,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            nodes: vec!["amqp://guest:guest@127.0.0.1:5672".to_owned()],
            management: RABBIT_MGMT.to_owned(),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: WorkerKind::ALL.to_vec(),
            instances: 1,
            order_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(1),
            api: true,
            concurrency: 8,
            linger: Duration::from_millis(10),
            rate_limit: (1_000_000, Duration::from_secs(10)),
            broker: Broker::default(),
            auth: None,
            http_header_timeout: Duration::from_secs(30),
            http_max_connections: 4_096,
            database_front: None,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub pool: PgPool,
    pub config: Config,
    pub db_name: String,
    pub vhost: String,
    /// The management API of the broker the vhost lives on.
    pub management: String,
    pub http: reqwest::Client,
    pub keys: Keys,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    /// The API only, no workers (for the synchronous routes).
    pub async fn api_only() -> Self {
        Self::spawn_with(Options {
            workers: vec![],
            ..Options::default()
        })
        .await
    }

    pub async fn spawn_with(opts: Options) -> Self {
        // Kept for the whole test process: the global subscriber outlives every app.
        std::mem::forget(orderflow_shared::telemetry::init(
            LogFormat::Text,
            orderflow_shared::telemetry::provider(None).unwrap(),
        ));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("orderflow_test_{}", &id[..16]);
        let vhost = format!("orderflow-test-{}", &id[..16]);
        create_database(&db_name).await;
        create_vhost_at(&opts.broker.management, &vhost).await;

        let config = Config {
            database_url: match opts.database_front {
                Some(port) => format!(
                    "postgres://postgres@127.0.0.1:{port},127.0.0.1:5432/{db_name}?target_session_attrs=read-write"
                ),
                None => format!("{PG_BASE}/{db_name}"),
            },
            amqp_url: opts
                .broker
                .nodes
                .iter()
                .map(|node| format!("{node}/{vhost}"))
                .collect::<Vec<_>>()
                .join(","),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            http_header_timeout: opts.http_header_timeout,
            http_max_connections: opts.http_max_connections,
            jwt_secret: Some(JWT_SECRET.to_owned()),
            auth_issuer: opts.auth.as_ref().map(|a| a.issuer.clone()),
            auth_jwks_url: None,
            auth_audience: opts.auth.as_ref().map(|a| a.audience.clone()),
            auth_admin_claim: opts.auth.as_ref().and_then(|a| a.admin_claim.clone()),
            order_timeout: opts.order_timeout,
            sweep_interval: opts.sweep_interval,
            trend_sample_interval: Duration::from_secs(1),
            prefetch: 32,
            worker_concurrency: opts.concurrency,
            worker_batch: 16,
            worker_linger: opts.linger,
            db_pool_size: 12,
            worker_generic_plans: true, // unused: these workers share the API's pool (below)
            metrics_addr: None,
            log_format: LogFormat::Text,
            otel_exporter_otlp_endpoint: None,
            fault_relay_abort_every: 0,
            rate_limit_writes: opts.rate_limit.0,
            rate_limit_window: opts.rate_limit.1,
        };
        // One pool for the API and the workers (so PostgreSQL's default plans, unlike the workers'
        // own pool in `orderflow all`): a second one per test would double the connections of
        // the tests running at once. The system tests run `orderflow` processes, whose workers
        // plan generically (`db::worker_pool`).
        let pool = orderflow_shared::db::pool(&config.database_url, config.db_pool_size).unwrap();
        // Declare the topology once before the workers start, so they never race each
        // other creating the same quorum queues in a fresh vhost.
        {
            let conn = orderflow_shared::messaging::connect(&config.amqp_url, lapin::ConnectionProperties::default())
                .await
                .unwrap();
            orderflow_shared::messaging::topology::declare(&conn).await.unwrap();
            let _ = conn.close(200, "bye".into()).await;
        }
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut base = String::new();
        // As in `orderflow all`: the API hands the orders it accepts to the first instance's relay.
        let feed = Arc::new(orderflow_shared::db::outbox::Feed::default());
        if opts.api {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            base = format!("http://{}", listener.local_addr().unwrap());
            let state = orderflow_api::AppState::with_feed(pool.clone(), Arc::new(config.clone()), Some(feed.clone()));
            let (orders, queues) = (state.orders.clone(), state.queues.clone());
            tasks.spawn(orderflow_api::serve(listener, state, shutdown.clone()));
            orderflow_shared::metrics::install();
            let (pool, shutdown) = (pool.clone(), shutdown.clone());
            tasks.spawn(async move {
                let interval = Duration::from_millis(200);
                orderflow_shared::metrics::sample_gauges(pool, orders, queues, interval, shutdown).await;
                Ok(())
            });
        }
        for i in 0..opts.instances {
            let feed = if i == 0 { feed.clone() } else { Default::default() };
            orderflow_workers::spawn_fed(&mut tasks, &opts.workers, &pool, &config, feed, &shutdown);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let app = Self {
            base,
            pool,
            config,
            db_name,
            vhost,
            management: opts.broker.management.clone(),
            http,
            keys: Keys::new(JWT_SECRET),
            shutdown,
            tasks,
        };
        if !opts.workers.is_empty() {
            app.wait_for_consumers(&opts.workers).await;
        }
        app
    }

    /// Waits until every consuming worker has a consumer on its queue (passive declares
    /// report consumers at once; the management API's statistics lag by seconds).
    async fn wait_for_consumers(&self, workers: &[WorkerKind]) {
        let queues: Vec<&str> = workers.iter().filter_map(|w| worker_queue(*w)).collect();
        let (conn, channel) = self.amqp().await;
        // Declare first (idempotent) so a passive declare never hits a missing queue.
        orderflow_shared::messaging::topology::declare(&conn).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for queue in queues {
            loop {
                let declared = channel
                    .queue_declare(
                        queue.into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        Default::default(),
                    )
                    .await;
                if declared.map(|q| q.consumer_count() > 0).unwrap_or(false) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "worker on {queue} did not start consuming in time"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }

    pub fn token(&self, user_id: i64) -> String {
        self.keys.issue(user_id, false, 3600).unwrap()
    }

    pub fn admin_token(&self) -> String {
        self.keys.issue(1_000_000, true, 3600).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let res = self.request(method, path, token, body, &[]).await;
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Creates a product as admin; returns its id.
    pub async fn product(&self, name: &str, price: i64, stock: i64) -> i64 {
        let (status, body) = self
            .post(
                "/api/admin/products",
                &self.admin_token(),
                json!({"name": name, "price": price, "stock": stock}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().unwrap()
    }

    /// Charges a user's balance up to `amount` in allowed steps.
    pub async fn fund(&self, user_id: i64, mut amount: i64) {
        let token = self.token(user_id);
        while amount > 0 {
            let step = amount.min(100_000);
            let (status, body) = self.post("/api/balance/charge", &token, json!({"amount": step})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            amount -= step;
        }
    }

    pub async fn balance(&self, user_id: i64) -> i64 {
        let (_, body) = self.get("/api/balance", &self.token(user_id)).await;
        body["balance"].as_i64().unwrap()
    }

    pub async fn stock(&self, product_id: i64) -> i64 {
        let (_, body) = self.get(&format!("/api/products/{product_id}"), &self.token(1)).await;
        body["stock"].as_i64().unwrap()
    }

    /// Makes every stock change of the products whose name is `LIKE` `name` fail in the
    /// direction given (`>` for releases, `<` for reservations), as a bad deploy or a
    /// misconfigured product would, until [`heal_stock`](Self::heal_stock). The error names the
    /// product and the stock numbers, so failures of one cause differ only in numbers.
    pub async fn break_stock(&self, name: &str, direction: &str) {
        let trigger = format!(
            "CREATE FUNCTION break_stock() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.name LIKE '{name}' AND NEW.stock {direction} OLD.stock THEN
                 RAISE EXCEPTION 'product % is misconfigured (stock % -> %)', NEW.id, OLD.stock, NEW.stock;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER break_stock BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION break_stock();"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(trigger))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn heal_stock(&self) {
        sqlx::raw_sql("DROP TRIGGER break_stock ON products; DROP FUNCTION break_stock()")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Creates a coupon as admin; returns its id.
    pub async fn coupon(&self, body: Value) -> i64 {
        let (status, body) = self.post("/api/admin/coupons", &self.admin_token(), body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().unwrap()
    }

    /// Places an order for `user_id`; returns its id.
    pub async fn order(&self, user_id: i64, items: &[(i64, i32)], coupon: Option<i64>) -> String {
        let body = json!({
            "items": items.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect::<Vec<_>>(),
            "couponId": coupon,
        });
        let key = uuid::Uuid::new_v4().to_string();
        let token = self.token(user_id);
        let res = self
            .request(
                Method::POST,
                "/api/orders",
                Some(&token),
                Some(body),
                &[("idempotency-key", &key)],
            )
            .await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["orderId"].as_str().unwrap().to_owned()
    }

    /// Polls the order until it is CONFIRMED or CANCELLED (or `within` passes).
    pub async fn wait_terminal(&self, user_id: i64, order_id: &str, within: Duration) -> Value {
        let token = self.token(user_id);
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get(&format!("/api/orders/{order_id}"), &token).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if matches!(body["status"].as_str(), Some("CONFIRMED" | "CANCELLED")) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} not terminal in time: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no order is in flight and the outbox is drained.
    pub async fn wait_quiescent(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (open, unsent): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM orders WHERE status NOT IN ('CONFIRMED', 'CANCELLED')),
                        (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND discarded_at IS NULL)",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if open == 0 && unsent == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not quiescent in time: {open} open orders, {unsent} unsent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts more workers on the same database and vhost (e.g. one held back until now).
    pub async fn spawn_workers(&mut self, workers: &[WorkerKind]) {
        orderflow_workers::spawn(&mut self.tasks, workers, &self.pool, &self.config, &self.shutdown);
        self.wait_for_consumers(workers).await;
    }

    /// Publishes every outbox row about `order_id` once more, exactly as the relay would (same
    /// message id, body and properties): what a redelivery or a relay crash produces.
    pub async fn republish_outbox(&self, order_id: &str) -> usize {
        let rows: Vec<orderflow_workers::relay::OutboxRow> = sqlx::query_as(
            "SELECT id, message_id, exchange, routing_key, message_type, order_ids, headers, body, expiration_ms, created_at
             FROM outbox WHERE order_ids @> ARRAY[$1::uuid] AND message_type <> 'order.deadline' ORDER BY id",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let (conn, channel) = self.amqp().await;
        channel.confirm_select(Default::default()).await.unwrap();
        for row in &rows {
            let body = &row.body;
            let confirm = channel
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: orderflow_workers::relay::mandatory(&row.message_type),
                        immediate: false,
                    },
                    body,
                    orderflow_workers::relay::properties(row, body).unwrap(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "republish of {} not confirmed", row.routing_key);
            if orderflow_workers::relay::mandatory(&row.message_type) {
                assert!(
                    confirm.take_message().is_none(),
                    "republish of {} not routed",
                    row.routing_key
                );
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        rows.len()
    }

    /// Publishes `body` to `exchange` with routing key `key` and the envelope's properties.
    pub async fn publish_raw(&self, exchange: &str, key: &str, body: &[u8], message_type: &str) {
        let (conn, channel) = self.amqp().await;
        channel.confirm_select(Default::default()).await.unwrap();
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_type(message_type.into());
        channel
            .basic_publish(
                exchange.into(),
                key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    /// The plans PostgreSQL makes for `statement` (its parameters typed as `types`, e.g.
    /// `uuid, int8`) executed with `args` (SQL literals), custom and generic, each as
    /// (mode, the EXPLAIN text): what a statement reads, checked without timing it. A
    /// connection of its own, so the prepared statement and the setting stay off the pool's.
    pub async fn plans(&self, statement: &str, types: &str, args: &str) -> Vec<(&'static str, String)> {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.config.database_url)
            .await
            .unwrap();
        let mut plans = Vec::new();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PREPARE checked ({types}) AS {statement};
                 SET plan_cache_mode = {mode};
                 EXPLAIN EXECUTE checked ({args});
                 DEALLOCATE checked;"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let plan: Vec<String> = rows.iter().map(|row| sqlx::Row::get(row, 0)).collect();
            assert!(!plan.is_empty());
            plans.push((mode, plan.join("\n")));
        }
        plans
    }

    /// Polls `condition`, a boolean SQL expression (ids written into it), until it holds;
    /// fails the test after `within`, saying `what` never happened.
    pub async fn wait_until(&self, what: &str, within: Duration, condition: &str) {
        let deadline = Instant::now() + within;
        let query = format!("SELECT {condition}");
        loop {
            let holds: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(query.as_str()))
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if holds {
                return;
            }
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the order row until `pred` holds.
    pub async fn wait_order_row(
        &self,
        order_id: &str,
        within: Duration,
        pred: impl Fn(&orderflow_shared::db::orders::OrderRow) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let row: orderflow_shared::db::orders::OrderRow =
                sqlx::query_as("SELECT * FROM orders WHERE id = $1::uuid")
                    .bind(order_id)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if pred(&row) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} never reached the expected state: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the relay has published every outbox row.
    pub async fn wait_quiescent_outbox(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let unsent: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND discarded_at IS NULL")
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if unsent == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "outbox not drained: {unsent} unsent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until this process's workers have settled at least `n` deliveries with
    /// `outcome` (acked, duplicate, retried, rejected), summed over queues: a precise "the
    /// copies were handled", where a queue's ready count cannot see deliveries in flight.
    pub async fn wait_outcomes(&self, outcome: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let needle = format!("outcome=\"{outcome}\"}}");
        loop {
            let seen: u64 = orderflow_shared::metrics::render()
                .lines()
                .filter(|l| l.starts_with("orderflow_messages_total{") && l.contains(&needle))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64;
            if seen >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {seen} of {n} deliveries ended {outcome}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Declares queue `name` bound to `exchange` with `key` (e.g. to capture the public
    /// `order.cancelled`, which no orderflow queue receives); read it with `drain_queue`.
    pub async fn capture(&self, name: &str, exchange: &str, key: &str) {
        self.capture_with(name, exchange, key, Default::default()).await;
    }

    /// [`TestApp::capture`] with queue arguments (`x-max-length`, `x-overflow`, ...).
    pub async fn capture_with(&self, name: &str, exchange: &str, key: &str, args: lapin::types::FieldTable) {
        let (conn, channel) = self.amqp().await;
        channel
            .queue_declare(name.into(), Default::default(), args)
            .await
            .unwrap();
        channel
            .queue_bind(
                name.into(),
                exchange.into(),
                key.into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    /// Opens an AMQP channel on the test's vhost.
    pub async fn amqp(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = orderflow_shared::messaging::connect(&self.config.amqp_url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        (conn, channel)
    }

    /// Takes every message currently in `queue` (acked), as (properties, body).
    pub async fn drain_queue(&self, queue: &str) -> Vec<(lapin::BasicProperties, Value)> {
        drain(&self.config.amqp_url, queue).await
    }

    /// Calls an admin route with an admin token and no body.
    pub async fn admin(&self, method: Method, path: &str) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin_token()), None).await
    }

    /// Calls the RabbitMQ management API.
    pub async fn mgmt(&self, method: Method, path: &str) -> Value {
        mgmt_at(&self.management, method, path, None).await
    }

    /// Shuts down gracefully and removes the database and the vhost.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.pool.close().await;
        let _ = mgmt_at(
            &self.management,
            Method::DELETE,
            &format!("/api/vhosts/{}", enc(&self.vhost)),
            None,
        )
        .await;
        drop_database(&self.db_name).await;
    }
}

/// The queue a worker consumes (the relay consumes none).
pub fn worker_queue(kind: WorkerKind) -> Option<&'static str> {
    use orderflow_shared::messaging::topology as t;
    match kind {
        WorkerKind::Relay => None,
        WorkerKind::Stock => Some(t::STOCK_QUEUE),
        WorkerKind::Coupon => Some(t::COUPON_QUEUE),
        WorkerKind::Payment => Some(t::PAYMENT_QUEUE),
        WorkerKind::Order => Some(t::ORDER_QUEUE),
        WorkerKind::Recovery => Some(t::EXPIRED_QUEUE),
    }
}

/// Sends a request and returns status, content type and the JSON body (Null if none).
pub async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String, Value) {
    let res = app.request(method, path, token, body, &[]).await;
    let status = res.status();
    let content_type = res
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, res.json().await.unwrap_or(Value::Null))
}

/// Asserts a problem document (RFC 9457, with orderflow's `code`) with the given status and code.
pub fn assert_problem((status, content_type, body): &(StatusCode, String, Value), want: StatusCode, code: &str) {
    assert_eq!(*status, want, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "problem without {field}: {body}");
    }
}

/// Takes every message currently in `queue` (acked), as (properties, body).
pub async fn drain(amqp_url: &str, queue: &str) -> Vec<(lapin::BasicProperties, Value)> {
    let conn = orderflow_shared::messaging::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body = serde_json::from_slice(&msg.delivery.data).unwrap_or(Value::Null);
        out.push((msg.delivery.properties.clone(), body));
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

pub fn enc(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

pub async fn mgmt(method: Method, path: &str, body: Option<Value>) -> Value {
    mgmt_at(RABBIT_MGMT, method, path, body).await
}

/// A call to the management API at `base` (`http://127.0.0.1:15672`).
pub async fn mgmt_at(base: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, format!("{base}{path}"))
        .basic_auth("guest", Some("guest"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req
        .send()
        .await
        .expect("RabbitMQ management API (enable rabbitmq_management)");
    assert!(res.status().is_success(), "management API {path}: {}", res.status());
    res.json().await.unwrap_or(Value::Null)
}

pub async fn create_vhost(vhost: &str) {
    create_vhost_at(RABBIT_MGMT, vhost).await;
}

/// Creates `vhost` (guest may do everything in it) through the management API at `base`.
pub async fn create_vhost_at(base: &str, vhost: &str) {
    mgmt_at(base, Method::PUT, &format!("/api/vhosts/{}", enc(vhost)), None).await;
    mgmt_at(
        base,
        Method::PUT,
        &format!("/api/permissions/{}/guest", enc(vhost)),
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
}

/// A hash of the migrations, naming the template database they produce.
fn migrations_hash() -> u64 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut h = DefaultHasher::new();
    for f in files {
        f.file_name().hash(&mut h);
        std::fs::read(&f).unwrap().hash(&mut h);
    }
    h.finish()
}

async fn admin() -> PgConnection {
    PgConnection::connect(PG_ADMIN_URL)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432")
}

/// Creates `name` as a copy of the migrated template (building the template once, under an
/// advisory lock, when the migrations change).
pub async fn create_database(name: &str) {
    let template = format!("orderflow_tpl_{:016x}", migrations_hash());
    let mut conn = admin().await;
    conn.execute("SELECT pg_advisory_lock(72707369)").await.unwrap();
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&template)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if !exists {
        let building = format!("{template}_building");
        exec(
            &mut conn,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&building)),
        )
        .await;
        exec(&mut conn, format!("CREATE DATABASE {}", quote_ident(&building))).await;
        let mut c = PgConnection::connect(&format!("{PG_BASE}/{building}")).await.unwrap();
        orderflow_shared::db::migrate(&mut c).await.unwrap();
        c.close().await.unwrap();
        exec(
            &mut conn,
            format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(&building),
                quote_ident(&template)
            ),
        )
        .await;
    }
    conn.execute("SELECT pg_advisory_unlock(72707369)").await.unwrap();
    // Copying fails while another backend is still leaving the template; retry briefly.
    for attempt in 0.. {
        let stmt = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(name),
            quote_ident(&template)
        );
        match conn.execute(sqlx::AssertSqlSafe(stmt)).await {
            Ok(_) => break,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("creating test database: {e}"),
        }
    }
    conn.close().await.unwrap();
}

pub async fn drop_database(name: &str) {
    let mut conn = admin().await;
    exec(
        &mut conn,
        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
    )
    .await;
    let _ = conn.close().await;
}

async fn exec(conn: &mut PgConnection, stmt: String) {
    conn.execute(sqlx::AssertSqlSafe(stmt)).await.unwrap();
}

/// base64url without padding (RFC 4648 §5), for hand-made JOSE parts.
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A message taken from a queue, as `tests/asyncapi/check.mjs` and `tests/cloudevents/check.py`
/// read it: its channel, AMQP properties (named as the AMQP spec does), headers (as JSON) and
/// body (as text).
pub fn captured_json(channel: &str, p: &lapin::BasicProperties, body: &[u8]) -> Value {
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let mut properties = serde_json::Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            properties.insert(k.to_owned(), v);
        }
    };
    set("content_type", text(p.content_type()).map(Value::from));
    set("content_encoding", text(p.content_encoding()).map(Value::from));
    set("delivery_mode", p.delivery_mode().map(Value::from));
    set("priority", p.priority().map(Value::from));
    set("correlation_id", text(p.correlation_id()).map(Value::from));
    set("reply_to", text(p.reply_to()).map(Value::from));
    set("expiration", text(p.expiration()).map(Value::from));
    set("message_id", text(p.message_id()).map(Value::from));
    set("timestamp", p.timestamp().map(Value::from));
    set("type", text(p.kind()).map(Value::from));
    set("user_id", text(p.user_id()).map(Value::from));
    set("app_id", text(p.app_id()).map(Value::from));
    set("cluster_id", text(p.cluster_id()).map(Value::from));
    json!({
        "channel": channel,
        "properties": properties,
        "headers": p
            .headers()
            .as_ref()
            .map(orderflow_workers::steps::dead_letters::table_to_json)
            .unwrap_or_else(|| json!({})),
        "body": String::from_utf8_lossy(body),
    })
}

/// Runs `bash <script> <args>` from the repository root: (success, stdout and stderr).
pub fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join(script))
        .args(args)
        .current_dir(root)
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Checks public events (as [`captured_json`] writes them) with the CloudEvents SDK's RabbitMQ
/// binding (`scripts/cloudevents-check.sh`): every one must parse as orderflow's CloudEvent.
pub fn assert_cloudevents(name: &str, messages: &[Value]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = root.join(format!("target/cloudevents/{name}.json"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, serde_json::to_vec_pretty(messages).unwrap()).unwrap();
    let (ok, output) = run_script("scripts/cloudevents-check.sh", &[file.as_os_str()]);
    let summary = format!("cloudevents: {} passed, 0 failed", messages.len());
    assert!(
        ok && output.lines().any(|l| l == summary),
        "the public events are not CloudEvents as the SDK reads them (expected `{summary}`):\n{output}"
    );
}
