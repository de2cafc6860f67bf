//! Entity identity: an Ed25519 key pair, and the entity id derived from it.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// An entity id: the SHA-256 of the entity's 32-byte Ed25519 public key.
/// Displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId(pub [u8; 32]);

impl EntityId {
    /// The id that belongs to `key`.
    pub fn of(key: &PublicKey) -> Self {
        Self(Sha256::digest(key.0).into())
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntityId({self})")
    }
}

/// Why a string is not an entity id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an entity id is 64 lowercase hex digits (SHA-256 of an Ed25519 public key), got {0:?}")]
pub struct ParseEntityIdError(pub String);

impl FromStr for EntityId {
    type Err = ParseEntityIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseEntityIdError(s.to_owned());
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

impl serde::Serialize for EntityId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EntityId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A raw 32-byte Ed25519 public key, as carried in envelopes. It is not checked to
/// be a valid curve point until a signature is verified against it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.0))
    }
}

/// An entity's signing identity. The secret is zeroised when dropped.
pub struct Identity {
    key: SigningKey,
    public: PublicKey,
    id: EntityId,
}

impl Identity {
    /// The identity whose Ed25519 secret key (seed) is `secret`.
    /// Pass 32 bytes from a cryptographic RNG to create a new identity.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let public = PublicKey(key.verifying_key().to_bytes());
        Self {
            id: EntityId::of(&public),
            key,
            public,
        }
    }

    /// The 32-byte secret seed, for persisting the identity.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The entity id, SHA-256 of the public key.
    pub fn entity_id(&self) -> EntityId {
        self.id
    }

    /// An Ed25519 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Checks an Ed25519 signature by the rules of ZIP-215 (cofactored equation,
/// canonical `S`), and refuses small-order keys. The rules single and batch
/// verification can share exactly (PROTOCOL.md section 3.3).
pub fn verify(key: &PublicKey, msg: &[u8], signature: &[u8; 64]) -> bool {
    !is_small_order(key)
        && ed25519_zebra::VerificationKey::try_from(key.0).is_ok_and(|k| {
            k.verify(&ed25519_zebra::Signature::from_bytes(signature), msg)
                .is_ok()
        })
}

/// Whether `key` is a point of small order (or no point at all): anyone can
/// sign for such a key under the cofactored equation.
fn is_small_order(key: &PublicKey) -> bool {
    VerifyingKey::from_bytes(&key.0).map_or(true, |k| k.is_weak())
}

/// One signature of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The signer's key.
    pub key: &'a PublicKey,
    /// What was signed.
    pub msg: &'a [u8],
    /// The signature.
    pub signature: &'a [u8; 64],
}

/// Checks `items` at once: one multiscalar multiplication for the batch (the
/// random coefficients from `rng`), and one check per item only if the batch
/// fails, to find which. Each answer is exactly [`verify`]'s.
pub fn verify_batch(items: &[Signed<'_>], rng: impl rand_core::CryptoRng) -> Vec<bool> {
    let single = |i: &Signed<'_>| verify(i.key, i.msg, i.signature);
    if items.len() < 2 {
        return items.iter().map(single).collect();
    }
    let mut keys: Vec<&PublicKey> = items.iter().map(|i| i.key).collect();
    keys.sort_unstable_by_key(|k| k.0);
    keys.dedup();
    if keys.iter().any(|k| is_small_order(k)) {
        return items.iter().map(single).collect();
    }
    let mut batch = ed25519_zebra::batch::Verifier::new();
    for i in items {
        let key = ed25519_zebra::VerificationKeyBytes::from(i.key.0);
        batch.queue((
            key,
            ed25519_zebra::Signature::from_bytes(i.signature),
            i.msg,
        ));
    }
    match batch.verify(rng) {
        Ok(()) => vec![true; items.len()],
        Err(_) => items.iter().map(single).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_id_is_sha256_of_public_key() {
        let id = Identity::from_secret(&[7; 32]);
        let expected: [u8; 32] = Sha256::digest(id.public_key().0).into();
        assert_eq!(id.entity_id().0, expected);
        assert_eq!(id.entity_id().to_string(), hex::encode(expected));
    }

    #[test]
    fn entity_id_parses_only_lowercase_hex_of_right_length() {
        let id = Identity::from_secret(&[1; 32]).entity_id();
        assert_eq!(id.to_string().parse::<EntityId>(), Ok(id));
        assert!(id.to_string().to_uppercase().parse::<EntityId>().is_err());
        assert!("abc".parse::<EntityId>().is_err());
        assert!("zz".repeat(32).parse::<EntityId>().is_err());
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let a = Identity::from_secret(&[1; 32]);
        let b = Identity::from_secret(&[2; 32]);
        let sig = a.sign(b"hello");
        assert!(verify(&a.public_key(), b"hello", &sig));
        assert!(!verify(&a.public_key(), b"hellO", &sig));
        assert!(!verify(&b.public_key(), b"hello", &sig));
    }

    /// A signature by the holder of scalar `a` whose `R` carries a point of
    /// order 8: the cofactored equation holds, the cofactorless one does not.
    fn torsioned(a: u64, r: u64, msg: &[u8]) -> (PublicKey, [u8; 64]) {
        use curve25519_dalek::constants::{ED25519_BASEPOINT_TABLE, EIGHT_TORSION};
        use curve25519_dalek::scalar::Scalar;
        use sha2::Sha512;
        let a = Scalar::from(a) * Scalar::from(0x9e37_79b9_7f4a_7c15_u64);
        let key = (&a * ED25519_BASEPOINT_TABLE).compress();
        let big_r = (&Scalar::from(r) * ED25519_BASEPOINT_TABLE + EIGHT_TORSION[1]).compress();
        let h = Sha512::new()
            .chain_update(big_r.as_bytes())
            .chain_update(key.as_bytes())
            .chain_update(msg)
            .finalize();
        let k = Scalar::from_bytes_mod_order_wide(&h.into());
        let s = Scalar::from(r) + k * a;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(big_r.as_bytes());
        sig[32..].copy_from_slice(s.as_bytes());
        (PublicKey(key.to_bytes()), sig)
    }

    #[test]
    fn a_torsioned_r_is_accepted_and_a_small_order_key_is_not() {
        let (key, sig) = torsioned(5, 9, b"m");
        let strict = VerifyingKey::from_bytes(&key.0).expect("key");
        let dalek_sig = ed25519_dalek::Signature::from_bytes(&sig);
        assert!(
            strict.verify_strict(b"m", &dalek_sig).is_err(),
            "cofactorless refuses"
        );
        assert!(verify(&key, b"m", &sig), "cofactored accepts");
        assert!(!verify(&key, b"n", &sig));
        // With a small-order key, S·B as R verifies for any message.
        use curve25519_dalek::constants::{ED25519_BASEPOINT_TABLE, EIGHT_TORSION};
        let weak = PublicKey(EIGHT_TORSION[1].compress().to_bytes());
        let s = curve25519_dalek::scalar::Scalar::from(77u64);
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice((&s * ED25519_BASEPOINT_TABLE).compress().as_bytes());
        forged[32..].copy_from_slice(s.as_bytes());
        let vk = ed25519_zebra::VerificationKey::try_from(weak.0).expect("a point");
        let zsig = ed25519_zebra::Signature::from_bytes(&forged);
        assert!(
            vk.verify(&zsig, b"anything").is_ok(),
            "ZIP-215 alone accepts it"
        );
        assert!(
            !verify(&weak, b"anything", &forged),
            "refused: small-order key"
        );
        let items = [
            Signed {
                key: &weak,
                msg: b"anything",
                signature: &forged,
            },
            Signed {
                key: &weak,
                msg: b"else",
                signature: &forged,
            },
        ];
        assert_eq!(verify_batch(&items, rand::rng()), vec![false, false]);
        // A batch holding a torsioned signature passes as a batch.
        let honest = Identity::from_secret(&[4; 32]);
        let honest_sig = honest.sign(b"h");
        let items = [
            Signed {
                key: &key,
                msg: b"m",
                signature: &sig,
            },
            Signed {
                key: &honest.public_key(),
                msg: b"h",
                signature: &honest_sig,
            },
        ];
        assert_eq!(verify_batch(&items, rand::rng()), vec![true, true]);
    }

    /// How one item of a batch is made.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Valid,
        FlippedSignature(u8),
        OtherMessage,
        OtherKey,
        Torsioned,
        HighS,
        NotAPoint,
    }

    fn kind() -> impl proptest::strategy::Strategy<Value = Kind> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(Kind::Valid),
            1 => any::<u8>().prop_map(Kind::FlippedSignature),
            1 => Just(Kind::OtherMessage),
            1 => Just(Kind::OtherKey),
            1 => Just(Kind::Torsioned),
            1 => Just(Kind::HighS),
            1 => Just(Kind::NotAPoint),
        ]
    }

    fn item(kind: Kind, signer: u8, n: usize) -> (PublicKey, Vec<u8>, [u8; 64]) {
        let id = Identity::from_secret(&[signer; 32]);
        let msg = format!("message {n}").into_bytes();
        let sig = id.sign(&msg);
        match kind {
            Kind::Valid => (id.public_key(), msg, sig),
            Kind::FlippedSignature(bit) => {
                let mut sig = sig;
                sig[usize::from(bit) % 64] ^= 1 << (bit % 8);
                (id.public_key(), msg, sig)
            }
            Kind::OtherMessage => (id.public_key(), b"another".to_vec(), sig),
            Kind::OtherKey => (Identity::from_secret(&[!signer; 32]).public_key(), msg, sig),
            Kind::Torsioned => {
                let (key, sig) = torsioned(u64::from(signer) + 1, n as u64 + 3, &msg);
                (key, msg, sig)
            }
            Kind::HighS => {
                // S + ℓ: the same point equation, a non-canonical scalar.
                let mut sig = sig;
                // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
                let l: [u8; 32] =
                    hex::decode("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010")
                        .expect("hex")
                        .try_into()
                        .expect("32 bytes");
                let mut carry = 0u16;
                for i in 0..32 {
                    let v = u16::from(sig[32 + i]) + u16::from(l[i]) + carry;
                    sig[32 + i] = v as u8;
                    carry = v >> 8;
                }
                (id.public_key(), msg, sig)
            }
            Kind::NotAPoint => {
                // y = 2 is not the y of any curve point.
                let mut key = [0u8; 32];
                key[0] = 2;
                (PublicKey(key), msg, sig)
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn batch_verification_answers_exactly_as_single_verification(
            kinds in proptest::collection::vec((kind(), 0u8..3), 0..12),
        ) {
            let made: Vec<_> = kinds
                .iter()
                .enumerate()
                .map(|(n, (k, signer))| item(*k, *signer, n))
                .collect();
            let items: Vec<Signed<'_>> = made
                .iter()
                .map(|(key, msg, signature)| Signed { key, msg, signature })
                .collect();
            let single: Vec<bool> = items.iter().map(|i| verify(i.key, i.msg, i.signature)).collect();
            proptest::prop_assert_eq!(verify_batch(&items, rand::rng()), single);
        }
    }

    #[test]
    fn secret_round_trips() {
        let a = Identity::from_secret(&[9; 32]);
        let b = Identity::from_secret(&a.secret_bytes());
        assert_eq!(a.entity_id(), b.entity_id());
    }
}
