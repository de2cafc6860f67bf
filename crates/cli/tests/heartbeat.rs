//! Heartbeat monitoring across real processes: three `peer run` nodes on
//! 127.0.0.1 with a 300 ms heartbeat; one is killed with SIGKILL, and the
//! other two, asked through `peer peers`, see it unreachable after three
//! missed intervals, then healthy again once it runs again with the same data
//! directory and dials them.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::Node;

/// The heartbeat interval of these nodes.
const INTERVAL_MS: u64 = 300;
/// Time allowed for anything awaited here.
const WAIT: Duration = Duration::from_secs(30);
/// Interval between two looks at something being polled.
const POLL: Duration = Duration::from_millis(50);

/// Starts `peer run` on `root/name` with a short heartbeat, dialing
/// `bootstrap`.
fn start(root: &Path, name: &'static str, bootstrap: &[String]) -> Node {
    Node::start(root, name, |cmd| {
        cmd.env("PEER_HEARTBEAT__INTERVAL_MS", INTERVAL_MS.to_string());
        for addr in bootstrap {
            cmd.args(["--bootstrap", addr]);
        }
    })
}

/// The `health` object of `peer` in `peer peers` on `node`, if it has one.
fn health(node: &Node, peer: &str) -> Option<Value> {
    let peers = node.cli(&["peers"]);
    peers
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["entity_id"] == peer)
        .and_then(|p| p.get("health").cloned())
}

/// Waits until `peer`'s health on `node` satisfies `ok`; the time it took.
fn wait_health(node: &Node, peer: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let health = health(node, peer);
        if health.as_ref().is_some_and(&ok) {
            return start.elapsed();
        }
        if start.elapsed() > WAIT {
            node.fail(&format!("{peer} never became {what}; last: {health:?}"));
        }
        std::thread::sleep(POLL);
    }
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |h| h["state"] == state
}

#[test]
fn a_killed_node_turns_unreachable_at_every_peer_and_healthy_again_when_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = start(root.path(), "a", &[]);
    let b = start(root.path(), "b", &[]);
    let (_, addr_a) = a.id_and_addr();
    let (_, addr_b) = b.id_and_addr();
    let bootstrap = [addr_a, addr_b];
    let mut victim = start(root.path(), "victim", &bootstrap);
    let (v, _) = victim.id_and_addr();
    for node in [&a, &b] {
        wait_health(node, &v, "answering", |h| {
            h["state"] == "healthy" && h["received"].as_u64() >= Some(1)
        });
    }
    // SIGKILL: no goodbye; the kernel closes its sockets.
    victim.kill();
    let killed = Instant::now();
    for node in [&a, &b] {
        wait_health(node, &v, "unreachable", state_is("unreachable"));
    }
    let took = killed.elapsed();
    // Three intervals missed, the first of which may end just after the kill.
    assert!(
        took >= Duration::from_millis(2 * INTERVAL_MS),
        "unreachable after {took:?}"
    );
    for node in [&a, &b] {
        let h = health(node, &v).expect("still tracked");
        assert!(h["missed"].as_u64() >= Some(3), "{h}");
        assert!(h["rtt_ms"].is_u64(), "the last round trip is kept: {h}");
    }
    // Back, from the same data directory (same identity), dialing both.
    drop(victim);
    let _victim = start(root.path(), "victim", &bootstrap);
    for node in [&a, &b] {
        wait_health(node, &v, "healthy again", |h| {
            h["state"] == "healthy" && h["missed"] == 0
        });
    }
}
