//! End-to-end sessions between real nodes on 127.0.0.1 (and a raw peer that runs
//! the core session machine itself, to look at what crosses the wire).

use std::time::Duration;

use peer_core::session::{self, Link, Message, Random};
use peer_core::{Envelope, MsgType};
use peer_node::net::codec::Response;
use peer_node::node::{Event, now_ms};

mod common;
use common::{RawPeer, TestNode, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

fn random(seed: u8) -> Random {
    let mut bytes = [seed; Random::LEN];
    bytes[..32].copy_from_slice(&rand::random::<[u8; 32]>());
    bytes[32..64].copy_from_slice(&rand::random::<[u8; 32]>());
    Random::from_bytes(&bytes)
}

fn msg(text: &str) -> Vec<u8> {
    serde_json::json!({ "text": text }).to_string().into_bytes()
}

fn message_type() -> MsgType {
    "message".parse().expect("valid")
}

async fn session_id(node: &TestNode, peer: &TestNode) -> Option<String> {
    let peers = node.handle.peers().await.expect("peers");
    peers
        .into_iter()
        .find(|p| p.entity_id == peer.handle.entity_id())
        .and_then(|p| p.session)
        .map(|s| s.session_id)
}

async fn next_text(events: &mut tokio::sync::broadcast::Receiver<Event>) -> String {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("event in time")
            .expect("event");
        if let Event::Message { payload, .. } = ev {
            return payload.to_value()["text"]
                .as_str()
                .expect("text")
                .to_owned();
        }
    }
}

/// A raw peer answers a real node's handshake with the core machine, so the
/// test sees the sealed envelope exactly as any relay would.
#[tokio::test]
async fn the_payload_on_the_wire_is_ciphertext_and_both_sides_hold_the_same_keys() {
    let node = start_node_with(TCP, |_| {}).await;
    let mut raw = RawPeer::connect(&node.addr).await;
    wait_connected(&node.handle, raw.entity_id()).await;
    let secret = "the plaintext marker 7f3a9c";
    let sender = node.handle.clone();
    let to = raw.entity_id();
    let sent = tokio::spawn(async move { sender.send(to, message_type(), msg(secret)).await });

    let session = raw.accept_session(node.handle.entity_id()).await;

    let (env, wire, channel) = raw.next_request().await;
    assert_eq!(env.session_id, Some(session.id()));
    assert_eq!(env.recipient_id, Some(raw.entity_id()));
    assert!(
        !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the plaintext must not appear in the encoded envelope"
    );
    let plaintext = session
        .open(now_ms(), &env.msg_type, env.sequence_num, &env.payload)
        .expect("the raw peer's keys open what the node sealed");
    assert_eq!(plaintext, msg(secret));
    raw.respond(channel, Response::Accepted).await;
    sent.await.expect("task").expect("delivered");

    // The other direction: what the raw peer seals, the node opens.
    let mut session = session;
    let (seq, ciphertext) = session
        .seal(now_ms(), &message_type(), &msg("back"))
        .expect("seal");
    let mut d = raw.draft(node.handle.entity_id(), "message");
    d.session_id = Some(session.id());
    d.sequence_num = seq;
    d.payload = ciphertext;
    let mut events = node.handle.subscribe();
    assert_eq!(raw.send(d.sign(&raw.identity).encode()).await, None);
    loop {
        if let Event::Message { payload, .. } = events.recv().await.expect("event") {
            assert_eq!(payload.to_value()["text"], "back");
            break;
        }
    }
}

#[tokio::test]
async fn a_tampered_or_swapped_ephemeral_key_fails_the_handshake() {
    let node = start_node_with(TCP, |_| {}).await;
    let mut raw = RawPeer::connect(&node.addr).await;
    let to = node.handle.entity_id();
    let mut link = Link::new(session::Config::default(), raw.entity_id(), to);

    // A key changed in flight breaks the envelope signature.
    let init = link.connect(now_ms(), random(2)).expect("init");
    let d = raw.draft(to, init.msg_type());
    let env = peer_core::Draft {
        payload: init.encode(),
        ..d
    }
    .sign(&raw.identity);
    let mut tampered = env.clone();
    let last = tampered.payload.len() - 1;
    tampered.payload[last] ^= 1;
    assert_eq!(
        raw.send(tampered.encode()).await.as_deref(),
        Some("INVALID_SIGNATURE")
    );

    // A man in the middle who swaps the node's ephemeral key on its way to us:
    // our challenge response is then over another transcript, and the node refuses it.
    let Response::Reply(bytes) = raw.request(env.encode()).await else {
        panic!("the node answers handshake_init with its ack");
    };
    let ack_env = Envelope::decode(&bytes).expect("decodes");
    let Message::InitAck(mut ack) = Message::from_envelope(&ack_env).expect("ack") else {
        panic!("expected handshake_init_ack");
    };
    ack.ephemeral = session::keys::ephemeral_public(&[9; 32]);
    let response = link
        .handle(
            now_ms(),
            &raw.identity,
            &ack_env.sender_key,
            &Message::InitAck(ack),
            || random(3),
        )
        .expect("our side cannot tell")
        .expect("challenge response");
    let d = raw.draft(to, response.msg_type());
    let env = peer_core::Draft {
        payload: response.encode(),
        ..d
    }
    .sign(&raw.identity);
    assert_eq!(
        raw.send(env.encode()).await.as_deref(),
        Some("CHALLENGE_INVALID")
    );
    let peers = node.handle.peers().await.expect("peers");
    assert!(
        peers.iter().all(|p| p.session.is_none()),
        "no session came of it"
    );
}

async fn pair(tune: impl Fn(&mut peer_node::Config) + Copy) -> (TestNode, TestNode) {
    common::pair(TCP, tune).await
}

/// Sends "one", lets 1.1 s pass (beyond a 1 s session lifetime), sends "two";
/// checks both arrive and returns the session ids before and after.
async fn send_across_expiry(a: &TestNode, b: &TestNode) -> (String, String) {
    let to = b.handle.entity_id();
    let mut events = b.handle.subscribe();
    a.handle
        .send(to, message_type(), msg("one"))
        .await
        .expect("first");
    assert_eq!(next_text(&mut events).await, "one");
    let s1 = session_id(a, b).await.expect("a session");
    assert_eq!(
        session_id(b, a).await,
        Some(s1.clone()),
        "both sides hold the same session"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    a.handle
        .send(to, message_type(), msg("two"))
        .await
        .expect("second, after expiry, without an error");
    assert_eq!(next_text(&mut events).await, "two");
    let s2 = session_id(a, b).await.expect("a new session");
    assert_ne!(s1, s2, "a new handshake ran");
    (s1, s2)
}

#[tokio::test]
async fn an_expired_session_is_renewed_without_the_sender_noticing() {
    let (a, b) = pair(|c| c.security.session_lifetime_secs = 1).await;
    let (_, s2) = send_across_expiry(&a, &b).await;
    assert_eq!(
        session_id(&b, &a).await,
        Some(s2),
        "both sides hold the same session"
    );
}

#[tokio::test]
async fn simultaneous_handshakes_converge_on_one_session() {
    for round in 0..3 {
        let (a, b) = pair(|_| {}).await;
        let (ab, ba) = tokio::join!(
            a.handle
                .send(b.handle.entity_id(), message_type(), msg("a to b")),
            b.handle
                .send(a.handle.entity_id(), message_type(), msg("b to a")),
        );
        ab.expect("a to b");
        ba.expect("b to a");
        let sa = session_id(&a, &b).await.expect("a's session");
        let sb = session_id(&b, &a).await.expect("b's session");
        assert_eq!(sa, sb, "round {round}: one session on both sides");
    }
}

#[tokio::test]
async fn many_concurrent_sealed_messages_each_arrive_once() {
    let (a, b) = pair(|c| c.rate_limits.enabled = false).await;
    let mut events = b.handle.subscribe();
    let to = b.handle.entity_id();
    let sends: Vec<_> = (0..200)
        .map(|n| {
            let h = a.handle.clone();
            let p = serde_json::json!({ "n": n }).to_string().into_bytes();
            tokio::spawn(async move { h.send(to, message_type(), p).await })
        })
        .collect();
    for s in sends {
        s.await.expect("task").expect("delivered");
    }
    let mut seen = Vec::new();
    while seen.len() < 200 {
        if let Event::Message { payload, .. } = events.recv().await.expect("event") {
            seen.push(payload.to_value()["n"].as_u64().expect("n"));
        }
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..200).collect::<Vec<_>>(),
        "each message exactly once"
    );
}

#[tokio::test]
async fn a_session_the_peer_no_longer_has_is_replaced_without_the_sender_noticing() {
    // b forgets sessions after 1 s; a would keep them for an hour.
    let a = start_node_with(TCP, |_| {}).await;
    let b = start_node_with(TCP, |c| c.security.session_lifetime_secs = 1).await;
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;
    // b answers SESSION_EXPIRED to "two"; a starts a new session and sends again.
    send_across_expiry(&a, &b).await;
    let to = b.handle.entity_id();
    let stats = a.handle.stats().await.expect("stats");
    let row = &stats.peers[&to.to_string()];
    assert_eq!(row.sent, 2);
    assert!(row.refused_by_peer.is_empty(), "the agent saw no refusal");
}
