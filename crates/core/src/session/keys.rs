//! The session key schedule: transcript hash, X25519 agreement, HKDF key
//! derivation, the confirmation MACs, and payload sealing with AES-256-GCM.
//!
//! Every byte string here is specified in `docs/PROTOCOL.md` (secure sessions);
//! `crates/core/tests/session_vector.rs` pins the values for fixed inputs.
//!
//! ```text
//! th        = SHA-256(TRANSCRIPT_DOMAIN ‖ initiator id ‖ responder id
//!                     ‖ initiator ephemeral ‖ responder ephemeral ‖ handshake_id ‖ challenge)
//! shared    = X25519(own ephemeral secret, peer ephemeral public)      (all-zero: refused)
//! okm       = HKDF-SHA256(ikm = shared, salt = th, info = SESSION_KEY_INFO, L = 64)
//!             okm[0..32] initiator→responder key, okm[32..64] responder→initiator key
//! confirm   = HKDF-SHA256(ikm = shared, salt = th, info = CONFIRM_KEY_INFO, L = 64)
//!             [0..32] initiator confirm key, [32..64] responder confirm key
//! nonce     = 00000000 ‖ sequence_num (u64)
//! aad       = SEAL_DOMAIN ‖ session_id ‖ sequence_num ‖ sender ‖ recipient ‖ u8 len ‖ msg_type
//! ```

use std::fmt;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hkdf::hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::Role;
use crate::codec::Writer;
use crate::envelope::SessionId;
use crate::error::{ErrorCode, Rejection};
use crate::identity::EntityId;
use crate::msg_type::MsgType;

/// Domain-separation prefix of the transcript hash.
pub const TRANSCRIPT_DOMAIN: &[u8] = b"peer-protocol/1.2/handshake\0";
/// Domain-separation prefix of the bytes the initiator signs in `challenge_response`.
pub const CHALLENGE_DOMAIN: &[u8] = b"peer-protocol/1.2/challenge\0";
/// Domain-separation prefix of the AEAD associated data.
pub const SEAL_DOMAIN: &[u8] = b"peer-protocol/1.2/seal\0";
/// HKDF `info` of the two payload keys (the v1.1 label).
pub const SESSION_KEY_INFO: &[u8] = b"peer-v1.1-session-key";
/// HKDF `info` of the two confirmation keys.
pub const CONFIRM_KEY_INFO: &[u8] = b"peer-v1.2-confirm";
/// Label of the responder's MAC in `session_established`.
pub const ESTABLISHED_LABEL: &[u8] = b"session_established";
/// Label of the initiator's MAC in `session_confirm`.
pub const CONFIRM_LABEL: &[u8] = b"session_confirm";
/// Length of the AES-GCM tag appended to every sealed payload.
pub const TAG_LEN: usize = 16;

/// A random 16-byte handshake id, chosen by the initiator. Shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandshakeId(pub [u8; 16]);

impl fmt::Display for HandshakeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for HandshakeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandshakeId({self})")
    }
}

/// The inputs of the transcript hash, in initiator-then-responder order so that
/// both sides hash the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    /// The initiator's entity id.
    pub initiator: EntityId,
    /// The responder's entity id.
    pub responder: EntityId,
    /// The initiator's X25519 ephemeral public key, as carried in `handshake_init`.
    pub initiator_ephemeral: [u8; 32],
    /// The responder's X25519 ephemeral public key, as carried in `handshake_init_ack`.
    pub responder_ephemeral: [u8; 32],
    /// The handshake id.
    pub handshake_id: HandshakeId,
    /// The responder's challenge.
    pub challenge: [u8; 32],
}

impl Transcript {
    /// `SHA-256(TRANSCRIPT_DOMAIN ‖ initiator ‖ responder ‖ initiator_ephemeral ‖
    /// responder_ephemeral ‖ handshake_id ‖ challenge)`.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(TRANSCRIPT_DOMAIN)
            .chain_update(self.initiator.0)
            .chain_update(self.responder.0)
            .chain_update(self.initiator_ephemeral)
            .chain_update(self.responder_ephemeral)
            .chain_update(self.handshake_id.0)
            .chain_update(self.challenge)
            .finalize()
            .into()
    }
}

/// The bytes the initiator signs with its Ed25519 identity key in
/// `challenge_response`: `CHALLENGE_DOMAIN ‖ transcript_hash ‖ challenge`.
pub fn challenge_signed_bytes(transcript_hash: &[u8; 32], challenge: &[u8; 32]) -> Vec<u8> {
    let mut w = Writer::with_capacity(CHALLENGE_DOMAIN.len() + 64);
    w.raw(CHALLENGE_DOMAIN).raw(transcript_hash).raw(challenge);
    w.into_vec()
}

/// The X25519 public key of the ephemeral secret `secret`.
pub fn ephemeral_public(secret: &[u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(*secret);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

/// The X25519 shared secret of `secret` and `peer_public`.
///
/// Errors with `CHALLENGE_INVALID` when the result is all zeros, which happens
/// exactly when the peer sent a low-order point: such a key contributes nothing,
/// and a man in the middle could use it to force a known secret.
pub fn shared_secret(
    secret: &[u8; 32],
    peer_public: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, Rejection> {
    let secret = x25519_dalek::StaticSecret::from(*secret);
    agree(&secret, peer_public)
}

/// X25519 with an already-built secret (the state machine's path).
pub(crate) fn agree(
    secret: &x25519_dalek::StaticSecret,
    peer_public: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, Rejection> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(Rejection::new(
            ErrorCode::ChallengeInvalid,
            "the peer's ephemeral key is a low-order point (all-zero shared secret)",
        ));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// The four keys of one session, derived from the shared secret and the
/// transcript hash. Zeroised on drop; `Debug` shows no key bytes.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    initiator_to_responder: [u8; 32],
    responder_to_initiator: [u8; 32],
    initiator_confirm: [u8; 32],
    responder_confirm: [u8; 32],
}

impl Keys {
    /// Derives the payload keys (info [`SESSION_KEY_INFO`]) and the confirmation
    /// keys (info [`CONFIRM_KEY_INFO`]), each as 64 bytes of HKDF-SHA256 output
    /// with `ikm = shared` and `salt = transcript_hash`.
    ///
    /// Errors with `CHALLENGE_INVALID` for an all-zero `shared`.
    pub fn derive(shared: &[u8; 32], transcript_hash: &[u8; 32]) -> Result<Self, Rejection> {
        if shared.iter().all(|&b| b == 0) {
            return Err(Rejection::new(
                ErrorCode::ChallengeInvalid,
                "all-zero shared secret",
            ));
        }
        let hk = hkdf::Hkdf::<Sha256>::new(Some(transcript_hash), shared);
        let mut okm = Zeroizing::new([0u8; 64]);
        let mut keys = Keys {
            initiator_to_responder: [0; 32],
            responder_to_initiator: [0; 32],
            initiator_confirm: [0; 32],
            responder_confirm: [0; 32],
        };
        let too_long = |_| Rejection::new(ErrorCode::InvalidState, "HKDF output length");
        hk.expand(SESSION_KEY_INFO, &mut okm[..])
            .map_err(too_long)?;
        keys.initiator_to_responder.copy_from_slice(&okm[..32]);
        keys.responder_to_initiator.copy_from_slice(&okm[32..]);
        hk.expand(CONFIRM_KEY_INFO, &mut okm[..])
            .map_err(too_long)?;
        keys.initiator_confirm.copy_from_slice(&okm[..32]);
        keys.responder_confirm.copy_from_slice(&okm[32..]);
        Ok(keys)
    }

    /// The AES-256-GCM key of payloads the initiator sends.
    pub fn initiator_to_responder(&self) -> &[u8; 32] {
        &self.initiator_to_responder
    }

    /// The AES-256-GCM key of payloads the responder sends.
    pub fn responder_to_initiator(&self) -> &[u8; 32] {
        &self.responder_to_initiator
    }

    /// The HMAC key of the initiator's `session_confirm`.
    pub fn initiator_confirm(&self) -> &[u8; 32] {
        &self.initiator_confirm
    }

    /// The HMAC key of the responder's `session_established`.
    pub fn responder_confirm(&self) -> &[u8; 32] {
        &self.responder_confirm
    }

    /// The confirmation MAC that `by` sends: the responder's is
    /// `HMAC-SHA256(responder confirm key, "session_established" ‖ th ‖ session_id)`,
    /// the initiator's `HMAC-SHA256(initiator confirm key, "session_confirm" ‖ th ‖ session_id)`.
    pub fn confirm_tag(
        &self,
        by: Role,
        transcript_hash: &[u8; 32],
        session_id: &SessionId,
    ) -> [u8; 32] {
        confirm_mac(self.confirm_key(by), by, transcript_hash, session_id)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the confirmation MAC `by` must send (constant time).
    pub fn verify_confirm(
        &self,
        by: Role,
        transcript_hash: &[u8; 32],
        session_id: &SessionId,
        tag: &[u8; 32],
    ) -> bool {
        confirm_mac(self.confirm_key(by), by, transcript_hash, session_id)
            .verify_slice(tag)
            .is_ok()
    }

    fn confirm_key(&self, by: Role) -> &[u8; 32] {
        match by {
            Role::Initiator => &self.initiator_confirm,
            Role::Responder => &self.responder_confirm,
        }
    }

    /// The sealer for payloads `role` sends and the opener for payloads it receives.
    pub(crate) fn channel(&self, role: Role) -> (Sealer, Opener) {
        let (send, recv) = match role {
            Role::Initiator => (self.initiator_to_responder, self.responder_to_initiator),
            Role::Responder => (self.responder_to_initiator, self.initiator_to_responder),
        };
        (Sealer::new(send), Opener::new(recv))
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// HMAC-SHA256 keyed with a 32-byte key.
fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC pads a key shorter than the hash's 64-byte block with zeros (RFC 2104
    // §2), so the padded key gives the same MAC and `KeyInit::new` cannot fail.
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(key);
    <Hmac<Sha256> as KeyInit>::new((&*block).into())
}

fn confirm_mac(
    key: &[u8; 32],
    by: Role,
    transcript_hash: &[u8; 32],
    session_id: &SessionId,
) -> Hmac<Sha256> {
    let label = match by {
        Role::Initiator => CONFIRM_LABEL,
        Role::Responder => ESTABLISHED_LABEL,
    };
    hmac(key)
        .chain_update(label)
        .chain_update(transcript_hash)
        .chain_update(session_id.0)
}

/// The envelope header fields a sealed payload is bound to (besides its
/// sequence number). For a payload A sends to B: `sender` = A, `recipient` = B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The envelope's `session_id`.
    pub session_id: SessionId,
    /// The envelope's `sender_id`.
    pub sender: EntityId,
    /// The envelope's `recipient_id` (present on every sealed envelope).
    pub recipient: EntityId,
    /// The envelope's `msg_type`.
    pub msg_type: &'a MsgType,
}

impl Header<'_> {
    /// The AEAD associated data: `SEAL_DOMAIN ‖ session_id ‖ sequence_num (u64) ‖
    /// sender ‖ recipient ‖ u8 len ‖ msg_type`.
    pub fn associated_data(&self, sequence_num: u64) -> Vec<u8> {
        let name = self.msg_type.as_str().as_bytes();
        let mut w = Writer::with_capacity(SEAL_DOMAIN.len() + 16 + 8 + 64 + 1 + name.len());
        w.raw(SEAL_DOMAIN)
            .raw(&self.session_id.0)
            .u64(sequence_num)
            .raw(&self.sender.0)
            .raw(&self.recipient.0)
            .short_bytes(name);
        w.into_vec()
    }
}

/// The 12-byte AES-GCM nonce of `sequence_num`: four zero bytes, then the
/// number as a big-endian u64.
pub fn nonce(sequence_num: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&sequence_num.to_be_bytes());
    n
}

/// A payload key with its AES-256-GCM instance built per call, so that the
/// expanded key schedule never outlives the call.
#[derive(Zeroize, ZeroizeOnDrop)]
struct PayloadKey([u8; 32]);

impl PayloadKey {
    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

/// Seals the payloads one side sends in a session. Sequence numbers start at 1
/// and increase by one per sealed payload; the counter never goes back, so no
/// nonce is ever used twice under the key. After sequence number `u64::MAX` the
/// sealer refuses (`SESSION_EXPIRED`: a new handshake is needed).
pub struct Sealer {
    key: PayloadKey,
    next: Option<u64>,
}

impl Sealer {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self::starting_at(key, 1)
    }

    pub(crate) fn starting_at(key: [u8; 32], first: u64) -> Self {
        Self {
            key: PayloadKey(key),
            next: Some(first),
        }
    }

    /// The sequence number the next [`Sealer::seal`] will use; `None` once exhausted.
    pub fn next_sequence(&self) -> Option<u64> {
        self.next
    }

    /// Encrypts `plaintext` under the next sequence number, bound to `header`.
    /// Returns the sequence number (put it in the envelope's `sequence_num`) and
    /// the ciphertext with its 16-byte tag appended (the envelope's payload).
    ///
    /// Errors: `SESSION_EXPIRED` once every sequence number has been used;
    /// `MESSAGE_TOO_LARGE` for a plaintext longer than AES-GCM allows (64 GiB).
    pub fn seal(
        &mut self,
        header: &Header<'_>,
        plaintext: &[u8],
    ) -> Result<(u64, Vec<u8>), Rejection> {
        let Some(seq) = self.next else {
            return Err(Rejection::new(
                ErrorCode::SessionExpired,
                "every sequence number of this session has been used; start a new handshake",
            ));
        };
        // Advance first: a sequence number is spent even if sealing fails.
        self.next = seq.checked_add(1);
        let aad = header.associated_data(seq);
        let ciphertext = self
            .key
            .cipher()
            .encrypt(
                &nonce(seq).into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| Rejection::new(ErrorCode::MessageTooLarge, "payload too long to seal"))?;
        Ok((seq, ciphertext))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Opens the payloads one side receives in a session. It checks authenticity
/// only; whether a sequence number was already received is the sequence
/// window's job (`seq_window`), which the caller runs after a successful open.
pub struct Opener {
    key: PayloadKey,
}

impl Opener {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self {
            key: PayloadKey(key),
        }
    }

    /// Decrypts `ciphertext` (payload with its tag) sealed at `sequence_num`
    /// under `header`.
    ///
    /// Errors with `DECRYPTION_FAILED` if anything differs from what was sealed:
    /// a ciphertext or tag bit, the sequence number, or any header field (or if
    /// the ciphertext is shorter than a tag, or `sequence_num` is 0, which no
    /// sealer uses).
    pub fn open(
        &self,
        header: &Header<'_>,
        sequence_num: u64,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, Rejection> {
        let failed = || Rejection::new(ErrorCode::DecryptionFailed, "sealed payload did not open");
        if sequence_num == 0 || ciphertext.len() < TAG_LEN {
            return Err(failed());
        }
        let aad = header.associated_data(sequence_num);
        self.key
            .cipher()
            .decrypt(
                &nonce(sequence_num).into(),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| failed())
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::derive(&[9; 32], &[8; 32]).expect("non-zero")
    }

    fn msg_type(s: &str) -> MsgType {
        s.parse().expect("valid")
    }

    #[test]
    fn hmac_of_padded_key_is_hmac_of_key() {
        let key = [0x0b; 32];
        let a = hmac(&key).chain_update(b"Hi There").finalize().into_bytes();
        let b = <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
            .expect("any length")
            .chain_update(b"Hi There")
            .finalize()
            .into_bytes();
        assert_eq!(a, b);
    }

    #[test]
    fn all_zero_and_low_order_shared_secrets_are_refused() {
        let e = Keys::derive(&[0; 32], &[1; 32]).expect_err("zero");
        assert_eq!(e.code, ErrorCode::ChallengeInvalid);
        // The identity point (u = 0) and u = 1 are of low order.
        for bad in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            let e = shared_secret(&[0x33; 32], &bad).expect_err("low order");
            assert_eq!(e.code, ErrorCode::ChallengeInvalid);
        }
    }

    #[test]
    fn both_sides_agree_on_the_shared_secret() {
        let (a, b) = ([0x33; 32], [0x44; 32]);
        let ab = shared_secret(&a, &ephemeral_public(&b)).expect("ok");
        let ba = shared_secret(&b, &ephemeral_public(&a)).expect("ok");
        assert_eq!(*ab, *ba);
    }

    #[test]
    fn the_four_keys_differ_and_depend_on_the_transcript() {
        let k = keys();
        let all = [
            k.initiator_to_responder(),
            k.responder_to_initiator(),
            k.initiator_confirm(),
            k.responder_confirm(),
        ];
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(all[i], all[j]);
            }
        }
        let other = Keys::derive(&[9; 32], &[7; 32]).expect("ok");
        assert_ne!(k.initiator_to_responder(), other.initiator_to_responder());
        assert_eq!(format!("{k:?}"), "Keys(..)");
    }

    #[test]
    fn confirm_tags_are_per_side() {
        let k = keys();
        let sid = SessionId([1; 16]);
        let th = [2; 32];
        let i = k.confirm_tag(Role::Initiator, &th, &sid);
        let r = k.confirm_tag(Role::Responder, &th, &sid);
        assert_ne!(i, r);
        assert!(k.verify_confirm(Role::Initiator, &th, &sid, &i));
        assert!(!k.verify_confirm(Role::Responder, &th, &sid, &i));
        assert!(!k.verify_confirm(Role::Initiator, &[3; 32], &sid, &i));
        assert!(!k.verify_confirm(Role::Initiator, &th, &SessionId([4; 16]), &i));
    }

    #[test]
    fn sealer_refuses_after_the_last_sequence_number() {
        let mt = msg_type("message");
        let h = Header {
            session_id: SessionId([1; 16]),
            sender: EntityId([2; 32]),
            recipient: EntityId([3; 32]),
            msg_type: &mt,
        };
        let mut s = Sealer::starting_at([5; 32], u64::MAX - 1);
        let o = Opener::new([5; 32]);
        let (a, ca) = s.seal(&h, b"x").expect("MAX-1");
        let (b, cb) = s.seal(&h, b"y").expect("MAX");
        assert_eq!((a, b), (u64::MAX - 1, u64::MAX));
        assert_eq!(s.next_sequence(), None);
        let e = s.seal(&h, b"z").expect_err("exhausted");
        assert_eq!(e.code, ErrorCode::SessionExpired);
        assert_eq!(
            s.seal(&h, b"z").expect_err("still").code,
            ErrorCode::SessionExpired
        );
        assert_eq!(o.open(&h, a, &ca).expect("opens"), b"x");
        assert_eq!(o.open(&h, b, &cb).expect("opens"), b"y");
    }

    #[test]
    fn short_ciphertexts_and_sequence_zero_fail() {
        let mt = msg_type("message");
        let h = Header {
            session_id: SessionId([1; 16]),
            sender: EntityId([2; 32]),
            recipient: EntityId([3; 32]),
            msg_type: &mt,
        };
        let o = Opener::new([5; 32]);
        for len in 0..TAG_LEN {
            assert_eq!(
                o.open(&h, 1, &vec![0; len]).expect_err("short").code,
                ErrorCode::DecryptionFailed
            );
        }
        let mut s = Sealer::starting_at([5; 32], 0);
        let (seq, c) = s.seal(&h, b"").expect("seals");
        assert_eq!(seq, 0);
        assert_eq!(
            o.open(&h, 0, &c).expect_err("0").code,
            ErrorCode::DecryptionFailed
        );
    }

    /// Every way of changing one input of `open` by one bit or one value.
    #[derive(Debug, Clone)]
    enum Tamper {
        Ciphertext(usize, u8),
        SessionId(usize, u8),
        Sequence(u8),
        Sender(usize, u8),
        Recipient(usize, u8),
        MsgType,
        Key(usize, u8),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(i, b)| Tamper::Ciphertext(i, b)),
            (0usize..16, 0u8..8).prop_map(|(i, b)| Tamper::SessionId(i, b)),
            (0u8..64).prop_map(Tamper::Sequence),
            (0usize..32, 0u8..8).prop_map(|(i, b)| Tamper::Sender(i, b)),
            (0usize..32, 0u8..8).prop_map(|(i, b)| Tamper::Recipient(i, b)),
            Just(Tamper::MsgType),
            (0usize..32, 0u8..8).prop_map(|(i, b)| Tamper::Key(i, b)),
        ]
    }

    proptest! {
        #[test]
        fn any_change_to_ciphertext_tag_or_aad_fails_to_open(
            key in any::<[u8; 32]>(),
            sid in any::<[u8; 16]>(),
            sender in any::<[u8; 32]>(),
            recipient in any::<[u8; 32]>(),
            name in "[a-z0-9_.]{1,64}",
            plaintext in proptest::collection::vec(any::<u8>(), 0..200),
            skip in 0u64..5,
            t in tamper(),
        ) {
            let mt = msg_type(&name);
            let h = Header {
                session_id: SessionId(sid),
                sender: EntityId(sender),
                recipient: EntityId(recipient),
                msg_type: &mt,
            };
            let mut sealer = Sealer::new(key);
            for _ in 0..skip {
                sealer.seal(&h, b"earlier").expect("seals");
            }
            let (seq, mut c) = sealer.seal(&h, &plaintext).expect("seals");
            prop_assert_eq!(seq, skip + 1);
            prop_assert_eq!(c.len(), plaintext.len() + TAG_LEN);
            prop_assert_eq!(&Opener::new(key).open(&h, seq, &c).expect("opens"), &plaintext);

            let mut h2 = h;
            let mut seq2 = seq;
            let mut key2 = key;
            let other = msg_type(if name == "other" { "other2" } else { "other" });
            match t {
                Tamper::Ciphertext(i, b) => { let n = c.len(); c[i % n] ^= 1 << b; }
                Tamper::SessionId(i, b) => h2.session_id.0[i] ^= 1 << b,
                Tamper::Sequence(b) => seq2 ^= 1 << b,
                Tamper::Sender(i, b) => h2.sender.0[i] ^= 1 << b,
                Tamper::Recipient(i, b) => h2.recipient.0[i] ^= 1 << b,
                Tamper::MsgType => h2.msg_type = &other,
                Tamper::Key(i, b) => key2[i] ^= 1 << b,
            }
            let e = Opener::new(key2).open(&h2, seq2, &c).expect_err("tampered");
            prop_assert_eq!(e.code, ErrorCode::DecryptionFailed);
        }

        #[test]
        fn sealing_n_payloads_uses_n_distinct_increasing_sequence_numbers(n in 1usize..300) {
            let mt = msg_type("message");
            let h = Header {
                session_id: SessionId([1; 16]),
                sender: EntityId([2; 32]),
                recipient: EntityId([3; 32]),
                msg_type: &mt,
            };
            let mut s = Sealer::new([7; 32]);
            let mut seen = std::collections::HashSet::new();
            let mut last = 0;
            for _ in 0..n {
                let (seq, _) = s.seal(&h, b"same plaintext").expect("seals");
                prop_assert!(seq > last);
                prop_assert!(seen.insert(nonce(seq)));
                last = seq;
            }
            prop_assert_eq!(seen.len(), n);
            prop_assert_eq!(last, n as u64);
        }
    }
}
