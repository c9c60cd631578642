//! The edges of the API: auth failures, malformed input, unknown routes and methods, the
//! problem-document shape, and the OpenAPI document and Swagger UI.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{JWT_SECRET, Options, TestApp, b64url};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

/// What came back: status, content type, headers and the JSON body (Null if not JSON).
struct Reply {
    status: StatusCode,
    content_type: String,
    headers: header::HeaderMap,
    body: Value,
}

/// Sends a raw request: any headers, any body bytes.
async fn raw(app: &TestApp, method: Method, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Reply {
    let mut req = app.http.request(method, app.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = res.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        headers,
        body,
    }
}

/// Asserts an RFC 9457 problem document with exactly the five members, the given status
/// and code.
fn assert_problem(reply: &Reply, want: StatusCode, code: &str) {
    let body = &reply.body;
    assert_eq!(reply.status, want, "{body}");
    assert_eq!(reply.content_type, "application/problem+json", "{body}");
    let obj = body.as_object().unwrap_or_else(|| panic!("not a JSON object: {body}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "detail", "status", "title", "type"], "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    assert_eq!(body["code"], code, "{body}");
    // RFC 9110 names, where they differ from the older ones.
    let title = match want.as_u16() {
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        _ => want.canonical_reason().unwrap(),
    };
    assert_eq!(body["title"], title, "{body}");
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:orderflow:problem:")),
        "{body}"
    );
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

fn sign(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3_600
}

#[tokio::test]
async fn bad_credentials_are_401_problems() {
    let app = TestApp::api_only().await;
    // The positive control: a valid token works.
    let ok = raw(
        &app,
        Method::GET,
        "/api/balance",
        &[("authorization", &format!("Bearer {}", app.token(5)))],
        None,
    )
    .await;
    assert_eq!(
        (ok.status, &ok.body),
        (StatusCode::OK, &json!({"userId": 5, "balance": 0}))
    );

    let missing = raw(&app, Method::GET, "/api/balance", &[], None).await;
    assert_problem(&missing, StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
    assert_eq!(
        missing
            .headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );

    let valid = app.token(5);
    let exp = in_an_hour();
    let mut tampered: Vec<&str> = valid.split('.').collect();
    let forged_payload = b64url(json!({"sub": "6", "exp": exp}).to_string().as_bytes());
    tampered[1] = &forged_payload;
    let tampered = tampered.join(".");
    let none_header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(json!({"sub": "5", "exp": exp}).to_string().as_bytes());
    let signature = valid.rsplit('.').next().unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("Bearer".into(), "INVALID_TOKEN"),
        ("Bearer ".into(), "INVALID_TOKEN"),
        (format!("Basic {}", b64url(b"user:pass")), "INVALID_TOKEN"),
        (valid.clone(), "INVALID_TOKEN"),
        ("Bearer garbage".into(), "INVALID_TOKEN"),
        ("Bearer a.b.c".into(), "INVALID_TOKEN"),
        (format!("Bearer {valid}x"), "INVALID_TOKEN"),
        (format!("Bearer {tampered}"), "INVALID_TOKEN"),
        // Signed with another secret.
        (
            format!(
                "Bearer {}",
                sign(Algorithm::HS256, &json!({"sub": "5", "exp": exp}), "not-the-secret")
            ),
            "INVALID_TOKEN",
        ),
        // Another algorithm, even with the right secret.
        (
            format!(
                "Bearer {}",
                sign(Algorithm::HS512, &json!({"sub": "5", "exp": exp}), JWT_SECRET)
            ),
            "INVALID_TOKEN",
        ),
        // alg none, unsigned and with a stolen signature.
        (format!("Bearer {none_header}.{payload}."), "INVALID_TOKEN"),
        (format!("Bearer {none_header}.{payload}.{signature}"), "INVALID_TOKEN"),
        // Expired, beyond the leeway.
        (
            format!(
                "Bearer {}",
                sign(Algorithm::HS256, &json!({"sub": "5", "exp": exp - 7_200}), JWT_SECRET)
            ),
            "TOKEN_EXPIRED",
        ),
        (
            format!("Bearer {}", app.keys.issue(5, true, -60).unwrap()),
            "TOKEN_EXPIRED",
        ),
        // Claims: exp and sub are required, sub is a positive integer in a string.
        (
            format!("Bearer {}", sign(Algorithm::HS256, &json!({"sub": "5"}), JWT_SECRET)),
            "INVALID_TOKEN",
        ),
        (
            format!(
                "Bearer {}",
                sign(Algorithm::HS256, &json!({"sub": "5", "exp": "tomorrow"}), JWT_SECRET)
            ),
            "INVALID_TOKEN",
        ),
        (
            format!("Bearer {}", sign(Algorithm::HS256, &json!({"exp": exp}), JWT_SECRET)),
            "INVALID_TOKEN",
        ),
        (
            format!(
                "Bearer {}",
                sign(Algorithm::HS256, &json!({"sub": 5, "exp": exp}), JWT_SECRET)
            ),
            "INVALID_TOKEN",
        ),
        // Not valid before an hour from now.
        (
            format!(
                "Bearer {}",
                sign(
                    Algorithm::HS256,
                    &json!({"sub": "5", "exp": exp + 3_600, "nbf": exp}),
                    JWT_SECRET
                )
            ),
            "INVALID_TOKEN",
        ),
    ];
    let mut cases = cases;
    // A critical header extension orderflow does not understand (RFC 7515 §4.1.11), validly
    // signed with the right secret.
    let mut critical = Header::new(Algorithm::HS256);
    critical.crit = Some(vec!["x-policy".into()]);
    cases.push((
        format!(
            "Bearer {}",
            jsonwebtoken::encode(
                &critical,
                &json!({"sub": "5", "exp": exp, "x-policy": "strict"}),
                &EncodingKey::from_secret(JWT_SECRET.as_bytes())
            )
            .unwrap()
        ),
        "INVALID_TOKEN",
    ));
    // Not a b64token (RFC 6750 §2.1): a space inside.
    cases.push((format!("Bearer {} x", app.token(5)), "INVALID_TOKEN"));
    for sub in [
        "0",
        "-5",
        "abc",
        "",
        " 5",
        "5.0",
        "1e3",
        "99999999999999999999",
        "9223372036854775808",
    ] {
        cases.push((
            format!(
                "Bearer {}",
                sign(Algorithm::HS256, &json!({"sub": sub, "exp": exp}), JWT_SECRET)
            ),
            "INVALID_TOKEN",
        ));
    }
    for (authorization, code) in &cases {
        let reply = raw(
            &app,
            Method::GET,
            "/api/balance",
            &[("authorization", authorization)],
            None,
        )
        .await;
        assert_eq!(
            reply.body["code"], *code,
            "Authorization: {authorization}: {}",
            reply.body
        );
        assert_problem(&reply, StatusCode::UNAUTHORIZED, code);
        assert_eq!(
            reply
                .headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
    }
    // Bytes that are not a valid header string.
    let res = app
        .http
        .get(app.url("/api/balance"))
        .header(
            "authorization",
            header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // The same on a write: a refused token charges nothing.
    let reply = raw(
        &app,
        Method::POST,
        "/api/balance/charge",
        &[
            ("authorization", &format!("Bearer {none_header}.{payload}.")),
            ("content-type", "application/json"),
        ],
        Some(br#"{"amount": 1000}"#.to_vec()),
    )
    .await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_ledger")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // The auth scheme is case-insensitive (RFC 9110 §11.1), and a hand-made valid token works.
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let reply = raw(
            &app,
            Method::GET,
            "/api/balance",
            &[("authorization", &format!("{scheme} {valid}"))],
            None,
        )
        .await;
        assert_eq!(
            (reply.status, &reply.body),
            (StatusCode::OK, &json!({"userId": 5, "balance": 0})),
            "{scheme}"
        );
    }
    // Only the scheme: the token itself is still compared exactly, and other schemes fail.
    for authorization in [
        format!("BEARER {}", valid.to_uppercase()),
        format!("Bearers {valid}"),
        format!("Bear {valid}"),
        format!("Token {valid}"),
    ] {
        let reply = raw(
            &app,
            Method::GET,
            "/api/balance",
            &[("authorization", &authorization)],
            None,
        )
        .await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    }
    let hand = sign(
        Algorithm::HS256,
        &json!({"sub": "8", "exp": exp, "nbf": exp - 7_200, "iat": exp - 7_200}),
        JWT_SECRET,
    );
    let reply = raw(
        &app,
        Method::GET,
        "/api/balance",
        &[("authorization", &format!("Bearer {hand}"))],
        None,
    )
    .await;
    assert_eq!((reply.status, &reply.body["userId"]), (StatusCode::OK, &json!(8)));
    app.stop().await;
}

#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let app = TestApp::api_only().await;
    let user = format!("Bearer {}", app.token(5));
    let admin = format!("Bearer {}", app.admin_token());
    let json_ct = ("content-type", "application/json");
    let product = br#"{"name": "Tea", "price": 100, "stock": 1}"#.to_vec();
    let coupon = br#"{"name": "c", "discountType": "FIXED", "discountValue": 100, "quantity": 1}"#.to_vec();
    let role_user = format!(
        "Bearer {}",
        sign(
            Algorithm::HS256,
            &json!({"sub": "5", "exp": in_an_hour(), "role": "user"}),
            JWT_SECRET
        )
    );
    for auth in [&user, &role_user] {
        let reply = raw(
            &app,
            Method::POST,
            "/api/admin/products",
            &[("authorization", auth), json_ct],
            Some(product.clone()),
        )
        .await;
        assert_problem(&reply, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");
        let reply = raw(
            &app,
            Method::POST,
            "/api/admin/coupons",
            &[("authorization", auth), json_ct],
            Some(coupon.clone()),
        )
        .await;
        assert_problem(&reply, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");
        let reply = raw(
            &app,
            Method::POST,
            "/api/admin/products/1/restock",
            &[("authorization", auth), json_ct],
            Some(br#"{"quantity": 1}"#.to_vec()),
        )
        .await;
        assert_problem(&reply, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");
    }
    // An expired admin token is 401, not 403.
    let expired = format!("Bearer {}", app.keys.issue(1, true, -60).unwrap());
    let reply = raw(
        &app,
        Method::POST,
        "/api/admin/products",
        &[("authorization", &expired), json_ct],
        Some(product.clone()),
    )
    .await;
    assert_problem(&reply, StatusCode::UNAUTHORIZED, "TOKEN_EXPIRED");
    let count: (i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM coupons)")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, (0, 0));

    // The admin is let through.
    let reply = raw(
        &app,
        Method::POST,
        "/api/admin/products",
        &[("authorization", &admin), json_ct],
        Some(product),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let reply = raw(
        &app,
        Method::POST,
        "/api/admin/coupons",
        &[("authorization", &admin), json_ct],
        Some(coupon),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    app.stop().await;
}

#[tokio::test]
async fn malformed_bodies_are_400_problems_never_500() {
    let app = TestApp::api_only().await;
    let auth = format!("Bearer {}", app.token(5));
    let admin = format!("Bearer {}", app.admin_token());
    let charge = |ct: Option<&'static str>, body: &[u8]| {
        let mut headers = vec![("authorization", auth.clone())];
        if let Some(ct) = ct {
            headers.push(("content-type", ct.to_owned()));
        }
        (headers, body.to_vec())
    };
    let json_ct = Some("application/json");
    let cases: Vec<(Option<&'static str>, &[u8], &str)> = vec![
        // Not JSON at all.
        (json_ct, b"{\"amount\": ", "MALFORMED_JSON"),
        (json_ct, b"{amount: 1000}", "MALFORMED_JSON"),
        (json_ct, b"", "MALFORMED_JSON"),
        (json_ct, b"{\"amount\": 1000}}", "MALFORMED_JSON"),
        (json_ct, b"{\"amount\": \"\xff\"}", "MALFORMED_JSON"),
        // Wrong or missing content type.
        (Some("text/plain"), b"{\"amount\": 1000}", "INVALID_CONTENT_TYPE"),
        (
            Some("application/x-www-form-urlencoded"),
            b"amount=1000",
            "INVALID_CONTENT_TYPE",
        ),
        (None, b"{\"amount\": 1000}", "INVALID_CONTENT_TYPE"),
        (Some("nonsense"), b"{\"amount\": 1000}", "INVALID_CONTENT_TYPE"),
        // JSON of the wrong shape or out of range.
        (json_ct, b"{\"amount\": \"1000\"}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": 1000.5}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": 1e-3}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": 1e30}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": 99999999999999999999}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": -99999999999999999999}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": 9223372036854775808}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": null}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": true}", "INVALID_BODY"),
        (json_ct, b"{\"amount\": [1000]}", "INVALID_BODY"),
        (json_ct, b"{}", "INVALID_BODY"),
        (json_ct, b"[]", "INVALID_BODY"),
        (json_ct, b"\"1000\"", "INVALID_BODY"),
        (json_ct, b"null", "INVALID_BODY"),
    ];
    for (ct, body, code) in cases {
        let (headers, body) = charge(ct, body);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = raw(&app, Method::POST, "/api/balance/charge", &headers, Some(body.clone())).await;
        assert_eq!(
            reply.body["code"],
            code,
            "{ct:?} {}: {}",
            String::from_utf8_lossy(&body),
            reply.body
        );
        // A body in another format is 415 Unsupported Media Type (RFC 9110 §15.5.16).
        let status = if code == "INVALID_CONTENT_TYPE" {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_problem(&reply, status, code);
    }
    // A charset parameter is fine.
    let (headers, body) = charge(Some("application/json; charset=utf-8"), b"{\"amount\": 1000}");
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reply = raw(&app, Method::POST, "/api/balance/charge", &headers, Some(body)).await;
    assert_eq!(
        (reply.status, &reply.body["balance"]),
        (StatusCode::OK, &json!(1_000)),
        "{}",
        reply.body
    );

    // The other writes behave the same.
    let json_ct = ("content-type", "application/json");
    for (path, auth, body) in [
        (
            "/api/admin/products",
            &admin,
            br#"{"name": "Tea", "price": 99999999999999999999, "stock": 1}"#.to_vec(),
        ),
        (
            "/api/admin/products",
            &admin,
            br#"{"name": "Tea", "price": 1e30, "stock": 1}"#.to_vec(),
        ),
        (
            "/api/admin/coupons",
            &admin,
            br#"{"name": "c", "discountType": "FIXED", "discountValue": 1e30, "quantity": 1}"#.to_vec(),
        ),
        (
            "/api/admin/coupons",
            &admin,
            br#"{"name": "c", "discountType": "FIXED", "discountValue": 10, "quantity": 99999999999}"#.to_vec(),
        ),
        (
            "/api/orders",
            &auth,
            br#"{"items": [{"productId": 99999999999999999999, "quantity": 1}]}"#.to_vec(),
        ),
        (
            "/api/orders",
            &auth,
            br#"{"items": [{"productId": 1, "quantity": 1e30}]}"#.to_vec(),
        ),
        ("/api/orders", &auth, br#"{"items": "all of them"}"#.to_vec()),
    ] {
        let reply = raw(
            &app,
            Method::POST,
            path,
            &[("authorization", auth), json_ct, ("idempotency-key", "k")],
            Some(body.clone()),
        )
        .await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "INVALID_BODY");
    }
    let reply = raw(
        &app,
        Method::POST,
        "/api/admin/products",
        &[("authorization", &admin), json_ct],
        Some(b"{".to_vec()),
    )
    .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "MALFORMED_JSON");
    let reply = raw(
        &app,
        Method::POST,
        "/api/admin/coupons",
        &[("authorization", &admin)],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_problem(&reply, StatusCode::UNSUPPORTED_MEDIA_TYPE, "INVALID_CONTENT_TYPE");

    // Out-of-range and non-numeric path and query values.
    for path in [
        "/api/products/99999999999999999999",
        "/api/products/-",
        "/api/orders/not-a-uuid",
    ] {
        let reply = raw(&app, Method::GET, path, &[("authorization", &auth)], None).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "INVALID_PATH");
    }
    for path in [
        "/api/products?page=99999999999",
        "/api/products?size=1e3",
        "/api/orders?page=x",
        "/api/balance/history?size=-1",
    ] {
        let reply = raw(&app, Method::GET, path, &[("authorization", &auth)], None).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "INVALID_QUERY");
    }

    // A body too large for any route is refused without a 500 (and without buffering it all).
    let huge = format!("{{\"amount\": 1000, \"pad\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    let (headers, body) = charge(Some("application/json"), huge.as_bytes());
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reply = raw(&app, Method::POST, "/api/balance/charge", &headers, Some(body)).await;
    assert_problem(&reply, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");

    // Nothing above reached the ledger except the one good charge.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_ledger")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::api_only().await;
    let auth = format!("Bearer {}", app.token(5));
    for (method, path) in [
        (Method::GET, "/nope"),
        (Method::GET, "/api"),
        (Method::GET, "/api/balances"),
        (Method::POST, "/api/nothing/here"),
        (Method::GET, "/api/products/1/extra"),
        (Method::DELETE, "/api/unknown"),
    ] {
        let reply = raw(&app, method.clone(), path, &[("authorization", &auth)], None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_problem(&reply, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    for (method, path) in [
        (Method::DELETE, "/api/balance"),
        (Method::GET, "/api/balance/charge"),
        (Method::PUT, "/api/products"),
        (Method::PATCH, "/api/products/1"),
        (Method::GET, "/api/admin/products"),
        (Method::DELETE, "/api/coupons"),
        (Method::GET, "/api/coupons/1/issue"),
        (Method::POST, "/openapi.json"),
    ] {
        let reply = raw(&app, method.clone(), path, &[("authorization", &auth)], None).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            reply.body
        );
        assert_problem(&reply, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
        assert!(
            reply.headers.contains_key(header::ALLOW),
            "{method} {path}: no Allow header"
        );
    }
    // Every response carries a request id, and a caller's own is echoed back.
    let reply = raw(&app, Method::GET, "/nope", &[("x-request-id", "trace-me-42")], None).await;
    assert_eq!(
        reply.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("trace-me-42")
    );
    let reply = raw(&app, Method::GET, "/healthz", &[], None).await;
    assert_eq!((reply.status, &reply.body), (StatusCode::OK, &json!({"status": "ok"})));
    assert!(reply.headers.contains_key("x-request-id"));
    // ... and the API's own time for it (W3C Server Timing, milliseconds).
    let timing = reply
        .headers
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let ms: f64 = timing
        .strip_prefix("app;dur=")
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("Server-Timing: {timing:?}"));
    assert!((0.0..10_000.0).contains(&ms), "Server-Timing: {timing:?}");
    let reply = raw(&app, Method::GET, "/readyz", &[], None).await;
    assert_eq!(
        (reply.status, &reply.body),
        (StatusCode::OK, &json!({"status": "ready"}))
    );
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let app = TestApp::api_only().await;
    let reply = raw(&app, Method::GET, "/openapi.json", &[], None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.content_type.starts_with("application/json"),
        "{}",
        reply.content_type
    );
    let doc = reply.body;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("/api/balance", &["get"]),
        ("/api/balance/charge", &["post"]),
        ("/api/balance/history", &["get"]),
        ("/api/products", &["get"]),
        ("/api/products/{id}", &["get"]),
        ("/api/products/popular", &["get"]),
        ("/api/admin/products", &["post"]),
        ("/api/admin/products/{id}/restock", &["post"]),
        ("/api/admin/coupons", &["post"]),
        ("/api/coupons", &["get"]),
        ("/api/coupons/{coupon_id}/issue", &["post"]),
        ("/api/orders", &["get", "post"]),
        ("/api/orders/{id}", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
    ];
    for (path, methods) in expected {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from /openapi.json"));
        for method in *methods {
            let op = &item[*method];
            assert!(op.is_object(), "{method} {path} missing");
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} has no responses"
            );
        }
    }
    // Error responses point at the problem schema; writes document their request bodies.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let problem = &schemas["Problem"]["properties"];
    for field in ["type", "title", "status", "detail", "code"] {
        assert!(problem.get(field).is_some(), "Problem schema lacks {field}");
    }
    let issue = &paths["/api/coupons/{coupon_id}/issue"]["post"]["responses"];
    for status in ["201", "401", "403", "404", "409", "410"] {
        assert!(issue.get(status).is_some(), "issue lacks {status}");
    }
    assert!(
        issue["410"]["content"]["application/problem+json"]["schema"]["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("/Problem")),
        "{}",
        issue["410"]
    );
    for (path, method) in [
        ("/api/balance/charge", "post"),
        ("/api/admin/products", "post"),
        ("/api/admin/products/{id}/restock", "post"),
        ("/api/admin/coupons", "post"),
        ("/api/orders", "post"),
    ] {
        assert!(
            paths[path][method]["requestBody"].is_object(),
            "{method} {path} has no request body schema"
        );
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    app.stop().await;
}

#[tokio::test]
async fn swagger_ui_is_served_offline() {
    let app = TestApp::api_only().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = no_redirects.get(app.url("/docs")).send().await.unwrap();
    assert!(res.status().is_redirection(), "{}", res.status());
    assert_eq!(
        res.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("/docs/")
    );

    for path in ["/docs/", "/docs"] {
        let res = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let ct = res.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        let html = res.text().await.unwrap();
        assert!(html.contains("swagger-ui"), "{path}: {html}");
    }
    // The assets come from the server itself (vendored), and point at our document.
    let res = app
        .http
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.bytes().await.unwrap().len() > 100_000);
    let res = app
        .http
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("/openapi.json"));
    // An unknown asset is a problem like any other 404.
    let reply = raw(&app, Method::GET, "/docs/no-such-file.js", &[], None).await;
    assert_problem(&reply, StatusCode::NOT_FOUND, "NOT_FOUND");
    app.stop().await;
}

/// A client that stops in the middle of a request's head, or connects and sends nothing, is
/// disconnected after HTTP_HEADER_TIMEOUT, as is a kept-alive connection left idle that long;
/// beyond HTTP_MAX_CONNECTIONS a new connection is not served until another closes (without
/// both, such clients hold a task, a buffer and a file descriptor each for as long as they like).
#[tokio::test]
async fn connections_that_send_no_whole_request_are_closed_and_at_most_the_cap_are_served() {
    use std::time::{Duration, Instant};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        time::timeout,
    };
    let app = TestApp::spawn_with(Options {
        workers: vec![],
        http_header_timeout: Duration::from_secs(2),
        http_max_connections: 2,
        ..Options::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let opened = Instant::now();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes())
        .await
        .unwrap();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // A third, whole request: the kernel takes the connection, the server does not serve it
    // while the two hold both slots.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        timeout(Duration::from_secs(1), third.read(&mut buf)).await.is_err(),
        "a connection beyond the cap was served"
    );
    for (name, conn) in [("half a head", &mut half), ("nothing", &mut silent)] {
        let read = timeout(Duration::from_secs(20), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("a connection that sent {name} was never closed"));
        assert!(matches!(read, Ok(0) | Err(_)), "{name}: {read:?}");
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "closed before its timeout"
    );
    // Their slots free, the third is answered.
    let n = timeout(Duration::from_secs(20), third.read(&mut buf))
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Kept alive and then idle: closed after the timeout as well.
    let idle = timeout(Duration::from_secs(20), async {
        loop {
            match third.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the rest of the response
            }
        }
    })
    .await;
    assert!(idle.is_ok(), "an idle kept-alive connection was never closed");
    app.stop().await;
}
