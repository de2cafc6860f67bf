//! `peer-dht-scale`'s network, small: every node joins and publishes its
//! record, and every lookup finds a valid record, with no churn and after a
//! fifth of the nodes crashed.

use std::time::Duration;

use peer_bench::dht::{Departure, Network, Options, Security};
use peer_node::services::discovery::DiscoveryConfig;

const NODES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_nodes_find_every_record() {
    let options = Options {
        discovery: DiscoveryConfig::default(),
        latency: Duration::ZERO,
        security: Security::Plaintext,
        idle: Duration::from_secs(60),
        lazy_streams: false,
        seed: 7,
    };
    let mut net = Network::new(options);
    let joined = net.join(NODES, 20, NODES).await.expect("join");
    assert_eq!(joined.timed_out, 0, "{joined:?}");
    let published = net.publish(NODES).await.expect("publish");
    assert_eq!(published.failed, 0, "{published:?}");
    let census = net.census().await.expect("census");
    assert_eq!(census.refused, 0, "{census:?}");
    // Each record on the k = 20 nodes closest to its key (and its own).
    assert!(census.records >= NODES * 20, "{census:?}");

    // Node i looks up node 7i + 1 (mod 40), never itself.
    let pairs: Vec<_> = (0..NODES).map(|i| (i, (7 * i + 1) % NODES)).collect();
    let lookups = net.lookups(&pairs, 8).await.expect("lookups");
    assert!(
        lookups.iter().all(|l| l.found && l.invalid == 0),
        "{lookups:?}"
    );

    // A fifth crash: the others still find each other's records, and those
    // of the nodes gone.
    let gone: Vec<usize> = (0..NODES).filter(|i| i % 5 == 2).collect();
    net.depart(&gone, Departure::Crash);
    let alive: Vec<usize> = (0..NODES).filter(|&i| net.is_alive(i)).collect();
    let pairs: Vec<_> = alive
        .iter()
        .map(|&i| (i, alive[(7 * i + 1) % alive.len()]))
        .filter(|(a, b)| a != b)
        .chain(gone.iter().map(|&g| (alive[g % alive.len()], g)))
        .collect();
    let lookups = net.lookups(&pairs, 8).await.expect("lookups");
    assert!(
        lookups.iter().all(|l| l.found && l.invalid == 0),
        "{lookups:?}"
    );
}
