//! Per-peer rate limits: one `governor` token bucket per authenticated sender
//! and message class (see `peer_core::rate`). Checked only after a message's
//! signature and nonce were verified, so nobody can spend another peer's budget.
//!
//! At most `max_peers` senders get buckets of their own. A new sender beyond that
//! first takes the place of a sender idle long enough for all its buckets to be
//! full again (forgetting it changes nothing); if there is none, it shares one
//! overflow set of buckets with every other such sender.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
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
    /// Senders with buckets of their own (default 10,000).
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
    /// Idle time after which every bucket is full again.
    refill: Duration,
    peers: HashMap<EntityId, Buckets<C>>,
    overflow: Buckets<C>,
}

impl<C: Clock> std::fmt::Debug for Limits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("enabled", &self.enabled)
            .field("peers", &self.peers.len())
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
        let refill = quotas
            .iter()
            .map(|q| q.replenish_interval() * q.burst_size().get())
            .max()
            .unwrap_or_default();
        let overflow = Self::buckets(&quotas, &clock);
        Self {
            clock,
            quotas,
            enabled: config.enabled,
            max_peers: config.max_peers,
            refill,
            peers: HashMap::new(),
            overflow,
        }
    }

    fn buckets(quotas: &[Quota], clock: &C) -> Buckets<C> {
        Buckets {
            by_class: quotas
                .iter()
                .map(|q| RateLimiter::direct_with_clock(*q, clock.clone()))
                .collect(),
            last_used: clock.now(),
        }
    }

    /// Takes one token of `class` from `peer`'s bucket; `Err(wait)` if it is empty.
    pub fn check(&mut self, peer: EntityId, class: Class) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let now = self.clock.now();
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            let refill = self.refill;
            self.peers
                .retain(|_, b| now.duration_since(b.last_used) < refill.into());
        }
        let buckets = if self.peers.contains_key(&peer) || self.peers.len() < self.max_peers {
            let quotas = &self.quotas;
            let clock = &self.clock;
            self.peers
                .entry(peer)
                .or_insert_with(|| Self::buckets(quotas, clock))
        } else {
            &mut self.overflow
        };
        buckets.last_used = now;
        let index = Class::ALL.iter().position(|&c| c == class).unwrap_or(0);
        buckets.by_class[index]
            .check()
            .map_err(|not_until| not_until.wait_time_from(now))
    }

    /// Senders with buckets of their own.
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

    #[test]
    fn beyond_max_peers_newcomers_share_the_overflow_buckets() {
        let (mut l, clock) = limits(2);
        l.check(peer(1), Class::Handshake).expect("1");
        l.check(peer(2), Class::Handshake).expect("2");
        for i in 0..10 {
            l.check(peer(3 + i), Class::Handshake)
                .expect("overflow burst is 10");
        }
        assert!(
            l.check(peer(99), Class::Handshake).is_err(),
            "overflow shared"
        );
        assert_eq!(l.tracked(), 2);
        // Once 1 and 2 have been idle long enough to be full again, a newcomer
        // takes a place of its own.
        clock.advance(Duration::from_secs(121));
        l.check(peer(50), Class::Handshake).expect("own place");
        assert!(l.tracked() <= 2);
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
