//! End to end: three `peer run` processes on 127.0.0.1, connected and driven
//! through their local HTTP API (as an agent would) and through the `peer` CLI.
//!
//! A dials B and B dials C through `POST /v1/peers`; A dials C with `peer connect`.
//! Every node's `/v1/events` stream is opened before anything is sent, and each
//! recipient must see exactly the messages sent to it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::{peer_command, spawn_run};

/// Time allowed for a node to start answering `/v1/health` with an address.
const STARTUP: Duration = Duration::from_secs(30);
/// Time allowed for any one step (a request, a CLI run, reading events).
const STEP: Duration = Duration::from_secs(15);
/// Interval between two looks at something being polled.
const POLL: Duration = Duration::from_millis(25);
/// Messages sent concurrently in each direction.
const PER_DIRECTION: usize = 3;

/// A `peer run` child process, killed when dropped (also when the test panics).
struct Process {
    name: &'static str,
    dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Process {
    fn spawn(root: &Path, name: &'static str) -> Self {
        let dir = root.join(name);
        let log = root.join(format!("{name}.stderr"));
        let child = spawn_run(&dir, &log);
        Self {
            name,
            dir,
            log,
            child,
        }
    }

    /// Fails the test with `what` and everything the node wrote to stderr.
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
}

impl Drop for Process {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

/// A started node and what its agent knows about it.
struct Node {
    process: Process,
    http: reqwest::Client,
    base: String,
    token: String,
    entity_id: String,
    listen_addr: String,
}

impl Node {
    /// Waits (bounded by [`STARTUP`]) for `api.addr` and for `/v1/health` to
    /// report a listen address.
    async fn start(mut process: Process, http: reqwest::Client) -> Self {
        let deadline = Instant::now() + STARTUP;
        let addr_file = process.dir.join("api.addr");
        let api: SocketAddr = loop {
            process.check_running();
            // The file is written in one go; the newline shows it is complete.
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && text.ends_with('\n')
            {
                break text
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| process.fail(&format!("api.addr {text:?}: {e}")));
            }
            if Instant::now() > deadline {
                process.fail(&format!(
                    "{} did not appear within {STARTUP:?}",
                    addr_file.display()
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        let token = std::fs::read_to_string(process.dir.join("api-token"))
            .unwrap_or_else(|e| process.fail(&format!("cannot read api-token: {e}")))
            .trim()
            .to_owned();
        let base = format!("http://{api}");
        let health = loop {
            process.check_running();
            let answer = http
                .get(format!("{base}/v1/health"))
                .timeout(STEP)
                .send()
                .await;
            if let Ok(resp) = answer
                && resp.status() == StatusCode::OK
                && let Ok(health) = resp.json::<Value>().await
                && health["listen_addrs"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            {
                break health;
            }
            if Instant::now() > deadline {
                process.fail(&format!(
                    "{base}/v1/health did not report a listen address within {STARTUP:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        assert_eq!(health["status"], "ok", "{}: {health}", process.name);
        let entity_id = text(&health["entity_id"]);
        assert_eq!(entity_id.len(), 64, "{}: {health}", process.name);
        let listen_addr = text(&health["listen_addrs"][0]);
        assert!(
            listen_addr.starts_with("/ip4/127.0.0.1/tcp/"),
            "{}: {health}",
            process.name
        );
        Self {
            process,
            http,
            base,
            token,
            entity_id,
            listen_addr,
        }
    }

    fn name(&self) -> &'static str {
        self.process.name
    }

    /// Sends `req` with `token` (if any) and answers with the status and body.
    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> (StatusCode, String) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req
            .timeout(STEP)
            .send()
            .await
            .unwrap_or_else(|e| self.process.fail(&format!("request failed: {e}")));
        let status = resp.status();
        let body = resp
            .text()
            .await
            .unwrap_or_else(|e| self.process.fail(&format!("cannot read the answer: {e}")));
        (status, body)
    }

    async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let req = self.http.get(format!("{}{path}", self.base));
        self.call(req, Some(&self.token)).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (status, body) = self.get_text(path).await;
        (status, self.parse(path, &body))
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        let (status, body) = self.call(req, Some(&self.token)).await;
        (status, self.parse(path, &body))
    }

    fn parse(&self, path: &str, body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| {
            self.process
                .fail(&format!("{path} answered with non-JSON {body:?}: {e}"))
        })
    }

    /// `POST /v1/peers` to `other`; checks the answer names `other`.
    async fn connect(&self, other: &Node) {
        let (status, peer) = self
            .post("/v1/peers", &json!({ "addr": other.listen_addr }))
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{} → {}: {peer}",
            self.name(),
            other.name()
        );
        assert_eq!(peer["entity_id"], other.entity_id, "{peer}");
        assert_eq!(peer["connected"], true, "{peer}");
    }

    /// Polls `/v1/peers` until `other` is listed as connected: the side that was
    /// dialled learns of the connection independently of the dialler.
    async fn wait_for_peer(&self, other: &Node) {
        let deadline = Instant::now() + STEP;
        loop {
            let (status, peers) = self.get("/v1/peers").await;
            assert_eq!(status, StatusCode::OK, "{peers}");
            if find_peer(&peers, &other.entity_id).is_some_and(|p| p["connected"] == true) {
                return;
            }
            if Instant::now() > deadline {
                self.process.fail(&format!(
                    "{} never showed as connected: {peers}",
                    other.name()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn send(&self, to: &Node, msg_type: &str, payload: &Value) -> (StatusCode, Value) {
        let body = json!({"to": to.entity_id, "msg_type": msg_type, "payload": payload});
        self.post("/v1/messages", &body).await
    }

    /// Sends a `message` to `to`, checks it was accepted, and records what `to`
    /// must see on its event stream.
    async fn send_message(&self, to: &Node, payload: Value) -> Sent {
        let (status, answer) = self.send(to, "message", &payload).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{} → {}: {answer}",
            self.name(),
            to.name()
        );
        Sent::new(self, to, text(&answer["message_id"]), payload)
    }

    /// Opens `GET /v1/events`; the node is subscribed once the headers are in.
    async fn events(&self) -> Events {
        let resp = self
            .http
            .get(format!("{}/v1/events", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| self.process.fail(&format!("/v1/events: {e}")));
        assert_eq!(resp.status(), StatusCode::OK, "{}: /v1/events", self.name());
        Events {
            name: self.name(),
            body: resp.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed(),
            buf: Vec::new(),
        }
    }

    /// Runs `peer --data-dir <dir> ARGS`, checks it exits 0 and answers with its
    /// stdout as JSON.
    async fn cli(&self, args: &[&str]) -> Value {
        let mut cmd = peer_command(&self.process.dir);
        cmd.args(args);
        let what = format!("`peer {}`", args.join(" "));
        let run = tokio::task::spawn_blocking(move || cmd.output());
        let out = tokio::time::timeout(STEP, run)
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
            .expect("the CLI task panicked")
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{what} on node {} exited with {}\nstdout: {stdout}\nstderr: {stderr}",
            self.name(),
            out.status
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{what} printed non-JSON {stdout:?}: {e}"))
    }
}

/// The string in `v`, which must be a non-empty JSON string.
fn text(v: &Value) -> String {
    match v.as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => panic!("expected a non-empty string, got {v}"),
    }
}

fn find_peer<'a>(peers: &'a Value, entity_id: &str) -> Option<&'a Value> {
    peers
        .as_array()
        .expect("/v1/peers answers with a list")
        .iter()
        .find(|p| p["entity_id"] == entity_id)
}

/// A message accepted by its recipient.
struct Sent {
    to: String,
    message_id: String,
    /// What the recipient's event stream must show, less `type` and `message_id`.
    event: Value,
}

impl Sent {
    fn new(from: &Node, to: &Node, message_id: String, payload: Value) -> Self {
        Self {
            to: to.entity_id.clone(),
            message_id,
            event: json!({"from": from.entity_id, "msg_type": "message", "payload": payload}),
        }
    }
}

/// A unique payload for the `n`th message from `from` to `to`.
fn payload(from: &Node, to: &Node, n: usize) -> Value {
    json!({"text": format!("{} to {} #{n}", from.name(), to.name()), "n": n, "from": from.name()})
}

/// A `/v1/events` stream being read.
struct Events {
    name: &'static str,
    body: BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Events {
    /// The next event's JSON (its `data:` lines), skipping keep-alive comments.
    async fn next(&mut self, deadline: Instant) -> Value {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("events are UTF-8");
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    return serde_json::from_str(&data.join("\n")).unwrap_or_else(|e| {
                        panic!("{}: event {block:?} is not JSON: {e}", self.name)
                    });
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline.into(), self.body.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no complete event in time", self.name))
                .unwrap_or_else(|| panic!("{}: the event stream ended", self.name))
                .unwrap_or_else(|e| panic!("{}: reading events: {e}", self.name));
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// The `message` events up to and including the one with id `last`, by
    /// message id, without `type` and `message_id`. Peer (dis)connections and
    /// peers' cards are skipped.
    async fn messages_until(&mut self, last: &str) -> BTreeMap<String, Value> {
        let deadline = Instant::now() + STEP;
        let mut out = BTreeMap::new();
        loop {
            let event = self.next(deadline).await;
            match event["type"].as_str() {
                Some("peer_connected" | "peer_disconnected" | "card_updated") => continue,
                Some("message") => {}
                _ => panic!("{}: unexpected event {event}", self.name),
            }
            let id = text(&event["message_id"]);
            let seen = json!({
                "from": event["from"],
                "msg_type": event["msg_type"],
                "payload": event["payload"],
            });
            assert!(
                out.insert(id.clone(), seen).is_none(),
                "{}: {id} twice",
                self.name
            );
            if id == last {
                return out;
            }
        }
    }
}

/// The counters of `peer` in a `/v1/stats` document.
fn counters<'a>(stats: &'a Value, peer: &Node) -> &'a Value {
    let row = &stats["peers"][&peer.entity_id];
    assert!(row.is_object(), "no row for {} in {stats}", peer.name());
    row
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_exchange_messages_through_api_and_cli() {
    let began = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let http = reqwest::Client::new();
    let [pa, pb, pc] = ["a", "b", "c"].map(|name| Process::spawn(tmp.path(), name));
    let (a, b, c) = tokio::join!(
        Node::start(pa, http.clone()),
        Node::start(pb, http.clone()),
        Node::start(pc, http.clone()),
    );
    let nodes = [&a, &b, &c];

    // The token guards everything but /v1/health.
    for token in [None, Some("not-the-token")] {
        let (status, body) = a
            .call(http.get(format!("{}/v1/stats", a.base)), token)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "token {token:?}: {body}");
        let body: Value = serde_json::from_str(&body).expect("401 body is JSON");
        assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{body}");
    }

    // Agents subscribe before anything happens.
    let mut events = [a.events().await, b.events().await, c.events().await];

    a.connect(&b).await;
    b.connect(&c).await;
    let connected = a.cli(&["connect", &c.listen_addr]).await;
    assert_eq!(connected["entity_id"], c.entity_id, "{connected}");
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        x.wait_for_peer(y).await;
        y.wait_for_peer(x).await;
    }

    // Messages both ways on every link, all in flight at once.
    let directions = [(&a, &b), (&b, &a), (&b, &c), (&c, &b), (&a, &c)];
    let sends = directions.iter().flat_map(|&(from, to)| {
        (0..PER_DIRECTION).map(move |n| from.send_message(to, payload(from, to, n)))
    });
    let mut sent: Vec<Sent> = futures::future::join_all(sends).await;

    // Through the CLI, on the link the CLI made, the other way round: inline,
    // and from a file (as for payloads too large for a command line).
    let p = payload(&c, &a, PER_DIRECTION);
    let answer = c
        .cli(&["send", &a.entity_id, "message", &p.to_string()])
        .await;
    sent.push(Sent::new(&c, &a, text(&answer["message_id"]), p));
    let p = payload(&c, &a, PER_DIRECTION + 2);
    let file = tmp.path().join("payload.json");
    std::fs::write(&file, p.to_string()).expect("write payload");
    let at_file = format!("@{}", file.display());
    let answer = c.cli(&["send", &a.entity_id, "message", &at_file]).await;
    sent.push(Sent::new(&c, &a, text(&answer["message_id"]), p));

    // ping is answered with a pong echoing the payload, and is no event.
    let probe = json!({"probe": "ping from a", "n": 7});
    let (status, answer) = a.send(&b, "ping", &probe).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    text(&answer["message_id"]);
    assert_eq!(answer["reply"]["msg_type"], "pong", "{answer}");
    assert_eq!(answer["reply"]["payload"], probe, "{answer}");

    // A type B has no handler for is refused, and is no event either.
    let (status, answer) = a.send(&b, "no_such_type", &json!({"x": 1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "UNSUPPORTED_MSG_TYPE", "{answer}");

    // A last message to each node marks the end of what its stream must hold.
    for (from, to) in [(&b, &a), (&c, &b), (&a, &c)] {
        let n = PER_DIRECTION + 1;
        sent.push(from.send_message(to, payload(from, to, n)).await);
    }
    let ids: BTreeSet<&str> = sent.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids.len(), sent.len(), "message ids repeat: {ids:?}");
    for (node, stream) in nodes.iter().zip(&mut events) {
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.to == node.entity_id).collect();
        let last = &mine
            .last()
            .expect("every node was sent messages")
            .message_id;
        let want: BTreeMap<String, Value> = mine
            .iter()
            .map(|s| (s.message_id.clone(), s.event.clone()))
            .collect();
        let got = stream.messages_until(last).await;
        assert_eq!(
            got,
            want,
            "node {}: events differ from what was sent",
            node.name()
        );
    }

    // B's counters match what was sent to it, and what it refused.
    let (status, stats) = b.get("/v1/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let mut total = 0;
    for from in [&a, &c] {
        let n = sent
            .iter()
            .filter(|s| s.to == b.entity_id && s.event["from"] == from.entity_id)
            .count();
        assert_eq!(
            counters(&stats, from)["received"],
            n,
            "from {}: {stats}",
            from.name()
        );
        total += n;
    }
    let rejected = &counters(&stats, &a)["rejected"];
    assert_eq!(rejected, &json!({"UNSUPPORTED_MSG_TYPE": 1}), "{stats}");
    let (_, a_stats) = a.get("/v1/stats").await;
    let refused = &counters(&a_stats, &b)["refused_by_peer"];
    assert_eq!(refused, &json!({"UNSUPPORTED_MSG_TYPE": 1}), "{a_stats}");

    let (status, metrics) = b.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK, "{metrics}");
    let received_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("peer_messages_received_total "))
        .unwrap_or_else(|| panic!("no peer_messages_received_total in {metrics}"));
    assert_eq!(received_total, total.to_string(), "{metrics}");

    // `peer stats`: the pool's counters; every message found its connection open.
    let stats = a.cli(&["stats"]).await;
    let pool = &stats["pool"];
    assert!(pool["acquisitions"].as_u64() >= Some(1), "{stats}");
    assert_eq!(pool["open_breakers"], 0, "{stats}");

    let peers = a.cli(&["peers"]).await;
    for other in [&b, &c] {
        let p = find_peer(&peers, &other.entity_id)
            .unwrap_or_else(|| panic!("`peer peers` on a lacks {}: {peers}", other.name()));
        assert_eq!(p["connected"], true, "{peers}");
    }

    // The capability card through the CLI: A sets its card; B, connected,
    // gets the new one pushed and shows it.
    let card_file = tmp.path().join("card.json");
    let card =
        json!({"name": "node a", "skills": [{"id": "echo", "name": "Echo"}], "accepts": ["chat"]});
    std::fs::write(&card_file, card.to_string()).expect("write card");
    let set = a
        .cli(&["card", "--set", &card_file.display().to_string()])
        .await;
    assert_eq!(set["card"]["name"], "node a", "{set}");
    let sequence = set["card"]["sequence"].clone();
    assert_eq!(a.cli(&["card"]).await, set);
    let deadline = Instant::now() + STEP;
    loop {
        let caps = b.cli(&["caps", &a.entity_id]).await;
        if caps["card"]["sequence"] == sequence {
            assert_eq!(caps["card"]["accepts"], json!(["chat"]), "{caps}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never saw A's new card: {caps}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    eprintln!("e2e took {:?}", began.elapsed());
}
