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

use axum::{Router, middleware};

use crate::{
    AppState,
    admission::{self, Admission},
};

/// Every route. Health checks and the long-lived event streams bypass admission control;
/// everything else waits its turn under load (see `admission`).
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
        .route_layer(middleware::from_fn_with_state(admission, admission::admit));
    Router::new()
        .merge(health::router())
        .merge(events::router())
        .merge(admitted)
}
