//! A delegated task and its lifecycle, as A2A has it: `submitted` → `working`
//! ⇄ `input-required` → `completed` | `failed` | `canceled` | `rejected`.
//! Pure: times are passed in.

use peer_core::{EntityId, ErrorCode, Rejection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Handed to the assignee; nobody works on it yet.
    Submitted,
    /// The assignee's agent works on it.
    Working,
    /// The assignee's agent waits for more from the delegator.
    InputRequired,
    /// Done, with an output.
    Completed,
    /// Given up: by the assignee, or its deadline passed.
    Failed,
    /// Called off by the delegator.
    Canceled,
    /// Refused by the assignee (or its node: a skill its card does not offer).
    Rejected,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 7] = [
        Self::Submitted,
        Self::Working,
        Self::InputRequired,
        Self::Completed,
        Self::Failed,
        Self::Canceled,
        Self::Rejected,
    ];

    /// Whether the task can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Canceled | Self::Rejected
        )
    }

    /// The name on the wire and in the API (`input-required`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Working => "working",
            Self::InputRequired => "input-required",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Rejected => "rejected",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Which side of a task this node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This node's agent handed the task to the peer.
    Delegator,
    /// The peer handed the task to this node's agent.
    Assignee,
}

/// Who moves a task to a new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The assignee: `working`, `input-required`, `completed`, `failed`, and
    /// `rejected` while the task is still `submitted`.
    Assignee,
    /// The delegator: `canceled`.
    Delegator,
    /// A node itself: `failed` when the deadline passes, `rejected` for a
    /// skill its card does not offer.
    Node,
}

/// Whether `actor` may move a task from `from` to `to`. A move to the state
/// the task is already in is no move (see [`Task::apply`]).
pub fn allowed(from: State, to: State, actor: Actor) -> bool {
    use State::*;
    if from.is_terminal() {
        return false;
    }
    match (actor, to) {
        (Actor::Assignee, Working | InputRequired | Completed | Failed) => true,
        (Actor::Assignee | Actor::Node, Rejected) => from == Submitted,
        (Actor::Delegator, Canceled) => true,
        (Actor::Node, Failed) => true,
        _ => false,
    }
}

/// A named output of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Its name (`summary.txt`).
    pub name: String,
    /// Its media type (`text/plain`).
    #[serde(default)]
    pub mime_type: String,
    /// Its content.
    pub data: Value,
}

/// A task, as stored on either side, served by the API and carried in
/// `task_update` events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Its id (a UUID the delegating node chose).
    pub task_id: String,
    /// This node's side.
    pub role: Role,
    /// The other side.
    pub peer: EntityId,
    /// The skill asked for.
    pub skill: String,
    /// What the skill is given.
    pub input: Value,
    /// 0 to 9, higher first (default 5).
    pub priority: u8,
    /// When it expires, ms since the Unix epoch.
    pub deadline_ms: Option<u64>,
    /// Where it is.
    pub state: State,
    /// The latest status message (why it failed, what input is required).
    pub message: Option<String>,
    /// The result, once completed.
    pub output: Option<Value>,
    /// Named outputs, once completed.
    pub artifacts: Vec<Artifact>,
    /// When it was created here, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it last changed, ms since the Unix epoch.
    pub updated_ms: u64,
    /// Whether the peer has been told its latest change (a change made while
    /// the peer cannot be reached is sent when it is back).
    pub peer_synced: bool,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The task moved.
    Moved,
    /// It was in that state already (a repeat): nothing changed.
    Same,
}

impl Task {
    /// A new task in state `submitted`, as `delegate` describes it, on this
    /// node's side `role` with `peer`, created at `now_ms`.
    pub fn submitted(delegate: Delegate, role: Role, peer: EntityId, now_ms: u64) -> Self {
        Self {
            task_id: delegate.task_id,
            role,
            peer,
            skill: delegate.skill,
            input: delegate.input,
            priority: delegate.priority,
            deadline_ms: delegate.deadline_ms,
            state: State::Submitted,
            message: None,
            output: None,
            artifacts: Vec::new(),
            created_ms: now_ms,
            updated_ms: now_ms,
            // The assignee answers the delegation with the state it took the
            // task in: it has nothing to tell the delegator yet.
            peer_synced: role == Role::Assignee,
        }
    }

    /// Moves the task to `to` at `now_ms` if `actor` may, with `message`.
    /// `INVALID_STATE` otherwise.
    pub fn apply(
        &mut self,
        to: State,
        actor: Actor,
        message: Option<String>,
        now_ms: u64,
    ) -> Result<Applied, Rejection> {
        if to == self.state {
            return Ok(Applied::Same);
        }
        if !allowed(self.state, to, actor) {
            return Err(Rejection::new(
                ErrorCode::InvalidState,
                format!(
                    "task {} is {}; it cannot become {} {}",
                    self.task_id,
                    self.state.as_str(),
                    to.as_str(),
                    match actor {
                        Actor::Assignee => "by its assignee",
                        Actor::Delegator => "by its delegator",
                        Actor::Node => "by a node",
                    }
                ),
            ));
        }
        self.state = to;
        if message.is_some() {
            self.message = message;
        }
        self.updated_ms = now_ms;
        Ok(Applied::Moved)
    }

    /// Whether its deadline has passed at `now_ms` (wall clock) while it can
    /// still change.
    pub fn expired(&self, now_ms: u64) -> bool {
        !self.state.is_terminal() && self.deadline_ms.is_some_and(|d| now_ms >= d)
    }

    /// The order the agent is served submitted tasks in: higher priority
    /// first, then older first.
    pub fn queue_key(&self) -> (std::cmp::Reverse<u8>, u64, String) {
        (
            std::cmp::Reverse(self.priority),
            self.created_ms,
            self.task_id.clone(),
        )
    }

    /// Bytes it holds (input, output, artifacts, message), for the bounds.
    pub fn size(&self) -> u64 {
        let json = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len() as u64);
        json(&self.input)
            + self.output.as_ref().map_or(0, json)
            + self
                .artifacts
                .iter()
                .map(|a| json(&a.data) + (a.name.len() + a.mime_type.len()) as u64)
                .sum::<u64>()
            + self.message.as_ref().map_or(0, |m| m.len() as u64)
            + 256
    }
}

/// `task_delegate`: the delegator hands a task to the assignee.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegate {
    /// The task's id.
    pub task_id: String,
    /// The skill.
    pub skill: String,
    /// Its input.
    #[serde(default)]
    pub input: Value,
    /// 0 to 9.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Deadline, ms since the Unix epoch.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// A task to hand to a peer, as the agent asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// The assignee.
    pub to: EntityId,
    /// The skill asked for (one its card offers).
    pub skill: String,
    /// What the skill is given.
    #[serde(default)]
    pub input: Value,
    /// Seconds until it expires.
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// 0 to 9, higher first (default 5).
    #[serde(default)]
    pub priority: Option<u8>,
}

/// The default priority.
pub fn default_priority() -> u8 {
    5
}

/// `task_status`: the assignee's new state (or the answer to a
/// `task_delegate`: the state the task has there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The task's id.
    pub task_id: String,
    /// Its state at the sender.
    pub state: State,
    /// Why, or what is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `task_result`: the assignee completed the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The task's id.
    pub task_id: String,
    /// Its output.
    pub output: Value,
    /// Named outputs.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// `task_cancel`: the delegator calls the task off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The task's id.
    pub task_id: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const ALL: [State; 7] = State::ALL;

    fn task(state: State) -> Task {
        Task {
            task_id: "t".into(),
            role: Role::Assignee,
            peer: EntityId([1; 32]),
            skill: "s".into(),
            input: Value::Null,
            priority: 5,
            deadline_ms: Some(100),
            state,
            message: None,
            output: None,
            artifacts: Vec::new(),
            created_ms: 0,
            updated_ms: 0,
            peer_synced: true,
        }
    }

    #[test]
    fn terminal_states_never_change_and_each_side_makes_only_its_moves() {
        for from in ALL {
            for to in ALL {
                for actor in [Actor::Assignee, Actor::Delegator, Actor::Node] {
                    let ok = allowed(from, to, actor);
                    if from.is_terminal() {
                        assert!(!ok, "{from:?} -> {to:?}");
                    }
                    if ok {
                        let expected = match actor {
                            Actor::Assignee => {
                                [Working, InputRequired, Completed, Failed].contains(&to)
                                    || (to == Rejected && from == Submitted)
                            }
                            Actor::Delegator => to == Canceled,
                            Actor::Node => to == Failed || (to == Rejected && from == Submitted),
                        };
                        assert!(expected, "{actor:?}: {from:?} -> {to:?}");
                    }
                }
            }
        }
        assert!(allowed(Working, InputRequired, Actor::Assignee));
        assert!(allowed(InputRequired, Working, Actor::Assignee));
        assert!(
            !allowed(Working, Rejected, Actor::Assignee),
            "too late to reject"
        );
        assert!(!allowed(Submitted, Canceled, Actor::Assignee));
        assert!(!allowed(Submitted, Completed, Actor::Delegator));
    }

    #[test]
    fn an_illegal_move_is_invalid_state_and_a_repeat_changes_nothing() {
        let mut t = task(Completed);
        let e = t
            .apply(Working, Actor::Assignee, None, 5)
            .expect_err("terminal");
        assert_eq!(e.code, ErrorCode::InvalidState);
        assert_eq!(t.state, Completed);
        let mut t = task(Working);
        assert_eq!(
            t.apply(Working, Actor::Assignee, Some("again".into()), 5),
            Ok(Applied::Same)
        );
        assert_eq!((t.updated_ms, t.message.as_deref()), (0, None));
        assert_eq!(
            t.apply(Failed, Actor::Assignee, Some("no".into()), 7),
            Ok(Applied::Moved)
        );
        assert_eq!(
            (t.state, t.updated_ms, t.message.as_deref()),
            (Failed, 7, Some("no"))
        );
    }

    #[test]
    fn deadlines_expire_only_open_tasks() {
        assert!(!task(Working).expired(99));
        assert!(task(Working).expired(100));
        assert!(!task(Completed).expired(1000));
        let mut open = task(Submitted);
        open.deadline_ms = None;
        assert!(!open.expired(u64::MAX));
    }

    #[test]
    fn states_use_a2a_names_and_the_queue_serves_priority_then_age() {
        assert_eq!(
            serde_json::to_value(InputRequired).expect("json"),
            "input-required"
        );
        for s in ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).expect("json"), s.as_str());
        }
        let mut a = task(Submitted);
        a.priority = 9;
        a.created_ms = 50;
        let mut b = task(Submitted);
        b.created_ms = 10;
        let mut c = task(Submitted);
        c.created_ms = 20;
        let mut queue = [c.clone(), b.clone(), a.clone()];
        queue.sort_by_key(Task::queue_key);
        assert_eq!(
            queue
                .iter()
                .map(|t| (t.priority, t.created_ms))
                .collect::<Vec<_>>(),
            vec![(9, 50), (5, 10), (5, 20)]
        );
    }
}
