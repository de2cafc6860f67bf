//! Secure sessions (Peer Protocol v1.1 security layer): the six-step handshake, key schedule and payload sealing.
//!
//! Two entities that want sealed payloads run a six-message handshake. Each
//! message is the payload of an ordinary signed envelope (so every message's
//! sender is authenticated by its envelope signature):
//!
//! ```text
//! A (initiator)                                    B (responder)
//! handshake_init       handshake_id, A's ephemeral  ─────────────▶
//!                    ◀───────────── handshake_init_ack   handshake_id, B's ephemeral, challenge
//! challenge_response   Ed25519(A, th ‖ challenge)   ─────────────▶
//!                    ◀───────────── session_established  session_id, MAC(responder confirm key)
//! session_confirm      MAC(initiator confirm key)   ─────────────▶
//!                    ◀───────────── ready
//! ```
//!
//! Both sides then hold a [`Session`]: a [`Sealer`] for what they send and an
//! [`Opener`] for what they receive, with AES-256-GCM keys derived by HKDF from
//! an X25519 exchange of fresh ephemeral keys and the transcript hash (see
//! [`keys`]). Payload encodings are in [`messages`].
//!
//! Everything here is sans-I/O in the quinn-proto style: inputs are pushed with
//! the time (`handle(now_ms, …)`, `handle_timeout(now_ms)`), the reply to an
//! input is returned by that call (`Result<Option<Message>, Rejection>`), the
//! next timer is pulled with `poll_timeout()` and a finished session with
//! `poll_session()`. Randomness is injected as bytes ([`Random`]).
//!
//! - [`Handshake`]: one attempt between a local entity and a peer, in one role.
//! - [`Link`]: the at-most-one attempt a node runs with one peer; it applies the
//!   simultaneous-initiation rule ([`resolve_simultaneous`]) and is what a node
//!   should drive.
//!
//! The replay window for received sequence numbers is not here: the node checks
//! it (`seq_window`) after [`Session::open`] succeeds.

use std::fmt;

use crate::envelope::SessionId;
use crate::error::{ErrorCode, Rejection};
use crate::identity::EntityId;
use crate::msg_type::MsgType;

pub mod handshake;
pub mod keys;
pub mod link;
pub mod messages;
#[cfg(test)]
mod testing;

pub use handshake::{Handshake, Random};
pub use keys::{HandshakeId, Header, Keys, Opener, Sealer, Transcript};
pub use link::{Link, resolve_simultaneous};
pub use messages::Message;

/// Timeouts and lifetimes of the secure session layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The whole handshake must reach READY within this time of its start
    /// (default 60 s). Past it, the attempt fails with `CHALLENGE_EXPIRED`.
    pub handshake_timeout_ms: u64,
    /// The responder accepts the `challenge_response` only within this time of
    /// sending its challenge (default 30 s); later → `CHALLENGE_EXPIRED`.
    pub challenge_timeout_ms: u64,
    /// A session's lifetime from the moment it became READY (default 3600 s);
    /// after it, sealing and opening fail with `SESSION_EXPIRED`.
    pub session_lifetime_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 60_000,
            challenge_timeout_ms: 30_000,
            session_lifetime_ms: 3_600_000,
        }
    }
}

/// Which end of a handshake a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sent `handshake_init`; signs the challenge.
    Initiator,
    /// Answered `handshake_init`; chooses the challenge and the session id.
    Responder,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Initiator => "initiator",
            Self::Responder => "responder",
        })
    }
}

/// The state of a handshake or session. `Display` gives the protocol's names
/// (`HANDSHAKE_INIT_SENT`, …).
///
/// HANDSHAKE_ACK_RECEIVED, and SESSION_ESTABLISHED on the initiator's side, are
/// passed through inside one `handle` call (the reply is produced by the same
/// call that receives the message), so they are never observed between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Created, nothing sent or received.
    Initial,
    /// Initiator: `handshake_init` sent, waiting for the ack.
    HandshakeInitSent,
    /// Initiator: ack received, keys derived (transient).
    HandshakeAckReceived,
    /// Initiator: challenge signed and sent, waiting for `session_established`.
    /// Responder: ack (with the challenge) sent, waiting for `challenge_response`.
    ChallengeSent,
    /// Responder: `session_established` sent, waiting for `session_confirm`.
    /// Initiator: `session_established` verified (transient).
    SessionEstablished,
    /// Initiator: `session_confirm` sent, waiting for `ready`.
    SessionConfirmed,
    /// The session is established on this side.
    Ready,
    /// The attempt failed; every further input returns the same error.
    Error,
    /// The session's lifetime is over.
    Expired,
}

impl State {
    /// The protocol's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "INITIAL",
            Self::HandshakeInitSent => "HANDSHAKE_INIT_SENT",
            Self::HandshakeAckReceived => "HANDSHAKE_ACK_RECEIVED",
            Self::ChallengeSent => "CHALLENGE_SENT",
            Self::SessionEstablished => "SESSION_ESTABLISHED",
            Self::SessionConfirmed => "SESSION_CONFIRMED",
            Self::Ready => "READY",
            Self::Error => "ERROR",
            Self::Expired => "EXPIRED",
        }
    }

    /// Whether a handshake in this state is under way (started, not finished).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::HandshakeInitSent
                | Self::HandshakeAckReceived
                | Self::ChallengeSent
                | Self::SessionEstablished
                | Self::SessionConfirmed
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An established session as one side holds it: who, since when, and the keys
/// for each direction. Key material is zeroised when it is dropped.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    local: EntityId,
    peer: EntityId,
    role: Role,
    established_ms: u64,
    expires_ms: u64,
    sealer: Sealer,
    opener: Opener,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        local: EntityId,
        peer: EntityId,
        role: Role,
        established_ms: u64,
        lifetime_ms: u64,
        keys: &Keys,
    ) -> Self {
        let (sealer, opener) = keys.channel(role);
        Self {
            id,
            local,
            peer,
            role,
            established_ms,
            expires_ms: established_ms.saturating_add(lifetime_ms),
            sealer,
            opener,
        }
    }

    /// The session id (the envelopes' `session_id`).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// This side's entity id.
    pub fn local(&self) -> EntityId {
        self.local
    }

    /// The other side's entity id.
    pub fn peer(&self) -> EntityId {
        self.peer
    }

    /// The role this side had in the handshake.
    pub fn role(&self) -> Role {
        self.role
    }

    /// When this side reached READY (ms since the Unix epoch).
    pub fn established_ms(&self) -> u64 {
        self.established_ms
    }

    /// The first instant at which the session is expired.
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Whether the lifetime is over at `now_ms` (at or after [`Session::expires_ms`]).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }

    /// READY, or EXPIRED once the lifetime is over.
    pub fn state(&self, now_ms: u64) -> State {
        if self.is_expired(now_ms) {
            State::Expired
        } else {
            State::Ready
        }
    }

    /// The sequence number the next [`Session::seal`] will use.
    pub fn next_sequence(&self) -> Option<u64> {
        self.sealer.next_sequence()
    }

    fn check_alive(&self, now_ms: u64) -> Result<(), Rejection> {
        if self.is_expired(now_ms) {
            return Err(Rejection::new(
                ErrorCode::SessionExpired,
                format!("session {} expired at {} ms", self.id, self.expires_ms),
            ));
        }
        Ok(())
    }

    /// Seals a payload to the peer. Put the returned sequence number in the
    /// envelope's `sequence_num`, the ciphertext in its payload, this session's
    /// id in `session_id`, the peer in `recipient_id`, and `msg_type` as its
    /// msg_type: all of them are bound to the ciphertext.
    ///
    /// Errors: `SESSION_EXPIRED` after the lifetime (start a new handshake) or
    /// when the sequence numbers are exhausted; `MESSAGE_TOO_LARGE`.
    pub fn seal(
        &mut self,
        now_ms: u64,
        msg_type: &MsgType,
        plaintext: &[u8],
    ) -> Result<(u64, Vec<u8>), Rejection> {
        self.check_alive(now_ms)?;
        let header = Header {
            session_id: self.id,
            sender: self.local,
            recipient: self.peer,
            msg_type,
        };
        self.sealer.seal(&header, plaintext)
    }

    /// Opens a payload the peer sealed in this session at `sequence_num` under
    /// an envelope of type `msg_type`. Check the sequence number against the
    /// session's window only after this succeeds.
    ///
    /// Errors: `SESSION_EXPIRED` after the lifetime; `DECRYPTION_FAILED` if the
    /// ciphertext, sequence number or msg_type is not what the peer sealed.
    pub fn open(
        &self,
        now_ms: u64,
        msg_type: &MsgType,
        sequence_num: u64,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, Rejection> {
        self.check_alive(now_ms)?;
        let header = Header {
            session_id: self.id,
            sender: self.peer,
            recipient: self.local,
            msg_type,
        };
        self.opener.open(&header, sequence_num, ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_protocols() {
        let all = [
            (State::Initial, "INITIAL"),
            (State::HandshakeInitSent, "HANDSHAKE_INIT_SENT"),
            (State::HandshakeAckReceived, "HANDSHAKE_ACK_RECEIVED"),
            (State::ChallengeSent, "CHALLENGE_SENT"),
            (State::SessionEstablished, "SESSION_ESTABLISHED"),
            (State::SessionConfirmed, "SESSION_CONFIRMED"),
            (State::Ready, "READY"),
            (State::Error, "ERROR"),
            (State::Expired, "EXPIRED"),
        ];
        for (s, name) in all {
            assert_eq!(s.to_string(), name);
        }
    }

    #[test]
    fn defaults_are_the_protocol_parameters() {
        let c = Config::default();
        assert_eq!(c.handshake_timeout_ms, 60_000);
        assert_eq!(c.challenge_timeout_ms, 30_000);
        assert_eq!(c.session_lifetime_ms, 3_600_000);
    }
}
