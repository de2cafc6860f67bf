//! Heartbeat monitoring between real nodes in this process: health and round
//! trips in the peer list and the metrics, a node that goes away turning
//! degraded then unreachable and healthy again once back, `wake_up` answered
//! with `wake_up_ack`, `status_report` kept and delivered.

mod common;

use std::time::Duration;

use common::{TestNode, metric, start_node_in, start_node_with, wait_connected};
use peer_core::EntityId;
use peer_node::NodeError;
use peer_node::node::{Event, NodeHandle, PeerView};
use peer_node::services::heartbeat::{Health, HealthView};
use serde_json::json;
use tokio::sync::broadcast;

const LISTEN: &str = "/ip4/127.0.0.1/tcp/0";
/// The heartbeat interval of these tests.
const INTERVAL_MS: u64 = 200;

fn tune(c: &mut peer_node::Config) {
    c.heartbeat.interval_ms = INTERVAL_MS;
}

/// `peer` as `node` lists it.
async fn peer_of(node: &NodeHandle, peer: EntityId) -> Option<PeerView> {
    let peers = node.peers().await.expect("peers");
    peers.into_iter().find(|p| p.entity_id == peer)
}

/// Waits (at most 10 s) until `node` shows `peer`'s health matching `ok`.
async fn wait_health(
    node: &NodeHandle,
    peer: EntityId,
    what: &str,
    ok: impl Fn(&HealthView) -> bool,
) -> HealthView {
    for _ in 0..1000 {
        if let Some(h) = peer_of(node, peer).await.and_then(|p| p.health)
            && ok(&h)
        {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = peer_of(node, peer).await.and_then(|p| p.health);
    panic!("{peer} never became {what}; last: {last:?}")
}

/// The next `peer_health` event about `peer`.
async fn next_health(events: &mut broadcast::Receiver<Event>, peer: EntityId) -> Health {
    let wait = async {
        loop {
            match events.recv().await.expect("events") {
                Event::PeerHealth { entity_id, state } if entity_id == peer => return state,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a peer_health event")
}

#[tokio::test]
async fn connected_peers_are_beaten_and_show_health_round_trips_and_metrics() {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, ida).await;
    // Both ends beat each other.
    for (node, peer) in [(&a.handle, idb), (&b.handle, ida)] {
        let h = wait_health(node, peer, "answered twice", |h| h.received >= 2).await;
        assert_eq!(h.state, Health::Healthy);
        assert!(h.rtt_ms.is_some_and(|r| r < 2_000), "{h:?}");
        assert!(h.last_seen_ms.is_some());
        assert_eq!(h.missed, 0);
    }
    // The peer list's JSON carries the health object.
    let view = peer_of(&a.handle, idb).await.expect("listed");
    let v = serde_json::to_value(&view).expect("json");
    assert_eq!(v["health"]["state"], "healthy", "{v}");
    for key in ["rtt_ms", "sent", "received", "failed", "last_seen_ms"] {
        assert!(v["health"].get(key).is_some(), "{key} in {v}");
    }
    assert!(metric(&a.handle, "peer_heartbeats_sent_total") >= 2.0);
    assert!(metric(&a.handle, "peer_heartbeats_received_total") >= 2.0);
    assert!(metric(&a.handle, "peer_heartbeat_rtt_seconds_count") >= 2.0);
    assert_eq!(
        metric(&a.handle, "peer_peers_by_health{state=\"healthy\"}"),
        1.0
    );
    assert_eq!(metric(&a.handle, "peer_heartbeats_failed_total"), 0.0);
}

#[tokio::test]
async fn a_node_that_goes_away_turns_unreachable_and_healthy_again_when_back() {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let idb = b.handle.entity_id();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_health(&a.handle, idb, "answering", |h| h.received >= 1).await;
    let mut events = a.handle.subscribe();
    // B stops at once: its last handle goes, and its swarm and connections with it.
    let TestNode { handle, dir, .. } = b;
    drop(handle);
    let gone = std::time::Instant::now();
    assert_eq!(next_health(&mut events, idb).await, Health::Degraded);
    assert_eq!(next_health(&mut events, idb).await, Health::Unreachable);
    let took = gone.elapsed();
    // Three intervals missed: the first may end just after B went.
    assert!(
        took >= Duration::from_millis(2 * INTERVAL_MS),
        "unreachable after {took:?}"
    );
    let h = peer_of(&a.handle, idb)
        .await
        .and_then(|p| p.health)
        .expect("still tracked");
    assert_eq!((h.state, h.missed), (Health::Unreachable, 3));
    assert_eq!(
        metric(&a.handle, "peer_peers_by_health{state=\"unreachable\"}"),
        1.0
    );
    // Back, with the same identity: healthy once it answers.
    let b = start_node_in(dir, LISTEN, tune, |builder| builder).await;
    assert_eq!(b.handle.entity_id(), idb);
    a.handle.connect(b.addr.clone()).await.expect("reconnect");
    assert_eq!(next_health(&mut events, idb).await, Health::Healthy);
    let h = wait_health(&a.handle, idb, "healthy", |h| h.state == Health::Healthy).await;
    assert_eq!(h.missed, 0);
}

#[tokio::test]
async fn wake_up_is_answered_with_wake_up_ack_and_delivered_to_the_agent() {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, ida).await;
    let mut events = b.handle.subscribe();
    let sent = a
        .handle
        .send(
            idb,
            "wake_up".parse().expect("type"),
            &br#"{"why":"task"}"#[..],
        )
        .await
        .expect("answered");
    let reply = sent.reply.expect("a reply");
    assert_eq!(reply.msg_type, "wake_up_ack");
    let p = reply.payload;
    assert_eq!(p["entity_id"], json!(idb), "{p}");
    assert_eq!(p["connected_peers"], 1, "{p}");
    assert!(p["uptime_ms"].as_u64().is_some(), "{p}");
    for key in ["healthy", "degraded", "unreachable"] {
        assert!(p["health"][key].as_u64().is_some(), "{key} in {p}");
    }
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("delivered")
        .expect("event");
    match event {
        Event::Message {
            from,
            msg_type,
            payload,
            ..
        } => {
            assert_eq!((from, msg_type.as_str()), (ida, "wake_up"));
            assert_eq!(payload.to_value(), json!({"why": "task"}));
        }
        other => panic!("expected the wake_up, got {other:?}"),
    }
}

#[tokio::test]
async fn a_status_report_is_kept_as_the_peers_last_status_and_delivered() {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, |c| {
        tune(c);
        c.heartbeat.max_status_bytes = 64;
    })
    .await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, ida).await;
    let mut events = b.handle.subscribe();
    let report = "status_report".parse().expect("type");
    let sent = a
        .handle
        .send(idb, report, &br#"{"load":0.25,"busy":false}"#[..])
        .await
        .expect("accepted");
    assert!(sent.reply.is_none());
    let h = peer_of(&b.handle, ida)
        .await
        .and_then(|p| p.health)
        .expect("tracked");
    let status = h.status_report.expect("kept");
    assert_eq!(
        status.payload.to_value(),
        json!({"load": 0.25, "busy": false})
    );
    assert!(status.received_ms > 0);
    match events.recv().await.expect("event") {
        Event::Message { msg_type, .. } => assert_eq!(msg_type, "status_report"),
        other => panic!("expected the status_report, got {other:?}"),
    }
    // Over heartbeat.max_status_bytes: refused, the last status kept.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64));
    let err = a
        .handle
        .send(
            idb,
            "status_report".parse().expect("type"),
            big.into_bytes(),
        )
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, NodeError::Rejected { code, .. } if code == "MESSAGE_TOO_LARGE"),
        "{err}"
    );
    // Nested too deep: refused before it is sent.
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let err = a
        .handle
        .send(
            idb,
            "status_report".parse().expect("type"),
            deep.into_bytes(),
        )
        .await
        .expect_err("too deep");
    assert!(matches!(err, NodeError::Invalid(_)), "{err}");
    let h = peer_of(&b.handle, ida)
        .await
        .and_then(|p| p.health)
        .expect("tracked");
    assert_eq!(
        h.status_report.expect("kept").payload.to_value()["load"],
        0.25
    );
}
