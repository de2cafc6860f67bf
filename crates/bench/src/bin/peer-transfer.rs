//! `peer-transfer`: one large message between two `peer run` processes on
//! 127.0.0.1, driven through their HTTP APIs as an agent would.
//!
//! Each run starts a fresh pair of nodes (each its own process and data
//! directory), connects them with `POST /v1/peers`, opens the receiver's
//! `/v1/events`, sets up their session with a small warm-up message, then
//! times `POST /v1/messages` of a large JSON payload (a string of random
//! alphanumerics) until the receiver's `message` event has fully arrived, once
//! or `--sends` times. The event's payload must be the exact JSON text sent
//! (same length and SHA-256). The receiver's `transfer_progress` events split
//! the time: until the manifest was accepted (the sender's upload and hashing),
//! and the rate while chunks flowed. After each transfer it reads each node's
//! peak resident memory (`VmHWM` in `/proc/<pid>/status`) and CPU time, so
//! Linux only, then acknowledges the message (`POST /v1/inbox/ack`, untimed)
//! as an agent would, so that it leaves the receiver's inbox.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

const MIB: f64 = 1024.0 * 1024.0;
/// Time allowed for a node to start, for a small request, and for the warm-up.
const STEP: Duration = Duration::from_secs(30);
/// Interval between two looks at a node that is starting.
const POLL: Duration = Duration::from_millis(20);
/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(about = "Time one large message between two `peer run` processes")]
struct Args {
    /// The `peer` binary.
    #[arg(long, default_value = "target/release/peer")]
    peer: PathBuf,
    /// Length of the JSON payload in bytes (a JSON string, quotes included).
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    payload_bytes: usize,
    /// Runs, each with a fresh pair of nodes.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Timed sends in each run, one after the other to the same pair (peak
    /// memory is then that of the whole run so far).
    #[arg(long, default_value_t = 1)]
    sends: usize,
    /// `transfer.max_message_size` of both nodes.
    #[arg(long, default_value_t = 128 * 1024 * 1024)]
    max_message_size: u64,
    /// `transfer.chunk_size` of both nodes (node default if not given).
    #[arg(long)]
    chunk_size: Option<usize>,
    /// `transfer.window` of both nodes (node default if not given).
    #[arg(long)]
    window: Option<usize>,
    /// Further configuration for both nodes, e.g. `PEER_RATE_LIMITS__ENABLED=false`
    /// (repeatable).
    #[arg(long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Seconds to wait before each timed send; the nodes' process ids are
    /// printed first (time to attach a profiler: `perf record -g -p <pid>`).
    #[arg(long, default_value_t = 0)]
    pause_secs: u64,
    /// Seconds allowed for the timed transfer.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// A `peer run` process, killed when dropped.
struct Node {
    name: &'static str,
    child: Child,
    log: PathBuf,
    base: String,
    token: String,
    entity_id: String,
    listen_addr: String,
}

impl Node {
    /// Starts `peer run` in `root/name` with free ports on 127.0.0.1 and waits
    /// until its API reports a listen address.
    fn start(
        args: &Args,
        env: &[(String, String)],
        root: &Path,
        name: &'static str,
        http: &reqwest::blocking::Client,
    ) -> Result<Self> {
        let dir = root.join(name);
        let log = root.join(format!("{name}.stderr"));
        let child = Command::new(&args.peer)
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "run",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api",
                "127.0.0.1:0",
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", args.peer.display()))?;
        let mut node = Self {
            name,
            child,
            log,
            base: String::new(),
            token: String::new(),
            entity_id: String::new(),
            listen_addr: String::new(),
        };
        node.wait_ready(&dir, http)
            .map_err(|e| node.failed(e.context("startup")))?;
        Ok(node)
    }

    fn wait_ready(&mut self, dir: &Path, http: &reqwest::blocking::Client) -> Result<()> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited early with {status}");
            }
            ensure!(Instant::now() < deadline, "not ready within {STEP:?}");
            // The file is written in one go; the newline shows it is complete.
            let addr = std::fs::read_to_string(dir.join("api.addr")).unwrap_or_default();
            if !addr.ends_with('\n') {
                std::thread::sleep(POLL);
                continue;
            }
            self.base = format!("http://{}", addr.trim());
            let health: serde_json::Value = match http
                .get(format!("{}/v1/health", self.base))
                .timeout(STEP)
                .send()
                .and_then(|r| r.json())
            {
                Ok(h) => h,
                Err(_) => {
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            if let Some(addr) = health["listen_addrs"][0].as_str() {
                self.listen_addr = addr.to_owned();
                self.entity_id = health["entity_id"].as_str().unwrap_or_default().to_owned();
                self.token = std::fs::read_to_string(dir.join("api-token"))?
                    .trim()
                    .to_owned();
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
    }

    /// `e`, with the end of what the node wrote to stderr.
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        const TAIL: usize = 4000;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let cut = log.len().saturating_sub(TAIL);
        let tail = log.get(cut..).unwrap_or_default();
        e.context(format!(
            "node {}; the end of its stderr:\n{tail}",
            self.name
        ))
    }

    /// `POST path` with `body`; fails unless the answer is 200.
    fn post(
        &self,
        http: &reqwest::blocking::Client,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<()> {
        let resp = http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(timeout)
            .send()
            .with_context(|| format!("{} POST {path}", self.name))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        ensure!(
            status == reqwest::StatusCode::OK,
            "{} POST {path}: HTTP {status}: {text}",
            self.name
        );
        Ok(())
    }

    /// Peak and current resident memory (`VmHWM`, `VmRSS`) and CPU time
    /// (user + system) so far.
    fn usage(&self) -> Result<Usage> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let mib = |field: &str| -> Result<f64> {
            let kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
            Ok(kib as f64 / 1024.0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces), from field 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
            bail!("cannot read the CPU time in /proc/{pid}/stat");
        };
        Ok(Usage {
            peak_mib: mib("VmHWM:")?,
            resident_mib: mib("VmRSS:")?,
            cpu_secs: (user + system) as f64 / USER_HZ,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
    }
}

/// A node's resource use, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct Usage {
    peak_mib: f64,
    resident_mib: f64,
    cpu_secs: f64,
}

/// An event of the receiver's stream, as it reached the reader.
enum Seen {
    /// An incoming transfer moved on (`transfer_progress`).
    Progress {
        /// When the event was read.
        at: Instant,
        done_chunks: u64,
        chunk_count: u64,
    },
    /// A message arrived.
    Message {
        /// When its first bytes could be read.
        began: Instant,
        /// When its last line was read.
        at: Instant,
        /// Its id in the receiver's inbox.
        event_id: u64,
        payload_len: usize,
        payload_sha256: [u8; 32],
    },
}

/// Reads the SSE stream `resp` and sends each `message` and incoming
/// `transfer_progress` event down `tx`, stamped with the moments its first
/// bytes and its last line arrived.
/// `capacity` is the size of the largest event expected (its buffer is
/// reserved once, so that reading it does not copy it again as it grows).
/// Returns at the end of the stream or when nobody listens any more.
fn read_events(resp: reqwest::blocking::Response, capacity: usize, tx: mpsc::Sender<Result<Seen>>) {
    let mut reader = BufReader::with_capacity(1 << 20, resp);
    // The lines of the event being read, as they came.
    let mut block = Vec::with_capacity(capacity);
    let mut began = Instant::now();
    loop {
        let start = block.len();
        let read = reader
            .fill_buf()
            .map(|_| Instant::now())
            .and_then(|now| Ok((now, reader.read_until(b'\n', &mut block)?)));
        match read {
            Ok((_, 0)) => return,
            Ok((now, _)) if start == 0 => began = now,
            Ok(_) => {}
            Err(e) => {
                _ = tx.send(Err(anyhow!("reading /v1/events: {e}")));
                return;
            }
        }
        if !matches!(&block[start..], b"\n" | b"\r\n") {
            continue;
        }
        // A blank line ends the event.
        let at = Instant::now();
        let data: Vec<&[u8]> = block
            .split(|b| *b == b'\n')
            .filter_map(|l| l.strip_prefix(b"data:"))
            .map(|d| d.strip_prefix(b" ").unwrap_or(d))
            .collect();
        // Several data lines make one text, joined by newlines.
        let arrived = match data.as_slice() {
            [] => None,
            [one] => parse_event(began..at, one).transpose(),
            many => parse_event(began..at, &many.join(&b'\n')).transpose(),
        };
        block.clear();
        if let Some(arrived) = arrived
            && tx.send(arrived).is_err()
        {
            return;
        }
    }
}

/// The event in `data` (one event's JSON), which arrived over `when`; `None`
/// for events other than `message` and incoming `transfer_progress`.
fn parse_event(when: std::ops::Range<Instant>, data: &[u8]) -> Result<Option<Seen>> {
    let fields: HashMap<&str, &RawValue> =
        serde_json::from_slice(data).context("an event is not a JSON object")?;
    let field = |name: &str| {
        fields
            .get(name)
            .map(|v| v.get())
            .ok_or_else(|| anyhow!("an event without {name}: {}", String::from_utf8_lossy(data)))
    };
    let number = |name: &str| -> Result<u64> { Ok(field(name)?.parse()?) };
    match field("type")? {
        "\"message\"" => {
            let payload = field("payload")?;
            Ok(Some(Seen::Message {
                began: when.start,
                at: when.end,
                event_id: number("event_id")?,
                payload_len: payload.len(),
                payload_sha256: Sha256::digest(payload.as_bytes()).into(),
            }))
        }
        "\"transfer_progress\"" if field("direction")? == "\"inbound\"" => {
            Ok(Some(Seen::Progress {
                at: when.end,
                done_chunks: number("done_chunks")?,
                chunk_count: number("chunk_count")?,
            }))
        }
        _ => Ok(None),
    }
}

/// A JSON string of `len` bytes (quotes included) of pseudo-random
/// alphanumerics (SplitMix64 from `seed`).
fn random_json_string(len: usize, mut seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = Vec::with_capacity(len);
    out.push(b'"');
    while out.len() < len.saturating_sub(1) {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        for _ in 0..10 {
            if out.len() >= len.saturating_sub(1) {
                break;
            }
            out.push(ALPHABET[(z % 62) as usize]);
            z /= 62;
        }
    }
    out.push(b'"');
    out
}

/// The body of `POST /v1/messages` sending `payload` (JSON text) to `to`.
fn message_body(to: &str, payload: &[u8]) -> Vec<u8> {
    let head = format!(r#"{{"to":"{to}","msg_type":"message","payload":"#);
    let mut body = Vec::with_capacity(head.len() + payload.len() + 1);
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(payload);
    body.push(b'}');
    body
}

/// What one run measured, times in seconds from the start of the timed POST.
struct Run {
    /// The receiver announced the transfer (it accepted the manifest).
    manifest: f64,
    /// Bytes per second received while chunks flowed: from the first to the
    /// last progress event between the manifest and completion (every tenth).
    chunk_rate: f64,
    /// The POST was answered (the sender had every chunk accepted).
    post: f64,
    /// The first bytes of the receiver's `message` event arrived.
    event_began: f64,
    /// The receiver's `message` event fully arrived.
    event: f64,
    sender: NodeFigures,
    receiver: NodeFigures,
}

/// One node's resources in one run.
#[derive(Debug, Clone, Copy)]
struct NodeFigures {
    /// Peak resident memory after the transfer (`VmHWM`), MiB.
    peak_mib: f64,
    /// Peak resident memory before it (start-up and the warm-up message), MiB.
    before_mib: f64,
    /// Resident memory once the message has arrived, MiB.
    after_mib: f64,
    /// CPU time (user + system) the transfer took, seconds.
    cpu_secs: f64,
}

impl NodeFigures {
    fn between(before: Usage, after: Usage) -> Self {
        Self {
            peak_mib: after.peak_mib,
            before_mib: before.peak_mib,
            after_mib: after.resident_mib,
            cpu_secs: after.cpu_secs - before.cpu_secs,
        }
    }
}

/// Two connected nodes, the receiver's event stream being read.
struct Pair {
    sender: Node,
    receiver: Node,
    http: reqwest::blocking::Client,
    events: mpsc::Receiver<Result<Seen>>,
    /// Holds both data directories; dropped after the nodes.
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Starts both nodes, connects them, opens the receiver's event stream and
    /// sets up their session with a small message, so that no timed send
    /// includes the handshake.
    fn start(args: &Args, env: &[(String, String)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Each request sets its own timeout; the event stream has none.
        let http = reqwest::blocking::Client::builder().timeout(None).build()?;
        let sender = Node::start(args, env, dir.path(), "sender", &http)?;
        let receiver = Node::start(args, env, dir.path(), "receiver", &http)?;
        let connect = serde_json::json!({ "addr": receiver.listen_addr }).to_string();
        sender.post(&http, "/v1/peers", connect.into_bytes(), STEP)?;

        // The node is subscribed once the headers are in.
        let stream = http
            .get(format!("{}/v1/events", receiver.base))
            .bearer_auth(&receiver.token)
            .send()
            .context("GET /v1/events")?;
        ensure!(
            stream.status() == reqwest::StatusCode::OK,
            "GET /v1/events: HTTP {}",
            stream.status()
        );
        let (tx, events) = mpsc::channel();
        let capacity = args.payload_bytes + 64 * 1024;
        std::thread::spawn(move || read_events(stream, capacity, tx));
        let pair = Self {
            sender,
            receiver,
            http,
            events,
            _dir: dir,
        };

        let warm = br#"{"warm_up":true}"#;
        let body = message_body(&pair.receiver.entity_id, warm);
        pair.sender.post(&pair.http, "/v1/messages", body, STEP)?;
        match pair.next_event(STEP)? {
            Seen::Message {
                payload_len,
                event_id,
                ..
            } if payload_len == warm.len() => {
                pair.ack(event_id)?;
                Ok(pair)
            }
            _ => bail!("the warm-up message did not arrive as sent"),
        }
    }

    /// Acknowledges the receiver's events up to `event_id`, as its agent
    /// would: they leave its inbox, which would otherwise refuse the sender
    /// `INBOX_FULL` once `inbox.max_bytes_per_sender` (256 MiB) is held.
    fn ack(&self, event_id: u64) -> Result<()> {
        let body = serde_json::json!({ "up_to": event_id }).to_string();
        self.receiver
            .post(&self.http, "/v1/inbox/ack", body.into_bytes(), STEP)
            .map_err(|e| self.receiver.failed(e))
    }

    /// The receiver's next `message` or incoming `transfer_progress` event.
    fn next_event(&self, timeout: Duration) -> Result<Seen> {
        self.events.recv_timeout(timeout).map_err(|e| {
            self.receiver
                .failed(anyhow!("no event within {timeout:?}: {e}"))
        })?
    }

    /// Times one message of `args.payload_bytes` (random, from `seed`).
    fn timed_send(&self, args: &Args, seed: u64) -> Result<Run> {
        let payload = random_json_string(args.payload_bytes, seed);
        let sha256: [u8; 32] = Sha256::digest(&payload).into();
        let body = message_body(&self.receiver.entity_id, &payload);
        drop(payload);
        if args.pause_secs > 0 {
            std::thread::sleep(Duration::from_secs(args.pause_secs));
        }
        let (sender_before, receiver_before) = (self.sender.usage()?, self.receiver.usage()?);

        let timeout = Duration::from_secs(args.timeout_secs);
        let started = Instant::now();
        self.sender
            .post(&self.http, "/v1/messages", body, timeout)
            .map_err(|e| self.sender.failed(e))?;
        let post = started.elapsed().as_secs_f64();
        let since = |at: Instant| at.duration_since(started).as_secs_f64();
        let mut manifest = f64::NAN;
        // The first and last progress events between the manifest and completion:
        // (seconds, share of the chunks received).
        let mut steady: Option<((f64, f64), (f64, f64))> = None;
        let (event_began, event, event_id) = loop {
            match self.next_event(timeout)? {
                Seen::Progress {
                    at, done_chunks: 0, ..
                } => manifest = since(at),
                Seen::Progress {
                    at,
                    done_chunks,
                    chunk_count,
                } if done_chunks < chunk_count => {
                    let point = (since(at), done_chunks as f64 / chunk_count as f64);
                    steady = Some((steady.map_or(point, |(first, _)| first), point));
                }
                Seen::Progress { .. } => {}
                Seen::Message {
                    began,
                    at,
                    event_id,
                    payload_len,
                    payload_sha256,
                } => {
                    ensure!(
                        payload_len == args.payload_bytes && payload_sha256 == sha256,
                        "the payload arrived changed: {payload_len} bytes, expected {}",
                        args.payload_bytes
                    );
                    break (since(began), since(at), event_id);
                }
            }
        };
        let chunk_rate = steady.map_or(f64::NAN, |((t1, s1), (t2, s2))| {
            (s2 - s1) * args.payload_bytes as f64 / (t2 - t1)
        });
        let run = Run {
            manifest,
            chunk_rate,
            post,
            event_began,
            event,
            sender: NodeFigures::between(sender_before, self.sender.usage()?),
            receiver: NodeFigures::between(receiver_before, self.receiver.usage()?),
        };
        self.ack(event_id)?;
        Ok(run)
    }
}

/// The median of `f` over `runs`.
fn median(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints one run's figures (or their medians) under `label`.
fn report(label: &str, bytes: f64, r: &Run) {
    println!(
        "{label}: {:.1} MB/s = {:.1} MiB/s; event complete {:.3} s (manifest accepted {:.3}, \
         POST answered {:.3}, event began {:.3}); while chunks flowed {:.1} MB/s",
        bytes / r.event / 1e6,
        bytes / r.event / MIB,
        r.event,
        r.manifest,
        r.post,
        r.event_began,
        r.chunk_rate / 1e6,
    );
    for (name, f) in [("sender", r.sender), ("receiver", r.receiver)] {
        println!(
            "{label}: {name} peak {:.0} MiB (before the transfer {:.0}, resident after it {:.0}), \
             cpu {:.2} s",
            f.peak_mib, f.before_mib, f.after_mib, f.cpu_secs
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.payload_bytes >= 2,
        "--payload-bytes must be at least 2"
    );
    let mut env = vec![(
        "PEER_TRANSFER__MAX_MESSAGE_SIZE".to_owned(),
        args.max_message_size.to_string(),
    )];
    if let Some(c) = args.chunk_size {
        env.push(("PEER_TRANSFER__CHUNK_SIZE".into(), c.to_string()));
    }
    if let Some(w) = args.window {
        env.push(("PEER_TRANSFER__WINDOW".into(), w.to_string()));
    }
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv:?}: expected NAME=VALUE"))?;
        env.push((k.to_owned(), v.to_owned()));
    }
    let bytes = args.payload_bytes as f64;
    println!(
        "payload={}B ({:.1} MiB) runs={} cores={} env: {}",
        args.payload_bytes,
        bytes / MIB,
        args.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // by_send[i]: the (i + 1)-th timed send of every pair.
    let mut by_send: Vec<Vec<Run>> = (0..args.sends).map(|_| Vec::new()).collect();
    for n in 1..=args.runs {
        let pair = Pair::start(&args, &env)?;
        println!(
            "run {n}: sender pid {}, receiver pid {}",
            pair.sender.child.id(),
            pair.receiver.child.id()
        );
        for (i, runs) in by_send.iter_mut().enumerate() {
            let r = pair.timed_send(&args, (n * 1000 + i) as u64)?;
            report(&format!("run {n} send {}", i + 1), bytes, &r);
            runs.push(r);
        }
    }
    for (i, runs) in by_send.iter().enumerate() {
        let node = |f: fn(&Run) -> NodeFigures| NodeFigures {
            peak_mib: median(runs, |r| f(r).peak_mib),
            before_mib: median(runs, |r| f(r).before_mib),
            after_mib: median(runs, |r| f(r).after_mib),
            cpu_secs: median(runs, |r| f(r).cpu_secs),
        };
        let medians = Run {
            manifest: median(runs, |r| r.manifest),
            chunk_rate: median(runs, |r| r.chunk_rate),
            post: median(runs, |r| r.post),
            event_began: median(runs, |r| r.event_began),
            event: median(runs, |r| r.event),
            sender: node(|r| r.sender),
            receiver: node(|r| r.receiver),
        };
        let label = format!("median of {} runs, send {}", runs.len(), i + 1);
        report(&label, bytes, &medians);
    }
    println!(
        "aims: at least 200 MB/s; each node's peak under {:.0} MiB (three times the payload)",
        3.0 * bytes / MIB
    );
    Ok(())
}
