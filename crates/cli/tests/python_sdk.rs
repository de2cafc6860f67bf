//! The Python SDK (`sdk/python`) against real `peer run` processes: its unittest
//! suite, and the example agent in `examples/python`.
//!
//! Needs `python3` (3.9 or later) on `PATH`, or its path in `PEER_TEST_PYTHON`;
//! without it these tests fail (they do not skip). The SDK uses only the standard
//! library, so nothing is installed.
//!
//! The SDK's integration tests are grouped by node feature, one Python module each
//! (`sdk/python/tests/test_node_<feature>.py`); [`NODE_FEATURES`] lists them, and
//! each must have a passing test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Api, Node, connect};

/// Node features whose SDK tests run in `cargo test` (see the module doc).
const NODE_FEATURES: &[&str] = &[
    "health",
    "peers",
    "messages",
    "events",
    "inbox",
    "cards",
    "heartbeat",
    "tasks",
];

/// Time allowed for one step (a request, a line from the example agent).
const STEP: Duration = Duration::from_secs(15);
/// Time allowed for the whole Python suite.
const SUITE: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(25);

/// The repository root (the SDK and the examples live there).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// A `python3` command, checked to exist and to be 3.9 or later.
fn python() -> Command {
    let exe = std::env::var("PEER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(&exe)
        .args([
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2]); sys.exit(0 if sys.version_info >= (3, 9) else 1)",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{exe}` ({e}): the Python SDK tests need python3 3.9 or later on PATH \
                 (or its path in PEER_TEST_PYTHON)"
            )
        });
    assert!(
        out.status.success(),
        "`{exe}` is Python {}; the Python SDK needs 3.9 or later",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let mut cmd = Command::new(exe);
    cmd.current_dir(repo_root())
        .env("PYTHONPATH", repo_root().join("sdk/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

/// A started node and its entity id.
struct Started {
    node: Node,
    entity_id: String,
}

impl Started {
    fn new(root: &Path, name: &'static str) -> Self {
        let node = Node::start(root, name, |_| {});
        let (entity_id, _) = node.id_and_addr();
        Self { node, entity_id }
    }
}

/// Two nodes, A and B, in a temporary directory, A connected to B and B
/// aware of it.
fn two_nodes() -> (tempfile::TempDir, Started, Started) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let a = Started::new(tmp.path(), "a");
    let b = Started::new(tmp.path(), "b");
    let (_, b_addr) = b.node.id_and_addr();
    connect(&Api::new(&a.node), &b_addr, &b.entity_id);
    let b_api = Api::new(&b.node);
    let deadline = Instant::now() + STEP;
    loop {
        let peers = b_api.get("/v1/peers");
        let listed = peers.as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["entity_id"] == a.entity_id.as_str() && p["connected"] == true)
        });
        if listed {
            break;
        }
        if Instant::now() > deadline {
            b.node
                .fail(&format!("a never showed as connected: {peers}"));
        }
        std::thread::sleep(POLL);
    }
    (tmp, a, b)
}

/// Runs the SDK's unittest suite with `features` enabled against A and B; fails
/// with the suite's output if it fails.
fn run_suite(features: &[&str], tmp: &Path, a: &Started, b: &Started) -> String {
    let out_path = tmp.join("python.out");
    let out = std::fs::File::create(&out_path).expect("create the output file");
    let err = out.try_clone().expect("clone the output file");
    let mut child = python()
        .args(["-m", "unittest", "discover", "-v"])
        .args(["-s", "sdk/python/tests", "-t", "sdk/python/tests"])
        .env("PEER_TEST_DATA_DIR_A", &a.node.dir)
        .env("PEER_TEST_DATA_DIR_B", &b.node.dir)
        .env("PEER_TEST_FEATURES", features.join(","))
        .env("PEER_TEST_REQUIRE_NODE", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn python3");
    let deadline = Instant::now() + SUITE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for python3") {
            break status;
        }
        if Instant::now() > deadline {
            _ = child.kill();
            _ = child.wait();
            let output = std::fs::read_to_string(&out_path).unwrap_or_default();
            panic!("the Python SDK tests did not finish within {SUITE:?}\n{output}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "the Python SDK tests failed ({status}) with features {features:?}\n\
         --- python output ---\n{output}\n--- stderr of node a ---\n{}\n--- stderr of node b ---\n{}",
        a.node.stderr(),
        b.node.stderr(),
    );
    output
}

#[test]
fn python_sdk_tests_pass_against_two_nodes() {
    let (tmp, a, b) = two_nodes();
    let output = run_suite(NODE_FEATURES, tmp.path(), &a, &b);
    // Every enabled feature's module ran (was not skipped).
    for feature in NODE_FEATURES {
        let module = format!("(test_node_{feature}.");
        assert!(
            output
                .lines()
                .any(|l| l.contains(&module) && l.ends_with("ok")),
            "no passing test of test_node_{feature}.py:\n{output}"
        );
    }
    eprintln!("{output}");
}

/// The example agent's standard output, line by line, killed when dropped.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Script {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the example");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `want`.
    fn expect_line(&mut self, want: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(want) {
                        return line;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "the example agent printed no line with {want:?} within {STEP:?} \
                         (exit status: {status:?}); its output:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

/// Runs `examples/python/delegate.py` from A; answers its exit code and stdout.
fn delegate(a: &Started, to: &Started, skill: &str, input: &Value) -> (i32, String) {
    let out = python()
        .arg("examples/python/delegate.py")
        .arg("--data-dir")
        .arg(&a.node.dir)
        .args(["--to", &to.entity_id, "--skill", skill])
        .args(["--input", &input.to_string(), "--timeout", "15"])
        .output()
        .expect("run delegate.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("delegate.py {skill}: {stdout}{stderr}");
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn python_example_agent_serves_on_a_real_node() {
    let (_tmp, a, b) = two_nodes();
    let mut agent = {
        let mut cmd = python();
        cmd.arg("examples/python/summarise_agent.py")
            .arg("--data-dir")
            .arg(&b.node.dir);
        Script::spawn(cmd)
    };
    let ready = agent.expect_line("ready: serving summarise");
    assert!(ready.contains(&b.entity_id), "{ready}");

    // Its event loop runs against the node now: it prints the messages it gets.
    let sent = Api::new(&a.node).post(
        "/v1/messages",
        &json!({"to": b.entity_id, "msg_type": "message", "payload": {"text": "hello, agent"}}),
    );
    assert!(sent["message_id"].is_string(), "{sent}");
    let line = agent.expect_line("message from");
    assert!(
        line.contains(&a.entity_id) && line.contains("hello, agent"),
        "{line}"
    );

    let text = "Peer Protocol connects agents. Each runs a node. Messages are signed.";
    let (code, stdout) = delegate(&a, &b, "summarise", &json!({"text": text}));
    assert_eq!(code, 0, "{stdout}");
    let task: Value = serde_json::from_str(&stdout).expect("delegate.py prints the task");
    assert_eq!(task["state"], "completed", "{task}");
    assert_eq!(
        task["output"],
        json!({"summary": "Peer Protocol connects agents.", "words": 11}),
        "{task}"
    );
    let (code, stdout) = delegate(&a, &b, "translate", &json!({}));
    assert_eq!(code, 1, "{stdout}");
    let task: Value = serde_json::from_str(&stdout).expect("delegate.py prints the task");
    assert_eq!(task["state"], "rejected", "{task}");
    let (code, stdout) = delegate(&a, &b, "summarise", &json!({"text": "  "}));
    assert_eq!(code, 1, "{stdout}");
    let task: Value = serde_json::from_str(&stdout).expect("delegate.py prints the task");
    assert_eq!(task["state"], "failed", "{task}");
}
