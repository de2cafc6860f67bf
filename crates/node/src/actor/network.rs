//! The discovery protocols between the swarm and the services: applies the
//! [`NetOp`]s services queue, turns Kademlia, gossipsub and mDNS events into
//! [`NetEvent`]s, and holds the messages waiting for a connection to a peer
//! that is being looked up and dialled.

use std::collections::HashMap;

use libp2p::swarm::DialError;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{PeerId, gossipsub, kad, mdns};
use peer_core::EntityId;

use super::Actor;
use crate::network::{Found, NetEvent, NetOp};
use crate::node::NodeError;
use crate::service::{SendRequest, ServiceId};

/// Lookups in progress and the messages parked for a connection.
pub(crate) struct Network {
    /// Kademlia's query ids, to the service and token that asked.
    queries: HashMap<kad::QueryId, (ServiceId, u64)>,
    tokens: HashMap<(ServiceId, u64), kad::QueryId>,
    parked: HashMap<EntityId, Parked>,
    parked_count: usize,
    max_parked: usize,
    /// How long a message waits for its recipient to be found and dialled.
    park_ms: u64,
    enabled: bool,
}

struct Parked {
    sends: Vec<SendRequest>,
    deadline_ms: u64,
}

impl Network {
    pub fn new(config: &crate::Config) -> Self {
        let d = &config.discovery;
        let connect = config.network.connection_timeout_secs;
        Self {
            queries: HashMap::new(),
            tokens: HashMap::new(),
            parked: HashMap::new(),
            parked_count: 0,
            max_parked: d.max_parked,
            park_ms: (d.query_timeout_secs + 2 * connect).saturating_mul(1000),
            enabled: d.enabled,
        }
    }

    /// The earliest deadline of a parked message.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.parked.values().map(|p| p.deadline_ms).min()
    }
}

impl Actor {
    /// A send to a peer with no connection: parked while discovery finds
    /// and dials it (the first parked for it tells every service it is
    /// wanted); failed at once when discovery is off or the parking is full.
    pub(super) fn park(&mut self, send: SendRequest) {
        let to = send.queued.to;
        let now = self.now_ms();
        let net = &mut self.network;
        if !net.enabled || net.parked_count >= net.max_parked {
            return self.outbound_failed(send.queued, NodeError::NotConnected(to));
        }
        net.parked_count += 1;
        let deadline_ms = now.saturating_add(net.park_ms);
        let first = !net.parked.contains_key(&to);
        net.parked
            .entry(to)
            .or_insert_with(|| Parked {
                sends: Vec::new(),
                deadline_ms,
            })
            .sends
            .push(send);
        if first {
            self.net_event(&NetEvent::Wanted(to));
        }
    }

    /// `entity` connected: its parked messages go.
    pub(super) fn unpark(&mut self, entity: EntityId) {
        if let Some(p) = self.network.parked.remove(&entity) {
            self.network.parked_count -= p.sends.len();
            self.effects.sends.extend(p.sends);
        }
    }

    /// Fails the messages parked for `entity`: not found (`None`), or not
    /// reached.
    fn fail_parked(&mut self, entity: EntityId, why: Option<&str>) {
        if let Some(p) = self.network.parked.remove(&entity) {
            self.network.parked_count -= p.sends.len();
            for s in p.sends {
                let e = match why {
                    None => NodeError::NotConnected(entity),
                    Some(why) => NodeError::Dial(format!("{entity} could not be reached: {why}")),
                };
                self.outbound_failed(s.queued, e);
            }
        }
    }

    /// Fails parked messages whose recipient was not reached in time.
    pub(super) fn parked_timeouts(&mut self, now_ms: u64) {
        let late: Vec<EntityId> = self
            .network
            .parked
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now_ms)
            .map(|(e, _)| *e)
            .collect();
        for e in late {
            self.fail_parked(e, Some("it was not found and connected in time"));
        }
    }

    /// Hands `event` to every service.
    pub(super) fn net_event(&mut self, event: &NetEvent) {
        for i in 0..self.services.len() {
            self.call(ServiceId(i), |s, cx| s.on_network(cx, event));
        }
    }

    /// Applies one operation a service asked for.
    pub(super) fn apply(&mut self, owner: ServiceId, op: NetOp) {
        let b = self.swarm.behaviour_mut();
        let query = |net: &mut Network, id: kad::QueryId, token: u64| {
            net.queries.insert(id, (owner, token));
            net.tokens.insert((owner, token), id);
        };
        match op {
            NetOp::Put(record) => {
                if let Some(kad) = b.kad.as_mut()
                    && let Err(e) = kad.put_record(record, kad::Quorum::One)
                {
                    tracing::warn!(error = %e, "cannot store a record");
                }
            }
            NetOp::Store(record) => {
                if let Some(kad) = b.kad.as_mut()
                    && let Err(e) = kad::store::RecordStore::put(kad.store_mut(), record)
                {
                    tracing::debug!(error = %e, "record not stored");
                }
            }
            NetOp::Remove(key) => {
                if let Some(kad) = b.kad.as_mut() {
                    kad.remove_record(&key.into());
                }
            }
            NetOp::Get { key, token } => match b.kad.as_mut() {
                Some(kad) => query(&mut self.network, kad.get_record(key.into()), token),
                None => self.lookup_done(owner, token),
            },
            NetOp::Provide(key) => {
                if let Some(kad) = b.kad.as_mut()
                    && let Err(e) = kad.start_providing(key.into())
                {
                    tracing::warn!(error = %e, "cannot provide a key");
                }
            }
            NetOp::StopProviding(key) => {
                if let Some(kad) = b.kad.as_mut() {
                    kad.stop_providing(&key.into());
                }
            }
            NetOp::StoreProvider(record) => {
                if let Some(kad) = b.kad.as_mut()
                    && let Err(e) = kad::store::RecordStore::add_provider(kad.store_mut(), record)
                {
                    tracing::debug!(error = %e, "provider entry not stored");
                }
            }
            NetOp::GetProviders { key, token } => match b.kad.as_mut() {
                Some(kad) => query(&mut self.network, kad.get_providers(key.into()), token),
                None => self.lookup_done(owner, token),
            },
            NetOp::Closest { key, token } => match b.kad.as_mut() {
                Some(kad) => query(&mut self.network, kad.get_closest_peers(key), token),
                None => self.lookup_done(owner, token),
            },
            NetOp::Finish(token) => {
                if let Some(id) = self.network.tokens.get(&(owner, token))
                    && let Some(kad) = b.kad.as_mut()
                    && let Some(mut q) = kad.query_mut(id)
                {
                    q.finish();
                }
            }
            NetOp::Bootstrap => {
                if let Some(kad) = b.kad.as_mut() {
                    _ = kad.bootstrap();
                }
            }
            NetOp::AddAddress(peer, addr) => {
                if let Some(kad) = b.kad.as_mut() {
                    kad.add_address(&peer, addr);
                }
            }
            NetOp::Announce(data) => {
                if let Some(g) = b.gossipsub.as_mut()
                    && let Err(e) = g.publish(crate::net::dht::announce_topic(), data)
                {
                    tracing::debug!(error = %e, "announce not published");
                }
            }
            NetOp::Validate {
                id,
                source,
                verdict,
            } => {
                if let Some(g) = b.gossipsub.as_mut() {
                    g.report_message_validation_result(&id, &source, verdict);
                }
            }
            NetOp::Dial(peer, addrs) => {
                // A fresh local port, not the listener's: two nodes that dial
                // each other at the same instant (both heard the other on mDNS)
                // would otherwise meet in one TCP simultaneous open, where both
                // act as Noise initiator and both dials fail (PROTOCOL.md §2).
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .addresses(addrs)
                    .allocate_new_port()
                    .build();
                match self.swarm.dial(opts) {
                    // Connected or being dialled already: its outcome comes.
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "dial not started");
                        self.net_event(&NetEvent::DialFailed(Some(peer), e.to_string()));
                    }
                }
            }
            NetOp::Want(entity) => self.net_event(&NetEvent::Wanted(entity)),
            NetOp::Unreachable(entity, why) => self.fail_parked(entity, why.as_deref()),
        }
    }

    /// A lookup that cannot run ends at once.
    fn lookup_done(&mut self, owner: ServiceId, token: u64) {
        let event = NetEvent::Lookup {
            token,
            found: Found::Done,
            requests: 0,
        };
        self.call(owner, |s, cx| s.on_network(cx, &event));
    }

    /// A Kademlia event.
    pub(super) fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => {
                let Some(&(owner, token)) = self.network.queries.get(&id) else {
                    return;
                };
                if step.last {
                    self.network.queries.remove(&id);
                    self.network.tokens.remove(&(owner, token));
                }
                let found = match result {
                    kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(r))) => {
                        Some(Found::Record(r.record))
                    }
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })) => Some(Found::Providers(providers.into_iter().collect())),
                    kad::QueryResult::GetClosestPeers(Ok(ok)) => Some(Found::Peers(
                        ok.peers.into_iter().map(|p| (p.peer_id, p.addrs)).collect(),
                    )),
                    kad::QueryResult::GetClosestPeers(Err(
                        kad::GetClosestPeersError::Timeout { peers, .. },
                    )) => Some(Found::Peers(
                        peers.into_iter().map(|p| (p.peer_id, p.addrs)).collect(),
                    )),
                    _ => None,
                };
                let requests = stats.num_requests();
                for found in found.into_iter().chain(step.last.then_some(Found::Done)) {
                    let event = NetEvent::Lookup {
                        token,
                        found,
                        requests,
                    };
                    self.call(owner, |s, cx| s.on_network(cx, &event));
                }
            }
            kad::Event::InboundRequest { request } => match request {
                kad::InboundRequest::PutRecord {
                    source,
                    record: Some(record),
                    ..
                } => self.net_event(&NetEvent::InboundRecord { source, record }),
                kad::InboundRequest::AddProvider {
                    record: Some(record),
                } => {
                    let source = record.provider;
                    self.net_event(&NetEvent::InboundProvider { source, record });
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// A gossipsub event.
    pub(super) fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => self.net_event(&NetEvent::Gossip {
                id: message_id,
                source: propagation_source,
                data: message.data,
            }),
            gossipsub::Event::Subscribed { peer_id, .. } => {
                self.net_event(&NetEvent::Subscribed(peer_id));
            }
            _ => {}
        }
    }

    /// An mDNS event.
    pub(super) fn on_mdns(&mut self, event: mdns::Event) {
        if let mdns::Event::Discovered(found) = event {
            self.net_event(&NetEvent::Mdns(found));
        }
    }

    /// A dial failed (the services hear which peer's).
    pub(super) fn dial_error(&mut self, peer: Option<PeerId>, error: String) {
        self.net_event(&NetEvent::DialFailed(peer, error));
    }
}
