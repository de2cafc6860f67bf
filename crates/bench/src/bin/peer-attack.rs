//! `peer-attack`: an honest peer's latency while a node is under attack.
//!
//! For each scenario it starts a target node T (TCP and QUIC on 127.0.0.1)
//! and an honest node H in this process, connects H to T over TCP, sets up
//! their session with one warm-up message, prepares the attack, and then for
//! `--seconds` has H send `--rate` sealed `message` envelopes a second to T
//! through `NodeHandle::send` while the attack runs. It prints one line per
//! scenario: H's delivered and failed sends, their latency (send → accepted),
//! the CPU time used, and the attacker's figures. See `peer_bench::attack` for
//! the scenarios.
//!
//! The attacker runs on a tokio runtime of its own (`--attacker-threads`,
//! default 1), the nodes on another (`--threads`, default 2); the line gives
//! the CPU time each used during the run, and that of other processes on the
//! machine (a shared machine makes latencies worse).
//!
//! T runs the default configuration with rate limits on, except that the
//! `task` class allows twice H's rate (so H's own messages are not limited)
//! and what a scenario changes (`attack::tune`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use peer_bench::attack::{self, Options, Scenario, Target};
use peer_bench::nodes::{self, Transport};
use peer_bench::{cpu, pace};
use peer_node::Config;
use peer_node::ratelimit::QuotaConfig;
use tokio::runtime::Handle;

#[derive(Parser, Debug)]
#[command(about = "An honest peer's latency while a node is under attack")]
struct Args {
    /// A scenario, or `all` to run each in turn (each with a fresh T and H).
    #[arg(long, default_value = "all", value_parser = scenarios)]
    attack: Scenarios,
    /// H's messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Size of each JSON payload in bytes (H's messages, `garbage`'s envelopes).
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Tokio worker threads of the nodes (T, H and honest newcomers).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Tokio worker threads of the attacker, a runtime of its own.
    #[arg(long, default_value_t = 1)]
    attacker_threads: usize,
    /// Requests in flight on a flooding connection (`garbage`, `identities`).
    #[arg(long, default_value_t = 200)]
    in_flight: usize,
    /// Pings signed ahead for `identities`, each from a fresh identity; they
    /// are sent again from the first if the run outlasts them.
    #[arg(long, default_value_t = 200_000)]
    identities: usize,
    /// Streams held open by `slow-streams`.
    #[arg(long, default_value_t = 250)]
    streams: usize,
    /// Bytes each `slow-streams` stream declares.
    #[arg(long, default_value_t = 1 << 20)]
    declared_bytes: u32,
    /// Connections `connections` tries to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connection attempts in progress at once (`connections`, `rate-table`).
    #[arg(long, default_value_t = 16)]
    dialers: usize,
    /// T's `network.misbehaviour_limit` (node default if not given; 0 never
    /// closes a misbehaving connection, to measure what its requests cost).
    #[arg(long)]
    misbehaviour_limit: Option<u32>,
}

/// The scenarios to run, in order.
#[derive(Debug, Clone)]
struct Scenarios(Vec<Scenario>);

/// `all`, or one scenario's name.
fn scenarios(s: &str) -> Result<Scenarios, String> {
    if s == "all" {
        return Ok(Scenarios(Scenario::ALL.to_vec()));
    }
    Scenario::from_str(s, true).map(|one| Scenarios(vec![one]))
}

/// Name prefix of the attacker's threads.
const ATTACKER: &str = "attacker";

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = |threads: usize, name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
    };
    let attacker = runtime(args.attacker_threads, ATTACKER)?;
    let nodes = runtime(args.threads, "node")?;
    nodes.block_on(run(args, attacker.handle().clone()))
}

async fn run(args: Args, attacker: Handle) -> Result<()> {
    println!(
        "rate={}/s seconds={} payload={}B threads={} attacker_threads={} cores={}",
        args.rate,
        args.seconds,
        args.payload_bytes,
        args.threads,
        args.attacker_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let options = Options {
        in_flight: args.in_flight,
        identities: args.identities,
        streams: args.streams,
        declared_bytes: args.declared_bytes,
        connections: args.connections,
        dialers: args.dialers,
        payload_bytes: args.payload_bytes,
    };
    let mut baseline_p99 = None;
    for &scenario in &args.attack.0 {
        let p99 = scenario_run(scenario, &args, &options, &attacker, baseline_p99).await?;
        if scenario == Scenario::None {
            baseline_p99 = Some(p99);
        }
    }
    Ok(())
}

/// T's configuration for `scenario`.
fn target_config(scenario: Scenario, args: &Args) -> Result<Config> {
    let mut config = Config::default();
    config.network.listen = vec![
        Transport::Tcp.listen("127.0.0.1")?,
        Transport::Quic.listen("127.0.0.1")?,
    ];
    config.rate_limits.task = QuotaConfig {
        per_minute: u32::try_from(args.rate * 120).context("--rate")?,
        burst: u32::try_from(args.rate * 2).context("--rate")?,
    };
    attack::tune(scenario, &mut config);
    if let Some(limit) = args.misbehaviour_limit {
        config.network.misbehaviour_limit = limit;
    }
    Ok(config)
}

/// Runs `scenario` with a fresh T and H, prints its line, and returns H's p99
/// in µs.
async fn scenario_run(
    scenario: Scenario,
    args: &Args,
    options: &Options,
    attacker: &Handle,
    baseline_p99: Option<u64>,
) -> Result<u64> {
    let tmp = tempfile::tempdir()?;
    let t = nodes::start(&tmp.path().join("t"), target_config(scenario, args)?)?;
    let mut h_config = Config::default();
    h_config.network.listen = vec![Transport::Tcp.listen("127.0.0.1")?];
    let h = nodes::start(&tmp.path().join("h"), h_config)?;
    let target = Target {
        nodes: Handle::current(),
        tcp: nodes::listen_addr(&t, Transport::Tcp).await?,
        quic: nodes::listen_addr(&t, Transport::Quic).await?,
        node: t.clone(),
    };
    h.connect(target.tcp.clone())
        .await
        .context("H connects to T")?;
    nodes::drain_events(&t);
    let payload = pace::payload(args.payload_bytes);
    let to = t.entity_id();
    // The session handshake is not part of the measure.
    pace::send(h.clone(), to, payload.clone())
        .await
        .context("H's warm-up message")?;
    let prepared = {
        let (target, options) = (target.clone(), options.clone());
        attacker
            .spawn(async move { attack::prepare(scenario, &target, &options).await })
            .await?
            .with_context(|| format!("preparing {scenario}"))?
    };
    let cpu_before = cpu::Times::now(ATTACKER);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let running = attacker.spawn(prepared.run(until));
    let send = || pace::send(h.clone(), to, payload.clone());
    let tally = pace::at_rate(args.rate, args.seconds, send).await?;
    let report = running
        .await?
        .with_context(|| format!("running {scenario}"))?;
    let cpu = match (cpu_before, cpu::Times::now(ATTACKER)) {
        (Some(before), Some(after)) => {
            let used = after.since(before);
            let nodes = used.process.saturating_sub(used.named);
            format!(
                " cpu_nodes_s={:.2} cpu_attacker_s={:.2} cpu_others_s={:.2}",
                nodes.as_secs_f64(),
                used.named.as_secs_f64(),
                used.others().as_secs_f64()
            )
        }
        _ => String::new(),
    };
    let p99 = tally.at(0.99);
    let ratio = match baseline_p99 {
        Some(base) if base > 0 => format!(" p99_vs_none={:.2}x", p99 as f64 / base as f64),
        _ => String::new(),
    };
    println!(
        "attack={scenario} delivered={} failed={} p50_us={} p90_us={} p99_us={p99} max_us={}{ratio}{cpu} | {report}",
        tally.delivered(),
        tally.failed,
        tally.at(0.5),
        tally.at(0.9),
        tally.hist.max(),
    );
    Ok(p99)
}
