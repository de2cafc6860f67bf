//! Per-peer message counters (for `/v1/stats`) and Prometheus metrics (for `/metrics`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use peer_core::{EntityId, ErrorCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::inbox::InboxCounters;
use crate::services::heartbeat::HeartbeatMetrics;

/// Counters of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerCounters {
    /// Messages this node sent that the peer accepted.
    pub sent: u64,
    /// Messages from the peer that this node accepted.
    pub received: u64,
    /// Messages from the peer that this node rejected, by error code.
    pub rejected: BTreeMap<String, u64>,
    /// Messages this node sent that the peer rejected, by error code. Codes this
    /// node does not know are counted together under [`UNKNOWN_CODE`].
    pub refused_by_peer: BTreeMap<String, u64>,
    /// Requests this node put on the wire to the peer (every envelope: its
    /// messages, handshake steps, retries).
    pub requests: u64,
    /// Of them, those the peer answered (accepted, a reply, or a refusal).
    pub answered: u64,
    /// Of them, those that got no answer (a timeout, a broken stream).
    pub failures: u64,
    /// Requests sent again after they got no answer.
    pub retries: u64,
    /// Microseconds from sending to the answer, summed over the answered
    /// requests (the mean is this ÷ `answered`).
    pub latency_us_total: u64,
}

/// The `/v1/stats` document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsView {
    /// Counters per peer entity id.
    pub peers: BTreeMap<String, PeerCounters>,
    /// Peers beyond `max_stats_peers`, counted together.
    pub other: PeerCounters,
    /// Dials and circuit breakers.
    pub pool: crate::pool::PoolView,
}

/// The code under which refusals with an error code this node does not know
/// are counted, in `refused_by_peer` and in `peer_messages_refused_total`. The
/// peer chooses that text, so keeping it would let a peer grow both without
/// bound.
pub const UNKNOWN_CODE: &str = "UNKNOWN";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// Counters of the database writer (`store::Writer`), served with the node's
/// metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreCounters {
    /// Write transactions committed.
    pub(crate) commits: Counter,
    /// Peer sightings dropped because the writer's queue was full.
    pub(crate) dropped: Counter,
}

/// The Prometheus metrics of a node.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    sent: Counter,
    received: Counter,
    rejected: Family<CodeLabel, Counter>,
    refused: Family<CodeLabel, Counter>,
    connected: Gauge,
    session_peers: Gauge,
    rate_senders: Gauge,
    misbehaving: Counter,
    signed: Counter,
    heartbeat: HeartbeatMetrics,
}

impl Metrics {
    /// A fresh registry of the node's metrics, serving the database
    /// writer's `store` counters too.
    pub(crate) fn new(
        store: &StoreCounters,
        inbox: &InboxCounters,
        pool: &crate::pool::Counters,
    ) -> Self {
        let mut registry = Registry::with_prefix("peer");
        let sent = Counter::default();
        let received = Counter::default();
        let rejected = Family::<CodeLabel, Counter>::default();
        let refused = Family::<CodeLabel, Counter>::default();
        let connected = Gauge::default();
        let session_peers = Gauge::default();
        let rate_senders = Gauge::default();
        let misbehaving = Counter::default();
        let signed = Counter::default();
        registry.register(
            "messages_sent",
            "Messages accepted by their recipient",
            sent.clone(),
        );
        registry.register(
            "messages_received",
            "Messages received and accepted",
            received.clone(),
        );
        registry.register(
            "messages_rejected",
            "Inbound messages rejected, by error code",
            rejected.clone(),
        );
        registry.register(
            "messages_refused",
            "Outbound messages refused by the peer, by error code",
            refused.clone(),
        );
        registry.register(
            "connected_peers",
            "Peers with an open connection",
            connected.clone(),
        );
        registry.register(
            "session_peers",
            "Peers with end-to-end session state (security.max_peers bounds it)",
            session_peers.clone(),
        );
        registry.register(
            "misbehaving_peers_closed",
            "Peers whose connections were closed for misbehaviour (network.misbehaviour_limit)",
            misbehaving.clone(),
        );
        registry.register(
            "rate_limit_senders",
            "Senders with rate-limit buckets of their own (rate_limits.max_peers bounds it)",
            rate_senders.clone(),
        );
        registry.register(
            "envelopes_signed",
            "Envelopes this node signed (requests and replies)",
            signed.clone(),
        );
        registry.register(
            "store_commits",
            "Database write transactions of peer sightings committed",
            store.commits.clone(),
        );
        registry.register(
            "store_dropped",
            "Peer sightings not recorded because the database writer's queue was full",
            store.dropped.clone(),
        );
        registry.register(
            "inbox_events",
            "Events held in the inbox for the agent, or on their way there",
            inbox.events.clone(),
        );
        registry.register(
            "inbox_bytes",
            "Bytes held in the inbox for the agent, or on their way there",
            inbox.bytes.clone(),
        );
        registry.register(
            "inbox_commits",
            "Inbox write transactions committed (each a group of events and acknowledgements)",
            inbox.commits.clone(),
        );
        registry.register(
            "inbox_written",
            "Events written to the inbox",
            inbox.written.clone(),
        );
        registry.register(
            "inbox_refused",
            "Messages refused INBOX_FULL",
            inbox.refused.clone(),
        );
        for (name, help, counter) in [
            (
                "pool_acquisitions",
                "Sends that needed a connection to their peer",
                &pool.acquisitions,
            ),
            (
                "pool_reuses",
                "Sends that found a connection to their peer open",
                &pool.reuses,
            ),
            (
                "pool_validations",
                "Keep-alive pings answered",
                &pool.validations,
            ),
            (
                "pool_validation_failures",
                "Keep-alive pings failed or not answered in time",
                &pool.validation_failures,
            ),
            (
                "pool_evictions",
                "Connections closed because their validation failed",
                &pool.evictions,
            ),
            ("pool_dials", "Dials started", &pool.dials),
            (
                "pool_dial_failures",
                "Dials that failed",
                &pool.dial_failures,
            ),
            (
                "pool_dials_refused",
                "Dials not started: the peer's circuit breaker was open",
                &pool.dials_refused,
            ),
            (
                "pool_sends_refused",
                "Sends failed at once with CIRCUIT_OPEN",
                &pool.sends_refused,
            ),
            (
                "pool_send_failures",
                "Sends that got no answer (timeout, or the connection broke)",
                &pool.send_failures,
            ),
            (
                "pool_streams_opened",
                "Long-lived envelope streams opened to peers",
                &pool.streams_opened,
            ),
            (
                "pool_retries",
                "Sends sent again after they got no answer, within the retry budget",
                &pool.retries,
            ),
            (
                "pool_breaker_trips",
                "Times a peer's circuit breaker opened",
                &pool.trips,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "pool_breakers_tripped",
            "Peers whose circuit breaker is open or half-open",
            pool.tripped.clone(),
        );
        registry.register(
            "pool_request_seconds",
            "Requests to peers, from sending to the answer",
            pool.latency.clone(),
        );
        let heartbeat = HeartbeatMetrics::register(&mut registry);
        Self {
            registry: Arc::new(registry),
            sent,
            received,
            rejected,
            refused,
            connected,
            session_peers,
            rate_senders,
            misbehaving,
            signed,
            heartbeat,
        }
    }

    /// The node signed an envelope.
    pub(crate) fn signed(&self) {
        self.signed.inc();
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Counters kept by the node actor. At most `max_peers` peers get their own row.
#[derive(Debug)]
pub struct Stats {
    peers: HashMap<EntityId, PeerCounters>,
    other: PeerCounters,
    max_peers: usize,
    metrics: Metrics,
}

impl Stats {
    /// Empty counters with room for `max_peers` rows, feeding `metrics`.
    pub fn new(max_peers: usize, metrics: Metrics) -> Self {
        Self {
            peers: HashMap::new(),
            other: PeerCounters::default(),
            max_peers,
            metrics,
        }
    }

    /// The metrics, to serve `/metrics`.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    fn row(&mut self, peer: Option<EntityId>) -> &mut PeerCounters {
        match peer {
            Some(p) if self.peers.contains_key(&p) || self.peers.len() < self.max_peers => {
                self.peers.entry(p).or_default()
            }
            _ => &mut self.other,
        }
    }

    /// A message to `peer` was accepted.
    pub fn sent(&mut self, peer: EntityId) {
        self.row(Some(peer)).sent += 1;
        self.metrics.sent.inc();
    }

    /// A request to `peer` went on the wire.
    pub fn requested(&mut self, peer: EntityId) {
        self.row(Some(peer)).requests += 1;
    }

    /// `peer` answered a request `latency` after it was sent.
    pub fn answered(&mut self, peer: EntityId, latency: std::time::Duration) {
        let row = self.row(Some(peer));
        row.answered += 1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        row.latency_us_total = row.latency_us_total.saturating_add(us);
    }

    /// A request to `peer` got no answer; `retried` if it goes again.
    pub fn unanswered(&mut self, peer: EntityId, retried: bool) {
        let row = self.row(Some(peer));
        row.failures += 1;
        if retried {
            row.retries += 1;
        }
    }

    /// A message from `peer` was accepted.
    pub fn received(&mut self, peer: EntityId) {
        self.row(Some(peer)).received += 1;
        self.metrics.received.inc();
    }

    /// A message from `peer` was rejected with `code`.
    pub fn rejected(&mut self, peer: Option<EntityId>, code: ErrorCode) {
        *self.row(peer).rejected.entry(code.to_string()).or_default() += 1;
        let label = CodeLabel {
            code: code.to_string(),
        };
        self.metrics.rejected.get_or_create(&label).inc();
    }

    /// `peer` refused a message with `code`, the text the peer sent. A code that
    /// [`ErrorCode::from_wire`] does not know is counted as [`UNKNOWN_CODE`], so
    /// the labels stay the fixed set of known codes plus one.
    pub fn refused(&mut self, peer: EntityId, code: &str) {
        let code = ErrorCode::from_wire(code).map_or(UNKNOWN_CODE, ErrorCode::as_str);
        *self
            .row(Some(peer))
            .refused_by_peer
            .entry(code.to_owned())
            .or_default() += 1;
        let label = CodeLabel {
            code: code.to_owned(),
        };
        self.metrics.refused.get_or_create(&label).inc();
    }

    /// The number of connected peers changed.
    pub fn set_connected(&self, n: usize) {
        self.metrics
            .connected
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The heartbeat service's metrics.
    pub(crate) fn heartbeat(&self) -> &HeartbeatMetrics {
        &self.metrics.heartbeat
    }

    /// A peer's connections were closed for misbehaviour.
    pub fn misbehaving_peer_closed(&self) {
        self.metrics.misbehaving.inc();
    }

    /// The sizes of the session and rate-limit tables.
    pub fn set_tables(&self, session_peers: usize, rate_senders: usize) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.session_peers.set(n(session_peers));
        self.metrics.rate_senders.set(n(rate_senders));
    }

    /// The counters as served by `/v1/stats` (the actor adds the pool's).
    pub fn view(&self) -> StatsView {
        StatsView {
            peers: self
                .peers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            other: self.other.clone(),
            pool: crate::pool::PoolView::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_beyond_the_bound_share_the_other_row() {
        let mut s = Stats::new(
            2,
            Metrics::new(
                &StoreCounters::default(),
                &Default::default(),
                &Default::default(),
            ),
        );
        for b in 0..5u8 {
            s.received(EntityId([b; 32]));
        }
        s.rejected(None, ErrorCode::MalformedMessage);
        let v = s.view();
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.other.received, 3);
        assert_eq!(v.other.rejected.get("MALFORMED_MESSAGE"), Some(&1));
        let text = s.metrics().encode();
        assert!(text.contains("peer_messages_received_total 5"), "{text}");
        assert!(text.contains("code=\"MALFORMED_MESSAGE\""), "{text}");
    }

    #[test]
    fn codes_we_do_not_know_share_one_label() {
        let mut s = Stats::new(
            1,
            Metrics::new(
                &StoreCounters::default(),
                &Default::default(),
                &Default::default(),
            ),
        );
        let peer = EntityId([1; 32]);
        s.refused(peer, "RATE_LIMITED");
        for n in 0..100 {
            s.refused(peer, &format!("MADE_UP_{n}"));
        }
        s.refused(peer, "");
        s.refused(peer, "rate_limited");
        let v = s.view();
        let refused = &v.peers[&peer.to_string()].refused_by_peer;
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert_eq!(refused.get("RATE_LIMITED"), Some(&1));
        assert_eq!(refused.get(UNKNOWN_CODE), Some(&102));
        let text = s.metrics().encode();
        let labels = text
            .lines()
            .filter(|l| l.starts_with("peer_messages_refused_total{"))
            .count();
        assert_eq!(labels, 2, "{text}");
        assert!(
            text.contains("peer_messages_refused_total{code=\"UNKNOWN\"} 102"),
            "{text}"
        );
        assert!(!text.contains("MADE_UP"), "{text}");
    }
}
