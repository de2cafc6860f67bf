//! Attacks on a target node T, each run while an honest node H sends to T at a
//! fixed rate (`peer-attack`). An attack is prepared first (its connections
//! opened, its envelopes made), untimed, and then runs until a deadline and
//! reports its own figures.
//!
//! The attacker runs in the same process as both nodes, so its own work (its
//! swarms, TLS and Noise handshakes) shares the machine's cores with them. Run
//! it on a runtime of its own, with fewer threads than cores, to leave the
//! nodes the rest; each attack does its expensive preparation (such as
//! signing) before the clock starts.

mod flood;
mod hosts;
mod slow;

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use futures::StreamExt;
use futures::future::BoxFuture;
use peer_core::{Draft, EntityId, Identity, MessageId};
use peer_node::NodeHandle;
use peer_node::libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use peer_node::libp2p::{Multiaddr, PeerId, Swarm};
use peer_node::node::now_ms;

/// Time an attacker's dial gets to be established.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the attacker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Nothing: the baseline.
    None,
    /// Envelopes with bad signatures on one connection, as fast as it can.
    Garbage,
    /// Validly signed pings, each from a fresh identity, on one connection.
    Identities,
    /// Streams that declare a large body and then trickle it.
    SlowStreams,
    /// Connections from fresh PeerIds from one other host, held open.
    Connections,
    /// Fresh identities churning through T's rate-limit table.
    RateTable,
}

impl Scenario {
    /// Every scenario, the baseline first.
    pub const ALL: [Self; 6] = [
        Self::None,
        Self::Garbage,
        Self::Identities,
        Self::SlowStreams,
        Self::Connections,
        Self::RateTable,
    ];
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// Tunables of the attacks.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests in flight on a flooding connection (`garbage`, `identities`).
    pub in_flight: usize,
    /// Envelopes made ahead for `identities`, each from its own identity.
    pub identities: usize,
    /// Streams held open by `slow-streams`.
    pub streams: usize,
    /// Bytes each slow stream declares.
    pub declared_bytes: u32,
    /// Connections `connections` tries to open.
    pub connections: usize,
    /// Connection attempts in progress at once (`connections`, `rate-table`).
    pub dialers: usize,
    /// Size of the JSON payload of the envelopes `garbage` sends.
    pub payload_bytes: usize,
}

/// The node under attack, as the attacker sees it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The runtime the nodes run on: honest nodes an attack starts run there,
    /// not on the attacker's.
    pub nodes: tokio::runtime::Handle,
    /// A handle on T, for its metrics and entity id.
    pub node: NodeHandle,
    /// T's TCP address on 127.0.0.1.
    pub tcp: Multiaddr,
    /// T's QUIC address on 127.0.0.1.
    pub quic: Multiaddr,
}

/// An attack's figures, in the order they are printed.
#[derive(Debug, Default)]
pub struct Report(Vec<(String, String)>);

impl Report {
    /// Adds a figure.
    pub fn add(&mut self, key: impl Into<String>, value: impl fmt::Display) -> &mut Self {
        self.0.push((key.into(), value.to_string()));
        self
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (k, v) in &self.0 {
            write!(f, "{sep}{k}={v}")?;
            sep = " ";
        }
        Ok(())
    }
}

/// A prepared attack.
pub trait Attack: Send {
    /// Runs until `until`, then reports.
    fn run(self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>>;
}

struct Idle;

impl Attack for Idle {
    fn run(self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>> {
        Box::pin(async move {
            tokio::time::sleep_until(until.into()).await;
            Ok(Report::default())
        })
    }
}

/// Prepares `scenario` against `target`.
pub async fn prepare(
    scenario: Scenario,
    target: &Target,
    options: &Options,
) -> Result<Box<dyn Attack>> {
    Ok(match scenario {
        Scenario::None => Box::new(Idle),
        Scenario::Garbage => Box::new(flood::garbage(target, options).await?),
        Scenario::Identities => Box::new(flood::identities(target, options).await?),
        Scenario::SlowStreams => Box::new(slow::SlowStreams::prepare(target, options).await?),
        Scenario::Connections => Box::new(hosts::Connections::new(target, options)),
        Scenario::RateTable => Box::new(hosts::RateTable::new(target, options)),
    })
}

/// Adjusts T's configuration for `scenario`: for `rate-table`, the fewest
/// rate-limit places the node allows (`rate_limits.max_peers` =
/// `network.max_connections`), so that a short churn overflows the table.
pub fn tune(scenario: Scenario, config: &mut peer_node::Config) {
    if scenario == Scenario::RateTable {
        config.rate_limits.max_peers = config.network.max_connections as usize;
    }
}

/// An envelope of `msg_type` with `payload` to `to`, signed by `identity`.
fn signed(
    identity: &Identity,
    to: EntityId,
    msg_type: &str,
    payload: Vec<u8>,
) -> peer_core::Envelope {
    Draft {
        msg_type: msg_type.parse().expect("a valid msg_type"),
        message_id: MessageId::from_random(rand::random()),
        recipient_id: Some(to),
        session_id: None,
        sequence_num: 0,
        timestamp_ms: now_ms(),
        nonce: rand::random(),
        payload,
    }
    .sign(identity)
}

/// Dials `addr` from `swarm` and drives it until the connection is
/// established: the peer, or why it was not within [`DIAL_TIMEOUT`].
async fn dial<B: NetworkBehaviour>(swarm: &mut Swarm<B>, addr: Multiaddr) -> Result<PeerId> {
    swarm.dial(addr)?;
    tokio::time::timeout(DIAL_TIMEOUT, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => return Ok(peer_id),
                SwarmEvent::OutgoingConnectionError { error, .. } => bail!("{error}"),
                _ => {}
            }
        }
    })
    .await
    .context("the dial timed out")?
}

/// A fresh identity.
/// The configuration of an attacker's swarm: the node's wire protocol and
/// nothing of discovery (no DHT, no announces, no mDNS).
fn attacker_config() -> peer_node::Config {
    let mut config = peer_node::Config::default();
    config.discovery.enabled = false;
    config
}

fn fresh_identity() -> Identity {
    Identity::from_secret(&rand::random())
}
