//! The inbound pipeline: raw bytes from a peer to a verified envelope, or a
//! [`Rejection`] carrying the wire error code.

use crate::envelope::{Envelope, EnvelopeError, MessageId};
use crate::error::{ErrorCode, Rejection};
use crate::identity::{EntityId, Signed, verify_batch};
use crate::replay::{self, ReplayGuard};

/// Inbound checks' settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest encoded envelope accepted, in bytes (default 1 MiB).
    pub max_envelope_size: usize,
    /// Timestamp tolerance and nonce memory.
    pub replay: replay::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_envelope_size: 1024 * 1024,
            replay: replay::Config::default(),
        }
    }
}

/// A refused message: the rejection, and the message's id when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Code and reason.
    pub rejection: Rejection,
    /// The refused envelope's `message_id`, if the bytes got that far.
    pub message_id: Option<MessageId>,
}

impl Refusal {
    fn new(code: ErrorCode, reason: impl Into<String>, message_id: Option<MessageId>) -> Self {
        Self {
            rejection: Rejection::new(code, reason),
            message_id,
        }
    }
}

/// The stateless inbound checks, in this order (cheap first):
///
/// 1. size ≤ `max_envelope_size` — else `MESSAGE_TOO_LARGE`
/// 2. version is `1.2` — else `INVALID_VERSION`
/// 3. layout — else `MALFORMED_MESSAGE`; then, for an envelope that came
///    directly on a connection ([`Verifier::verify_from`]), `sender_id` is the
///    connection's peer — else `WRONG_SENDER`
/// 4. timestamp within the tolerance — else `REPLAY_DETECTED`
/// 5. `sender_id` = SHA-256(`sender_key`) — else `UNKNOWN_SENDER`
/// 6. signature — else `INVALID_SIGNATURE`
///
/// It holds no state, so it can run on any thread, in parallel; pass what it
/// returns to [`Acceptor::admit`].
#[derive(Debug, Clone, Copy)]
pub struct Verifier {
    max_envelope_size: usize,
    tolerance_ms: u64,
}

impl Verifier {
    /// The size limit, so transports can refuse oversize frames before reading them.
    pub fn max_envelope_size(&self) -> usize {
        self.max_envelope_size
    }

    /// The refusal for a frame of `len` bytes that was not read because it is too large.
    pub fn too_large(&self, len: u64) -> Refusal {
        Refusal::new(
            ErrorCode::MessageTooLarge,
            format!(
                "message is {len} bytes; this node accepts at most {} bytes",
                self.max_envelope_size
            ),
            None,
        )
    }

    /// Runs checks 1–6 on `bytes` at time `now_ms`.
    pub fn verify(&self, now_ms: u64, bytes: &[u8]) -> Result<Envelope, Refusal> {
        let env = self.decode(bytes)?;
        self.check(now_ms, env)
    }

    /// Runs checks 1–6 on `bytes` that arrived directly on a connection whose
    /// peer is `peer`, at time `now_ms`: between the layout and the timestamp,
    /// the envelope's `sender_id` must be `peer` (else `WRONG_SENDER`). Nobody
    /// can speak for another identity over its own connection, and the check
    /// costs no signature verification.
    pub fn verify_from(
        &self,
        now_ms: u64,
        peer: &EntityId,
        bytes: &[u8],
    ) -> Result<Envelope, Refusal> {
        let env = self.decode(bytes)?;
        self.check_sender(&env, peer)?;
        self.check(now_ms, env)
    }

    /// Checks 1–3: size, version and layout.
    fn decode(&self, bytes: &[u8]) -> Result<Envelope, Refusal> {
        if bytes.len() > self.max_envelope_size {
            return Err(self.too_large(bytes.len() as u64));
        }
        Envelope::decode(bytes).map_err(|e| match e {
            EnvelopeError::UnsupportedVersion(_) => {
                Refusal::new(ErrorCode::InvalidVersion, e.to_string(), None)
            }
            EnvelopeError::Malformed(_) => {
                Refusal::new(ErrorCode::MalformedMessage, e.to_string(), None)
            }
        })
    }

    /// Runs [`Verifier::verify_from`] on each of `frames` from `peer`, with
    /// their signatures checked as one batch (random coefficients from
    /// `rng`). The answers are exactly those `verify_from` gives one by one.
    pub fn verify_many_from(
        &self,
        now_ms: u64,
        peer: &EntityId,
        frames: &[&[u8]],
        rng: impl rand_core::CryptoRng,
    ) -> Vec<Result<Envelope, Refusal>> {
        let mut results: Vec<Result<Envelope, Refusal>> = frames
            .iter()
            .map(|bytes| {
                let env = self.decode(bytes)?;
                self.check_sender(&env, peer)?;
                self.check_unsigned(now_ms, env)
            })
            .collect();
        let signed: Vec<(usize, Vec<u8>)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|e| (i, e.signed_bytes())))
            .collect();
        let items: Vec<Signed<'_>> = signed
            .iter()
            .map(|(i, msg)| {
                let env = results[*i].as_ref().expect("only envelopes are signed");
                Signed {
                    key: &env.sender_key,
                    msg,
                    signature: &env.signature,
                }
            })
            .collect();
        let valid = verify_batch(&items, rng);
        for ((i, _), valid) in signed.iter().zip(valid) {
            if !valid {
                let id = results[*i].as_ref().ok().map(|e| e.message_id);
                results[*i] = Err(bad_signature(id));
            }
        }
        results
    }

    /// Check 3's last part: the envelope's sender is the connection's peer.
    fn check_sender(&self, env: &Envelope, peer: &EntityId) -> Result<(), Refusal> {
        if env.sender_id == *peer {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::WrongSender,
            format!(
                "sender_id {} is not the peer of this connection ({peer}); an envelope sent on behalf of another entity must be forwarded, not sent bare",
                env.sender_id
            ),
            Some(env.message_id),
        ))
    }

    /// Checks 4–6: timestamp, key binding, signature.
    fn check(&self, now_ms: u64, env: Envelope) -> Result<Envelope, Refusal> {
        let env = self.check_unsigned(now_ms, env)?;
        if !env.signature_is_valid() {
            return Err(bad_signature(Some(env.message_id)));
        }
        Ok(env)
    }

    /// Checks 4–5: timestamp, key binding.
    fn check_unsigned(&self, now_ms: u64, env: Envelope) -> Result<Envelope, Refusal> {
        let id = Some(env.message_id);
        replay::check_tolerance(self.tolerance_ms, now_ms, env.timestamp_ms).map_err(
            |rejection| Refusal {
                rejection,
                message_id: id,
            },
        )?;
        if !env.sender_is_bound() {
            return Err(Refusal::new(
                ErrorCode::UnknownSender,
                "sender_id is not the SHA-256 of sender_public_key",
                id,
            ));
        }
        Ok(env)
    }
}

/// Check 6's refusal.
fn bad_signature(id: Option<MessageId>) -> Refusal {
    Refusal::new(
        ErrorCode::InvalidSignature,
        "signature does not verify under sender_public_key",
        id,
    )
}

/// The stateful inbound checks, run on envelopes the [`Verifier`] passed:
///
/// 7. timestamp above the replay floor and `(sender_id, nonce)` not seen — else
///    `REPLAY_DETECTED`; then the nonce is recorded
/// 8. `recipient_id` absent or this node — else `WRONG_RECIPIENT`
///
/// Only authentic envelopes reach it, so nobody can spend another sender's nonces.
#[derive(Debug)]
pub struct Acceptor {
    local: EntityId,
    verifier: Verifier,
    replay: ReplayGuard,
}

impl Acceptor {
    /// An acceptor for the node whose entity id is `local`, with an empty nonce
    /// memory (see [`ReplayGuard::new`]).
    pub fn new(local: EntityId, config: Config) -> Self {
        Self::started_at(local, config, 0)
    }

    /// An acceptor whose nonce memory began at `started_ms`: envelopes stamped
    /// before then are refused (see [`ReplayGuard::started_at`]).
    pub fn started_at(local: EntityId, config: Config, started_ms: u64) -> Self {
        Self {
            local,
            verifier: Verifier {
                max_envelope_size: config.max_envelope_size,
                tolerance_ms: config.replay.tolerance_ms,
            },
            replay: ReplayGuard::started_at(config.replay, started_ms),
        }
    }

    /// The stateless half of the checks, to run elsewhere.
    pub fn verifier(&self) -> Verifier {
        self.verifier
    }

    /// Runs checks 7–8 on a verified envelope at time `now_ms`.
    pub fn admit(&mut self, now_ms: u64, env: Envelope) -> Result<Envelope, Refusal> {
        let id = Some(env.message_id);
        self.replay
            .record(now_ms, &env.sender_id, &env.nonce, env.timestamp_ms)
            .map_err(|rejection| Refusal {
                rejection,
                message_id: id,
            })?;
        if let Some(to) = env.recipient_id
            && to != self.local
        {
            return Err(Refusal::new(
                ErrorCode::WrongRecipient,
                format!("addressed to {to}, this node is {}", self.local),
                id,
            ));
        }
        Ok(env)
    }

    /// Runs every check (1–8) on `bytes` at time `now_ms`.
    pub fn accept(&mut self, now_ms: u64, bytes: &[u8]) -> Result<Envelope, Refusal> {
        let env = self.verifier.verify(now_ms, bytes)?;
        self.admit(now_ms, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Draft;
    use crate::identity::Identity;

    const NOW: u64 = 1_800_000_000_000;

    fn setup() -> (Identity, Identity, Acceptor) {
        let me = Identity::from_secret(&[1; 32]);
        let them = Identity::from_secret(&[2; 32]);
        let acc = Acceptor::new(me.entity_id(), Config::default());
        (me, them, acc)
    }

    fn draft(to: Option<EntityId>, ts: u64, nonce: u8) -> Draft {
        Draft {
            msg_type: "message".parse().expect("valid"),
            message_id: crate::MessageId::from_random([nonce; 16]),
            recipient_id: to,
            session_id: None,
            sequence_num: 0,
            timestamp_ms: ts,
            nonce: [nonce; 16],
            payload: b"{}".to_vec(),
        }
    }

    fn code(r: Result<Envelope, Refusal>) -> ErrorCode {
        r.expect_err("rejected").rejection.code
    }

    #[test]
    fn a_batch_gets_the_answers_of_one_by_one_checks() {
        let (me, them, acc) = setup();
        let v = acc.verifier();
        let to = Some(me.entity_id());
        let good = |n| draft(to, NOW, n).sign(&them).encode();
        let mut tampered = good(3);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let frames: Vec<Vec<u8>> = vec![
            good(1),
            good(2),
            tampered,
            draft(to, NOW - 3_600_000, 4).sign(&them).encode(),
            draft(to, NOW, 5).sign(&me).encode(),
            b"garbage".to_vec(),
            good(6),
        ];
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let peer = them.entity_id();
        let batch = v.verify_many_from(NOW, &peer, &refs, rand::rng());
        let one_by_one: Vec<_> = refs.iter().map(|f| v.verify_from(NOW, &peer, f)).collect();
        assert_eq!(batch, one_by_one);
        let codes: Vec<Option<ErrorCode>> = batch
            .iter()
            .map(|r| r.as_ref().err().map(|e| e.rejection.code))
            .collect();
        assert_eq!(
            codes,
            [
                None,
                None,
                Some(ErrorCode::InvalidSignature),
                Some(ErrorCode::ReplayDetected),
                Some(ErrorCode::WrongSender),
                Some(ErrorCode::MalformedMessage),
                None,
            ]
        );
    }

    #[test]
    fn each_defect_gets_its_code() {
        let (me, them, mut acc) = setup();
        let to = Some(me.entity_id());
        let good = draft(to, NOW, 1).sign(&them);
        assert!(acc.accept(NOW, &good.encode()).is_ok());
        // replayed
        assert_eq!(
            code(acc.accept(NOW, &good.encode())),
            ErrorCode::ReplayDetected
        );
        // tampered payload
        let mut t = draft(to, NOW, 2).sign(&them);
        t.payload = b"{\"x\":1}".to_vec();
        assert_eq!(
            code(acc.accept(NOW, &t.encode())),
            ErrorCode::InvalidSignature
        );
        // sender id not bound to key
        let mut u = draft(to, NOW, 3).sign(&them);
        u.sender_id = me.entity_id();
        assert_eq!(code(acc.accept(NOW, &u.encode())), ErrorCode::UnknownSender);
        // stale and future
        let old = draft(to, NOW - 61_000, 4).sign(&them);
        assert_eq!(
            code(acc.accept(NOW, &old.encode())),
            ErrorCode::ReplayDetected
        );
        let future = draft(to, NOW + 61_000, 5).sign(&them);
        assert_eq!(
            code(acc.accept(NOW, &future.encode())),
            ErrorCode::ReplayDetected
        );
        // wrong version
        let mut v = draft(to, NOW, 6).sign(&them);
        v.version = "9.9".into();
        assert_eq!(
            code(acc.accept(NOW, &v.encode())),
            ErrorCode::InvalidVersion
        );
        // malformed and oversize
        assert_eq!(
            code(acc.accept(NOW, b"\x031.2\x04ping\x00")),
            ErrorCode::MalformedMessage
        );
        let big = vec![0u8; acc.verifier().max_envelope_size() + 1];
        assert_eq!(code(acc.accept(NOW, &big)), ErrorCode::MessageTooLarge);
        // addressed elsewhere
        let w = draft(Some(them.entity_id()), NOW, 7).sign(&them);
        assert_eq!(
            code(acc.accept(NOW, &w.encode())),
            ErrorCode::WrongRecipient
        );
        // none of that stops a good message
        assert!(
            acc.accept(NOW, &draft(to, NOW, 8).sign(&them).encode())
                .is_ok()
        );
    }

    #[test]
    fn an_envelope_from_another_identity_than_the_connections_is_wrong_sender() {
        let (me, them, acc) = setup();
        let good = draft(Some(me.entity_id()), NOW, 1).sign(&them).encode();
        let v = acc.verifier();
        assert!(v.verify_from(NOW, &them.entity_id(), &good).is_ok());
        let stranger = Identity::from_secret(&[9; 32]).entity_id();
        let refused = v
            .verify_from(NOW, &stranger, &good)
            .expect_err("not its peer");
        assert_eq!(refused.rejection.code, ErrorCode::WrongSender);
        assert!(refused.message_id.is_some());
        // Checked before the signature: a forged signature still says WRONG_SENDER.
        let mut forged = draft(Some(me.entity_id()), NOW, 2).sign(&them);
        forged.signature = [0; 64];
        let refused = v
            .verify_from(NOW, &stranger, &forged.encode())
            .expect_err("not its peer");
        assert_eq!(refused.rejection.code, ErrorCode::WrongSender);
    }

    #[test]
    fn a_forged_envelope_does_not_burn_the_real_senders_nonce() {
        let (me, them, mut acc) = setup();
        let real = draft(Some(me.entity_id()), NOW, 9).sign(&them);
        let mut forged = real.clone();
        forged.payload = b"{\"evil\":true}".to_vec();
        assert_eq!(
            code(acc.accept(NOW, &forged.encode())),
            ErrorCode::InvalidSignature
        );
        assert!(acc.accept(NOW, &real.encode()).is_ok());
    }
}
