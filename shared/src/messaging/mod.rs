//! Messaging: the envelope every message carries, the message types, and the broker
//! topology (exchanges, queues, bindings, arguments).

pub mod envelope;
pub mod topology;

pub use envelope::{Envelope, MessageType};
