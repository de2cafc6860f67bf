//! The connection pool: the lifecycle of connections per peer, on libp2p's
//! own mechanisms where they fit, and the policy they lack.
//!
//! - acquire: a send takes the open connection to its peer (requests are
//!   streams multiplexed on it; at most `network.max_connections_per_peer`
//!   connections per peer), or waits while one is dialled (counted:
//!   acquisitions, reuses);
//! - validate: libp2p's ping on every connection every
//!   `pool.keep_alive_secs`, answered within `network.connection_timeout_secs`;
//! - use and release: a request-response stream, closed with its answer;
//! - evict: a connection whose validation failed is closed here; one idle for
//!   `network.max_idle_secs` is closed by libp2p's idle timeout.
//!
//! Beside it, a circuit breaker per peer ([`breaker`]), kept in a bounded
//! table ([`Breakers`]) and applied to every dial by a libp2p behaviour
//! ([`behaviour`]) and to every service send by the actor.
//!
//! A call is a dial (its outcome: the connection is established, or the dial
//! fails) or a request on a connection (an answer, even a refusal, is a
//! success; a timeout or a broken connection is a failure). While a peer's
//! breaker is open, sends to it fail at once with `CIRCUIT_OPEN` and no dial
//! to it starts, whoever asks (the agent, discovery, Kademlia).

pub mod behaviour;
pub mod breaker;
pub mod config;
pub mod retry;

use std::collections::HashMap;

use peer_core::EntityId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

use breaker::{Breaker, Refused, Settings};
pub use config::PoolConfig;

/// The pool's counters, served on `/metrics` (`peer_pool_*`).
#[derive(Debug, Clone)]
pub struct Counters {
    pub(crate) acquisitions: Counter,
    pub(crate) reuses: Counter,
    pub(crate) validations: Counter,
    pub(crate) validation_failures: Counter,
    pub(crate) evictions: Counter,
    /// Request latency, send to answer (seconds; 100 µs to ~52 s).
    pub(crate) latency: Histogram,
    pub(crate) dials: Counter,
    pub(crate) dial_failures: Counter,
    pub(crate) dials_refused: Counter,
    pub(crate) sends_refused: Counter,
    pub(crate) send_failures: Counter,
    pub(crate) trips: Counter,
    /// Long-lived envelope streams opened (`net::link`).
    pub(crate) streams_opened: Counter,
    /// Sends sent again after they got no answer.
    pub(crate) retries: Counter,
    /// Peers whose breaker is open or half-open.
    pub(crate) tripped: Gauge,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            acquisitions: Counter::default(),
            reuses: Counter::default(),
            validations: Counter::default(),
            validation_failures: Counter::default(),
            evictions: Counter::default(),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            dials: Counter::default(),
            dial_failures: Counter::default(),
            dials_refused: Counter::default(),
            sends_refused: Counter::default(),
            send_failures: Counter::default(),
            trips: Counter::default(),
            streams_opened: Counter::default(),
            retries: Counter::default(),
            tripped: Gauge::default(),
        }
    }
}

impl Counters {
    /// The counter of long-lived streams opened, for [`crate::net::link`].
    pub fn streams_opened(&self) -> Counter {
        self.streams_opened.clone()
    }

    /// Their values now.
    pub fn totals(&self) -> Totals {
        Totals {
            acquisitions: self.acquisitions.get(),
            reuses: self.reuses.get(),
            validations: self.validations.get(),
            validation_failures: self.validation_failures.get(),
            evictions: self.evictions.get(),
            dials: self.dials.get(),
            dial_failures: self.dial_failures.get(),
            dials_refused: self.dials_refused.get(),
            sends_refused: self.sends_refused.get(),
            send_failures: self.send_failures.get(),
            trips: self.trips.get(),
            streams_opened: self.streams_opened.get(),
            retries: self.retries.get(),
        }
    }
}

/// The pool's part of `/v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolView {
    /// Counters since the node started.
    #[serde(flatten)]
    pub totals: Totals,
    /// Peers whose breaker is open now.
    pub open_breakers: usize,
    /// The breakers remembered (failures counted, open or half-open), open
    /// ones first.
    pub breakers: Vec<PeerBreaker>,
}

/// Totals over every peer since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Sends that needed a connection to their peer.
    pub acquisitions: u64,
    /// Of them, those that found one open (the others waited for a dial).
    pub reuses: u64,
    /// Keep-alive pings answered.
    pub validations: u64,
    /// Keep-alive pings that failed or were not answered in time.
    pub validation_failures: u64,
    /// Connections closed because their validation failed.
    pub evictions: u64,
    /// Dials started.
    pub dials: u64,
    /// Of them, those that failed.
    pub dial_failures: u64,
    /// Dials not started because the peer's breaker was open.
    pub dials_refused: u64,
    /// Sends failed at once because the peer's breaker was open.
    pub sends_refused: u64,
    /// Sends that got no answer (timeout, or the connection broke).
    pub send_failures: u64,
    /// Times a breaker opened.
    pub trips: u64,
    /// Long-lived envelope streams opened (one carries many requests).
    pub streams_opened: u64,
    /// Sends sent again after they got no answer (within the retry budget).
    pub retries: u64,
}

/// One peer's breaker as shown in stats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerBreaker {
    /// The peer.
    pub entity_id: EntityId,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Consecutive failures counted while closed.
    pub failures: u32,
    /// Times it opened while remembered.
    pub trips: u64,
    /// While open: ms until it lets trial calls through.
    pub retry_after_ms: Option<u64>,
}

/// The breakers of the peers that have one worth remembering (failures
/// counted, open or half-open), at most `max_peers`.
#[derive(Debug)]
pub struct Breakers {
    settings: Settings,
    max_peers: usize,
    peers: HashMap<EntityId, Entry>,
    counters: Counters,
}

#[derive(Debug)]
struct Entry {
    breaker: Breaker,
    /// When its last call ended, ms: the least recent goes first at the bound.
    touched_ms: u64,
}

impl Breakers {
    /// An empty table.
    pub fn new(config: &PoolConfig) -> Self {
        Self {
            settings: config.breaker(),
            max_peers: config.max_peers.max(1),
            peers: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// Asks to call `peer` at `now_ms`; refused while its breaker is open.
    /// An allowed call's outcome must be reported with [`Breakers::success`]
    /// or [`Breakers::failure`].
    pub fn allow(&mut self, peer: EntityId, now_ms: u64) -> Result<(), Refused> {
        match self.peers.get_mut(&peer) {
            Some(e) => e.breaker.allow(now_ms),
            None => Ok(()),
        }
    }

    /// A call to `peer` succeeded.
    pub fn success(&mut self, peer: EntityId, now_ms: u64) {
        if let Some(e) = self.peers.get_mut(&peer) {
            let was_closed = e.breaker.is_closed();
            e.breaker.success(now_ms);
            e.touched_ms = now_ms;
            let closed = e.breaker.is_closed();
            if e.breaker.is_idle() {
                self.peers.remove(&peer);
            }
            self.count_tripped(was_closed, closed);
        }
    }

    /// `peer` opened a connection to this node: it is reachable, so its
    /// breaker is forgotten (closed, no failures), whatever its state.
    pub fn reachable(&mut self, peer: EntityId) {
        if let Some(e) = self.peers.remove(&peer) {
            self.count_tripped(e.breaker.is_closed(), true);
        }
    }

    /// A call to `peer` failed.
    pub fn failure(&mut self, peer: EntityId, now_ms: u64) {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.forget_least_recent();
        }
        let settings = self.settings;
        let e = self.peers.entry(peer).or_insert_with(|| Entry {
            breaker: Breaker::new(settings),
            touched_ms: now_ms,
        });
        let (trips, was_closed) = (e.breaker.trips(), e.breaker.is_closed());
        e.breaker.failure(now_ms);
        e.touched_ms = now_ms;
        let closed = e.breaker.is_closed();
        self.counters.trips.inc_by(e.breaker.trips() - trips);
        self.count_tripped(was_closed, closed);
    }

    /// Keeps the `tripped` gauge: a breaker went from closed or not to closed or not.
    fn count_tripped(&self, was_closed: bool, closed: bool) {
        match (was_closed, closed) {
            (true, false) => _ = self.counters.tripped.inc(),
            (false, true) => _ = self.counters.tripped.dec(),
            _ => {}
        }
    }

    /// Counts a dial started, failed or refused.
    pub fn count_dial(&mut self, outcome: Dial) {
        let c = &self.counters;
        match outcome {
            Dial::Started => c.dials.inc(),
            Dial::Failed => c.dial_failures.inc(),
            Dial::Refused => c.dials_refused.inc(),
        };
    }

    /// Counts a send refused by an open breaker.
    pub fn count_send_refused(&mut self) {
        self.counters.sends_refused.inc();
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The peers remembered, at `now_ms`, open ones first.
    pub fn peers(&mut self, now_ms: u64) -> Vec<PeerBreaker> {
        let mut out: Vec<PeerBreaker> = self
            .peers
            .iter_mut()
            .map(|(id, e)| {
                let state = e.breaker.state(now_ms);
                PeerBreaker {
                    entity_id: *id,
                    state: state.name(),
                    failures: match state {
                        breaker::State::Closed { failures } => failures,
                        _ => 0,
                    },
                    trips: e.breaker.trips(),
                    retry_after_ms: match state {
                        breaker::State::Open { until_ms } => Some(until_ms - now_ms),
                        _ => None,
                    },
                }
            })
            .collect();
        out.sort_by_key(|p| (p.state != "open", p.entity_id.to_string()));
        out
    }

    /// Peers whose breaker is open at `now_ms`.
    pub fn open(&mut self, now_ms: u64) -> usize {
        self.peers
            .values_mut()
            .filter_map(|e| match e.breaker.state(now_ms) {
                breaker::State::Open { .. } => Some(()),
                _ => None,
            })
            .count()
    }

    fn forget_least_recent(&mut self) {
        if let Some(oldest) = self
            .peers
            .iter()
            .min_by_key(|(_, e)| e.touched_ms)
            .map(|(id, _)| *id)
            && let Some(e) = self.peers.remove(&oldest)
        {
            self.count_tripped(e.breaker.is_closed(), true);
        }
    }
}

/// What happened to a dial, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// It started.
    Started,
    /// It failed.
    Failed,
    /// It was not started: the breaker is open.
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(i: u8) -> EntityId {
        peer_core::Identity::from_secret(&[i; 32]).entity_id()
    }

    #[test]
    fn only_peers_with_failures_are_remembered_and_a_success_forgets_them() {
        let mut b = Breakers::new(&PoolConfig::default());
        b.success(entity(1), 0);
        assert!(b.peers(0).is_empty());
        b.failure(entity(1), 1);
        assert_eq!(b.peers(1)[0].failures, 1);
        b.success(entity(1), 2);
        assert!(b.peers(2).is_empty());
    }

    #[test]
    fn five_failures_open_a_peer_s_breaker_and_others_are_not_affected() {
        let mut b = Breakers::new(&PoolConfig::default());
        for t in 0..5 {
            b.failure(entity(1), t);
        }
        assert!(b.allow(entity(1), 10).is_err());
        assert!(b.allow(entity(2), 10).is_ok());
        assert_eq!(b.counters().totals().trips, 1);
        assert_eq!(b.counters().tripped.get(), 1);
        assert_eq!(b.open(10), 1);
        let p = &b.peers(10)[0];
        assert_eq!((p.state, p.retry_after_ms), ("open", Some(29_994)));
        assert_eq!(b.open(30_004), 0, "half-open after 30 s");
    }

    #[test]
    fn at_the_bound_the_least_recently_touched_is_forgotten() {
        let config = PoolConfig {
            max_peers: 2,
            ..PoolConfig::default()
        };
        let mut b = Breakers::new(&config);
        (0..5).for_each(|t| b.failure(entity(1), t));
        b.failure(entity(2), 10);
        b.failure(entity(3), 20);
        let ids: Vec<_> = b.peers(20).into_iter().map(|p| p.entity_id).collect();
        assert_eq!(ids.len(), 2);
        assert!(!ids.contains(&entity(1)), "touched longest ago");
        assert_eq!(b.counters().tripped.get(), 0, "the open one was forgotten");
        assert!(b.allow(entity(1), 21).is_ok(), "forgotten: closed again");
    }

    #[test]
    fn a_connection_from_the_peer_closes_its_open_breaker_at_once() {
        let mut b = Breakers::new(&PoolConfig::default());
        (0..5).for_each(|t| b.failure(entity(1), t));
        assert!(b.allow(entity(1), 10).is_err(), "open");
        assert_eq!(b.counters().tripped.get(), 1);
        b.reachable(entity(1));
        assert!(
            b.allow(entity(1), 11).is_ok(),
            "closed well before its open time"
        );
        assert_eq!(b.counters().tripped.get(), 0);
        assert!(b.peers(11).is_empty());
        b.reachable(entity(2));
        assert!(b.peers(11).is_empty(), "a peer without a breaker stays so");
    }
}
