//! Per-peer rate limits: one `governor` token bucket per authenticated sender
//! and message class (see `peer_core::rate`). Checked only after a message's
//! signature and nonce were verified, so nobody can spend another peer's budget.
//!
//! At most `max_peers` senders have buckets, each its own. The node tells the
//! limits which peers are connected ([`Limits::connected`],
//! [`Limits::disconnected`]). A new sender at the bound takes the place of the
//! least recently used sender that is not connected: the most idle one, so if
//! any has been idle long enough for its buckets to be full again (forgetting
//! it changes nothing), that one has. A connected sender is never forgotten, and as
//! `max_peers` is at least `network.max_connections` (checked at start), a
//! connected newcomer always finds a place; a sender that is not connected
//! finds none only while every place is a connected peer's.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use peer_core::EntityId;
use peer_core::rate::Class;
use serde::{Deserialize, Serialize};

/// One class's bucket in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Messages a minute, sustained (at least 1).
    pub per_minute: u32,
    /// Messages accepted at once after a quiet period (at least 1).
    pub burst: u32,
}

impl From<peer_core::rate::Quota> for QuotaConfig {
    fn from(q: peer_core::rate::Quota) -> Self {
        Self {
            per_minute: q.per_minute,
            burst: q.burst,
        }
    }
}

/// Rate-limit settings; defaults from the protocol parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Whether limits are enforced (default true).
    pub enabled: bool,
    /// Senders with buckets (default 10,000); at least
    /// `network.max_connections` (checked at start).
    pub max_peers: usize,
    /// `handshake_*`, `challenge_response`, `session_*`, `ready` (default 5/min, burst 10).
    pub handshake: QuotaConfig,
    /// `heartbeat`, `ping` (default 60/min, burst 120).
    pub heartbeat: QuotaConfig,
    /// Application messages and unknown types (default 30/min, burst 60).
    pub task: QuotaConfig,
    /// `discovery` (default 10/min, burst 20).
    pub discovery: QuotaConfig,
    /// `chunk`, `chunk_manifest`, `chunk_resend` (default 120/min, burst 240).
    pub chunk: QuotaConfig,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_peers: 10_000,
            handshake: Class::Handshake.default_quota().into(),
            heartbeat: Class::Heartbeat.default_quota().into(),
            task: Class::Task.default_quota().into(),
            discovery: Class::Discovery.default_quota().into(),
            chunk: Class::Chunk.default_quota().into(),
        }
    }
}

impl RateLimitConfig {
    /// The bucket of `class`.
    pub fn quota(&self, class: Class) -> QuotaConfig {
        match class {
            Class::Handshake => self.handshake,
            Class::Heartbeat => self.heartbeat,
            Class::Task => self.task,
            Class::Discovery => self.discovery,
            Class::Chunk => self.chunk,
        }
    }

    /// Checks that every rate and burst is at least 1.
    pub fn validate(&self) -> Result<(), String> {
        for class in Class::ALL {
            let q = self.quota(class);
            if q.per_minute == 0 || q.burst == 0 {
                return Err(format!(
                    "rate_limits.{class}: per_minute and burst must be at least 1 (set rate_limits.enabled = false to turn limits off)"
                ));
            }
        }
        Ok(())
    }
}

type Bucket<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

struct Buckets<C: Clock> {
    by_class: Vec<Bucket<C>>,
    last_used: C::Instant,
}

/// The limits of one node.
pub struct Limits<C: Clock = DefaultClock> {
    clock: C,
    quotas: Vec<Quota>,
    enabled: bool,
    max_peers: usize,
    peers: HashMap<EntityId, Buckets<C>>,
    /// The senders in `peers` that are not connected, by last use: the first is
    /// the next to be forgotten.
    evictable: BTreeSet<(C::Instant, EntityId)>,
    /// Connected peers, with buckets or not (bounded by the node's connections).
    connected: HashSet<EntityId>,
}

impl<C: Clock> std::fmt::Debug for Limits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("enabled", &self.enabled)
            .field("peers", &self.peers.len())
            .field("connected", &self.connected.len())
            .finish_non_exhaustive()
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limits<DefaultClock> {
    /// Limits on the system's monotonic clock.
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// Limits on `clock` (tests pass a fake clock).
    pub fn with_clock(config: &RateLimitConfig, clock: C) -> Self {
        let quotas: Vec<Quota> = Class::ALL
            .iter()
            .map(|&c| {
                let q = config.quota(c);
                Quota::per_minute(nonzero(q.per_minute)).allow_burst(nonzero(q.burst))
            })
            .collect();
        Self {
            clock,
            quotas,
            enabled: config.enabled,
            max_peers: config.max_peers,
            peers: HashMap::new(),
            evictable: BTreeSet::new(),
            connected: HashSet::new(),
        }
    }

    /// `peer`'s first connection opened: its buckets are kept until it
    /// disconnects.
    pub fn connected(&mut self, peer: EntityId) {
        if self.connected.insert(peer)
            && let Some(b) = self.peers.get(&peer)
        {
            self.evictable.remove(&(b.last_used, peer));
        }
    }

    /// `peer`'s last connection closed: its buckets may be forgotten again.
    pub fn disconnected(&mut self, peer: EntityId) {
        if self.connected.remove(&peer)
            && let Some(b) = self.peers.get(&peer)
        {
            self.evictable.insert((b.last_used, peer));
        }
    }

    /// Takes one token of `class` from `peer`'s bucket; `Err(wait)` if it is
    /// empty. A sender without buckets gets full ones, in the place of the least
    /// recently used sender that is not connected if `max_peers` have buckets;
    /// if every one of them is connected (only when `max_peers` is below the
    /// connections), the message is refused for one refill interval of `class`.
    /// O(log n).
    pub fn check(&mut self, peer: EntityId, class: Class) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let index = Class::ALL.iter().position(|&c| c == class).unwrap_or(0);
        let now = self.clock.now();
        let evictable = !self.connected.contains(&peer);
        let buckets = match self.peers.get_mut(&peer) {
            Some(b) => {
                if evictable {
                    self.evictable.remove(&(b.last_used, peer));
                }
                b
            }
            None => {
                if self.peers.len() >= self.max_peers {
                    let Some((_, oldest)) = self.evictable.pop_first() else {
                        return Err(self.quotas[index].replenish_interval());
                    };
                    self.peers.remove(&oldest);
                }
                let buckets = Buckets {
                    by_class: self
                        .quotas
                        .iter()
                        .map(|q| RateLimiter::direct_with_clock(*q, self.clock.clone()))
                        .collect(),
                    last_used: now,
                };
                self.peers.entry(peer).or_insert(buckets)
            }
        };
        buckets.last_used = now;
        if evictable {
            self.evictable.insert((now, peer));
        }
        buckets.by_class[index]
            .check()
            .map_err(|not_until| not_until.wait_time_from(now))
    }

    /// Senders with buckets.
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(max_peers: usize) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            max_peers,
            ..RateLimitConfig::default()
        };
        (Limits::with_clock(&config, clock.clone()), clock)
    }

    fn peer(b: u8) -> EntityId {
        EntityId([b; 32])
    }

    #[test]
    fn burst_then_refusal_with_a_wait_then_refill() {
        let (mut l, clock) = limits(10);
        for _ in 0..60 {
            l.check(peer(1), Class::Task).expect("within the burst");
        }
        let wait = l.check(peer(1), Class::Task).expect_err("burst spent");
        assert_eq!(
            wait,
            Duration::from_secs(2),
            "30/min refills a token every 2 s"
        );
        // Other classes and other peers are unaffected.
        l.check(peer(1), Class::Heartbeat).expect("own bucket");
        l.check(peer(2), Class::Task).expect("own peer");
        clock.advance(Duration::from_secs(2));
        l.check(peer(1), Class::Task).expect("one token back");
    }

    /// Spends `peer`'s whole handshake burst (10).
    fn spend_handshakes(l: &mut Limits<FakeRelativeClock>, peer: EntityId) {
        while l.check(peer, Class::Handshake).is_ok() {}
    }

    fn id(n: u32) -> EntityId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        EntityId(b)
    }

    #[test]
    fn an_honest_newcomer_gets_full_buckets_past_many_identities() {
        let (mut l, clock) = limits(100);
        // Ten times as many identities as places, each spending its burst.
        for n in 0..1000 {
            spend_handshakes(&mut l, id(n));
            assert!(l.tracked() <= 100);
            clock.advance(Duration::from_millis(1));
        }
        let honest = peer(0xee);
        l.connected(honest);
        for _ in 0..10 {
            l.check(honest, Class::Handshake)
                .expect("a burst of its own");
        }
        assert!(l.check(honest, Class::Handshake).is_err(), "and no more");
        assert_eq!(l.tracked(), 100);
    }

    #[test]
    fn connected_peers_survive_any_number_of_newcomers() {
        let (mut l, clock) = limits(3);
        for p in [peer(1), peer(2)] {
            l.connected(p);
            spend_handshakes(&mut l, p);
        }
        for n in 0..1000 {
            l.check(id(n), Class::Handshake)
                .expect("a place of its own");
            assert_eq!(l.tracked(), 3);
            clock.advance(Duration::from_millis(1));
        }
        for p in [peer(1), peer(2)] {
            assert!(
                l.check(p, Class::Handshake).is_err(),
                "its empty bucket is kept"
            );
        }
        // Once disconnected, it can be forgotten: the first newcomer takes the
        // place of the last stranger (used before it), the second takes its.
        l.disconnected(peer(1));
        for n in [1000, 1001] {
            clock.advance(Duration::from_millis(1));
            l.check(id(n), Class::Handshake).expect("newcomer");
        }
        l.check(peer(1), Class::Handshake)
            .expect("forgotten, so full again");
        assert!(l.check(peer(2), Class::Handshake).is_err());
        assert_eq!(l.tracked(), 3);
    }

    #[test]
    fn the_least_recently_used_stranger_is_forgotten_first() {
        let (mut l, clock) = limits(2);
        spend_handshakes(&mut l, peer(1));
        clock.advance(Duration::from_secs(1));
        spend_handshakes(&mut l, peer(2));
        clock.advance(Duration::from_secs(1));
        assert!(l.check(peer(1), Class::Handshake).is_err(), "1 used last");
        l.check(peer(3), Class::Handshake).expect("takes 2's place");
        assert!(l.check(peer(1), Class::Handshake).is_err(), "1 is kept");
        l.check(peer(2), Class::Handshake)
            .expect("2 was forgotten: full buckets");
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn a_newcomer_finds_no_place_among_connected_peers_only() {
        // Only with max_peers below the connections, which config refuses.
        let (mut l, _) = limits(1);
        l.connected(peer(1));
        l.connected(peer(2));
        l.check(peer(1), Class::Handshake).expect("room for one");
        let wait = l.check(peer(2), Class::Handshake).expect_err("no room");
        assert_eq!(wait, Duration::from_secs(12), "5/min: one token in 12 s");
        assert_eq!(l.tracked(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect(u8),
        Disconnect(u8),
        Check(u8),
        Advance(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..10).prop_map(Op::Connect),
            (0u8..10).prop_map(Op::Disconnect),
            (0u8..10).prop_map(Op::Check),
            (0u64..200).prop_map(Op::Advance),
        ]
    }

    proptest::proptest! {
        /// Whatever senders do, at most `max_peers` have buckets, the eviction
        /// order holds exactly the senders that are not connected, and a
        /// connected sender that has buckets keeps them (while no more peers
        /// are connected than there are places, as config ensures).
        #[test]
        fn the_table_stays_bounded_and_keeps_connected_peers(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let (mut l, clock) = limits(4);
            for op in ops {
                let kept: Vec<EntityId> = l
                    .connected
                    .iter()
                    .filter(|p| l.peers.contains_key(p))
                    .copied()
                    .collect();
                match op {
                    Op::Connect(b) if l.connected.len() < 4 => l.connected(peer(b)),
                    Op::Connect(_) => {}
                    Op::Disconnect(b) => l.disconnected(peer(b)),
                    Op::Check(b) => {
                        // A stranger finds no place only when every place is
                        // a connected peer's.
                        let room = l.connected.contains(&peer(b)) || l.connected.len() < 4;
                        _ = l.check(peer(b), Class::Task);
                        proptest::prop_assert!(!room || l.peers.contains_key(&peer(b)), "found a place");
                    }
                    Op::Advance(secs) => clock.advance(Duration::from_secs(secs)),
                }
                proptest::prop_assert!(l.tracked() <= 4);
                for p in kept {
                    proptest::prop_assert!(!l.connected.contains(&p) || l.peers.contains_key(&p));
                }
                let mut expected: Vec<(governor::nanos::Nanos, EntityId)> = l
                    .peers
                    .iter()
                    .filter(|(p, _)| !l.connected.contains(p))
                    .map(|(p, b)| (b.last_used, *p))
                    .collect();
                expected.sort();
                let order: Vec<_> = l.evictable.iter().copied().collect();
                proptest::prop_assert_eq!(order, expected);
            }
        }
    }

    #[test]
    fn disabled_limits_accept_everything() {
        let config = RateLimitConfig {
            enabled: false,
            ..RateLimitConfig::default()
        };
        let mut l = Limits::new(&config);
        for _ in 0..1000 {
            l.check(peer(1), Class::Handshake).expect("off");
        }
    }

    #[test]
    fn zero_rates_are_invalid() {
        let mut c = RateLimitConfig::default();
        c.chunk.per_minute = 0;
        assert!(
            c.validate()
                .expect_err("zero")
                .contains("rate_limits.chunk")
        );
    }
}
