//! The payloads of the six handshake messages: fixed-layout binary, canonical
//! (every message has exactly one encoding; decoders reject trailing bytes).
//!
//! ```text
//! handshake_init       handshake_id 16 ‖ initiator ephemeral 32                 (48 bytes)
//! handshake_init_ack   handshake_id 16 ‖ responder ephemeral 32 ‖ challenge 32  (80 bytes)
//! challenge_response   handshake_id 16 ‖ Ed25519 signature 64                    (80 bytes)
//! session_established  handshake_id 16 ‖ session_id 16 ‖ confirm 32              (64 bytes)
//! session_confirm      session_id 16 ‖ confirm 32                                (48 bytes)
//! ready                session_id 16                                             (16 bytes)
//! ```
//!
//! Each is the payload of an ordinary signed envelope whose `msg_type` is the
//! message's name, so the sender of every handshake message is authenticated by
//! the envelope signature.

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{Envelope, SessionId};
use crate::error::{ErrorCode, Rejection};

use super::keys::HandshakeId;

/// Step 1, initiator → responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeInit {
    /// Fresh random id of this handshake attempt.
    pub handshake_id: HandshakeId,
    /// The initiator's X25519 ephemeral public key.
    pub ephemeral: [u8; 32],
}

/// Step 2, responder → initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeInitAck {
    /// The id from `handshake_init`.
    pub handshake_id: HandshakeId,
    /// The responder's X25519 ephemeral public key.
    pub ephemeral: [u8; 32],
    /// 32 fresh random bytes the initiator must sign.
    pub challenge: [u8; 32],
}

/// Step 3, initiator → responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeResponse {
    /// The handshake's id.
    pub handshake_id: HandshakeId,
    /// Ed25519 signature by the initiator's identity key of
    /// `CHALLENGE_DOMAIN ‖ transcript_hash ‖ challenge`.
    pub signature: [u8; 64],
}

/// Step 4, responder → initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEstablished {
    /// The handshake's id.
    pub handshake_id: HandshakeId,
    /// The new session's id, a UUID v4 chosen by the responder.
    pub session_id: SessionId,
    /// HMAC-SHA256(responder confirm key, `"session_established" ‖ th ‖ session_id`).
    pub confirm: [u8; 32],
}

/// Step 5, initiator → responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfirm {
    /// The session's id.
    pub session_id: SessionId,
    /// HMAC-SHA256(initiator confirm key, `"session_confirm" ‖ th ‖ session_id`).
    pub confirm: [u8; 32],
}

/// Step 6, responder → initiator: end-to-end encryption is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The session's id.
    pub session_id: SessionId,
}

/// One handshake message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// `handshake_init`
    Init(HandshakeInit),
    /// `handshake_init_ack`
    InitAck(HandshakeInitAck),
    /// `challenge_response`
    ChallengeResponse(ChallengeResponse),
    /// `session_established`
    Established(SessionEstablished),
    /// `session_confirm`
    Confirm(SessionConfirm),
    /// `ready`
    Ready(Ready),
}

impl Message {
    /// The six handshake msg_types, in protocol order.
    pub const MSG_TYPES: [&'static str; 6] = [
        "handshake_init",
        "handshake_init_ack",
        "challenge_response",
        "session_established",
        "session_confirm",
        "ready",
    ];

    /// The envelope `msg_type` that carries this message.
    pub fn msg_type(&self) -> &'static str {
        let i = match self {
            Self::Init(_) => 0,
            Self::InitAck(_) => 1,
            Self::ChallengeResponse(_) => 2,
            Self::Established(_) => 3,
            Self::Confirm(_) => 4,
            Self::Ready(_) => 5,
        };
        Self::MSG_TYPES[i]
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(80);
        match self {
            Self::Init(m) => w.raw(&m.handshake_id.0).raw(&m.ephemeral),
            Self::InitAck(m) => w.raw(&m.handshake_id.0).raw(&m.ephemeral).raw(&m.challenge),
            Self::ChallengeResponse(m) => w.raw(&m.handshake_id.0).raw(&m.signature),
            Self::Established(m) => w
                .raw(&m.handshake_id.0)
                .raw(&m.session_id.0)
                .raw(&m.confirm),
            Self::Confirm(m) => w.raw(&m.session_id.0).raw(&m.confirm),
            Self::Ready(m) => w.raw(&m.session_id.0),
        };
        w.into_vec()
    }

    /// Decodes the payload of a `msg_type` envelope. `Ok(None)` if `msg_type` is
    /// not a handshake message; an error if the payload is not exactly that
    /// message's layout.
    pub fn decode(msg_type: &str, payload: &[u8]) -> Result<Option<Self>, DecodeError> {
        let mut r = Reader::new(payload);
        let msg = match msg_type {
            "handshake_init" => Self::Init(HandshakeInit {
                handshake_id: HandshakeId(r.array("handshake_id")?),
                ephemeral: r.array("ephemeral")?,
            }),
            "handshake_init_ack" => Self::InitAck(HandshakeInitAck {
                handshake_id: HandshakeId(r.array("handshake_id")?),
                ephemeral: r.array("ephemeral")?,
                challenge: r.array("challenge")?,
            }),
            "challenge_response" => Self::ChallengeResponse(ChallengeResponse {
                handshake_id: HandshakeId(r.array("handshake_id")?),
                signature: r.array("signature")?,
            }),
            "session_established" => Self::Established(SessionEstablished {
                handshake_id: HandshakeId(r.array("handshake_id")?),
                session_id: SessionId(r.array("session_id")?),
                confirm: r.array("confirm")?,
            }),
            "session_confirm" => Self::Confirm(SessionConfirm {
                session_id: SessionId(r.array("session_id")?),
                confirm: r.array("confirm")?,
            }),
            "ready" => Self::Ready(Ready {
                session_id: SessionId(r.array("session_id")?),
            }),
            _ => return Ok(None),
        };
        r.finish()?;
        Ok(Some(msg))
    }

    /// The handshake message an envelope carries, for the node's dispatcher:
    /// `UNSUPPORTED_MSG_TYPE` if its msg_type is not a handshake message,
    /// `MALFORMED_MESSAGE` if the payload does not decode. The envelope must
    /// already have been verified (`inbound::Acceptor`).
    pub fn from_envelope(env: &Envelope) -> Result<Self, Rejection> {
        match Self::decode(env.msg_type.as_str(), &env.payload) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Rejection::new(
                ErrorCode::UnsupportedMsgType,
                format!("{} is not a handshake message", env.msg_type),
            )),
            Err(e) => Err(Rejection::new(
                ErrorCode::MalformedMessage,
                format!("{} payload: {e}", env.msg_type),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let hid = any::<[u8; 16]>().prop_map(HandshakeId);
        let sid = any::<[u8; 16]>().prop_map(SessionId);
        prop_oneof![
            (hid.clone(), any::<[u8; 32]>()).prop_map(|(handshake_id, ephemeral)| Message::Init(
                HandshakeInit {
                    handshake_id,
                    ephemeral
                }
            )),
            (hid.clone(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
                |(handshake_id, ephemeral, challenge)| Message::InitAck(HandshakeInitAck {
                    handshake_id,
                    ephemeral,
                    challenge
                })
            ),
            (hid.clone(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(handshake_id, a, b)| {
                let mut signature = [0; 64];
                signature[..32].copy_from_slice(&a);
                signature[32..].copy_from_slice(&b);
                Message::ChallengeResponse(ChallengeResponse {
                    handshake_id,
                    signature,
                })
            }),
            (hid, sid.clone(), any::<[u8; 32]>()).prop_map(
                |(handshake_id, session_id, confirm)| Message::Established(SessionEstablished {
                    handshake_id,
                    session_id,
                    confirm
                })
            ),
            (sid.clone(), any::<[u8; 32]>()).prop_map(|(session_id, confirm)| Message::Confirm(
                SessionConfirm {
                    session_id,
                    confirm
                }
            )),
            sid.prop_map(|session_id| Message::Ready(Ready { session_id })),
        ]
    }

    #[test]
    fn payload_lengths_are_as_specified() {
        let hid = HandshakeId([1; 16]);
        let sid = SessionId([2; 16]);
        let cases = [
            (
                Message::Init(HandshakeInit {
                    handshake_id: hid,
                    ephemeral: [3; 32],
                }),
                48,
            ),
            (
                Message::InitAck(HandshakeInitAck {
                    handshake_id: hid,
                    ephemeral: [3; 32],
                    challenge: [4; 32],
                }),
                80,
            ),
            (
                Message::ChallengeResponse(ChallengeResponse {
                    handshake_id: hid,
                    signature: [5; 64],
                }),
                80,
            ),
            (
                Message::Established(SessionEstablished {
                    handshake_id: hid,
                    session_id: sid,
                    confirm: [6; 32],
                }),
                64,
            ),
            (
                Message::Confirm(SessionConfirm {
                    session_id: sid,
                    confirm: [7; 32],
                }),
                48,
            ),
            (Message::Ready(Ready { session_id: sid }), 16),
        ];
        for (m, len) in cases {
            assert_eq!(m.encode().len(), len, "{}", m.msg_type());
            assert!(Message::MSG_TYPES.contains(&m.msg_type()));
            assert!(m.msg_type().parse::<crate::MsgType>().is_ok());
        }
        assert!(!Message::MSG_TYPES.contains(&"message"));
        assert_eq!(Message::decode("message", b"{}"), Ok(None));
    }

    #[test]
    fn from_envelope_maps_errors_to_codes() {
        let id = crate::Identity::from_secret(&[1; 32]);
        let draft = |t: &str, payload: Vec<u8>| crate::Draft {
            msg_type: t.parse().expect("valid"),
            message_id: crate::MessageId([0; 16]),
            recipient_id: None,
            session_id: None,
            sequence_num: 0,
            timestamp_ms: 0,
            nonce: [0; 16],
            payload,
        };
        let ready = Message::Ready(Ready {
            session_id: SessionId([9; 16]),
        });
        let env = draft("ready", ready.encode()).sign(&id);
        assert_eq!(Message::from_envelope(&env), Ok(ready));
        let env = draft("ready", vec![0; 17]).sign(&id);
        assert_eq!(
            Message::from_envelope(&env).expect_err("long").code,
            ErrorCode::MalformedMessage
        );
        let env = draft("message", vec![]).sign(&id);
        assert_eq!(
            Message::from_envelope(&env)
                .expect_err("not handshake")
                .code,
            ErrorCode::UnsupportedMsgType
        );
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(m in arb_message()) {
            let bytes = m.encode();
            prop_assert_eq!(Message::decode(m.msg_type(), &bytes), Ok(Some(m)));
        }

        #[test]
        fn truncated_or_extended_payloads_are_rejected(
            m in arb_message(), cut in any::<prop::sample::Index>(), extra in any::<u8>()
        ) {
            let bytes = m.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(Message::decode(m.msg_type(), &bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(Message::decode(m.msg_type(), &longer).is_err());
        }

        #[test]
        fn decode_never_panics_and_decodable_bytes_are_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..100)
        ) {
            for t in Message::MSG_TYPES {
                if let Ok(Some(m)) = Message::decode(t, &bytes) {
                    prop_assert_eq!(m.msg_type(), t);
                    prop_assert_eq!(m.encode(), bytes.clone());
                }
            }
        }
    }
}
