//! Rate-limit policy: the message classes and each class's token bucket (rate
//! per minute, burst). Which class a message type counts against is declared
//! by the node service that owns the type (its route); enforcement is the
//! node's.

use std::fmt;

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

    #[test]
    fn defaults_follow_the_protocol_parameters() {
        let q: Vec<(u32, u32)> = Class::ALL
            .iter()
            .map(|c| (c.default_quota().per_minute, c.default_quota().burst))
            .collect();
        assert_eq!(q, vec![(5, 10), (60, 120), (30, 60), (10, 20), (120, 240)]);
    }
}
