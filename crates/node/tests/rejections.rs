//! Each kind of bad inbound message is rejected with its error code by a real
//! node on 127.0.0.1, and the node keeps serving an honest peer during and after.

use std::time::Duration;

use peer_core::{EntityId, Identity};
use peer_node::net::codec::Response;
use peer_node::node::Event;
use tokio::sync::broadcast;

mod common;
use common::{LIMIT, RawPeer, TestNode, start_node_with};

/// A node that also accepts plaintext application messages, so that the raw
/// peer (which runs no session) can reach every envelope-level check.
async fn start_node() -> TestNode {
    start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.protocol.max_envelope_size = LIMIT;
        c.security.require_encryption = false;
    })
    .await
}

/// The next message event from `from`, skipping everything else.
async fn next_message_from(
    events: &mut broadcast::Receiver<Event>,
    from: EntityId,
) -> serde_json::Value {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("event in time")
            .expect("event");
        match ev {
            Event::Message {
                from: f, payload, ..
            } if f == from => return payload.to_value(),
            _ => {}
        }
    }
}

/// Starts a target node, an honest node connected to it and a raw peer; checks
/// that `make`'s bytes are rejected with `code` while the honest node's messages
/// before, during and after are delivered, and that only the raw peer's counters
/// record the rejection.
async fn rejected_with(code: &str, make: impl FnOnce(&RawPeer, EntityId) -> Vec<u8>) {
    rejected_after(code, |raw, to| (None, make(raw, to))).await;
}

/// As [`rejected_with`], but `make` may also return a frame that must be
/// accepted first (to spend a nonce).
async fn rejected_after(
    code: &str,
    make: impl FnOnce(&RawPeer, EntityId) -> (Option<Vec<u8>>, Vec<u8>),
) {
    let target = start_node().await;
    let honest = start_node().await;
    let to = target.handle.entity_id();
    honest
        .handle
        .connect(target.addr.clone())
        .await
        .expect("honest connects");
    let mut events = target.handle.subscribe();
    let mut raw = RawPeer::connect(&target.addr).await;
    let (first, bad) = make(&raw, to);
    if let Some(first) = first {
        assert_eq!(raw.send(first).await, None, "the first copy is accepted");
    }

    let say = |n: u32| {
        honest.handle.send(
            to,
            "message".parse().expect("type"),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    };
    say(1).await.expect("before");
    let (got, during) = tokio::join!(raw.send(bad), say(2));
    during.expect("during");
    assert_eq!(got.as_deref(), Some(code));
    say(3).await.expect("after");
    for n in 1..=3 {
        let payload = next_message_from(&mut events, honest.handle.entity_id()).await;
        assert_eq!(payload["n"], n);
    }
    // A valid message from the raw peer itself still goes through.
    let good = raw.draft(to, "message").sign(&raw.identity).encode();
    assert_eq!(raw.send(good).await, None);

    let stats = target.handle.stats().await.expect("stats");
    let mine = &stats.peers[&honest.handle.entity_id().to_string()];
    assert_eq!(mine.received, 3);
    assert!(mine.rejected.is_empty());
    let theirs = &stats.peers[&raw.identity.entity_id().to_string()];
    assert_eq!(theirs.rejected.get(code), Some(&1));
}

#[tokio::test]
async fn tampered_field_is_invalid_signature() {
    rejected_with("INVALID_SIGNATURE", |raw, to| {
        let mut env = raw.draft(to, "message").sign(&raw.identity);
        env.payload = br#"{"n":2}"#.to_vec();
        env.encode()
    })
    .await;
}

#[tokio::test]
async fn sender_id_not_hash_of_key_is_unknown_sender() {
    rejected_with("UNKNOWN_SENDER", |raw, to| {
        // Names the connection's peer as its sender, but carries another key.
        let other = Identity::from_secret(&[42; 32]);
        let mut env = raw.draft(to, "message").sign(&other);
        env.sender_id = raw.entity_id();
        env.encode()
    })
    .await;
}

#[tokio::test]
async fn an_envelope_of_another_identity_on_a_connection_is_wrong_sender() {
    rejected_with("WRONG_SENDER", |raw, to| {
        // Well formed and validly signed, but not by the connection's peer.
        let other = Identity::from_secret(&[43; 32]);
        raw.draft(to, "message").sign(&other).encode()
    })
    .await;
}

#[tokio::test]
async fn timestamp_61_s_old_is_a_replay() {
    rejected_with("REPLAY_DETECTED", |raw, to| {
        let mut d = raw.draft(to, "message");
        d.timestamp_ms -= 61_000;
        d.sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn timestamp_61_s_ahead_is_a_replay() {
    rejected_with("REPLAY_DETECTED", |raw, to| {
        let mut d = raw.draft(to, "message");
        d.timestamp_ms += 61_000;
        d.sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn reused_nonce_is_a_replay() {
    rejected_after("REPLAY_DETECTED", |raw, to| {
        let bytes = raw.draft(to, "message").sign(&raw.identity).encode();
        (Some(bytes.clone()), bytes)
    })
    .await;
}

#[tokio::test]
async fn new_message_reusing_a_nonce_is_a_replay() {
    rejected_after("REPLAY_DETECTED", |raw, to| {
        let first = raw.draft(to, "message").sign(&raw.identity);
        let mut second = raw.draft(to, "message");
        second.nonce = first.nonce;
        (Some(first.encode()), second.sign(&raw.identity).encode())
    })
    .await;
}

#[tokio::test]
async fn unknown_version_is_invalid_version() {
    rejected_with("INVALID_VERSION", |raw, to| {
        let mut env = raw.draft(to, "message").sign(&raw.identity);
        env.version = "2.0".into();
        env.encode()
    })
    .await;
}

#[tokio::test]
async fn malformed_bytes_are_malformed_message() {
    rejected_with("MALFORMED_MESSAGE", |raw, to| {
        let mut bytes = raw.draft(to, "message").sign(&raw.identity).encode();
        bytes.truncate(bytes.len() / 2);
        bytes
    })
    .await;
}

#[tokio::test]
async fn garbage_is_malformed_message() {
    rejected_with("MALFORMED_MESSAGE", |_, _| {
        b"\x03\xff\xfe\xfd not an envelope".to_vec()
    })
    .await;
}

#[tokio::test]
async fn oversize_message_is_too_large() {
    rejected_with("MESSAGE_TOO_LARGE", |raw, to| {
        let mut d = raw.draft(to, "message");
        d.payload = vec![b' '; LIMIT];
        d.sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn unknown_msg_type_is_unsupported() {
    rejected_with("UNSUPPORTED_MSG_TYPE", |raw, to| {
        raw.draft(to, "no_such_type").sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn message_for_another_entity_is_wrong_recipient() {
    rejected_with("WRONG_RECIPIENT", |raw, _| {
        let other = Identity::from_secret(&[42; 32]).entity_id();
        raw.draft(other, "message").sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn non_json_application_payload_is_malformed() {
    rejected_with("MALFORMED_MESSAGE", |raw, to| {
        let mut d = raw.draft(to, "message");
        d.payload = vec![0xff, 0x00];
        d.sign(&raw.identity).encode()
    })
    .await;
}

#[tokio::test]
async fn a_refusal_is_an_unsigned_kind_2_answer_naming_the_message() {
    let target = start_node().await;
    let mut raw = RawPeer::connect(&target.addr).await;
    let env = raw
        .draft(target.handle.entity_id(), "no_such_type")
        .sign(&raw.identity);
    let Response::Refused(refusal) = raw.request(env.encode()).await else {
        panic!("a refusal, not an error envelope");
    };
    assert_eq!(refusal.error_code, "UNSUPPORTED_MSG_TYPE");
    assert!(
        refusal.error_message.contains("no_such_type"),
        "{refusal:?}"
    );
    assert_eq!(
        refusal.original_message_id,
        Some(env.message_id.to_string())
    );
    assert_eq!(refusal.retry_after_ms, None);
}

#[tokio::test]
async fn plaintext_application_message_is_refused_by_default() {
    let target = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    let mut raw = RawPeer::connect(&target.addr).await;
    let env = raw
        .draft(target.handle.entity_id(), "message")
        .sign(&raw.identity);
    assert_eq!(
        raw.send(env.encode()).await.as_deref(),
        Some("ENCRYPTION_REQUIRED")
    );
    // Signed but unsealed non-application messages are still served.
    let ping = raw
        .draft(target.handle.entity_id(), "ping")
        .sign(&raw.identity);
    assert_eq!(raw.send(ping.encode()).await, None, "a pong, not an error");
}

/// `depth` arrays around a number.
fn nested(depth: usize) -> Vec<u8> {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
}

#[tokio::test]
async fn a_sealed_payload_nested_too_deep_is_malformed_and_the_next_still_arrives() {
    let target = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    let to = target.handle.entity_id();
    let mut events = target.handle.subscribe();
    let mut raw = RawPeer::connect(&target.addr).await;
    let mut session = raw.open_session(to).await;
    // One level over the default limit (64), and far over it.
    for depth in [65, 100_000] {
        let response = raw
            .request_sealed(&mut session, to, "message", &nested(depth))
            .await;
        let Response::Refused(refusal) = response else {
            panic!("refused, got {response:?}");
        };
        assert_eq!(refusal.error_code, "MALFORMED_MESSAGE", "{refusal:?}");
        let reason = &refusal.error_message;
        assert!(
            reason.contains("64") && reason.contains("protocol.max_json_depth"),
            "{reason}"
        );
    }
    // At the limit: delivered, in order, without waiting for the refused ones.
    let started = std::time::Instant::now();
    let ok = raw
        .send_sealed(&mut session, to, "message", &nested(64))
        .await;
    assert_eq!(ok, None);
    let payload = next_message_from(&mut events, raw.entity_id()).await;
    assert_eq!(
        payload,
        serde_json::from_slice::<serde_json::Value>(&nested(64)).expect("json")
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no reorder wait"
    );
    let stats = target.handle.stats().await.expect("stats");
    let theirs = &stats.peers[&raw.entity_id().to_string()];
    assert_eq!(theirs.rejected.get("MALFORMED_MESSAGE"), Some(&2));
}
