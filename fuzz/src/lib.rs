//! Shared pieces of the fuzz targets: the fixed receiver and clock, and the
//! deterministic seed envelopes (written to `seeds/` by `tests/seeds.rs`).

use std::sync::LazyLock;

use peer_core::inbound::{Acceptor, Config};
use peer_core::{Draft, EntityId, Envelope, Identity, MessageId, SessionId};

/// The receiver's clock for every fuzz input (2027-01-15T08:00:00Z).
pub const NOW_MS: u64 = 1_800_000_000_000;

/// The receiving node's entity id (its key is derived once, not per input).
pub static LOCAL: LazyLock<EntityId> =
    LazyLock::new(|| Identity::from_secret(&[0x11; 32]).entity_id());

/// A fresh acceptor for the receiving node, with default settings. Fresh per
/// input, so every run of an input is deterministic.
pub fn acceptor() -> Acceptor {
    Acceptor::new(*LOCAL, Config::default())
}

/// A handful of valid envelopes covering each optional field, named for the seed files.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let sender = Identity::from_secret(&[0x22; 32]);
    let me = *LOCAL;
    let draft = |msg_type: &str, n: u8, recipient, session, payload: &[u8]| Draft {
        msg_type: msg_type.parse().expect("valid msg_type"),
        message_id: MessageId::from_random([n; 16]),
        recipient_id: recipient,
        session_id: session,
        sequence_num: u64::from(n),
        timestamp_ms: NOW_MS,
        nonce: [n; 16],
        payload: payload.to_vec(),
    };
    let sign = |d: Draft| d.sign(&sender).encode();
    let mut wrong_version: Envelope = draft("ping", 6, None, None, b"").sign(&sender);
    wrong_version.version = "1.1".into();
    vec![
        ("ping_broadcast", sign(draft("ping", 1, None, None, b""))),
        (
            "message_to_me",
            sign(draft("message", 2, Some(me), None, b"{\"text\":\"hi\"}")),
        ),
        (
            "session_to_me",
            sign(draft(
                "task_delegate",
                3,
                Some(me),
                Some(SessionId::from_random([3; 16])),
                b"{\"task\":\"x\",\"args\":[1,2,3]}",
            )),
        ),
        (
            "session_broadcast",
            sign(draft("app.chat", 4, None, Some(SessionId([4; 16])), b"{}")),
        ),
        (
            "to_someone_else",
            sign(draft("pong", 5, Some(EntityId([5; 32])), None, b"null")),
        ),
        ("version_1_1", wrong_version.encode()),
    ]
}
