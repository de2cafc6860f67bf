//! Wire error codes and the rejection a receiver sends back.

use std::fmt;

/// A protocol error code, as carried in the `error_code` field of an `error` message.
///
/// The first group comes from the v1.x documents; the last seven are v1.2 additions
/// for cases the earlier documents left without a code (see `docs/PROTOCOL.md`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The envelope's version is not one this node speaks.
    InvalidVersion,
    /// The signature does not verify over the envelope's signed bytes.
    InvalidSignature,
    /// Timestamp outside the tolerance, or a nonce already seen from this sender.
    ReplayDetected,
    /// The sender cannot be identified: `sender_id` is not the hash of the key carried.
    UnknownSender,
    /// The session has expired.
    SessionExpired,
    /// No session with that id.
    SessionNotFound,
    /// A sequence number outside the session's window.
    SequenceError,
    /// A sealed payload failed to open.
    DecryptionFailed,
    /// A handshake challenge arrived too late.
    ChallengeExpired,
    /// A handshake challenge response is wrong.
    ChallengeInvalid,
    /// A handshake with this peer is already running.
    HandshakeInProgress,
    /// End-to-end encryption is not yet set up.
    EncryptionNotReady,
    /// This node requires encrypted payloads for this message.
    EncryptionRequired,
    /// The message is not valid in the current state.
    InvalidState,
    /// The sender exceeded its rate limit.
    RateLimited,
    /// A chunk is inconsistent with its transfer.
    ChunkError,
    /// A DHT operation failed.
    DhtError,
    /// v1.2: the bytes are not a well-formed envelope.
    MalformedMessage,
    /// v1.2: the message is larger than the receiver accepts.
    MessageTooLarge,
    /// v1.2: the receiver has no handler for this msg_type.
    UnsupportedMsgType,
    /// v1.2: the envelope names another entity as its recipient.
    WrongRecipient,
    /// v1.2: the envelope's sender is not the peer of the connection it came on.
    WrongSender,
    /// v1.2: the recipient's inbox holds as much from this sender (or in all)
    /// as it may until its agent reads; retry after the wait given.
    InboxFull,
    /// v1.2: the recipient cannot take the message now (its storage failed);
    /// nothing was accepted, retry later.
    Unavailable,
}

impl ErrorCode {
    /// Every code, in wire-table order.
    pub const ALL: [ErrorCode; 24] = [
        Self::InvalidVersion,
        Self::InvalidSignature,
        Self::ReplayDetected,
        Self::UnknownSender,
        Self::SessionExpired,
        Self::SessionNotFound,
        Self::SequenceError,
        Self::DecryptionFailed,
        Self::ChallengeExpired,
        Self::ChallengeInvalid,
        Self::HandshakeInProgress,
        Self::EncryptionNotReady,
        Self::EncryptionRequired,
        Self::InvalidState,
        Self::RateLimited,
        Self::ChunkError,
        Self::DhtError,
        Self::MalformedMessage,
        Self::MessageTooLarge,
        Self::UnsupportedMsgType,
        Self::WrongRecipient,
        Self::WrongSender,
        Self::InboxFull,
        Self::Unavailable,
    ];

    /// The code as it appears on the wire, e.g. `"REPLAY_DETECTED"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidVersion => "INVALID_VERSION",
            Self::InvalidSignature => "INVALID_SIGNATURE",
            Self::ReplayDetected => "REPLAY_DETECTED",
            Self::UnknownSender => "UNKNOWN_SENDER",
            Self::SessionExpired => "SESSION_EXPIRED",
            Self::SessionNotFound => "SESSION_NOT_FOUND",
            Self::SequenceError => "SEQUENCE_ERROR",
            Self::DecryptionFailed => "DECRYPTION_FAILED",
            Self::ChallengeExpired => "CHALLENGE_EXPIRED",
            Self::ChallengeInvalid => "CHALLENGE_INVALID",
            Self::HandshakeInProgress => "HANDSHAKE_IN_PROGRESS",
            Self::EncryptionNotReady => "ENCRYPTION_NOT_READY",
            Self::EncryptionRequired => "ENCRYPTION_REQUIRED",
            Self::InvalidState => "INVALID_STATE",
            Self::RateLimited => "RATE_LIMITED",
            Self::ChunkError => "CHUNK_ERROR",
            Self::DhtError => "DHT_ERROR",
            Self::MalformedMessage => "MALFORMED_MESSAGE",
            Self::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Self::UnsupportedMsgType => "UNSUPPORTED_MSG_TYPE",
            Self::WrongRecipient => "WRONG_RECIPIENT",
            Self::WrongSender => "WRONG_SENDER",
            Self::InboxFull => "INBOX_FULL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    /// Parses a wire code; `None` for a code this implementation does not know.
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a receiver refused a message: a wire code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Rejection {
    /// The wire error code.
    pub code: ErrorCode,
    /// A sentence for humans; never parsed.
    pub reason: String,
}

impl Rejection {
    /// A rejection with `code` and `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()));
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("NOPE"), None);
    }
}
