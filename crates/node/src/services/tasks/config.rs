//! Task settings: the `[tasks]` section.

use serde::{Deserialize, Serialize};

/// Bounds of the tasks a node keeps, and how it retries telling peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Most tasks kept, of both roles (default 10,000; at least 1). At the
    /// bound the finished tasks changed longest ago are forgotten; if every
    /// task is still open, a new one is refused (`INBOX_FULL` to a peer, 503
    /// to the agent).
    pub max_tasks: usize,
    /// Most bytes of input, output and artifacts the tasks hold (default
    /// 256 MiB), bounded as `max_tasks` is.
    pub max_bytes: u64,
    /// Most tasks waiting for the agent in state `submitted` (default 1,000;
    /// at least 1); beyond it a peer's `task_delegate` is refused
    /// `INBOX_FULL`.
    pub max_submitted: usize,
    /// The wait a peer refused `INBOX_FULL` is told to keep, in seconds
    /// (default 5).
    pub retry_after_secs: u64,
    /// A change a peer has not been told is offered again this often while
    /// it is connected, in seconds (default 30; at least 1), besides at once
    /// when it connects.
    pub resend_secs: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            max_tasks: 10_000,
            max_bytes: 256 << 20,
            max_submitted: 1_000,
            retry_after_secs: 5,
            resend_secs: 30,
        }
    }
}

impl TasksConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tasks == 0 || self.max_submitted == 0 || self.resend_secs == 0 {
            return Err(
                "tasks.max_tasks, tasks.max_submitted and tasks.resend_secs must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}
