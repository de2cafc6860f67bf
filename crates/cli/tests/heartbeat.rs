//! Heartbeat monitoring across real processes: three `peer run` nodes on
//! 127.0.0.1 with a 300 ms heartbeat; one is killed with SIGKILL, and the
//! other two, asked through `peer peers`, see it unreachable after three
//! missed intervals, then healthy again once it runs again with the same data
//! directory and dials them.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{peer_command, run_command, spawn_logged};

/// The heartbeat interval of these nodes.
const INTERVAL_MS: u64 = 300;
/// Time allowed for anything awaited here.
const WAIT: Duration = Duration::from_secs(30);
/// Interval between two looks at something being polled.
const POLL: Duration = Duration::from_millis(50);

/// A `peer run` child process, killed when dropped (also when the test panics).
struct Node {
    name: &'static str,
    dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Node {
    /// Starts `peer run` on `root/name` with free ports, a short heartbeat and
    /// `bootstrap` peers, and waits until its API is up.
    fn start(root: &Path, name: &'static str, bootstrap: &[String]) -> Self {
        let dir = root.join(name);
        let log = root.join(format!("{name}.stderr"));
        // A killed node leaves its api.addr behind; the new one writes its own.
        _ = std::fs::remove_file(dir.join("api.addr"));
        let mut cmd = run_command(&dir);
        cmd.env("PEER_HEARTBEAT__INTERVAL_MS", INTERVAL_MS.to_string());
        for addr in bootstrap {
            cmd.args(["--bootstrap", addr]);
        }
        let child = spawn_logged(cmd, &log);
        let mut node = Self {
            name,
            dir,
            log,
            child,
        };
        let deadline = Instant::now() + WAIT;
        while !std::fs::read_to_string(node.dir.join("api.addr")).is_ok_and(|t| t.ends_with('\n')) {
            if let Ok(Some(status)) = node.child.try_wait() {
                node.fail(&format!("exited early with {status}"));
            }
            if Instant::now() > deadline {
                node.fail("its API did not come up");
            }
            std::thread::sleep(POLL);
        }
        node
    }

    /// Fails the test with `what` and everything the node wrote to stderr.
    fn fail(&self, what: &str) -> ! {
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!(
            "node {}: {what}\n--- stderr of node {} ---\n{stderr}",
            self.name, self.name
        )
    }

    /// Runs `peer ARGS` on this node's data directory; its JSON output.
    fn cli(&self, args: &[&str]) -> Value {
        let out = peer_command(&self.dir)
            .args(args)
            .output()
            .expect("run `peer`");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            self.fail(&format!(
                "`peer {}` exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_str(&stdout).expect("JSON output")
    }

    /// Its entity id and first listen address.
    fn id_and_addr(&self) -> (String, String) {
        let status = self.cli(&["status"]);
        let id = status["entity_id"].as_str().expect("entity_id").to_owned();
        let addr = status["listen_addrs"][0].as_str().expect("addr").to_owned();
        (id, addr)
    }

    /// The `health` object of `peer` in `peer peers`, if it has one.
    fn health(&self, peer: &str) -> Option<Value> {
        let peers = self.cli(&["peers"]);
        peers
            .as_array()
            .expect("a list")
            .iter()
            .find(|p| p["entity_id"] == peer)
            .and_then(|p| p.get("health").cloned())
    }

    /// Waits until `peer`'s health here satisfies `ok`; the time it took.
    fn wait_health(&self, peer: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            let health = self.health(peer);
            if health.as_ref().is_some_and(&ok) {
                return start.elapsed();
            }
            if start.elapsed() > WAIT {
                self.fail(&format!("{peer} never became {what}; last: {health:?}"));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |h| h["state"] == state
}

#[test]
fn a_killed_node_turns_unreachable_at_every_peer_and_healthy_again_when_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = Node::start(root.path(), "a", &[]);
    let b = Node::start(root.path(), "b", &[]);
    let (_, addr_a) = a.id_and_addr();
    let (_, addr_b) = b.id_and_addr();
    let bootstrap = [addr_a, addr_b];
    let mut victim = Node::start(root.path(), "victim", &bootstrap);
    let (v, _) = victim.id_and_addr();
    for node in [&a, &b] {
        node.wait_health(&v, "answering", |h| {
            h["state"] == "healthy" && h["received"].as_u64() >= Some(1)
        });
    }
    // SIGKILL: no goodbye; the kernel closes its sockets.
    victim.child.kill().expect("SIGKILL");
    victim.child.wait().expect("reaped");
    let killed = Instant::now();
    for node in [&a, &b] {
        node.wait_health(&v, "unreachable", state_is("unreachable"));
    }
    let took = killed.elapsed();
    // Three intervals missed, the first of which may end just after the kill.
    assert!(
        took >= Duration::from_millis(2 * INTERVAL_MS),
        "unreachable after {took:?}"
    );
    for node in [&a, &b] {
        let h = node.health(&v).expect("still tracked");
        assert!(h["missed"].as_u64() >= Some(3), "{h}");
        assert!(h["rtt_ms"].is_u64(), "the last round trip is kept: {h}");
    }
    // Back, from the same data directory (same identity), dialing both.
    drop(victim);
    let _victim = Node::start(root.path(), "victim", &bootstrap);
    for node in [&a, &b] {
        node.wait_health(&v, "healthy again", |h| {
            h["state"] == "healthy" && h["missed"] == 0
        });
    }
}
