//! Connections, dials and the peer table.
//!
//! A dial the agent asked for (`POST /v1/peers`) answers "connected" only once
//! the remote node has identified itself on the new connection: a node at its
//! connection limit accepts the transport and then closes it at once, which
//! is reported as a failure, not as a connection.

use std::collections::HashMap;

use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, identify};
use peer_core::EntityId;

use super::{Actor, Reply};
use crate::net;
use crate::net::ip_limits::Group;
use crate::network::NetEvent;
use crate::node::{Event, Live, NodeError, PeerView};
use crate::service::PeerEvent;
use crate::store::PeerRecord;

/// Addresses remembered per connected peer.
const MAX_ADDRS_PER_PEER: usize = 8;

struct Connected {
    entity: EntityId,
    connections: u32,
    addrs: Vec<Multiaddr>,
    /// The addresses (or /64s) its connections come from.
    groups: Vec<Group>,
    /// Its requests refused as misbehaviour.
    misbehaved: u32,
    /// When its latest connection opened, ms since the Unix epoch.
    last_seen_ms: u64,
}

struct Dial {
    reply: Reply<PeerView>,
    /// Monotonic ms by which the remote must have identified itself.
    deadline_ms: u64,
}

/// Open connections and the agent's dials in progress.
pub(crate) struct Connections {
    peers: HashMap<PeerId, Connected>,
    dials: HashMap<ConnectionId, Dial>,
    max_dials: usize,
}

impl Connections {
    pub fn new(max_dials: usize) -> Self {
        Self {
            peers: HashMap::new(),
            dials: HashMap::new(),
            max_dials: max_dials.max(1),
        }
    }

    /// The entity of connected peer `peer` (derived once, when it connected:
    /// decoding a PeerId's key costs a point decompression).
    pub fn entity(&self, peer: &PeerId) -> Option<EntityId> {
        self.peers.get(peer).map(|c| c.entity)
    }

    /// The earliest dial deadline.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.dials.values().map(|d| d.deadline_ms).min()
    }
}

impl Actor {
    /// Dials `addr` for the agent; at most `network.max_pending_dials` at once.
    pub(super) fn dial(&mut self, addr: Multiaddr, reply: Reply<PeerView>) {
        if self.connections.dials.len() >= self.connections.max_dials {
            _ = reply.send(Err(NodeError::Busy(self.connections.max_dials)));
            return;
        }
        // A fresh local port, as for discovery's dials (`NetOp::Dial`).
        let opts = DialOpts::unknown_peer_id()
            .address(addr)
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                let timeout_ms = self
                    .shared
                    .config
                    .connection_timeout()
                    .as_millis()
                    .saturating_mul(2);
                let deadline_ms = self
                    .now_ms()
                    .saturating_add(u64::try_from(timeout_ms).unwrap_or(u64::MAX));
                self.connections
                    .dials
                    .insert(id, Dial { reply, deadline_ms });
            }
            Err(e) => _ = reply.send(Err(NodeError::Dial(e.to_string()))),
        }
    }

    /// The agent's dial on `id` failed.
    pub(super) fn dial_failed(&mut self, id: ConnectionId, e: NodeError) {
        if let Some(d) = self.connections.dials.remove(&id) {
            _ = d.reply.send(Err(e));
        }
    }

    /// Fails dials whose remote never identified itself.
    pub(super) fn dial_timeouts(&mut self, now_ms: u64) {
        let late: Vec<ConnectionId> = self
            .connections
            .dials
            .iter()
            .filter(|(_, d)| d.deadline_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.dial_failed(
                id,
                NodeError::Dial("the peer did not identify itself in time".into()),
            );
        }
    }

    pub(super) fn on_connected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let Some(entity) = net::entity_of(&peer_id) else {
            // Only Ed25519 peers have an entity id; nobody else speaks this protocol.
            tracing::warn!(%peer_id, "peer without an Ed25519 key; disconnecting");
            _ = self.swarm.disconnect_peer_id(peer_id);
            self.dial_failed(
                connection_id,
                NodeError::Dial(format!("{peer_id} does not use an Ed25519 key")),
            );
            return;
        };
        let addr = endpoint.get_remote_address().clone();
        let first = !self.connections.peers.contains_key(&peer_id);
        let now = self.shared.clock.wall_ms();
        let c = self
            .connections
            .peers
            .entry(peer_id)
            .or_insert_with(|| Connected {
                entity,
                connections: 0,
                addrs: Vec::new(),
                groups: Vec::new(),
                misbehaved: 0,
                last_seen_ms: now,
            });
        c.connections += 1;
        if let Some(group) = Group::of_addr(&addr)
            && !c.groups.contains(&group)
        {
            c.groups.push(group);
        }
        c.last_seen_ms = now;
        if endpoint.is_dialer() && !c.addrs.contains(&addr) && c.addrs.len() < MAX_ADDRS_PER_PEER {
            c.addrs.push(addr);
        }
        let addrs: Vec<String> = c.addrs.iter().map(ToString::to_string).collect();
        self.writer.record_peer(PeerRecord {
            entity_id: entity,
            peer_id: peer_id.to_string(),
            addrs,
            last_seen_ms: now,
        });
        if !first {
            return;
        }
        self.shared.by_entity.insert(entity, peer_id);
        let mono = self.now_ms();
        self.shared.sessions.set_connected(mono, entity, true);
        self.shared.limits.connected(entity);
        let connected = self.connections.peers.len();
        self.shared.stats.set_connected(connected);
        _ = self
            .shared
            .events
            .send(Event::PeerConnected { entity_id: entity });
        self.peer_event(PeerEvent::Connected(entity));
        self.unpark(entity);
    }

    /// `entity` sent a request refused as misbehaviour; past
    /// `network.misbehaviour_limit` of them its connections are closed and its
    /// addresses refused new connections for `network.misbehaviour_cooldown_secs`.
    pub(super) fn misbehaved(&mut self, entity: EntityId) {
        let limit = self.shared.config.network.misbehaviour_limit;
        let Some(peer_id) = self.shared.by_entity.get(&entity).copied() else {
            return;
        };
        let Some(c) = self.connections.peers.get_mut(&peer_id) else {
            return;
        };
        c.misbehaved += 1;
        if limit == 0 || c.misbehaved < limit {
            return;
        }
        let cooldown =
            std::time::Duration::from_secs(self.shared.config.network.misbehaviour_cooldown_secs);
        tracing::warn!(peer = %entity, refused = c.misbehaved, "closing the connections of a misbehaving peer");
        for group in c.groups.clone() {
            self.swarm
                .behaviour_mut()
                .ip_limits
                .cool_down(group, cooldown);
        }
        self.shared.stats.misbehaving_peer_closed();
        _ = self.swarm.disconnect_peer_id(peer_id);
    }

    /// The remote identified itself on `connection_id`: it runs the protocol
    /// and kept the connection, so a dial on it succeeded.
    pub(super) fn on_identified(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        info: identify::Info,
    ) {
        let kad = info.protocols.contains(&net::dht::KAD_PROTOCOL);
        self.net_event(&NetEvent::Identified {
            peer: peer_id,
            listen_addrs: info.listen_addrs.clone(),
            kad,
        });
        // Only peers tracked as connected: their entry goes when they do.
        let Some(c) = self.connections.peers.get_mut(&peer_id) else {
            return;
        };
        self.outbound.links.identified(peer_id, &info.protocols);
        for a in info.listen_addrs {
            if c.addrs.len() < MAX_ADDRS_PER_PEER && !c.addrs.contains(&a) {
                c.addrs.push(a);
            }
        }
        if let Some(d) = self.connections.dials.remove(&connection_id)
            && let Some(c) = self.connections.peers.get(&peer_id)
        {
            let entity = c.entity;
            _ = d.reply.send(Ok(self.peer_view(peer_id, c)));
            self.net_event(&NetEvent::AgentConnected(entity));
        }
    }

    pub(super) fn on_closed(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        remaining: u32,
    ) {
        self.dial_failed(
            connection_id,
            NodeError::Dial(
                "the peer closed the connection at once (it may be at its connection limit)".into(),
            ),
        );
        if let Some(c) = self.connections.peers.get_mut(&peer_id) {
            c.connections = c.connections.saturating_sub(1);
        }
        if remaining > 0 {
            return;
        }
        let Some(c) = self.connections.peers.remove(&peer_id) else {
            return;
        };
        self.shared.by_entity.remove(&c.entity);
        self.pipeline.peer_gone(&peer_id);
        self.outbound.links.disconnected(&peer_id);
        let now = self.now_ms();
        self.shared.sessions.set_connected(now, c.entity, false);
        self.shared.limits.disconnected(c.entity);
        self.shared
            .stats
            .set_connected(self.connections.peers.len());
        self.drop_waiting(peer_id, c.entity);
        _ = self.shared.events.send(Event::PeerDisconnected {
            entity_id: c.entity,
        });
        self.peer_event(PeerEvent::Disconnected(c.entity));
    }

    /// A connected peer as `GET /v1/peers` shows it.
    fn peer_view(&self, peer_id: PeerId, c: &Connected) -> PeerView {
        let (now, wall) = (self.now_ms(), self.shared.clock.wall_ms());
        PeerView {
            entity_id: c.entity,
            peer_id: peer_id.to_string(),
            addrs: c.addrs.iter().map(ToString::to_string).collect(),
            connected: true,
            session: self.shared.sessions.view(&c.entity, now, wall),
            last_seen_ms: c.last_seen_ms,
            health: None,
            verified: false,
            capabilities: Vec::new(),
        }
    }

    /// The connected peers, and the live sessions of the peers `ids`.
    pub(super) fn live(&self, ids: Vec<EntityId>) -> Live {
        let (now, wall) = (self.now_ms(), self.shared.clock.wall_ms());
        let connected = self
            .connections
            .peers
            .iter()
            .map(|(peer_id, c)| self.peer_view(*peer_id, c))
            .collect();
        let sessions = ids
            .into_iter()
            .filter_map(|id| Some((id, self.shared.sessions.view(&id, now, wall)?)))
            .collect();
        Live {
            connected,
            sessions,
        }
    }
}
