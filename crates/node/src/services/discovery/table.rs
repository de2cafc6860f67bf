//! The discovery table: one entry per entity, fed by every source (DHT
//! lookups, random walks, announces, mDNS, connections), each with its
//! verified record, the addresses to dial, whether it was reached, and when
//! to dial it again after a lost connection. Pure: time and randomness are
//! passed in.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId};
use peer_core::EntityId;
use peer_core::registry::Signed;
use serde::Serialize;

/// Most addresses kept per peer.
const MAX_ADDRS: usize = 16;

/// Where a peer was learnt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A DHT lookup (by id, by capability, or the periodic queries).
    Dht,
    /// A random walk.
    Walk,
    /// A signed announce over gossipsub.
    Announce,
    /// mDNS on the local network.
    Mdns,
    /// A connection (it dialled us, or we it).
    Connection,
    /// The configuration (static peers).
    Static,
}

/// Whether a lost peer is dialled again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A discovered peer: connections to it come and go (Kademlia's
    /// queries, idle timeouts); it is not dialled again.
    No,
    /// The agent connected to it, it is a static peer, or a service has
    /// something for it: dialled again until it is back.
    Yes,
}

/// One peer.
#[derive(Debug, Clone)]
pub struct Known {
    /// Its libp2p peer id.
    pub peer: PeerId,
    /// Its newest verified record.
    pub record: Option<Signed>,
    /// Addresses to dial: its record's, then others seen.
    pub addrs: Vec<Multiaddr>,
    /// Where it was learnt from.
    pub sources: Vec<Source>,
    /// Last time a connection to it was open, ms since the Unix epoch.
    pub reached_ms: Option<u64>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Whether it is dialled again without limit.
    pub keep: Keep,
    /// Failed dials since it was last reached.
    pub failures: u32,
    /// When to dial it next (monotonic ms), if a dial is due.
    pub redial_at: Option<u64>,
    /// A dial is in progress.
    pub dialling: bool,
}

impl Known {
    fn new(peer: PeerId) -> Self {
        Self {
            peer,
            record: None,
            addrs: Vec::new(),
            sources: Vec::new(),
            reached_ms: None,
            connected: false,
            keep: Keep::No,
            failures: 0,
            redial_at: None,
            dialling: false,
        }
    }

    /// Verified and reachable: its record checked and a connection to it
    /// opened at least once.
    pub fn offered(&self) -> bool {
        self.record.is_some() && self.reached_ms.is_some()
    }

    fn add_source(&mut self, source: Source) {
        if !self.sources.contains(&source) {
            self.sources.push(source);
        }
    }

    /// Adds addresses, newest first, without their `/p2p/` suffix (the
    /// peer id is known).
    fn add_addrs(&mut self, addrs: impl IntoIterator<Item = Multiaddr>) {
        for mut a in addrs {
            if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                a.pop();
            }
            if !self.addrs.contains(&a) {
                if self.addrs.len() == MAX_ADDRS {
                    self.addrs.pop();
                }
                self.addrs.insert(0, a);
            }
        }
    }
}

/// What a record did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A peer not known before, or known without a record.
    New,
    /// A newer record of a known peer.
    Updated,
    /// The record held, or an older one: nothing changed.
    Same,
    /// The table is full of peers it keeps.
    Full,
}

/// The redial schedule: exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait, ms.
    pub min_ms: u64,
    /// The longest wait, ms.
    pub max_ms: u64,
}

impl Backoff {
    /// The wait after `failures` failed dials: `min · 2^failures`, at most
    /// `max`, of which a random half (`random` chooses) is taken off.
    pub fn wait(&self, failures: u32, random: u64) -> u64 {
        let full = self
            .min_ms
            .saturating_mul(1u64 << failures.min(40))
            .min(self.max_ms);
        let half = full / 2;
        full - half + random % (half + 1)
    }
}

/// The peers discovery knows.
#[derive(Debug)]
pub struct Table {
    peers: HashMap<EntityId, Known>,
    max: usize,
    backoff: Backoff,
}

impl Table {
    /// An empty table of at most `max` peers.
    pub fn new(max: usize, backoff: Backoff) -> Self {
        Self {
            peers: HashMap::new(),
            max: max.max(1),
            backoff,
        }
    }

    /// A peer.
    pub fn get(&self, entity: &EntityId) -> Option<&Known> {
        self.peers.get(entity)
    }

    /// Every peer.
    pub fn iter(&self) -> impl Iterator<Item = (&EntityId, &Known)> {
        self.peers.iter()
    }

    /// How many peers are offered (verified and reached).
    pub fn offered(&self) -> usize {
        self.peers.values().filter(|k| k.offered()).count()
    }

    /// The entry of `entity`, made room for if new; `None` when the table
    /// is full of peers that are connected or kept.
    fn entry(&mut self, entity: EntityId, peer: PeerId) -> Option<&mut Known> {
        if !self.peers.contains_key(&entity) && self.peers.len() >= self.max {
            let victim = self
                .peers
                .iter()
                .filter(|(_, k)| !k.connected && k.keep == Keep::No && !k.dialling)
                .min_by_key(|(_, k)| (k.reached_ms.is_some(), k.reached_ms))
                .map(|(e, _)| *e)?;
            self.peers.remove(&victim);
        }
        Some(self.peers.entry(entity).or_insert_with(|| Known::new(peer)))
    }

    /// A verified record from `source`. Its addresses come first among the
    /// peer's; a newer record replaces the peer's.
    pub fn learn_record(&mut self, signed: Signed, peer: PeerId, source: Source) -> Learned {
        let entity = signed.record.entity_id;
        let Some(k) = self.entry(entity, peer) else {
            return Learned::Full;
        };
        k.add_source(source);
        let learned = match &k.record {
            None => Learned::New,
            Some(held) if signed.record.seq > held.record.seq => Learned::Updated,
            Some(_) => return Learned::Same,
        };
        let addrs: Vec<Multiaddr> = signed
            .record
            .addresses
            .iter()
            .rev()
            .filter_map(|a| a.parse().ok())
            .collect();
        k.add_addrs(addrs);
        if learned == Learned::Updated {
            // New addresses: try them at once.
            k.failures = 0;
        }
        k.record = Some(signed);
        learned
    }

    /// Addresses of `entity` seen by `source` (no record).
    pub fn learn_addrs(
        &mut self,
        entity: EntityId,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        source: Source,
    ) {
        if let Some(k) = self.entry(entity, peer) {
            k.add_source(source);
            k.add_addrs(addrs);
        }
    }

    /// Marks `entity` as one to dial again without limit.
    pub fn keep(&mut self, entity: EntityId, peer: PeerId) {
        if let Some(k) = self.entry(entity, peer) {
            k.keep = Keep::Yes;
        }
    }

    /// Marks a known `entity` as one to dial again without limit.
    pub fn keep_known(&mut self, entity: &EntityId) {
        if let Some(k) = self.peers.get_mut(entity) {
            k.keep = Keep::Yes;
        }
    }

    /// A connection to `entity` opened at wall time `now_ms`.
    pub fn connected(&mut self, entity: EntityId, peer: PeerId, now_ms: u64) {
        if let Some(k) = self.entry(entity, peer) {
            k.add_source(Source::Connection);
            k.connected = true;
            k.dialling = false;
            k.reached_ms = Some(now_ms);
            k.failures = 0;
            k.redial_at = None;
        }
    }

    /// The last connection to `entity` closed at monotonic `now`: a kept
    /// peer is dialled again after a wait.
    pub fn disconnected(&mut self, entity: EntityId, now: u64, random: u64) {
        let backoff = self.backoff;
        if let Some(k) = self.peers.get_mut(&entity) {
            k.connected = false;
            if k.keep == Keep::Yes {
                k.redial_at = Some(now + backoff.wait(0, random));
            }
        }
    }

    /// Marks a dial of `entity` started.
    pub fn dialling(&mut self, entity: &EntityId) {
        if let Some(k) = self.peers.get_mut(entity) {
            k.dialling = true;
            k.redial_at = None;
        }
    }

    /// A dial of `entity` failed at monotonic `now`: a kept peer's next
    /// one is due after the backoff's wait. Returns the failures so far.
    pub fn dial_failed(&mut self, entity: &EntityId, now: u64, random: u64) -> u32 {
        let backoff = self.backoff;
        let Some(k) = self.peers.get_mut(entity) else {
            return 0;
        };
        k.dialling = false;
        k.failures = k.failures.saturating_add(1);
        k.redial_at = (k.keep == Keep::Yes).then(|| now + backoff.wait(k.failures, random));
        k.failures
    }

    /// Peers whose redial is due at monotonic `now`.
    pub fn due(&self, now: u64) -> Vec<EntityId> {
        self.peers
            .iter()
            .filter(|(_, k)| !k.connected && !k.dialling && k.redial_at.is_some_and(|t| t <= now))
            .map(|(e, _)| *e)
            .collect()
    }

    /// The earliest redial.
    pub fn next_redial(&self) -> Option<u64> {
        self.peers
            .values()
            .filter(|k| !k.connected && !k.dialling)
            .filter_map(|k| k.redial_at)
            .min()
    }

    /// Forgets records that expired by wall time `now_ms` (the peer stays,
    /// unverified, until a new record comes).
    pub fn expire(&mut self, now_ms: u64) {
        for k in self.peers.values_mut() {
            if k.record
                .as_ref()
                .is_some_and(|r| r.record.expires_at() <= now_ms)
            {
                k.record = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use peer_core::Identity;
    use peer_core::registry::{Content, sign};

    use super::*;

    const BACKOFF: Backoff = Backoff {
        min_ms: 1_000,
        max_ms: 60_000,
    };

    fn peer(n: u8) -> PeerId {
        crate::net::keypair([n; 32]).public().to_peer_id()
    }

    fn record(n: u8, seq: u64, port: u16) -> Signed {
        sign(
            &Identity::from_secret(&[n; 32]),
            Content {
                addresses: vec![format!("/ip4/127.0.0.1/tcp/{port}")],
                capabilities: vec!["code".into()],
                issued_at: 1_000,
                ttl: 3_600,
                seq,
            },
        )
    }

    #[test]
    fn the_backoff_doubles_up_to_the_limit_with_half_of_it_random() {
        assert_eq!(BACKOFF.wait(0, 0), 500);
        assert_eq!(BACKOFF.wait(0, 500), 1_000);
        assert_eq!(BACKOFF.wait(3, 0), 4_000);
        assert!((4_000..=8_000).contains(&BACKOFF.wait(3, u64::MAX)));
        assert_eq!(BACKOFF.wait(30, 0), 30_000);
        assert_eq!(BACKOFF.wait(200, 30_000), 60_000);
    }

    #[test]
    fn one_entry_per_entity_and_only_newer_records_replace() {
        let mut t = Table::new(10, BACKOFF);
        let one = record(1, 1, 4001);
        let id = one.record.entity_id;
        assert_eq!(
            t.learn_record(one.clone(), peer(1), Source::Dht),
            Learned::New
        );
        assert_eq!(
            t.learn_record(one, peer(1), Source::Announce),
            Learned::Same
        );
        assert_eq!(
            t.learn_record(record(1, 2, 4002), peer(1), Source::Walk),
            Learned::Updated
        );
        assert_eq!(
            t.learn_record(record(1, 1, 4001), peer(1), Source::Dht),
            Learned::Same
        );
        let k = t.get(&id).expect("known");
        assert_eq!(k.record.as_ref().map(|r| r.record.seq), Some(2));
        assert_eq!(k.addrs[0].to_string(), "/ip4/127.0.0.1/tcp/4002");
        assert_eq!(k.sources, vec![Source::Dht, Source::Announce, Source::Walk]);
        assert_eq!(t.iter().count(), 1);
    }

    #[test]
    fn a_peer_is_offered_once_verified_and_reached() {
        let mut t = Table::new(10, BACKOFF);
        let r = record(1, 1, 4001);
        let id = r.record.entity_id;
        t.learn_addrs(id, peer(1), vec![], Source::Mdns);
        assert_eq!(t.offered(), 0);
        t.learn_record(r, peer(1), Source::Dht);
        assert_eq!(t.offered(), 0, "not reached yet");
        t.connected(id, peer(1), 5);
        assert_eq!(t.offered(), 1);
        t.expire(1_000 + 3_600_000);
        assert_eq!(t.offered(), 0, "its record expired");
    }

    #[test]
    fn a_lost_kept_peer_is_redialled_with_backoff_and_a_discovered_one_is_not() {
        let mut t = Table::new(10, BACKOFF);
        let r = record(1, 1, 4001);
        let id = r.record.entity_id;
        t.learn_record(r, peer(1), Source::Dht);
        t.connected(id, peer(1), 5);
        t.disconnected(id, 100, 0);
        assert_eq!(t.next_redial(), None, "discovered: left alone");
        t.connected(id, peer(1), 6);
        t.keep(id, peer(1));
        t.disconnected(id, 100, 0);
        assert_eq!(t.next_redial(), Some(600));
        assert!(t.due(599).is_empty());
        assert_eq!(t.due(600), vec![id]);
        t.dialling(&id);
        assert_eq!(t.next_redial(), None);
        assert_eq!(t.dial_failed(&id, 1_000, 0), 1);
        assert_eq!(t.next_redial(), Some(2_000));
        for n in 2..=40 {
            t.dialling(&id);
            assert_eq!(t.dial_failed(&id, 10_000, 0), n);
        }
        assert_eq!(
            t.next_redial(),
            Some(40_000),
            "at most max_ms, half of it random"
        );
        t.connected(id, peer(1), 7);
        assert_eq!(t.get(&id).map(|k| k.failures), Some(0));
    }

    #[test]
    fn a_full_table_forgets_a_peer_never_reached_first_and_never_a_kept_one() {
        let mut t = Table::new(2, BACKOFF);
        let (a, b, c) = (record(1, 1, 1), record(2, 1, 2), record(3, 1, 3));
        let (ida, idb, idc) = (a.record.entity_id, b.record.entity_id, c.record.entity_id);
        t.learn_record(a, peer(1), Source::Dht);
        t.connected(ida, peer(1), 1);
        t.learn_record(b, peer(2), Source::Dht);
        assert_eq!(t.learn_record(c, peer(3), Source::Dht), Learned::New);
        assert!(t.get(&idb).is_none(), "never reached: forgotten first");
        assert!(t.get(&ida).is_some() && t.get(&idc).is_some());
        t.keep(idc, peer(3));
        assert_eq!(
            t.learn_record(record(4, 1, 4), peer(4), Source::Dht),
            Learned::Full,
            "connected and kept peers are not forgotten"
        );
    }
}
