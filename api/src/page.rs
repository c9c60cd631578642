//! Pagination: `?page=0&size=20`, size capped at 100.

use orderflow_shared::Error;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub const MAX_PAGE_SIZE: u32 = 100;

#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Zero-based page number.
    #[serde(default)]
    pub page: u32,
    /// Items per page, 1..=100 (larger values are capped at 100).
    #[serde(default = "default_size")]
    pub size: u32,
}

fn default_size() -> u32 {
    20
}

impl PageParams {
    /// (limit, offset), validated.
    pub fn limit_offset(&self) -> Result<(i64, i64), Error> {
        if self.size == 0 {
            return Err(Error::bad_request("INVALID_PAGE_SIZE", "size must be at least 1"));
        }
        let size = self.size.min(MAX_PAGE_SIZE);
        Ok((i64::from(size), i64::from(self.page) * i64::from(size)))
    }

    pub fn size(&self) -> u32 {
        self.size.clamp(1, MAX_PAGE_SIZE)
    }
}

/// A page of items.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u32,
    pub size: u32,
    /// Items across all pages.
    pub total: i64,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, params: PageParams, total: i64) -> Self {
        Self {
            items,
            page: params.page,
            size: params.size(),
            total,
        }
    }
}
