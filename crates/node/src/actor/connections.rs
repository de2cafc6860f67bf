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
use crate::node::{Event, NodeError, PeerView};
use crate::service::PeerEvent;
use crate::store::PeerRecord;

/// Addresses remembered per connected peer.
const MAX_ADDRS_PER_PEER: usize = 8;

struct Connected {
    entity: EntityId,
    connections: u32,
    addrs: Vec<Multiaddr>,
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
        let opts = DialOpts::unknown_peer_id().address(addr).build();
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
        let c = self
            .connections
            .peers
            .entry(peer_id)
            .or_insert_with(|| Connected {
                entity,
                connections: 0,
                addrs: Vec::new(),
            });
        c.connections += 1;
        if endpoint.is_dialer() && !c.addrs.contains(&addr) && c.addrs.len() < MAX_ADDRS_PER_PEER {
            c.addrs.push(addr);
        }
        let addrs: Vec<String> = c.addrs.iter().map(ToString::to_string).collect();
        if !first {
            return;
        }
        self.shared.by_entity.insert(entity, peer_id);
        self.shared.sessions.set_connected(entity, true);
        self.shared
            .stats
            .set_connected(self.connections.peers.len());
        let record = PeerRecord {
            entity_id: entity,
            peer_id: peer_id.to_string(),
            addrs,
            last_seen_ms: self.shared.clock.wall_ms(),
        };
        if let Err(e) = self
            .store
            .upsert_peer(&record, self.shared.config.network.max_known_peers)
        {
            tracing::error!(error = %e, "cannot record peer");
        }
        _ = self
            .shared
            .events
            .send(Event::PeerConnected { entity_id: entity });
        self.peer_event(PeerEvent::Connected(entity));
    }

    /// The remote identified itself on `connection_id`: it runs the protocol
    /// and kept the connection, so a dial on it succeeded.
    pub(super) fn on_identified(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        info: identify::Info,
    ) {
        let Some(c) = self.connections.peers.get_mut(&peer_id) else {
            return;
        };
        for a in info.listen_addrs {
            if c.addrs.len() < MAX_ADDRS_PER_PEER && !c.addrs.contains(&a) {
                c.addrs.push(a);
            }
        }
        let entity = c.entity;
        if let Some(d) = self.connections.dials.remove(&connection_id) {
            let view = self.peer_view(entity, Some(peer_id));
            _ = d.reply.send(Ok(view));
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
        self.shared.sessions.set_connected(c.entity, false);
        self.shared
            .stats
            .set_connected(self.connections.peers.len());
        self.drop_waiting(peer_id, c.entity);
        _ = self.shared.events.send(Event::PeerDisconnected {
            entity_id: c.entity,
        });
        self.peer_event(PeerEvent::Disconnected(c.entity));
    }

    /// A peer as `GET /v1/peers` shows it, from what the actor knows now.
    fn peer_view(&self, entity: EntityId, peer_id: Option<PeerId>) -> PeerView {
        let now = self.now_ms();
        let wall = self.shared.clock.wall_ms();
        let addrs = peer_id
            .and_then(|p| self.connections.peers.get(&p))
            .map(|c| c.addrs.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        PeerView {
            entity_id: entity,
            peer_id: peer_id.map(|p| p.to_string()).unwrap_or_default(),
            addrs,
            connected: peer_id.is_some(),
            session: self.shared.sessions.view(&entity, now, wall),
            last_seen_ms: wall,
        }
    }

    /// Known peers, most recently seen first.
    pub(super) fn peers(&self) -> Result<Vec<PeerView>, NodeError> {
        let now = self.now_ms();
        let wall = self.shared.clock.wall_ms();
        let mut out: Vec<PeerView> = self
            .store
            .peers()
            .map_err(|e| NodeError::Transport(e.to_string()))?
            .into_iter()
            .map(|p| PeerView {
                connected: self.shared.by_entity.contains_key(&p.entity_id),
                session: self.shared.sessions.view(&p.entity_id, now, wall),
                entity_id: p.entity_id,
                peer_id: p.peer_id,
                addrs: p.addrs,
                last_seen_ms: p.last_seen_ms,
            })
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.last_seen_ms));
        Ok(out)
    }
}
