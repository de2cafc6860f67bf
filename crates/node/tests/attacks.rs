//! What an attacker tries first, against real nodes on loopback, each time with
//! an honest peer that must be unaffected: identities made up by the thousand
//! over one connection, garbage as fast as it can be sent, churning the
//! rate-limit table, replaying after a restart, and a node at its connection
//! limit. (A host taking every connection slot, and slow streams holding the
//! inbound budget, are in `limits.rs`; the honest peer's latency under each
//! attack is measured by `peer-attack`, see docs/BENCHMARKS.md.)

use std::time::Duration;

use futures::StreamExt;
use peer_core::session::{self, Link};
use peer_core::{Draft, Identity};
use peer_node::NodeError;
use peer_node::net::codec::{Frame, Request};
use peer_node::node::{Event, now_ms};

mod common;
use common::{
    RawPeer, error_code, handshake_random, metric, start_node_with, wait_connected,
    wait_disconnected,
};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// A fresh honest node, connected to `target`.
async fn honest_peer_of(target: &common::TestNode) -> common::TestNode {
    let honest = start_node_with(TCP, |_| {}).await;
    honest
        .handle
        .connect(target.addr.clone())
        .await
        .expect("the honest peer connects");
    honest
}

/// Sends `count` messages from `from` to `to`, one after the other; all must
/// be accepted.
async fn honest_messages(from: &peer_node::NodeHandle, to: peer_core::EntityId, count: u32) {
    for n in 1..=count {
        from.send(
            to,
            "message".parse().expect("type"),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
        .await
        .expect("the honest peer's message is accepted");
    }
}

#[tokio::test]
async fn identities_made_up_over_one_connection_are_refused_and_get_no_state() {
    // The connection is not closed for its misbehaviour (see
    // `a_misbehaving_connection_is_closed_and_its_host_cooled_down`).
    let target = start_node_with(TCP, |c| c.network.misbehaviour_limit = 0).await;
    let to = target.handle.entity_id();
    let honest = honest_peer_of(&target).await;
    let mut x = RawPeer::connect(&target.addr).await;
    wait_connected(&target.handle, x.entity_id()).await;

    // 1,000 identities of X's own making ping over X's connection, while an
    // honest peer sends 20 messages.
    let others: Vec<Identity> = (0..1000)
        .map(|_| Identity::from_secret(&rand::random()))
        .collect();
    let pings: Vec<Draft> = others.iter().map(|_| x.draft(to, "ping")).collect();
    let frames = pings
        .iter()
        .zip(&others)
        .map(|(d, y)| d.clone().sign(y).encode())
        .collect();
    let (responses, ()) =
        tokio::join!(x.flood(frames, 64), honest_messages(&honest.handle, to, 20));
    for response in responses {
        assert_eq!(error_code(response).as_deref(), Some("WRONG_SENDER"));
    }
    // Nor can X open a session, or send a message, in another's name.
    let y = &others[0];
    let mut link = Link::new(session::Config::default(), y.entity_id(), to);
    let init = link.connect(now_ms(), handshake_random()).expect("init");
    let handshake = Draft {
        payload: init.encode(),
        ..x.draft(to, init.msg_type())
    }
    .sign(y);
    assert_eq!(
        x.send(handshake.encode()).await.as_deref(),
        Some("WRONG_SENDER")
    );
    let message = x.draft(to, "message").sign(y);
    assert_eq!(
        x.send(message.encode()).await.as_deref(),
        Some("WRONG_SENDER")
    );

    // None of them has any state on the node: no counters, no session, no
    // rate-limit buckets (not even X, which has sent nothing valid yet).
    let stats = target.handle.stats().await.expect("stats");
    assert!(
        others
            .iter()
            .all(|o| !stats.peers.contains_key(&o.entity_id().to_string()))
    );
    let mine = &stats.peers[&x.entity_id().to_string()];
    assert_eq!(mine.rejected.get("WRONG_SENDER"), Some(&1002));
    // The honest peer's session and buckets are the only ones.
    assert_eq!(metric(&target.handle, "peer_session_peers"), 1.0);
    assert_eq!(metric(&target.handle, "peer_rate_limit_senders"), 1.0);
    let theirs = &stats.peers[&honest.handle.entity_id().to_string()];
    assert_eq!((theirs.received, theirs.rejected.len()), (20, 0));
    // X's own ping is answered as ever.
    let own = x.draft(to, "ping").sign(&x.identity).encode();
    assert_eq!(x.send(own).await, None);

    // Nor was Y's nonce spent: on its own connection, the very ping refused
    // over X's is accepted.
    let mut y_peer =
        RawPeer::connect_as(Identity::from_secret(&y.secret_bytes()), &target.addr).await;
    let replayed = pings[0].clone().sign(y).encode();
    assert_eq!(y_peer.send(replayed).await, None, "a pong");
}

#[tokio::test]
async fn garbage_costs_no_signature_and_no_write_while_an_honest_peer_gets_through() {
    // The connection is not closed for its misbehaviour, so that all 10,000
    // frames reach the node.
    let target = start_node_with(TCP, |c| c.network.misbehaviour_limit = 0).await;
    let to = target.handle.entity_id();
    let honest = honest_peer_of(&target).await;
    let mut events = target.handle.subscribe();
    let say = |n: u32| {
        honest.handle.send(
            to,
            "message".parse().expect("type"),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    };
    // The session is set up (the node signs its handshake replies) before counting.
    say(0).await.expect("first message");
    let mut raw = RawPeer::connect(&target.addr).await;
    wait_connected(&target.handle, raw.entity_id()).await;
    // Both peers' sightings are written before counting.
    let mut commits = metric(&target.handle, "peer_store_commits_total");
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = metric(&target.handle, "peer_store_commits_total");
        if now == commits && now >= 1.0 {
            break;
        }
        commits = now;
    }
    let signed = metric(&target.handle, "peer_envelopes_signed_total");

    // 10,000 envelopes with broken signatures, 128 at a time, while the honest
    // peer sends 50 messages.
    let garbage = (0..10_000)
        .map(|_| {
            let mut env = raw.draft(to, "message").sign(&raw.identity);
            env.signature[7] ^= 0x40;
            env.encode()
        })
        .collect();
    let (responses, ()) = tokio::join!(raw.flood(garbage, 128), async {
        for n in 1..=50 {
            say(n).await.expect("the honest peer's message is accepted");
        }
    });
    assert_eq!(responses.len(), 10_000);
    for response in responses {
        assert_eq!(error_code(response).as_deref(), Some("INVALID_SIGNATURE"));
    }
    assert_eq!(
        metric(&target.handle, "peer_envelopes_signed_total"),
        signed,
        "no refusal was signed"
    );
    assert_eq!(
        metric(&target.handle, "peer_store_commits_total"),
        commits,
        "nothing was written"
    );
    let mut got = Vec::new();
    while got.len() < 51 {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(Event::Message { payload, .. })) => got.push(payload.to_value()["n"].clone()),
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got,
        (0..=50).map(serde_json::Value::from).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn identities_churning_through_the_rate_table_leave_a_newcomer_its_own_bucket() {
    let target = start_node_with(TCP, |c| {
        c.network.max_connections = 4;
        c.rate_limits.max_peers = 4;
        c.rate_limits.heartbeat.burst = 3;
        c.rate_limits.heartbeat.per_minute = 1;
    })
    .await;
    let to = target.handle.entity_id();
    let ping = |raw: &RawPeer| raw.draft(to, "ping").sign(&raw.identity).encode();
    // One attacker identity stays connected with an empty bucket...
    let mut drained = RawPeer::connect(&target.addr).await;
    for _ in 0..3 {
        assert_eq!(drained.send(ping(&drained)).await, None);
    }
    assert_eq!(
        drained.send(ping(&drained)).await.as_deref(),
        Some("RATE_LIMITED")
    );
    // ...while 20 more come, ping once each, and go: the table is full of them.
    for _ in 0..20 {
        let mut sybil = RawPeer::connect(&target.addr).await;
        assert_eq!(sybil.send(ping(&sybil)).await, None, "its own bucket");
        let id = sybil.entity_id();
        drop(sybil);
        wait_disconnected(&target.handle, id).await;
    }
    assert!(metric(&target.handle, "peer_rate_limit_senders") <= 4.0);
    // A newcomer has a full bucket of its own, shared with nobody.
    let mut newcomer = RawPeer::connect(&target.addr).await;
    for _ in 0..3 {
        assert_eq!(newcomer.send(ping(&newcomer)).await, None);
    }
    assert_eq!(
        newcomer.send(ping(&newcomer)).await.as_deref(),
        Some("RATE_LIMITED")
    );
    // And the connected attacker's bucket was not forgotten to make room.
    assert_eq!(
        drained.send(ping(&drained)).await.as_deref(),
        Some("RATE_LIMITED")
    );
}

#[tokio::test]
async fn a_restarted_node_refuses_replays_of_what_it_accepted_before() {
    let tune = |c: &mut peer_node::Config| c.security.require_encryption = false;
    let first = start_node_with(TCP, tune).await;
    let to = first.handle.entity_id();
    let mut raw = RawPeer::connect(&first.addr).await;
    let ping = raw.draft(to, "ping").sign(&raw.identity).encode();
    let message = raw.draft(to, "message").sign(&raw.identity).encode();
    assert_eq!(raw.send(ping.clone()).await, None);
    assert_eq!(raw.send(message.clone()).await, None);
    let identity = Identity::from_secret(&raw.identity.secret_bytes());
    drop(raw);

    // The node stops; the same data directory starts again at once.
    let second = common::restart(first, TCP, tune).await;
    assert_eq!(second.handle.entity_id(), to, "the same node");
    let mut raw = RawPeer::connect_as(identity, &second.addr).await;
    for captured in [ping, message] {
        assert_eq!(raw.send(captured).await.as_deref(), Some("REPLAY_DETECTED"));
    }
    let fresh = raw.draft(to, "ping").sign(&raw.identity).encode();
    assert_eq!(raw.send(fresh).await, None, "fresh messages pass");
}

#[tokio::test]
async fn a_connection_the_remote_closes_at_once_is_no_connection() {
    let target = start_node_with(TCP, |c| {
        c.network.max_connections = 1;
        c.rate_limits.max_peers = 1;
    })
    .await;
    let first = start_node_with(TCP, |_| {}).await;
    first
        .handle
        .connect(target.addr.clone())
        .await
        .expect("the first takes the only slot");
    let second = start_node_with(TCP, |_| {}).await;
    match second.handle.connect(target.addr.clone()).await {
        Err(NodeError::Dial(reason)) => assert!(!reason.is_empty()),
        other => panic!("the target is full, got {other:?}"),
    }
    let peers = second.handle.peers().await.expect("peers");
    assert!(
        peers.iter().all(|p| !p.connected),
        "nothing is left connected"
    );
}

/// A peer sends a `handshake_init` and closes its connection at once, many
/// times over with fresh identities. Its request may be verified (on a task of
/// its own) only after the node has seen the connection close; such a request
/// must leave nothing behind. (It used to make session state marked as
/// connected, which nothing ever forgot: a few of them filled the session
/// table for good, and every newcomer's handshake was refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_a_connection_that_closed_leave_no_session_state() {
    const PLACES: usize = 4;
    let target = start_node_with(TCP, |c| {
        c.network.max_connections = PLACES as u32;
        c.network.new_connections_per_ip_burst = 1_000;
        c.security.max_peers = PLACES;
        c.security.challenge_timeout_secs = 1;
        c.security.handshake_timeout_secs = 1;
    })
    .await;
    let to = target.handle.entity_id();
    for i in 0..200u64 {
        let mut x = RawPeer::connect(&target.addr).await;
        let mut link = Link::new(session::Config::default(), x.entity_id(), to);
        let init = link.connect(now_ms(), handshake_random()).expect("init");
        let env = Draft {
            payload: init.encode(),
            ..x.draft(to, init.msg_type())
        }
        .sign(&x.identity);
        let node = x.target;
        x.swarm
            .behaviour_mut()
            .envelopes
            .send_request(&node, Request::Envelope(Frame::outbound(env.encode())));
        // Drive the swarm just long enough for the request to leave, then
        // close: the delays vary so that some closes overtake the verification.
        let drive = async {
            loop {
                x.swarm.select_next_some().await;
            }
        };
        _ = tokio::time::timeout(Duration::from_micros((i % 20) * 100), drive).await;
        let gone = x.entity_id();
        drop(x);
        wait_disconnected(&target.handle, gone).await;
    }
    // Every responder handshake left half done times out after 1 s; then the
    // state of those disconnected peers is forgotten.
    let mut left = metric(&target.handle, "peer_session_peers");
    for _ in 0..100 {
        if left == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The gauge is refreshed as the node's loop turns; a stats call turns it.
        target.handle.stats().await.expect("stats");
        left = metric(&target.handle, "peer_session_peers");
    }
    assert_eq!(left, 0.0, "session state left by peers that are gone");

    // A newcomer finds room for its session.
    let honest = honest_peer_of(&target).await;
    // The newcomer's message is delivered in a session.
    honest_messages(&honest.handle, to, 1).await;
}

/// One identity fills the node-wide nonce memory with its own valid pings,
/// stamped 50 s ahead (within the tolerance): most are refused `RATE_LIMITED`,
/// but each nonce was recorded before the rate check. Evicting its nonces
/// raises only that identity's floor (a single floor shared by every sender
/// would rise ahead of every honest clock), so an honest peer's next envelope
/// (here its handshake) is accepted. The capacity is lowered to make it quick.
#[tokio::test]
async fn one_identity_filling_the_nonce_memory_does_not_lock_out_an_honest_peer() {
    let target = start_node_with(TCP, |c| c.protocol.replay_capacity = 2_000).await;
    let to = target.handle.entity_id();
    let honest = honest_peer_of(&target).await;
    let mut x = RawPeer::connect(&target.addr).await;
    wait_connected(&target.handle, x.entity_id()).await;
    let frames = (0..2_100)
        .map(|_| {
            let mut d = x.draft(to, "ping");
            d.timestamp_ms = now_ms() + 50_000;
            d.sign(&x.identity).encode()
        })
        .collect();
    let limited = x
        .flood(frames, 64)
        .await
        .into_iter()
        .filter(|r| error_code(r.clone()).as_deref() == Some("RATE_LIMITED"))
        .count();
    assert!(limited > 1_900, "the attacker was rate limited ({limited})");
    // The honest peer is not locked out by another's flood.
    honest_messages(&honest.handle, to, 1).await;
}

#[tokio::test]
async fn a_misbehaving_connection_is_closed_and_its_host_cooled_down() {
    const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
    let target = start_node_with(QUIC, |c| {
        c.network.misbehaviour_limit = 4;
        c.network.misbehaviour_cooldown_secs = 600;
    })
    .await;
    let to = target.handle.entity_id();
    let honest = honest_peer_of(&target).await;
    // A QUIC peer from another host (127.0.0.2) sends garbage.
    let quic = common::quic_addr(&target).await;
    let mut raw = RawPeer::connect_from("127.0.0.2", &quic).await;
    for _ in 0..3 {
        let mut env = raw.draft(to, "message").sign(&raw.identity);
        env.signature[7] ^= 0x40;
        assert_eq!(
            raw.send(env.encode()).await.as_deref(),
            Some("INVALID_SIGNATURE")
        );
    }
    // The fourth is one too many: refused (if the answer makes it out before
    // the close), and the connection closed.
    let mut env = raw.draft(to, "message").sign(&raw.identity);
    env.signature[7] ^= 0x40;
    if let Ok(response) = raw.try_request(env.encode()).await {
        assert_eq!(error_code(response).as_deref(), Some("INVALID_SIGNATURE"));
    }
    wait_disconnected(&target.handle, raw.entity_id()).await;
    assert_eq!(
        metric(&target.handle, "peer_misbehaving_peers_closed_total"),
        1.0
    );
    // Its host is refused new connections, under any identity...
    assert!(RawPeer::try_connect_from("127.0.0.2", &quic).await.is_err());
    // ...while the honest peer, on another host, goes on.
    honest_messages(&honest.handle, to, 5).await;
    let mut other = RawPeer::connect_from("127.0.0.3", &quic).await;
    let ping = other.draft(to, "ping").sign(&other.identity).encode();
    assert_eq!(other.send(ping).await, None);
}
