//! `peer-load`: starts two real nodes in this process, connected over
//! 127.0.0.1 (TCP or QUIC), and measures signed-message throughput with many
//! messages in flight, or latency at a fixed send rate. Payloads larger than
//! `transfer.chunk_size` go as chunked transfers.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use peer_bench::ceiling::Ceiling;
use peer_bench::nodes::{self, Transport};
use peer_bench::pace::{self, Tally};
use peer_node::Config;
use peer_node::NodeHandle;
use peer_node::config::NetworkConfig;
use peer_node::inbox::InboxConfig;
use peer_node::ratelimit::RateLimitConfig;
use peer_node::transfer::TransferConfig;

/// How long each half of the crypto ceiling (signing, verifying) is timed.
const CEILING_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(about = "Measure two Peer Protocol nodes on one machine")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "throughput")]
    mode: Mode,
    /// Transport between the nodes.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Messages to send (throughput mode).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Messages in flight at once (throughput mode).
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Messages per second (latency mode).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds to run (latency mode).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Size of each JSON payload in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// `transfer.max_message_size` of both nodes (node default if not given).
    #[arg(long)]
    max_message_size: Option<u64>,
    /// `transfer.chunk_size` of both nodes (node default if not given).
    #[arg(long)]
    chunk_size: Option<usize>,
    /// `transfer.window` of both nodes (node default if not given).
    #[arg(long)]
    window: Option<usize>,
    /// What reads the receiver's events: an agent that reads them as they
    /// come and acknowledges them, or nobody (everything waits in the inbox,
    /// whose bounds are raised to hold it all).
    #[arg(long, value_enum, default_value = "reads")]
    agent: Agent,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Agent {
    Reads,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Throughput,
    Latency,
    /// `--messages` frames, each the size of a sealed envelope carrying
    /// `--payload-bytes`, over a bare libp2p stream (no nodes).
    Bare,
    /// `--messages` such frames one at a time, over a kept connection and
    /// then each over a fresh connection (no nodes): their latencies.
    Connections,
}

fn start(dir: &std::path::Path, args: &Args) -> Result<NodeHandle> {
    let defaults = TransferConfig::default();
    let config = Config {
        network: NetworkConfig {
            listen: vec![args.transport.listen("127.0.0.1")?],
            max_outbound_in_flight: args.in_flight.max(4096),
            ..NetworkConfig::default()
        },
        transfer: TransferConfig {
            max_message_size: args.max_message_size.unwrap_or(defaults.max_message_size),
            chunk_size: args.chunk_size.unwrap_or(defaults.chunk_size),
            window: args.window.unwrap_or(defaults.window),
            ..defaults
        },
        // Measure the protocol, not the per-peer limits.
        rate_limits: RateLimitConfig {
            enabled: false,
            ..RateLimitConfig::default()
        },
        inbox: match args.agent {
            Agent::Reads => InboxConfig::default(),
            Agent::None => {
                let events = usize::try_from(args.messages)?.saturating_add(1);
                let bytes = (events as u64).saturating_mul(args.payload_bytes as u64 + 1024);
                InboxConfig {
                    max_events: events,
                    max_events_per_sender: events,
                    max_bytes: bytes.max(1 << 30),
                    max_bytes_per_sender: bytes.max(1 << 30),
                    ..InboxConfig::default()
                }
            }
        },
        ..Config::default()
    };
    config
        .transfer
        .validate(config.protocol.max_envelope_size)
        .map_err(anyhow::Error::msg)?;
    nodes::start(dir, config)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// The encoded size of a sealed envelope carrying `payload` bytes: the
/// ciphertext is the payload and a 16-byte tag.
fn sealed_envelope_len(payload: usize) -> usize {
    let id = peer_core::Identity::from_secret(&[1; 32]);
    peer_core::Draft {
        msg_type: "message".parse().expect("valid type"),
        message_id: peer_core::MessageId::from_random([2; 16]),
        recipient_id: Some(id.entity_id()),
        session_id: Some(peer_core::SessionId([3; 16])),
        sequence_num: 1,
        timestamp_ms: 0,
        nonce: [4; 16],
        payload: vec![0; payload + 16],
    }
    .sign(&id)
    .encode()
    .len()
}

async fn bare(args: &Args) -> Result<()> {
    let frame = sealed_envelope_len(pace::payload(args.payload_bytes).len());
    let secs = peer_bench::bare::run(args.transport, args.messages, frame, args.in_flight).await?;
    println!(
        "mode=Bare transport={:?} frame={frame}B in_flight={} threads={}",
        args.transport, args.in_flight, args.threads
    );
    println!(
        "frames={} seconds={secs:.2} rate={:.0} frames/s",
        args.messages,
        args.messages as f64 / secs
    );
    Ok(())
}

async fn connections(args: &Args) -> Result<()> {
    let frame = sealed_envelope_len(pace::payload(args.payload_bytes).len());
    println!(
        "mode=Connections transport={:?} frame={frame}B messages={}",
        args.transport, args.messages
    );
    for (name, fresh) in [("kept connection", false), ("fresh connection", true)] {
        let mut l =
            peer_bench::bare::latencies(args.transport, args.messages, frame, fresh).await?;
        l.sort();
        let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize].as_micros();
        println!(
            "{name}: latency_us p50={} p90={} p99={} max={}",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    match args.mode {
        Mode::Bare => return bare(&args).await,
        Mode::Connections => return connections(&args).await,
        _ => {}
    }
    let tmp = tempfile::tempdir()?;
    let sender = start(&tmp.path().join("a"), &args)?;
    let receiver = start(&tmp.path().join("b"), &args)?;
    sender
        .connect(nodes::listen_addr(&receiver, args.transport).await?)
        .await
        .context("connect")?;
    if let Agent::Reads = args.agent {
        nodes::drain_events(&receiver);
    }
    let payload = pace::payload(args.payload_bytes);
    let to = receiver.entity_id();
    let send = || pace::send(sender.clone(), to, payload.clone());
    println!(
        "mode={:?} transport={:?} agent={:?} payload={}B threads={} cores={}",
        args.mode,
        args.transport,
        args.agent,
        payload.len(),
        args.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Timed around a throughput run, seconds from it, on the same machine.
    let before = matches!(args.mode, Mode::Throughput).then(|| Ceiling::measure(CEILING_BUDGET));
    let started = Instant::now();
    let tally = match args.mode {
        Mode::Throughput => {
            let mut tally = Tally::new()?;
            let mut inflight = FuturesUnordered::new();
            let mut issued = 0;
            while issued < args.messages || !inflight.is_empty() {
                while issued < args.messages && inflight.len() < args.in_flight {
                    inflight.push(tokio::spawn(send()));
                    issued += 1;
                }
                if let Some(sent) = inflight.next().await {
                    tally.record(sent)?;
                }
            }
            tally
        }
        Mode::Latency => pace::at_rate(args.rate, args.seconds, send).await?,
        Mode::Bare | Mode::Connections => unreachable!("handled above"),
    };
    let secs = started.elapsed().as_secs_f64();
    let ok = tally.delivered();
    println!(
        "delivered={ok} failed={} seconds={secs:.2} rate={:.0} msg/s = {:.1} MB/s of payload",
        tally.failed,
        ok as f64 / secs,
        (ok as f64 * payload.len() as f64) / secs / 1e6
    );
    if let Some(before) = before {
        let after = Ceiling::measure(CEILING_BUDGET);
        let ceiling = (before.per_second() + after.per_second()) / 2.0;
        for (when, c) in [("before", before), ("after", after)] {
            println!(
                "crypto ceiling {when}: sign {:.1} µs + verify {:.1} µs on {} cores = {:.0} msg/s",
                c.sign.as_secs_f64() * 1e6,
                c.verify.as_secs_f64() * 1e6,
                c.cores,
                c.per_second()
            );
        }
        println!(
            "share of the crypto ceiling: {:.0} % (of {ceiling:.0} msg/s, the mean of the two)",
            100.0 * ok as f64 / secs / ceiling
        );
    }
    println!(
        "latency_us p50={} p90={} p99={} p999={} max={}",
        tally.at(0.5),
        tally.at(0.9),
        tally.at(0.99),
        tally.at(0.999),
        tally.hist.max()
    );
    // Peak resident memory of this process (Linux): both nodes, and the
    // payload this load generator holds and copies for each send.
    if let Some(peak) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:").map(str::to_owned))
        })
    {
        println!("peak_rss={}", peak.trim());
    }
    Ok(())
}
