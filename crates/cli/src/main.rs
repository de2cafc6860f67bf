//! `peer`: run a Peer Protocol v1.2 node, and talk to a running one.
//!
//! `init`, `id`, `run` and `config show` work on the data directory; every other
//! command is a thin client of the running node's local HTTP API.

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod devnet;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use peer_node::libp2p::Multiaddr;
use peer_node::{Config, data_dir};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "peer", version, about = "Peer Protocol v1.2 node and client")]
struct Cli {
    /// Data directory (identity, token, database). Default: $HOME/.peer
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Configuration file (TOML). Default: <data-dir>/config.toml if it exists.
    #[arg(long, global = true, value_name = "FILE", env = "PEER_CONFIG")]
    config: Option<PathBuf>,
    /// Base URL of the node's API for client commands.
    /// Default: the address in <data-dir>/api.addr written by `peer run`.
    #[arg(long, global = true, value_name = "URL")]
    api_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the identity and API token in the data directory.
    Init,
    /// Print this node's entity id and peer id.
    Id,
    /// Run the node and its local API until Ctrl-C (SIGINT) or SIGTERM.
    Run {
        /// Address to listen on for peers (repeatable), e.g. /ip4/0.0.0.0/tcp/7400.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<Multiaddr>,
        /// Address of the local API, e.g. 127.0.0.1:7401 (port 0: any free port).
        #[arg(long, value_name = "HOST:PORT")]
        api: Option<SocketAddr>,
        /// Bootstrap peer to join the network through (repeatable); the
        /// variable PEER_BOOTSTRAP takes a list separated by commas.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<Multiaddr>,
        /// Run as a bootstrap node: serve the DHT for others, run no
        /// application service (no messages, tasks or inbox).
        #[arg(long)]
        bootstrap_node: bool,
        /// Do not look for peers on the local network with mDNS.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Show the running node's health, addresses and counters.
    Status,
    /// Show the message counters per peer and the connection pool's (dials,
    /// reuses, validations, circuit breakers).
    Stats,
    /// List connected and remembered peers.
    Peers,
    /// Connect to a peer.
    Connect {
        /// The peer's address, e.g. /ip4/127.0.0.1/tcp/7400.
        addr: String,
    },
    /// Send a signed message and wait for the recipient to accept it.
    Send {
        /// Recipient entity id (64 hex digits).
        entity_id: String,
        /// Message type, e.g. message, task_delegate, ping.
        msg_type: String,
        /// JSON payload: inline, e.g. '{"text":"hi"}'; `@FILE` to read it from a
        /// file (for payloads too large for a command line); `-` for standard input.
        payload: String,
    },
    /// Show the durable events (messages) waiting in the node's inbox, oldest
    /// first, or acknowledge them.
    Inbox {
        /// Show the events after this id (default: from the oldest waiting).
        #[arg(long, value_name = "ID", conflicts_with = "ack")]
        after: Option<u64>,
        /// Most events to show, 1 to 1000 (default 100).
        #[arg(long, value_name = "N", conflicts_with = "ack")]
        limit: Option<u64>,
        /// Acknowledge every event up to and including this id: the node
        /// deletes them and serves them no more.
        #[arg(long, value_name = "ID")]
        ack: Option<u64>,
    },
    /// Show this node's signed capability card, or set the agent's part of it.
    Card {
        /// A JSON file with the agent's part (name, description, version,
        /// skills, accepts) to sign and publish; `-` for standard input.
        #[arg(long, value_name = "FILE")]
        set: Option<String>,
    },
    /// Show a peer's verified capability card (asked of it if connected and
    /// not known yet).
    Caps {
        /// The peer's entity id (64 hex digits).
        entity_id: String,
    },
    /// Find a peer by entity id, or the peers offering a capability, in the
    /// DHT.
    Find {
        /// The peer's entity id (64 hex digits).
        #[arg(required_unless_present = "capability", conflicts_with = "capability")]
        entity_id: Option<String>,
        /// A capability (a skill id of the cards).
        #[arg(long)]
        capability: Option<String>,
    },
    /// Hand a task to a peer: prints its id, or with --wait the task once it
    /// is finished (exit status 1 unless it completed).
    Delegate {
        /// The assignee's entity id (64 hex digits).
        entity_id: String,
        /// The skill, one the assignee's card offers.
        skill: String,
        /// The input, JSON: inline, `@FILE` or `-` for standard input.
        input: String,
        /// Seconds until the task expires.
        #[arg(long, value_name = "SECS")]
        deadline: Option<u64>,
        /// 0 to 9, higher first (default 5).
        #[arg(long)]
        priority: Option<u8>,
        /// Wait for the task to finish and print it.
        #[arg(long)]
        wait: bool,
        /// Most seconds --wait waits.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// List tasks, of either side.
    Tasks {
        /// Only `delegator` (handed out) or `assignee` (taken) tasks.
        #[arg(long)]
        role: Option<String>,
        /// Only tasks in this state (e.g. submitted, working, completed).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one task.
    Task {
        /// Its id.
        task_id: String,
    },
    /// Run a local network of N nodes on 127.0.0.1 until Ctrl-C: node0 is the
    /// bootstrap the others dial; each has a data directory of its own under
    /// one folder (printed), where the CLI finds its API.
    Devnet {
        /// How many nodes (1 to 64).
        nodes: usize,
        /// The folder for the nodes' data directories (default: a new one in
        /// the temporary directory). Reused as is: the nodes keep their
        /// identities and databases from a previous run there.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, file, PEER_* variables, flags).
    Show,
}

fn overrides(cli: &Cli) -> toml::Table {
    let mut t = toml::Table::new();
    if let Some(d) = &cli.data_dir {
        t.insert("data_dir".into(), d.display().to_string().into());
    }
    if let Command::Run {
        listen,
        api,
        bootstrap,
        bootstrap_node,
        no_mdns,
    } = &cli.command
    {
        let mut discovery = toml::Table::new();
        if *bootstrap_node {
            discovery.insert("bootstrap_node".into(), true.into());
        }
        if *no_mdns {
            discovery.insert("mdns".into(), false.into());
        }
        if !discovery.is_empty() {
            t.insert("discovery".into(), discovery.into());
        }
        let mut network = toml::Table::new();
        let strings = |v: &[Multiaddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        if !listen.is_empty() {
            network.insert("listen".into(), strings(listen).into());
        }
        if !bootstrap.is_empty() {
            network.insert("bootstrap".into(), strings(bootstrap).into());
        }
        if !network.is_empty() {
            t.insert("network".into(), network.into());
        }
        if let Some(api) = api {
            let mut a = toml::Table::new();
            a.insert("listen".into(), api.to_string().into());
            t.insert("api".into(), a.into());
        }
    }
    t
}

/// `value` percent-encoded for a URL query (RFC 3986 unreserved characters
/// kept).
fn query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() {
    let cli = Cli::parse();
    match run(cli, &mut Out(std::io::stdout())) {
        Ok(()) => {}
        // The reader of our output has all it wanted (`peer peers | head -1`).
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Standard output was closed by its reader. The command stops writing and
/// exits with success, as Unix tools do in a pipeline such as `peer peers | head -1`.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Standard output for `write!`/`writeln!`: each write locks it, writes and
/// flushes, and a broken pipe becomes [`StdoutClosed`] instead of a panic
/// (which is what `println!` does).
struct Out(std::io::Stdout);

impl Out {
    fn write_fmt(&mut self, args: std::fmt::Arguments<'_>) -> Result<()> {
        let mut lock = self.0.lock();
        match lock.write_fmt(args).and_then(|()| lock.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
            Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
        }
    }
}

fn run(cli: Cli, out: &mut Out) -> Result<()> {
    let config = Config::load(cli.config.as_deref(), overrides(&cli))?;
    let dir = config.data_dir.clone();
    match &cli.command {
        Command::Devnet { nodes, dir } => devnet::run(*nodes, dir.clone(), out),
        Command::Init => {
            let s = data_dir::init(&dir, peer_node::fresh_secrets)?;
            let verb = if s.created {
                "created"
            } else if s.token_created {
                "already initialised (created a new API token)"
            } else {
                "already initialised"
            };
            writeln!(out, "{verb}: {}", dir.display())?;
            print_id(out, &s.identity)?;
            writeln!(
                out,
                "api token: {}",
                dir.join(data_dir::TOKEN_FILE).display()
            )
        }
        Command::Id => {
            let (identity, _) = data_dir::load(&dir)?;
            print_id(out, &identity)
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => write!(out, "{}", config.to_toml()),
        Command::Run { .. } => run_node(config),
        Command::Status => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let mut health = c.get("/v1/health")?;
            health["stats"] = c.get("/v1/stats")?;
            print_json(out, &health)
        }
        Command::Stats => print_json(
            out,
            &Client::new(&dir, cli.api_url.as_deref())?.get("/v1/stats")?,
        ),
        Command::Peers => print_json(
            out,
            &Client::new(&dir, cli.api_url.as_deref())?.get("/v1/peers")?,
        ),
        Command::Connect { addr } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            print_json(
                out,
                &c.post("/v1/peers", &serde_json::json!({ "addr": addr }))?,
            )
        }
        Command::Inbox { after, limit, ack } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let answer = match ack {
                Some(up_to) => c.post("/v1/inbox/ack", &serde_json::json!({ "up_to": up_to }))?,
                None => {
                    let mut query = Vec::new();
                    if let Some(after) = after {
                        query.push(format!("after={after}"));
                    }
                    if let Some(limit) = limit {
                        query.push(format!("limit={limit}"));
                    }
                    let mut path = "/v1/inbox".to_owned();
                    if !query.is_empty() {
                        path = format!("{path}?{}", query.join("&"));
                    }
                    c.get(&path)?
                }
            };
            print_json(out, &answer)
        }
        Command::Card { set } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let card = match set {
                Some(file) => {
                    let arg = if file == "-" {
                        "-".to_owned()
                    } else {
                        format!("@{file}")
                    };
                    let text = read_payload(&arg)?;
                    let body: Value = serde_json::from_str(&text)
                        .with_context(|| format!("the card file {file:?} is not JSON"))?;
                    c.put("/v1/card", &body)?
                }
                None => c.get("/v1/card")?,
            };
            print_json(out, &card)
        }
        Command::Caps { entity_id } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            print_json(out, &c.get(&format!("/v1/peers/{entity_id}/card"))?)
        }
        Command::Find {
            entity_id,
            capability,
        } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let path = match (entity_id, capability) {
                (Some(id), _) => format!("/v1/peers/{id}"),
                (None, Some(cap)) => format!("/v1/discover?capability={}", query_value(cap)),
                (None, None) => unreachable!("clap requires one of them"),
            };
            print_json(out, &c.get(&path)?)
        }
        Command::Delegate {
            entity_id,
            skill,
            input,
            deadline,
            priority,
            wait,
            timeout,
        } => {
            let text = read_payload(input)?;
            let input: Value = serde_json::from_str(&text)
                .with_context(|| format!("the input {input:?} is not JSON"))?;
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let mut body = serde_json::json!({"to": entity_id, "skill": skill, "input": input});
            if let Some(d) = deadline {
                body["deadline_s"] = (*d).into();
            }
            if let Some(p) = priority {
                body["priority"] = (*p).into();
            }
            let created = c.post("/v1/tasks", &body)?;
            if !wait {
                return print_json(out, &created);
            }
            let id = created["task_id"].as_str().unwrap_or_default().to_owned();
            let task = wait_for_task(&c, &id, std::time::Duration::from_secs(*timeout))?;
            print_json(out, &task)?;
            if task["state"] != "completed" {
                bail!("task {id} ended {}", task["state"]);
            }
            Ok(())
        }
        Command::Tasks { role, state } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            let mut query = Vec::new();
            if let Some(r) = role {
                query.push(format!("role={r}"));
            }
            if let Some(st) = state {
                query.push(format!("state={st}"));
            }
            let path = if query.is_empty() {
                "/v1/tasks".to_owned()
            } else {
                format!("/v1/tasks?{}", query.join("&"))
            };
            print_json(out, &c.get(&path)?)
        }
        Command::Task { task_id } => {
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            print_json(out, &c.get(&format!("/v1/tasks/{task_id}"))?)
        }
        Command::Send {
            entity_id,
            msg_type,
            payload,
        } => {
            let text = read_payload(payload)?;
            let raw: &serde_json::value::RawValue =
                serde_json::from_str(&text).with_context(|| {
                    format!(
                        "the payload {payload:?} is not JSON; quote it, e.g. '{{\"text\":\"hi\"}}'"
                    )
                })?;
            let c = Client::new(&dir, cli.api_url.as_deref())?;
            // The payload goes as written, not re-serialised.
            let body = format!(
                "{{\"to\":{},\"msg_type\":{},\"payload\":{}}}",
                Value::from(entity_id.as_str()),
                Value::from(msg_type.as_str()),
                raw.get()
            );
            print_json(out, &c.post_text("/v1/messages", body)?)
        }
    }
}

/// Polls a task until it is finished (completed, failed, canceled or
/// rejected), for at most `timeout`.
fn wait_for_task(c: &Client, task_id: &str, timeout: std::time::Duration) -> Result<Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let task = c.get(&format!("/v1/tasks/{task_id}"))?;
        let finished = ["completed", "failed", "canceled", "rejected"]
            .iter()
            .any(|s| task["state"] == *s);
        if finished {
            return Ok(task);
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "task {task_id} is still {} after {} s",
                task["state"],
                timeout.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The payload argument's text: inline, `@FILE` or `-` (standard input).
fn read_payload(arg: &str) -> Result<String> {
    if arg == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the payload from standard input")?;
        return Ok(text);
    }
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the payload file {path:?}")),
        None => Ok(arg.to_owned()),
    }
}

fn print_id(out: &mut Out, identity: &peer_core::Identity) -> Result<()> {
    let key = peer_node::net::keypair(identity.secret_bytes());
    writeln!(out, "entity id: {}", identity.entity_id())?;
    writeln!(out, "peer id: {}", key.public().to_peer_id())
}

fn print_json(out: &mut Out, v: &Value) -> Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)
}

fn run_node(config: Config) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Both handlers are in place before the node starts (and writes
        // api.addr), so a signal sent as soon as the node is up stops it
        // gracefully: `systemctl stop` sends SIGTERM, Ctrl-C SIGINT.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        peer_node::run(config, async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
        .await?;
        Ok(())
    })
}

/// A blocking client of the local API.
struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Client {
    fn new(dir: &Path, api_url: Option<&str>) -> Result<Self> {
        let token = data_dir::read_token(dir)?;
        let base = match api_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let f = dir.join(data_dir::API_ADDR_FILE);
                let addr = std::fs::read_to_string(&f).map_err(|_| {
                    anyhow!(
                        "no running node found for {} ({} is missing); start one with `peer run --data-dir {}` or pass --api-url",
                        dir.display(),
                        f.display(),
                        dir.display()
                    )
                })?;
                format!("http://{}", addr.trim())
            }
        };
        Ok(Self {
            base,
            token,
            http: reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.finish(self.http.get(format!("{}{path}", self.base)))
    }

    fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.finish(self.http.put(format!("{}{path}", self.base)).json(body))
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.finish(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    /// Posts `body`, which is JSON text already.
    fn post_text(&self, path: &str, body: String) -> Result<Value> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.finish(req)
    }

    fn finish(&self, req: reqwest::blocking::RequestBuilder) -> Result<Value> {
        let resp = req.bearer_auth(&self.token).send().with_context(|| {
            format!(
                "cannot reach the node's API at {}; is `peer run` running?",
                self.base
            )
        })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .context("the API answered with something that is not JSON")?;
        if status.is_success() {
            return Ok(body);
        }
        let code = body["error"]["code"].as_str().unwrap_or("ERROR");
        let message = body["error"]["message"].as_str().unwrap_or("");
        bail!("{code}: {message} (HTTP {status})")
    }
}
