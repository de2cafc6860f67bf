//! The node's built-in services (see [`crate::service`]): one module each.

pub mod card;
pub mod discovery;
pub mod handshake;
pub mod heartbeat;
pub mod messaging;
pub mod ping;
pub mod tasks;
pub mod transfer;
