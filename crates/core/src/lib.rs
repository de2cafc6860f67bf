//! Peer Protocol v1.2 core: identities, the signed envelope and its canonical
//! encoding, replay protection and the protocol's error codes.
//!
//! This crate does no I/O. Time (`now_ms`, milliseconds since the Unix epoch) and
//! randomness (key seeds, message ids, nonces) are passed in by the caller, so every
//! function here is deterministic and testable without a clock or a network.
//!
//! The inbound pipeline is [`inbound::Acceptor`]: bytes in, a verified
//! [`Envelope`] or a [`Rejection`] (wire error code + reason) out.
#![forbid(unsafe_code)]

pub mod chunk;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod inbound;
pub mod msg_type;
pub mod rate;
pub mod registry;
pub mod reorder;
pub mod replay;
pub mod seq_window;
pub mod session;

pub use envelope::{Draft, Envelope, MessageId, Nonce, SessionId};
pub use error::{ErrorCode, Rejection};
pub use identity::{EntityId, Identity, PublicKey};
pub use msg_type::MsgType;

/// The protocol version this crate speaks, as carried in every envelope.
pub const PROTOCOL_VERSION: &str = "1.2";
