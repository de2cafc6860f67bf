//! The long-lived envelope streams (`/peer-protocol/stream/1.2.0`, PROTOCOL.md
//! section 2.2) as a raw peer sees them: pipelined requests answered by id,
//! the size limit, the per-peer stream bound and the minimum rate.

mod common;

use std::time::Duration;

use common::{RawPeer, start_node_with};
use futures::prelude::*;
use libp2p::Stream;
use peer_node::net::link::PROTOCOL;

/// A raw peer's stream to the node (its swarm driven on a task of its own).
async fn open(raw: RawPeer) -> (libp2p_stream::Control, libp2p::PeerId, RawKeep) {
    let control = raw.swarm.behaviour().streams.new_control();
    let target = raw.target;
    let identity = peer_core::Identity::from_secret(&raw.identity.secret_bytes());
    let mut swarm = raw.swarm;
    let task = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (control, target, RawKeep { task, identity })
}

/// What outlives the raw peer's swarm: its task (aborted when dropped) and
/// its identity.
struct RawKeep {
    task: tokio::task::JoinHandle<()>,
    identity: peer_core::Identity,
}

impl Drop for RawKeep {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node tuned by `tune`, and a raw peer connected to it: the node's entity
/// id, the raw peer's stream control, the node's peer id.
async fn raw_link(
    tune: impl FnOnce(&mut peer_node::Config),
) -> (
    common::TestNode,
    peer_core::EntityId,
    libp2p_stream::Control,
    libp2p::PeerId,
    RawKeep,
) {
    let node = start_node_with("/ip4/127.0.0.1/tcp/0", tune).await;
    let to = node.handle.entity_id();
    let raw = RawPeer::connect(&node.addr).await;
    let (control, target, keep) = open(raw).await;
    (node, to, control, target, keep)
}

async fn write_request(s: &mut Stream, id: u64, body: &[u8]) {
    s.write_all(&id.to_be_bytes()).await.expect("write");
    let len = u32::try_from(body.len()).expect("fits");
    s.write_all(&len.to_be_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    s.flush().await.expect("flush");
}

/// The next answer: its id, kind, and body (empty for kind 0).
async fn read_answer(s: &mut Stream) -> std::io::Result<(u64, u8, Vec<u8>)> {
    let mut id = [0u8; 8];
    s.read_exact(&mut id).await?;
    let mut kind = [0u8; 1];
    s.read_exact(&mut kind).await?;
    let mut body = Vec::new();
    if kind[0] != 0 {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await?;
    }
    Ok((u64::from_be_bytes(id), kind[0], body))
}

fn refusal_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("a refusal object");
    v["error_code"].as_str().expect("a code").to_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_by_id_and_an_oversize_one_is_refused() {
    let node = start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.protocol.max_envelope_size = 64 * 1024;
    })
    .await;
    let to = node.handle.entity_id();
    let raw = RawPeer::connect(&node.addr).await;
    let ping = |raw: &RawPeer| raw.draft(to, "ping").sign(&raw.identity).encode();
    let (first, second) = (ping(&raw), ping(&raw));
    let (mut control, target, keep) = open(raw).await;
    let mut s = control.open_stream(target, PROTOCOL).await.expect("open");
    // Four requests before reading any answer: two pings, an oversize frame
    // and bytes that are no envelope.
    write_request(&mut s, 7, &first).await;
    write_request(&mut s, 3, &vec![0u8; 80 * 1024]).await;
    write_request(&mut s, 9, b"not an envelope").await;
    write_request(&mut s, 8, &second).await;
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let (id, kind, body) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut s))
            .await
            .expect("answered in time")
            .expect("an answer");
        answers.insert(id, (kind, body));
    }
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), [3, 7, 8, 9]);
    for id in [7, 8] {
        let (kind, body) = &answers[&id];
        assert_eq!(*kind, 1, "a pong for request {id}");
        let pong = peer_core::Envelope::decode(body).expect("an envelope");
        assert_eq!(pong.msg_type.as_str(), "pong");
        assert!(pong.verify());
    }
    assert_eq!(answers[&3].0, 2);
    assert_eq!(refusal_code(&answers[&3].1), "MESSAGE_TOO_LARGE");
    assert_eq!(answers[&9].0, 2);
    assert_eq!(refusal_code(&answers[&9].1), "MALFORMED_MESSAGE");
    // The stream carries on after the refusals.
    let again = ping_as(&keep.identity, to);
    write_request(&mut s, 10, &again).await;
    let (id, kind, _) = read_answer(&mut s).await.expect("answer");
    assert_eq!((id, kind), (10, 1));
}

fn ping_as(identity: &peer_core::Identity, to: peer_core::EntityId) -> Vec<u8> {
    peer_core::Draft {
        msg_type: "ping".parse().expect("type"),
        message_id: peer_core::MessageId::from_random(rand::random()),
        recipient_id: Some(to),
        session_id: None,
        sequence_num: 0,
        timestamp_ms: peer_node::node::now_ms(),
        nonce: rand::random(),
        payload: br#"{}"#.to_vec(),
    }
    .sign(identity)
    .encode()
}

#[tokio::test]
async fn a_peer_holds_at_most_its_streams_and_a_further_one_is_reset() {
    let (_node, to, mut control, target, keep) = raw_link(|c| {
        c.network.max_connections_per_peer = 2;
    })
    .await;
    let mut held = Vec::new();
    for n in 0..2 {
        let mut s = control.open_stream(target, PROTOCOL).await.expect("open");
        write_request(&mut s, n, &ping_as(&keep.identity, to)).await;
        let (id, kind, _) = read_answer(&mut s).await.expect("answered");
        assert_eq!((id, kind), (n, 1));
        held.push(s);
    }
    let mut third = control.open_stream(target, PROTOCOL).await.expect("open");
    write_request(&mut third, 5, &ping_as(&keep.identity, to)).await;
    let read = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut third)).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "the third stream is closed unanswered: {read:?}"
    );
    // Once one is closed, a new one is served.
    held.pop().expect("held").close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = control.open_stream(target, PROTOCOL).await.expect("open");
    write_request(&mut next, 6, &ping_as(&keep.identity, to)).await;
    let (id, kind, _) = read_answer(&mut next).await.expect("answered");
    assert_eq!((id, kind), (6, 1));
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_ends_its_stream_and_not_the_next() {
    let (_node, to, mut control, target, keep) = raw_link(|c| {
        c.network.min_inbound_bytes_per_sec = 1_000;
    })
    .await;
    let mut slow = control.open_stream(target, PROTOCOL).await.expect("open");
    // A 4,000-byte body at 1,000 bytes/s is due within 5 s; 10 bytes then
    // nothing fall behind after the one-second allowance.
    slow.write_all(&1u64.to_be_bytes()).await.expect("write");
    slow.write_all(&4_000u32.to_be_bytes())
        .await
        .expect("write");
    slow.write_all(&[0u8; 10]).await.expect("write");
    slow.flush().await.expect("flush");
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(8), read_answer(&mut slow)).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "closed without an answer: {read:?}"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "cut after the allowance: {took:?}"
    );
    let mut next = control.open_stream(target, PROTOCOL).await.expect("open");
    write_request(&mut next, 2, &ping_as(&keep.identity, to)).await;
    let (id, kind, _) = read_answer(&mut next).await.expect("answered");
    assert_eq!((id, kind), (2, 1));
}

#[tokio::test]
async fn an_inbound_stream_that_carries_nothing_is_closed_after_twice_the_idle_time() {
    let (_node, to, mut control, target, keep) = raw_link(|c| {
        c.network.max_idle_secs = 1;
    })
    .await;
    let mut s = control.open_stream(target, PROTOCOL).await.expect("open");
    write_request(&mut s, 1, &ping_as(&keep.identity, to)).await;
    assert_eq!(read_answer(&mut s).await.expect("answered").0, 1);
    // Then nothing: the node closes its side after about 2 s.
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(8), read_answer(&mut s)).await;
    assert!(matches!(read, Ok(Err(_))), "closed: {read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
