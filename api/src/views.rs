//! The JSON views of an order, shared by the caller's routes (`routes::orders`) and the
//! operator's (`routes::admin`, `routes::ops`). One struct per concern, composed with
//! `#[serde(flatten)]` (an `allOf` in the OpenAPI document), so a field is named, typed and
//! documented once:
//!
//! | view | composed of |
//! |---|---|
//! | `OrderSummary` (`GET /api/orders` items) | the order's own columns |
//! | `OrderView` (`GET /api/orders/{id}`) | `OrderSummary` + `items` + `history` |
//! | `AdminOrder` (`GET /api/admin/orders` items) | `OrderSummary` + `OrderHoldings` |
//! | `TimelineOrder` (`GET /api/admin/orders/{id}/timeline`) | `OrderSummary` + `OrderHoldings` + `items` |

use chrono::{DateTime, Utc};
use orderflow_shared::{
    db::orders::{ItemRow, OrderRow},
    domain::OrderStatus,
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// An order's status, amounts (whole won) and times.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderSummary {
    pub order_id: Uuid,
    #[schema(value_type = OrderStatus)]
    pub status: OrderStatus,
    /// Why it is cancelling or cancelled (OUT_OF_STOCK, COUPON_INVALID, INSUFFICIENT_BALANCE,
    /// TIMEOUT, PROCESSING_FAILED, ADMIN_CANCELLED, USER_CANCELLED); null otherwise.
    pub reason: Option<String>,
    /// Sum of the lines at the prices of acceptance, before discount.
    pub total_amount: i64,
    pub discount_amount: i64,
    /// What the order currently holds of the buyer's money (0 before payment and once refunded).
    pub paid_amount: i64,
    pub coupon_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&OrderRow> for OrderSummary {
    fn from(o: &OrderRow) -> Self {
        Self {
            order_id: o.id,
            status: o.status,
            reason: o.reason.clone(),
            total_amount: o.total_amount,
            discount_amount: o.discount_amount,
            paid_amount: o.paid_amount,
            coupon_id: o.coupon_id,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

/// What an operator also sees: the buyer, what the order holds now and its deadline.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderHoldings {
    pub user_id: i64,
    /// The order holds its reserved stock.
    pub stock_held: bool,
    /// The order holds its coupon (marked USED).
    pub coupon_held: bool,
    /// When recovery cancels it (TIMEOUT) if it is still in flight.
    pub deadline_at: DateTime<Utc>,
}

impl From<&OrderRow> for OrderHoldings {
    fn from(o: &OrderRow) -> Self {
        Self {
            user_id: o.user_id,
            stock_held: o.stock_held,
            coupon_held: o.coupon_held,
            deadline_at: o.deadline_at,
        }
    }
}

/// One line of an order.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemView {
    pub product_id: i64,
    pub quantity: i32,
    /// The price when the order was accepted, whole won.
    pub unit_price: i64,
}

impl From<ItemRow> for ItemView {
    fn from(i: ItemRow) -> Self {
        Self {
            product_id: i.product_id,
            quantity: i.quantity,
            unit_price: i.unit_price,
        }
    }
}

/// The lines of an order as views.
pub fn items(rows: Vec<ItemRow>) -> Vec<ItemView> {
    rows.into_iter().map(ItemView::from).collect()
}

/// One status change as the buyer sees it.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct HistoryView {
    pub status: String,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// One of the caller's orders with its lines and status history.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    #[serde(flatten)]
    pub order: OrderSummary,
    pub items: Vec<ItemView>,
    /// Every status change, oldest first.
    pub history: Vec<HistoryView>,
}

/// An order as the operator's list shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminOrder {
    #[serde(flatten)]
    pub order: OrderSummary,
    #[serde(flatten)]
    pub holdings: OrderHoldings,
    /// Who the buyer is at the identity provider, when they signed in through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<orderflow_shared::auth::Identity>,
}

impl From<&OrderRow> for AdminOrder {
    fn from(o: &OrderRow) -> Self {
        Self {
            order: o.into(),
            holdings: o.into(),
            identity: None,
        }
    }
}

/// An order as its timeline shows it: everything, lines included.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimelineOrder {
    #[serde(flatten)]
    pub order: OrderSummary,
    #[serde(flatten)]
    pub holdings: OrderHoldings,
    pub items: Vec<ItemView>,
}
