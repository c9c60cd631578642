//! Sign-in from the shop's identity provider, against a real OpenID provider nobody here wrote
//! (`oauth2-mock-server`, pinned, behind tests/oidc/provider.mjs): RS256 and ES256 tokens,
//! users mapped on first sight, admins by claim, key rotation without a restart, every kind of
//! forged or misdirected token refused with a 401 and nothing changed, no refetch storm from
//! made-up `kid`s, a provider that is down, and one order placed with a token from the
//! provider's token endpoint that ends CONFIRMED.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{AuthProvider, Options, TestApp, b64url, oidc::Provider};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const AUDIENCE: &str = "orderflow";

async fn app(provider: &Provider) -> TestApp {
    TestApp::spawn_with(Options {
        auth: Some(AuthProvider {
            issuer: provider.issuer.clone(),
            audience: AUDIENCE.into(),
            admin_claim: Some("roles=orderflow-admin".into()),
        }),
        ..Default::default()
    })
    .await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// GET /api/balance with `token`: (status, body).
async fn balance(app: &TestApp, token: &str) -> (StatusCode, Value) {
    app.get("/api/balance", token).await
}

/// What a refused token must leave unchanged: users mapped, ledger rows.
async fn footprint(app: &TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM external_users), (SELECT count(*) FROM balance_ledger)")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn provider_tokens_sign_users_in_and_every_forged_or_misdirected_one_is_refused() {
    let provider = Provider::start();
    let app = app(&provider).await;
    let alice = json!({"sub": "alice", "aud": AUDIENCE});

    // RS256 and ES256: one user, mapped on first sight to an id of the provider's range.
    let rs = provider.token("RS256", None, alice.clone(), json!({})).await;
    let (status, body) = balance(&app, &rs).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["userId"].as_i64().unwrap();
    assert!(id >= orderflow_shared::auth::FIRST_PROVIDER_USER_ID, "{id}");
    let es = provider.token("ES256", None, alice.clone(), json!({})).await;
    let (status, body) = balance(&app, &es).await;
    assert_eq!((status, body["userId"].as_i64()), (StatusCode::OK, Some(id)));
    // The audience may be one of a list.
    let listed = provider
        .token(
            "RS256",
            None,
            json!({"sub": "alice", "aud": ["other", AUDIENCE]}),
            json!({}),
        )
        .await;
    assert_eq!(balance(&app, &listed).await.0, StatusCode::OK);
    let before = footprint(&app).await;

    let kid = provider.current_kid("RS256").await;
    let pem = provider.public_key_pem().await;
    let mut confused = Header::new(Algorithm::HS256);
    confused.kid = Some(kid.clone());
    // (The provider's signer refuses to write a `crit` it does not know: the header is swapped
    // into a valid token by hand; orderflow refuses it before looking at the signature.)
    let valid = provider
        .token("RS256", None, json!({"sub": "mallory", "aud": AUDIENCE}), json!({}))
        .await;
    let parts: Vec<&str> = valid.split('.').collect();
    let critical = format!(
        "{}.{}.{}",
        b64url(
            json!({"alg": "RS256", "kid": kid, "crit": ["x-policy"], "x-policy": "strict"})
                .to_string()
                .as_bytes()
        ),
        parts[1],
        parts[2]
    );
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(
            json!({"sub": "mallory", "aud": AUDIENCE, "iss": provider.issuer, "exp": now() + 300})
                .to_string()
                .as_bytes()
        )
    );
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "wrong audience",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": "another-api"}),
                    json!({}),
                )
                .await,
            "INVALID_TOKEN",
            "aud",
        ),
        (
            "wrong issuer",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE, "iss": "http://evil.example"}),
                    json!({}),
                )
                .await,
            "INVALID_TOKEN",
            "iss",
        ),
        (
            "expired",
            provider
                .token(
                    "ES256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE, "exp": now() - 120}),
                    json!({}),
                )
                .await,
            "TOKEN_EXPIRED",
            "expired",
        ),
        (
            "not yet valid",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE, "nbf": now() + 3_600}),
                    json!({}),
                )
                .await,
            "INVALID_TOKEN",
            "nbf",
        ),
        (
            "issued in the future",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE, "iat": now() + 3_600}),
                    json!({}),
                )
                .await,
            "INVALID_TOKEN",
            "iat",
        ),
        (
            "no subject",
            provider.token("RS256", None, json!({"aud": AUDIENCE}), json!({})).await,
            "INVALID_TOKEN",
            "claim",
        ),
        (
            "no expiry",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE, "exp": null}),
                    json!({}),
                )
                .await,
            "INVALID_TOKEN",
            "claim",
        ),
        ("alg none", unsigned, "INVALID_TOKEN", "not valid"),
        (
            "HS256 signed with the provider's public key",
            jsonwebtoken::encode(
                &confused,
                &json!({"sub": "mallory", "aud": AUDIENCE, "iss": provider.issuer, "exp": now() + 300}),
                &EncodingKey::from_secret(pem.as_bytes()),
            )
            .unwrap(),
            "INVALID_TOKEN",
            "not valid",
        ),
        ("a critical header extension", critical, "INVALID_TOKEN", "7515"),
        (
            "an unknown kid",
            provider
                .token(
                    "RS256",
                    None,
                    json!({"sub": "mallory", "aud": AUDIENCE}),
                    json!({"kid": "nobody-1"}),
                )
                .await,
            "UNKNOWN_SIGNING_KEY",
            "no key",
        ),
    ];
    for (what, token, code, reason) in &cases {
        // A write, so that "nothing changed" means something.
        let (status, body) = app.post("/api/balance/charge", token, json!({"amount": 1_000})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some(*code)),
            "{what}: {body}"
        );
        assert!(body["detail"].as_str().unwrap().contains(reason), "{what}: {body}");
    }
    assert_eq!(footprint(&app).await, before, "a refused token changed something");

    // A thousand tokens with made-up kids: a handful of key fetches at most, no 500, no hang.
    let (jwks_before, _) = provider.fetches().await;
    let started = Instant::now();
    for round in 0..10 {
        let tokens = futures_util::future::join_all((0..100).map(|i| {
            provider.token(
                "RS256",
                None,
                json!({"sub": "mallory", "aud": AUDIENCE}),
                json!({"kid": format!("forged-{round}-{i}")}),
            )
        }))
        .await;
        let answers = futures_util::future::join_all(tokens.iter().map(|t| balance(&app, t))).await;
        for (status, body) in answers {
            assert_eq!(
                (status, body["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("UNKNOWN_SIGNING_KEY"))
            );
        }
    }
    let (jwks_after, _) = provider.fetches().await;
    let allowed = 1 + started.elapsed().as_secs() / 5;
    assert!(
        jwks_after - jwks_before <= allowed,
        "{} key fetches for 1,000 forged kids in {:?}",
        jwks_after - jwks_before,
        started.elapsed()
    );
    assert_eq!(footprint(&app).await, before);
    app.stop().await;
}

#[tokio::test]
async fn keys_rotate_without_a_restart_and_a_dropped_key_is_refused_once_the_keys_are_read_again() {
    let provider = Provider::start();
    let app = app(&provider).await;
    let claims = json!({"sub": "bob", "aud": AUDIENCE});
    let first_kid = provider.current_kid("RS256").await;
    let first = provider.token("RS256", None, claims.clone(), json!({})).await;
    assert_eq!(balance(&app, &first).await.0, StatusCode::OK);

    // A new key: its first token makes the API read the keys again, no restart (once the
    // refresh interval since the last read has passed: a provider publishes a key before it
    // signs with it).
    let second_kid = provider.rotate("RS256").await;
    tokio::time::sleep(orderflow_api::auth::jwks::MIN_REFRESH + Duration::from_millis(200)).await;
    let second = provider.token("RS256", None, claims.clone(), json!({})).await;
    assert_eq!(balance(&app, &second).await.0, StatusCode::OK);
    // The old key is still published: its tokens still work.
    assert_eq!(balance(&app, &first).await.0, StatusCode::OK);

    // The provider drops the old key; the API learns it the next time it reads the keys (a
    // third key's first token, past the refresh interval).
    provider.drop_key(&first_kid).await;
    tokio::time::sleep(orderflow_api::auth::jwks::MIN_REFRESH + Duration::from_millis(200)).await;
    provider.rotate("RS256").await;
    let third = provider.token("RS256", None, claims.clone(), json!({})).await;
    assert_eq!(balance(&app, &third).await.0, StatusCode::OK);
    let (status, body) = balance(&app, &first).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("UNKNOWN_SIGNING_KEY")),
        "{body}"
    );
    let by_second = provider.token("RS256", Some(&second_kid), claims, json!({})).await;
    assert_eq!(balance(&app, &by_second).await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn while_the_provider_is_down_known_keys_work_and_a_new_one_is_answered_retry_later() {
    let provider = Provider::start();
    let app = app(&provider).await;
    let claims = json!({"sub": "carol", "aud": AUDIENCE});
    let known = provider.token("ES256", None, claims.clone(), json!({})).await;
    assert_eq!(balance(&app, &known).await.0, StatusCode::OK);

    provider.set_down(true).await;
    let new_kid = provider.rotate("ES256").await;
    let unknown = provider.token("ES256", Some(&new_kid), claims.clone(), json!({})).await;
    tokio::time::sleep(orderflow_api::auth::jwks::MIN_REFRESH + Duration::from_millis(200)).await;
    assert_eq!(
        balance(&app, &known).await.0,
        StatusCode::OK,
        "cached keys keep working"
    );
    let started = Instant::now();
    let (status, body) = balance(&app, &unknown).await;
    // Not a refusal (the token may be good): 503, to retry; the detail names none of the
    // provider's addresses (the reason is in the log).
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("IDENTITY_PROVIDER_UNAVAILABLE")),
        "{body}"
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot be asked") && !detail.contains("127.0.0.1"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(balance(&app, &known).await.0, StatusCode::OK);

    // An operator whose dashboard session holds such a token is not logged out by the outage:
    // the page says so and keeps the cookie; a login with it is answered "try again", not
    // "invalid token".
    let dashboard = app
        .http
        .get(format!("{}/ops", app.base))
        .header("cookie", format!("orderflow_admin={unknown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(dashboard.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        dashboard.headers().get("set-cookie").is_none(),
        "{:?}",
        dashboard.headers()
    );
    let res = app
        .request(Method::POST, "/ops/login", None, Some(json!({"token": unknown})), &[])
        .await;
    let (status, body): (_, Value) = (res.status(), res.json().await.unwrap());
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("SESSION_CHECK_UNAVAILABLE")),
        "{body}"
    );

    // Back up: the new key is accepted once the refresh interval has passed.
    provider.set_down(false).await;
    tokio::time::sleep(orderflow_api::auth::jwks::MIN_REFRESH + Duration::from_millis(200)).await;
    assert_eq!(balance(&app, &unknown).await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_token_from_the_token_endpoint_places_an_order_that_confirms_and_admins_come_from_a_claim() {
    let provider = Provider::start();
    let app = app(&provider).await;
    let product = app.product("Signed in", 3_000, 10).await;

    provider
        .next_token_claims(json!({"sub": "buyer-1", "roles": ["customer"]}))
        .await;
    let buyer = provider.token_endpoint(AUDIENCE).await;
    let (status, body) = app.post("/api/balance/charge", &buyer, json!({"amount": 10_000})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let user_id = body["userId"].as_i64().unwrap();
    let res = app
        .request(
            Method::POST,
            "/api/orders",
            Some(&buyer),
            Some(json!({"items": [{"productId": product, "quantity": 2}]})),
            &[("idempotency-key", "signed-in-1"), ("prefer", "wait=20")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let order: Value = res.json().await.unwrap();
    assert_eq!(
        (order["status"].as_str(), order["paidAmount"].as_i64()),
        (Some("CONFIRMED"), Some(6_000))
    );
    assert_eq!(balance(&app, &buyer).await.1["balance"], 4_000);

    // Not an admin without the claim; an admin with it, who sees the buyer's identity.
    assert_eq!(app.get("/api/admin/orders", &buyer).await.0, StatusCode::FORBIDDEN);
    provider
        .next_token_claims(json!({"sub": "ops-1", "roles": ["orderflow-admin"]}))
        .await;
    let ops = provider.token_endpoint(AUDIENCE).await;
    let (status, page) = app.get("/api/admin/orders", &ops).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed = &page["items"][0];
    assert_eq!(listed["userId"].as_i64(), Some(user_id));
    assert_eq!(
        listed["identity"],
        json!({"issuer": provider.issuer, "subject": "buyer-1"})
    );
    // The ops dashboard takes the provider's admin token too.
    let res = app
        .request(Method::POST, "/ops/login", None, Some(json!({"token": ops})), &[])
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // An audit record names the provider's identity.
    let (status, replay) = app
        .post(
            "/api/admin/events/replay",
            &ops,
            json!({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replay}");
    assert!(
        replay["requestedBy"]
            .as_str()
            .unwrap()
            .ends_with(&format!("({}#ops-1)", provider.issuer)),
        "{replay}"
    );
    // The OpenAPI document names the provider.
    let (_, doc) = app.get("/openapi.json", &ops).await;
    assert_eq!(
        doc["components"]["securitySchemes"]["oidc"]["openIdConnectUrl"],
        format!("{}/.well-known/openid-configuration", provider.issuer)
    );
    app.stop().await;
}

#[tokio::test]
async fn two_first_requests_at_once_make_one_user() {
    let provider = Provider::start();
    let app = app(&provider).await;
    let token = provider
        .token("RS256", None, json!({"sub": "dave", "aud": AUDIENCE}), json!({}))
        .await;
    let answers = futures_util::future::join_all((0..20).map(|_| balance(&app, &token))).await;
    let ids: std::collections::HashSet<i64> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["userId"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM external_users WHERE subject = 'dave'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    // Shared-secret tokens still work beside the provider's.
    assert_eq!(balance(&app, &app.token(7)).await.0, StatusCode::OK);
    app.stop().await;
}
