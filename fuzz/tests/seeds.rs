//! The committed seeds under `seeds/` are exactly what `peer_fuzz::seeds()` makes,
//! they round-trip canonically, and the acceptor treats each as intended.
//! `PEER_FUZZ_WRITE_SEEDS=1 cargo test` rewrites them.

use std::path::PathBuf;

use peer_core::{Envelope, ErrorCode};

#[test]
fn seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = std::env::var_os("PEER_FUZZ_WRITE_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("create seeds/");
    }
    for (name, bytes) in peer_fuzz::seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).expect("write seed");
        } else {
            let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e}; run with PEER_FUZZ_WRITE_SEEDS=1", path.display())
            });
            assert_eq!(
                on_disk,
                bytes,
                "{} is stale; run with PEER_FUZZ_WRITE_SEEDS=1",
                path.display()
            );
        }
    }
}

#[test]
fn seeds_round_trip_and_reach_the_intended_check() {
    for (name, bytes) in peer_fuzz::seeds() {
        let want = match name {
            "to_someone_else" => Some(ErrorCode::WrongRecipient),
            "version_1_1" => Some(ErrorCode::InvalidVersion),
            _ => None,
        };
        if want != Some(ErrorCode::InvalidVersion) {
            let env = Envelope::decode(&bytes).expect(name);
            assert_eq!(env.encode(), bytes, "{name}");
        }
        let got = peer_fuzz::acceptor().accept(peer_fuzz::NOW_MS, &bytes);
        assert_eq!(got.err().map(|r| r.rejection.code), want, "{name}");
    }
}
