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
use common::spawn_run;

/// Node features whose SDK tests run in `cargo test` (see the module doc).
const NODE_FEATURES: &[&str] = &[
    "health",
    "peers",
    "messages",
    "events",
    "inbox",
    "cards",
    "heartbeat",
];

/// Time allowed for a node to start answering `/v1/health` with an address.
const STARTUP: Duration = Duration::from_secs(30);
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

/// A `peer run` process with its API address, token and identity, killed when dropped.
struct Node {
    name: &'static str,
    dir: PathBuf,
    log: PathBuf,
    child: Child,
    base: String,
    token: String,
    entity_id: String,
    listen_addr: String,
}

impl Node {
    /// Starts a node in `root/name` and waits until `/v1/health` reports an address.
    fn start(root: &Path, name: &'static str, http: &reqwest::blocking::Client) -> Self {
        let dir = root.join(name);
        let log = root.join(format!("{name}.stderr"));
        let child = spawn_run(&dir, &log);
        let mut node = Self {
            name,
            dir,
            log,
            child,
            base: String::new(),
            token: String::new(),
            entity_id: String::new(),
            listen_addr: String::new(),
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            node.check_running();
            if let Ok(addr) = std::fs::read_to_string(node.dir.join("api.addr"))
                && addr.ends_with('\n')
            {
                node.base = format!("http://{}", addr.trim());
                break;
            }
            if Instant::now() > deadline {
                node.fail("api.addr did not appear in time");
            }
            std::thread::sleep(POLL);
        }
        node.token = std::fs::read_to_string(node.dir.join("api-token"))
            .unwrap_or_else(|e| node.fail(&format!("cannot read api-token: {e}")))
            .trim()
            .to_owned();
        let health = loop {
            node.check_running();
            let answer = http.get(format!("{}/v1/health", node.base)).send();
            if let Ok(resp) = answer
                && resp.status().is_success()
                && let Ok(health) = resp.json::<Value>()
                && health["listen_addrs"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            {
                break health;
            }
            if Instant::now() > deadline {
                node.fail("/v1/health did not report a listen address in time");
            }
            std::thread::sleep(POLL);
        };
        node.entity_id = health["entity_id"].as_str().unwrap_or_default().to_owned();
        node.listen_addr = health["listen_addrs"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        node
    }

    fn fail(&self, what: &str) -> ! {
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!(
            "node {}: {what}\n--- stderr of node {} ---\n{stderr}",
            self.name, self.name
        )
    }

    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(&format!("exited early with {status}"));
        }
    }

    fn post(&self, http: &reqwest::blocking::Client, path: &str, body: &Value) -> Value {
        let resp = http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .unwrap_or_else(|e| self.fail(&format!("POST {path}: {e}")));
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            self.fail(&format!("POST {path} {body}: {status} {text}"));
        }
        serde_json::from_str(&text).unwrap_or_else(|e| self.fail(&format!("{text:?}: {e}")))
    }

    /// Connects to `other` and waits until `other` lists this node as connected.
    fn connect(&self, other: &Node, http: &reqwest::blocking::Client) {
        let peer = self.post(http, "/v1/peers", &json!({"addr": other.listen_addr}));
        assert_eq!(peer["entity_id"], other.entity_id.as_str(), "{peer}");
        let deadline = Instant::now() + STEP;
        loop {
            let peers: Value = http
                .get(format!("{}/v1/peers", other.base))
                .bearer_auth(&other.token)
                .send()
                .and_then(|r| r.json())
                .unwrap_or_else(|e| other.fail(&format!("GET /v1/peers: {e}")));
            let listed = peers.as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["entity_id"] == self.entity_id.as_str() && p["connected"] == true)
            });
            if listed {
                return;
            }
            if Instant::now() > deadline {
                other.fail(&format!("{} never showed as connected: {peers}", self.name));
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

/// Two connected nodes, A and B, in a temporary directory.
fn two_nodes() -> (tempfile::TempDir, reqwest::blocking::Client, Node, Node) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let http = reqwest::blocking::Client::builder()
        .timeout(STEP)
        .build()
        .expect("HTTP client");
    let a = Node::start(tmp.path(), "a", &http);
    let b = Node::start(tmp.path(), "b", &http);
    a.connect(&b, &http);
    (tmp, http, a, b)
}

/// Runs the SDK's unittest suite with `features` enabled against A and B; fails
/// with the suite's output if it fails.
fn run_suite(features: &[&str], tmp: &Path, a: &Node, b: &Node) -> String {
    let out_path = tmp.join("python.out");
    let out = std::fs::File::create(&out_path).expect("create the output file");
    let err = out.try_clone().expect("clone the output file");
    let mut child = python()
        .args(["-m", "unittest", "discover", "-v"])
        .args(["-s", "sdk/python/tests", "-t", "sdk/python/tests"])
        .env("PEER_TEST_DATA_DIR_A", &a.dir)
        .env("PEER_TEST_DATA_DIR_B", &b.dir)
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
        std::fs::read_to_string(&a.log).unwrap_or_default(),
        std::fs::read_to_string(&b.log).unwrap_or_default(),
    );
    output
}

#[test]
fn python_sdk_tests_pass_against_two_nodes() {
    let (tmp, _http, a, b) = two_nodes();
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
fn delegate(a: &Node, to: &Node, skill: &str, input: &Value) -> (i32, String) {
    let out = python()
        .arg("examples/python/delegate.py")
        .arg("--data-dir")
        .arg(&a.dir)
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
    let (_tmp, http, a, b) = two_nodes();
    let mut agent = {
        let mut cmd = python();
        cmd.arg("examples/python/summarise_agent.py")
            .arg("--data-dir")
            .arg(&b.dir);
        Script::spawn(cmd)
    };
    let ready = agent.expect_line("ready: serving summarise");
    assert!(ready.contains(&b.entity_id), "{ready}");

    // Its event loop runs against the node now: it prints the messages it gets.
    let sent = a.post(
        &http,
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
