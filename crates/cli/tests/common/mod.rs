//! Helpers shared by the CLI's process tests.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// Time allowed for a node to come up.
const STARTUP: Duration = Duration::from_secs(30);
/// Interval between two looks at a node coming up.
const POLL: Duration = Duration::from_millis(25);

/// A `peer` command on `dir`, unaffected by the caller's `PEER_*` variables.
pub fn peer_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peer"));
    without_peer_variables(&mut cmd);
    cmd.arg("--data-dir").arg(dir);
    cmd
}

/// Keeps the caller's `PEER_*` variables from `cmd`.
pub fn without_peer_variables(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PEER_") {
            cmd.env_remove(key);
        }
    }
}

/// `peer run` on `dir` with free ports on 127.0.0.1, without mDNS (tests
/// run side by side on one host); more flags and variables may be added.
pub fn run_command(dir: &Path) -> Command {
    run_command_on(dir, "/ip4/127.0.0.1/tcp/0")
}

/// `peer run` on `dir` listening for peers on `listen` only, its API on a
/// free port of 127.0.0.1, without mDNS.
pub fn run_command_on(dir: &Path, listen: &str) -> Command {
    let mut cmd = peer_command(dir);
    cmd.args(["run", "--listen", listen])
        .args(["--api", "127.0.0.1:0", "--no-mdns"]);
    cmd
}

/// Starts `peer run` on `dir` with free ports on 127.0.0.1, its stderr in `log`.
pub fn spawn_run(dir: &Path, log: &Path) -> Child {
    spawn_logged(run_command(dir), log)
}

/// Starts `cmd` with its stderr in `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let stderr = std::fs::File::create(log).expect("create the node's stderr file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn `peer run`")
}

/// A `peer run` child process, killed when dropped (also when the test panics).
pub struct Node {
    /// Its name in failure messages, and its directory's under the root.
    pub name: &'static str,
    /// Its data directory.
    pub dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Node {
    /// Starts `peer run` on `root/name` with free ports on 127.0.0.1 and
    /// what `configure` adds (flags, variables), and waits until its API is
    /// up (it has written `api.addr`).
    pub fn start(root: &Path, name: &'static str, configure: impl FnOnce(&mut Command)) -> Self {
        let mut node = Self::spawn(root, name, configure);
        node.wait_ready();
        node
    }

    /// Starts `cmd`, a `peer run` on `root/name` made by the caller, and
    /// waits until its API is up.
    pub fn start_command(root: &Path, name: &'static str, cmd: Command) -> Self {
        let mut node = Self::spawn_command(root, name, cmd);
        node.wait_ready();
        node
    }

    /// Starts `peer run` as [`Node::start`] does, without waiting for its
    /// API (many nodes come up side by side; [`Node::wait_ready`] waits).
    pub fn spawn(root: &Path, name: &'static str, configure: impl FnOnce(&mut Command)) -> Self {
        Self::spawn_on(root, name, "/ip4/127.0.0.1/tcp/0", configure)
    }

    /// Starts `peer run` as [`Node::spawn`] does, listening for peers on
    /// `listen` only (a node restarted on its former address).
    pub fn spawn_on(
        root: &Path,
        name: &'static str,
        listen: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = run_command_on(&root.join(name), listen);
        configure(&mut cmd);
        Self::spawn_command(root, name, cmd)
    }

    /// Starts `cmd` without waiting for its API.
    fn spawn_command(root: &Path, name: &'static str, cmd: Command) -> Self {
        let dir = root.join(name);
        let log = root.join(format!("{name}.stderr"));
        // A killed node leaves its api.addr behind; the new one writes its own.
        _ = std::fs::remove_file(dir.join("api.addr"));
        let child = spawn_logged(cmd, &log);
        Self {
            name,
            dir,
            log,
            child,
        }
    }

    /// Waits until the node's API is up (it has written `api.addr`).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP;
        // The file is written in one go; the newline shows it is complete.
        while !std::fs::read_to_string(self.dir.join("api.addr")).is_ok_and(|t| t.ends_with('\n')) {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("exited early with {status}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!("its API did not come up within {STARTUP:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails the test with `what` and everything the node wrote to stderr.
    pub fn fail(&self, what: &str) -> ! {
        let stderr = self.stderr();
        panic!(
            "node {}: {what}\n--- stderr of node {} ---\n{stderr}",
            self.name, self.name
        )
    }

    /// Everything the node wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Runs `peer ARGS` on this node's data directory; its JSON output.
    pub fn cli(&self, args: &[&str]) -> Value {
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

    /// Its entity id and first listen address (the API may answer a moment
    /// before the node listens: asked again until it does).
    pub fn id_and_addr(&self) -> (String, String) {
        let deadline = Instant::now() + STARTUP;
        loop {
            let status = self.cli(&["status"]);
            let id = status["entity_id"].as_str().expect("entity_id").to_owned();
            if let Some(addr) = status["listen_addrs"][0].as_str() {
                return (id, addr.to_owned());
            }
            if Instant::now() > deadline {
                self.fail(&format!("no listen address within {STARTUP:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The base URL of its API (`http://host:port`) and its API token.
    pub fn api(&self) -> (String, String) {
        let read = |file: &str| {
            std::fs::read_to_string(self.dir.join(file))
                .unwrap_or_else(|e| self.fail(&format!("cannot read {file}: {e}")))
                .trim()
                .to_owned()
        };
        (format!("http://{}", read("api.addr")), read("api-token"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

/// Time allowed for one API request.
const REQUEST: Duration = Duration::from_secs(60);

/// An agent's view of a node: its API, with the node's token.
pub struct Api<'a> {
    /// The node.
    pub node: &'a Node,
    /// The HTTP client.
    pub http: Client,
    /// `http://host:port`.
    pub base: String,
    /// The API token.
    pub token: String,
}

impl<'a> Api<'a> {
    /// The API of `node`, as written in its data directory.
    pub fn new(node: &'a Node) -> Self {
        let (base, token) = node.api();
        let http = Client::builder().timeout(REQUEST).build().expect("client");
        Self {
            node,
            http,
            base,
            token,
        }
    }

    /// Sends `req` with the token; its JSON answer, which must be a 200.
    pub fn call(&self, req: reqwest::blocking::RequestBuilder, what: &str) -> Value {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .unwrap_or_else(|e| self.node.fail(&format!("{what}: {e}")));
        let status = resp.status();
        let body = resp.text().unwrap_or_default();
        if status != StatusCode::OK {
            self.node.fail(&format!("{what}: HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).expect("a JSON answer")
    }

    /// `GET path`; its JSON answer, which must be a 200.
    pub fn get(&self, path: &str) -> Value {
        self.call(self.http.get(format!("{}{path}", self.base)), path)
    }

    /// `PUT path` with `body`; its JSON answer, which must be a 200.
    pub fn put(&self, path: &str, body: &Value) -> Value {
        let req = self.http.put(format!("{}{path}", self.base)).json(body);
        self.call(req, path)
    }

    /// `POST path` with `body`; its JSON answer, which must be a 200.
    pub fn post(&self, path: &str, body: &Value) -> Value {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.call(req, path)
    }
}

/// A connects to B (at B's current address) and waits for it to show as
/// connected.
pub fn connect(a: &Api, b_addr: &str, b_id: &str) {
    let peer = a.post("/v1/peers", &json!({ "addr": b_addr }));
    assert_eq!(peer["entity_id"], b_id, "{peer}");
    assert_eq!(peer["connected"], true, "{peer}");
}
