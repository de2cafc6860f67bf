//! Envelope decoding and the inbound pipeline.
//!
//! (a) The encoding is canonical: any bytes that decode re-encode to exactly
//!     themselves, and the re-encoding decodes to the same envelope.
//! (b) `Acceptor::accept` returns (accepts or refuses) on any bytes, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peer_core::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        let bytes = env.encode();
        assert_eq!(
            bytes.len(),
            env.encoded_len(),
            "encoded_len disagrees with encode"
        );
        assert_eq!(Envelope::decode(&bytes), Ok(env), "re-decode differs");
        assert_eq!(bytes, data, "decodable bytes are not canonical");
    }
    // Fixed clock and receiver; a fresh acceptor per input keeps runs reproducible.
    let _ = peer_fuzz::acceptor().accept(peer_fuzz::NOW_MS, data);
});
