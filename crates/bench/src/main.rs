//! `peer-load`: starts two real nodes in this process, connected over
//! 127.0.0.1 (TCP or QUIC), and measures signed-message throughput with many
//! messages in flight, or latency at a fixed send rate. Payloads larger than
//! `transfer.chunk_size` go as chunked transfers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use peer_node::config::NetworkConfig;
use peer_node::node::{self, NodeHandle};
use peer_node::ratelimit::RateLimitConfig;
use peer_node::store::Store;
use peer_node::transfer::TransferConfig;
use peer_node::{Config, data_dir};

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
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Throughput,
    Latency,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Transport {
    Tcp,
    Quic,
}

async fn start(dir: &std::path::Path, args: &Args) -> Result<NodeHandle> {
    let listen = match args.transport {
        Transport::Tcp => "/ip4/127.0.0.1/tcp/0",
        Transport::Quic => "/ip4/127.0.0.1/udp/0/quic-v1",
    };
    let defaults = TransferConfig::default();
    let config = Config {
        data_dir: dir.to_path_buf(),
        network: NetworkConfig {
            listen: vec![listen.parse()?],
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
        ..Config::default()
    };
    config
        .transfer
        .validate(config.protocol.max_envelope_size)
        .map_err(anyhow::Error::msg)?;
    let secrets = data_dir::init(dir, peer_node::fresh_secrets)?;
    let store = Store::open(&dir.join(data_dir::DB_FILE))?;
    Ok(node::start(config, secrets.identity, store)?)
}

async fn listen_addr(h: &NodeHandle) -> Result<peer_node::libp2p::Multiaddr> {
    for _ in 0..500 {
        if let Some(a) = h.listen_addrs().await?.first() {
            return Ok(a.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the receiving node did not start listening")
}

/// Counts a failed send; prints the first one's reason.
fn fail(failed: &mut u64, e: peer_node::NodeError) {
    if *failed == 0 {
        eprintln!("first failure: {e}");
    }
    *failed += 1;
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let sender = start(&tmp.path().join("a"), &args).await?;
    let receiver = start(&tmp.path().join("b"), &args).await?;
    sender
        .connect(listen_addr(&receiver).await?)
        .await
        .context("connect")?;
    let mut events = receiver.subscribe();
    // Drain the receiver's event stream as an agent would.
    tokio::spawn(async move { while events.recv().await.is_ok() || !events.is_empty() {} });
    let payload = Arc::new(
        format!(
            "{{\"pad\":\"{}\"}}",
            "x".repeat(args.payload_bytes.saturating_sub(10))
        )
        .into_bytes(),
    );
    let to = receiver.entity_id();
    let send = move |s: NodeHandle, p: Arc<Vec<u8>>| async move {
        let started = Instant::now();
        s.send(to, "message".parse().expect("valid type"), p.to_vec())
            .await
            .map(|_| started.elapsed())
    };
    println!(
        "mode={:?} transport={:?} payload={}B threads={} cores={}",
        args.mode,
        args.transport,
        payload.len(),
        args.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    let mut failed = 0u64;
    match args.mode {
        Mode::Throughput => {
            let mut inflight = FuturesUnordered::new();
            let mut issued = 0;
            while issued < args.messages || !inflight.is_empty() {
                while issued < args.messages && inflight.len() < args.in_flight {
                    inflight.push(tokio::spawn(send(sender.clone(), payload.clone())));
                    issued += 1;
                }
                match inflight.next().await {
                    Some(Ok(Ok(lat))) => hist.record(lat.as_micros() as u64)?,
                    Some(Ok(Err(e))) => fail(&mut failed, e),
                    _ => failed += 1,
                }
            }
        }
        Mode::Latency => {
            let total = args.rate * args.seconds;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = FuturesUnordered::new();
            let mut issued = 0;
            while issued < total || !inflight.is_empty() {
                tokio::select! {
                    _ = tick.tick(), if issued < total => {
                        inflight.push(tokio::spawn(send(sender.clone(), payload.clone())));
                        issued += 1;
                    }
                    Some(r) = inflight.next() => match r {
                        Ok(Ok(lat)) => hist.record(lat.as_micros() as u64)?,
                        Ok(Err(e)) => fail(&mut failed, e),
                        Err(_) => failed += 1,
                    },
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = hist.len();
    println!(
        "delivered={ok} failed={failed} seconds={secs:.2} rate={:.0} msg/s = {:.1} MB/s of payload",
        ok as f64 / secs,
        (ok as f64 * payload.len() as f64) / secs / 1e6
    );
    println!(
        "latency_us p50={} p90={} p99={} p999={} max={}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
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
