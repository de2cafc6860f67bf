//! The DHT registry's records (PROTOCOL.md section 15): the signed peer
//! record, the keys it is stored under, and the checks every record passes
//! before a node stores, returns, forwards or believes it. Pure: the time is
//! passed in.
//!
//! On the wire a record is the JSON object `{"record": {...}, "signature":
//! "<hex>"}`. The signature is Ed25519, by the entity's key, over [`DOMAIN`]
//! followed by the exact bytes of the `record` object as they stand in the
//! value (from its `{` to its `}`), so no canonical form is needed.
//!
//! One record is stored under several keys: the entity's own key
//! ([`peer_key`]) and one capability-index key per capability it lists
//! ([`capability_key`]). "Who offers capability X" is a provider lookup under
//! [`provider_key`]; each provider's peer record is then fetched and checked.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, Rejection};
use crate::identity::{EntityId, Identity, PublicKey, verify};

/// What precedes the record's bytes in the signed message.
pub const DOMAIN: &[u8] = b"peer-protocol/1.2/peer-record\0";

/// The domain of the X25519 key derived from the entity's secret.
const X25519_DOMAIN: &[u8] = b"peer-protocol/1.2/x25519\0";

/// How far in the future `issued_at` may be (clock skew), ms.
pub const MAX_SKEW_MS: u64 = 60_000;

/// Most addresses in a record.
pub const MAX_ADDRESSES: usize = 16;
/// Most capabilities in a record.
pub const MAX_CAPABILITIES: usize = 64;
/// Most protocol versions in a record.
pub const MAX_VERSIONS: usize = 8;
/// Longest address, capability name or version, in bytes.
pub const MAX_FIELD: usize = 256;

/// What a peer record says about its entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRecord {
    /// The entity: SHA-256 of `public_key`.
    pub entity_id: EntityId,
    /// Its Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Its X25519 public key, 64 hex digits, for sealing to it while it is away.
    pub x25519_key: String,
    /// Multiaddresses it listens on, ending in its `/p2p/` id or not.
    pub addresses: Vec<String>,
    /// The names of its capabilities (its card's skill ids).
    pub capabilities: Vec<String>,
    /// The protocol versions it speaks.
    pub versions: Vec<String>,
    /// When it was signed, ms since the Unix epoch.
    pub issued_at: u64,
    /// Seconds it stays valid after `issued_at`.
    pub ttl: u64,
    /// Higher replaces lower; the same number is the same record.
    pub seq: u64,
}

impl PeerRecord {
    /// Ms since the Unix epoch at which it expires.
    pub fn expires_at(&self) -> u64 {
        self.issued_at.saturating_add(self.ttl.saturating_mul(1000))
    }

    /// Its Ed25519 key, if `public_key` is 64 hex digits.
    pub fn key(&self) -> Option<PublicKey> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(&self.public_key, &mut k).ok()?;
        Some(PublicKey(k))
    }

    /// Whether it lists capability `name`.
    pub fn offers(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

#[derive(Serialize)]
struct WireOut<'a> {
    record: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    signature: String,
}

/// A record whose signature and fields were checked, with the exact value it
/// came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// What it says.
    pub record: PeerRecord,
    /// The value as stored and sent.
    pub value: Vec<u8>,
}

/// The limits a record is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, in bytes.
    pub max_bytes: usize,
    /// Longest `ttl`, in seconds (tExpire).
    pub max_ttl: u64,
}

/// Why a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Larger than the limit.
    #[error("record of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a record (JSON shape, field bounds).
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The public key does not hash to the entity id.
    #[error("the public key does not hash to the entity id")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// Signed later than now plus the allowed skew.
    #[error("issued in the future")]
    Future,
    /// Its ttl has run out, or is longer than allowed.
    #[error("expired (or a ttl over the limit)")]
    Expired,
    /// Its sequence number is lower than the stored record's (or equal with
    /// other content).
    #[error("stale: sequence {got} does not replace {held}")]
    Stale {
        /// The record's sequence number.
        got: u64,
        /// The one held.
        held: u64,
    },
    /// Stored under a key that belongs neither to its entity nor to one of
    /// its capabilities.
    #[error("the key does not belong to this record")]
    WrongKey,
}

impl RecordError {
    /// As a wire refusal (`DHT_ERROR`).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(ErrorCode::DhtError, self.to_string())
    }
}

/// The X25519 public key of `identity`: its secret is SHA-256 of a domain and
/// the Ed25519 secret, so it needs no storage of its own.
pub fn x25519_public(identity: &Identity) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(X25519_DOMAIN);
    h.update(identity.secret_bytes());
    let secret: [u8; 32] = h.finalize().into();
    let secret = x25519_dalek::StaticSecret::from(secret);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

/// What a node puts in its own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Listen addresses.
    pub addresses: Vec<String>,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// When it is signed, ms since the Unix epoch.
    pub issued_at: u64,
    /// Seconds valid.
    pub ttl: u64,
    /// Sequence number.
    pub seq: u64,
}

/// Signs `content` as `identity`'s record.
///
/// # Panics
/// Never: the record always serialises.
pub fn sign(identity: &Identity, content: Content) -> Signed {
    let record = PeerRecord {
        entity_id: identity.entity_id(),
        public_key: hex::encode(identity.public_key().0),
        x25519_key: hex::encode(x25519_public(identity)),
        addresses: content.addresses,
        capabilities: content.capabilities,
        versions: vec![crate::PROTOCOL_VERSION.to_owned()],
        issued_at: content.issued_at,
        ttl: content.ttl,
        seq: content.seq,
    };
    let bytes = serde_json::to_string(&record).expect("a record serialises");
    let signature = identity.sign(&signed_message(bytes.as_bytes()));
    let raw = RawValue::from_string(bytes).expect("serde_json wrote valid JSON");
    let value = serde_json::to_vec(&WireOut {
        record: &raw,
        signature: hex::encode(signature),
    })
    .expect("a record serialises");
    Signed { record, value }
}

fn signed_message(record: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + record.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(record);
    m
}

/// Checks `value` as a record at `now_ms`: size, shape, key, signature and
/// time. Cheap checks come first; the signature is checked last.
pub fn verify_value(value: &[u8], now_ms: u64, limits: Limits) -> Result<Signed, RecordError> {
    if value.len() > limits.max_bytes {
        return Err(RecordError::TooLarge {
            size: value.len(),
            limit: limits.max_bytes,
        });
    }
    let wire: WireIn<'_> =
        serde_json::from_slice(value).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let record: PeerRecord = serde_json::from_str(wire.record.get())
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    check_fields(&record)?;
    let key = record
        .key()
        .ok_or_else(|| RecordError::Malformed("public_key is not 64 hex digits".into()))?;
    if EntityId::of(&key) != record.entity_id {
        return Err(RecordError::KeyMismatch);
    }
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&wire.signature, &mut signature)
        .map_err(|_| RecordError::Malformed("signature is not 128 hex digits".into()))?;
    if record.issued_at > now_ms.saturating_add(MAX_SKEW_MS) {
        return Err(RecordError::Future);
    }
    if record.ttl > limits.max_ttl || record.expires_at() <= now_ms {
        return Err(RecordError::Expired);
    }
    if !verify(
        &key,
        &signed_message(wire.record.get().as_bytes()),
        &signature,
    ) {
        return Err(RecordError::BadSignature);
    }
    Ok(Signed {
        record,
        value: value.to_vec(),
    })
}

fn check_fields(r: &PeerRecord) -> Result<(), RecordError> {
    let bounded = |what: &str, items: &[String], max: usize| {
        if items.len() > max {
            return Err(RecordError::Malformed(format!("more than {max} {what}")));
        }
        if items.iter().any(|s| s.is_empty() || s.len() > MAX_FIELD) {
            return Err(RecordError::Malformed(format!(
                "{what} must be 1 to {MAX_FIELD} bytes each"
            )));
        }
        Ok(())
    };
    bounded("addresses", &r.addresses, MAX_ADDRESSES)?;
    bounded("capabilities", &r.capabilities, MAX_CAPABILITIES)?;
    bounded("versions", &r.versions, MAX_VERSIONS)?;
    if r.x25519_key.len() != 64 || hex::decode(&r.x25519_key).is_err() {
        return Err(RecordError::Malformed(
            "x25519_key is not 64 hex digits".into(),
        ));
    }
    Ok(())
}

/// Checks that `record` may be stored under DHT key `key`: its entity's key,
/// or the capability-index key of one of its capabilities.
pub fn check_key(key: &[u8], record: &PeerRecord) -> Result<(), RecordError> {
    if key == peer_key(&record.entity_id) {
        return Ok(());
    }
    if record
        .capabilities
        .iter()
        .any(|c| key == capability_key(&record.entity_id, c))
    {
        return Ok(());
    }
    Err(RecordError::WrongKey)
}

/// Checks that `new` may replace `held` (same entity): a higher sequence, or
/// the same sequence and the same bytes (a republish).
pub fn check_replaces(new: &Signed, held: &Signed) -> Result<(), RecordError> {
    let (got, was) = (new.record.seq, held.record.seq);
    if got > was || (got == was && new.value == held.value) {
        Ok(())
    } else {
        Err(RecordError::Stale { got, held: was })
    }
}

/// The DHT key of an entity's peer record: the entity id's 32 bytes.
pub fn peer_key(entity: &EntityId) -> Vec<u8> {
    entity.0.to_vec()
}

/// Hex SHA-256 of a capability name.
pub fn capability_hash(name: &str) -> String {
    hex::encode(Sha256::digest(name.as_bytes()))
}

/// The capability-index key: SHA-256(entity_id ‖ ":" ‖ capability_hash),
/// the entity id in hex.
pub fn capability_key(entity: &EntityId, name: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(entity.to_string().as_bytes());
    h.update(b":");
    h.update(capability_hash(name).as_bytes());
    h.finalize().to_vec()
}

/// The provider key of a capability: SHA-256 of
/// `peer-protocol/1.2/provides:` ‖ capability_hash.
pub fn provider_key(name: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"peer-protocol/1.2/provides:");
    h.update(capability_hash(name).as_bytes());
    h.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const LIMITS: Limits = Limits {
        max_bytes: 4096,
        max_ttl: 86_400,
    };

    fn identity(n: u8) -> Identity {
        Identity::from_secret(&[n; 32])
    }

    fn content(seq: u64) -> Content {
        Content {
            addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            capabilities: vec!["code".into(), "review".into()],
            issued_at: NOW,
            ttl: 3600,
            seq,
        }
    }

    /// Re-signs `value`'s record bytes after `edit` changes the JSON.
    fn tampered(value: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(value).expect("json");
        edit(&mut v);
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn a_signed_record_verifies_and_says_what_was_signed() {
        let me = identity(1);
        let s = sign(&me, content(1));
        let v = verify_value(&s.value, NOW, LIMITS).expect("valid");
        assert_eq!(v.record, s.record);
        assert_eq!(v.record.entity_id, me.entity_id());
        assert_eq!(v.record.versions, vec!["1.2".to_owned()]);
        assert_eq!(v.record.x25519_key, hex::encode(x25519_public(&me)));
    }

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let s = sign(&identity(1), content(1));
        let bad = tampered(&s.value, |v| v["record"]["seq"] = 9.into());
        assert_eq!(
            verify_value(&bad, NOW, LIMITS),
            Err(RecordError::BadSignature)
        );
    }

    #[test]
    fn another_key_for_the_entity_is_refused() {
        let s = sign(&identity(1), content(1));
        let other = hex::encode(identity(2).public_key().0);
        let bad = tampered(&s.value, |v| v["record"]["public_key"] = other.into());
        assert_eq!(
            verify_value(&bad, NOW, LIMITS),
            Err(RecordError::KeyMismatch)
        );
    }

    #[test]
    fn a_record_signed_by_another_key_is_refused() {
        // Mallory signs a record naming her own key but Alice's entity id.
        let mallory = identity(2);
        let s = sign(&mallory, content(1));
        let alice = identity(1).entity_id().to_string();
        let bad = tampered(&s.value, |v| v["record"]["entity_id"] = alice.into());
        assert_eq!(
            verify_value(&bad, NOW, LIMITS),
            Err(RecordError::KeyMismatch)
        );
    }

    #[test]
    fn expired_future_and_overlong_records_are_refused() {
        let me = identity(1);
        let s = sign(&me, content(1));
        let after = s.record.expires_at();
        assert_eq!(
            verify_value(&s.value, after, LIMITS),
            Err(RecordError::Expired)
        );
        assert!(verify_value(&s.value, after - 1, LIMITS).is_ok());
        let future = sign(
            &me,
            Content {
                issued_at: NOW + MAX_SKEW_MS + 1,
                ..content(1)
            },
        );
        assert_eq!(
            verify_value(&future.value, NOW, LIMITS),
            Err(RecordError::Future)
        );
        let long = sign(
            &me,
            Content {
                ttl: 86_401,
                ..content(1)
            },
        );
        assert_eq!(
            verify_value(&long.value, NOW, LIMITS),
            Err(RecordError::Expired)
        );
    }

    #[test]
    fn an_oversize_record_is_refused_before_it_is_parsed() {
        let s = sign(&identity(1), content(1));
        let limits = Limits {
            max_bytes: s.value.len() - 1,
            ..LIMITS
        };
        assert!(matches!(
            verify_value(&s.value, NOW, limits),
            Err(RecordError::TooLarge { .. })
        ));
        assert!(matches!(
            verify_value(&[b' '; 5000], NOW, LIMITS),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn field_bounds_are_enforced() {
        let me = identity(1);
        let many = sign(
            &me,
            Content {
                capabilities: (0..=MAX_CAPABILITIES).map(|i| format!("c{i}")).collect(),
                ..content(1)
            },
        );
        let limits = Limits {
            max_bytes: 1 << 20,
            ..LIMITS
        };
        assert!(matches!(
            verify_value(&many.value, NOW, limits),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            verify_value(b"{\"record\":1}", NOW, LIMITS),
            Err(RecordError::Malformed(_))
        ));
    }

    #[test]
    fn keys_belong_to_the_entity_and_its_capabilities_only() {
        let me = identity(1);
        let s = sign(&me, content(1));
        let id = me.entity_id();
        assert_eq!(check_key(&peer_key(&id), &s.record), Ok(()));
        assert_eq!(check_key(&capability_key(&id, "code"), &s.record), Ok(()));
        assert_eq!(
            check_key(&capability_key(&id, "other"), &s.record),
            Err(RecordError::WrongKey)
        );
        let them = identity(2).entity_id();
        assert_eq!(
            check_key(&peer_key(&them), &s.record),
            Err(RecordError::WrongKey)
        );
        assert_eq!(
            check_key(&capability_key(&them, "code"), &s.record),
            Err(RecordError::WrongKey)
        );
    }

    #[test]
    fn only_a_higher_sequence_or_the_same_record_replaces() {
        let me = identity(1);
        let one = sign(&me, content(1));
        let two = sign(&me, content(2));
        assert_eq!(check_replaces(&two, &one), Ok(()));
        assert_eq!(check_replaces(&one, &one), Ok(()));
        assert_eq!(
            check_replaces(&one, &two),
            Err(RecordError::Stale { got: 1, held: 2 })
        );
        let other_one = sign(
            &me,
            Content {
                addresses: vec![],
                ..content(1)
            },
        );
        assert_eq!(
            check_replaces(&other_one, &one),
            Err(RecordError::Stale { got: 1, held: 1 })
        );
    }

    #[test]
    fn the_capability_key_is_sha256_of_the_entity_and_capability_hash() {
        let id = identity(1).entity_id();
        let expected: Vec<u8> =
            Sha256::digest(format!("{id}:{}", capability_hash("code")).as_bytes()).to_vec();
        assert_eq!(capability_key(&id, "code"), expected);
        assert_ne!(provider_key("code"), provider_key("review"));
    }
}
