//! Rate-limit policy: which class a message type counts against, and each
//! class's token bucket (rate per minute, burst). Enforcement is the node's.

use std::fmt;

use crate::msg_type::MsgType;

/// A message class with its own budget per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The six session handshake messages.
    Handshake,
    /// Liveness: `heartbeat` and `ping`.
    Heartbeat,
    /// Application messages and every type not named elsewhere.
    Task,
    /// Peer discovery.
    Discovery,
    /// Chunked transfer: manifests, chunks and resend requests.
    Chunk,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 5] = [
        Self::Handshake,
        Self::Heartbeat,
        Self::Task,
        Self::Discovery,
        Self::Chunk,
    ];

    /// The class `msg_type` counts against.
    pub fn of(msg_type: &MsgType) -> Self {
        match msg_type.as_str() {
            "handshake_init"
            | "handshake_init_ack"
            | "challenge_response"
            | "session_established"
            | "session_confirm"
            | "ready" => Self::Handshake,
            "heartbeat" | "ping" => Self::Heartbeat,
            "discovery" => Self::Discovery,
            "chunk" | "chunk_manifest" | "chunk_resend" => Self::Chunk,
            _ => Self::Task,
        }
    }

    /// The class's name, as used in configuration and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Heartbeat => "heartbeat",
            Self::Task => "task",
            Self::Discovery => "discovery",
            Self::Chunk => "chunk",
        }
    }

    /// The protocol's default bucket for this class.
    pub fn default_quota(self) -> Quota {
        let (per_minute, burst) = match self {
            Self::Handshake => (5, 10),
            Self::Heartbeat => (60, 120),
            Self::Task => (30, 60),
            Self::Discovery => (10, 20),
            Self::Chunk => (120, 240),
        };
        Quota { per_minute, burst }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token bucket: refilled at `per_minute` tokens a minute, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Sustained rate.
    pub per_minute: u32,
    /// Bucket size: messages accepted at once after a quiet period.
    pub burst: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        Class::of(&s.parse().expect("valid msg_type"))
    }

    #[test]
    fn message_types_map_to_their_classes() {
        assert_eq!(class("handshake_init"), Class::Handshake);
        assert_eq!(class("ready"), Class::Handshake);
        assert_eq!(class("ping"), Class::Heartbeat);
        assert_eq!(class("task_delegate"), Class::Task);
        assert_eq!(class("message"), Class::Task);
        assert_eq!(class("no_such_type"), Class::Task);
        assert_eq!(class("discovery"), Class::Discovery);
        assert_eq!(class("chunk"), Class::Chunk);
    }

    #[test]
    fn defaults_follow_the_protocol_parameters() {
        let q: Vec<(u32, u32)> = Class::ALL
            .iter()
            .map(|c| (c.default_quota().per_minute, c.default_quota().burst))
            .collect();
        assert_eq!(q, vec![(5, 10), (60, 120), (30, 60), (10, 20), (120, 240)]);
    }
}
