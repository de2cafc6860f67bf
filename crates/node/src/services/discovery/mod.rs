//! Discovery and the DHT registry (PROTOCOL.md section 15).
//!
//! The node publishes its signed peer record ([`peer_core::registry`]) under
//! its entity key and under the capability-index key of each capability its
//! card offers, provides each capability's provider key, and announces the
//! record over gossipsub; again every `discovery.refresh_secs` and whenever
//! its addresses or capabilities change. Every record that reaches it (a
//! peer asking it to hold one, a lookup's answer, an announce) is checked
//! before it is stored, believed or forwarded.
//!
//! All sources feed one [`table::Table`] keyed by entity id: DHT lookups,
//! random walks, announces, mDNS and connections. A peer with a verified
//! record is dialled once (the reachability check) and then offered. A lost
//! peer that is kept (the agent connected to it, a static peer, or a
//! service has a message or task for it) is dialled again with exponential
//! backoff and jitter, at its newest record's addresses; after two failures
//! its record is looked up again (it may have moved).

mod config;
pub mod lookup;
mod store;
pub mod table;

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::kad::{ProviderRecord, Record};
use libp2p::{Multiaddr, PeerId, gossipsub};
use peer_core::registry::{self, Content, RecordError, Signed};
use peer_core::{EntityId, Identity};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub use config::DiscoveryConfig;
use lookup::{Lookups, Then};
use table::{Backoff, Learned, Source, Table};

use super::card::CardCell;
use crate::net;
use crate::network::{Found, NetEvent, NetOp};
use crate::node::NodeError;
use crate::service::{Context, PeerEvent, Service};
use crate::store::{Store, StoreError};

/// After this many failed redials the peer's record is looked up again.
const REFRESH_AFTER_FAILURES: u32 = 2;
/// How often expired records are swept at most, ms (more often when
/// tExpire is short).
const SWEEP_MS: u64 = 60_000;
/// Wait after a change of addresses before publishing, ms (they come one
/// by one at start).
const SETTLE_MS: u64 = 500;
/// The second publication after joining, ms (the first may find the
/// routing table nearly empty).
const REPUBLISH_AFTER_JOIN_MS: u64 = 10_000;
/// Shortest time between two announces of the own record, ms.
const ANNOUNCE_MIN_MS: u64 = 5_000;
/// Capabilities remembered for the periodic queries.
const MAX_WATCHED: usize = 16;

/// A peer as discovery shows it (`GET /v1/peers/{id}`, `/v1/discover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    /// Its entity id.
    pub entity_id: EntityId,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Addresses to dial it at, newest record's first.
    pub addresses: Vec<String>,
    /// Its capabilities (from its record).
    pub capabilities: Vec<String>,
    /// Its record, if a verified one is held: the value as signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// Whether a verified record is held.
    pub verified: bool,
    /// Whether a connection to it opened at least once.
    pub reachable: bool,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Where it was learnt from.
    pub sources: Vec<Source>,
}

/// Counts of what discovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiscoveryStats {
    /// Peers in the table.
    pub known: usize,
    /// Peers verified and reached.
    pub offered: usize,
    /// Records held for the DHT.
    pub held_records: usize,
    /// Records stored for other peers.
    pub stored: u64,
    /// Records refused, by where they came from and why
    /// (`store:bad_signature`, `lookup:stale`, `announce:expired`, ...).
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Announces accepted (and forwarded).
    pub announces: u64,
    /// Redials started.
    pub redials: u64,
}

/// What discovery takes from handles.
#[derive(Debug)]
pub enum Command {
    /// The peer, looked up in the DHT if it is not known.
    Find(EntityId, oneshot::Sender<Result<PeerInfo, NodeError>>),
    /// The peers offering a capability (verified records listing it).
    Discover(String, oneshot::Sender<Result<Vec<PeerInfo>, NodeError>>),
    /// Every peer in the table.
    Table(oneshot::Sender<Vec<PeerInfo>>),
    /// The counters.
    Stats(oneshot::Sender<DiscoveryStats>),
}

/// A record held for the DHT, as much as is needed to judge a newer one.
#[derive(Debug, Clone, Copy)]
struct Held {
    seq: u64,
    expires_at: u64,
    digest: [u8; 32],
}

impl Held {
    fn of(signed: &Signed) -> Self {
        Self {
            seq: signed.record.seq,
            expires_at: signed.record.expires_at(),
            digest: Sha256::digest(&signed.value).into(),
        }
    }
}

/// Stores a checked record in Kademlia's store, to expire with the record.
fn store_in_kademlia(cx: &mut Context<'_>, key: Vec<u8>, signed: &Signed, now: u64) {
    let mut record = Record::new(key, signed.value.clone());
    let left = signed.record.expires_at().saturating_sub(now);
    record.expires = Some(std::time::Instant::now() + ms(left));
    cx.network(NetOp::Store(record));
}

/// The discovery service.
pub struct Discovery {
    config: DiscoveryConfig,
    card: CardCell,
    table: Table,
    lookups: Lookups,
    /// Records held for others, by DHT key (the store is fed only from here).
    held: HashMap<Vec<u8>, Held>,
    /// Records loaded from the database, stored into Kademlia at start.
    loaded: Vec<(Vec<u8>, Signed)>,
    /// The own record, once published.
    own: Option<Signed>,
    /// Capabilities the own record lists (and the node provides).
    provided: Vec<String>,
    listen: Vec<Multiaddr>,
    /// Entities a service wants a connection to, and whether their record
    /// was looked up since the last failed dial.
    wanted: HashMap<EntityId, bool>,
    /// Capabilities the agent asked for, queried again periodically.
    watched: Vec<String>,
    joined: bool,
    started: bool,
    publish_at: Option<u64>,
    republish_at: Option<u64>,
    announce_at: Option<u64>,
    last_announce: Option<u64>,
    walk_at: u64,
    query_at: u64,
    sweep_at: u64,
    stats: DiscoveryStats,
}

impl Discovery {
    /// The service, with the records the database holds.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub fn load(
        store: &Store,
        config: DiscoveryConfig,
        card: CardCell,
        now: u64,
    ) -> Result<Self, StoreError> {
        let limits = config.record_limits();
        let loaded: Vec<(Vec<u8>, Signed)> = store::load(store)?
            .into_iter()
            .filter_map(|(key, value)| {
                let signed = registry::verify_value(&value, now, limits).ok()?;
                registry::check_key(&key, &signed.record).ok()?;
                Some((key, signed))
            })
            .collect();
        let held = loaded
            .iter()
            .map(|(key, signed)| (key.clone(), Held::of(signed)))
            .collect();
        let backoff = Backoff {
            min_ms: config.reconnect_min_ms,
            max_ms: config.reconnect_max_ms,
        };
        Ok(Self {
            table: Table::new(config.max_peers, backoff),
            lookups: Lookups::new(config.max_lookups),
            config,
            card,
            held,
            loaded,
            own: None,
            provided: Vec::new(),
            listen: Vec::new(),
            wanted: HashMap::new(),
            watched: Vec::new(),
            joined: false,
            started: false,
            publish_at: None,
            republish_at: None,
            announce_at: None,
            last_announce: None,
            walk_at: 0,
            query_at: 0,
            sweep_at: 0,
            stats: DiscoveryStats::default(),
        })
    }

    /// The peer as shown to the agent.
    fn info(&self, entity: EntityId) -> Option<PeerInfo> {
        let k = self.table.get(&entity)?;
        let record = k.record.as_ref();
        Some(PeerInfo {
            entity_id: entity,
            peer_id: k.peer.to_string(),
            addresses: k.addrs.iter().map(ToString::to_string).collect(),
            capabilities: record
                .map(|r| r.record.capabilities.clone())
                .unwrap_or_default(),
            record: record.and_then(|r| serde_json::from_slice(&r.value).ok()),
            verified: record.is_some(),
            reachable: k.reached_ms.is_some(),
            connected: k.connected,
            sources: k.sources.clone(),
        })
    }

    fn refuse(&mut self, place: &str, e: &RecordError) {
        let reason = match e {
            RecordError::TooLarge { .. } => "too_large",
            RecordError::Malformed(_) => "malformed",
            RecordError::KeyMismatch => "key_mismatch",
            RecordError::BadSignature => "bad_signature",
            RecordError::Future => "future",
            RecordError::Expired => "expired",
            RecordError::Stale { .. } => "stale",
            RecordError::WrongKey => "wrong_key",
        };
        tracing::debug!(place, error = %e, "record refused");
        *self
            .stats
            .refused
            .entry(format!("{place}:{reason}"))
            .or_default() += 1;
    }

    /// Checks a record found under `key`: valid, under its own key, and not
    /// older than the one the table holds.
    fn check(&self, key: &[u8], value: &[u8], now_ms: u64) -> Result<Signed, RecordError> {
        let signed = registry::verify_value(value, now_ms, self.config.record_limits())?;
        registry::check_key(key, &signed.record)?;
        if let Some(held) = self
            .table
            .get(&signed.record.entity_id)
            .and_then(|k| k.record.as_ref())
        {
            registry::check_replaces(&signed, held).or_else(|e| {
                // An older record than the one believed: refused; the same
                // one again is fine.
                if signed.record.seq == held.record.seq && signed.value == held.value {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
        Ok(signed)
    }

    /// A verified record from `source`: into the table, and dialled once if
    /// new (the reachability check), or at once if it moved while lost.
    fn learn(&mut self, cx: &mut Context<'_>, signed: Signed, source: Source) {
        let entity = signed.record.entity_id;
        if entity == cx.local() {
            return;
        }
        let Some(peer) = peer_of(&signed) else {
            return;
        };
        match self.table.learn_record(signed, peer, source) {
            Learned::New => self.probe(cx, entity),
            Learned::Updated => {
                let lost = self
                    .table
                    .get(&entity)
                    .is_some_and(|k| !k.connected && k.redial_at.is_some());
                if lost || self.wanted.contains_key(&entity) {
                    self.dial(cx, entity);
                }
            }
            Learned::Same | Learned::Full => {}
        }
    }

    /// Dials a peer not yet reached, within `discovery.max_probes`.
    fn probe(&mut self, cx: &mut Context<'_>, entity: EntityId) {
        let Some(k) = self.table.get(&entity) else {
            return;
        };
        if k.reached_ms.is_some() || k.connected || k.dialling {
            return;
        }
        let probing = self.table.iter().filter(|(_, k)| k.dialling).count();
        if probing < self.config.max_probes {
            self.dial(cx, entity);
        }
    }

    /// Dials `entity` at the addresses the table has.
    fn dial(&mut self, cx: &mut Context<'_>, entity: EntityId) {
        if cx.is_connected(&entity) {
            return;
        }
        let Some(k) = self.table.get(&entity) else {
            return;
        };
        let (peer, addrs) = (k.peer, k.addrs.clone());
        self.table.dialling(&entity);
        cx.network(NetOp::Dial(peer, addrs));
    }

    /// Looks `entity`'s record up, then does `then`.
    fn look_up(&mut self, cx: &mut Context<'_>, entity: EntityId, then: Then) {
        match self.lookups.entity(entity, then) {
            Ok(Some(token)) => cx.network(NetOp::Get {
                key: registry::peer_key(&entity),
                token,
            }),
            Ok(None) => {}
            Err(then) => self.then(cx, entity, false, then),
        }
    }

    /// Signs and publishes the own record (and the capability index and
    /// provider entries), and announces it.
    fn publish(&mut self, cx: &mut Context<'_>) {
        let identity: Arc<Identity> = cx.identity();
        let now = cx.wall_ms();
        let capabilities = self.capabilities();
        let addresses: Vec<String> = self
            .listen
            .iter()
            .map(ToString::to_string)
            .take(registry::MAX_ADDRESSES)
            .collect();
        let seq = self
            .own
            .as_ref()
            .map_or(now, |o| o.record.seq.saturating_add(1).max(now));
        let signed = registry::sign(
            &identity,
            Content {
                addresses,
                capabilities: capabilities.clone(),
                issued_at: now,
                ttl: self.config.expire_secs,
                seq,
            },
        );
        let entity = identity.entity_id();
        let keys = std::iter::once(registry::peer_key(&entity)).chain(
            capabilities
                .iter()
                .map(|c| registry::capability_key(&entity, c)),
        );
        for key in keys {
            cx.network(NetOp::Put(Record::new(key, signed.value.clone())));
        }
        for gone in self.provided.iter().filter(|c| !capabilities.contains(c)) {
            cx.network(NetOp::StopProviding(registry::provider_key(gone)));
        }
        for c in &capabilities {
            cx.network(NetOp::Provide(registry::provider_key(c)));
        }
        self.provided = capabilities;
        self.own = Some(signed);
        self.announce(cx);
    }

    /// Announces the own record over gossipsub, at most every few seconds.
    fn announce(&mut self, cx: &mut Context<'_>) {
        let now = cx.now_ms();
        if let Some(last) = self.last_announce
            && now < last + ANNOUNCE_MIN_MS
        {
            self.announce_at = Some(last + ANNOUNCE_MIN_MS);
            return;
        }
        if let Some(own) = &self.own {
            cx.network(NetOp::Announce(own.value.clone()));
            self.last_announce = Some(now);
            self.announce_at = None;
        }
    }

    /// The capabilities to publish: the card's skill ids, sorted, at most
    /// [`registry::MAX_CAPABILITIES`].
    fn capabilities(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .card
            .get()
            .map(|c| c.card().skills.iter().map(|s| s.id.clone()).collect())
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids.truncate(registry::MAX_CAPABILITIES);
        ids
    }

    /// Whether the card's capabilities differ from the published ones.
    fn capabilities_changed(&self) -> bool {
        self.own.is_some() && self.capabilities() != self.provided
    }

    /// A peer asks this node to hold a record.
    fn on_inbound_record(&mut self, cx: &mut Context<'_>, record: &Record) {
        let now = cx.wall_ms();
        let key = record.key.to_vec();
        // Checked against the entity's newest record this node believes
        // too, so an older one cannot be planted under a key not held yet.
        let signed = match self.check(&key, &record.value, now) {
            Ok(s) => s,
            Err(e) => return self.refuse("store", &e),
        };
        // And against the entity's record held under its own key.
        let own_key = registry::peer_key(&signed.record.entity_id);
        if let Some(h) = self.held.get(&own_key)
            && key != own_key
            && signed.record.seq < h.seq
        {
            let e = RecordError::Stale {
                got: signed.record.seq,
                held: h.seq,
            };
            return self.refuse("store", &e);
        }
        let digest: [u8; 32] = Sha256::digest(&signed.value).into();
        match self.held.get(&key) {
            Some(h) if h.digest == digest => return,
            Some(h) if signed.record.seq <= h.seq => {
                let e = RecordError::Stale {
                    got: signed.record.seq,
                    held: h.seq,
                };
                return self.refuse("store", &e);
            }
            None if self.held.len() >= self.config.max_records => {
                tracing::debug!("DHT record store full; record not stored");
                return;
            }
            _ => {}
        }
        let (k, v) = (key.clone(), signed.value.clone());
        cx.persist(Box::new(move |txn| store::put(txn, &k, &v)), None);
        self.hold(cx, key, &signed, now);
        self.stats.stored += 1;
    }

    /// Stores a checked record in Kademlia, expiring with it, and remembers
    /// it held.
    fn hold(&mut self, cx: &mut Context<'_>, key: Vec<u8>, signed: &Signed, now: u64) {
        store_in_kademlia(cx, key.clone(), signed, now);
        self.held.insert(key, Held::of(signed));
    }

    /// A peer asks this node to hold a provider entry: kept within the
    /// store's bounds; a lookup checks each provider's record before it is
    /// offered.
    fn on_inbound_provider(cx: &mut Context<'_>, record: &ProviderRecord) {
        cx.network(NetOp::StoreProvider(record.clone()));
    }

    /// An announce: checked, then forwarded (accepted) and learnt, or
    /// dropped without forwarding.
    fn on_gossip(
        &mut self,
        cx: &mut Context<'_>,
        id: &gossipsub::MessageId,
        source: PeerId,
        data: &[u8],
    ) {
        let now = cx.wall_ms();
        let verdict = match registry::verify_value(data, now, self.config.record_limits()) {
            Err(e) => {
                self.refuse("announce", &e);
                gossipsub::MessageAcceptance::Reject
            }
            Ok(signed) => {
                let newer = self
                    .table
                    .get(&signed.record.entity_id)
                    .and_then(|k| k.record.as_ref())
                    .is_none_or(|held| signed.record.seq > held.record.seq);
                if newer {
                    self.stats.announces += 1;
                    self.learn(cx, signed, Source::Announce);
                    gossipsub::MessageAcceptance::Accept
                } else {
                    gossipsub::MessageAcceptance::Ignore
                }
            }
        };
        cx.network(NetOp::Validate {
            id: id.clone(),
            source,
            verdict,
        });
    }

    /// A lookup's progress.
    fn on_lookup(&mut self, cx: &mut Context<'_>, token: u64, found: &Found) {
        match found {
            Found::Record(record) => {
                let Some(entity) = self.lookups.entity_of(token) else {
                    return;
                };
                match self.check(&record.key.to_vec(), &record.value, cx.wall_ms()) {
                    Ok(signed) if signed.record.entity_id == entity => {
                        // A copy of the record held: the lookup goes on, a
                        // newer one may come (the peer moved, or changed
                        // its capabilities).
                        let held = self
                            .table
                            .get(&entity)
                            .and_then(|k| k.record.as_ref())
                            .is_some_and(|h| h.record.seq >= signed.record.seq);
                        self.learn(cx, signed, Source::Dht);
                        self.lookups.found(token);
                        if !held {
                            cx.network(NetOp::Finish(token));
                        }
                    }
                    Ok(_) => self.refuse("lookup", &RecordError::WrongKey),
                    Err(e) => self.refuse("lookup", &e),
                }
            }
            Found::Providers(peers) => {
                let entities: Vec<EntityId> = peers.iter().filter_map(net::entity_of).collect();
                let capability = self.lookups.capability_of(token).unwrap_or_default();
                for entity in entities {
                    if entity == cx.local() {
                        continue;
                    }
                    // A provider whose record held does not list the
                    // capability has a newer one.
                    let fresh = self
                        .table
                        .get(&entity)
                        .and_then(|k| k.record.as_ref())
                        .is_some_and(|r| r.record.offers(&capability));
                    if !fresh && self.lookups.add_pending(token, entity) {
                        self.look_up(cx, entity, Then::Parent(token));
                    }
                }
            }
            Found::Peers(peers) => {
                for (peer, addrs) in peers {
                    let Some(entity) = net::entity_of(peer) else {
                        continue;
                    };
                    if entity == cx.local() {
                        continue;
                    }
                    let source = if self.lookups.is_walk(token) {
                        Source::Walk
                    } else {
                        Source::Dht
                    };
                    self.table.learn_addrs(entity, *peer, addrs.clone(), source);
                    if self.table.get(&entity).is_some_and(|k| k.record.is_none()) {
                        self.look_up(cx, entity, Then::Probe);
                    }
                }
            }
            Found::Done => {
                let finished = self.lookups.done(token);
                self.resolve(cx, finished);
            }
        }
    }

    /// What waited on finished lookups.
    fn resolve(&mut self, cx: &mut Context<'_>, finished: Vec<lookup::Finished>) {
        for f in finished {
            match f {
                lookup::Finished::Entity {
                    entity,
                    found,
                    then,
                } => {
                    for t in then {
                        self.then(cx, entity, found, t);
                    }
                }
                lookup::Finished::Providers {
                    capability,
                    waiters,
                } => {
                    let list = self.offering(&capability);
                    for w in waiters {
                        _ = w.send(Ok(list.clone()));
                    }
                }
            }
        }
    }

    fn then(&mut self, cx: &mut Context<'_>, entity: EntityId, found: bool, then: Then) {
        match then {
            Then::Agent(reply) => {
                // A peer known without a record (mDNS, a connection) is shown
                // unverified.
                let info = self.info(entity).ok_or_else(|| {
                    NodeError::NotFound(format!(
                        "{entity} is not known and no record of it was found in the DHT"
                    ))
                });
                _ = reply.send(info);
            }
            Then::Parent(parent) => {
                let finished = self.lookups.pending_done(parent, entity);
                self.resolve(cx, finished);
            }
            Then::Probe => {
                if found {
                    self.probe(cx, entity);
                }
            }
            Then::Dial => {
                if found {
                    if self.wanted.contains_key(&entity) {
                        self.table.keep_known(&entity);
                    }
                    self.dial(cx, entity);
                } else if self.wanted.remove(&entity).is_some() {
                    cx.network(NetOp::Unreachable(entity, None));
                }
            }
        }
    }

    /// The offered peers whose verified record lists `capability`.
    fn offering(&self, capability: &str) -> Vec<PeerInfo> {
        let mut list: Vec<PeerInfo> = self
            .table
            .iter()
            .filter(|(_, k)| {
                k.record
                    .as_ref()
                    .is_some_and(|r| r.record.offers(capability))
            })
            .filter_map(|(e, _)| self.info(*e))
            .collect();
        list.sort_by_key(|i| i.entity_id);
        list
    }

    /// A dial failed.
    fn on_dial_failed(&mut self, cx: &mut Context<'_>, peer: Option<PeerId>) {
        let Some(entity) = peer.as_ref().and_then(net::entity_of) else {
            return;
        };
        if cx.is_connected(&entity) {
            return;
        }
        let failures = self.table.dial_failed(&entity, cx.now_ms(), rand::random());
        match self.wanted.get(&entity).copied() {
            Some(false) => {
                self.wanted.insert(entity, true);
                self.look_up(cx, entity, Then::Dial);
            }
            Some(true) => {
                self.wanted.remove(&entity);
                cx.network(NetOp::Unreachable(
                    entity,
                    Some("no address of it answered".into()),
                ));
            }
            None if failures == REFRESH_AFTER_FAILURES
                && self
                    .table
                    .get(&entity)
                    .is_some_and(|k| k.keep == table::Keep::Yes) =>
            {
                self.look_up(cx, entity, Then::Dial);
            }
            None => {}
        }
    }

    /// A service wants a connection to `entity`.
    fn on_wanted(&mut self, cx: &mut Context<'_>, entity: EntityId) {
        if cx.is_connected(&entity) || entity == cx.local() {
            return;
        }
        self.table.keep_known(&entity);
        let known = self.table.get(&entity).is_some_and(|k| !k.addrs.is_empty());
        if self.wanted.insert(entity, !known).is_some() {
            return;
        }
        if known {
            self.dial(cx, entity);
        } else {
            self.look_up(cx, entity, Then::Dial);
        }
    }

    /// The periodic timers.
    fn tick(&mut self, cx: &mut Context<'_>) {
        let now = cx.now_ms();
        if !self.started {
            self.start(cx);
        }
        if self.publish_at.is_some_and(|t| t <= now) || self.republish_at.is_some_and(|t| t <= now)
        {
            if self.republish_at.is_some_and(|t| t <= now) {
                self.republish_at = None;
            }
            self.publish(cx);
            self.publish_at = Some(now + self.config.refresh_secs * 1000);
        }
        if self.announce_at.is_some_and(|t| t <= now) {
            self.announce(cx);
        }
        if self.walk_at <= now {
            self.walk_at = now + self.config.random_walk_secs * 1000;
            if self.joined
                && let Some(token) = self.lookups.walk()
            {
                let key: [u8; 32] = rand::random();
                cx.network(NetOp::Closest {
                    key: key.to_vec(),
                    token,
                });
            }
        }
        if self.query_at <= now {
            let period = self.config.query_secs * 1000;
            self.query_at = now + period - rand::random::<u64>() % (period / 4 + 1);
            if self.capabilities_changed() {
                self.publish_at = Some(now);
            }
            if self.joined {
                self.query(cx);
            }
        }
        if self.sweep_at <= now {
            self.sweep_at = now + SWEEP_MS.min(self.config.expire_secs * 500).max(100);
            self.sweep(cx);
        }
        for entity in self.table.due(now) {
            self.stats.redials += 1;
            self.dial(cx, entity);
        }
    }

    /// At the first tick: the held records go back into Kademlia, static
    /// peers are dialled and kept.
    fn start(&mut self, cx: &mut Context<'_>) {
        self.started = true;
        let now = cx.wall_ms();
        for (key, signed) in std::mem::take(&mut self.loaded) {
            store_in_kademlia(cx, key, &signed, now);
        }
        for addr in self.config.static_peers.clone() {
            let Some(peer) = addr.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            }) else {
                continue;
            };
            let Some(entity) = net::entity_of(&peer) else {
                continue;
            };
            self.table
                .learn_addrs(entity, peer, vec![addr], Source::Static);
            self.table.keep(entity, peer);
            self.dial(cx, entity);
        }
    }

    /// Active discovery: the own neighbourhood, and the capabilities the
    /// agent asked for.
    fn query(&mut self, cx: &mut Context<'_>) {
        if let Some(token) = self.lookups.walk() {
            cx.network(NetOp::Closest {
                key: registry::peer_key(&cx.local()),
                token,
            });
        }
        for capability in self.watched.clone() {
            if let Some(token) = self.lookups.providers(&capability, None) {
                cx.network(NetOp::GetProviders {
                    key: registry::provider_key(&capability),
                    token,
                });
            }
        }
    }

    /// Forgets expired records, in the table, in Kademlia and in the database.
    fn sweep(&mut self, cx: &mut Context<'_>) {
        let now = cx.wall_ms();
        self.table.expire(now);
        let gone: Vec<Vec<u8>> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        for key in &gone {
            self.held.remove(key);
            cx.network(NetOp::Remove(key.clone()));
        }
        cx.persist(Box::new(move |txn| store::delete(txn, &gone)), None);
    }
}

impl Service for Discovery {
    type Command = Command;

    fn name(&self) -> &'static str {
        "discovery"
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: Command) {
        match command {
            Command::Find(entity, reply) => {
                if entity == cx.local() {
                    let own = self.own.as_ref().map(own_info);
                    _ = reply.send(own.ok_or_else(|| {
                        NodeError::NotFound("this node has not published its record yet".into())
                    }));
                    return;
                }
                match self.info(entity).filter(|i| i.verified) {
                    Some(info) => _ = reply.send(Ok(info)),
                    None if !self.config.enabled => {
                        _ = reply.send(Err(NodeError::NotFound(format!(
                            "{entity} is not known and discovery is off"
                        ))));
                    }
                    None => self.look_up(cx, entity, Then::Agent(reply)),
                }
            }
            Command::Discover(capability, reply) => {
                if !self.watched.contains(&capability) {
                    if self.watched.len() == MAX_WATCHED {
                        self.watched.remove(0);
                    }
                    self.watched.push(capability.clone());
                }
                if !self.config.enabled {
                    _ = reply.send(Ok(self.offering(&capability)));
                    return;
                }
                if let Some(token) = self.lookups.providers(&capability, Some(reply)) {
                    cx.network(NetOp::GetProviders {
                        key: registry::provider_key(&capability),
                        token,
                    });
                }
            }
            Command::Table(reply) => {
                let mut all: Vec<PeerInfo> = self
                    .table
                    .iter()
                    .filter_map(|(e, _)| self.info(*e))
                    .collect();
                all.sort_by_key(|i| i.entity_id);
                _ = reply.send(all);
            }
            Command::Stats(reply) => {
                let mut stats = self.stats.clone();
                stats.known = self.table.iter().count();
                stats.offered = self.table.offered();
                stats.held_records = self.held.len();
                _ = reply.send(stats);
            }
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        if !self.config.enabled {
            return None;
        }
        if !self.started {
            return Some(0);
        }
        [
            self.publish_at,
            self.republish_at,
            self.announce_at,
            Some(self.walk_at),
            Some(self.query_at),
            Some(self.sweep_at),
            self.table.next_redial(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        self.tick(cx);
    }

    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        if !self.config.enabled {
            return;
        }
        match event {
            PeerEvent::Connected(entity) => {
                if let Some(peer) = cx.peer_id(&entity) {
                    self.table.connected(entity, peer, cx.wall_ms());
                }
                self.wanted.remove(&entity);
                let unverified = self.table.get(&entity).is_some_and(|k| k.record.is_none());
                if unverified && self.joined {
                    self.look_up(cx, entity, Then::Probe);
                }
            }
            PeerEvent::Disconnected(entity) => {
                self.table.disconnected(entity, cx.now_ms(), rand::random());
            }
        }
    }

    fn on_network(&mut self, cx: &mut Context<'_>, event: &NetEvent) {
        if !self.config.enabled {
            return;
        }
        match event {
            NetEvent::Lookup { token, found, .. } => self.on_lookup(cx, *token, found),
            NetEvent::InboundRecord { record, .. } => self.on_inbound_record(cx, record),
            NetEvent::InboundProvider { record, .. } => Self::on_inbound_provider(cx, record),
            NetEvent::Gossip { id, source, data } => self.on_gossip(cx, id, *source, data),
            NetEvent::Subscribed(_) => self.announce(cx),
            NetEvent::Mdns(found) => {
                for (peer, addr) in found {
                    if let Some(entity) = net::entity_of(peer)
                        && entity != cx.local()
                    {
                        self.table
                            .learn_addrs(entity, *peer, vec![addr.clone()], Source::Mdns);
                        cx.network(NetOp::AddAddress(*peer, addr.clone()));
                        if !cx.is_connected(&entity) {
                            self.dial(cx, entity);
                        }
                    }
                }
            }
            NetEvent::Identified {
                peer,
                listen_addrs,
                kad,
            } => {
                if let Some(entity) = net::entity_of(peer) {
                    self.table
                        .learn_addrs(entity, *peer, listen_addrs.clone(), Source::Connection);
                }
                if *kad {
                    for a in listen_addrs {
                        cx.network(NetOp::AddAddress(*peer, a.clone()));
                    }
                    if !self.joined {
                        self.joined = true;
                        cx.network(NetOp::Bootstrap);
                        let now = cx.now_ms();
                        self.publish_at = Some(now + SETTLE_MS);
                        self.republish_at = Some(now + REPUBLISH_AFTER_JOIN_MS);
                        self.walk_at = now + SETTLE_MS * 4;
                    }
                }
            }
            NetEvent::DialFailed(peer, _) => self.on_dial_failed(cx, *peer),
            NetEvent::AgentConnected(entity) => {
                if let Some(peer) = cx.peer_id(entity) {
                    self.table.keep(*entity, peer);
                }
            }
            NetEvent::Wanted(entity) => self.on_wanted(cx, *entity),
            NetEvent::ListenAddrs(addrs) => {
                self.listen = addrs
                    .iter()
                    .filter(|a| !is_unspecified(a))
                    .cloned()
                    .collect();
                if self.own.is_some() || self.joined {
                    self.publish_at = Some(cx.now_ms() + SETTLE_MS);
                }
            }
        }
    }
}

/// The own record as shown to the agent.
fn own_info(own: &Signed) -> PeerInfo {
    let r = &own.record;
    PeerInfo {
        entity_id: r.entity_id,
        peer_id: peer_of(own).map(|p| p.to_string()).unwrap_or_default(),
        addresses: r.addresses.clone(),
        capabilities: r.capabilities.clone(),
        record: serde_json::from_slice(&own.value).ok(),
        verified: true,
        reachable: true,
        connected: false,
        sources: Vec::new(),
    }
}

/// The PeerId of a record's entity, from its key (a PeerId embeds the key;
/// the entity id is only its hash).
fn peer_of(signed: &Signed) -> Option<PeerId> {
    let key = signed.record.key()?;
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(PeerId::from_public_key(&libp2p::identity::PublicKey::from(
        public,
    )))
}

fn is_unspecified(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

fn ms(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(n)
}
