//! `peer-dht-scale`: lookups of signed peer records in a Kademlia network of
//! many nodes in this process (see `peer_bench::dht`), with no churn and then
//! with a share of the nodes gone.
//!
//! The nodes start and listen, join one batch at a time through the seeds
//! (node 0 first), and each publishes its record (those not stored on a
//! majority of the k closest publish once more). Then `--lookups` lookups,
//! `--concurrency` at a time, each from a random node of a random other
//! node's record; then `--gone` of the nodes leave at once (`--departure`)
//! and, with no time to repair, the same number of lookups of the records of
//! nodes still there, and of nodes gone (whose records outlive them on the k
//! nodes closest to their key).
//!
//! A lookup succeeds when a record passing `verify_value` for the target comes
//! back; the query is finished there. Per successful lookup: its time, the
//! Kademlia requests sent by then (`QueryStats::num_requests`), its rounds
//! (`ceil(requests / alpha)`: alpha requests are in flight at once) and, with
//! a link latency, its time in round trips (`time / (2 × latency)`, connection
//! setups to peers not yet connected included). Memory is this process's
//! resident size (`VmRSS`) before the nodes start and after they joined and
//! published, divided by the number of nodes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use peer_bench::cpu;
use peer_bench::dht::{Departure, Joined, Lookup, Network, Options, Published, Security};
use peer_node::services::discovery::DiscoveryConfig;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

#[derive(Parser, Debug)]
#[command(about = "Lookups of signed peer records in a Kademlia network of many in-process nodes")]
struct Args {
    /// Nodes in the network.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Lookups in each scenario.
    #[arg(long, default_value_t = 1000)]
    lookups: usize,
    /// Lookups in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of the nodes that leave for the second scenario.
    #[arg(long, default_value_t = 0.2)]
    gone: f64,
    /// How they leave.
    #[arg(long, value_enum, default_value = "crash")]
    departure: Departure,
    /// Seconds between their departure and the lookups: time for the others
    /// to take in their closed connections (in one process, all at once on the
    /// same cores). Nothing repairs the routing tables meanwhile.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// One-way latency of every link, ms (0: none, the time is then CPU only).
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
    /// What secures the connections.
    #[arg(long, value_enum, default_value = "plaintext")]
    security: Security,
    /// Kademlia's periodic bootstrap interval, s (`discovery.bootstrap_secs`,
    /// 300 in a node): by default longer than a run, so that how long the
    /// join takes does not decide how many nodes bootstrap again meanwhile.
    #[arg(long, default_value_t = 3600)]
    bootstrap_secs: u64,
    /// Seconds a connection with no stream open stays up.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Negotiate each new stream's protocol lazily (multistream-select
    /// `V1Lazy`), saving the round trip libp2p's default `V1` spends on it.
    #[arg(long)]
    lazy_streams: bool,
    /// Kademlia's k (`discovery.k`).
    #[arg(long, default_value_t = DiscoveryConfig::default().k)]
    k: usize,
    /// Kademlia's alpha (`discovery.alpha`).
    #[arg(long, default_value_t = DiscoveryConfig::default().alpha)]
    alpha: usize,
    /// Nodes the others join through (node 0 and the next ones). With fewer
    /// than k, Kademlia runs a second bootstrap of its own after each
    /// joiner's first (peers entering a routing table of fewer than k entries
    /// schedule one), which doubles the cost of joining.
    #[arg(long, default_value_t = 20)]
    seeds: usize,
    /// Nodes joining, or publishing, at once.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Seed of the identities and of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads, each running a single-threaded tokio runtime with its share
    /// of the nodes.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.nodes >= 2, "--nodes must be at least 2");
    ensure!((0.0..1.0).contains(&args.gone), "--gone must be in [0, 1)");
    ensure!(args.threads >= 1, "--threads must be at least 1");
    // One single-threaded runtime per thread, each driven by a thread of its
    // own; this one drives the first, and the benchmark.
    let runtimes = (0..args.threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let handles: Vec<_> = runtimes.iter().map(|r| r.handle().clone()).collect();
    let mut runtimes = runtimes.into_iter();
    let main = runtimes.next().context("no runtime")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drivers: Vec<_> = runtimes
        .map(|rt| {
            let mut stopped = stopped.clone();
            std::thread::spawn(move || {
                rt.block_on(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
            })
        })
        .collect();
    let result = main.block_on(run(args, handles));
    let _ = stop.send(true);
    for driver in drivers {
        let _ = driver.join();
    }
    result
}

async fn run(args: Args, runtimes: Vec<tokio::runtime::Handle>) -> Result<()> {
    let run_start = Instant::now();
    let latency = Duration::from_millis(args.latency_ms);
    let options = Options {
        discovery: DiscoveryConfig {
            k: args.k,
            alpha: args.alpha,
            bootstrap_secs: args.bootstrap_secs,
            ..DiscoveryConfig::default()
        },
        latency,
        security: args.security,
        idle: Duration::from_secs(args.idle_secs),
        lazy_streams: args.lazy_streams,
        seed: args.seed,
    };
    options.discovery.validate().map_err(anyhow::Error::msg)?;
    println!(
        "nodes={} lookups={} concurrency={} gone={} departure={:?} settle={}s latency={}ms \
         security={:?} lazy_streams={} idle={}s bootstrap_interval={}s k={} alpha={} seeds={} \
         batch={} seed={} threads={} cores={}",
        args.nodes,
        args.lookups,
        args.concurrency,
        args.gone,
        args.departure,
        args.settle_secs,
        args.latency_ms,
        args.security,
        args.lazy_streams,
        args.idle_secs,
        args.bootstrap_secs,
        args.k,
        args.alpha,
        args.seeds,
        args.batch,
        args.seed,
        args.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let cpu_start = cpu::Times::now("");
    let mut rng = StdRng::seed_from_u64(args.seed);
    let start = Memory::now();
    let mut net = Network::on(options, runtimes);
    let built = build(&mut net, &args).await?;
    let memory = Memory::now();
    let census = net.census().await?;
    let n = census.nodes as f64;
    println!(
        "built: joined in {:.1} s ({} bootstraps complete, {} timed out; {} more run by Kademlia \
         itself), published in {:.1} s ({} reached a majority of the k closest, {} of them the \
         second time; {} did not); \
         per node: {:.1} records held, {:.1} connections, {:.1} routing entries, {:.0} requests \
         answered; records refused {}",
        built.join_time.as_secs_f64(),
        built.bootstraps.ok,
        built.bootstraps.timed_out,
        census.own_bootstraps,
        built.publish_time.as_secs_f64(),
        built.published.ok,
        built.published.retried,
        built.published.failed,
        census.records as f64 / n,
        census.connections as f64 / n,
        census.routing_entries as f64 / n,
        census.served as f64 / n,
        census.refused,
    );
    let per_node = memory.rss_kib.saturating_sub(start.rss_kib) as f64 / args.nodes as f64;
    println!(
        "memory: rss_start={} KiB rss_built={} KiB per_node={per_node:.0} KiB \
         (with {:.1} connections each) peak={} KiB",
        start.rss_kib,
        memory.rss_kib,
        census.connections as f64 / n,
        memory.hwm_kib
    );

    let all: Vec<usize> = (0..args.nodes).collect();
    let none = net
        .lookups(&pairs(&mut rng, &all, &all, args.lookups), args.concurrency)
        .await?;
    let mut order = all;
    order.shuffle(&mut rng);
    let gone_count = (args.nodes as f64 * args.gone).round() as usize;
    let (gone, alive) = order.split_at(gone_count);
    net.depart(gone, args.departure);
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let of_alive = net
        .lookups(
            &pairs(&mut rng, alive, alive, args.lookups),
            args.concurrency,
        )
        .await?;
    let of_gone = net
        .lookups(
            &pairs(&mut rng, alive, gone, args.lookups),
            args.concurrency,
        )
        .await?;

    let pct = args.gone * 100.0;
    let rows = [
        ("none", "no churn".to_owned(), none),
        (
            "gone-alive",
            format!("{pct:.0}% gone: alive targets"),
            of_alive,
        ),
        (
            "gone-gone",
            format!("{pct:.0}% gone: gone targets"),
            of_gone,
        ),
    ];
    println!(
        "| scenario | lookups | found | success | local | requests p50/p99 | rounds p50/p99 | \
         round trips p50/p99 | time p50/p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let summaries: Vec<_> = rows
        .iter()
        .map(|(name, label, lookups)| (name, label, Summary::of(lookups, args.alpha, latency)))
        .collect();
    for (_, label, s) in &summaries {
        println!(
            "| {label} | {} | {} | {:.2}% | {} | {} / {} | {} / {} | {} | {:.1} / {:.1} |",
            s.lookups,
            s.found,
            s.success * 100.0,
            s.local,
            s.requests.0,
            s.requests.1,
            s.rounds.0,
            s.rounds.1,
            s.round_trips
                .map_or("-".into(), |(a, b)| format!("{a:.2} / {b:.2}")),
            s.time_ms.0,
            s.time_ms.1,
        );
    }
    for (name, _, s) in &summaries {
        let (rt50, rt99) = s.round_trips.unwrap_or((f64::NAN, f64::NAN));
        println!(
            "dht-scale scenario={name} nodes={} lookups={} found={} success={:.4} local={} \
             requests_p50={} requests_p99={} rounds_p50={} rounds_p99={} round_trips_p50={rt50:.2} \
             round_trips_p99={rt99:.2} time_ms_p50={:.1} time_ms_p99={:.1} failed_requests={} \
             invalid={} per_node_kib={per_node:.0}",
            args.nodes,
            s.lookups,
            s.found,
            s.success,
            s.local,
            s.requests.0,
            s.requests.1,
            s.rounds.0,
            s.rounds.1,
            s.time_ms.0,
            s.time_ms.1,
            s.failed_requests,
            s.invalid,
        );
    }
    if let (Some(before), Some(after)) = (cpu_start, cpu::Times::now("")) {
        let used = after.since(before);
        println!(
            "cpu: this process {:.0} s, other processes {:.0} s, in {:.0} s",
            used.process.as_secs_f64(),
            used.others().as_secs_f64(),
            run_start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// How the network was built.
struct Built {
    bootstraps: Joined,
    join_time: Duration,
    published: Published,
    publish_time: Duration,
}

/// Joins `args.nodes` nodes, `args.batch` at a time (progress on stderr), and
/// has each publish its record.
async fn build(net: &mut Network, args: &Args) -> Result<Built> {
    let t = Instant::now();
    let mut bootstraps = Joined::default();
    while net.len() < args.nodes {
        let batch = args.batch.min(args.nodes - net.len());
        let joined = net.join(batch, args.seeds, args.batch).await?;
        bootstraps.ok += joined.ok;
        bootstraps.timed_out += joined.timed_out;
        let c = net.census().await?;
        eprintln!(
            "joined {} of {} nodes in {:.1} s: {} requests answered so far, {} connections open",
            net.len(),
            args.nodes,
            t.elapsed().as_secs_f64(),
            c.served,
            c.connections
        );
    }
    let join_time = t.elapsed();
    let t = Instant::now();
    let published = net.publish(args.batch).await?;
    Ok(Built {
        bootstraps,
        join_time,
        published,
        publish_time: t.elapsed(),
    })
}

/// `count` random (from, target) pairs, from ≠ target (fewer if there are
/// hardly any to draw from).
fn pairs(rng: &mut StdRng, from: &[usize], to: &[usize], count: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.saturating_mul(100) {
        if out.len() == count {
            break;
        }
        if let (Some(&a), Some(&b)) = (from.choose(rng), to.choose(rng))
            && a != b
        {
            out.push((a, b));
        }
    }
    out
}

/// The figures of one scenario: percentiles over the successful lookups.
struct Summary {
    lookups: usize,
    found: usize,
    success: f64,
    local: usize,
    requests: (u32, u32),
    rounds: (u32, u32),
    round_trips: Option<(f64, f64)>,
    time_ms: (f64, f64),
    failed_requests: u64,
    invalid: u64,
}

impl Summary {
    fn of(lookups: &[Lookup], alpha: usize, latency: Duration) -> Self {
        let found: Vec<&Lookup> = lookups.iter().filter(|l| l.found).collect();
        let alpha = u32::try_from(alpha.max(1)).unwrap_or(u32::MAX);
        let mut requests: Vec<u32> = found.iter().map(|l| l.requests).collect();
        let mut rounds: Vec<u32> = requests.iter().map(|r| r.div_ceil(alpha)).collect();
        let mut times: Vec<f64> = found.iter().map(|l| l.time.as_secs_f64() * 1e3).collect();
        let rtt_ms = 2.0 * latency.as_secs_f64() * 1e3;
        let round_trips = (rtt_ms > 0.0).then(|| {
            let mut v: Vec<f64> = times.iter().map(|t| t / rtt_ms).collect();
            (percentile(&mut v, 0.5), percentile(&mut v, 0.99))
        });
        Self {
            lookups: lookups.len(),
            found: found.len(),
            success: if lookups.is_empty() {
                f64::NAN
            } else {
                found.len() as f64 / lookups.len() as f64
            },
            local: found.iter().filter(|l| l.local).count(),
            requests: (
                percentile(&mut requests, 0.5),
                percentile(&mut requests, 0.99),
            ),
            rounds: (percentile(&mut rounds, 0.5), percentile(&mut rounds, 0.99)),
            round_trips,
            time_ms: (percentile(&mut times, 0.5), percentile(&mut times, 0.99)),
            failed_requests: lookups.iter().map(|l| u64::from(l.failures)).sum(),
            invalid: lookups.iter().map(|l| u64::from(l.invalid)).sum(),
        }
    }
}

/// The `p`-th quantile (nearest rank) of `v`, which it sorts; the default
/// value if `v` is empty.
fn percentile<T: PartialOrd + Copy + Default>(v: &mut [T], p: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// This process's resident memory now and at its peak (Linux; 0 elsewhere).
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn now() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}
