//! The `peer` process as a service manager and a shell pipeline see it: SIGTERM
//! stops `peer run` gracefully, and a closed standard output is not an error.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{peer_command, spawn_run};

/// Time allowed for a node to write `api.addr`.
const STARTUP: Duration = Duration::from_secs(30);
/// Time allowed for a node to stop after a signal.
const STOP: Duration = Duration::from_secs(15);
/// Interval between two looks at something being polled.
const POLL: Duration = Duration::from_millis(25);

/// Runs `peer <args>` with its standard output on a pipe whose reading end is
/// already closed, as after `peer … | head -0`: every write fails with EPIPE.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    peer_command(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run peer")
}

fn assert_quiet_success(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(!stderr.contains("error"), "{what}: {stderr}");
}

/// A `peer run` child process, killed when dropped (also when the test panics).
struct Node {
    child: Child,
    log: std::path::PathBuf,
}

impl Node {
    fn spawn(dir: &Path, log: &Path) -> Self {
        let child = spawn_run(dir, log);
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("{what}\n--- stderr of `peer run` ---\n{stderr}")
    }

    /// Waits (bounded by [`STARTUP`]) until `api.addr` is written in full.
    fn wait_for_api_addr(&mut self, addr_file: &Path) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("exited early with {status}"));
            }
            // The file is written in one go; the newline shows it is complete.
            if std::fs::read_to_string(addr_file).is_ok_and(|t| t.ends_with('\n')) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {} after {STARTUP:?}", addr_file.display()));
            }
            std::thread::sleep(POLL);
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {name}: {status}");
    }

    /// Waits (bounded by [`STOP`]) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STOP;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => self.fail(&format!("still running {STOP:?} after the signal")),
                Err(e) => self.fail(&format!("wait: {e}")),
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

/// Starts a node, runs `check` while it is up, then stops it with `signal`
/// and checks it exited 0 and removed `api.addr`.
fn stops_gracefully_on(signal: &str, check: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    let addr_file = dir.join("api.addr");
    let mut node = Node::spawn(&dir, &tmp.path().join("node.stderr"));
    node.wait_for_api_addr(&addr_file);
    check(&dir);
    node.signal(signal);
    let status = node.wait();
    if !status.success() {
        node.fail(&format!("exited with {status} after {signal}"));
    }
    if addr_file.exists() {
        node.fail(&format!(
            "{} is left behind after {signal}",
            addr_file.display()
        ));
    }
}

#[test]
fn sigterm_stops_the_node_gracefully() {
    stops_gracefully_on("-TERM", |dir| {
        // A client whose reader went away ends quietly, not with a panic.
        let out = with_closed_stdout(dir, &["peers"]);
        assert_quiet_success(&out, "peer peers | (closed)");
        let out = with_closed_stdout(dir, &["status"]);
        assert_quiet_success(&out, "peer status | (closed)");
    });
}

#[test]
fn sigint_stops_the_node_gracefully() {
    stops_gracefully_on("-INT", |_| {});
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    for args in [&["init"][..], &["init"], &["id"], &["config", "show"]] {
        let out = with_closed_stdout(&dir, args);
        assert_quiet_success(&out, &format!("peer {} | (closed)", args.join(" ")));
    }
    // The commands did their work all the same.
    assert!(dir.join("identity.key").exists());
    let out = peer_command(&dir).arg("id").output().expect("run peer id");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("entity id: "));
}

#[test]
fn other_errors_still_fail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No node runs: `peer peers` fails even though its stdout is closed.
    let out = with_closed_stdout(tmp.path(), &["peers"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
