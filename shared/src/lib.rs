//! Domain types, configuration, errors, database access and messaging shared by the API and
//! the workers.

pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod messaging;
pub mod metrics;
pub mod telemetry;

pub use error::{Error, ErrorKind, Result};
