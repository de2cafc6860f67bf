//! DHT peer records (PROTOCOL.md section 15): `registry::verify_value` never
//! panics on any bytes, and whatever it accepts is a record that can be
//! believed: within the size limit, its key hashes to its entity, it may be
//! stored under its entity's key, it is not expired at the clock it was
//! checked against, and it replaces itself (the same bytes are the same
//! record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peer_core::registry::{self, Limits};
use peer_core::{EntityId, PublicKey};

const LIMITS: Limits = Limits {
    max_bytes: 4096,
    max_ttl: 86_400,
};

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = registry::verify_value(data, peer_fuzz::NOW_MS, LIMITS) else {
        return;
    };
    let r = &signed.record;
    assert!(data.len() <= LIMITS.max_bytes);
    assert_eq!(signed.value, data);
    let key: PublicKey = r.key().expect("an accepted record has a key");
    assert_eq!(EntityId::of(&key), r.entity_id);
    assert!(r.expires_at() > peer_fuzz::NOW_MS);
    assert!(r.ttl <= LIMITS.max_ttl);
    assert_eq!(
        registry::check_key(&registry::peer_key(&r.entity_id), r),
        Ok(())
    );
    assert_eq!(registry::check_replaces(&signed, &signed), Ok(()));
});
