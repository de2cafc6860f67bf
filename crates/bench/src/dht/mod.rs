//! A Kademlia network of many nodes in this process, for `peer-dht-scale`.
//!
//! Each node is a libp2p swarm of its own (Ed25519 identity, Noise, Yamux)
//! over the in-memory transport, with links of a fixed one-way latency
//! ([`link::Delayed`]), running in a tokio task of its own that the driver
//! talks to through a command channel. Its behaviour is the node's Kademlia
//! (`peer_node::net::dht::kademlia`: k, alpha, filtered inserts, server mode)
//! and identify, through which a node learns the listen address of a peer that
//! dialled it, as a real node does. It publishes its signed peer record
//! (`peer_core::registry`) under its entity's key, and stores a record pushed
//! to it only once it passes `verify_value` and `check_key`.

pub mod link;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport};
use libp2p::core::upgrade::Version;
use libp2p::kad::store::{MemoryStore, RecordStore};
use libp2p::kad::{self, QueryId, QueryResult, Quorum, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, Transport, identify, identity, noise, plaintext, yamux,
};
use peer_core::registry::{self, Content, Limits};
use peer_core::{EntityId, Identity};
use peer_node::net::dht::{self, KAD_PROTOCOL};
use peer_node::services::discovery::DiscoveryConfig;
use sha2::{Digest, Sha256};
use tokio::runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// What every node of the network runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The nodes' `[discovery]` settings, from which their Kademlia is built.
    pub discovery: DiscoveryConfig,
    /// One-way latency of every link.
    pub latency: Duration,
    /// What secures the connections.
    pub security: Security,
    /// How long a connection with no stream open stays up.
    pub idle: Duration,
    /// Negotiate the protocol of a new stream lazily (multistream-select
    /// `V1Lazy`: the request follows the proposal without waiting for the
    /// answer) instead of libp2p's default `V1`, which costs every new stream,
    /// so every Kademlia request, one more round trip.
    pub lazy_streams: bool,
    /// Seed of the identities (the same seed, the same network).
    pub seed: u64,
}

/// What secures a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    /// Noise XX, as between real nodes.
    Noise,
    /// libp2p's plaintext exchange of public keys: no key agreement and no
    /// encryption, so a connection costs less CPU and memory.
    Plaintext,
}

/// How a node leaves the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Departure {
    /// Its swarm is dropped: its connections close and dials to it are
    /// refused at once, as when a process dies on a host that stays up.
    Crash,
    /// Its swarm is kept but never polled again: connections stay open and
    /// unanswered and dials hang until they time out, as when a host vanishes.
    Silent,
}

/// The outcome of one lookup of a peer record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lookup {
    /// A record that passed `verify_value` for the target entity came back.
    pub found: bool,
    /// It was in the looking node's own store (no request was needed).
    pub local: bool,
    /// From `get_record` to the first valid record, or to the query's end.
    pub time: Duration,
    /// Kademlia requests the query had sent by then (`QueryStats::num_requests`).
    pub requests: u32,
    /// Of them, those that had failed (`QueryStats::num_failures`).
    pub failures: u32,
    /// Records that came back and failed the checks.
    pub invalid: u32,
}

/// Totals over the nodes still running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Nodes counted.
    pub nodes: usize,
    /// Records held in their stores.
    pub records: usize,
    /// Records pushed to them that failed the checks and were not stored.
    pub refused: u64,
    /// Kademlia requests they answered (FIND_NODE, GET_VALUE, PUT_VALUE, ...).
    pub served: u64,
    /// Bootstraps Kademlia ran by itself, beside the one each node was told
    /// to run when it joined: when a peer enters a routing table of fewer
    /// than k entries, and every `discovery.bootstrap_secs`.
    pub own_bootstraps: u64,
    /// Established connections (each connection counts at both ends).
    pub connections: usize,
    /// Entries in their routing tables.
    pub routing_entries: usize,
}

/// The outcome of every node's publication of its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Records that reached a majority of the k closest nodes.
    pub ok: usize,
    /// Of them, those that needed a second publication.
    pub retried: usize,
    /// Those that did not, even the second time.
    pub failed: usize,
}

/// Every libp2p protocol a bench node speaks.
#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
}

enum Command {
    Bootstrap {
        seeds: Vec<(PeerId, Multiaddr)>,
        done: oneshot::Sender<bool>,
    },
    Publish {
        done: oneshot::Sender<bool>,
    },
    Lookup {
        target: EntityId,
        done: oneshot::Sender<Lookup>,
    },
    Census {
        done: oneshot::Sender<Census>,
    },
    Freeze,
}

/// One node, seen from the driver.
struct Handle {
    entity: EntityId,
    peer: PeerId,
    addr: Multiaddr,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    alive: bool,
}

/// The nodes of the network, those gone included.
pub struct Network {
    options: Options,
    /// The runtimes the nodes run on, node i on runtime i mod their number.
    runtimes: Vec<runtime::Handle>,
    /// Ports are process-wide: a random base keeps networks apart.
    port_base: u64,
    nodes: Vec<Handle>,
}

/// How the nodes' bootstraps went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Joined {
    /// Bootstraps that ended with every lookup of theirs answered.
    pub ok: usize,
    /// Those whose last lookup timed out (the node still learned the peers
    /// that answered).
    pub timed_out: usize,
}

impl Network {
    /// A network with no node yet, of nodes that run `options` on the
    /// current tokio runtime.
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    pub fn new(options: Options) -> Self {
        Self::on(options, vec![runtime::Handle::current()])
    }

    /// A network with no node yet, of nodes that run `options`, spread over
    /// `runtimes` (a node's connections run on its runtime too). Several
    /// single-threaded runtimes, one per core, cost less than one runtime of
    /// as many threads: a node's tasks wake each other without crossing threads.
    ///
    /// # Panics
    /// If `runtimes` is empty.
    pub fn on(options: Options, runtimes: Vec<runtime::Handle>) -> Self {
        assert!(!runtimes.is_empty(), "a network needs a runtime");
        Self {
            options,
            runtimes,
            port_base: u64::from(rand::random::<u32>()) << 20,
            nodes: Vec::new(),
        }
    }

    /// Nodes started, gone ones included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was started.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether node `i` is still in the network.
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Starts `n` nodes and joins them to the network, `batch` at a time, each
    /// batch started just before it joins (so that Kademlia's periodic
    /// bootstraps are spread as in a network that grew). Node 0 comes first;
    /// nodes 1 to `seeds - 1` join through it one at a time, and every other
    /// node through the seeds (nodes 0 to `seeds - 1`): it adds their addresses
    /// and runs a Kademlia bootstrap (a lookup of its own id, then one of a
    /// random key in each bucket farther than its closest neighbour's). Call it
    /// within a tokio runtime: each node runs in a task of its own.
    ///
    /// # Errors
    /// If a swarm cannot be built or cannot listen, or a node task has ended.
    pub async fn join(&mut self, n: usize, seeds: usize, batch: usize) -> Result<Joined> {
        let mut joined = Joined::default();
        let total = self.len() + n;
        let seeds = seeds.clamp(1, total.max(1));
        let seed_addrs = |nodes: &[Handle]| {
            nodes[..seeds.min(nodes.len())]
                .iter()
                .map(|h| (h.peer, h.addr.clone()))
                .collect::<Vec<_>>()
        };
        while self.len() < seeds {
            let i = self.len();
            let first = seed_addrs(&self.nodes[..i.min(1)]);
            self.spawn()?;
            if i > 0 {
                joined.count(self.bootstrap(i, first).await?);
            }
        }
        let seeds = seed_addrs(&self.nodes);
        while self.len() < total {
            let first = self.len();
            let end = (first + batch.max(1)).min(total);
            for _ in first..end {
                self.spawn()?;
            }
            let mut joining: FuturesUnordered<_> = (first..end)
                .map(|i| self.bootstrap(i, seeds.clone()))
                .collect();
            while let Some(ok) = joining.next().await {
                joined.count(ok?);
            }
        }
        Ok(joined)
    }

    fn spawn(&mut self) -> Result<()> {
        let i = self.nodes.len();
        let runtime = &self.runtimes[i % self.runtimes.len()];
        let node = spawn(i, self.port_base + i as u64 + 1, &self.options, runtime)?;
        self.nodes.push(node);
        Ok(())
    }

    async fn bootstrap(&self, i: usize, seeds: Vec<(PeerId, Multiaddr)>) -> Result<bool> {
        let (done, answer) = oneshot::channel();
        self.send(i, Command::Bootstrap { seeds, done })?;
        answer.await.context("node task ended")
    }

    /// Has every node still in the network publish its record, `batch` at a
    /// time, and those whose publication did not reach a majority of the k
    /// closest publish once more (as a node republishes 10 s after its first
    /// publication).
    ///
    /// # Errors
    /// If a node task has ended.
    pub async fn publish(&self, batch: usize) -> Result<Published> {
        let alive: Vec<usize> = (0..self.len()).filter(|&i| self.is_alive(i)).collect();
        let failed = self.publish_some(&alive, batch).await?;
        let still = self.publish_some(&failed, batch).await?;
        Ok(Published {
            ok: alive.len() - still.len(),
            retried: failed.len(),
            failed: still.len(),
        })
    }

    /// Has nodes `which` publish their records; answers those that failed.
    async fn publish_some(&self, which: &[usize], batch: usize) -> Result<Vec<usize>> {
        let mut failed = Vec::new();
        for chunk in which.chunks(batch.max(1)) {
            let mut running = FuturesUnordered::new();
            for &i in chunk {
                let (done, answer) = oneshot::channel();
                self.send(i, Command::Publish { done })?;
                running.push(async move { (i, answer.await) });
            }
            while let Some((i, ok)) = running.next().await {
                if !ok.context("node task ended")? {
                    failed.push(i);
                }
            }
        }
        Ok(failed)
    }

    /// Node `from` looks up node `target`'s peer record.
    ///
    /// # Errors
    /// If `from`'s task has ended.
    pub async fn lookup(&self, from: usize, target: usize) -> Result<Lookup> {
        let (done, answer) = oneshot::channel();
        let target = self.nodes[target].entity;
        self.send(from, Command::Lookup { target, done })?;
        answer.await.context("node task ended")
    }

    /// Runs the lookups `(from, target)`, `concurrency` at a time; the
    /// outcomes are in the order given.
    ///
    /// # Errors
    /// If a looking node's task has ended.
    pub async fn lookups(
        &self,
        pairs: &[(usize, usize)],
        concurrency: usize,
    ) -> Result<Vec<Lookup>> {
        let mut out = vec![None; pairs.len()];
        let mut running = FuturesUnordered::new();
        let mut next = 0;
        while next < pairs.len() || !running.is_empty() {
            while next < pairs.len() && running.len() < concurrency.max(1) {
                let (from, target) = pairs[next];
                let i = next;
                running.push(async move { (i, self.lookup(from, target).await) });
                next += 1;
            }
            if let Some((i, lookup)) = running.next().await {
                out[i] = Some(lookup?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Takes the nodes `which` out of the network, abruptly.
    pub fn depart(&mut self, which: &[usize], how: Departure) {
        for &i in which {
            let node = &mut self.nodes[i];
            node.alive = false;
            match how {
                Departure::Crash => node.task.abort(),
                Departure::Silent => {
                    // A task that ended already has nobody to tell.
                    let _ = node.commands.send(Command::Freeze);
                }
            }
        }
    }

    /// Totals over the nodes still in the network.
    ///
    /// # Errors
    /// If a node task has ended.
    pub async fn census(&self) -> Result<Census> {
        let mut total = Census::default();
        for i in (0..self.len()).filter(|&i| self.is_alive(i)) {
            let (done, answer) = oneshot::channel();
            self.send(i, Command::Census { done })?;
            let c = answer.await.context("node task ended")?;
            total.nodes += c.nodes;
            total.records += c.records;
            total.refused += c.refused;
            total.served += c.served;
            total.own_bootstraps += c.own_bootstraps;
            total.connections += c.connections;
            total.routing_entries += c.routing_entries;
        }
        Ok(total)
    }

    fn send(&self, i: usize, command: Command) -> Result<()> {
        self.nodes[i]
            .commands
            .send(command)
            .map_err(|_| anyhow!("node {i}'s task has ended"))
    }
}

impl Joined {
    fn count(&mut self, ok: bool) {
        if ok {
            self.ok += 1;
        } else {
            self.timed_out += 1;
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.task.abort();
        }
    }
}

/// Node `i`'s identity secret under `seed`.
fn secret(seed: u64, i: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"peer-dht-scale");
    h.update(seed.to_be_bytes());
    h.update((i as u64).to_be_bytes());
    h.finalize().into()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The in-memory transport with links of `options.latency`, secured by
/// `options.security`, multiplexed by Yamux.
fn transport(
    key: &identity::Keypair,
    options: &Options,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let latency = options.latency;
    let link = MemoryTransport::default()
        .map(move |channel, _| link::Delayed::new(channel, latency))
        .upgrade(Version::V1Lazy);
    Ok(match options.security {
        Security::Noise => link
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .boxed(),
        Security::Plaintext => link
            .authenticate(plaintext::Config::new(key))
            .multiplex(yamux::Config::default())
            .boxed(),
    })
}

/// Builds node `i`, listening on `/memory/<port>`, and starts its task.
fn spawn(i: usize, port: u64, options: &Options, runtime: &runtime::Handle) -> Result<Handle> {
    let secret = secret(options.seed, i);
    let identity = Identity::from_secret(&secret);
    let key = peer_node::net::keypair(secret);
    let peer = key.public().to_peer_id();
    let discovery = options.discovery.clone();
    let transport = transport(&key, options)?;
    let mut swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)?
        .with_behaviour(|key| Behaviour {
            identify: identify::Behaviour::new(identify::Config::new(
                "/peer-protocol/id/1.2.0".into(),
                key.public(),
            )),
            kad: dht::kademlia(peer, &discovery),
        })?
        .with_swarm_config(|c| {
            let c = c.with_idle_connection_timeout(options.idle);
            if options.lazy_streams {
                c.with_substream_upgrade_protocol_override(Version::V1Lazy)
            } else {
                c
            }
        })
        .build();
    let addr = Multiaddr::empty().with(Protocol::Memory(port));
    swarm.listen_on(addr.clone())?;
    let signed = registry::sign(
        &identity,
        Content {
            addresses: vec![addr.clone().with(Protocol::P2p(peer)).to_string()],
            capabilities: vec!["bench".into()],
            issued_at: now_ms(),
            ttl: discovery.expire_secs,
            seq: 1,
        },
    );
    let (commands, receiver) = mpsc::unbounded_channel();
    let node = Node {
        swarm,
        record: Record::new(registry::peer_key(&identity.entity_id()), signed.value),
        limits: discovery.record_limits(),
        bootstraps: HashMap::new(),
        publishes: HashMap::new(),
        own_bootstraps: 0,
        lookups: HashMap::new(),
        refused: 0,
        served: 0,
    };
    Ok(Handle {
        entity: identity.entity_id(),
        peer,
        addr,
        commands,
        task: runtime.spawn(node.run(receiver)),
        alive: true,
    })
}

/// A lookup in progress.
struct Pending {
    target: EntityId,
    started: Instant,
    invalid: u32,
    done: oneshot::Sender<Lookup>,
}

/// A node's task: its swarm and what the driver waits for.
struct Node {
    swarm: Swarm<Behaviour>,
    /// Its own signed record, under its key.
    record: Record,
    limits: Limits,
    bootstraps: HashMap<QueryId, oneshot::Sender<bool>>,
    /// Bootstraps Kademlia ran by itself (a small routing table, or its interval).
    own_bootstraps: u64,
    publishes: HashMap<QueryId, oneshot::Sender<bool>>,
    lookups: HashMap<QueryId, Pending>,
    refused: u64,
    served: u64,
}

impl Node {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // Kademlia starts a bootstrap of its own when a listen address comes
        // up while no peer is connected: let that happen before the driver's.
        loop {
            match self.swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { .. } => break,
                event => self.on_event(event),
            }
        }
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Freeze) => break,
                    Some(command) => self.on_command(command),
                },
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
        // Silent departure: the swarm is kept, never to be polled again.
        std::future::pending::<()>().await;
    }

    fn kad(&mut self) -> &mut kad::Behaviour<MemoryStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Bootstrap { seeds, done } => {
                for (peer, addr) in seeds {
                    self.kad().add_address(&peer, addr);
                }
                match self.kad().bootstrap() {
                    Ok(id) => {
                        self.bootstraps.insert(id, done);
                    }
                    Err(_) => {
                        let _ = done.send(false);
                    }
                }
            }
            Command::Publish { done } => {
                let record = self.record.clone();
                match self.kad().put_record(record, Quorum::Majority) {
                    Ok(id) => {
                        self.publishes.insert(id, done);
                    }
                    Err(_) => {
                        let _ = done.send(false);
                    }
                }
            }
            Command::Lookup { target, done } => {
                let started = Instant::now();
                let key = RecordKey::new(&registry::peer_key(&target));
                let id = self.kad().get_record(key);
                let pending = Pending {
                    target,
                    started,
                    invalid: 0,
                    done,
                };
                self.lookups.insert(id, pending);
            }
            Command::Census { done } => {
                let routing_entries = self.kad().kbuckets().map(|b| b.num_entries()).sum();
                let census = Census {
                    nodes: 1,
                    records: self.kad().store_mut().records().count(),
                    refused: self.refused,
                    served: self.served,
                    own_bootstraps: self.own_bootstraps,
                    connections: self
                        .swarm
                        .network_info()
                        .connection_counters()
                        .num_established() as usize,
                    routing_entries,
                };
                let _ = done.send(census);
            }
            Command::Freeze => {}
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs {
                    self.kad().add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        if let kad::Event::InboundRequest { .. } = event {
            self.served += 1;
        }
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        record: Some(record),
                        ..
                    },
            } => self.on_put(record),
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                stats,
                step,
            } => match result {
                QueryResult::Bootstrap(result) if step.last => match self.bootstraps.remove(&id) {
                    Some(done) => {
                        let _ = done.send(result.is_ok());
                    }
                    None => self.own_bootstraps += 1,
                },
                QueryResult::PutRecord(result) => {
                    if let Some(done) = self.publishes.remove(&id) {
                        let _ = done.send(result.is_ok());
                    }
                }
                QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(found))) => {
                    self.on_found(id, found, &stats);
                }
                QueryResult::GetRecord(_) if step.last => {
                    if let Some(p) = self.lookups.remove(&id) {
                        let _ = p.done.send(Lookup {
                            found: false,
                            local: false,
                            time: p.started.elapsed(),
                            requests: stats.num_requests(),
                            failures: stats.num_failures(),
                            invalid: p.invalid,
                        });
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// A record pushed to this node: stored only if it is a valid peer record
    /// under its own entity's key (or one of its capabilities'), as a node's
    /// discovery service does with Kademlia's filtered inserts.
    fn on_put(&mut self, record: Record) {
        let valid = registry::verify_value(&record.value, now_ms(), self.limits)
            .is_ok_and(|s| registry::check_key(record.key.as_ref(), &s.record).is_ok());
        if !valid || self.kad().store_mut().put(record).is_err() {
            self.refused += 1;
        }
    }

    /// A record came back for a lookup: the lookup ends at the first valid one.
    fn on_found(&mut self, id: QueryId, found: kad::PeerRecord, stats: &kad::QueryStats) {
        let Some(pending) = self.lookups.get_mut(&id) else {
            return;
        };
        let valid =
            registry::verify_value(&found.record.value, now_ms(), self.limits).is_ok_and(|s| {
                s.record.entity_id == pending.target
                    && registry::check_key(found.record.key.as_ref(), &s.record).is_ok()
            });
        if !valid {
            pending.invalid += 1;
            return;
        }
        if let Some(mut query) = self.kad().query_mut(&id) {
            query.finish();
        }
        if let Some(p) = self.lookups.remove(&id) {
            let _ = p.done.send(Lookup {
                found: true,
                local: found.peer.is_none(),
                time: p.started.elapsed(),
                requests: stats.num_requests(),
                failures: stats.num_failures(),
                invalid: p.invalid,
            });
        }
    }
}
