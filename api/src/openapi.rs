//! OpenAPI document at `/openapi.json` and Swagger UI (vendored, works offline) at `/docs`.

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
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
        routes::ops::overview,
        routes::ops::timeline,
    ),
    components(schemas(crate::problem::Problem)),
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

pub fn router() -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        // Swagger UI answers an unknown asset with an empty 404; make it a problem like any other.
        .layer(axum::middleware::map_response(|res: Response| async move {
            if res.status() == StatusCode::NOT_FOUND && !res.headers().contains_key(header::CONTENT_TYPE) {
                Problem::new(404, "Not Found", "NOT_FOUND", "no such route").into_response()
            } else {
                res
            }
        }))
}
