//! Helpers shared by the CLI's process tests.

#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `peer` command on `dir`, unaffected by the caller's `PEER_*` variables.
pub fn peer_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peer"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PEER_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--data-dir").arg(dir);
    cmd
}

/// `peer run` on `dir` with free ports on 127.0.0.1; more flags and
/// variables may be added.
pub fn run_command(dir: &Path) -> Command {
    let mut cmd = peer_command(dir);
    cmd.args(["run", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--api", "127.0.0.1:0"]);
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
