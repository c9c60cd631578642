//! Operations: the dashboard's session cookie, the overview and timeline admin APIs, and the
//! order events stream (server-sent events), against the real PostgreSQL and RabbitMQ.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Options, TestApp};
use orderflow_shared::messaging::topology::{self, STOCK_QUEUE};
use orderflow_workers::WorkerKind::{self, *};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn without(kinds: &[WorkerKind]) -> Vec<WorkerKind> {
    WorkerKind::ALL.iter().copied().filter(|k| !kinds.contains(k)).collect()
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn form_login(app: &TestApp, token: &str) -> reqwest::Response {
    no_redirects()
        .post(app.url("/ops/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap()
}

fn set_cookie(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// GET with a Cookie header and optional extra headers; returns (status, headers, body text).
async fn with_cookie(
    app: &TestApp,
    method: Method,
    path: &str,
    cookie: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut req = no_redirects()
        .request(method, app.url(path))
        .header(header::COOKIE, cookie);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    (status, headers, res.text().await.unwrap())
}

#[tokio::test]
async fn the_dashboard_session_is_an_admin_token_in_an_httponly_cookie() {
    let app = TestApp::api_only().await;

    // No session: the login form, and the admin API refuses.
    let res = app.request(Method::GET, "/ops", None, None, &[]).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = res.text().await.unwrap();
    assert!(html.contains(r#"data-testid="login-form""#), "{html}");
    assert!(!html.contains(r#"data-testid="funnel""#));
    let (status, _) = app.call(Method::GET, "/api/admin/overview", None, None).await;
    assert_eq!(status, 401);

    // A user's token, garbage and nothing are refused with the form again, never a session.
    for (token, status, says) in [
        (app.token(5), 403, "not an admin token"),
        ("not-a-jwt".to_owned(), 401, "not valid"),
        (app.keys.issue(1, true, -120).unwrap(), 401, "expired"),
        (String::new(), 400, "Paste an admin token"),
    ] {
        let res = form_login(&app, &token).await;
        assert_eq!(res.status(), status, "{token}");
        assert_eq!(set_cookie(&res), None);
        let html = res.text().await.unwrap();
        assert!(html.contains(r#"data-testid="login-form""#));
        assert!(
            html.contains(r#"data-testid="login-error""#) && html.contains(says),
            "{html}"
        );
    }
    let (status, problem) = app
        .call(Method::POST, "/ops/login", None, Some(json!({"token": app.token(5)})))
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (403, Some("ADMIN_REQUIRED"))
    );
    // An admin token too large for a browser to keep as a cookie (an identity provider's, with
    // many group claims): refused with the reason, not a cookie the browser would drop and a
    // login asked for again, in a loop. It still works as a bearer token.
    let large = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "1", "role": "admin", "exp": chrono::Utc::now().timestamp() + 300,
                "groups": vec!["a-group-of-the-identity-provider"; 150]}),
        &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert!(large.len() > 4096, "{}", large.len());
    let (status, problem) = app
        .call(Method::POST, "/ops/login", None, Some(json!({"token": large})))
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (422, Some("TOKEN_TOO_LARGE")),
        "{problem}"
    );
    let res = form_login(&app, &large).await;
    assert_eq!((res.status().as_u16(), set_cookie(&res)), (422, None));
    assert_eq!(app.get("/api/admin/overview", &large).await.0, StatusCode::OK);

    // An admin token: a cookie that lives as long as the token, and a redirect to the dashboard.
    let admin = app.admin_token();
    let res = form_login(&app, &admin).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()[header::LOCATION], "/ops");
    let cookie = set_cookie(&res).unwrap();
    let attributes: Vec<&str> = cookie.split(';').map(str::trim).collect();
    assert_eq!(attributes[0], format!("orderflow_admin={admin}"));
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attributes.contains(&attribute), "{cookie}");
    }
    assert!(
        !attributes.contains(&"Secure"),
        "plain HTTP could not keep it: {cookie}"
    );
    let max_age: i64 = attributes
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&max_age), "{cookie}");
    let session = attributes[0];

    // JSON works too.
    let res = app
        .request(Method::POST, "/ops/login", None, Some(json!({"token": admin})), &[])
        .await;
    assert_eq!(res.status(), 204);
    assert!(set_cookie(&res).unwrap().starts_with("orderflow_admin="));

    // With the cookie: the dashboard, its assets, and the admin API.
    let (status, headers, html) = with_cookie(&app, Method::GET, "/ops", session, &[]).await;
    assert_eq!(status, 200);
    assert!(html.contains(r#"data-testid="funnel""#) && html.contains("/ops/app.js"));
    assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    for (path, kind) in [("/ops/app.js", "text/javascript"), ("/ops/app.css", "text/css")] {
        let res = app.request(Method::GET, path, None, None, &[]).await;
        assert_eq!(res.status(), 200);
        assert!(res.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind));
    }
    let (status, _, body) = with_cookie(&app, Method::GET, "/api/admin/overview", session, &[]).await;
    assert_eq!(status, 200, "{body}");

    // A bearer header wins over the cookie.
    let (status, _, body) = with_cookie(
        &app,
        Method::GET,
        "/api/admin/overview",
        session,
        &[("authorization", &format!("Bearer {}", app.token(5)))],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Credentials of another scheme (a proxy's Basic authentication, which the browser sends
    // with every request) are not orderflow's: the cookie counts.
    let (status, _, body) = with_cookie(
        &app,
        Method::GET,
        "/api/admin/overview",
        session,
        &[("authorization", "Basic b3BzOnNlY3JldA==")],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A change authenticated by the cookie must come from the dashboard's own origin.
    let missing = uuid::Uuid::now_v7();
    let cancel = format!("/api/admin/orders/{missing}/cancel");
    let (status, _, body) = with_cookie(&app, Method::POST, &cancel, session, &[("sec-fetch-site", "same-site")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CROSS_ORIGIN_REQUEST"));
    let (status, _, body) = with_cookie(
        &app,
        Method::POST,
        &cancel,
        session,
        &[("origin", "http://127.0.0.1:1"), ("host", "127.0.0.1:2")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = with_cookie(
        &app,
        Method::POST,
        &cancel,
        session,
        &[("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, 404, "past auth: {body}");

    // An expired session shows the form again and clears the cookie.
    let expired = format!("orderflow_admin={}", app.keys.issue(1, true, -120).unwrap());
    let (status, headers, html) = with_cookie(&app, Method::GET, "/ops", &expired, &[]).await;
    assert_eq!(status, 200);
    assert!(html.contains(r#"data-testid="login-form""#) && html.contains("expired"));
    assert!(headers[header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));

    // Another site's form can neither end the session nor start one (both set the cookie).
    let (status, headers, body) = with_cookie(
        &app,
        Method::POST,
        "/ops/logout",
        session,
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CROSS_ORIGIN_REQUEST") && !headers.contains_key(header::SET_COOKIE));
    let res = app
        .request(
            Method::POST,
            "/ops/login",
            None,
            Some(json!({"token": admin})),
            &[("origin", "https://elsewhere.example")],
        )
        .await;
    assert_eq!(res.status(), 403);
    assert!(set_cookie(&res).is_none());
    // The dashboard's own form over plain HTTP (no Sec-Fetch-Site there), straight or behind a
    // proxy that rewrites Host: its Origin names the host the browser asked.
    for headers in [
        &[
            ("origin", "http://ops.shop.example:8080"),
            ("host", "ops.shop.example:8080"),
        ][..],
        &[
            ("origin", "http://ops.shop.example"),
            ("host", "10.0.0.7:8080"),
            ("x-forwarded-host", "ops.shop.example"),
        ][..],
    ] {
        let res = app
            .request(Method::POST, "/ops/login", None, Some(json!({"token": admin})), headers)
            .await;
        assert_eq!(res.status(), 204, "{headers:?}");
        assert!(!set_cookie(&res).unwrap().contains("Secure"));
    }
    // Over HTTPS (the browser's Origin says so, or the proxy that ends TLS), the cookie is
    // Secure: the browser never sends the admin token over plain HTTP.
    for headers in [
        &[("origin", "https://ops.shop.example"), ("host", "ops.shop.example")][..],
        &[("host", "ops.shop.example"), ("x-forwarded-proto", "https")][..],
    ] {
        let res = app
            .request(Method::POST, "/ops/login", None, Some(json!({"token": admin})), headers)
            .await;
        assert_eq!(res.status(), 204, "{headers:?}");
        let cookie = set_cookie(&res).unwrap();
        assert!(cookie.split(';').any(|a| a.trim() == "Secure"), "{cookie}");
    }

    // Log out: the cookie is cleared.
    let (status, headers, _) = with_cookie(&app, Method::POST, "/ops/logout", session, &[]).await;
    assert_eq!(status, 303);
    let cleared = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        cleared.starts_with("orderflow_admin=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    app.stop().await;
}

async fn overview(app: &TestApp, query: &str) -> Value {
    let (status, body) = app
        .get(&format!("/api/admin/overview{query}"), &app.admin_token())
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn queue<'a>(overview: &'a Value, name: &str) -> &'a Value {
    overview["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no queue {name} in {overview}"))
}

/// The dashboard's stuck-order listing (asked every 2 s while it is open) finds the orders in
/// flight among many ended ones, and its statements read them through the in-flight index in
/// any plan PostgreSQL makes (custom or generic): no ended order is read, however many there are.
#[tokio::test]
async fn the_stuck_order_listing_reads_only_orders_in_flight() {
    let app = TestApp::api_only().await;
    sqlx::raw_sql(
        "INSERT INTO orders (id, user_id, status, total_amount, deadline_at, updated_at)
         SELECT gen_random_uuid(), 1 + g % 100, 'CONFIRMED', 100, now(), now() - interval '1 hour'
           FROM generate_series(1, 20000) g;
         INSERT INTO orders (id, user_id, status, total_amount, deadline_at, updated_at)
         SELECT gen_random_uuid(), 1 + g, 'PENDING', 100, now(), now() - interval '5 minutes'
           FROM generate_series(1, 5) g;
         ANALYZE orders;",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app
        .get("/api/admin/orders?stuck=true&olderThan=30s&size=20", &app.admin_token())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 5, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 5);
    let (status, body) = app
        .get("/api/admin/orders?status=PENDING&size=20", &app.admin_token())
        .await;
    assert_eq!((status.as_u16(), body["total"].as_i64()), (200, Some(5)), "{body}");

    let (page, count) = orderflow_api::routes::admin::order_listing(true);
    for (name, statement) in [("page", page), ("count", count)] {
        for (mode, plan) in app
            .plans(&statement, "text, float8, int8, int8", "NULL, 30000, 20, 0")
            .await
        {
            assert!(!plan.contains("Seq Scan"), "{name}, {mode}:\n{plan}");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn an_orders_timeline_finds_its_dead_letters_without_reading_them_all() {
    let app = TestApp::api_only().await;
    let product = app.product("Letters", 1_000, 5).await;
    let id = app.order(33, &[(product, 1)], None).await;
    // 20,000 letters about other orders; two about this one: alone, and in a batch of three.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO dead_letters (fingerprint, message_type, order_id, order_ids, body)
         SELECT gen_random_uuid(), 'stock.reserve', o, ARRAY[o], '{{}}' FROM (SELECT gen_random_uuid() o
           FROM generate_series(1, 20000)) g;
         INSERT INTO dead_letters (fingerprint, message_type, order_id, order_ids, body) VALUES
           (gen_random_uuid(), 'stock.reserve', '{id}', ARRAY['{id}'::uuid], '{{}}'),
           (gen_random_uuid(), 'coupon.apply', NULL, ARRAY[gen_random_uuid(), '{id}', gen_random_uuid()], '{{}}');
         ANALYZE dead_letters;"
    )))
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, timeline) = app
        .get(&format!("/api/admin/orders/{id}/timeline"), &app.admin_token())
        .await;
    assert_eq!(status, 200, "{timeline}");
    let kinds: Vec<&str> = timeline["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["messageType"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["stock.reserve", "coupon.apply"], "{timeline}");

    let statement = orderflow_api::routes::ops::DEAD_LETTERS_OF_ORDER;
    for (mode, plan) in app.plans(statement, "uuid", &format!("'{id}'")).await {
        // Both indexes, so no row of another order is read.
        assert!(
            !plan.contains("Seq Scan")
                && plan.contains("dead_letters_order_ids_idx")
                && plan.contains("dead_letters_order_idx"),
            "{mode}:\n{plan}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn the_overview_counts_orders_per_state_queues_outbox_dead_letters_and_stuck_orders() {
    // No stock worker at first: the first order waits in PENDING with its message queued.
    let mut app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        ..Default::default()
    })
    .await;
    let product = app.product("Overview", 1_000, 10).await;
    app.fund(21, 10_000).await;
    let stuck = app.order(21, &[(product, 1)], None).await;
    app.wait_quiescent_outbox().await;
    let o = overview(&app, "").await;
    assert_eq!(o["funnel"]["PENDING"], 1);
    assert_eq!(queue(&o, STOCK_QUEUE)["messages"], 1);
    assert_eq!(queue(&o, STOCK_QUEUE)["consumers"], 0);
    assert_eq!(o["stuck"], 0, "not stuck yet: it changed less than 30 s ago");
    assert_eq!(overview(&app, "?stuckAfter=0ms").await["stuck"], 1);

    // Its message is lost (taken off the queue); the stock worker starts; two more orders go
    // through. The first stays PENDING: stuck once it is 30 s old.
    assert_eq!(app.drain_queue(STOCK_QUEUE).await.len(), 1);
    app.spawn_workers(&[Stock]).await;
    for _ in 0..2 {
        let id = app.order(21, &[(product, 1)], None).await;
        assert_eq!(app.wait_terminal(21, &id, WAIT).await["status"], "CONFIRMED");
    }
    app.wait_quiescent_outbox().await;
    sqlx::query("UPDATE orders SET updated_at = now() - interval '1 minute' WHERE id = $1::uuid")
        .bind(&stuck)
        .execute(&app.pool)
        .await
        .unwrap();

    let o = overview(&app, "").await;
    let funnel = o["funnel"].as_object().unwrap();
    assert_eq!(funnel.len(), 8, "every status: {o}");
    for (status, n) in funnel {
        let expected = match status.as_str() {
            "PENDING" => 1,
            "CONFIRMED" => 2,
            _ => 0,
        };
        assert_eq!(n, expected, "{status} in {o}");
    }
    let names: Vec<&str> = o["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, topology::QUEUES.iter().map(|q| q.name).collect::<Vec<_>>());
    assert_eq!(queue(&o, STOCK_QUEUE)["messages"], 0);
    assert_eq!(queue(&o, STOCK_QUEUE)["consumers"], 1);
    // The first order's deadline went out before the others were placed; theirs, placed one
    // after the other, in one message or two (the relay gathers a second's deadlines).
    let deadlines = queue(&o, topology::DEADLINE_QUEUE)["messages"].as_i64().unwrap();
    assert!((2..=3).contains(&deadlines), "deadline messages: {deadlines}");
    assert_eq!(queue(&o, topology::DEADLINE_QUEUE)["consumers"], 0);
    assert_eq!(queue(&o, topology::DATA_PLATFORM_QUEUE)["messages"], 2);
    assert_eq!(o["brokerError"], Value::Null);
    assert_eq!(
        o["outbox"],
        json!({"unsent": 0, "oldestUnsentAgeSeconds": null, "parked": 0})
    );
    assert_eq!(o["deadLetters"], json!({"new": 0}));
    assert_eq!(o["stuck"], 1);
    assert_eq!(o["stuckAfterSeconds"], 30.0);
    assert_eq!(overview(&app, "?stuckAfter=5m").await["stuck"], 0);

    let (status, problem) = app.get("/api/admin/overview?stuckAfter=soon", &app.admin_token()).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (400, Some("INVALID_DURATION"))
    );
    let (status, _) = app.get("/api/admin/overview", &app.token(21)).await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[tokio::test]
async fn the_overview_shows_outbox_lag_and_new_dead_letters_and_survives_an_unreachable_broker() {
    // No relay: an outbox row stays unsent.
    let app = TestApp::api_only().await;
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body, created_at)
         VALUES (gen_random_uuid(), 'orderflow.work', 'stock.reserve', 'stock.reserve', '{}', now() - interval '10 seconds')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dead_letters (fingerprint, body) VALUES (gen_random_uuid(), '\\x00'), (gen_random_uuid(), '')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE dead_letters SET status = 'DISCARDED' WHERE id = (SELECT max(id) FROM dead_letters)")
        .execute(&app.pool)
        .await
        .unwrap();
    let o = overview(&app, "").await;
    assert_eq!(o["outbox"]["unsent"], 1);
    let lag = o["outbox"]["oldestUnsentAgeSeconds"].as_f64().unwrap();
    assert!((10.0..60.0).contains(&lag), "{lag}");
    assert_eq!(o["deadLetters"], json!({"new": 1}));

    // The same database behind an API whose broker cannot be reached.
    let mut config = app.config.clone();
    config.amqp_url = "amqp://guest:secret@127.0.0.1:1/%2f".to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(orderflow_api::serve(
        listener,
        orderflow_api::AppState::new(app.pool.clone(), Arc::new(config)),
        shutdown.clone(),
    ));

    let res = app
        .http
        .get(format!("{base}/api/admin/overview"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let o: Value = res.json().await.unwrap();
    assert_eq!(o["queues"], json!([]));
    let error = o["brokerError"].as_str().unwrap();
    assert!(error.contains("cannot connect to the broker"), "{error}");
    assert!(!error.contains("secret"), "the password is redacted: {error}");
    assert_eq!(o["funnel"]["PENDING"], 0);

    shutdown.cancel();
    let _ = server.await;
    app.stop().await;
}

fn hop<'a>(timeline: &'a Value, message_type: &str) -> &'a Value {
    timeline["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["messageType"] == message_type)
        .unwrap_or_else(|| panic!("no {message_type} hop in {timeline}"))
}

fn consumers(hop: &Value) -> Vec<&str> {
    hop["handledBy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["consumer"].as_str().unwrap())
        .collect()
}

fn statuses(timeline: &Value) -> Vec<&str> {
    timeline["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect()
}

/// Polls the timeline until `done` holds.
async fn timeline_when(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, timeline) = app
            .get(&format!("/api/admin/orders/{id}/timeline"), &app.admin_token())
            .await;
        assert_eq!(status, 200, "{timeline}");
        if done(&timeline) {
            return timeline;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timeline never complete: {timeline}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_timeline_shows_each_status_and_each_hop_with_the_worker_that_handled_it() {
    let app = TestApp::spawn().await;
    let product = app.product("Timeline", 2_000, 10).await;
    app.fund(31, 2_000).await;

    // Confirmed: every forward hop, handled by its worker; the public event, published for
    // the data platform, is consumed by nobody inside orderflow.
    let id = app.order(31, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(31, &id, WAIT).await["status"], "CONFIRMED");
    let t = timeline_when(&app, &id, |t| {
        t["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["messageType"] == "order.confirm" && !m["handledBy"].as_array().unwrap().is_empty())
            // The relay marks a batch sent after the broker confirmed it, which can be after a
            // consumer already handled it.
            && t["messages"].as_array().unwrap().iter().all(|m| m["sentAt"].is_string())
    })
    .await;
    assert_eq!(t["order"]["orderId"], id.as_str());
    assert_eq!(t["order"]["status"], "CONFIRMED");
    assert_eq!(t["order"]["paidAmount"], 2_000);
    assert_eq!(t["order"]["stockHeld"], true);
    assert_eq!(
        t["order"]["items"],
        json!([{"productId": product, "quantity": 1, "unitPrice": 2_000}])
    );
    assert_eq!(statuses(&t), ["PENDING", "STOCK_RESERVED", "PAID", "CONFIRMED"]);
    assert!(t["history"].as_array().unwrap().iter().all(|h| h["at"].is_string()));
    for (message_type, worker) in [
        ("stock.reserve", "stock"),
        ("payment.charge", "payment"),
        ("order.confirm", "order"),
    ] {
        let m = hop(&t, message_type);
        assert_eq!(consumers(m), [worker], "{m}");
        assert_eq!(m["compensation"], false);
        assert_eq!(m["replay"], false);
        assert!(m["sentAt"].is_string() && m["createdAt"].is_string(), "{m}");
    }
    assert_eq!(
        consumers(hop(&t, "order.deadline")),
        Vec::<&str>::new(),
        "not expired yet"
    );
    assert_eq!(t["deadLetters"], json!([]));

    // Cancelled for want of money: the stock is given back by compensations, marked as such.
    let id = app.order(31, &[(product, 1)], None).await;
    let order = app.wait_terminal(31, &id, WAIT).await;
    assert_eq!(order["reason"], "INSUFFICIENT_BALANCE");
    let t = timeline_when(&app, &id, |t| {
        t["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["sentAt"].is_string())
    })
    .await;
    assert_eq!(statuses(&t), ["PENDING", "STOCK_RESERVED", "CANCELLING", "CANCELLED"]);
    assert_eq!(t["history"][2]["reason"], "INSUFFICIENT_BALANCE");
    for (message_type, worker, compensation) in [
        ("stock.reserve", "stock", false),
        ("payment.charge", "payment", false),
        ("stock.release", "stock", true),
        ("order.finish-cancel", "order", true),
    ] {
        let m = hop(&t, message_type);
        assert_eq!(consumers(m), [worker], "{m}");
        assert_eq!(m["compensation"], compensation, "{m}");
    }

    // Errors.
    let admin = app.admin_token();
    let (status, problem) = app
        .get(&format!("/api/admin/orders/{}/timeline", uuid::Uuid::now_v7()), &admin)
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("ORDER_NOT_FOUND"))
    );
    let (status, problem) = app.get("/api/admin/orders/not-a-uuid/timeline", &admin).await;
    assert_eq!(status, 400, "{problem}");
    let (status, _) = app
        .get(&format!("/api/admin/orders/{id}/timeline"), &app.token(31))
        .await;
    assert_eq!(status, 403);
    app.stop().await;
}

/// One server-sent event: its name, id and JSON data.
#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<i64>,
    data: Value,
}

/// Reads a `text/event-stream` response event by event.
struct SseReader {
    res: reqwest::Response,
    buffer: String,
}

impl SseReader {
    fn new(res: reqwest::Response) -> Self {
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        Self {
            res,
            buffer: String::new(),
        }
    }

    /// The next event, or None at the end of the stream. Keep-alive comments are skipped.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
                for line in block.lines() {
                    match line.split_once(':') {
                        Some(("", _)) => {} // a comment
                        Some(("event", v)) => event = v.trim().to_owned(),
                        Some(("id", v)) => id = v.trim().parse().ok(),
                        Some(("data", v)) => data.push_str(v.trim_start()),
                        _ => {}
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap();
                return Some(SseEvent { event, id, data });
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("the stream stalled")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn events(app: &TestApp, user: i64, id: &str, last_event_id: Option<i64>) -> reqwest::Response {
    let mut req = app
        .http
        .get(app.url(&format!("/api/orders/{id}/events")))
        .bearer_auth(app.token(user));
    if let Some(last) = last_event_id {
        req = req.header("last-event-id", last.to_string());
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn order_events_stream_each_status_change_until_the_order_is_terminal() {
    // No stock worker at first, so the stream is open before anything happens.
    let mut app = TestApp::spawn_with(Options {
        workers: without(&[Stock]),
        ..Default::default()
    })
    .await;
    let product = app.product("Streamed", 1_000, 5).await;
    app.fund(41, 5_000).await;
    let id = app.order(41, &[(product, 1)], None).await;

    let mut stream = SseReader::new(events(&app, 41, &id, None).await);
    let first = stream.next().await.unwrap();
    assert_eq!(first.event, "status");
    assert_eq!(first.data["status"], "PENDING");
    assert_eq!(first.data["reason"], Value::Null);
    assert!(first.data["at"].is_string());

    // Live: the rest arrives as the pipeline moves, then the stream ends.
    app.spawn_workers(&[Stock]).await;
    let mut seen = vec![first];
    while let Some(event) = stream.next().await {
        seen.push(event);
    }
    let statuses: Vec<&str> = seen.iter().map(|e| e.data["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["PENDING", "STOCK_RESERVED", "PAID", "CONFIRMED"]);
    let ids: Vec<i64> = seen.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Connecting later replays the history and ends; resuming after the first event sends the
    // rest; resuming after the last answers 204 (an EventSource then stops reconnecting).
    let mut replay = SseReader::new(events(&app, 41, &id, None).await);
    let mut again = Vec::new();
    while let Some(event) = replay.next().await {
        again.push(event.data["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(again, statuses);
    let mut resumed = SseReader::new(events(&app, 41, &id, Some(ids[0])).await);
    let mut rest = Vec::new();
    while let Some(event) = resumed.next().await {
        rest.push(event.id.unwrap());
    }
    assert_eq!(rest, ids[1..]);
    assert_eq!(events(&app, 41, &id, Some(ids[3])).await.status(), 204);

    // Someone else's order does not exist for them; no token, no stream; a bad id is 400.
    assert_eq!(events(&app, 42, &id, None).await.status(), 404);
    let res = app
        .request(Method::GET, &format!("/api/orders/{id}/events"), None, None, &[])
        .await;
    assert_eq!(res.status(), 401);
    assert_eq!(events(&app, 41, "nope", None).await.status(), 400);
    app.stop().await;
}

/// A stream is access: it ends when the caller's token expires (after sending what happened
/// so far), not 10 minutes later, so a user whose tokens are no longer renewed stops seeing
/// their orders move.
#[tokio::test]
async fn an_order_event_stream_ends_when_its_token_expires() {
    let app = TestApp::spawn_with(Options {
        workers: vec![Relay],
        ..Default::default()
    })
    .await;
    let product = app.product("Streamed briefly", 1_000, 5).await;
    let id = app.order(43, &[(product, 1)], None).await;
    let token = app.keys.issue(43, false, 3).unwrap();
    let res = app
        .http
        .get(app.url(&format!("/api/orders/{id}/events")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let started = Instant::now();
    let mut stream = SseReader::new(res);
    assert_eq!(stream.next().await.unwrap().data["status"], "PENDING");
    assert!(stream.next().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    app.stop().await;
}

/// Open event streams do not poll the database each: they wait on the API's watcher, which
/// checks every watched order in one query per tick (every 200 ms while only streams watch),
/// and read the history when their order moves. So 30 streams on orders that stay PENDING for
/// 3 s cost their opening and a few dozen checks in all beyond what the app does without them,
/// not a history read every 200 ms each (450 more) nor a check every 10 ms (300 more).
#[tokio::test]
async fn open_event_streams_do_not_poll_the_database_each() {
    // No stock worker: every order stays PENDING while its streams are open.
    let app = TestApp::spawn_with(Options {
        workers: vec![Relay],
        ..Default::default()
    })
    .await;
    let product = app.product("Streamed often", 1_000, 10).await;
    let mut ids = Vec::new();
    for user in 60..70 {
        ids.push((user, app.order(user, &[(product, 1)], None).await));
    }
    let commits = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let open_for = Duration::from_secs(3);
    // What the app does without streams for as long (its gauges, trend samples, the relay).
    let before = commits().await;
    tokio::time::sleep(open_for).await;
    let without = commits().await - before;
    let before = commits().await;
    let streams = (0..30).map(|i| {
        let (user, id) = ids[i % ids.len()].clone();
        let app = &app;
        async move {
            let mut stream = SseReader::new(events(app, user, &id, None).await);
            let first = stream.next().await.expect("the history first");
            assert_eq!(first.data["status"], "PENDING");
            // Open, nothing more to say, until the test lets go.
            assert!(
                tokio::time::timeout(open_for, stream.next()).await.is_err(),
                "the stream ended"
            );
        }
    });
    futures_util::future::join_all(streams).await;
    // Each stream: the order's status and its history when it opens (60 in all), then nothing
    // until the order moves; the watcher's one query per 200 ms (15).
    let used = commits().await - before;
    assert!(
        used - without < 150,
        "{used} transactions with 30 streams open 3 s, {without} without"
    );
    app.stop().await;
}

/// Logins whose bodies never finish arriving hold no turn of admission control, so other callers
/// are answered at once: were they admitted, the first 24 (twice the pool of 12) would hold every
/// turn until their body deadline and the other 36 would be ahead of any caller in the queue,
/// which would be answered 503 after waiting its turn out; a login body that is not JSON is refused as on every
/// JSON route, and JSON without a token asks for one.
#[tokio::test]
async fn logins_that_send_their_body_slowly_hold_no_turn() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::api_only().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stalled = Vec::new();
    for _ in 0..60 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(
            format!(
                "POST /ops/login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"token\":\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // every one read as far as it goes
    // Were the logins holding turns, this would wait its own out and be answered 503.
    let (status, body) = app.get("/api/products", &app.token(3)).await;
    assert_eq!(status, 200, "{body}");
    drop(stalled);

    for (body, want) in [
        (&b"{"[..], (400, "MALFORMED_JSON")),
        (b"{}", (400, "MISSING_TOKEN")),
        (b"{\"token\": 7}", (400, "MISSING_TOKEN")),
    ] {
        let res = app
            .http
            .post(app.url("/ops/login"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let problem: Value = res.json().await.unwrap();
        assert_eq!((status, problem["code"].as_str().unwrap()), want, "{problem}");
    }
    // Neither JSON nor a form.
    let res = app
        .http
        .post(app.url("/ops/login"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body("token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "INVALID_CONTENT_TYPE");
    app.stop().await;
}
