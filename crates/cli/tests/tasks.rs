//! Delegated tasks across crashes, with real `peer run` processes on
//! 127.0.0.1 and agents that use only the HTTP API: the assignee B is killed
//! with SIGKILL while it works on a task, starts again on the same data
//! directory, still has the task and finishes it; then the delegator A is
//! killed while B works, B completes the task meanwhile, and A gets the
//! result once it is back. A node whose database cannot grow (a file size
//! limit, as a full disk) refuses the task or result it cannot store, undoes
//! it and never sends it; tasks of more than a chunk go in one envelope.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Api, Node, connect, peer_command, without_peer_variables};

/// Time allowed for something to show up on a node.
const WAIT: Duration = Duration::from_secs(30);

/// Polls `look` until it gives something (at most [`WAIT`]).
fn wait_for<T>(what: &str, mut look: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = look() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `api`'s copy of the task once it is in `state`.
fn task_in(api: &Api, task_id: &str, state: &str) -> Value {
    let path = format!("/v1/tasks/{task_id}");
    wait_for(&format!("{} sees {task_id} {state}", api.node.name), || {
        let resp = api
            .http
            .get(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .send()
            .ok()?;
        let task: Value = resp.json().ok()?;
        (task["state"] == state).then_some(task)
    })
}

/// B's card offers `summarise`.
fn offer_summarise(b: &Node, root: &std::path::Path) {
    let card = root.join("card.json");
    let content = json!({"name": "b", "skills": [{"id": "summarise", "name": "Summarise"}]});
    std::fs::write(&card, content.to_string()).expect("card file");
    let card_path = card.to_str().expect("utf-8 path");
    b.cli(&["card", "--set", card_path]);
}

fn delegate(a: &Api, b_id: &str, text: &str) -> String {
    let body = json!({"to": b_id, "skill": "summarise", "input": {"text": text}});
    let answer = a.post("/v1/tasks", &body);
    answer["task_id"].as_str().expect("task_id").to_owned()
}

#[test]
fn tasks_survive_sigkill_of_either_side() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut a = Node::start(root.path(), "a", |_| {});
    let mut b = Node::start(root.path(), "b", |_| {});
    offer_summarise(&b, root.path());
    let (b_id, b_addr) = b.id_and_addr();
    {
        let api_a = Api::new(&a);
        let api_b = Api::new(&b);
        connect(&api_a, &b_addr, &b_id);

        // B's agent takes a task and starts on it; then B is killed.
        let first = delegate(&api_a, &b_id, "the quick brown fox");
        task_in(&api_b, &first, "submitted");
        api_b.post(
            &format!("/v1/tasks/{first}/status"),
            &json!({"state": "working"}),
        );
        task_in(&api_a, &first, "working");
        b.kill();
    }
    drop(b);
    let b = Node::start(root.path(), "b", |_| {});
    let (_, b_addr) = b.id_and_addr();
    let api_b = Api::new(&b);
    {
        let api_a = Api::new(&a);
        // B kept the task and finishes it once A is connected again.
        let first = wait_for("B's one task", || {
            let tasks = api_b.get("/v1/tasks?role=assignee");
            tasks["tasks"][0]["task_id"].as_str().map(str::to_owned)
        });
        assert_eq!(api_b.get(&format!("/v1/tasks/{first}"))["state"], "working");
        connect(&api_a, &b_addr, &b_id);
        api_b.post(
            &format!("/v1/tasks/{first}/result"),
            &json!({"output": {"summary": "quick fox"}}),
        );
        let done = task_in(&api_a, &first, "completed");
        assert_eq!(done["output"], json!({"summary": "quick fox"}), "{done}");

        // A second task: A is killed while B works on it.
        let second = delegate(&api_a, &b_id, "jumps over the lazy dog");
        task_in(&api_b, &second, "submitted");
        api_b.post(
            &format!("/v1/tasks/{second}/status"),
            &json!({"state": "working"}),
        );
        task_in(&api_a, &second, "working");
        // A answers B only once the change is stored: from then on A keeps it.
        wait_for("A to have stored the change", || {
            let t = api_b.get(&format!("/v1/tasks/{second}"));
            (t["peer_synced"] == true).then_some(())
        });
        a.kill();
        // B completes it while A is gone: A cannot be told yet.
        let unsent = api_b.post(
            &format!("/v1/tasks/{second}/result"),
            &json!({"output": {"summary": "lazy dog"}}),
        );
        assert_eq!(unsent["state"], "completed", "{unsent}");
        let waiting = wait_for("B to notice A is gone", || {
            let t = api_b.get(&format!("/v1/tasks/{second}"));
            (t["peer_synced"] == false).then_some(t)
        });
        assert_eq!(waiting["state"], "completed");
    }
    drop(a);
    let a = Node::start(root.path(), "a", |_| {});
    let api_a = Api::new(&a);
    let tasks = api_a.get("/v1/tasks?role=delegator&state=working");
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(1), "{tasks}");
    let second = tasks["tasks"][0]["task_id"]
        .as_str()
        .expect("task_id")
        .to_owned();
    // Once A is connected again, B tells it.
    connect(&api_a, &b_addr, &b_id);
    let got = task_in(&api_a, &second, "completed");
    assert_eq!(got["output"], json!({"summary": "lazy dog"}), "{got}");
    wait_for("B to see A was told", || {
        (api_b.get(&format!("/v1/tasks/{second}"))["peer_synced"] == true).then_some(())
    });

    // The CLI: `peer delegate --wait` returns once B's agent has finished.
    let (a_dir, b_id_cli) = (a.dir.clone(), b_id.clone());
    let waiting = std::thread::spawn(move || {
        peer_command(&a_dir)
            .args([
                "delegate",
                &b_id_cli,
                "summarise",
                r#"{"text":"over the CLI"}"#,
            ])
            .args(["--wait", "--timeout", "30"])
            .output()
            .expect("run peer delegate")
    });
    let third = wait_for("B to get the CLI's task", || {
        let tasks = api_b.get("/v1/tasks?role=assignee&state=submitted");
        tasks["tasks"][0]["task_id"].as_str().map(str::to_owned)
    });
    api_b.post(
        &format!("/v1/tasks/{third}/result"),
        &json!({"output": {"summary": "the CLI"}}),
    );
    let out = waiting.join().expect("the CLI thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: Value = serde_json::from_slice(&out.stdout).expect("the task as JSON");
    assert_eq!(
        (&done["task_id"], &done["state"]),
        (&json!(third), &json!("completed"))
    );
    assert_eq!(
        a.cli(&["task", &third])["output"],
        json!({"summary": "the CLI"})
    );
    let listed = b.cli(&["tasks", "--role", "assignee", "--state", "completed"]);
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );
    // A task that ends otherwise makes `--wait` exit 1, printing the task.
    let out = peer_command(&a.dir)
        .args(["delegate", &b_id, "translate", "{}", "--wait"])
        .output()
        .expect("run peer delegate");
    assert_eq!(out.status.code(), Some(1));
    let rejected: Value = serde_json::from_slice(&out.stdout).expect("the task as JSON");
    assert_eq!(rejected["state"], "rejected", "{rejected}");
}

/// `peer run` on `dir` (free ports on 127.0.0.1, no mDNS) whose files cannot
/// grow past `kib` KiB (`ulimit -f`, with SIGXFSZ ignored so that a write past
/// it fails with `EFBIG` instead of killing the node): its database fills up
/// as on a full disk.
fn run_with_file_limit(dir: &std::path::Path, kib: u64) -> Command {
    let mut cmd = Command::new("bash");
    without_peer_variables(&mut cmd);
    cmd.arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$@\""))
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_peer"))
        .arg("--data-dir")
        .arg(dir)
        .args(["run", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--api", "127.0.0.1:0", "--no-mdns"]);
    cmd
}

/// The ids of a task list.
fn task_ids(list: &Value) -> Vec<String> {
    list["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
        .collect()
}

/// `POST path` with `body`: the status and the answer's text, whatever they are.
fn post_raw(api: &Api, path: &str, body: &Value) -> (u16, String) {
    let resp = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.token)
        .json(body)
        .send()
        .unwrap_or_else(|e| api.node.fail(&format!("{path}: {e}")));
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}

#[test]
fn a_task_that_cannot_be_stored_is_refused_and_never_reaches_the_peer() {
    let root = tempfile::tempdir().expect("tempdir");
    let a_dir = root.path().join("a");
    let a = Node::start_command(root.path(), "a", run_with_file_limit(&a_dir, 16384));
    let b = Node::start(root.path(), "b", |_| {});
    offer_summarise(&b, root.path());
    let (b_id, b_addr) = b.id_and_addr();
    let api_a = Api::new(&a);
    let api_b = Api::new(&b);
    connect(&api_a, &b_addr, &b_id);

    // Tasks of 256 KiB until A's database cannot grow any more.
    let text = "x".repeat(256 * 1024);
    let body = json!({"to": b_id, "skill": "summarise", "input": {"text": text}});
    let mut stored = Vec::new();
    let (status, answer) = loop {
        assert!(stored.len() < 100, "A's files never reached their limit");
        let (status, answer) = post_raw(&api_a, "/v1/tasks", &body);
        if status != 200 {
            break (status, answer);
        }
        let task: Value = serde_json::from_str(&answer).expect("a task");
        stored.push(task["task_id"].as_str().expect("task_id").to_owned());
    };
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("STORAGE_FAILED"), "{answer}");
    assert!(!stored.is_empty(), "the first task was refused: {answer}");

    // A forgot the task it could not store (nothing of it is left in memory
    // to reach B later) and kept the others.
    let mut at_a = task_ids(&api_a.get("/v1/tasks?role=delegator"));
    let mut kept = stored.clone();
    at_a.sort();
    kept.sort();
    assert_eq!(at_a, kept, "A holds the tasks it stored, and only those");

    // Restarted without the limit, A has what it stored and sends B every
    // task B does not have yet; the refused task never reaches B.
    drop(a);
    let a = Node::start(root.path(), "a", |_| {});
    let api_a = Api::new(&a);
    let at_a = api_a.get("/v1/tasks?role=delegator");
    assert_eq!(at_a["tasks"].as_array().map(Vec::len), Some(stored.len()));
    connect(&api_a, &b_addr, &b_id);
    for id in &stored {
        task_in(&api_b, id, "submitted");
    }
    // Had A sent the refused task, B would hold it by now.
    std::thread::sleep(Duration::from_millis(500));
    let at_b = task_ids(&api_b.get("/v1/tasks?role=assignee"));
    assert_eq!(
        at_b.len(),
        stored.len(),
        "B: {at_b:?}, A stored: {stored:?}"
    );
}

#[test]
fn a_result_that_cannot_be_stored_leaves_the_task_as_it_was() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = Node::start(root.path(), "a", |_| {});
    let b_dir = root.path().join("b");
    let b = Node::start_command(root.path(), "b", run_with_file_limit(&b_dir, 4096));
    offer_summarise(&b, root.path());
    let (b_id, b_addr) = b.id_and_addr();
    let api_a = Api::new(&a);
    let api_b = Api::new(&b);
    connect(&api_a, &b_addr, &b_id);
    let id = delegate(&api_a, &b_id, "a short text");
    task_in(&api_b, &id, "submitted");

    // An output of 8 MiB does not fit under B's 4 MiB limit: B's agent is
    // refused, and the task is what it was, at B and at A.
    let output = json!({"summary": "y".repeat(8 << 20)});
    let path = format!("/v1/tasks/{id}/result");
    let (status, answer) = post_raw(&api_b, &path, &json!({ "output": output }));
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("STORAGE_FAILED"), "{answer}");
    let at_b = api_b.get(&format!("/v1/tasks/{id}"));
    assert_eq!(at_b["state"], "submitted");
    assert!(at_b["output"].is_null());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(api_a.get(&format!("/v1/tasks/{id}"))["state"], "submitted");

    // A result that fits is stored and reaches A.
    api_b.post(&path, &json!({"output": {"summary": "short"}}));
    let done = task_in(&api_a, &id, "completed");
    assert_eq!(done["output"], json!({"summary": "short"}));
}
