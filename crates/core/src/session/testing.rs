//! Test helpers shared by the session tests: identities, deterministic
//! randomness, and checks that two sessions are the two ends of one channel.

use super::{Random, Session};
use crate::identity::Identity;
use crate::msg_type::MsgType;

pub(crate) const T0: u64 = 1_800_000_000_000;

pub(crate) fn identity(seed: u8) -> Identity {
    Identity::from_secret(&[seed; 32])
}

/// Distinct, non-zero bytes for every field, different for every `seed`.
pub(crate) fn random(seed: u8) -> Random {
    let mut b = [0u8; Random::LEN];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_mul(151).wrapping_add(i as u8).wrapping_add(1);
    }
    Random::from_bytes(&b)
}

/// Whether `a` and `b` are the two ends of one session: same id, each other's
/// peer, opposite roles, and each one's sealed payloads open at the other.
pub(crate) fn assert_paired(a: &mut Session, b: &mut Session, now_ms: u64) {
    assert_eq!(a.id(), b.id());
    assert_eq!(a.peer(), b.local());
    assert_eq!(b.peer(), a.local());
    assert_ne!(a.role(), b.role());
    let mt: MsgType = "message".parse().expect("valid");
    for text in [&b"{\"text\":\"hi\"}"[..], b"", b"second"] {
        let (seq, c) = a.seal(now_ms, &mt, text).expect("seals");
        assert_eq!(b.open(now_ms, &mt, seq, &c).expect("opens"), text);
        let (seq, c) = b.seal(now_ms, &mt, text).expect("seals");
        assert_eq!(a.open(now_ms, &mt, seq, &c).expect("opens"), text);
    }
    // A payload does not open under the key of the other direction.
    let (seq, c) = a.seal(now_ms, &mt, b"x").expect("seals");
    assert!(a.open(now_ms, &mt, seq, &c).is_err());
}
