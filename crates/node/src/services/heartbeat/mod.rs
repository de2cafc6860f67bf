//! Heartbeat monitoring, `wake_up` and `status_report` (PROTOCOL.md section
//! 5b).
//!
//! Every connected peer gets a `heartbeat` every `heartbeat.interval_ms`,
//! answered by a `heartbeat_ack` reply; the round trip is measured on the
//! monotonic clock. [`health::Monitor`] turns answers, failures and missed
//! intervals into each peer's health, shown in `GET /v1/peers` and
//! `/metrics`, with a `peer_health` event on every change. The service also
//! owns two application types: a `wake_up` is delivered to the agent and
//! answered by a `wake_up_ack` reply with this node's status; a
//! `status_report` is delivered to the agent and kept as the peer's last
//! reported status.

mod config;
pub mod health;

use std::collections::HashMap;

use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, MsgType, Rejection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::oneshot;

pub use config::HeartbeatConfig;
pub use health::{Health, HealthView};

use crate::node::Event;
use crate::secure::parse_json;
use crate::service::{
    Answer, Context, Inbound, Outcome, PeerEvent, Reply, RequestId, Route, Service,
};
use health::{Change, Monitor, StatusView};

/// A liveness probe, sent by the node itself; answered by [`HEARTBEAT_ACK`].
pub const HEARTBEAT: &str = "heartbeat";
/// The reply to a [`HEARTBEAT`]: its payload, echoed.
pub const HEARTBEAT_ACK: &str = "heartbeat_ack";
/// A request to the peer's agent, delivered to it; answered by [`WAKE_UP_ACK`].
pub const WAKE_UP: &str = "wake_up";
/// The reply to a [`WAKE_UP`]: the answering node's status.
pub const WAKE_UP_ACK: &str = "wake_up_ack";
/// An agent's status, delivered to the peer's agent and kept by its node.
pub const STATUS_REPORT: &str = "status_report";

/// Whether `msg_type` is one of the types this service takes from agents
/// (`wake_up`, `status_report`): JSON payloads, sealed, delivered to the
/// recipient's agent, each in one envelope (never as a chunked transfer).
pub fn is_agent_type(msg_type: &MsgType) -> bool {
    [WAKE_UP, STATUS_REPORT].contains(&msg_type.as_str())
}

/// What the heartbeat service takes from handles.
#[derive(Debug)]
pub enum Command {
    /// The health of those of these peers it tracks.
    Health(
        Vec<EntityId>,
        oneshot::Sender<HashMap<EntityId, HealthView>>,
    ),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The heartbeat's Prometheus metrics.
#[derive(Debug, Clone)]
pub struct HeartbeatMetrics {
    sent: Counter,
    received: Counter,
    failed: Counter,
    rtt: Histogram,
    peers: Family<StateLabel, Gauge>,
}

impl HeartbeatMetrics {
    /// The metrics, registered in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sent: Counter::default(),
            received: Counter::default(),
            failed: Counter::default(),
            // 1 ms to about 16 s.
            rtt: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            peers: Family::default(),
        };
        registry.register("heartbeats_sent", "Heartbeats sent", m.sent.clone());
        registry.register(
            "heartbeats_received",
            "Heartbeats answered in time",
            m.received.clone(),
        );
        registry.register(
            "heartbeats_failed",
            "Heartbeats refused, lost or not answered within heartbeat.interval_ms",
            m.failed.clone(),
        );
        registry.register(
            "heartbeat_rtt_seconds",
            "Round trip of answered heartbeats",
            m.rtt.clone(),
        );
        registry.register(
            "peers_by_health",
            "Peers the heartbeat tracks, by health",
            m.peers.clone(),
        );
        // Every state is shown from the start, at 0.
        for state in Health::ALL {
            m.peers
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(0);
        }
        m
    }
}

/// Beats every connected peer, tracks their health, answers `wake_up` and
/// keeps `status_report`s.
#[derive(Debug)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    monitor: Monitor,
    /// Peers connected now (for `wake_up_ack`).
    connected: usize,
}

impl Heartbeat {
    /// The service, with `config`.
    pub fn new(config: HeartbeatConfig) -> Self {
        Self {
            monitor: Monitor::new(&config),
            config,
            connected: 0,
        }
    }

    /// Tells the agent and the metrics of health changes.
    fn changed(&self, cx: &mut Context<'_>, changes: impl IntoIterator<Item = Change>) {
        let mut any = false;
        for (entity_id, state) in changes {
            tracing::debug!(peer = %entity_id, state = state.as_str(), "peer health");
            cx.emit(Event::PeerHealth { entity_id, state });
            any = true;
        }
        if any {
            self.publish(cx);
        }
    }

    /// Sets the gauge of peers by health.
    fn publish(&self, cx: &mut Context<'_>) {
        let counts = self.monitor.counts();
        let peers = &cx.stats().heartbeat().peers;
        for (state, n) in Health::ALL.into_iter().zip(counts) {
            peers
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A `wake_up`: delivered to the agent, answered with this node's status.
    fn wake_up(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let payload = match parse_json(msg.payload, cx.config().protocol.max_json_depth) {
            Ok(p) => p,
            Err(r) => return r.into(),
        };
        let event = Event::message(msg.message_id, msg.from, &msg.msg_type, payload);
        if let Err(full) = cx.deliver(event) {
            return full.into();
        }
        let [healthy, degraded, unreachable] = self.monitor.counts();
        let status = json!({
            "entity_id": cx.local(),
            "uptime_ms": cx.now_ms(),
            "connected_peers": self.connected,
            "health": {"healthy": healthy, "degraded": degraded, "unreachable": unreachable},
        });
        Answer::Reply {
            msg_type: WAKE_UP_ACK.parse().expect("valid"),
            payload: status.to_string().into_bytes(),
        }
    }

    /// A `status_report`: kept as the peer's last status, delivered to the agent.
    fn status_report(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let limit = self.config.max_status_bytes;
        if msg.payload.len() > limit {
            return Rejection::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "a status_report is at most {limit} bytes here, not {} (heartbeat.max_status_bytes)",
                    msg.payload.len()
                ),
            )
            .into();
        }
        let depth = cx.config().protocol.max_json_depth;
        // Two copies: the one delivered counts against the agent's unread
        // bytes until read, the one kept does not.
        let kept = match parse_json(msg.payload.clone(), depth) {
            Ok(p) => p,
            Err(r) => return r.into(),
        };
        let payload = match parse_json(msg.payload, depth) {
            Ok(p) => p,
            Err(r) => return r.into(),
        };
        let status = StatusView {
            received_ms: cx.wall_ms(),
            payload: kept,
        };
        let event = Event::message(msg.message_id, msg.from, &msg.msg_type, payload);
        if let Err(full) = cx.deliver(event) {
            return full.into();
        }
        self.monitor.report(msg.from, cx.now_ms(), status);
        self.publish(cx);
        Answer::Accepted
    }
}

impl Service for Heartbeat {
    type Command = Command;

    fn name(&self) -> &'static str {
        "heartbeat"
    }

    /// `heartbeat` plain (no session needed to tell a peer is alive);
    /// `wake_up` and `status_report` sealed like every agent's message.
    fn routes(&self) -> Vec<Route> {
        vec![
            Route::plain(HEARTBEAT, Class::Heartbeat),
            Route::sealed(WAKE_UP, Class::Task),
            Route::sealed(STATUS_REPORT, Class::Task),
        ]
    }

    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        match msg.msg_type.as_str() {
            HEARTBEAT => match parse_json(msg.payload, cx.config().protocol.max_json_depth) {
                Ok(payload) => Answer::Reply {
                    msg_type: HEARTBEAT_ACK.parse().expect("valid"),
                    payload: payload.as_str().as_bytes().to_vec(),
                },
                Err(r) => r.into(),
            },
            WAKE_UP => self.wake_up(cx, msg),
            _ => self.status_report(cx, msg),
        }
    }

    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        let (peer, now) = (outcome.to, cx.now_ms());
        let change = match &outcome.result {
            Ok(Reply::Envelope(env)) if env.msg_type == *HEARTBEAT_ACK => {
                let answered = self.monitor.answered(peer, id, now, cx.wall_ms());
                answered.and_then(|(rtt_ms, change)| {
                    let m = cx.stats().heartbeat();
                    m.received.inc();
                    m.rtt.observe(rtt_ms as f64 / 1000.0);
                    change
                })
            }
            _ => self.monitor.failed(peer, id, now).and_then(|change| {
                cx.stats().heartbeat().failed.inc();
                change
            }),
        };
        self.changed(cx, change);
    }

    fn on_command(&mut self, _cx: &mut Context<'_>, command: Command) {
        let Command::Health(ids, reply) = command;
        let views = ids
            .into_iter()
            .filter_map(|id| Some((id, self.monitor.view(&id)?)))
            .collect();
        _ = reply.send(views);
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.monitor.next_beat_ms()
    }

    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        let now = cx.now_ms();
        let tick = self.monitor.tick(now);
        cx.stats().heartbeat().failed.inc_by(tick.failed);
        for (peer, seq) in tick.due {
            let payload = json!({ "seq": seq }).to_string().into_bytes();
            let id = cx.send(peer, HEARTBEAT.parse().expect("valid"), payload);
            self.monitor.sent(peer, id, now);
            cx.stats().heartbeat().sent.inc();
        }
        self.changed(cx, tick.changes);
    }

    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        match event {
            PeerEvent::Connected(peer) => {
                self.connected += 1;
                self.monitor.connected(peer, cx.now_ms());
            }
            PeerEvent::Disconnected(peer) => {
                self.connected = self.connected.saturating_sub(1);
                self.monitor.disconnected(peer);
            }
        }
        self.publish(cx);
    }
}
