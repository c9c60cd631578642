//! A primary that stops answering without closing its connections (a host that lost its power
//! or its network), against the real PostgreSQL: DATABASE_URL names two nodes, a proxy that
//! freezes and PostgreSQL itself, so the second is where a failover lands.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Options, PG_BASE, TestApp, proxy::Proxy};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Places an order as a shop's client does: retried with its Idempotency-Key while no answer
/// comes within 5 s or the answer says to retry (503, 409 `IDEMPOTENCY_KEY_IN_USE`); returns
/// its id, or fails the test after `within`.
async fn place_retrying(app: &TestApp, user: i64, product: i64, within: Duration) -> String {
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({"items": [{"productId": product, "quantity": 1}]});
    let deadline = Instant::now() + within;
    loop {
        let res = app
            .http
            .request(Method::POST, app.url("/api/orders"))
            .bearer_auth(app.token(user))
            .header("idempotency-key", &key)
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        // No answer within 5 s (the body included) is an answer to retry.
        if let Ok((status, Ok(answer))) = match res {
            Ok(res) => Ok((res.status(), res.json::<Value>().await)),
            Err(err) => Err(err),
        } {
            if status == StatusCode::ACCEPTED {
                return answer["orderId"].as_str().unwrap().to_owned();
            }
            // Retry shortly: the database is unavailable, or an earlier attempt of this
            // request (one the client stopped waiting for) still holds the key.
            assert!(
                status == StatusCode::SERVICE_UNAVAILABLE || answer["code"] == "IDEMPOTENCY_KEY_IN_USE",
                "{status}: {answer}"
            );
        }
        assert!(Instant::now() < deadline, "the order was never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An app whose DATABASE_URL names a proxy in front of PostgreSQL first, then PostgreSQL (where
/// a failover lands), and a pool straight to its database, to read past a frozen proxy.
async fn behind_proxy() -> (std::sync::Arc<Proxy>, TestApp, sqlx::PgPool) {
    let proxy = Proxy::start(5432).await;
    let app = TestApp::spawn_with(Options {
        database_front: Some(proxy.port),
        ..Default::default()
    })
    .await;
    let direct = sqlx::PgPool::connect(&format!("{PG_BASE}/{}", app.db_name))
        .await
        .unwrap();
    (proxy, app, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_is_left_and_every_order_still_goes_through() {
    let (proxy, app, direct) = behind_proxy().await;
    let product = app.product("Blackout", 1_000, 20).await;
    app.fund(71, 10_000).await;
    let first = app.order(71, &[(product, 1)], None).await;
    assert_eq!(
        app.wait_terminal(71, &first, Duration::from_secs(30)).await["status"],
        "CONFIRMED"
    );
    assert!(
        proxy.connections() > 0,
        "the processes reach PostgreSQL through the proxy"
    );

    // The node stops answering while an order is under way: nothing passes, nothing closes.
    // Transactions waiting on it are given up after the deadline (the connections just used
    // are handed out again unchecked), and the pool follows the node that accepts writes.
    let second = app.order(71, &[(product, 1)], None).await;
    proxy.freeze();
    // Orders keep coming at once, onto the connections just used. Both nodes are one
    // PostgreSQL here: the sessions behind the frozen link end (with the locks they held) as
    // they do on a primary that died; their clients hear nothing of it.
    let within = Duration::from_secs(60);
    let placing = futures_util::future::join_all((0..5).map(|_| place_retrying(&app, 71, product, within)));
    let (placed, ended) = tokio::join!(placing, end_sessions_behind(&proxy, &direct));
    assert!(ended > 0);

    // Read past the frozen node: PostgreSQL itself.
    let deadline = Instant::now() + within;
    let ids: Vec<uuid::Uuid> = placed
        .iter()
        .chain([&first, &second])
        .map(|id| id.parse().unwrap())
        .collect();
    loop {
        let confirmed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'CONFIRMED'")
                .bind(&ids)
                .fetch_one(&direct)
                .await
                .unwrap();
        if confirmed == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "only {confirmed} of 7 orders confirmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (stock, balance): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT stock FROM products WHERE id = $1), (SELECT balance FROM balances WHERE user_id = 71)",
    )
    .bind(product)
    .fetch_one(&direct)
    .await
    .unwrap();
    assert_eq!(
        (stock, balance),
        (13, 3_000),
        "every order took its stock and its money once"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(orders, 7, "each retried request placed one order");
    direct.close().await;
    // What the frozen node still holds is reset, as when it comes back.
    proxy.cut();
    app.stop().await;
}

/// The sessions of this test's database that reach PostgreSQL through `proxy`, ended as the
/// sessions of a primary that died end (their clients hear nothing behind a frozen link).
async fn end_sessions_behind(proxy: &Proxy, direct: &sqlx::PgPool) -> usize {
    sqlx::query_scalar::<_, bool>(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE client_port = ANY($1) AND datname = current_database() AND pid <> pg_backend_pid()",
    )
    .bind(proxy.outbound_ports())
    .fetch_all(direct)
    .await
    .unwrap()
    .len()
}

/// A request waiting on the primary when it stops answering (here a charge, waiting for a row
/// lock) is answered 503 at the API's work deadline instead of waiting for the kernel to give
/// up on the connection, as a write whose outcome is unknown; its retry with the same
/// Idempotency-Key, on the node the pool moved to, charges once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_a_primary_that_stops_answering_is_answered_at_the_deadline() {
    let (proxy, app, direct) = behind_proxy().await;
    app.fund(72, 1_000).await; // the balance's row, for the charge to wait on

    // The charge waits for the balance's row, locked here, on a connection through the proxy.
    let mut holder = direct.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM balances WHERE user_id = 72 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let key = uuid::Uuid::new_v4().to_string();
    let charge = || {
        app.http
            .post(app.url("/api/balance/charge"))
            .bearer_auth(app.token(72))
            .header("idempotency-key", &key)
            .json(&json!({"amount": 5_000}))
            .timeout(Duration::from_secs(90))
            .send()
    };
    let started = Instant::now();
    let waiting = tokio::spawn(charge());
    app.wait_until(
        "the charge waits for the row lock",
        Duration::from_secs(10),
        "(SELECT count(*) = 1 FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%INTO balances%')",
    )
    .await;

    // The node stops answering; the lock goes, and the charge's session ends with its
    // transaction, as a dead primary's sessions do.
    proxy.freeze();
    holder.commit().await.unwrap();
    assert!(end_sessions_behind(&proxy, &direct).await > 0);

    let res = waiting
        .await
        .unwrap()
        .expect("an answer before the client's own timeout");
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "COMMIT_OUTCOME_UNKNOWN", "{problem}");
    assert!(took < Duration::from_secs(45), "answered after {took:?}");

    // Retried with its key, on the node the pool moved to: charged once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = charge().await.unwrap();
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        if status == StatusCode::OK {
            assert_eq!(body["balance"], 6_000);
            break;
        }
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE || body["code"] == "IDEMPOTENCY_KEY_IN_USE",
            "{status}: {body}"
        );
        assert!(Instant::now() < deadline, "the retry was never answered: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (balance, charges): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT balance FROM balances WHERE user_id = 72),
                (SELECT count(*) FROM balance_ledger WHERE user_id = 72 AND kind = 'CHARGE')",
    )
    .fetch_one(&direct)
    .await
    .unwrap();
    assert_eq!((balance, charges), (6_000, 2), "the fund and the charge, each once");
    direct.close().await;
    proxy.cut();
    app.stop().await;
}

/// A request waiting for its order (`Prefer: wait`) is woken when the order is done, though
/// the primary stopped answering while it waited: the API's watcher gives up on the query the
/// node left unanswered and asks the node the pool moved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_its_order_is_woken_after_the_primary_stops_answering() {
    let (proxy, app, direct) = behind_proxy().await;
    let product = app.product("Lantern", 1_000, 5).await;
    app.fund(73, 5_000).await;

    // The order is held at its stock step (the product's row locked here) while its client
    // waits for the outcome.
    let mut holder = direct.begin().await.unwrap();
    // (NO KEY: the accept's foreign-key check of its lines may share it, the stock step not)
    sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR NO KEY UPDATE")
        .bind(product)
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = Instant::now();
    let waiting = tokio::spawn(
        app.http
            .post(app.url("/api/orders"))
            .bearer_auth(app.token(73))
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .header("prefer", "wait=30")
            .json(&json!({"items": [{"productId": product, "quantity": 1}]}))
            .timeout(Duration::from_secs(60))
            .send(),
    );
    app.wait_until(
        "the stock step waits for the product's row",
        Duration::from_secs(10),
        "(SELECT count(*) = 1 FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock')",
    )
    .await;

    // The node stops answering (the watcher's next query with it); its sessions end.
    proxy.freeze();
    holder.commit().await.unwrap();
    assert!(end_sessions_behind(&proxy, &direct).await > 0);

    let res = waiting.await.unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::CREATED, "done within the wait");
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    // Woken when it was done, not at the end of its 30 s.
    assert!(took < Duration::from_secs(28), "answered after {took:?}");
    direct.close().await;
    proxy.cut();
    app.stop().await;
}
