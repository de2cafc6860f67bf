//! Task delegation between real nodes on 127.0.0.1: the A2A lifecycle on both
//! sides, rejection of a skill the card does not offer, cancel, illegal
//! moves, deadlines, a repeated `task_delegate`, the bounded queue, and
//! changes that wait for a peer that is gone (restarts of either side).

use std::time::Duration;

use peer_node::NodeError;
use peer_node::node::{Event, NewTask, TaskChange};
use peer_node::services::card::Skill;
use peer_node::services::tasks::task::{Role, State, Task};
use serde_json::json;

mod common;
use common::{RawPeer, TestNode, pair, restart, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// A node whose card offers `summarise`, retrying unsent changes every second.
fn tune(c: &mut peer_node::Config) {
    c.card.name = Some("worker".into());
    c.card.skills = vec![Skill {
        id: "summarise".into(),
        name: "Summarise".into(),
        description: "shortens text".into(),
        tags: vec![],
        input_modes: vec![],
        output_modes: vec![],
        examples: vec![],
    }];
    c.tasks.resend_secs = 1;
}

fn new_task(to: &TestNode, skill: &str) -> NewTask {
    NewTask {
        to: to.handle.entity_id(),
        skill: skill.into(),
        input: json!({"text": "the quick brown fox"}),
        deadline_s: None,
        priority: None,
    }
}

/// Polls `node`'s copy of `task_id` until `done` holds (10 s at most).
async fn wait_task(node: &TestNode, task_id: &str, done: impl Fn(&Task) -> bool) -> Task {
    for _ in 0..1000 {
        if let Ok(t) = node.handle.task(task_id.to_owned()).await
            && done(&t)
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "task {task_id} never got there: {:?}",
        node.handle.task(task_id.to_owned()).await
    )
}

/// A `summarise` task from `a` to `b`, once `b` has it.
async fn delegated(a: &TestNode, b: &TestNode) -> String {
    let id = a
        .handle
        .delegate(new_task(b, "summarise"))
        .await
        .expect("stored")
        .task_id;
    in_state(b, &id, State::Submitted).await;
    id
}

async fn in_state(node: &TestNode, task_id: &str, state: State) -> Task {
    wait_task(node, task_id, |t| t.state == state).await
}

async fn status(node: &TestNode, task_id: &str, state: State) -> Result<Task, NodeError> {
    let change = TaskChange::Status {
        task_id: task_id.into(),
        state,
        message: Some(format!("now {}", state.as_str())),
    };
    node.handle.change_task(change).await
}

async fn complete(node: &TestNode, task_id: &str) -> Result<Task, NodeError> {
    let change = TaskChange::Complete {
        task_id: task_id.into(),
        output: json!({"summary": "quick fox"}),
        artifacts: vec![],
    };
    node.handle.change_task(change).await
}

fn invalid_state(r: Result<Task, NodeError>) {
    match r {
        Err(NodeError::Rejected { code, .. }) => assert_eq!(code, "INVALID_STATE"),
        other => panic!("expected INVALID_STATE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_task_goes_through_its_lifecycle_and_both_sides_see_each_change() {
    let (a, b) = pair(TCP, tune).await;
    let mut a_events = a.handle.subscribe();
    let mut b_events = b.handle.subscribe();
    let mut new = new_task(&b, "summarise");
    new.priority = Some(7);
    let task = a.handle.delegate(new).await.expect("stored");
    assert_eq!(
        (task.role, task.state, task.priority),
        (Role::Delegator, State::Submitted, 7)
    );
    let id = task.task_id.clone();

    let theirs = in_state(&b, &id, State::Submitted).await;
    assert_eq!(
        (theirs.role, theirs.peer),
        (Role::Assignee, a.handle.entity_id())
    );
    assert_eq!(theirs.input, json!({"text": "the quick brown fox"}));
    let queue = b
        .handle
        .task_list(Some(Role::Assignee), Some(State::Submitted))
        .await
        .expect("list");
    assert_eq!(
        queue.iter().map(|t| &t.task_id).collect::<Vec<_>>(),
        vec![&id]
    );
    assert!(
        a.handle
            .task_list(Some(Role::Assignee), None)
            .await
            .expect("list")
            .is_empty()
    );

    status(&b, &id, State::Working).await.expect("working");
    in_state(&a, &id, State::Working).await;
    status(&b, &id, State::InputRequired)
        .await
        .expect("input-required");
    let asked = in_state(&a, &id, State::InputRequired).await;
    assert_eq!(asked.message.as_deref(), Some("now input-required"));
    status(&b, &id, State::Working)
        .await
        .expect("working again");
    // (Changes made faster than the peer answers reach it as the latest one.)
    in_state(&a, &id, State::Working).await;
    let done = complete(&b, &id).await.expect("completed");
    assert_eq!(done.state, State::Completed);
    let seen = in_state(&a, &id, State::Completed).await;
    assert_eq!(seen.output, Some(json!({"summary": "quick fox"})));

    // A finished task changes no more.
    invalid_state(status(&b, &id, State::Working).await);
    invalid_state(
        a.handle
            .change_task(TaskChange::Cancel {
                task_id: id.clone(),
                message: None,
            })
            .await,
    );

    // Each side's agent heard every change, with event ids.
    for (events, expected) in [
        (
            &mut a_events,
            vec![
                "submitted",
                "working",
                "input-required",
                "working",
                "completed",
            ],
        ),
        (
            &mut b_events,
            vec![
                "submitted",
                "working",
                "input-required",
                "working",
                "completed",
            ],
        ),
    ] {
        let mut states = Vec::new();
        while states.len() < expected.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("in time")
                .expect("event");
            if let Event::TaskUpdate { event_id, task } = event
                && task.task_id == id
            {
                assert!(event_id.is_some(), "stored before it is published");
                states.push(task.state.as_str());
            }
        }
        assert_eq!(states, expected);
    }
}

#[tokio::test]
async fn a_skill_the_card_does_not_offer_is_rejected_with_a_reason() {
    let (a, b) = pair(TCP, tune).await;
    let task = a
        .handle
        .delegate(new_task(&b, "translate"))
        .await
        .expect("stored");
    let rejected = in_state(&a, &task.task_id, State::Rejected).await;
    let reason = rejected.message.expect("a reason");
    assert!(reason.contains("unknown skill \"translate\""), "{reason}");
    assert!(
        reason.contains("summarise"),
        "names what is offered: {reason}"
    );
    assert!(
        b.handle.task(task.task_id).await.is_err(),
        "B keeps nothing"
    );
}

#[tokio::test]
async fn the_delegator_cancels_and_the_assignee_can_no_longer_complete() {
    let (a, b) = pair(TCP, tune).await;
    let id = delegated(&a, &b).await;
    let canceled = a
        .handle
        .change_task(TaskChange::Cancel {
            task_id: id.clone(),
            message: Some("changed my mind".into()),
        })
        .await
        .expect("canceled");
    assert_eq!(canceled.state, State::Canceled);
    let theirs = in_state(&b, &id, State::Canceled).await;
    assert_eq!(theirs.message.as_deref(), Some("changed my mind"));
    invalid_state(complete(&b, &id).await);
    // Only the delegator cancels, only the assignee reports.
    invalid_state(status(&a, &id, State::Working).await);
    match b.handle.task("no-such-task".into()).await {
        Err(NodeError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn a_task_over_one_envelope_or_a_result_over_max_message_size_is_refused_before_it_is_sent() {
    let (a, b) = pair(TCP, |c| {
        tune(c);
        // A result goes as a chunked transfer of at most this.
        c.transfer.max_message_size = 1 << 20;
    })
    .await;
    let envelope = peer_node::Config::default().protocol.max_envelope_size;
    let mut new = new_task(&b, "summarise");
    new.input = json!({"text": "x".repeat(envelope)});
    match a.handle.delegate(new).await {
        Err(NodeError::TooLarge { size, limit }) => assert!(size > limit),
        other => panic!("expected TooLarge, got {:?}", other.map(|t| t.task_id)),
    }
    assert!(
        a.handle
            .task_list(None, None)
            .await
            .expect("list")
            .is_empty()
    );
    let id = delegated(&a, &b).await;
    let big = TaskChange::Complete {
        task_id: id.clone(),
        output: json!("y".repeat(1 << 20)),
        artifacts: vec![],
    };
    let refused = b.handle.change_task(big).await.map(|t| t.state);
    assert!(
        matches!(refused, Err(NodeError::TooLarge { .. })),
        "{refused:?}"
    );
    let long = TaskChange::Status {
        task_id: id.clone(),
        state: State::Failed,
        message: Some("z".repeat(5000)),
    };
    let refused = b.handle.change_task(long).await.map(|t| t.state);
    assert!(matches!(refused, Err(NodeError::Invalid(_))), "{refused:?}");
    assert_eq!(
        b.handle.task(id).await.expect("task").state,
        State::Submitted
    );
}

#[tokio::test]
async fn a_task_larger_than_a_chunk_goes_in_one_envelope_and_is_taken() {
    // A receiver takes no chunked transfer of a task_delegate: one that fits
    // an envelope goes as one, however large a chunk is.
    let (a, b) = pair(TCP, tune).await;
    let chunk = peer_node::Config::default().transfer.chunk_size;
    let mut new = new_task(&b, "summarise");
    new.input = json!({"text": "x".repeat(4 * chunk)});
    let id = a.handle.delegate(new).await.expect("stored").task_id;
    let got = in_state(&b, &id, State::Submitted).await;
    assert_eq!(got.input["text"].as_str().map(str::len), Some(4 * chunk));
}

#[tokio::test]
async fn deadlines_expire_tasks_on_both_sides() {
    let (a, b) = pair(TCP, tune).await;
    let mut new = new_task(&b, "summarise");
    new.deadline_s = Some(1);
    let id = a.handle.delegate(new).await.expect("stored").task_id;
    in_state(&b, &id, State::Submitted).await;
    let mine = in_state(&a, &id, State::Failed).await;
    let theirs = in_state(&b, &id, State::Failed).await;
    for t in [mine, theirs] {
        assert_eq!(t.message.as_deref(), Some("the deadline passed"));
    }
    // A task changed before its deadline still expires on both sides.
    let mut new = new_task(&b, "summarise");
    new.deadline_s = Some(2);
    let id = a.handle.delegate(new).await.expect("stored").task_id;
    in_state(&b, &id, State::Submitted).await;
    status(&b, &id, State::Working).await.expect("working");
    in_state(&a, &id, State::Working).await;
    let mine = in_state(&a, &id, State::Failed).await;
    let theirs = in_state(&b, &id, State::Failed).await;
    for t in [mine, theirs] {
        assert_eq!(t.message.as_deref(), Some("the deadline passed"));
    }
}

#[tokio::test]
async fn a_repeated_task_delegate_makes_one_task() {
    let b = start_node_with(TCP, tune).await;
    let to = b.handle.entity_id();
    let mut raw = RawPeer::connect(&b.addr).await;
    let mut session = raw.open_session(to).await;
    let delegate = json!({
        "task_id": "6f1c2a9e-1b2c-4d3e-8f40-5a6b7c8d9e0f",
        "skill": "summarise",
        "input": {"text": "x"},
    })
    .to_string();
    for _ in 0..3 {
        // Each copy is a new envelope (new nonce, next sequence number).
        let response = raw
            .request_sealed(&mut session, to, "task_delegate", delegate.as_bytes())
            .await;
        assert_eq!(
            common::error_code(response),
            None,
            "answered with its state"
        );
    }
    let tasks = b.handle.task_list(None, None).await.expect("list");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].peer, raw.entity_id());
    // The same id from another peer is not theirs to reuse.
    let mut other = RawPeer::connect(&b.addr).await;
    let mut other_session = other.open_session(to).await;
    let code = other
        .send_sealed(&mut other_session, to, "task_delegate", delegate.as_bytes())
        .await;
    assert_eq!(code.as_deref(), Some("INVALID_STATE"));
    // A status for a task that is not the sender's is refused too.
    let status = json!({"task_id": "6f1c2a9e-1b2c-4d3e-8f40-5a6b7c8d9e0f", "state": "working"});
    let code = other
        .send_sealed(
            &mut other_session,
            to,
            "task_status",
            status.to_string().as_bytes(),
        )
        .await;
    assert_eq!(code.as_deref(), Some("INVALID_STATE"));
}

#[tokio::test]
async fn the_incoming_queue_is_bounded_and_a_refused_delegation_is_sent_again() {
    let (a, b) = pair(TCP, |c| {
        tune(c);
        c.tasks.max_submitted = 2;
    })
    .await;
    let mut ids = Vec::new();
    for p in [1, 9, 5] {
        let mut new = new_task(&b, "summarise");
        new.priority = Some(p);
        ids.push(a.handle.delegate(new).await.expect("stored").task_id);
    }
    in_state(&b, &ids[0], State::Submitted).await;
    in_state(&b, &ids[1], State::Submitted).await;
    // The third waits at A: B refused it INBOX_FULL, which A retries.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.handle.task(ids[2].clone()).await.is_err());
    let waiting = a.handle.task(ids[2].clone()).await.expect("kept");
    assert_eq!(
        (waiting.state, waiting.peer_synced),
        (State::Submitted, false)
    );
    // Served by priority: 9 before 1.
    let queue = b
        .handle
        .task_list(Some(Role::Assignee), Some(State::Submitted))
        .await
        .expect("list");
    assert_eq!(
        queue.iter().map(|t| t.priority).collect::<Vec<_>>(),
        vec![9, 1]
    );
    // Once B's agent takes one, the third arrives.
    status(&b, &ids[1], State::Working).await.expect("working");
    in_state(&b, &ids[2], State::Submitted).await;
}

#[tokio::test]
async fn a_restarted_assignee_keeps_its_task_and_finishes_it() {
    let (a, b) = pair(TCP, tune).await;
    let id = delegated(&a, &b).await;
    status(&b, &id, State::Working).await.expect("working");
    in_state(&a, &id, State::Working).await;

    let b = restart(b, TCP, tune).await;
    let kept = b
        .handle
        .task(id.clone())
        .await
        .expect("kept across the restart");
    assert_eq!(kept.state, State::Working);
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;
    complete(&b, &id).await.expect("completed");
    in_state(&a, &id, State::Completed).await;
}

/// A result of several chunks (`transfer.chunk_size` is 32 KiB by default):
/// about 3 MB of JSON.
fn large_output() -> serde_json::Value {
    let text: String = (0..3_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    json!({"summary": text, "n": 3})
}

#[tokio::test]
async fn a_large_result_goes_as_a_chunked_transfer_and_arrives_whole() {
    let (a, b) = pair(TCP, tune).await;
    let id = a
        .handle
        .delegate(new_task(&b, "summarise"))
        .await
        .expect("stored")
        .task_id;
    in_state(&b, &id, State::Submitted).await;
    let mut events = a.handle.subscribe();
    let output = large_output();
    let change = TaskChange::Complete {
        task_id: id.clone(),
        output: output.clone(),
        artifacts: vec![],
    };
    b.handle.change_task(change).await.expect("completed");
    let got = in_state(&a, &id, State::Completed).await;
    assert!(got.output == Some(output), "the output arrived intact");
    wait_task(&b, &id, |t| t.peer_synced).await;
    // It came as a transfer: A saw its progress.
    let mut chunks = None;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
        if let Event::TransferProgress { chunk_count, .. } = e {
            chunks = Some(chunk_count);
        }
    }
    assert!(chunks.is_some_and(|n| n > 10), "{chunks:?}");
}

#[tokio::test]
async fn a_large_result_from_a_peer_that_is_not_the_assignee_is_refused() {
    use peer_core::chunk::{self, TransferId};
    let b = start_node_with(TCP, tune).await;
    let to = b.handle.entity_id();
    let mut raw = RawPeer::connect(&b.addr).await;
    let mut session = raw.open_session(to).await;
    let result = json!({
        "task_id": "6f1c2a9e-1b2c-4d3e-8f40-5a6b7c8d9e0f",
        "output": "x".repeat(100_000),
    })
    .to_string();
    let result_type = "task_result".parse().expect("valid");
    let tid = TransferId::from_random(rand::random());
    let (manifest, chunks) = chunk::split(
        result_type,
        result.as_bytes(),
        chunk::DEFAULT_CHUNK_SIZE,
        tid,
    )
    .expect("split");
    let code = raw
        .send_sealed(&mut session, to, chunk::MSG_MANIFEST, &manifest.encode())
        .await;
    assert_eq!(code, None, "a task_result may come as a transfer");
    let chunks: Vec<_> = chunks.collect();
    let (last, rest) = chunks.split_last().expect("chunks");
    assert!(!rest.is_empty());
    for c in rest {
        let code = raw
            .send_sealed(&mut session, to, chunk::MSG_CHUNK, &c.encode())
            .await;
        assert_eq!(code, None);
    }
    // The whole message is the tasks service's to judge: not this peer's task.
    let code = raw
        .send_sealed(&mut session, to, chunk::MSG_CHUNK, &last.encode())
        .await;
    assert_eq!(code.as_deref(), Some("INVALID_STATE"));
    // Other task types still do not come as transfers.
    let status_type = "task_status".parse().expect("valid");
    let tid = TransferId::from_random(rand::random());
    let (manifest, _) = chunk::split(
        status_type,
        result.as_bytes(),
        chunk::DEFAULT_CHUNK_SIZE,
        tid,
    )
    .expect("split");
    let code = raw
        .send_sealed(&mut session, to, chunk::MSG_MANIFEST, &manifest.encode())
        .await;
    assert_eq!(code.as_deref(), Some("UNSUPPORTED_MSG_TYPE"));
}

#[tokio::test]
async fn a_delegator_that_was_away_gets_the_result_when_it_is_back() {
    result_after_absence(json!({"summary": "quick fox"})).await;
}

#[tokio::test]
async fn a_delegator_that_was_away_gets_a_large_result_when_it_is_back() {
    result_after_absence(large_output()).await;
}

/// A stops; B's agent completes the task with `output` meanwhile; once A is
/// back, B sends it the result.
async fn result_after_absence(output: serde_json::Value) {
    let (a, b) = pair(TCP, tune).await;
    let id = delegated(&a, &b).await;
    let a_id = a.handle.entity_id();
    // A stops; B's agent completes the task meanwhile.
    let common::TestNode { handle, dir, .. } = a;
    drop(handle);
    common::wait_disconnected(&b.handle, a_id).await;
    let change = TaskChange::Complete {
        task_id: id.clone(),
        output: output.clone(),
        artifacts: vec![],
    };
    b.handle.change_task(change).await.expect("completed");
    let unsent = b.handle.task(id.clone()).await.expect("task");
    assert!(!unsent.peer_synced, "A could not be told");

    let a = common::reopen(dir, TCP, tune).await;
    assert_eq!(a.handle.entity_id(), a_id);
    let before = a.handle.task(id.clone()).await.expect("kept");
    assert_eq!(before.state, State::Submitted);
    a.handle.connect(b.addr.clone()).await.expect("connect");
    let got = in_state(&a, &id, State::Completed).await;
    assert!(got.output == Some(output), "the output arrived intact");
    wait_task(&b, &id, |t| t.peer_synced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignee_whose_disk_is_full_promises_nothing_it_has_not_stored() {
    let (disk, b, a) = common::on_small_disk(16, unlimited).await;
    // B's disk is full, and so is its database.
    disk.fill();
    fill_database(&a, &b).await;
    let mut new = new_task(&b, "summarise");
    new.input = json!({"text": "y".repeat(20_000)});
    let id = a.handle.delegate(new).await.expect("stored at A").task_id;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // B's agent works on whatever B holds: a change B cannot store is undone
    // back to the task as B had it, not to nothing.
    let working = TaskChange::Status {
        task_id: id.clone(),
        state: State::Working,
        message: None,
    };
    let refused = b.handle.change_task(working).await;
    assert!(
        matches!(refused, Err(NodeError::Storage(_))),
        "B's full disk stored the change: {:?}",
        refused.map(|t| t.state)
    );
    let held = b.handle.task(id.clone()).await;
    assert!(held.is_ok(), "B forgot the task it took: {held:?}");

    // With room again, B stores what it kept and A hears of it; what A was
    // told B has, B still has after a restart.
    disk.free();
    let synced = wait_task(&a, &id, |t| t.peer_synced).await;
    assert_eq!(synced.role, Role::Delegator);
    let b = restart(b, TCP, unlimited).await;
    let held = b
        .handle
        .task(id.clone())
        .await
        .expect("B kept the task it answered for");
    assert!(
        matches!(held.state, State::Submitted | State::Working),
        "{held:?}"
    );
}

/// [`tune`] without rate limits: the full-disk tests send until refused.
fn unlimited(c: &mut peer_node::Config) {
    tune(c);
    c.rate_limits.enabled = false;
}

/// Messages of 20 KB from `from` to `to`, whose disk is full, until one is
/// refused: `to`'s database has no free page left either.
async fn fill_database(from: &TestNode, to: &TestNode) {
    let text = "x".repeat(20_000);
    for n in 0..2_000 {
        let payload = json!({ "n": n, "text": text }).to_string();
        let message = "message".parse().expect("type");
        if from
            .handle
            .send(to.handle.entity_id(), message, payload)
            .await
            .is_err()
        {
            return;
        }
    }
    panic!("2,000 messages of 20 KB fitted on a full disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_that_cannot_be_stored_is_kept_and_stored_once_there_is_room() {
    let (disk, b, a) = common::on_small_disk(16, unlimited).await;
    let mut new = new_task(&b, "summarise");
    new.deadline_s = Some(3);
    let id = a.handle.delegate(new).await.expect("stored at A").task_id;
    in_state(&b, &id, State::Submitted).await;
    disk.fill();
    fill_database(&a, &b).await;

    // The deadline passes on a full disk: B keeps the expiry it cannot store.
    let expired = in_state(&b, &id, State::Failed).await;
    assert_eq!(expired.message.as_deref(), Some("the deadline passed"));
    let mut events = b.handle.subscribe();

    // With room again, B writes it again and its agent hears of it once it
    // is stored; it is there after a restart.
    disk.free();
    let stored = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(Event::TaskUpdate { task, .. }) if task.task_id == id => break task,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the kept expiry is stored within 10 s");
    assert_eq!(stored.state, State::Failed);
    let b = restart(b, TCP, unlimited).await;
    let held = b.handle.task(id).await.expect("B stored the task");
    assert_eq!(held.state, State::Failed);
}
