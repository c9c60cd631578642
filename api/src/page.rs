//! Pagination: `?page=0&size=20` on every listing.
//!
//! `page` is zero-based, `0..=`[`MAX_PAGE`]; `size` is `1..=`[`MAX_PAGE_SIZE`]. Anything else
//! is refused, never clamped: 400 `INVALID_PAGE` or `INVALID_PAGE_SIZE` (and `INVALID_QUERY`
//! for what is not a whole number at all), exactly as the OpenAPI document says. The offset
//! `page * size` is at most 10^8, so it can never overflow on its way to SQL.

use axum::http::HeaderMap;
use orderflow_shared::Error;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::header_grammar;

pub const MAX_PAGE_SIZE: u32 = 100;
/// The deepest page: 100 million rows at the largest size, far past any listing here.
pub const MAX_PAGE: u32 = 1_000_000;
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// `page` and `size`; extracted on its own (`Query<PageParams>`) next to a route's other query
/// parameters.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Zero-based page number, 0..=1,000,000.
    #[serde(default)]
    #[param(minimum = 0, maximum = 1_000_000, default = 0)]
    pub page: u32,
    /// Items per page, 1..=100.
    #[serde(default = "default_size")]
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub size: u32,
}

fn default_size() -> u32 {
    DEFAULT_PAGE_SIZE
}

impl PageParams {
    /// (limit, offset) for SQL, or 400 `INVALID_PAGE_SIZE` / `INVALID_PAGE`.
    pub fn limit_offset(&self) -> Result<(i64, i64), Error> {
        if !(1..=MAX_PAGE_SIZE).contains(&self.size) {
            return Err(Error::bad_request(
                "INVALID_PAGE_SIZE",
                format!("size must be 1..={MAX_PAGE_SIZE}"),
            ));
        }
        if self.page > MAX_PAGE {
            return Err(Error::bad_request(
                "INVALID_PAGE",
                format!("page must be 0..={MAX_PAGE}"),
            ));
        }
        Ok((i64::from(self.size), i64::from(self.page) * i64::from(self.size)))
    }
}

/// The preference that leaves a listing's `total` out, as `Preference-Applied` echoes it.
pub const COUNT_NONE: &str = "count=none";

/// Whether the request prefers no `total` (`Prefer: count=none`, RFC 7240 §2: the first
/// `count` preference decides, its name in any case, its value as sent (values are
/// case-sensitive); any other value is not understood and so ignored).
pub fn prefers_no_count(headers: &HeaderMap) -> bool {
    header_grammar::preferences(headers)
        .into_iter()
        .find(|p| p.name == "count")
        .is_some_and(|p| p.value.as_deref() == Some("none"))
}

/// A page of items.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The page asked for (zero-based).
    pub page: u32,
    /// The size asked for; `items` has at most this many.
    pub size: u32,
    /// Items across all pages.
    pub total: i64,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, params: PageParams, total: i64) -> Self {
        Self {
            items,
            page: params.page,
            size: params.size,
            total,
        }
    }
}

/// A page of a listing whose client may ask not to count it ([`prefers_no_count`]): a
/// [`Page`] whose `total` is left out then.
#[derive(Debug, Serialize, ToSchema)]
pub struct PageMaybeCounted<T> {
    pub items: Vec<T>,
    /// The page asked for (zero-based).
    pub page: u32,
    /// The size asked for; `items` has at most this many.
    pub size: u32,
    /// Items across all pages; absent when the request carried `Prefer: count=none` (then a
    /// page that is not full is the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub total: Option<i64>,
}

impl<T> PageMaybeCounted<T> {
    pub fn new(items: Vec<T>, params: PageParams, total: Option<i64>) -> Self {
        Self {
            items,
            page: params.page,
            size: params.size,
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn count_none_is_read_as_rfc_7240_lists_it() {
        let prefers = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("prefer", HeaderValue::from_static(v));
            }
            prefers_no_count(&headers)
        };
        assert!(prefers(&["count=none"]));
        assert!(prefers(&["COUNT=\"none\""]), "names in any case, values quoted or not");
        assert!(prefers(&["wait=5, count=none"]));
        assert!(prefers(&["wait=5", "count=none; x=1"]));
        assert!(!prefers(&[]));
        assert!(!prefers(&["count=NONE"]), "values are case-sensitive");
        assert!(!prefers(&["count=exact"]));
        assert!(!prefers(&["count"]));
        assert!(!prefers(&["count=exact, count=none"]), "the first occurrence decides");
        assert!(!prefers(&["count=exact", "count=none"]));
        assert!(
            !prefers(&["return=\"count=none\""]),
            "inside another preference's quoted string"
        );
    }

    #[test]
    fn paging_is_refused_outside_its_bounds_never_clamped() {
        let lo = |page, size| PageParams { page, size }.limit_offset();
        assert_eq!(lo(0, 20).ok(), Some((20, 0)));
        assert_eq!(lo(3, 100).ok(), Some((100, 300)));
        assert_eq!(lo(MAX_PAGE, MAX_PAGE_SIZE).ok(), Some((100, 100_000_000)));
        let code = |page, size| lo(page, size).err().and_then(|e| e.code());
        assert_eq!(code(0, 0), Some("INVALID_PAGE_SIZE"));
        assert_eq!(code(0, 101), Some("INVALID_PAGE_SIZE"));
        assert_eq!(code(0, u32::MAX), Some("INVALID_PAGE_SIZE"));
        assert_eq!(code(MAX_PAGE + 1, 1), Some("INVALID_PAGE"));
        assert_eq!(code(u32::MAX, 100), Some("INVALID_PAGE"));
    }
}
