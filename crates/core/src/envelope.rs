//! The v1.2 envelope, its canonical binary encoding and its signature.
//!
//! Layout (all integers big-endian; see `docs/PROTOCOL.md`):
//!
//! ```text
//! version        u8 length + ASCII      ("1.2")
//! msg_type       u8 length + ASCII      (a-z 0-9 _ ., 1..=64)
//! message_id     16 bytes               (UUID)
//! sender_id      32 bytes               (SHA-256 of sender_public_key)
//! sender_key     32 bytes               (Ed25519 public key)
//! recipient_id   u8 flag + 32 bytes     (flag 0: absent, 1: present)
//! session_id     u8 flag + 16 bytes
//! sequence_num   u64
//! timestamp      u64                    (ms since the Unix epoch)
//! nonce          16 bytes
//! payload        u32 length + bytes
//! signature      64 bytes               (Ed25519)
//! ```
//!
//! Every envelope has exactly one encoding, so the signature is taken over
//! [`DOMAIN`] followed by the encoding of every field but the signature.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{self, EntityId, Identity, PublicKey};
use crate::msg_type::MsgType;

/// Domain-separation prefix of the signed bytes, so an envelope signature can never
/// be mistaken for a signature of any other structure.
pub const DOMAIN: &[u8] = b"peer-protocol/1.2/envelope\0";

/// Domain-separation prefix of a `chunk` envelope's signed bytes, which carry
/// the SHA-256 of the payload in place of the payload (PROTOCOL.md section 9.9):
/// the signature then hashes a chunk once with SHA-256 instead of twice
/// (signing) or once (verifying) with SHA-512.
pub const CHUNK_DOMAIN: &[u8] = b"peer-protocol/1.2/chunk-envelope\0";

/// Longest version string, in bytes.
pub const MAX_VERSION_LEN: usize = 16;

/// Bytes an envelope takes beyond its payload, its names and its optional ids.
pub const FIXED_OVERHEAD: usize = 1 + 1 + 16 + 32 + 32 + 1 + 1 + 8 + 8 + 16 + 4 + 64;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A random (version 4) UUID made from 16 caller-supplied random bytes.
            pub fn from_random(bytes: [u8; 16]) -> Self {
                Self(*uuid::Builder::from_random_bytes(bytes).as_uuid().as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

uuid_id!(
    /// A message id: a UUID v4, unique per message, shown hyphenated.
    MessageId
);
uuid_id!(
    /// A session id: a UUID v4.
    SessionId
);

/// A 128-bit random nonce; with the sender id it identifies a message for replay checks.
pub type Nonce = [u8; 16];

/// A signed v1.2 envelope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    /// Protocol version; `"1.2"` for every envelope this node signs.
    pub version: String,
    /// What the payload is.
    pub msg_type: MsgType,
    /// Unique id of this message.
    pub message_id: MessageId,
    /// SHA-256 of `sender_key`.
    pub sender_id: EntityId,
    /// The sender's Ed25519 public key.
    pub sender_key: PublicKey,
    /// The entity the message is for; absent for messages to whoever receives them.
    pub recipient_id: Option<EntityId>,
    /// The session the message belongs to, if any.
    pub session_id: Option<SessionId>,
    /// Position in the session's stream; 0 outside a session.
    pub sequence_num: u64,
    /// When the sender signed it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Fresh random bytes per message.
    pub nonce: Nonce,
    /// The message body; JSON text for application messages.
    pub payload: Vec<u8>,
    /// Ed25519 signature of [`DOMAIN`] followed by every other field's encoding.
    pub signature: [u8; 64],
}

/// Everything a sender chooses for an envelope; [`Draft::sign`] adds who and the signature.
#[derive(Clone, Debug)]
pub struct Draft {
    /// What the payload is.
    pub msg_type: MsgType,
    /// Unique id, from fresh randomness ([`MessageId::from_random`]).
    pub message_id: MessageId,
    /// The recipient, if the message is for one entity.
    pub recipient_id: Option<EntityId>,
    /// Session, if any.
    pub session_id: Option<SessionId>,
    /// Sequence number in the session; 0 outside a session.
    pub sequence_num: u64,
    /// The sender's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// 16 fresh random bytes.
    pub nonce: Nonce,
    /// The body.
    pub payload: Vec<u8>,
}

impl Draft {
    /// Signs the draft as `identity`, producing a complete envelope.
    pub fn sign(self, identity: &Identity) -> Envelope {
        let mut env = Envelope {
            version: crate::PROTOCOL_VERSION.to_owned(),
            msg_type: self.msg_type,
            message_id: self.message_id,
            sender_id: identity.entity_id(),
            sender_key: identity.public_key(),
            recipient_id: self.recipient_id,
            session_id: self.session_id,
            sequence_num: self.sequence_num,
            timestamp_ms: self.timestamp_ms,
            nonce: self.nonce,
            payload: self.payload,
            signature: [0; 64],
        };
        env.signature = identity.sign(&env.signed_bytes());
        env
    }
}

/// Why bytes are not an envelope this node can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The version field names a version whose layout this node does not know.
    #[error("unsupported protocol version {0:?} (this node speaks 1.2)")]
    UnsupportedVersion(String),
    /// The bytes do not follow the v1.2 layout.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] DecodeError),
}

impl Envelope {
    /// The draft this envelope was signed from (to sign it again, such as
    /// with a fresh nonce).
    pub fn into_draft(self) -> Draft {
        Draft {
            msg_type: self.msg_type,
            message_id: self.message_id,
            recipient_id: self.recipient_id,
            session_id: self.session_id,
            sequence_num: self.sequence_num,
            timestamp_ms: self.timestamp_ms,
            nonce: self.nonce,
            payload: self.payload,
        }
    }

    /// Length of [`Envelope::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        FIXED_OVERHEAD
            + self.version.len()
            + self.msg_type.as_str().len()
            + self.recipient_id.map_or(0, |_| 32)
            + self.session_id.map_or(0, |_| 16)
            + self.payload.len()
    }

    fn write_body(&self, w: &mut Writer) {
        self.write_fields(w, &self.payload);
    }

    /// Every field but the signature, with `payload` as the payload's bytes.
    fn write_fields(&self, w: &mut Writer, payload: &[u8]) {
        w.short_bytes(self.version.as_bytes())
            .short_bytes(self.msg_type.as_str().as_bytes())
            .raw(&self.message_id.0)
            .raw(&self.sender_id.0)
            .raw(&self.sender_key.0)
            .optional(self.recipient_id.as_ref().map(|r| &r.0[..]))
            .optional(self.session_id.as_ref().map(|s| &s.0[..]))
            .u64(self.sequence_num)
            .u64(self.timestamp_ms)
            .raw(&self.nonce)
            .long_bytes(payload);
    }

    /// The bytes the signature covers: [`DOMAIN`], then every field but the
    /// signature; for a `chunk` envelope, [`CHUNK_DOMAIN`], then every field
    /// but the signature with the payload's SHA-256 as its payload.
    pub fn signed_bytes(&self) -> Vec<u8> {
        if self.msg_type.as_str() == crate::chunk::MSG_CHUNK {
            let digest: [u8; 32] = Sha256::digest(&self.payload).into();
            let len = CHUNK_DOMAIN.len() + self.encoded_len() - self.payload.len() + 32;
            let mut w = Writer::with_capacity(len);
            w.raw(CHUNK_DOMAIN);
            self.write_fields(&mut w, &digest);
            return w.into_vec();
        }
        let mut w = Writer::with_capacity(DOMAIN.len() + self.encoded_len());
        w.raw(DOMAIN);
        self.write_body(&mut w);
        w.into_vec()
    }

    /// The canonical wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        self.write_body(&mut w);
        w.raw(&self.signature);
        w.into_vec()
    }

    /// Decodes an envelope. Only the layout is checked here; [`Envelope::verify`]
    /// checks the signature and the sender binding.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader::new(bytes);
        let version = r.short_bytes("version")?;
        if version.is_empty()
            || version.len() > MAX_VERSION_LEN
            || !version.iter().all(|b| b.is_ascii_graphic())
        {
            return Err(DecodeError::Invalid {
                field: "version",
                why: "1 to 16 printable ASCII characters",
            }
            .into());
        }
        if version != crate::PROTOCOL_VERSION.as_bytes() {
            let v = String::from_utf8_lossy(version).into_owned();
            return Err(EnvelopeError::UnsupportedVersion(v));
        }
        let msg_type = std::str::from_utf8(r.short_bytes("msg_type")?)
            .ok()
            .and_then(|s| s.parse::<MsgType>().ok())
            .ok_or(DecodeError::Invalid {
                field: "msg_type",
                why: "1 to 64 characters of a-z, 0-9, '_' and '.'",
            })?;
        let env = Envelope {
            version: crate::PROTOCOL_VERSION.to_owned(),
            msg_type,
            message_id: MessageId(r.array("message_id")?),
            sender_id: EntityId(r.array("sender_id")?),
            sender_key: PublicKey(r.array("sender_key")?),
            recipient_id: r
                .flag("recipient_id")?
                .then(|| r.array("recipient_id").map(EntityId))
                .transpose()?,
            session_id: r
                .flag("session_id")?
                .then(|| r.array("session_id").map(SessionId))
                .transpose()?,
            sequence_num: r.u64("sequence_num")?,
            timestamp_ms: r.u64("timestamp")?,
            nonce: r.array("nonce")?,
            payload: r.long_bytes("payload")?.to_vec(),
            signature: r.array("signature")?,
        };
        r.finish()?;
        Ok(env)
    }

    /// Whether `sender_id` is the SHA-256 of `sender_key`.
    pub fn sender_is_bound(&self) -> bool {
        EntityId::of(&self.sender_key) == self.sender_id
    }

    /// Whether the signature verifies under `sender_key` (strict Ed25519).
    pub fn signature_is_valid(&self) -> bool {
        identity::verify(&self.sender_key, &self.signed_bytes(), &self.signature)
    }

    /// Whether the envelope is authentic: its version is 1.2, its sender id is bound
    /// to its key and its signature verifies.
    pub fn verify(&self) -> bool {
        self.version == crate::PROTOCOL_VERSION
            && self.sender_is_bound()
            && self.signature_is_valid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity(seed: u8) -> Identity {
        Identity::from_secret(&[seed; 32])
    }

    #[test]
    fn an_envelope_signed_again_from_its_draft_is_the_same_and_a_fresh_nonce_changes_it() {
        let id = identity(6);
        let env = Draft {
            msg_type: "message".parse().expect("type"),
            message_id: MessageId::from_random([3; 16]),
            recipient_id: None,
            session_id: Some(SessionId([4; 16])),
            sequence_num: 9,
            timestamp_ms: 11,
            nonce: [5; 16],
            payload: b"sealed".to_vec(),
        }
        .sign(&id);
        assert_eq!(env.clone().into_draft().sign(&id), env);
        let again = Draft {
            nonce: [6; 16],
            ..env.clone().into_draft()
        }
        .sign(&id);
        assert!(again.verify());
        assert_eq!((again.session_id, again.sequence_num), (env.session_id, 9));
        assert_ne!(again.signature, env.signature);
    }

    #[test]
    fn a_chunk_envelope_signs_the_digest_of_its_payload() {
        let id = identity(5);
        let draft = Draft {
            msg_type: crate::chunk::MSG_CHUNK.parse().expect("type"),
            message_id: MessageId::from_random([1; 16]),
            recipient_id: None,
            session_id: None,
            sequence_num: 0,
            timestamp_ms: 7,
            nonce: [2; 16],
            payload: vec![0xab; 4096],
        };
        let env = draft.clone().sign(&id);
        assert!(env.verify());
        // The signed bytes: the chunk domain, the fields, and in place of the
        // payload its length 32 and its SHA-256.
        let signed = env.signed_bytes();
        assert!(signed.starts_with(CHUNK_DOMAIN));
        let digest: [u8; 32] = Sha256::digest(&env.payload).into();
        let mut tail = 32u32.to_be_bytes().to_vec();
        tail.extend_from_slice(&digest);
        assert!(signed.ends_with(&tail));
        assert_eq!(
            signed.len(),
            CHUNK_DOMAIN.len() + env.encoded_len() - 4096 - 64 + 32
        );
        // A signature over the whole payload (the rule of other types) does not verify.
        let mut pure = env.clone();
        let mut w = Writer::with_capacity(DOMAIN.len() + env.encoded_len());
        w.raw(DOMAIN);
        env.write_body(&mut w);
        pure.signature = id.sign(&w.into_vec());
        assert!(!pure.verify());
        // Another payload breaks it, as for any envelope.
        let mut other = env.clone();
        other.payload[0] ^= 1;
        assert!(!other.verify());
        // Other types sign their whole payload.
        let message = Draft {
            msg_type: "message".parse().expect("type"),
            ..draft
        }
        .sign(&id);
        assert!(message.signed_bytes().starts_with(DOMAIN));
        assert!(message.signed_bytes().ends_with(&message.payload));
    }

    prop_compose! {
        fn arb_draft()(
            msg_type in "[a-z0-9_.]{1,64}",
            message_id in any::<[u8; 16]>(),
            recipient in proptest::option::of(any::<[u8; 32]>()),
            session in proptest::option::of(any::<[u8; 16]>()),
            sequence_num in any::<u64>(),
            timestamp_ms in any::<u64>(),
            nonce in any::<[u8; 16]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) -> Draft {
            Draft {
                msg_type: msg_type.parse().expect("regex matches MsgType"),
                message_id: MessageId(message_id),
                recipient_id: recipient.map(EntityId),
                session_id: session.map(SessionId),
                sequence_num,
                timestamp_ms,
                nonce,
                payload,
            }
        }
    }

    /// Every way of changing exactly one field of an envelope.
    fn mutate(env: &mut Envelope, field: usize, bit: u8) {
        let flip = |b: &mut [u8]| {
            if b.is_empty() {
                return false;
            }
            let i = usize::from(bit) % b.len();
            b[i] ^= 1 << (bit % 8);
            true
        };
        match field {
            0 => env.version = "1.3".into(),
            1 => {
                let t = if env.msg_type == *"ping" {
                    "pong"
                } else {
                    "ping"
                };
                env.msg_type = t.parse().expect("valid");
            }
            2 => _ = flip(&mut env.message_id.0),
            3 => _ = flip(&mut env.sender_id.0),
            4 => _ = flip(&mut env.sender_key.0),
            5 => match &mut env.recipient_id {
                Some(r) => _ = flip(&mut r.0),
                None => env.recipient_id = Some(EntityId([bit; 32])),
            },
            6 => match &mut env.session_id {
                Some(s) => _ = flip(&mut s.0),
                None => env.session_id = Some(SessionId([bit; 16])),
            },
            7 => env.sequence_num ^= 1 << (bit % 64),
            8 => env.timestamp_ms ^= 1 << (bit % 64),
            9 => _ = flip(&mut env.nonce),
            10 => {
                if !flip(&mut env.payload) {
                    env.payload.push(bit);
                }
            }
            _ => _ = flip(&mut env.signature),
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(draft in arb_draft()) {
            let env = draft.sign(&identity(1));
            let bytes = env.encode();
            prop_assert_eq!(bytes.len(), env.encoded_len());
            let back = Envelope::decode(&bytes).expect("decodes");
            prop_assert_eq!(&back, &env);
            prop_assert!(back.verify());
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn changing_any_one_field_breaks_verification(
            draft in arb_draft(), field in 0usize..12, bit in any::<u8>()
        ) {
            let mut env = draft.sign(&identity(2));
            prop_assert!(env.verify());
            let before = env.clone();
            mutate(&mut env, field, bit);
            prop_assert_ne!(&env, &before);
            prop_assert!(!env.verify());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Envelope::decode(&bytes);
        }

        #[test]
        fn decodable_bytes_have_one_encoding(draft in arb_draft(), cut in any::<u16>(), extra in any::<u8>()) {
            let bytes = draft.sign(&identity(3)).encode();
            let cut = usize::from(cut) % bytes.len();
            prop_assert!(Envelope::decode(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(Envelope::decode(&longer).is_err());
        }
    }

    #[test]
    fn other_versions_are_reported_as_such() {
        let mut env = Draft {
            msg_type: "ping".parse().expect("valid"),
            message_id: MessageId([0; 16]),
            recipient_id: None,
            session_id: None,
            sequence_num: 0,
            timestamp_ms: 0,
            nonce: [0; 16],
            payload: vec![],
        }
        .sign(&identity(4));
        env.version = "1.0".into();
        assert_eq!(
            Envelope::decode(&env.encode()),
            Err(EnvelopeError::UnsupportedVersion("1.0".into()))
        );
    }

    #[test]
    fn presence_flags_other_than_0_or_1_are_malformed() {
        let env = Draft {
            msg_type: "ping".parse().expect("valid"),
            message_id: MessageId([0; 16]),
            recipient_id: None,
            session_id: None,
            sequence_num: 0,
            timestamp_ms: 0,
            nonce: [0; 16],
            payload: vec![],
        }
        .sign(&identity(5));
        let mut bytes = env.encode();
        let flag_at = 1 + 3 + 1 + 4 + 16 + 32 + 32;
        bytes[flag_at] = 2;
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn message_ids_are_uuid_v4() {
        let id = MessageId::from_random([0xff; 16]);
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }
}
