//! The API's contract: every number that reaches SQL or a timer is bounded (query strings,
//! headers, flags and environment variables), and the OpenAPI document states every constraint
//! and every answer. (`scripts/contract-test.sh` also validates the document with
//! openapi-spec-validator and fuzzes the running API against it with schemathesis.)

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::process::Command;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Overflowing or out-of-range durations are 400 `INVALID_DURATION`, never a 500 from SQL and
/// never a wrapped value; the largest allowed one (7 days) works in every unit.
#[tokio::test]
async fn durations_in_query_strings_are_checked_and_bounded() {
    let app = TestApp::api_only().await;
    let admin = app.admin_token();
    let product = app.product("Clock", 1_000, 5).await;
    app.fund(9, 5_000).await;
    let id = app.order(9, &[(product, 1)], None).await;

    for bad in [
        "300000000000s",
        "18446744073709551615s",
        "18446744073709551616s",
        "307445734561825861m",
        "99999999999999999999999ms",
        "604801s",
        "10081m",
        "604800001ms",
        "-1s",
        "1.5s",
        "1h",
        "1%20s",
        "030s",
    ] {
        for path in [
            format!("/api/admin/overview?stuckAfter={bad}"),
            format!("/api/admin/orders?olderThan={bad}"),
        ] {
            let (status, body) = app.get(&path, &admin).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("INVALID_DURATION")),
                "{path}: {body}"
            );
        }
    }
    // The bound itself, in each unit: nothing is that old, so nothing is stuck.
    for max in ["604800s", "604800", "10080m", "604800000ms"] {
        let (status, body) = app.get(&format!("/api/admin/overview?stuckAfter={max}"), &admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["stuckAfterSeconds"], 604_800.0);
        assert_eq!(body["stuck"], 0);
        let (status, body) = app.get(&format!("/api/admin/orders?olderThan={max}"), &admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["total"], 0);
    }
    // And zero: the one order is older than that.
    let (_, body) = app.get("/api/admin/overview?stuckAfter=0", &admin).await;
    assert_eq!(
        (body["stuck"].as_i64(), body["stuckAfterSeconds"].as_f64()),
        (Some(1), Some(0.0))
    );
    let (_, body) = app.get("/api/admin/orders?olderThan=0ms", &admin).await;
    assert_eq!(body["items"][0]["orderId"], id.as_str());
    // The order was never touched by any of it.
    let status: String = sqlx::query_scalar("SELECT status FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "PENDING");
    app.stop().await;
}

/// `Last-Event-ID` must be a number the stream sent; anything else is 400, not ignored.
#[tokio::test]
async fn a_malformed_last_event_id_is_refused() {
    let app = TestApp::api_only().await;
    let product = app.product("Stream", 1_000, 5).await;
    app.fund(9, 5_000).await;
    let id = app.order(9, &[(product, 1)], None).await;
    for bad in ["abc", "-1", "+1", "1.0", "99999999999999999999", " "] {
        let res = app
            .request(
                reqwest::Method::GET,
                &format!("/api/orders/{id}/events"),
                Some(&app.token(9)),
                None,
                &[("last-event-id", bad)],
            )
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "INVALID_LAST_EVENT_ID", "{bad:?}");
    }
    app.stop().await;
}

/// The Idempotency-Key grammar is the schema's pattern: bare (visible ASCII other than `"`) or
/// an sf-string (RFC 8941: in double quotes, spaces allowed, `\"` and `\\` escaped), the two
/// the same key, 1..=255 characters, sent once.
#[tokio::test]
async fn an_idempotency_key_may_be_quoted_and_is_the_same_key() {
    let app = TestApp::api_only().await;
    let charge_with = |keys: Vec<&'static str>| {
        let app = &app;
        async move {
            let headers: Vec<(&str, &str)> = keys.iter().map(|k| ("idempotency-key", *k)).collect();
            let res = app
                .request(
                    reqwest::Method::POST,
                    "/api/balance/charge",
                    Some(&app.token(30)),
                    Some(json!({"amount": 1_000})),
                    &headers,
                )
                .await;
            let status = res.status();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (status, replayed, res.json::<Value>().await.unwrap())
        }
    };
    let charge = |key: &'static str| charge_with(vec![key]);
    let (status, replayed, body) = charge("k-1").await;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{body}");
    let (status, replayed, body) = charge("\"k-1\"").await;
    assert_eq!((status, replayed), (StatusCode::OK, true), "{body}");
    assert_eq!(body, json!({"userId": 30, "balance": 1_000}));
    for bad in ["\"", "\"\"", "\"k-1", "k\"1", "\"k\"1\""] {
        let (status, _, body) = charge(bad).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("INVALID_IDEMPOTENCY_KEY")),
            "{bad}"
        );
    }
    // Escapes are undone: `"a\"b"` is the key a"b; a space inside quotes is part of the key.
    let (status, replayed, body) = charge(r#""k \"2\\""#).await;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{body}");
    let (status, replayed, _) = charge(r#""k \"2\\""#).await;
    assert_eq!((status, replayed), (StatusCode::OK, true));
    for bad in [r#""k\x""#, r#""k\""#] {
        let (status, _, body) = charge(bad).await;
        assert_eq!(body["code"], "INVALID_IDEMPOTENCY_KEY", "{bad}: {status}");
    }
    // Twice, even the same key: which one was meant is not for the server to guess.
    let (status, _, body) = charge_with(vec!["k-3", "k-3"]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_IDEMPOTENCY_KEY"))
    );
    let (rows, balance): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(max(balance_after), 0) FROM balance_ledger WHERE user_id = 30")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((rows, balance), (2, 2_000));
    app.stop().await;
}

/// A JSON Schema `integer` is any number with a zero fractional part: `1000.0` and `1e3` are
/// the amount 1000; `1000.5` is not an integer, and integers beyond ±(2^53 − 1) (RFC 7493
/// §2.2) are not read at all.
#[tokio::test]
async fn integers_are_read_as_json_schema_defines_them() {
    let app = TestApp::api_only().await;
    let token = app.token(31);
    let charge = |body: &'static str| {
        let (app, token) = (&app, &token);
        async move {
            let res = app
                .http
                .post(app.url("/api/balance/charge"))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = charge(r#"{"amount": 1000.0}"#).await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"userId": 31, "balance": 1_000}))
    );
    let (status, body) = charge(r#"{"amount": 1e3}"#).await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"userId": 31, "balance": 2_000}))
    );
    for bad in [
        r#"{"amount": 1000.5}"#,
        r#"{"amount": 9007199254740992}"#,
        r#"{"amount": 1e16}"#,
    ] {
        let (status, body) = charge(bad).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("INVALID_BODY")),
            "{bad}"
        );
    }
    // The first rule broken, in the shop's order, for a float-spelled integer too.
    let (status, body) = charge(r#"{"amount": 123.0}"#).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_AMOUNT_UNIT"))
    );
    let rows: Vec<i64> = sqlx::query_scalar("SELECT amount FROM balance_ledger WHERE user_id = 31 ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, [1_000, 1_000]);
    app.stop().await;
}

/// What `orderflow` says about a flag or environment variable.
fn orderflow(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    cmd.args(args).env_remove("ORDER_TIMEOUT").env_remove("SWEEP_INTERVAL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Durations and counts that reach a timer, a semaphore or arithmetic are refused at startup
/// with a clear message (clap's exit code 2), from a flag or an environment variable alike;
/// never a panic, never a wrapped value.
#[test]
fn flags_and_environment_variables_are_bounded_at_startup() {
    // The settings are read by the commands that run the system; `migrate` reads them first,
    // then stops at once on a login PostgreSQL refuses (exit 1, nothing written).
    let migrate = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["migrate"];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("DATABASE_URL", "postgres://no_such_role@127.0.0.1:5432/orderflow_flags"));
        orderflow(&args, &env)
    };
    // The positive control: in-range values get past the settings.
    let (code, _, stderr) = migrate(
        &[],
        &[
            ("ORDER_TIMEOUT", "5m"),
            ("WORKER_BATCH", "1000"),
            ("WORKER_LINGER", "0ms"),
            ("WORKER_GENERIC_PLANS", "false"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no_such_role"), "{stderr}");
    // A DATABASE_URL that is not one is a startup error naming the part that is wrong.
    for (url, part) in [
        ("not-a-database-url", "expected postgres://"),
        ("postgres://h1:5432,h2:99999/db", "host 2 of the list"),
        (
            "postgres://h1,h2/db?target_session_attrs=standby",
            "target_session_attrs",
        ),
    ] {
        let (code, _, stderr) = orderflow(&["migrate"], &[("DATABASE_URL", url)]);
        assert_eq!(code, Some(2), "{url}: {stderr}");
        assert!(stderr.contains(part), "{url}: {stderr}");
    }

    let cases: &[(&str, &str, &str)] = &[
        ("ORDER_TIMEOUT", "--order-timeout", "18446744073709551615s"),
        ("ORDER_TIMEOUT", "--order-timeout", "307445734561825861m"),
        ("ORDER_TIMEOUT", "--order-timeout", "0"),
        ("ORDER_TIMEOUT", "--order-timeout", "25h"),
        ("ORDER_TIMEOUT", "--order-timeout", "86401s"),
        ("SWEEP_INTERVAL", "--sweep-interval", "0ms"),
        ("SWEEP_INTERVAL", "--sweep-interval", "300000000000s"),
        ("TREND_SAMPLE_INTERVAL", "--trend-sample-interval", "999ms"),
        ("TREND_SAMPLE_INTERVAL", "--trend-sample-interval", "11m"),
        ("WORKER_CONCURRENCY", "--worker-concurrency", "0"),
        ("WORKER_CONCURRENCY", "--worker-concurrency", "18446744073709551615"),
        ("WORKER_BATCH", "--worker-batch", "0"),
        ("WORKER_BATCH", "--worker-batch", "1001"),
        ("WORKER_LINGER", "--worker-linger", "1001ms"),
        ("WORKER_LINGER", "--worker-linger", "18446744073709551615s"),
        ("WORKER_LINGER", "--worker-linger", "-1ms"),
        ("WORKER_GENERIC_PLANS", "--worker-generic-plans", "yes"),
        ("WORKER_GENERIC_PLANS", "--worker-generic-plans", ""),
        ("DB_POOL_SIZE", "--db-pool-size", "0"),
        ("DB_POOL_SIZE", "--db-pool-size", "4294967296"),
    ];
    for (var, flag, value) in cases {
        let (code, _, stderr) = migrate(&[], &[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains(flag), "{var}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{var}={value}: {stderr}");
        let (code, _, stderr) = migrate(&[flag, value], &[]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
    }
    let (_, _, stderr) = migrate(&[], &[("ORDER_TIMEOUT", "307445734561825861m")]);
    assert!(stderr.contains("out of range: 100ms..=1440m"), "{stderr}");

    // A token's lifetime reaches `now + ttl`.
    for ttl in ["0", "-1", "9223372036854775807", "316224001"] {
        let (code, _, stderr) = orderflow(&["token", "--user", "1", "--ttl", ttl], &[]);
        assert_eq!(code, Some(2), "--ttl {ttl}: {stderr}");
        assert!(!stderr.contains("panicked"), "--ttl {ttl}: {stderr}");
    }
}

/// Every operation of `/openapi.json` names every answer it can give, with a description,
/// and every constraint the code checks; ids are linked to the operations that use them.
#[tokio::test]
async fn the_openapi_document_states_every_constraint_and_answer() {
    let app = TestApp::api_only().await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let shared = &doc["components"]["responses"];
    let mut operation_ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(operation_ids.insert(id.to_owned()), "operationId {id} twice");
            let responses = op["responses"].as_object().unwrap();
            for (status, response) in responses {
                let response = match response["$ref"].as_str() {
                    Some(r) => &shared[r.rsplit('/').next().unwrap()],
                    None => response,
                };
                assert!(
                    response["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status}: no description"
                );
            }
            let has = |status: &str| responses.contains_key(status);
            let params = op["parameters"].as_array().map(Vec::len).unwrap_or(0);
            let body = op.get("requestBody").is_some();
            if params > 0 || body {
                assert!(has("400"), "{method} {path}: 400 undocumented");
            }
            if body {
                assert!(has("413") && has("415"), "{method} {path}: 413/415 undocumented");
            }
            if op.get("security").is_some() {
                assert!(has("401"), "{method} {path}: 401 undocumented");
            }
            if path.starts_with("/api/admin/") {
                assert!(has("403"), "{method} {path}: 403 undocumented");
                // Every admin route takes the dashboard's session cookie as well as a token.
                let schemes: Vec<&str> = op["security"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_object()?.keys().next().map(String::as_str))
                    .collect();
                assert_eq!(schemes, ["bearer", "admin_cookie"], "{method} {path}");
            }
            if path.starts_with("/api/") {
                assert!(has("503"), "{method} {path}: 503 undocumented");
            }
        }
    }
    assert_eq!(operation_ids.len(), 41);
    // 429 with Retry-After on the rate-limited writes; Retry-After on every 503.
    for (path, method) in [
        ("/api/orders", "post"),
        ("/api/balance/charge", "post"),
        ("/api/coupons/{coupon_id}/issue", "post"),
    ] {
        assert_eq!(
            doc["paths"][path][method]["responses"]["429"]["$ref"],
            "#/components/responses/TooManyRequests"
        );
    }
    for name in ["TooManyRequests", "ServiceUnavailable"] {
        assert_eq!(shared[name]["headers"]["Retry-After"]["required"], true);
    }
    assert_eq!(shared["Unauthorized"]["headers"]["WWW-Authenticate"]["required"], true);

    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"))["schema"]
            .clone()
    };
    let schema = |name: &str| doc["components"]["schemas"][name]["properties"].clone();
    // Paging: refused outside 1..=100 (never clamped), on every paged route.
    for path in [
        "/api/products",
        "/api/orders",
        "/api/balance/history",
        "/api/admin/orders",
        "/api/admin/dead-letters",
    ] {
        let size = param(path, "get", "size");
        assert_eq!(
            (size["minimum"].as_i64(), size["maximum"].as_i64()),
            (Some(1), Some(100)),
            "{path}"
        );
        let page = param(path, "get", "page");
        assert_eq!(
            (page["minimum"].as_i64(), page["maximum"].as_i64()),
            (Some(0), Some(1_000_000)),
            "{path}"
        );
    }
    // Path ids: positive int64 or a UUID.
    let id = param("/api/coupons/{coupon_id}/issue", "post", "coupon_id");
    assert_eq!(
        (id["format"].as_str(), id["minimum"].as_i64()),
        (Some("int64"), Some(1))
    );
    assert_eq!(param("/api/admin/orders/{id}/cancel", "post", "id")["format"], "uuid");
    // Constraints that used to live only in the code.
    assert_eq!(
        schema("ChargeRequest")["amount"],
        json!({"type": "integer", "format": "int64", "minimum": 1000, "maximum": 100000, "multipleOf": 10,
               "example": 10000, "description": schema("ChargeRequest")["amount"]["description"]})
    );
    assert_eq!(schema("Restock")["quantity"]["maximum"], 1_000_000);
    assert_eq!(schema("NewProduct")["name"]["maxLength"], 200);
    assert_eq!(schema("NewItem")["quantity"]["maximum"], 1_000);
    assert_eq!(
        doc["components"]["schemas"]["NewOrder"]["properties"]["items"]["maxItems"],
        50
    );
    let key = param("/api/orders", "post", "Idempotency-Key");
    assert_eq!(key["pattern"], orderflow_api::extract::IDEMPOTENCY_KEY_PATTERN);
    assert_eq!(
        param("/api/orders/{id}", "get", "id")["pattern"],
        orderflow_api::openapi::UUID_PATTERN
    );
    let coupon = &doc["components"]["schemas"]["NewCoupon"]["oneOf"];
    assert_eq!(
        coupon[0]["properties"]["expiresAt"]["pattern"],
        orderflow_api::json::DATE_TIME_PATTERN
    );
    for field in ["from", "to"] {
        let time = &schema("NewReplay")[field];
        assert_eq!(time["format"], "date-time", "NewReplay.{field}");
        assert_eq!(
            time["pattern"],
            orderflow_api::json::DATE_TIME_PATTERN,
            "NewReplay.{field}"
        );
    }
    assert_eq!(coupon[0]["properties"]["discountValue"]["maximum"], 1_000_000_000);
    assert_eq!(coupon[1]["properties"]["discountValue"]["maximum"], 100);
    // The duration pattern is the parser's grammar and bound.
    let stuck_after = param("/api/admin/overview", "get", "stuckAfter");
    assert_eq!(
        stuck_after["pattern"],
        orderflow_shared::config::duration_pattern(orderflow_shared::config::MAX_QUERY_DURATION)
    );
    // Links from the operations that create ids to those that use them.
    let links = |path: &str, method: &str, status: &str| -> Vec<String> {
        let mut names: Vec<String> = doc["paths"][path][method]["responses"][status]["links"]
            .as_object()
            .map(|l| {
                l.values()
                    .map(|v| v["operationId"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    assert_eq!(
        links("/api/admin/products", "post", "201"),
        ["getProduct", "restockProduct"]
    );
    assert_eq!(links("/api/admin/coupons", "post", "201"), ["issueCoupon"]);
    assert_eq!(
        links("/api/orders", "post", "202"),
        ["cancelMyOrder", "getOrder", "getOrderTimeline", "streamOrderEvents"]
    );
    assert_eq!(
        links("/api/admin/dead-letters", "get", "200"),
        ["discardDeadLetter", "getDeadLetter", "replayDeadLetter"]
    );
    for link_target in links("/api/orders", "post", "202") {
        assert!(operation_ids.contains(&link_target), "{link_target}");
    }
    app.stop().await;
}
