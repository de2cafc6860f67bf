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

/// Checks an Ed25519 signature strictly (no small-order keys, canonical `S`), so
/// a message has exactly one valid signature per key.
pub fn verify(key: &PublicKey, msg: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&key.0) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(msg, &sig).is_ok()
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

    #[test]
    fn secret_round_trips() {
        let a = Identity::from_secret(&[9; 32]);
        let b = Identity::from_secret(&a.secret_bytes());
        assert_eq!(a.entity_id(), b.entity_id());
    }
}
