//! Task delegation with the A2A lifecycle ([`task`]): the delegating agent
//! hands a task to a peer (`task_delegate`), the assignee's agent reports
//! (`task_status`) and completes it (`task_result`), the delegator may call it
//! off (`task_cancel`). All four are sealed, in the `task` rate class.
//!
//! Both sides keep every task in the node's database (written through the
//! inbox writer, so a task is stored before the `task_update` event that
//! announces it, and that event before its sender is told "accepted"), and in
//! memory, bounded by `tasks.max_tasks` and `tasks.max_bytes`. A change the
//! peer could not be told (it was not connected, or the node stopped) stays
//! marked `peer_synced: false` and is sent again when the peer connects, and
//! every `tasks.resend_secs`. Deadlines expire tasks on both sides.

mod config;
mod store;
pub mod task;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, Rejection};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::actor::Reply as Answerer;
use crate::node::{Event, NodeError};
use crate::service::{
    Answer, Context, Inbound, Outcome, PeerEvent, Refused, Reply, RequestId, Route, Service,
};
use crate::services::card::CardCell;
use crate::store::{Store, StoreError};

pub use config::TasksConfig;
use task::{
    Actor, Applied, Artifact, Cancel, Delegate, NewTask, Role, State, Status, Task, TaskResult,
};

/// `task_delegate`.
pub const DELEGATE: &str = "task_delegate";
/// `task_status`.
pub const STATUS: &str = "task_status";
/// `task_result`.
pub const RESULT: &str = "task_result";
/// `task_cancel`.
pub const CANCEL: &str = "task_cancel";

/// What the tasks service takes from handles (the API).
#[derive(Debug)]
pub enum Command {
    /// A new task; answered once it is stored.
    Delegate {
        /// What the agent asks for.
        task: NewTask,
        /// Where the task goes.
        reply: Answerer<Task>,
    },
    /// One task.
    Get {
        /// Its id.
        task_id: String,
        /// Where it goes.
        reply: Answerer<Task>,
    },
    /// Tasks of a role and state, if given: submitted ones by priority then
    /// age, others oldest first.
    List {
        /// Only this side.
        role: Option<Role>,
        /// Only this state.
        state: Option<State>,
        /// Where they go.
        reply: oneshot::Sender<Vec<Task>>,
    },
    /// The delegator calls a task off.
    Cancel {
        /// Its id.
        task_id: String,
        /// Why.
        message: Option<String>,
        /// Where the task goes.
        reply: Answerer<Task>,
    },
    /// The assignee's agent reports a new state.
    Status {
        /// Its id.
        task_id: String,
        /// `working`, `input-required`, `failed` or `rejected`.
        state: State,
        /// Why, or what is needed.
        message: Option<String>,
        /// Where the task goes.
        reply: Answerer<Task>,
    },
    /// The assignee's agent completes a task.
    Complete {
        /// Its id.
        task_id: String,
        /// The output.
        output: Value,
        /// Named outputs.
        artifacts: Vec<Artifact>,
        /// Where the task goes.
        reply: Answerer<Task>,
    },
}

/// A change to tell a peer, on its way.
struct Syncing {
    task_id: String,
    /// The task's `updated_ms` when it was sent: a reply to an older change
    /// does not mark a newer one told.
    version: u64,
    /// Whether it is the second try after the peer had lost the session it
    /// was sealed in.
    again: bool,
}

/// A task's write on its way to the database.
struct Write {
    /// The task as written (shared with the write itself, which lets go of
    /// it before this is told: no second copy of a large result).
    task: Arc<Task>,
    /// The API call answered once it is stored.
    reply: Option<Answerer<Task>>,
}

/// A task whose latest change is not known to be stored: it is not sent to
/// its peer until it is, so a peer never learns a change this node may lose.
/// If the last write failed, an agent's change is undone (the task goes back
/// to what the database holds); any other change is kept and written again
/// every `tasks.resend_secs`.
#[derive(Debug)]
struct Unstored {
    /// Its writes on their way.
    writes: u32,
    /// Whether the last one finished failed.
    failed: bool,
    /// The copy the database holds (`None`: none).
    on_disk: Option<Task>,
    /// The latest change that is kept even if its write fails (a peer's, a
    /// deadline's, an acknowledgement), with its write's token: what an
    /// agent's failed change goes back to, rather than [`Unstored::on_disk`].
    /// Shared with its write; gone once it or a later write is stored.
    kept: Option<(u64, Arc<Task>)>,
}

/// The tasks of both roles, and the changes on their way to peers.
pub struct Tasks {
    config: TasksConfig,
    card: CardCell,
    tasks: HashMap<String, Task>,
    /// Bytes the tasks hold ([`Task::size`]).
    bytes: u64,
    /// Open tasks with a deadline, by deadline (wall ms).
    deadlines: BTreeSet<(u64, String)>,
    /// Requests in flight, by request.
    sending: HashMap<RequestId, Syncing>,
    /// Tasks with a request in flight.
    in_flight: HashSet<String>,
    /// Writes on their way, by token.
    waiting: HashMap<u64, Write>,
    /// Tasks whose latest change is not stored yet, or failed to be.
    unstored: HashMap<String, Unstored>,
    next_token: u64,
    /// When the timer next looks at deadlines and unsynced tasks (monotonic ms).
    tick_at: Option<u64>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("tasks", &self.tasks.len())
            .field("bytes", &self.bytes)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

fn refuse(code: ErrorCode, reason: impl Into<String>) -> Refused {
    Rejection::new(code, reason).into()
}

fn not_found(task_id: &str) -> NodeError {
    NodeError::NotFound(format!("no task {task_id} here"))
}

fn invalid_state(r: Rejection) -> NodeError {
    NodeError::Rejected {
        code: r.code.to_string(),
        reason: r.reason,
        retry_after_ms: None,
    }
}

/// Codes after which sending the same change again cannot help.
fn is_final_refusal(e: &NodeError) -> bool {
    match e {
        NodeError::Rejected { code, .. } => ![
            ErrorCode::RateLimited,
            ErrorCode::InboxFull,
            ErrorCode::Unavailable,
            ErrorCode::SessionNotFound,
            ErrorCode::SessionExpired,
            ErrorCode::HandshakeInProgress,
            ErrorCode::EncryptionNotReady,
            ErrorCode::ChallengeExpired,
        ]
        .iter()
        .any(|c| c.as_str() == code),
        NodeError::TooLarge { .. } | NodeError::Invalid(_) => true,
        _ => false,
    }
}

/// Bytes an envelope takes beyond its payload, at most (header, session,
/// AEAD tag), with room to spare.
const ENVELOPE_OVERHEAD: usize = 1024;

/// Longest status or cancel message, in bytes.
pub const MAX_MESSAGE: usize = 4096;

/// `Invalid` for a status message longer than [`MAX_MESSAGE`].
fn check_message(message: Option<&String>) -> Result<(), NodeError> {
    match message {
        Some(m) if m.len() > MAX_MESSAGE => Err(NodeError::Invalid(format!(
            "a task's message is at most {MAX_MESSAGE} bytes, not {}",
            m.len()
        ))),
        _ => Ok(()),
    }
}

/// The most bytes of a task message that fit one envelope.
fn envelope_limit(cx: &Context<'_>) -> usize {
    cx.config()
        .protocol
        .max_envelope_size
        .saturating_sub(ENVELOPE_OVERHEAD)
}

/// `TooLarge` if `message`, encoded, does not fit one envelope.
fn fits(cx: &Context<'_>, message: &impl serde::Serialize) -> Result<(), NodeError> {
    within(message, envelope_limit(cx) as u64)
}

/// `TooLarge` if `message`, encoded, is larger than a chunked transfer may
/// be (`transfer.max_message_size`): a larger one goes as one.
fn fits_transfer(cx: &Context<'_>, message: &impl serde::Serialize) -> Result<(), NodeError> {
    within(message, cx.config().transfer.max_message_size)
}

fn within(message: &impl serde::Serialize, limit: u64) -> Result<(), NodeError> {
    let size = serde_json::to_vec(message).map_or(u64::MAX, |b| b.len() as u64);
    if size > limit {
        return Err(NodeError::TooLarge { size, limit });
    }
    Ok(())
}

impl Tasks {
    /// The tasks stored in `store`, served under `config`, checking skills
    /// against the node's own card in `card`.
    pub fn load(store: &Store, config: TasksConfig, card: CardCell) -> Result<Self, StoreError> {
        let mut tasks = Self {
            config,
            card,
            tasks: HashMap::new(),
            bytes: 0,
            deadlines: BTreeSet::new(),
            sending: HashMap::new(),
            in_flight: HashSet::new(),
            waiting: HashMap::new(),
            unstored: HashMap::new(),
            next_token: 0,
            // The first timer looks at deadlines that passed while the node
            // was stopped.
            tick_at: Some(0),
        };
        for task in store::load(store)? {
            tasks.insert(task);
        }
        Ok(tasks)
    }

    fn insert(&mut self, task: Task) {
        // The old copy's index first: the new copy may have the same deadline.
        if let Some(old) = self.tasks.remove(&task.task_id) {
            self.forget_index(&old);
        }
        self.bytes += task.size();
        if let (false, Some(d)) = (task.state.is_terminal(), task.deadline_ms) {
            self.deadlines.insert((d, task.task_id.clone()));
        }
        self.tasks.insert(task.task_id.clone(), task);
    }

    fn forget_index(&mut self, old: &Task) {
        self.bytes = self.bytes.saturating_sub(old.size());
        if let Some(d) = old.deadline_ms {
            self.deadlines.remove(&(d, old.task_id.clone()));
        }
    }

    /// Replaces a task with its changed copy, stores it and tells the agent;
    /// once it is stored, `reply` is answered and the peer told of the change
    /// ([`Tasks::on_persisted`]).
    fn save(&mut self, cx: &mut Context<'_>, task: Task, reply: Option<Answerer<Task>>) {
        self.write(cx, &task, reply);
        let event = Event::TaskUpdate {
            event_id: None,
            task: Box::new(task.clone()),
        };
        // A task update is this node's own event: the inbox never refuses it.
        _ = cx.deliver(event);
        self.insert(task);
        self.rearm(cx);
    }

    /// Room for one more task of `size` bytes: forgets the terminal tasks
    /// changed longest ago while the bounds are reached; `false` if there is
    /// no room even so.
    fn make_room(&mut self, cx: &mut Context<'_>, size: u64) -> bool {
        let full =
            |t: &Self| t.tasks.len() >= t.config.max_tasks || t.bytes + size > t.config.max_bytes;
        if !full(self) {
            return true;
        }
        let mut done: Vec<(u64, String)> = self
            .tasks
            .values()
            .filter(|t| {
                t.state.is_terminal() && t.peer_synced && !self.unstored.contains_key(&t.task_id)
            })
            .map(|t| (t.updated_ms, t.task_id.clone()))
            .collect();
        done.sort();
        let mut forgotten = Vec::new();
        for (_, id) in done {
            if !full(self) {
                break;
            }
            if let Some(old) = self.tasks.remove(&id) {
                self.forget_index(&old);
                self.unstored.remove(&id);
                forgotten.push(id);
            }
        }
        if !forgotten.is_empty() {
            cx.persist(
                Box::new(move |txn| forgotten.iter().try_for_each(|id| store::delete(txn, id))),
                None,
            );
        }
        !full(self)
    }

    fn submitted(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| t.role == Role::Assignee && t.state == State::Submitted)
            .count()
    }

    /// Sends the peer the task's latest change, unless one is on its way.
    fn sync(&mut self, cx: &mut Context<'_>, task_id: &str) {
        self.sync_try(cx, task_id, false);
    }

    fn sync_try(&mut self, cx: &mut Context<'_>, task_id: &str, again: bool) {
        let Some(task) = self.tasks.get(task_id) else {
            return;
        };
        if task.peer_synced
            || self.in_flight.contains(task_id)
            || self.unstored.contains_key(task_id)
        {
            return;
        }
        if !cx.is_connected(&task.peer) {
            // Discovery finds and dials it; the change goes once it connects.
            cx.want(task.peer);
            return;
        }
        let (msg_type, payload) = match (task.role, task.state) {
            (Role::Delegator, State::Submitted) => (
                DELEGATE,
                serde_json::to_vec(&Delegate {
                    task_id: task.task_id.clone(),
                    skill: task.skill.clone(),
                    input: task.input.clone(),
                    priority: task.priority,
                    deadline_ms: task.deadline_ms,
                }),
            ),
            (Role::Delegator, State::Canceled) => (
                CANCEL,
                serde_json::to_vec(&Cancel {
                    task_id: task.task_id.clone(),
                    message: task.message.clone(),
                }),
            ),
            (Role::Assignee, State::Completed) => (
                RESULT,
                serde_json::to_vec(&TaskResult {
                    task_id: task.task_id.clone(),
                    output: task.output.clone().unwrap_or(Value::Null),
                    artifacts: task.artifacts.clone(),
                }),
            ),
            (Role::Assignee, state) => (
                STATUS,
                serde_json::to_vec(&Status {
                    task_id: task.task_id.clone(),
                    state,
                    message: task.message.clone(),
                }),
            ),
            // The delegator's own expiry: the assignee expires it too.
            (Role::Delegator, _) => {
                let mut told = task.clone();
                told.peer_synced = true;
                self.save_quietly(cx, told);
                return;
            }
        };
        let Ok(payload) = payload else {
            return;
        };
        let to = task.peer;
        let version = task.updated_ms;
        // A result larger than a chunk goes as a chunked transfer; the other
        // changes fit one envelope (checked when they were made), and a
        // receiver takes no transfer of them (PROTOCOL.md §9.4, M1).
        let chunked = msg_type == RESULT;
        let msg_type = msg_type.parse().expect("valid types");
        let id = if chunked {
            cx.send_message(to, msg_type, payload)
        } else {
            cx.send(to, msg_type, payload)
        };
        self.in_flight.insert(task_id.to_owned());
        self.sending.insert(
            id,
            Syncing {
                task_id: task_id.to_owned(),
                version,
                again,
            },
        );
    }

    /// Stores a task whose change the agent need not hear of again (it was
    /// only marked told).
    fn save_quietly(&mut self, cx: &mut Context<'_>, task: Task) {
        self.write(cx, &task, None);
        self.insert(task);
    }

    /// Queues the write of `task`; [`Tasks::on_persisted`] hears how it went.
    fn write(&mut self, cx: &mut Context<'_>, task: &Task, reply: Option<Answerer<Task>>) {
        let token = self.token();
        let on_disk = self.tasks.get(&task.task_id);
        let u = self
            .unstored
            .entry(task.task_id.clone())
            .or_insert_with(|| Unstored {
                writes: 0,
                failed: false,
                // With no write on its way or failed, memory is what is stored.
                on_disk: on_disk.cloned(),
                kept: None,
            });
        u.writes += 1;
        let task = Arc::new(task.clone());
        if reply.is_none() {
            u.kept = Some((token, Arc::clone(&task)));
        }
        let to_store = Arc::clone(&task);
        cx.persist(Box::new(move |txn| store::put(txn, &to_store)), Some(token));
        self.waiting.insert(token, Write { task, reply });
    }

    /// A task whose agent's change failed to be stored goes back to the copy
    /// the database holds, or is forgotten if it holds none, so that memory,
    /// disk and the peer agree; the agent hears of the copy it goes back to.
    /// Its peer hears of that copy, if it has not, at the next resend.
    fn revert(&mut self, cx: &mut Context<'_>, task_id: &str, on_disk: Option<Task>) {
        match on_disk {
            Some(task) => {
                let event = Event::TaskUpdate {
                    event_id: None,
                    task: Box::new(task.clone()),
                };
                _ = cx.deliver(event);
                self.insert(task);
            }
            None => {
                if let Some(old) = self.tasks.remove(task_id) {
                    self.forget_index(&old);
                }
            }
        }
        self.rearm(cx);
    }

    /// Sets the timer: the earliest deadline, and the next resend while a
    /// change waits for its peer.
    fn rearm(&mut self, cx: &Context<'_>) {
        let now = cx.now_ms();
        let wall = cx.wall_ms();
        let deadline = self
            .deadlines
            .first()
            .map(|(d, _)| now.saturating_add(d.saturating_sub(wall)));
        let resend = (self.tasks.values().any(|t| !t.peer_synced)
            || self.unstored.values().any(|u| u.failed && u.writes == 0))
        .then(|| now.saturating_add(self.config.resend_secs.saturating_mul(1000)));
        // An earlier tick still pending stays: activity must not keep
        // pushing the resends back.
        self.tick_at = [self.tick_at, deadline, resend].into_iter().flatten().min();
    }

    fn task_of(&self, task_id: &str, role: Role, peer: EntityId) -> Result<&Task, Refused> {
        self.tasks
            .get(task_id)
            .filter(|t| t.role == role && t.peer == peer)
            .ok_or_else(|| {
                refuse(
                    ErrorCode::InvalidState,
                    format!("no task {task_id} of yours here"),
                )
            })
    }

    /// A peer's change to a task of `role` with it.
    fn peer_change(
        &mut self,
        cx: &mut Context<'_>,
        from: EntityId,
        role: Role,
        task_id: &str,
        change: impl FnOnce(&mut Task, u64) -> Result<Applied, Rejection>,
    ) -> Answer {
        let mut task = match self.task_of(task_id, role, from) {
            Ok(t) => t.clone(),
            Err(r) => return r.into(),
        };
        match change(&mut task, cx.wall_ms()) {
            Ok(Applied::Moved) => {
                // The peer told us: nothing to tell it back.
                task.peer_synced = true;
                self.save(cx, task, None);
                Answer::Accepted
            }
            Ok(Applied::Same) => match self.not_stored_yet(task_id) {
                Some(refused) => refused,
                None => Answer::Accepted,
            },
            Err(r) => r.into(),
        }
    }

    /// `UNAVAILABLE` with `tasks.retry_after_secs`, to a peer's repeat about
    /// a task whose latest change is not stored yet: answering it from memory
    /// would promise what this node may lose.
    fn not_stored_yet(&self, task_id: &str) -> Option<Answer> {
        self.unstored.contains_key(task_id).then(|| {
            let wait = std::time::Duration::from_secs(self.config.retry_after_secs);
            Refused {
                rejection: Rejection::new(
                    ErrorCode::Unavailable,
                    format!(
                        "task {task_id} is not stored yet; retry after {} ms",
                        wait.as_millis()
                    ),
                ),
                retry_after: Some(wait),
            }
            .into()
        })
    }

    fn on_delegate(&mut self, cx: &mut Context<'_>, from: EntityId, payload: &[u8]) -> Answer {
        let d: Delegate = match serde_json::from_slice(payload) {
            Ok(d) => d,
            Err(e) => {
                return refuse(ErrorCode::MalformedMessage, format!("task_delegate: {e}")).into();
            }
        };
        if uuid::Uuid::parse_str(&d.task_id).is_err()
            || d.skill.is_empty()
            || d.skill.len() > 128
            || d.priority > 9
        {
            return refuse(
                ErrorCode::MalformedMessage,
                "task_delegate: task_id must be a UUID, skill 1 to 128 bytes, priority 0 to 9",
            )
            .into();
        }
        let task_id = d.task_id.clone();
        let status = |state: State, message: Option<String>| {
            let s = Status {
                task_id: task_id.clone(),
                state,
                message,
            };
            Answer::Reply {
                msg_type: STATUS.parse().expect("valid"),
                payload: serde_json::to_vec(&s).unwrap_or_default(),
            }
        };
        if let Some(held) = self.tasks.get(&d.task_id) {
            if held.role == Role::Assignee && held.peer == from {
                if let Some(refused) = self.not_stored_yet(&d.task_id) {
                    return refused;
                }
                // A repeat: the task it made, as it is now (with its result,
                // if it is completed).
                if held.state == State::Completed {
                    let result = TaskResult {
                        task_id: held.task_id.clone(),
                        output: held.output.clone().unwrap_or(Value::Null),
                        artifacts: held.artifacts.clone(),
                    };
                    let payload = serde_json::to_vec(&result).unwrap_or_default();
                    // A result too large for a reply goes as a transfer of
                    // its own (sync); the reply only says it is completed.
                    if payload.len() <= envelope_limit(cx) {
                        return Answer::Reply {
                            msg_type: RESULT.parse().expect("valid"),
                            payload,
                        };
                    }
                }
                return status(held.state, held.message.clone());
            }
            return refuse(
                ErrorCode::InvalidState,
                format!("task id {} is taken here", d.task_id),
            )
            .into();
        }
        let offered = self
            .card
            .get()
            .is_some_and(|c| c.card().skills.iter().any(|s| s.id == d.skill));
        if !offered {
            let skills: Vec<String> = self
                .card
                .get()
                .map(|c| c.card().skills.iter().map(|s| s.id.clone()).collect())
                .unwrap_or_default();
            return status(
                State::Rejected,
                Some(format!(
                    "unknown skill {:?}: this agent's card offers {}",
                    d.skill,
                    if skills.is_empty() {
                        "none".to_owned()
                    } else {
                        skills.join(", ")
                    }
                )),
            );
        }
        let now = cx.wall_ms();
        if d.deadline_ms.is_some_and(|t| t <= now) {
            return status(
                State::Failed,
                Some("its deadline had passed when it arrived".into()),
            );
        }
        let task = Task::submitted(d, Role::Assignee, from, now);
        let wait = std::time::Duration::from_secs(self.config.retry_after_secs);
        if self.submitted() >= self.config.max_submitted || !self.make_room(cx, task.size()) {
            return Refused {
                rejection: Rejection::new(
                    ErrorCode::InboxFull,
                    format!(
                        "this agent's task queue is full; retry after {} ms",
                        wait.as_millis()
                    ),
                ),
                retry_after: Some(wait),
            }
            .into();
        }
        self.save(cx, task, None);
        status(State::Submitted, None)
    }

    /// An API change to a task: applied, stored, told to the agent and the
    /// peer; the answer goes once it is stored.
    fn local_change(
        &mut self,
        cx: &mut Context<'_>,
        task_id: &str,
        role: Role,
        reply: Answerer<Task>,
        change: impl FnOnce(&mut Task, u64) -> Result<Applied, Rejection>,
    ) {
        let Some(task) = self.tasks.get(task_id).filter(|t| t.role == role) else {
            let e = match self.tasks.get(task_id) {
                Some(_) => invalid_state(Rejection::new(
                    ErrorCode::InvalidState,
                    format!(
                        "task {task_id} is not one this node is {} of",
                        match role {
                            Role::Assignee => "the assignee",
                            Role::Delegator => "the delegator",
                        }
                    ),
                )),
                None => not_found(task_id),
            };
            _ = reply.send(Err(e));
            return;
        };
        let mut task = task.clone();
        match change(&mut task, cx.wall_ms()) {
            Ok(Applied::Moved) => {
                task.peer_synced = false;
                self.save(cx, task, Some(reply));
            }
            Ok(Applied::Same) => _ = reply.send(Ok(task)),
            Err(r) => _ = reply.send(Err(invalid_state(r))),
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn delegate(&mut self, cx: &mut Context<'_>, new: NewTask, reply: Answerer<Task>) {
        let NewTask {
            to,
            skill,
            input,
            deadline_s,
            priority,
        } = new;
        if skill.is_empty()
            || skill.len() > 128
            || priority.is_some_and(|p| p > 9)
            || to == cx.local()
        {
            _ = reply.send(Err(NodeError::Invalid(
                "a task needs a skill of 1 to 128 bytes, a priority of 0 to 9 and another node as `to`".into(),
            )));
            return;
        }
        let now = cx.wall_ms();
        let on_the_wire = Delegate {
            task_id: uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string(),
            skill,
            input,
            priority: priority.unwrap_or_else(task::default_priority),
            deadline_ms: deadline_s.map(|s| now.saturating_add(s.saturating_mul(1000))),
        };
        if let Err(e) = fits(cx, &on_the_wire) {
            _ = reply.send(Err(e));
            return;
        }
        let task = Task::submitted(on_the_wire, Role::Delegator, to, now);
        if !self.make_room(cx, task.size()) {
            _ = reply.send(Err(NodeError::Busy(self.tasks.len())));
            return;
        }
        self.save(cx, task, Some(reply));
    }

    /// The reply to a change sent to a peer.
    fn told(&mut self, cx: &mut Context<'_>, syncing: Syncing, outcome: Outcome) {
        let Syncing {
            task_id,
            version,
            again,
        } = syncing;
        self.in_flight.remove(&task_id);
        if outcome.lost_session() && !again {
            // The peer restarted or dropped the session; the node has dropped
            // it too, so this send runs a new handshake.
            self.sync_try(cx, &task_id, true);
            return;
        }
        let Some(task) = self.tasks.get(&task_id).cloned() else {
            return;
        };
        match outcome.result {
            Ok(reply) => {
                let mut task = task;
                let current = task.updated_ms == version;
                if let Reply::Envelope(env) = reply
                    && answer_to_delegation(&mut task, &env, cx.wall_ms())
                {
                    task.peer_synced = current;
                    self.save(cx, task, None);
                    return;
                }
                if current {
                    task.peer_synced = true;
                    self.save_quietly(cx, task);
                } else {
                    self.sync(cx, &task_id);
                }
            }
            Err(e) if is_final_refusal(&e) => {
                let mut task = task;
                task.peer_synced = true;
                if task.role == Role::Delegator && task.state == State::Submitted {
                    // The peer will not take it.
                    let message = format!("the assignee's node refused it: {e}");
                    if task
                        .apply(State::Rejected, Actor::Node, Some(message), cx.wall_ms())
                        .is_ok()
                    {
                        self.save(cx, task, None);
                        return;
                    }
                }
                tracing::debug!(task = %task_id, error = %e, "peer refused a task change");
                self.save_quietly(cx, task);
            }
            // Not told this time: again when the peer is back, or at the next tick.
            Err(_) => self.rearm(cx),
        }
    }

    /// Expires the tasks whose deadline passed, and offers unsynced changes
    /// to connected peers again.
    fn tick(&mut self, cx: &mut Context<'_>) {
        self.tick_at = None;
        let wall = cx.wall_ms();
        let due: Vec<String> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= wall)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            let Some(mut task) = self.tasks.get(&id).cloned() else {
                continue;
            };
            if task
                .apply(
                    State::Failed,
                    Actor::Node,
                    Some("the deadline passed".into()),
                    wall,
                )
                .is_ok()
            {
                task.peer_synced = task.role == Role::Delegator;
                self.save(cx, task, None);
            }
        }
        // Kept changes whose write failed: written again.
        let unwritten: Vec<Task> = self
            .unstored
            .iter()
            .filter(|(_, u)| u.failed && u.writes == 0)
            .filter_map(|(id, _)| self.tasks.get(id).cloned())
            .collect();
        for task in unwritten {
            // With its event: the agent likely missed the one that failed.
            self.save(cx, task, None);
        }
        let unsynced: Vec<String> = self
            .tasks
            .values()
            .filter(|t| !t.peer_synced)
            .map(|t| t.task_id.clone())
            .collect();
        for id in unsynced {
            self.sync(cx, &id);
        }
        self.rearm(cx);
    }
}

/// Applies the assignee's answer to a `task_delegate` when it took the task
/// in another state than `submitted` (it rejected it, or the delegation was a
/// repeat of one that moved on: a `task_status`, or a `task_result` for a
/// completed task); whether the task moved.
fn answer_to_delegation(task: &mut Task, env: &peer_core::Envelope, now_ms: u64) -> bool {
    if env.msg_type == *RESULT {
        let Ok(result) = serde_json::from_slice::<TaskResult>(&env.payload) else {
            return false;
        };
        if result.task_id != task.task_id
            || !task
                .apply(State::Completed, Actor::Assignee, None, now_ms)
                .is_ok_and(|a| a == Applied::Moved)
        {
            return false;
        }
        task.output = Some(result.output);
        task.artifacts = result.artifacts;
        return true;
    }
    let Ok(status) = serde_json::from_slice::<Status>(&env.payload) else {
        return false;
    };
    env.msg_type == *STATUS
        && status.task_id == task.task_id
        && !matches!(status.state, State::Submitted | State::Completed)
        && task
            .apply(status.state, Actor::Assignee, status.message, now_ms)
            .is_ok_and(|a| a == Applied::Moved)
}

impl Service for Tasks {
    type Command = Command;

    fn name(&self) -> &'static str {
        "tasks"
    }

    fn routes(&self) -> Vec<Route> {
        [DELEGATE, STATUS, RESULT, CANCEL]
            .iter()
            .map(|t| Route::sealed(t, Class::Task))
            .map(|r| if r.msg_type == *RESULT { r.large() } else { r })
            .collect()
    }

    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let from = msg.from;
        match msg.msg_type.as_str() {
            DELEGATE => self.on_delegate(cx, from, &msg.payload),
            STATUS => match serde_json::from_slice::<Status>(&msg.payload) {
                Ok(s) => self.peer_change(cx, from, Role::Delegator, &s.task_id.clone(), |t, now| {
                    if matches!(s.state, State::Completed | State::Canceled) {
                        return Err(Rejection::new(
                            ErrorCode::InvalidState,
                            "a task is completed with task_result and canceled by its delegator",
                        ));
                    }
                    t.apply(s.state, Actor::Assignee, s.message, now)
                }),
                Err(e) => refuse(ErrorCode::MalformedMessage, format!("task_status: {e}")).into(),
            },
            RESULT => match serde_json::from_slice::<TaskResult>(&msg.payload) {
                Ok(r) => self.peer_change(cx, from, Role::Delegator, &r.task_id.clone(), |t, now| {
                    let applied = t.apply(State::Completed, Actor::Assignee, None, now)?;
                    if applied == Applied::Moved {
                        t.output = Some(r.output);
                        t.artifacts = r.artifacts;
                    }
                    Ok(applied)
                }),
                Err(e) => refuse(ErrorCode::MalformedMessage, format!("task_result: {e}")).into(),
            },
            CANCEL => match serde_json::from_slice::<Cancel>(&msg.payload) {
                Ok(c) => self.peer_change(cx, from, Role::Assignee, &c.task_id.clone(), |t, now| {
                    t.apply(State::Canceled, Actor::Delegator, c.message, now)
                }),
                Err(e) => refuse(ErrorCode::MalformedMessage, format!("task_cancel: {e}")).into(),
            },
            other => refuse(
                ErrorCode::UnsupportedMsgType,
                format!("tasks takes no {other} requests"),
            )
            .into(),
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: Command) {
        let message = match &command {
            Command::Cancel { message, .. } | Command::Status { message, .. } => message.as_ref(),
            _ => None,
        };
        if let Err(e) = check_message(message) {
            match command {
                Command::Cancel { reply, .. } | Command::Status { reply, .. } => {
                    _ = reply.send(Err(e));
                }
                _ => {}
            }
            return;
        }
        match command {
            Command::Delegate { task, reply } => self.delegate(cx, task, reply),
            Command::Get { task_id, reply } => {
                _ = reply.send(self.tasks.get(&task_id).cloned().ok_or_else(|| not_found(&task_id)));
            }
            Command::List { role, state, reply } => {
                let mut list: Vec<Task> = self
                    .tasks
                    .values()
                    .filter(|t| role.is_none_or(|r| t.role == r))
                    .filter(|t| state.is_none_or(|s| t.state == s))
                    .cloned()
                    .collect();
                if state == Some(State::Submitted) {
                    list.sort_by_key(Task::queue_key);
                } else {
                    list.sort_by(|a, b| (a.created_ms, &a.task_id).cmp(&(b.created_ms, &b.task_id)));
                }
                _ = reply.send(list);
            }
            Command::Cancel {
                task_id,
                message,
                reply,
            } => self.local_change(cx, &task_id, Role::Delegator, reply, |t, now| {
                t.apply(State::Canceled, Actor::Delegator, message, now)
            }),
            Command::Status {
                task_id,
                state,
                message,
                reply,
            } => self.local_change(cx, &task_id, Role::Assignee, reply, |t, now| {
                if matches!(state, State::Completed | State::Canceled | State::Submitted) {
                    return Err(Rejection::new(
                        ErrorCode::InvalidState,
                        "an assignee reports working, input-required, failed or rejected; it completes a task with POST /v1/tasks/{id}/result",
                    ));
                }
                t.apply(state, Actor::Assignee, message, now)
            }),
            Command::Complete {
                task_id,
                output,
                artifacts,
                reply,
            } => {
                let on_the_wire = TaskResult {
                    task_id: task_id.clone(),
                    output,
                    artifacts,
                };
                if let Err(e) = fits_transfer(cx, &on_the_wire) {
                    _ = reply.send(Err(e));
                    return;
                }
                let TaskResult {
                    output, artifacts, ..
                } = on_the_wire;
                self.local_change(cx, &task_id, Role::Assignee, reply, |t, now| {
                let applied = t.apply(State::Completed, Actor::Assignee, None, now)?;
                t.output = Some(output);
                t.artifacts = artifacts;
                Ok(applied)
            })
            }
        }
    }

    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        if let Some(syncing) = self.sending.remove(&id) {
            self.told(cx, syncing, outcome);
        }
    }

    fn on_persisted(&mut self, cx: &mut Context<'_>, token: u64, result: Result<(), String>) {
        let Some(Write { task, reply }) = self.waiting.remove(&token) else {
            return;
        };
        let task_id = task.task_id.clone();
        // The agent's change is answered with the copy it wrote.
        let answer = reply.map(|reply| {
            let answer = match &result {
                Ok(()) => Ok(Task::clone(&task)),
                Err(e) => Err(NodeError::Storage(format!(
                    "the task could not be stored: {e}"
                ))),
            };
            (reply, answer)
        });
        // Writes finish in the order they were queued: the last one decides.
        let last = match self.unstored.get_mut(&task_id) {
            Some(u) => {
                u.writes = u.writes.saturating_sub(1);
                u.failed = result.is_err();
                if result.is_ok() {
                    // Writes finish in order, and a later one was made on top
                    // of the kept change: stored, it holds that change too.
                    if u.kept.as_ref().is_some_and(|(kept, _)| *kept <= token) {
                        u.kept = None;
                    }
                    u.on_disk = Some(Arc::unwrap_or_clone(task));
                }
                u.writes == 0
            }
            None => false,
        };
        match (last, result.is_ok()) {
            (true, true) => {
                self.unstored.remove(&task_id);
                self.sync(cx, &task_id);
            }
            // The agent is told it failed: its change is undone, back to
            // the copy stored, or to a kept change still to be written.
            (true, false) if answer.is_some() => {
                let kept = self.unstored.get(&task_id).and_then(|u| u.kept.as_ref());
                match kept.map(|(_, kept)| Task::clone(kept)) {
                    // Its entry stays, failed: the timer writes it again.
                    Some(kept) => self.revert(cx, &task_id, Some(kept)),
                    None => {
                        if let Some(u) = self.unstored.remove(&task_id) {
                            self.revert(cx, &task_id, u.on_disk);
                        }
                    }
                }
            }
            // A peer's change (answered as its event was stored), a deadline
            // or a peer's acknowledgement: kept, and written again by the
            // timer until it is stored.
            (true, false) => self.rearm(cx),
            (false, _) => {}
        }
        if let Some((reply, answer)) = answer {
            _ = reply.send(answer);
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.tick_at
    }

    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        self.tick(cx);
    }

    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        if let PeerEvent::Connected(peer) = event {
            let unsynced: Vec<String> = self
                .tasks
                .values()
                .filter(|t| t.peer == peer && !t.peer_synced)
                .map(|t| t.task_id.clone())
                .collect();
            for id in unsynced {
                self.sync(cx, &id);
            }
        }
    }
}
