//! OpenAPI 3.1 document at `/openapi.json` and Swagger UI (vendored, works offline) at `/docs`.
//!
//! The routes' `#[utoipa::path]` annotations state what is particular to each route: its
//! parameters and body with every constraint the code checks (minimum, maximum, multipleOf,
//! maxLength, pattern, format), its success answer with the links to the operations that use
//! the ids it returns, and its route-specific problems. [`document`] then adds, from the shape
//! of each operation, the answers every route of that shape can give, so that no status
//! goes undocumented:
//!
//! | operation | adds |
//! |---|---|
//! | has parameters or a body | 400 (malformed or out-of-range input) |
//! | has a JSON body | 408 `BODY_TIMEOUT`, 413 `PAYLOAD_TOO_LARGE`, 415 `INVALID_CONTENT_TYPE` |
//! | needs a token | 401 (with `WWW-Authenticate: Bearer`) |
//! | under `/api/admin` | 403 `ADMIN_REQUIRED` |
//! | a rate-limited write ([`RATE_LIMITED`]) | 429 `RATE_LIMITED` (with `Retry-After`) |
//! | under `/api`, and `/readyz` | 503 `SERVICE_BUSY` / `SERVICE_UNAVAILABLE` / `REQUEST_DEADLINE_EXCEEDED` / `COMMIT_OUTCOME_UNKNOWN` / `IDENTITY_PROVIDER_UNAVAILABLE` (with `Retry-After`) |
//!
//! Every response gets a description (OpenAPI requires one). The tests validate the result
//! with openapi-spec-validator and fuzz the API against it with schemathesis
//! (`scripts/contract-test.sh`).

use std::sync::LazyLock;

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use orderflow_shared::config::{MAX_QUERY_DURATION, duration_pattern};
use serde_json::{Value, json};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        Type,
        schema::{ObjectBuilder, Schema},
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_swagger_ui::SwaggerUi;

use crate::{AppState, problem::Problem, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow",
        description = "Orders accepted at once as PENDING and carried through stock, coupon and payment \
                       workers over RabbitMQ. Errors are RFC 9457 problem documents with a stable `code`."
    ),
    paths(
        routes::health::live,
        routes::health::ready,
        routes::balance::get_balance,
        routes::balance::charge,
        routes::balance::history,
        routes::products::list,
        routes::products::show,
        routes::products::create,
        routes::products::restock,
        routes::coupons::create,
        routes::coupons::issue,
        routes::coupons::mine,
        routes::orders::place,
        routes::orders::show,
        routes::orders::cancel,
        routes::orders::list,
        routes::orders::popular,
        routes::events::order_events,
        routes::admin::list_orders,
        routes::admin::cancel_order,
        routes::admin::retry_compensation,
        routes::admin::list_dead_letters,
        routes::admin::show_dead_letter,
        routes::admin::replay_dead_letter,
        routes::admin::discard_dead_letter,
        routes::admin::list_parked,
        routes::admin::retry_parked,
        routes::admin::discard_parked,
        routes::replays::start,
        routes::replays::list,
        routes::replays::show,
        routes::replays::cancel,
        routes::incidents::failure_groups,
        routes::incidents::start,
        routes::incidents::list,
        routes::incidents::show,
        routes::incidents::items,
        routes::incidents::cancel,
        routes::ops::overview,
        routes::ops::timeline,
        routes::trends::trends,
    ),
    components(schemas(crate::problem::Problem, routes::admin::DeadLetterStatusFilter)),
    modifiers(&BearerAuth),
    tags(
        (name = "balance", description = "Balance and its ledger"),
        (name = "products", description = "Product catalogue"),
        (name = "coupons", description = "First-come-first-served coupons"),
        (name = "orders", description = "Orders and their progress through the pipeline"),
        (name = "admin", description = "Admin-only routes (token with role admin, as a bearer token or the ops dashboard's session cookie)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        // The ops dashboard's session (POST /ops/login): accepted by admin routes when no
        // bearer token is sent.
        components.add_security_scheme(
            "admin_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::extract::ADMIN_COOKIE,
                "an admin token kept by POST /ops/login (HttpOnly, SameSite=Strict)",
            ))),
        );
    }
}

/// The writes a per-user rate limit may refuse with 429 `RATE_LIMITED` and `Retry-After`:
/// (method, path template).
pub const RATE_LIMITED: &[(&str, &str)] = &[
    ("post", "/api/orders"),
    ("post", "/api/orders/{id}/cancel"),
    ("post", "/api/balance/charge"),
    ("post", "/api/coupons/{coupon_id}/issue"),
];

/// The schema of a duration in a query string (`stuckAfter`, `olderThan`): exactly what
/// [`orderflow_shared::config::query_duration`] accepts, 0..=7 days, as a pattern.
pub fn query_duration_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(duration_pattern(MAX_QUERY_DURATION)))
        .examples(["30s", "5m", "500ms"])
        .into()
}

/// The served document (built once): the annotations plus what [`complete`] adds.
pub fn document() -> Value {
    static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
        complete(&mut doc);
        doc
    });
    DOCUMENT.clone()
}

/// A UUID as RFC 9562 §4 spells it (hyphenated, either case).
pub const UUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

const PROBLEM: &str = "application/problem+json";
const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Adds the answers common to every operation of a shape (see the module docs), gives every
/// response a description, and splits `NewCoupon` by discount type.
fn complete(doc: &mut Value) {
    let problem = |description: &str, headers: Value| {
        let mut response = json!({
            "description": description,
            "content": { PROBLEM: { "schema": { "$ref": "#/components/schemas/Problem" } } },
        });
        if headers.as_object().is_some_and(|h| !h.is_empty()) {
            response["headers"] = headers;
        }
        response
    };
    let retry_after = json!({ "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": true,
        "schema": { "type": "string", "pattern": "^[0-9]+$" },
    }});
    let shared = json!({
        "BadRequest": problem(
            "a path, query, header or body value is malformed or breaks a documented constraint \
             (INVALID_PATH, INVALID_QUERY, INVALID_BODY, MALFORMED_JSON or a field's own code)",
            json!({}),
        ),
        "Unauthorized": problem(
            "MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED or UNKNOWN_SIGNING_KEY: no valid bearer token",
            json!({ "WWW-Authenticate": {
                "description": "always `Bearer` (RFC 6750 §3)",
                "required": true,
                "schema": { "type": "string", "const": "Bearer" },
            }}),
        ),
        "Forbidden": problem(
            "ADMIN_REQUIRED: the token has no admin role (or CROSS_ORIGIN_REQUEST for a cookie-authenticated \
             change from another origin)",
            json!({}),
        ),
        "RequestTimeout": problem(
            "BODY_TIMEOUT: the body did not arrive within 10 s of the server's first read of it",
            json!({})
        ),
        "ContentTooLarge": problem("PAYLOAD_TOO_LARGE: the body is larger than 2 MiB", json!({})),
        "UnsupportedMediaType": problem(
            "INVALID_CONTENT_TYPE: the body is not sent as application/json",
            json!({}),
        ),
        "TooManyRequests": problem(
            "RATE_LIMITED: this user sent too many writes to this route (RATE_LIMIT_WRITES per \
             RATE_LIMIT_WINDOW, RFC 6585); retry after `Retry-After` seconds",
            {
                let mut headers = retry_after.clone();
                headers["RateLimit-Policy"] = json!({
                    "description": "the route's quota (draft-ietf-httpapi-ratelimit-headers-10), \
                                    e.g. `\"orders\";q=100;w=10`",
                    "required": true,
                    "schema": { "type": "string" },
                });
                headers["RateLimit"] = json!({
                    "description": "requests left and seconds until one is accepted again \
                                    (draft-ietf-httpapi-ratelimit-headers-10), e.g. `\"orders\";r=0;t=3`",
                    "required": true,
                    "schema": { "type": "string" },
                });
                headers
            },
        ),
        "ServiceUnavailable": problem(
            "SERVICE_BUSY: too many requests are in flight, SERVICE_UNAVAILABLE: the database cannot be \
             reached, or REQUEST_DEADLINE_EXCEEDED: no answer within 30 s (5 min under /api/admin); retry after `Retry-After` seconds. \
             COMMIT_OUTCOME_UNKNOWN: a write got no answer in time and may have been applied; retry it only \
             with the same Idempotency-Key, or check first. IDENTITY_PROVIDER_UNAVAILABLE: the token's \
             signing key is not known yet and the identity provider cannot be asked now",
            retry_after,
        ),
    });
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert("responses".into(), shared);
    }
    split_new_coupon(doc);
    sse_events(doc);
    let uuid_pattern = Value::from(UUID_PATTERN);

    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            let Some(op) = item.get_mut(*method).and_then(Value::as_object_mut) else {
                continue;
            };
            let has_params = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
            let has_body = op.contains_key("requestBody");
            let secured = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            // A path, query or header value is never JSON null, and `format: uuid` is only an
            // annotation in JSON Schema 2020-12: a pattern makes it a constraint.
            for param in op
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let Some(schema) = param.get_mut("schema").and_then(Value::as_object_mut) else {
                    continue;
                };
                if let Some(types) = schema.get_mut("type").and_then(Value::as_array_mut) {
                    types.retain(|t| t != "null");
                    if let [only] = types.as_slice() {
                        let only = only.clone();
                        schema.insert("type".into(), only);
                    }
                }
                if schema.get("format").and_then(Value::as_str) == Some("uuid") {
                    schema.entry("pattern").or_insert_with(|| uuid_pattern.clone());
                }
            }
            let mut add = Vec::new();
            if has_params || has_body {
                add.push(("400", "BadRequest"));
            }
            if has_body {
                add.extend([
                    ("408", "RequestTimeout"),
                    ("413", "ContentTooLarge"),
                    ("415", "UnsupportedMediaType"),
                ]);
            }
            if secured {
                add.push(("401", "Unauthorized"));
            }
            if path.starts_with("/api/admin/") {
                add.push(("403", "Forbidden"));
            }
            if RATE_LIMITED.contains(&(*method, path.as_str())) {
                add.push(("429", "TooManyRequests"));
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            if path.starts_with("/api/") || path == "/readyz" {
                // Replaces a route's own 503, so that every 503 documents `Retry-After`.
                responses.insert(
                    "503".into(),
                    json!({ "$ref": "#/components/responses/ServiceUnavailable" }),
                );
            }
            for (status, name) in add {
                responses
                    .entry(status)
                    .or_insert_with(|| json!({ "$ref": format!("#/components/responses/{name}") }));
            }
            for (status, response) in responses.iter_mut() {
                let Some(response) = response.as_object_mut() else {
                    continue;
                };
                if response.contains_key("$ref") {
                    continue;
                }
                let missing = response
                    .get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty);
                if missing {
                    let reason = status
                        .parse::<u16>()
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("response");
                    response.insert("description".into(), Value::from(reason));
                }
            }
        }
    }
}

/// A `text/event-stream` response is a sequence of events: its schema describes one event
/// (`event`, `id`, `data`; the convention OpenAPI 3.2 names `itemSchema`), whose `data` is a
/// JSON document of the schema the route names (`contentSchema`).
fn sse_events(doc: &mut Value) {
    let Some(content) =
        doc.pointer_mut("/paths/~1api~1orders~1{id}~1events/get/responses/200/content/text~1event-stream")
    else {
        return;
    };
    let data = content.get("schema").cloned().unwrap_or(Value::Null);
    content["schema"] = json!({
        "description": "one server-sent event (comment lines that keep the connection alive are not events)",
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": { "type": "string", "const": "status" },
            "id": { "type": "string", "pattern": "^[0-9]+$", "description": "the status change's sequence number; send it back as Last-Event-ID to resume" },
            "data": { "type": "string", "contentMediaType": "application/json", "contentSchema": data },
        },
    });
}

/// `discountValue` is 1..=1,000,000,000 won for a FIXED coupon and 1..=100 for a PERCENT one:
/// one schema per discount type, joined with `oneOf` (the types exclude each other).
fn split_new_coupon(doc: &mut Value) {
    let Some(schema) = doc.pointer_mut("/components/schemas/NewCoupon") else {
        return;
    };
    let base = schema.clone();
    let variant = |kind: &str, max: i64, unit: &str| {
        let mut v = base.clone();
        v["title"] = Value::from(format!("NewCoupon ({kind})"));
        v["properties"]["discountType"] = json!({ "type": "string", "enum": [kind] });
        v["properties"]["discountValue"] = json!({
            "type": "integer", "format": "int64", "minimum": 1, "maximum": max,
            "description": format!("{unit}, 1..={max} (400 `INVALID_DISCOUNT`)"),
        });
        v
    };
    let description = base.get("description").cloned().unwrap_or(Value::Null);
    *schema = json!({
        "description": description,
        "oneOf": [variant("FIXED", 1_000_000_000, "won off"), variant("PERCENT", 100, "percent off")],
    });
}

/// [`document`] for a deployment: with an identity provider (AUTH_ISSUER), an `openIdConnect`
/// security scheme (`oidc`) names its discovery document, and each operation that takes the
/// bearer scheme takes its tokens too.
pub fn document_for(issuer: Option<&str>) -> Value {
    let mut doc = document();
    if let Some(issuer) = issuer {
        doc["components"]["securitySchemes"]["oidc"] = json!({
            "type": "openIdConnect",
            "openIdConnectUrl": crate::auth::jwks::discovery_url(issuer),
            "description": "a token from the shop's identity provider (RS256/ES256/EdDSA, its aud naming this API)",
        });
        for item in doc["paths"].as_object_mut().into_iter().flat_map(|p| p.values_mut()) {
            for op in item.as_object_mut().into_iter().flat_map(|i| i.values_mut()) {
                let Some(security) = op.get_mut("security").and_then(Value::as_array_mut) else {
                    continue;
                };
                if security.iter().any(|r| r.get("bearer").is_some()) {
                    security.push(json!({"oidc": []}));
                }
            }
        }
    }
    doc
}

pub fn router(issuer: Option<&str>) -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", document_for(issuer)))
        // Swagger UI answers an unknown asset with an empty 404; make it a problem like any other.
        .layer(axum::middleware::map_response(|res: Response| async move {
            if res.status() == StatusCode::NOT_FOUND && !res.headers().contains_key(header::CONTENT_TYPE) {
                Problem::new(404, "Not Found", "NOT_FOUND", "no such route").into_response()
            } else {
                res
            }
        }))
}
