//! Messaging: the envelope every message carries, the message types, the broker topology
//! (exchanges, queues, bindings, arguments), queue statistics, and the AsyncAPI document that
//! describes them all.

pub mod asyncapi;
pub mod envelope;
pub mod nodes;
pub mod stats;
pub mod topology;

pub use envelope::{Envelope, MessageType};
pub use nodes::connect;
