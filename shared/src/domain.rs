//! Domain types and rules: money, order states and reasons, charge and discount rules.
//! Money is whole won in `i64`; there are no floats anywhere.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Charge rules (DESIGN.md §4).
pub const CHARGE_UNIT: i64 = 10;
pub const CHARGE_MIN: i64 = 1_000;
pub const CHARGE_MAX: i64 = 100_000;
pub const BALANCE_MAX: i64 = 10_000_000;

/// Order shape limits.
pub const MAX_ORDER_LINES: usize = 50;
pub const MAX_LINE_QUANTITY: i32 = 1_000;

/// A validated charge amount: a multiple of 10 within 1,000..=100,000 won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeAmount(i64);

impl ChargeAmount {
    /// Checks the charge rules in the order the shop lists them (DESIGN.md §4) and reports
    /// the first one broken: `INVALID_AMOUNT_UNIT` (not a multiple of 10), then
    /// `AMOUNT_BELOW_MINIMUM` (under 1,000), then `AMOUNT_ABOVE_MAXIMUM` (over 100,000).
    /// The last rule, the balance cap, needs the balance and is checked by the charge itself
    /// (409 `BALANCE_LIMIT_EXCEEDED`). So `123` breaks both the unit and the minimum and is
    /// `INVALID_AMOUNT_UNIT`.
    pub fn parse(amount: i64) -> Result<Self> {
        if amount % CHARGE_UNIT != 0 {
            return Err(Error::bad_request(
                "INVALID_AMOUNT_UNIT",
                format!("a charge must be a multiple of {CHARGE_UNIT} won"),
            ));
        }
        if amount < CHARGE_MIN {
            return Err(Error::bad_request(
                "AMOUNT_BELOW_MINIMUM",
                format!("a charge must be at least {CHARGE_MIN} won"),
            ));
        }
        if amount > CHARGE_MAX {
            return Err(Error::bad_request(
                "AMOUNT_ABOVE_MAXIMUM",
                format!("a charge must be at most {CHARGE_MAX} won"),
            ));
        }
        Ok(Self(amount))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DiscountType {
    Fixed,
    Percent,
}

impl DiscountType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "FIXED",
            Self::Percent => "PERCENT",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "FIXED" => Some(Self::Fixed),
            "PERCENT" => Some(Self::Percent),
            _ => None,
        }
    }
}

/// The discount a coupon gives on `total`: percent rounds down, and a discount never exceeds
/// the total.
pub fn discount(kind: DiscountType, value: i64, total: i64) -> i64 {
    let raw = match kind {
        DiscountType::Fixed => value,
        // i128: total * percent cannot overflow even for absurd totals.
        DiscountType::Percent => ((total as i128 * value as i128) / 100) as i64,
    };
    raw.clamp(0, total.max(0))
}

// `$s` is a `tt`, not a `literal`: a `literal` fragment reaches derive macros wrapped in an
// invisible group, which utoipa's serde-attribute parser skips, so the schema would list the
// variants' Rust names ("Pending") instead of their serialized names ("PENDING").
macro_rules! string_enum {
    ($(#[doc = $doc:literal])* $name:ident { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $s)] $variant),+
        }

        // Written out rather than derived: the derive does not see `serde(rename)` through
        // this macro and would document the Rust variant names instead of the wire values.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::Type::String)
                    .description(Some(concat!($($doc, "\n"),*).trim()))
                    .enum_values(Some([$($s),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl $name {
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)+ _ => None }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!("unknown {} {s:?}", stringify!($name)))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// The order state machine (DESIGN.md §2).
    OrderStatus {
        Pending = "PENDING",
        StockReserved = "STOCK_RESERVED",
        CouponApplied = "COUPON_APPLIED",
        Paid = "PAID",
        Confirmed = "CONFIRMED",
        Cancelling = "CANCELLING",
        Cancelled = "CANCELLED",
        CompensationFailed = "COMPENSATION_FAILED",
    }
}

impl OrderStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Cancelled)
    }

    /// States from which an order can still be cancelled (moved to CANCELLING).
    pub const CANCELLABLE: &[Self] = &[Self::Pending, Self::StockReserved, Self::CouponApplied, Self::Paid];
}

string_enum! {
    /// Why an order was cancelled (`orders.reason`, checked by the database too: migration
    /// `20261201000101_user_cancelled.sql`). USER_CANCELLED: by its owner
    /// (`POST /api/orders/{id}/cancel`); ADMIN_CANCELLED: by an operator.
    CancelReason {
        OutOfStock = "OUT_OF_STOCK",
        CouponInvalid = "COUPON_INVALID",
        InsufficientBalance = "INSUFFICIENT_BALANCE",
        Timeout = "TIMEOUT",
        ProcessingFailed = "PROCESSING_FAILED",
        AdminCancelled = "ADMIN_CANCELLED",
        UserCancelled = "USER_CANCELLED",
    }
}

string_enum! {
    /// Kinds of balance ledger entries.
    LedgerKind {
        Charge = "CHARGE",
        Payment = "PAYMENT",
        Refund = "REFUND",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_rules() {
        assert_eq!(ChargeAmount::parse(1_000).map(ChargeAmount::get).ok(), Some(1_000));
        assert_eq!(ChargeAmount::parse(100_000).map(ChargeAmount::get).ok(), Some(100_000));
        let code = |n| ChargeAmount::parse(n).err().and_then(|e| e.code());
        assert_eq!(code(990), Some("AMOUNT_BELOW_MINIMUM"));
        assert_eq!(code(0), Some("AMOUNT_BELOW_MINIMUM"));
        assert_eq!(code(-1_000), Some("AMOUNT_BELOW_MINIMUM"));
        assert_eq!(code(100_010), Some("AMOUNT_ABOVE_MAXIMUM"));
        assert_eq!(code(i64::MAX - 7), Some("AMOUNT_ABOVE_MAXIMUM"));
        assert_eq!(code(1_005), Some("INVALID_AMOUNT_UNIT"));
        // The first broken rule in the shop's order wins: unit, minimum, maximum.
        assert_eq!(code(123), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(999), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(1), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(-5), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(100_001), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(i64::MAX), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(i64::MIN), Some("INVALID_AMOUNT_UNIT"));
        assert_eq!(code(i64::MIN + 8), Some("AMOUNT_BELOW_MINIMUM"));
    }

    #[test]
    fn discounts_round_down_and_never_exceed_total() {
        assert_eq!(discount(DiscountType::Fixed, 3_000, 30_000), 3_000);
        assert_eq!(discount(DiscountType::Fixed, 50_000, 30_000), 30_000);
        assert_eq!(discount(DiscountType::Percent, 10, 30_000), 3_000);
        assert_eq!(discount(DiscountType::Percent, 15, 999), 149); // 149.85 rounds down
        assert_eq!(discount(DiscountType::Percent, 100, 12_345), 12_345);
        assert_eq!(
            discount(DiscountType::Percent, 33, i64::MAX / 2),
            (i128::from(i64::MAX / 2) * 33 / 100) as i64
        );
    }

    #[test]
    fn enums_are_documented_with_their_wire_values() {
        let schema = serde_json::to_value(<OrderStatus as utoipa::PartialSchema>::schema()).unwrap_or_default();
        let wire: Vec<String> = OrderStatus::ALL.iter().map(|s| s.as_str().to_owned()).collect();
        assert_eq!(schema["enum"], serde_json::json!(wire));
        assert_eq!(schema["type"], "string");
        let schema = serde_json::to_value(<CancelReason as utoipa::PartialSchema>::schema()).unwrap_or_default();
        assert_eq!(schema["enum"][0], "OUT_OF_STOCK");
    }

    #[test]
    fn statuses_round_trip() {
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(*s));
        }
        assert_eq!(OrderStatus::parse("pending"), None);
        assert!(OrderStatus::Confirmed.is_terminal());
        assert!(!OrderStatus::Cancelling.is_terminal());
        for r in CancelReason::ALL {
            assert_eq!(CancelReason::parse(r.as_str()), Some(*r));
        }
    }
}
