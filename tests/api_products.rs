//! Products: create and restock (admin), browse with pagination and keyword, look up by id.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TestApp, assert_problem, send};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn product_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// GET /api/products?keyword=<every byte percent-encoded>; asserts 200.
async fn search(app: &TestApp, keyword: &str) -> Value {
    let encoded: String = keyword.bytes().map(|b| format!("%{b:02X}")).collect();
    let (status, body) = app
        .call(Method::GET, &format!("/api/products?keyword={encoded}"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn names(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_admin_creates_a_product() {
    let app = TestApp::api_only().await;
    let admin = app.admin_token();
    let (status, body) = app
        .post(
            "/api/admin/products",
            &admin,
            json!({"name": "  Drip Coffee  ", "price": 4_500, "stock": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().unwrap();
    assert!(id > 0);
    assert_eq!(
        body,
        json!({"id": id, "name": "Drip Coffee", "price": 4_500, "stock": 30})
    );

    let (status, shown) = app.get(&format!("/api/products/{id}"), &app.token(1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown, body);
    // Product reads need no token.
    let (status, _, shown) = send(&app, Method::GET, &format!("/api/products/{id}"), None, None).await;
    assert_eq!((status, &shown), (StatusCode::OK, &body));

    // Free and out-of-stock products are allowed, as are 200-character (not byte) names.
    let (status, body) = app
        .post(
            "/api/admin/products",
            &admin,
            json!({"name": "Sample", "price": 0, "stock": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let long = "가".repeat(200);
    let (status, body) = app
        .post(
            "/api/admin/products",
            &admin,
            json!({"name": long, "price": 1_000_000_000, "stock": 1_000_000_000}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], long.as_str());
    // Ids are distinct and increasing.
    assert!(body["id"].as_i64().unwrap() > id);
    assert_eq!(product_count(&app).await, 3);
    app.stop().await;
}

#[tokio::test]
async fn invalid_products_are_refused_with_exact_codes() {
    let app = TestApp::api_only().await;
    let admin = app.admin_token();
    let cases = [
        (json!({"name": "", "price": 100, "stock": 1}), "INVALID_NAME"),
        (json!({"name": "   ", "price": 100, "stock": 1}), "INVALID_NAME"),
        (
            json!({"name": "x".repeat(201), "price": 100, "stock": 1}),
            "INVALID_NAME",
        ),
        (
            json!({"name": "nul\u{0}byte", "price": 100, "stock": 1}),
            "INVALID_NAME",
        ),
        (json!({"name": "Tea", "price": -1, "stock": 1}), "INVALID_PRICE"),
        (
            json!({"name": "Tea", "price": 1_000_000_001, "stock": 1}),
            "INVALID_PRICE",
        ),
        (
            json!({"name": "Tea", "price": 9_007_199_254_740_991i64, "stock": 1}),
            "INVALID_PRICE",
        ),
        // Beyond I-JSON's exact integers (RFC 7493 §2.2): not read at all.
        (json!({"name": "Tea", "price": i64::MAX, "stock": 1}), "INVALID_BODY"),
        (json!({"name": "Tea", "price": 100, "stock": -1}), "INVALID_STOCK"),
        (
            json!({"name": "Tea", "price": 100, "stock": 1_000_000_001}),
            "INVALID_STOCK",
        ),
        (json!({"name": "Tea", "price": "100", "stock": 1}), "INVALID_BODY"),
        (json!({"name": "Tea", "price": 1.5, "stock": 1}), "INVALID_BODY"),
        (json!({"name": "Tea", "price": 1e30, "stock": 1}), "INVALID_BODY"),
        (json!({"name": "Tea", "stock": 1}), "INVALID_BODY"),
        (json!({"name": null, "price": 100, "stock": 1}), "INVALID_BODY"),
        (json!({"name": 7, "price": 100, "stock": 1}), "INVALID_BODY"),
        (json!([{"name": "Tea", "price": 100, "stock": 1}]), "INVALID_BODY"),
    ];
    for (body, code) in cases {
        let res = send(
            &app,
            Method::POST,
            "/api/admin/products",
            Some(&admin),
            Some(body.clone()),
        )
        .await;
        assert_problem(&res, StatusCode::BAD_REQUEST, code);
    }
    assert_eq!(product_count(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_list_is_paginated_with_a_total_and_a_bounded_size() {
    let app = TestApp::api_only().await;
    let mut ids = Vec::new();
    for i in 1..=25 {
        ids.push(app.product(&format!("Item {i:02}"), 100 * i, i).await);
    }
    let token = app.token(1);

    let (status, body) = app.get("/api/products", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["page"].as_i64(), body["size"].as_i64(), body["total"].as_i64()),
        (Some(0), Some(20), Some(25))
    );
    let got: Vec<i64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids[..20]);
    assert_eq!(
        body["items"][0],
        json!({"id": ids[0], "name": "Item 01", "price": 100, "stock": 1})
    );

    let (_, body) = app.get("/api/products?page=1&size=20", &token).await;
    assert_eq!(names(&body), ["Item 21", "Item 22", "Item 23", "Item 24", "Item 25"]);
    assert_eq!((body["page"].as_i64(), body["total"].as_i64()), (Some(1), Some(25)));
    let (_, body) = app.get("/api/products?page=2&size=10", &token).await;
    assert_eq!(names(&body), ["Item 21", "Item 22", "Item 23", "Item 24", "Item 25"]);
    let (_, body) = app.get("/api/products?page=5&size=10", &token).await;
    assert_eq!(
        (body["items"].as_array().map(Vec::len), body["total"].as_i64()),
        (Some(0), Some(25))
    );

    // More than 100 products: a page holds at most 100, and a larger size is refused, never
    // clamped (the schema says 1..=100).
    sqlx::query(
        "INSERT INTO products (name, price, stock, initial_stock)
         SELECT 'Bulk ' || g, 1000, 1, 1 FROM generate_series(1, 120) g",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app.get("/api/products?size=100", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["size"], 100);
    assert_eq!(body["items"].as_array().unwrap().len(), 100);
    assert_eq!(body["total"], 145);
    let (_, body) = app.get("/api/products?page=1&size=100", &token).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 45);

    // Bad paging is a 400 problem.
    for (query, code) in [
        ("size=0", "INVALID_PAGE_SIZE"),
        ("size=101", "INVALID_PAGE_SIZE"),
        ("size=500", "INVALID_PAGE_SIZE"),
        ("size=2147483648", "INVALID_PAGE_SIZE"),
        ("size=4294967295", "INVALID_PAGE_SIZE"),
        ("page=1000001", "INVALID_PAGE"),
        ("page=2147483648", "INVALID_PAGE"),
    ] {
        let res = send(&app, Method::GET, &format!("/api/products?{query}"), None, None).await;
        assert_problem(&res, StatusCode::BAD_REQUEST, code);
    }
    for query in ["page=-1", "size=-5", "size=ten", "page=4294967296"] {
        let res = send(&app, Method::GET, &format!("/api/products?{query}"), None, None).await;
        assert_problem(&res, StatusCode::BAD_REQUEST, "INVALID_QUERY");
    }
    app.stop().await;
}

#[tokio::test]
async fn keyword_search_is_case_insensitive_and_wildcards_are_literal() {
    let app = TestApp::api_only().await;
    for name in [
        "Green Tea",
        "green tea latte",
        "GREEN APPLE",
        "Black Tea",
        "100% Juice",
        "100 Juice",
        "50_50 Mix",
        "50-50 Mix",
        "Back\\slash",
        "Backslash",
        "Café Crème",
        "İstanbul Simit",
        "녹차 라떼",
    ] {
        app.product(name, 1_000, 10).await;
    }
    let cases: &[(&str, &[&str])] = &[
        ("green", &["Green Tea", "green tea latte", "GREEN APPLE"]),
        ("TEA", &["Green Tea", "green tea latte", "Black Tea"]),
        ("  gReEn TeA  ", &["Green Tea", "green tea latte"]),
        ("%", &["100% Juice"]),
        ("100%", &["100% Juice"]),
        ("_", &["50_50 Mix"]),
        ("50_50", &["50_50 Mix"]),
        ("\\", &["Back\\slash"]),
        ("CAFÉ CRÈME", &["Café Crème"]),
        ("istanbul", &["İstanbul Simit"]),
        ("İstanbul", &["İstanbul Simit"]),
        ("라떼", &["녹차 라떼"]),
        ("no such thing", &[]),
    ];
    for (keyword, want) in cases {
        let body = search(&app, keyword).await;
        assert_eq!(names(&body), *want, "keyword {keyword:?}");
        assert_eq!(body["total"], want.len(), "keyword {keyword:?}");
    }
    // No keyword, or a blank one, lists everything.
    assert_eq!(search(&app, "").await["total"], 13);
    assert_eq!(search(&app, "   ").await["total"], 13);
    let (_, body) = app.call(Method::GET, "/api/products", None, None).await;
    assert_eq!(body["total"], 13);

    // Pagination applies within the filter.
    let (_, body) = app
        .call(Method::GET, "/api/products?keyword=green&size=2&page=1", None, None)
        .await;
    assert_eq!(names(&body), ["GREEN APPLE"]);
    assert_eq!(body["total"], 3);

    // Too long, or not storable text: 400, never 500.
    let res = send(
        &app,
        Method::GET,
        &format!("/api/products?keyword={}", "a".repeat(101)),
        None,
        None,
    )
    .await;
    assert_problem(&res, StatusCode::BAD_REQUEST, "INVALID_KEYWORD");
    let res = send(&app, Method::GET, "/api/products?keyword=%00", None, None).await;
    assert_problem(&res, StatusCode::BAD_REQUEST, "INVALID_KEYWORD");
    let body = search(&app, &"a".repeat(100)).await;
    assert_eq!(body["total"], 0);
    app.stop().await;
}

#[tokio::test]
async fn a_product_by_id_is_200_404_or_400() {
    let app = TestApp::api_only().await;
    let id = app.product("Scone", 3_200, 4).await;
    let (status, body) = app.call(Method::GET, &format!("/api/products/{id}"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"id": id, "name": "Scone", "price": 3_200, "stock": 4}));

    for missing in [id + 1, 0, -1, i64::MAX] {
        let res = send(&app, Method::GET, &format!("/api/products/{missing}"), None, None).await;
        assert_problem(&res, StatusCode::NOT_FOUND, "PRODUCT_NOT_FOUND");
    }
    for bad in ["abc", "1.5", "1e3", "99999999999999999999", "%20"] {
        let res = send(&app, Method::GET, &format!("/api/products/{bad}"), None, None).await;
        assert_problem(&res, StatusCode::BAD_REQUEST, "INVALID_PATH");
    }
    // A static route next to `{id}` still wins.
    let (status, body) = app.call(Method::GET, "/api/products/popular", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    app.stop().await;
}

#[tokio::test]
async fn an_admin_restocks_a_product() {
    let app = TestApp::api_only().await;
    let admin = app.admin_token();
    let id = app.product("Bagel", 2_000, 3).await;
    let (status, body) = app
        .post(
            &format!("/api/admin/products/{id}/restock"),
            &admin,
            json!({"quantity": 7}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"id": id, "name": "Bagel", "price": 2_000, "stock": 10}));
    let (status, body) = app
        .post(
            &format!("/api/admin/products/{id}/restock"),
            &admin,
            json!({"quantity": 1_000_000}),
        )
        .await;
    assert_eq!((status, &body["stock"]), (StatusCode::OK, &json!(1_000_010)), "{body}");
    assert_eq!(app.stock(id).await, 1_000_010);
    let (initial, restocked): (i64, i64) =
        sqlx::query_as("SELECT initial_stock, restocked FROM products WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((initial, restocked), (3, 1_000_007));

    let path = format!("/api/admin/products/{id}/restock");
    for (body, code) in [
        (json!({"quantity": 0}), "INVALID_QUANTITY"),
        (json!({"quantity": -5}), "INVALID_QUANTITY"),
        (json!({"quantity": 1_000_001}), "INVALID_QUANTITY"),
        (json!({"quantity": "5"}), "INVALID_BODY"),
        (json!({}), "INVALID_BODY"),
    ] {
        let res = send(&app, Method::POST, &path, Some(&admin), Some(body)).await;
        assert_problem(&res, StatusCode::BAD_REQUEST, code);
    }
    // Out-of-range numbers are 400, not 500.
    for raw in [
        r#"{"quantity": 99999999999999999999}"#,
        r#"{"quantity": 1e30}"#,
        r#"{"quantity": -99999999999999999999}"#,
    ] {
        let res = app
            .http
            .post(app.url(&path))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let ct = res.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert_problem(
            &(status, ct, res.json().await.unwrap()),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        );
    }
    let res = send(
        &app,
        Method::POST,
        &format!("/api/admin/products/{}/restock", id + 100),
        Some(&admin),
        Some(json!({"quantity": 1})),
    )
    .await;
    assert_problem(&res, StatusCode::NOT_FOUND, "PRODUCT_NOT_FOUND");
    let res = send(
        &app,
        Method::POST,
        "/api/admin/products/bagel/restock",
        Some(&admin),
        Some(json!({"quantity": 1})),
    )
    .await;
    assert_problem(&res, StatusCode::BAD_REQUEST, "INVALID_PATH");
    assert_eq!(app.stock(id).await, 1_000_010);
    app.stop().await;
}

#[tokio::test]
async fn admin_routes_refuse_users_and_anonymous_callers() {
    let app = TestApp::api_only().await;
    let id = app.product("Muffin", 2_500, 5).await;
    let user = app.token(77);
    let create = json!({"name": "Sneaky", "price": 1, "stock": 1});
    let restock = json!({"quantity": 100});
    let restock_path = format!("/api/admin/products/{id}/restock");

    let res = send(
        &app,
        Method::POST,
        "/api/admin/products",
        Some(&user),
        Some(create.clone()),
    )
    .await;
    assert_problem(&res, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");
    let res = send(&app, Method::POST, &restock_path, Some(&user), Some(restock.clone())).await;
    assert_problem(&res, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");
    let res = send(&app, Method::POST, "/api/admin/products", None, Some(create.clone())).await;
    assert_problem(&res, StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
    let res = send(&app, Method::POST, &restock_path, None, Some(restock.clone())).await;
    assert_problem(&res, StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
    // A role other than exactly "admin" is a user.
    let claims = json!({"sub": "77", "exp": chrono::Utc::now().timestamp() + 600, "role": "ADMIN"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let res = send(&app, Method::POST, "/api/admin/products", Some(&token), Some(create)).await;
    assert_problem(&res, StatusCode::FORBIDDEN, "ADMIN_REQUIRED");

    assert_eq!(product_count(&app).await, 1);
    assert_eq!(app.stock(id).await, 5);
    app.stop().await;
}

#[tokio::test]
async fn a_restock_retried_with_its_idempotency_key_adds_the_stock_once() {
    let app = TestApp::api_only().await;
    let admin = app.admin_token();
    let id = app.product("Scone", 1_500, 2).await;
    let path = format!("/api/admin/products/{id}/restock");
    let key = [("Idempotency-Key", "restock-scone-1")];
    for _ in 0..3 {
        let res = app
            .request(Method::POST, &path, Some(&admin), Some(json!({"quantity": 5})), &key)
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["stock"], 7, "each retry answers as the first did: {body}");
    }
    assert_eq!(app.stock(id).await, 7);
    // The same key for another quantity is a client bug, not a retry.
    let res = app
        .request(Method::POST, &path, Some(&admin), Some(json!({"quantity": 6})), &key)
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "IDEMPOTENCY_KEY_REUSED", "{problem}");
    assert_eq!(app.stock(id).await, 7);
    app.stop().await;
}
