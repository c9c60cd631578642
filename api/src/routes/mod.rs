//! One module per area; each exposes `router()`.

pub mod admin;
pub mod balance;
pub mod coupons;
pub mod events;
pub mod health;
pub mod incidents;
pub mod ops;
pub mod orders;
pub mod products;
pub mod replays;
pub mod trends;

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{
    AppState,
    admission::{self, Admission},
};

/// Every route. Health checks and the dashboard's login bypass admission control; everything
/// else waits its turn under load (see `admission`; an event stream gives its turn back once it
/// starts).
pub fn router(admission: Admission) -> Router<AppState> {
    let admitted = Router::new()
        .merge(balance::router())
        .merge(products::router())
        .merge(coupons::router())
        .merge(orders::router())
        .merge(admin::router())
        .merge(replays::router())
        .merge(incidents::router())
        .merge(ops::router())
        .merge(trends::router())
        .merge(events::router())
        .route_layer(middleware::from_fn_with_state(admission, admission::admit));
    Router::new()
        .merge(health::router())
        .merge(
            ops::sign_in()
                .route_layer(middleware::from_fn(admission::body_deadline))
                .route_layer(middleware::from_fn(admission::work_deadline)),
        )
        .merge(admitted)
}

/// 202 Accepted with `body` and `Location: location`, where the work's progress is followed
/// (RFC 9110 §15.3.3, §10.2.2).
pub fn accepted<T: Serialize>(body: T, location: &str) -> Response {
    let mut res = (StatusCode::ACCEPTED, crate::extract::Json(body)).into_response();
    set_location(&mut res, location);
    res
}

/// Sets `Location` (a path of this API: always a valid header value).
pub fn set_location(res: &mut Response, location: &str) {
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
}
