//! `Prefer: wait=N` (RFC 7240) on placing and reading orders, against the real system.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestApp;
use reqwest::Method;
use serde_json::{Value, json};

async fn place(app: &TestApp, user: i64, product: i64, key: &str, prefer: Option<&str>) -> reqwest::Response {
    let mut headers = vec![("idempotency-key", key)];
    if let Some(p) = prefer {
        headers.push(("prefer", p));
    }
    app.request(
        Method::POST,
        "/api/orders",
        Some(&app.token(user)),
        Some(json!({"items": [{"productId": product, "quantity": 1}]})),
        &headers,
    )
    .await
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_waited_order_is_answered_201_with_the_whole_order_once_it_is_done() {
    let app = TestApp::spawn().await;
    let product = app.product("Waited", 1_000, 10).await;
    app.fund(7, 5_000).await;

    let res = place(&app, 7, product, "w-1", Some("wait=10")).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "preference-applied").as_deref(), Some("wait=10"));
    let location = header(&res, "location").unwrap();
    let order: Value = res.json().await.unwrap();
    assert_eq!(location, format!("/api/orders/{}", order["orderId"].as_str().unwrap()));
    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(order["paidAmount"], 1_000);
    let statuses: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["PENDING", "STOCK_RESERVED", "PAID", "CONFIRMED"]);
    // It is exactly what GET shows.
    let (_, shown) = app.get(&location, &app.token(7)).await;
    assert_eq!(shown, order);

    // The retry of a waited request answers with the order as it is now: done, 201.
    let again = place(&app, 7, product, "w-1", Some("wait=10")).await;
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["orderId"], order["orderId"]);
    assert_eq!(again["status"], "CONFIRMED");
    // Without the preference, the retry replays the first answer as stored.
    let replay = place(&app, 7, product, "w-1", None).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(header(&replay, "idempotent-replayed").as_deref(), Some("true"));
    // One order, one payment.
    assert_eq!(app.balance(7).await, 4_000);
    app.stop().await;
}

#[tokio::test]
async fn an_order_not_done_within_the_wait_is_answered_202_and_get_waits_for_its_next_change() {
    use orderflow_workers::WorkerKind::*;
    // No stock worker yet: orders stay PENDING.
    let mut app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Coupon, Payment, Order, Recovery],
        ..Default::default()
    })
    .await;
    let product = app.product("Slow", 1_000, 10).await;
    app.fund(8, 5_000).await;

    let started = Instant::now();
    let res = place(&app, 8, product, "w-2", Some("wait=1")).await;
    let took = started.elapsed();
    assert_eq!(res.status(), 202);
    assert!(took >= Duration::from_millis(950), "answered after {took:?}");
    assert_eq!(header(&res, "preference-applied").as_deref(), Some("wait=1"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "PENDING");
    let id = body["orderId"].as_str().unwrap().to_owned();

    // A GET that waits is answered when the order moves, not when the wait ends.
    let waiting = {
        let (url, token) = (app.url(&format!("/api/orders/{id}")), app.token(8));
        let http = app.http.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let res = http
                .get(url)
                .bearer_auth(token)
                .header("prefer", "wait=20")
                .send()
                .await
                .unwrap();
            (
                started.elapsed(),
                header(&res, "preference-applied"),
                res.json::<Value>().await.unwrap(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.spawn_workers(&[Stock]).await;
    let (took, applied, order) = waiting.await.unwrap();
    assert!(took < Duration::from_secs(10), "the GET waited {took:?}");
    assert_eq!(applied.as_deref(), Some("wait=20"));
    assert_ne!(order["status"], "PENDING");

    // A terminal order is answered at once, even when asked to wait.
    app.wait_terminal(8, &id, Duration::from_secs(30)).await;
    let started = Instant::now();
    let res = app
        .http
        .get(app.url(&format!("/api/orders/{id}")))
        .bearer_auth(app.token(8))
        .header("prefer", "wait=20")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Someone else's order is still 404, waiting or not.
    let res = app
        .http
        .get(app.url(&format!("/api/orders/{id}")))
        .bearer_auth(app.token(9))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_requests_do_not_poll_the_database_each() {
    use orderflow_workers::WorkerKind::*;
    // No stock worker: every order stays PENDING while its readers wait.
    let app = TestApp::spawn_with(common::Options {
        workers: vec![Relay],
        ..Default::default()
    })
    .await;
    let product = app.product("Watched", 1_000, 10).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(app.order(10 + i, &[(product, 1)], None).await);
    }
    let commits = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let before = commits().await;
    let wait = Duration::from_secs(3);
    let started = Instant::now();
    let requests = (0..1_000).map(|i| {
        let id = &ids[i % ids.len()];
        let user = 10 + (i % ids.len()) as i64;
        let (url, token, http) = (app.url(&format!("/api/orders/{id}")), app.token(user), app.http.clone());
        async move {
            http.get(url)
                .bearer_auth(token)
                .header("prefer", "wait=3")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let took = started.elapsed();
    assert!(
        answers.iter().all(|a| matches!(a, Ok(200))),
        "{:?}",
        answers.iter().find(|a| !matches!(a, Ok(200)))
    );
    assert!(took >= wait, "answered after {took:?}");
    // Each request reads its order twice (before and after waiting: ~2,000 statements, each
    // its own transaction in PostgreSQL's count, plus pool checks); the waiting itself is one
    // query per tick for all of them (~300 in 3 s), not one per request per tick (300,000).
    let used = commits().await - before;
    assert!(used < 10_000, "{used} transactions for 1,000 requests waiting 3 s");
    app.stop().await;
}

/// A waiting request is answered when the server shuts down (with the order as it is), so a
/// graceful shutdown does not wait the wait out (and then drop the request unanswered).
#[tokio::test]
async fn a_waiting_request_is_answered_when_the_server_shuts_down() {
    use orderflow_workers::WorkerKind::*;
    // No stock worker: the order stays PENDING for as long as anyone waits.
    let app = TestApp::spawn_with(common::Options {
        workers: vec![Relay],
        ..Default::default()
    })
    .await;
    let product = app.product("Shutdown", 1_000, 10).await;
    let id = app.order(30, &[(product, 1)], None).await;
    let (url, token, http) = (app.url(&format!("/api/orders/{id}")), app.token(30), app.http.clone());
    let waiting = tokio::spawn(async move {
        let res = http
            .get(url)
            .bearer_auth(token)
            .header("prefer", "wait=30")
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        (status, body["status"].as_str().map(str::to_owned))
    });
    // Waiting once the watcher checks its order: the watcher queries only while someone waits.
    app.wait_until(
        "the request never started waiting",
        Duration::from_secs(20),
        "EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
                 AND query LIKE 'SELECT id, status FROM orders WHERE id = ANY%')",
    )
    .await;
    let stopping = Instant::now();
    let stopped = tokio::spawn(app.stop());
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting request held up the shutdown")
        .unwrap();
    assert_eq!(answer, (200, Some("PENDING".to_owned())));
    stopped.await.unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(15), "{:?}", stopping.elapsed());
}

/// `Prefer` read by its grammar (RFC 7240, RFC 9110 §5.6): a `wait=` inside another
/// preference's quoted string is no wait (answered at once, no `Preference-Applied`), `+5` is
/// not delta-seconds, and a wait past any integer is the longest wait, applied as that.
#[tokio::test]
async fn only_a_real_wait_is_applied_and_an_oversized_one_is_the_cap() {
    use orderflow_workers::WorkerKind::*;
    // No stock worker: orders stay PENDING, so a wait that is applied runs to its end.
    let app = TestApp::spawn_with(common::Options {
        workers: vec![Relay, Coupon, Payment, Order, Recovery],
        ..Default::default()
    })
    .await;
    let product = app.product("Grammar", 1_000, 10).await;
    app.fund(8, 10_000).await;
    for (i, prefer) in [r#"foo="a,wait=7""#, "wait=+5", "wait=5s", "wait, respond-async"]
        .into_iter()
        .enumerate()
    {
        let started = Instant::now();
        let res = place(&app, 8, product, &format!("g-{i}"), Some(prefer)).await;
        assert_eq!(res.status(), 202, "{prefer}");
        assert_eq!(header(&res, "preference-applied"), None, "{prefer}");
        assert!(started.elapsed() < Duration::from_secs(5), "{prefer} waited");
    }
    // Past 2^64 - 1: the cap, as for 2^64 - 1 itself. Read (GET) so nothing new is placed.
    let order = place(&app, 8, product, "g-big", None).await;
    let id = order.json::<Value>().await.unwrap()["orderId"]
        .as_str()
        .unwrap()
        .to_owned();
    let cap = orderflow_api::wait::MAX_WAIT.as_secs();
    // (The harness's client gives up after 30 s, the cap itself.)
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(cap + 20))
        .build()
        .unwrap();
    let started = Instant::now();
    let res = patient
        .get(app.url(&format!("/api/orders/{id}")))
        .bearer_auth(app.token(8))
        .header("prefer", "wait=18446744073709551616")
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(cap), "answered at once");
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "preference-applied"), Some(format!("wait={cap}")));
    app.stop().await;
}
