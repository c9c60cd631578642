//! One module per area; each exposes `router()`.

pub mod admin;
pub mod balance;
pub mod coupons;
pub mod events;
pub mod health;
pub mod ops;
pub mod orders;
pub mod products;

use axum::Router;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(balance::router())
        .merge(products::router())
        .merge(coupons::router())
        .merge(orders::router())
        .merge(admin::router())
        .merge(ops::router())
        .merge(events::router())
}
