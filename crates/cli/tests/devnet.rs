//! `peer devnet 3`: three `peer run` processes on 127.0.0.1 under one folder,
//! node0 the bootstrap the others dial; each node's API is where the CLI finds
//! it; Ctrl-C (SIGINT to the process group, as a terminal sends it) stops them
//! all, each shutting down by itself.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::peer_command;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_devnet_starts_connected_nodes_the_cli_reaches_and_stops_on_ctrl_c() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("net");
    let mut devnet = peer_command(root.path())
        .args(["devnet", "3", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, as a shell job has: Ctrl-C reaches them all.
        .process_group(0)
        .spawn()
        .expect("spawn `peer devnet`");
    let mut lines = BufReader::new(devnet.stdout.take().expect("stdout")).lines();
    let mut printed = Vec::new();
    loop {
        let line = lines
            .next()
            .expect("devnet printed its summary")
            .expect("a line");
        let done = line.starts_with("devnet of 3 nodes in ");
        printed.push(line);
        if done {
            break;
        }
    }
    for (i, line) in printed.iter().take(3).enumerate() {
        assert!(
            line.starts_with(&format!("node{i}  entity ")),
            "{printed:?}"
        );
    }

    // The CLI finds each node's API in its data directory; both others dialled node0.
    let node0 = dir.join("node0");
    let deadline = Instant::now() + WAIT;
    loop {
        let out = peer_command(&node0)
            .arg("peers")
            .output()
            .expect("peer peers");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let peers: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let connected = peers
            .as_array()
            .map_or(0, |ps| ps.iter().filter(|p| p["connected"] == true).count());
        if connected == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node0 never had 2 peers: {peers}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 1..3 {
        let out = peer_command(&dir.join(format!("node{i}")))
            .arg("status")
            .output()
            .expect("peer status");
        assert!(out.status.success(), "node{i}");
    }

    // Ctrl-C: SIGINT to the whole group.
    let group = format!("-{}", devnet.id());
    let sent = std::process::Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = devnet.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "devnet did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("stopping the devnet")),
        "{rest:?}"
    );
    // Each node stopped by itself: a node removes its api.addr as it shuts down.
    for i in 0..3 {
        let addr = dir.join(format!("node{i}")).join("api.addr");
        assert!(!addr.exists(), "node{i} was killed, not stopped");
    }
}
