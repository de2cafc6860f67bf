//! Discovery and DHT registry settings (`[discovery]`).

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Discovery and DHT registry settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Run the DHT registry and discovery (default true). Off, the node
    /// reaches only the peers it is given.
    pub enabled: bool,
    /// The bootstrap role (`peer run --bootstrap-node`): the node serves the
    /// DHT and relays announces for others and runs no application service
    /// (no messages, tasks or inbox) (default false).
    pub bootstrap_node: bool,
    /// Peers kept connected beside the DHT (the hybrid mode's static list),
    /// each address ending in `/p2p/<peer id>`: dialled at start and again
    /// whenever their connection is lost.
    pub static_peers: Vec<Multiaddr>,
    /// Kademlia's k: the replication factor and bucket size (default 20).
    pub k: usize,
    /// Kademlia's alpha: requests in flight per lookup (default 3).
    pub alpha: usize,
    /// tRefresh: seconds between two publications of the node's own record
    /// and provider entries, and between two replications of the records it
    /// holds (default 3,600).
    pub refresh_secs: u64,
    /// tExpire: seconds a record is valid after it is signed, and the
    /// longest `ttl` a record may carry (default 86,400).
    pub expire_secs: u64,
    /// Largest record value, in bytes (default 4,096).
    pub max_record_bytes: usize,
    /// Most records the node holds for the DHT, and most keys it holds
    /// provider entries for (default 65,536); a new one beyond it is not
    /// stored.
    pub max_records: usize,
    /// Seconds between two Kademlia bootstraps (refreshing the routing
    /// table) (default 300).
    pub bootstrap_secs: u64,
    /// Seconds between two random walks (a lookup of a random key whose
    /// answers are checked and offered) (default 300).
    pub random_walk_secs: u64,
    /// Seconds between two active discovery rounds (a lookup of the node's
    /// own neighbourhood and of every capability its agent asked for), each
    /// with up to a quarter of it as random jitter (default 60).
    pub query_secs: u64,
    /// Seconds a DHT lookup may take (default 30).
    pub query_timeout_secs: u64,
    /// Announce the node's record over gossipsub, and take others' announces
    /// (default true).
    pub announce: bool,
    /// Find peers on the local network with mDNS (default true).
    pub mdns: bool,
    /// Most peers in the discovery table; beyond it a peer never reached is
    /// forgotten first, then the one seen longest ago (default 10,000).
    pub max_peers: usize,
    /// Most reachability checks (dials of a discovered peer) at once
    /// (default 16).
    pub max_probes: usize,
    /// Most lookups the agent or the node waits on at once; more are refused
    /// `UNAVAILABLE` (default 256).
    pub max_lookups: usize,
    /// Most messages waiting for a lookup and a dial to their recipient, in
    /// all; more fail at once (default 1,024).
    pub max_parked: usize,
    /// First wait before a lost peer is dialled again, ms; doubled on every
    /// failure (default 1,000).
    pub reconnect_min_ms: u64,
    /// Longest wait between two redials, ms (default 300,000).
    pub reconnect_max_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bootstrap_node: false,
            static_peers: Vec::new(),
            k: 20,
            alpha: 3,
            refresh_secs: 3_600,
            expire_secs: 86_400,
            max_record_bytes: 4_096,
            max_records: 65_536,
            bootstrap_secs: 300,
            random_walk_secs: 300,
            query_secs: 60,
            query_timeout_secs: 30,
            announce: true,
            mdns: true,
            max_peers: 10_000,
            max_probes: 16,
            max_lookups: 256,
            max_parked: 1_024,
            reconnect_min_ms: 1_000,
            reconnect_max_ms: 300_000,
        }
    }
}

impl DiscoveryConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("k", self.k as u64),
            ("alpha", self.alpha as u64),
            ("refresh_secs", self.refresh_secs),
            ("expire_secs", self.expire_secs),
            ("max_records", self.max_records as u64),
            ("bootstrap_secs", self.bootstrap_secs),
            ("random_walk_secs", self.random_walk_secs),
            ("query_secs", self.query_secs),
            ("query_timeout_secs", self.query_timeout_secs),
            ("max_peers", self.max_peers as u64),
            ("max_probes", self.max_probes as u64),
            ("max_lookups", self.max_lookups as u64),
            ("reconnect_min_ms", self.reconnect_min_ms),
        ] {
            if value == 0 {
                return Err(format!("discovery.{key} is 0; it must be at least 1"));
            }
        }
        if self.max_record_bytes < 512 {
            return Err(format!(
                "discovery.max_record_bytes must be at least 512 (a record with one address), not {}",
                self.max_record_bytes
            ));
        }
        if let Some(a) = self
            .static_peers
            .iter()
            .find(|a| !matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))))
        {
            return Err(format!(
                "discovery.static_peers: {a} must end in /p2p/<peer id> (the peer to keep connected)"
            ));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(format!(
                "discovery.reconnect_max_ms ({}) must be at least discovery.reconnect_min_ms ({})",
                self.reconnect_max_ms, self.reconnect_min_ms
            ));
        }
        Ok(())
    }

    /// The limits records are checked against.
    pub fn record_limits(&self) -> peer_core::registry::Limits {
        peer_core::registry::Limits {
            max_bytes: self.max_record_bytes,
            max_ttl: self.expire_secs,
        }
    }
}
