//! `peer devnet N`: a local network of N nodes on 127.0.0.1, each a `peer run`
//! process with a data directory of its own under one folder. `node0` starts
//! first; every other node dials it at start (`--bootstrap`), so the network
//! is a star around it. Each node writes its API address (`api.addr`) and
//! token (`api-token`) in its data directory, where the CLI finds them:
//! `peer --data-dir <folder>/node1 peers`.
//!
//! Ctrl-C (SIGINT, which the terminal sends to every process of the group) or
//! SIGTERM stops the network: the nodes get a few seconds to stop by
//! themselves, then are killed (their databases are safe either way).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Out;

/// Most nodes one devnet runs.
pub const MAX_NODES: usize = 64;
/// Time a node has to start answering on its API.
const STARTUP: Duration = Duration::from_secs(30);
/// Time the nodes have to stop by themselves once asked.
const GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// One running node of the devnet.
struct Member {
    name: String,
    dir: PathBuf,
    child: Child,
}

impl Drop for Member {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            _ = self.child.kill();
            _ = self.child.wait();
        }
    }
}

/// Starts `n` nodes under `root` (a new folder in the temporary directory if
/// not given), prints how to reach them, and runs until SIGINT or SIGTERM.
pub fn run(n: usize, root: Option<PathBuf>, out: &mut Out) -> Result<()> {
    if !(1..=MAX_NODES).contains(&n) {
        bail!("a devnet has 1 to {MAX_NODES} nodes, not {n}");
    }
    let root = match root {
        Some(r) => r,
        None => std::env::temp_dir().join(format!("peer-devnet-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let exe = std::env::current_exe().context("cannot find the `peer` executable")?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // In place before any node starts: SIGINT and SIGTERM no longer end this
    // process at once, so it always stops the nodes it started.
    let (mut interrupt, mut terminate) = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok::<_, anyhow::Error>((interrupt, terminate))
    })?;
    let mut members: Vec<Member> = Vec::new();
    let mut bootstrap = None;
    for i in 0..n {
        let member = start(&exe, &root, i, bootstrap.as_deref())?;
        members.push(member);
        let member = &members[i];
        let info = wait_ready(member)?;
        if bootstrap.is_none() {
            bootstrap = Some(format!("{}/p2p/{}", info.listen_addr, info.peer_id));
        }
        writeln!(
            out,
            "{}  entity {}  api {}  data {}",
            member.name,
            info.entity_id,
            info.api,
            member.dir.display()
        )?;
    }
    writeln!(
        out,
        "devnet of {n} nodes in {}; node0 is the bootstrap",
        root.display()
    )?;
    writeln!(
        out,
        "try: peer --data-dir {} peers    (Ctrl-C stops them all)",
        root.join("node0").display()
    )?;
    let reason = rt.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => "interrupted".to_owned(),
            _ = terminate.recv() => "terminated".to_owned(),
            gone = watch(&mut members) => gone,
        }
    });
    writeln!(out, "stopping the devnet ({reason})")?;
    stop(&mut members);
    Ok(())
}

/// Starts node `i` (dialling `bootstrap` if given), its stderr in `<root>/node<i>.log`.
fn start(exe: &Path, root: &Path, i: usize, bootstrap: Option<&str>) -> Result<Member> {
    let name = format!("node{i}");
    let dir = root.join(&name);
    // A node killed before leaves its api.addr behind; wait for the new one.
    _ = std::fs::remove_file(dir.join(peer_node::data_dir::API_ADDR_FILE));
    let log_path = root.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--data-dir").arg(&dir).args([
        "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api",
        "127.0.0.1:0",
        // The nodes find each other through node0 and the DHT; mDNS would
        // also bring in every other node on this host.
        "--no-mdns",
    ]);
    if let Some(addr) = bootstrap {
        cmd.args(["--bootstrap", addr]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Member { name, dir, child })
}

/// What the devnet prints of a node.
struct Info {
    entity_id: String,
    peer_id: String,
    listen_addr: String,
    api: String,
}

/// Waits until `m` answers `/v1/health` with a listen address.
fn wait_ready(m: &Member) -> Result<Info> {
    let deadline = Instant::now() + STARTUP;
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let log = || m.dir.with_extension("log");
    loop {
        if let Ok(api) = std::fs::read_to_string(m.dir.join(peer_node::data_dir::API_ADDR_FILE))
            && api.ends_with('\n')
            && let Ok(resp) = http.get(format!("http://{}/v1/health", api.trim())).send()
            && let Ok(health) = resp.json::<Value>()
            && let Some(listen) = health["listen_addrs"][0].as_str()
        {
            let text = |k: &str| health[k].as_str().unwrap_or_default().to_owned();
            return Ok(Info {
                entity_id: text("entity_id"),
                peer_id: text("peer_id"),
                listen_addr: listen.to_owned(),
                api: api.trim().to_owned(),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not come up within {STARTUP:?}; see {}",
                m.name,
                log().display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Resolves when a node exits by itself, naming it.
async fn watch(members: &mut [Member]) -> String {
    loop {
        for m in members.iter_mut() {
            if let Ok(Some(status)) = m.child.try_wait() {
                return format!("{} exited with {status}", m.name);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Gives the nodes [`GRACE`] to stop (on Ctrl-C they got SIGINT too), then
/// kills those still running.
fn stop(members: &mut [Member]) {
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline
        && members
            .iter_mut()
            .any(|m| matches!(m.child.try_wait(), Ok(None)))
    {
        std::thread::sleep(POLL);
    }
    for m in members.iter_mut() {
        if matches!(m.child.try_wait(), Ok(None)) {
            _ = m.child.kill();
            _ = m.child.wait();
        }
    }
}
