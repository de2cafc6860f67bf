//! Helpers shared by the CLI's process tests.

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

/// Starts `peer run` on `dir` with free ports on 127.0.0.1, its stderr in `log`.
pub fn spawn_run(dir: &Path, log: &Path) -> Child {
    let stderr = std::fs::File::create(log).expect("create the node's stderr file");
    peer_command(dir)
        .args(["run", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--api", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn `peer run`")
}
