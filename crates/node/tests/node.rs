//! Real nodes on 127.0.0.1: QUIC transport, and what happens at the bounds an
//! API user can hit.

use std::time::Duration;

use peer_node::NodeError;
use peer_node::node::Event;
use tokio::sync::broadcast::error::RecvError;

mod common;
use common::{pair, start_node_with};

/// Sends every payload from `from` to `to` at once; the answers in order.
async fn send_all(
    from: &peer_node::NodeHandle,
    to: peer_core::EntityId,
    payloads: impl Iterator<Item = Vec<u8>>,
) -> Vec<Result<peer_node::node::Delivered, NodeError>> {
    let tasks: Vec<_> = payloads
        .map(|p| {
            let h = from.clone();
            tokio::spawn(async move { h.send(to, "message".parse().expect("type"), p).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

fn message(n: u64) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}

#[tokio::test]
async fn messages_cross_over_quic() {
    let (a, b) = pair("/ip4/127.0.0.1/udp/0/quic-v1", |_| {}).await;
    assert!(a.handle.peers().await.expect("peers")[0].addrs[0].contains("quic-v1"));
    let mut events = b.handle.subscribe();
    let to = b.handle.entity_id();
    a.handle
        .send(to, "message".parse().expect("type"), message(1))
        .await
        .expect("send");
    let pong = a
        .handle
        .send(to, "ping".parse().expect("type"), message(2))
        .await
        .expect("ping");
    assert_eq!(pong.reply.expect("reply").msg_type, "pong");
    loop {
        match events.recv().await.expect("event") {
            Event::Message { from, payload, .. } => {
                assert_eq!(from, a.handle.entity_id());
                assert_eq!(payload.to_value()["n"], 1);
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_slow_event_reader_is_told_how_many_it_missed() {
    let (a, b) = pair("/ip4/127.0.0.1/tcp/0", |c| c.api.event_buffer = 4).await;
    let mut slow = b.handle.subscribe();
    let to = b.handle.entity_id();
    for n in 0..10 {
        a.handle
            .send(to, "message".parse().expect("type"), message(n))
            .await
            .expect("send");
    }
    // 10 messages into a buffer of 4: the reader lost the oldest events (6
    // messages, and the peer_connected event if it came after subscribing) and is
    // told so, then reads the newest 4 in order. Delivery was not affected.
    match slow.recv().await {
        Err(RecvError::Lagged(missed)) => assert!((6..=7).contains(&missed), "missed {missed}"),
        other => panic!("expected a lag, got {other:?}"),
    }
    for n in 6..10 {
        match slow.recv().await.expect("event") {
            Event::Message { payload, .. } => assert_eq!(payload.to_value()["n"], n),
            other => panic!("unexpected {other:?}"),
        }
    }
    let stats = b.handle.stats().await.expect("stats");
    assert_eq!(stats.peers[&a.handle.entity_id().to_string()].received, 10);
}

#[tokio::test]
async fn sends_beyond_the_in_flight_bound_are_refused_not_queued() {
    let (a, b) = pair("/ip4/127.0.0.1/tcp/0", |c| {
        c.network.max_outbound_in_flight = 2
    })
    .await;
    let to = b.handle.entity_id();
    let mut ok = 0;
    let mut busy = 0;
    for answer in send_all(&a.handle, to, (0..20).map(message)).await {
        match answer {
            Ok(_) => ok += 1,
            Err(NodeError::Busy(2)) => busy += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok + busy, 20);
    assert!(ok >= 2 && busy >= 1, "ok={ok} busy={busy}");
    // Once the burst is over, sending works again.
    a.handle
        .send(to, "message".parse().expect("type"), message(99))
        .await
        .expect("after");
}

#[tokio::test]
async fn sends_beyond_the_outbound_byte_bound_are_refused_before_they_are_signed() {
    const KB30: usize = 30 * 1024;
    // Room for 70 KB of payloads in flight: two 30 KB messages, not three.
    let (a, b) = pair("/ip4/127.0.0.1/tcp/0", |c| {
        c.protocol.max_envelope_size = 64 * 1024;
        c.network.max_inbound_bytes_per_connection = 64 * 1024;
        c.network.max_connections_per_ip = 2;
        c.network.max_outbound_bytes = 70 * 1024;
    })
    .await;
    let to = b.handle.entity_id();
    let big = |n: u64| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(KB30)).into_bytes();
    let signed = common::metric(&a.handle, "peer_envelopes_signed_total");
    let (mut ok, mut busy) = (0, 0);
    for answer in send_all(&a.handle, to, (0..10).map(big)).await {
        match answer {
            Ok(_) => ok += 1,
            Err(NodeError::Busy(_)) => busy += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok + busy, 10);
    assert!(ok >= 2 && busy >= 1, "ok={ok} busy={busy}");
    // Refused sends were never signed: the handshake and the accepted ones were.
    let signed = common::metric(&a.handle, "peer_envelopes_signed_total") - signed;
    assert!(signed <= f64::from(ok + 3), "signed {signed} for {ok} sent");
    a.handle
        .send(to, "message".parse().expect("type"), big(99))
        .await
        .expect("room again once the burst is answered");
}

#[tokio::test]
async fn dials_beyond_the_pending_bound_are_refused_at_once() {
    // A listener that accepts TCP and never answers the Noise handshake: a
    // dial to it stays pending until the connection timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let a = start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.network.max_pending_dials = 1;
        c.network.connection_timeout_secs = 2;
    })
    .await;
    let addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
    let pending = {
        let h = a.handle.clone();
        let addr = addr.clone();
        tokio::spawn(async move { h.connect(addr).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tokio::time::timeout(Duration::from_secs(1), a.handle.connect(addr.clone()))
        .await
        .expect("refused at once, not after the timeout");
    assert_eq!(refused, Err(NodeError::Busy(1)));
    let first = pending.await.expect("task");
    assert!(matches!(first, Err(NodeError::Dial(_))), "{first:?}");
    // With the first dial over, there is room for another.
    let again = a.handle.connect(addr).await;
    assert!(matches!(again, Err(NodeError::Dial(_))), "{again:?}");
    drop(silent);
}

#[tokio::test]
async fn sending_to_an_unconnected_entity_says_so() {
    let a = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    let stranger = peer_core::Identity::from_secret(&[5; 32]).entity_id();
    let err = a
        .handle
        .send(stranger, "message".parse().expect("type"), message(0))
        .await;
    assert_eq!(err, Err(NodeError::NotConnected(stranger)));
}

#[tokio::test]
async fn a_dial_to_nowhere_fails_with_a_reason() {
    let a = start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.network.connection_timeout_secs = 2
    })
    .await;
    // Port 1 on loopback: nothing listens there.
    let err = a
        .handle
        .connect("/ip4/127.0.0.1/tcp/1".parse().expect("addr"))
        .await;
    assert!(matches!(err, Err(NodeError::Dial(_))), "{err:?}");
    tokio::time::timeout(Duration::from_secs(5), a.handle.peers())
        .await
        .expect("node still answers")
        .expect("peers");
}

#[tokio::test]
async fn sends_beyond_the_stream_limit_wait_their_turn() {
    let (a, b) = pair("/ip4/127.0.0.1/tcp/0", |c| {
        c.network.max_concurrent_streams = 2
    })
    .await;
    let to = b.handle.entity_id();
    for answer in send_all(&a.handle, to, (0..50).map(message)).await {
        answer.expect("every send is delivered");
    }
    let stats = b.handle.stats().await.expect("stats");
    assert_eq!(stats.peers[&a.handle.entity_id().to_string()].received, 50);
}

#[tokio::test]
async fn large_messages_beyond_the_inbound_budget_wait_for_room() {
    const SIZE: usize = 60 * 1024;
    // Room for one large message at a time from the sender's connection (its
    // share), two on the receiver.
    let tune = |c: &mut peer_node::Config| {
        c.protocol.max_envelope_size = 64 * 1024;
        c.network.max_inbound_bytes_per_connection = 64 * 1024;
        c.network.max_inbound_buffer_bytes = 128 * 1024;
        c.network.max_connections_per_ip = 1;
    };
    let (a, b) = pair("/ip4/127.0.0.1/tcp/0", tune).await;
    let to = b.handle.entity_id();
    let big =
        (0..8).map(|n| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(SIZE)).into_bytes());
    for answer in send_all(&a.handle, to, big).await {
        answer.expect("delivered once there is room");
    }
    let stats = b.handle.stats().await.expect("stats");
    assert_eq!(stats.peers[&a.handle.entity_id().to_string()].received, 8);
}

#[tokio::test]
async fn a_flooding_peer_is_rate_limited_while_another_keeps_flowing() {
    let target = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    let flooder = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    let honest = start_node_with("/ip4/127.0.0.1/tcp/0", |_| {}).await;
    flooder
        .handle
        .connect(target.addr.clone())
        .await
        .expect("connect");
    honest
        .handle
        .connect(target.addr.clone())
        .await
        .expect("connect");
    let to = target.handle.entity_id();
    // The task class allows a burst of 60 then 30 a minute: 100 at once overflow it.
    let (flood, calm) = tokio::join!(
        send_all(&flooder.handle, to, (0..100).map(message)),
        send_all(&honest.handle, to, (0..10).map(message)),
    );
    let mut limited = 0;
    for answer in flood {
        match answer {
            Ok(_) => {}
            Err(NodeError::Rejected {
                code,
                retry_after_ms,
                reason,
                ..
            }) => {
                assert_eq!(code, "RATE_LIMITED", "{reason}");
                assert!(
                    retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 2_000),
                    "{retry_after_ms:?}"
                );
                limited += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!((35..=40).contains(&limited), "limited {limited}");
    for answer in calm {
        answer.expect("the other peer's messages all arrive");
    }
    let stats = target.handle.stats().await.expect("stats");
    let f = &stats.peers[&flooder.handle.entity_id().to_string()];
    assert_eq!(f.rejected.get("RATE_LIMITED"), Some(&limited));
    assert_eq!(
        stats.peers[&honest.handle.entity_id().to_string()].received,
        10
    );
}
