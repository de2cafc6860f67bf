//! mDNS on a LAN: two `peer run` processes on two hosts, network namespaces
//! joined by a veth pair that the test creates (it needs root and `ip`),
//! find each other with no bootstrap address; with `--no-mdns` they do not.
//!
//! Host A is this test's own namespace (its end of the veth pair), host B a
//! namespace of its own; B's API listens on B's veth address, so the test
//! reaches both APIs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Api, Node, peer_command, without_peer_variables};

/// Time allowed for the two nodes to find each other.
const FIND: Duration = Duration::from_secs(20);
/// How long two nodes without mDNS are watched for finding each other anyway.
const QUIET: Duration = Duration::from_secs(4);

/// Runs `ip ARGS`; panics with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (this test needs iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (this test needs root for network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A second host: a network namespace with one end of a veth pair, the other
/// end in this namespace; both removed when dropped.
struct Lan {
    ns: String,
    host_if: String,
    subnet: u8,
}

impl Lan {
    /// Host A is 10.77.`subnet`.1, host B 10.77.`subnet`.2.
    fn new(subnet: u8) -> Self {
        let tag = format!("{}{subnet}", std::process::id() % 100_000);
        let lan = Self {
            ns: format!("pp-lan-{tag}"),
            host_if: format!("ppa{tag}"),
            subnet,
        };
        let peer_if = format!("ppb{tag}");
        ip(&["netns", "add", &lan.ns]);
        ip(&[
            "link",
            "add",
            &lan.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &lan.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lan.a()),
            "dev",
            &lan.host_if,
        ]);
        ip(&["link", "set", &lan.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &lan.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{}/24", lan.b()), "dev", &peer_if]);
        inside(&["link", "set", &peer_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        lan
    }

    fn a(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    fn b(&self) -> String {
        format!("10.77.{}.2", self.subnet)
    }

    /// `peer run` on host A (this namespace), listening on its LAN address.
    fn run_a(&self, dir: &Path, mdns: bool) -> Command {
        let mut cmd = peer_command(dir);
        cmd.args(run_args(&self.a(), "127.0.0.1:0", mdns));
        cmd
    }

    /// `peer run` on host B, listening and serving its API on its LAN address.
    fn run_b(&self, dir: &Path, mdns: bool) -> Command {
        let mut cmd = Command::new("ip");
        without_peer_variables(&mut cmd);
        cmd.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_peer")])
            .arg("--data-dir")
            .arg(dir)
            .args(run_args(&self.b(), &format!("{}:0", self.b()), mdns));
        cmd
    }
}

/// The arguments of `peer run` listening on `host`, its API on `api`.
fn run_args(host: &str, api: &str, mdns: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--listen",
        &format!("/ip4/{host}/tcp/0"),
        "--api",
        api,
    ]
    .map(String::from)
    .to_vec();
    if !mdns {
        args.push("--no-mdns".into());
    }
    args
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair.
        _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Whether `from` lists `peer` as connected.
fn sees(from: &Node, peer: &str) -> bool {
    let peers = Api::new(from).get("/v1/peers");
    peers
        .as_array()
        .expect("a list")
        .iter()
        .any(|p| p["entity_id"] == peer && p["connected"] == true)
}

#[test]
fn nodes_on_one_lan_find_each_other_with_mdns_and_not_without() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lan = Lan::new(1);
    let a = Node::start_command(tmp.path(), "a", lan.run_a(&tmp.path().join("a"), true));
    let b = Node::start_command(tmp.path(), "b", lan.run_b(&tmp.path().join("b"), true));
    let (ida, _) = a.id_and_addr();
    let (idb, _) = b.id_and_addr();
    let started = Instant::now();
    while !(sees(&a, &idb) && sees(&b, &ida)) {
        if started.elapsed() > FIND {
            a.fail(&format!(
                "a and b did not find each other with mDNS within {FIND:?}\n--- b ---\n{}",
                b.stderr()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Found through mDNS, and verified once its record is published.
    loop {
        let found = Api::new(&b).get(&format!("/v1/peers/{ida}"));
        let sources = found["sources"].as_array().expect("sources");
        assert!(sources.iter().any(|s| s == "mdns"), "{found}");
        if found["verified"] == true {
            break;
        }
        assert!(
            started.elapsed() < FIND,
            "a's record never verified: {found}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((a, b));

    // The same two hosts, new nodes, mDNS off: they stay strangers.
    let a = Node::start_command(tmp.path(), "c", lan.run_a(&tmp.path().join("c"), false));
    let b = Node::start_command(tmp.path(), "d", lan.run_b(&tmp.path().join("d"), false));
    let (ida, _) = a.id_and_addr();
    let (idb, _) = b.id_and_addr();
    let watched = Instant::now();
    while watched.elapsed() < QUIET {
        assert!(!sees(&a, &idb) && !sees(&b, &ida), "found without mDNS");
        std::thread::sleep(Duration::from_millis(200));
    }
}
