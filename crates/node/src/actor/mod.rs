//! The node actor: one task that owns the swarm and the state every service
//! shares (sessions, rate limits, counters), runs the loop, and carries
//! envelopes between the network and the services (see [`crate::service`]).
//!
//! - `pipeline`: an inbound request from its stream to its service and back:
//!   verify (on a task of its own), bind to the connection, admit, route, rate,
//!   open, hand to the service, answer.
//! - `outbound`: a service's send from admission to its outcome: admit (count
//!   and bytes), seal, sign (on a task of its own), queue per peer, send.
//! - `connections`: connections, dials, and peer sightings for the database
//!   writer (which the actor never waits for).
//!
//! The loop sleeps until the earliest deadline any service, the sessions or a
//! dial asks for, on the monotonic clock.

mod batches;
mod connections;
mod network;
mod outbound;
mod pipeline;

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify};
use peer_core::inbound::Acceptor;
use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, Identity, Rejection};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::clock::{Clock, Monotonic};
use crate::config::Config;
use crate::inbox::{Committed, Delivery, Inbox};
use crate::net::{Behaviour, BehaviourEvent, link};
use crate::network::NetEvent;
use crate::node::{Event, Live, NodeError, PeerView};
use crate::ratelimit::Limits;
use crate::secure::Secure;
use crate::service::{
    Context, Effects, Erased, Outcome, PeerEvent, Refused, Routes, ServiceId, TransferRequest,
};
use crate::stats::{Metrics, Stats, StatsView};
use crate::store::Writer;

pub(crate) use outbound::Queued;

use connections::Connections;
use network::Network;
use outbound::Outbound;
use pipeline::Pipeline;

/// Capacity of the channels from verification and signing tasks back to the
/// actor. The tasks themselves are bounded: verification by the open inbound
/// streams, signing by the outbound admission and the inbound streams.
const TASK_QUEUE: usize = 1024;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What a handle asks of the actor.
pub(crate) enum Command {
    Connect(Multiaddr, Reply<PeerView>),
    /// The live part of the peer list, with the sessions of these peers.
    Live(Vec<EntityId>, oneshot::Sender<Live>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Stats(oneshot::Sender<StatsView>),
    /// A command for one service.
    Service(ServiceId, Box<dyn Any + Send>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(addr, _) => write!(f, "Connect({addr})"),
            Self::Live(ids, _) => write!(f, "Live({} peers)", ids.len()),
            Self::ListenAddrs(_) => f.write_str("ListenAddrs"),
            Self::Stats(_) => f.write_str("Stats"),
            Self::Service(id, _) => write!(f, "Service({id:?})"),
        }
    }
}

/// The state services share, reached through their [`Context`].
pub(crate) struct Shared {
    pub identity: Arc<Identity>,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub sessions: Secure<Queued>,
    pub limits: Limits,
    pub stats: Stats,
    pub events: broadcast::Sender<Event>,
    /// The durable inbox.
    pub inbox: Inbox,
    /// Bytes of delivered message payloads not yet read by every event reader.
    pub unread: Arc<AtomicU64>,
    /// Connected peers.
    pub by_entity: HashMap<EntityId, PeerId>,
}

impl Shared {
    /// Hands an event to the agent: a durable one to the inbox writer (which
    /// publishes it once stored, then releases its sender's answer), any
    /// other to the live readers. A message counts as received from its sender.
    pub fn deliver(&mut self, delivery: Delivery) {
        let Delivery { event, room, ack } = delivery;
        if let Event::Message { from, .. } = &event {
            self.stats.received(*from);
        }
        match room {
            Some(room) => self.inbox.append(event, room, ack),
            None => _ = self.events.send(event),
        }
    }

    /// Takes a token of `class` from `peer`'s bucket; `RATE_LIMITED` with the
    /// wait if there is none.
    pub fn charge(&mut self, peer: EntityId, class: Class) -> Result<(), Refused> {
        self.limits.check(peer, class).map_err(|wait| Refused {
            rejection: Rejection::new(
                ErrorCode::RateLimited,
                format!(
                    "over the {class} rate limit; retry after {} ms",
                    wait.as_millis()
                ),
            ),
            retry_after: Some(wait),
        })
    }
}

/// What the node starts with.
pub(crate) struct Parts {
    pub swarm: Swarm<Behaviour>,
    /// The root codec of inbound envelopes, for the long-lived streams.
    pub inbound: crate::net::codec::Codec,
    pub config: Arc<Config>,
    pub identity: Identity,
    pub writer: Writer,
    pub clock: Arc<dyn Clock>,
    pub events: broadcast::Sender<Event>,
    pub inbox: Inbox,
    /// Batches the inbox writer has committed (or failed to).
    pub committed: mpsc::Receiver<Committed>,
    pub services: Vec<Box<dyn Erased>>,
    pub routes: Routes,
    pub metrics: Metrics,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    shared: Shared,
    services: Vec<Box<dyn Erased>>,
    routes: Routes,
    effects: Effects,
    /// Outcomes to hand to their services: (service, request, outcome).
    replies: std::collections::VecDeque<(ServiceId, crate::service::RequestId, Outcome)>,
    next_request: u64,
    mono: Monotonic,
    pipeline: Pipeline,
    outbound: Outbound,
    connections: Connections,
    /// Lookups in progress and messages waiting for a connection.
    network: Network,
    writer: Writer,
    listen_addrs: Vec<Multiaddr>,
}

/// Starts the actor task.
pub(crate) fn spawn(parts: Parts, commands: mpsc::Receiver<Command>) {
    let (verified_tx, verified_rx) = mpsc::channel(TASK_QUEUE);
    let (signed_tx, signed_rx) = mpsc::channel(TASK_QUEUE);
    let (link_tx, link_rx) = mpsc::channel(TASK_QUEUE);
    let Parts {
        swarm,
        inbound,
        config,
        identity,
        writer,
        clock,
        events,
        inbox,
        committed,
        services,
        routes,
        metrics,
    } = parts;
    let identity = Arc::new(identity);
    let mono = Monotonic::new(clock.now());
    let links = link::Links::start(
        swarm.behaviour().streams.new_control(),
        inbound,
        link::Settings {
            timeout: config.connection_timeout(),
            idle: std::time::Duration::from_secs(config.network.max_idle_secs),
            max_size: config.protocol.max_envelope_size,
            max_unanswered: config.network.max_concurrent_streams,
            max_inbound_per_peer: config.network.max_connections_per_peer as usize,
        },
        link_tx,
        swarm.behaviour().pool.counters().streams_opened(),
    );
    let acceptor = Acceptor::started_at(identity.entity_id(), config.inbound(), clock.wall_ms());
    let actor = Actor {
        pipeline: Pipeline::new(
            acceptor,
            verified_tx,
            clock.clone(),
            config.network.max_verifying_per_peer,
        ),
        outbound: Outbound::new(&config, identity.clone(), signed_tx, metrics.clone(), links),
        connections: Connections::new(config.network.max_pending_dials),
        network: Network::new(&config),
        shared: Shared {
            sessions: Secure::new(config.security.clone(), identity.entity_id()),
            limits: Limits::new(&config.rate_limits),
            stats: Stats::new(config.protocol.max_stats_peers, metrics),
            events,
            inbox,
            unread: Arc::new(AtomicU64::new(0)),
            by_entity: HashMap::new(),
            identity,
            config,
            clock,
        },
        swarm,
        services,
        routes,
        effects: Effects::default(),
        replies: Default::default(),
        next_request: 0,
        mono,
        writer,
        listen_addrs: Vec::new(),
    };
    tokio::spawn(actor.run(commands, verified_rx, signed_rx, link_rx, committed));
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut verified: mpsc::Receiver<pipeline::Verified>,
        mut signed: mpsc::Receiver<outbound::Signed>,
        mut links: mpsc::Receiver<link::Event>,
        mut committed: mpsc::Receiver<Committed>,
    ) {
        let sleep = tokio::time::sleep(std::time::Duration::ZERO);
        tokio::pin!(sleep);
        let mut armed: Option<u64> = None;
        loop {
            let deadline = self.next_deadline();
            if deadline != armed {
                if let Some(at) = deadline {
                    sleep
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(self.mono.instant(at)));
                }
                armed = deadline;
            }
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                Some(v) = verified.recv() => self.on_verified(v),
                Some(s) = signed.recv() => self.on_signed(s),
                Some(e) = links.recv() => self.on_link(e),
                Some(c) = committed.recv() => self.on_committed(c),
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                () = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.handle_timeout();
                }
            }
            self.settle();
            let shared = &self.shared;
            shared
                .stats
                .set_tables(shared.sessions.len(), shared.limits.tracked());
        }
        tracing::info!("node stopped");
    }

    /// Monotonic ms now.
    fn now_ms(&self) -> u64 {
        self.mono.ms(self.shared.clock.now())
    }

    /// The earliest deadline of every service, the sessions and the dials.
    fn next_deadline(&self) -> Option<u64> {
        self.services
            .iter()
            .filter_map(|s| s.poll_timeout())
            .chain(self.shared.sessions.poll_timeout())
            .chain(self.connections.poll_timeout())
            .chain(self.network.poll_timeout())
            .chain(self.outbound.poll_timeout())
            .min()
    }

    fn handle_timeout(&mut self) {
        let now = self.now_ms();
        if self
            .shared
            .sessions
            .poll_timeout()
            .is_some_and(|t| t <= now)
        {
            let (events, failed) = self.shared.sessions.handle_timeout(now);
            for e in events {
                self.deliver_now(e);
            }
            for (q, r) in failed {
                self.outbound_failed(q, NodeError::rejected(r));
            }
        }
        for i in 0..self.services.len() {
            if self.services[i].poll_timeout().is_some_and(|t| t <= now) {
                self.call(ServiceId(i), |s, cx| s.on_timeout(cx));
            }
        }
        self.dial_timeouts(now);
        self.parked_timeouts(now);
        self.retries_due(now);
    }

    /// An event released from a reorder buffer goes to the agent.
    fn deliver_now(&mut self, delivery: Delivery) {
        self.shared.deliver(delivery);
    }

    /// Runs `f` on service `id` with a context; what it asks for is queued in
    /// `effects` and run by [`Actor::settle`].
    fn call<R>(
        &mut self,
        id: ServiceId,
        f: impl FnOnce(&mut dyn Erased, &mut Context<'_>) -> R,
    ) -> R {
        let now_ms = self.now_ms();
        let service = &mut self.services[id.0];
        let mut cx = Context {
            me: id,
            now_ms,
            shared: &mut self.shared,
            routes: &self.routes,
            effects: &mut self.effects,
            next_request: &mut self.next_request,
        };
        f(service.as_mut(), &mut cx)
    }

    /// Runs what services asked for, and hands outcomes back to them, until
    /// nothing is left (an outcome may make its service send again).
    fn settle(&mut self) {
        loop {
            if let Some(send) = self.effects.sends.pop_front() {
                self.send(send);
            } else if !self.effects.released.is_empty() {
                for (to, released) in std::mem::take(&mut self.effects.released) {
                    for (parts, q) in released {
                        self.sign_sealed(to, parts, q);
                    }
                }
            } else if !self.effects.failed.is_empty() {
                for (q, e) in std::mem::take(&mut self.effects.failed) {
                    self.outbound_failed(q, e);
                }
            } else if let Some((owner, op)) = self.effects.network.pop_front() {
                self.apply(owner, op);
            } else if let Some(t) = self.effects.transfers.pop_front() {
                self.transfer_for(t);
            } else if !self.effects.outcomes.is_empty() {
                self.replies
                    .extend(std::mem::take(&mut self.effects.outcomes));
            } else if let Some((owner, id, outcome)) = self.replies.pop_front() {
                self.call(owner, |s, cx| s.on_reply(cx, id, outcome));
            } else {
                break;
            }
        }
    }

    /// A service's message too large for one envelope: the transfer service
    /// (the owner of `chunk_manifest`) runs it as a chunked transfer on the
    /// service's behalf, and hands the outcome back to its request.
    fn transfer_for(&mut self, t: TransferRequest) {
        let Some(transfer) = self.routes.owner(peer_core::chunk::MSG_MANIFEST) else {
            let outcome = Outcome {
                message_id: peer_core::MessageId::from_random(rand::random()),
                to: t.to,
                result: Err(NodeError::Invalid(
                    "this node runs no transfer service".into(),
                )),
            };
            self.replies.push_back((t.owner, t.id, outcome));
            return;
        };
        let command: Box<dyn Any + Send> = Box::new(crate::services::transfer::Command::SendFor(t));
        self.call(transfer, |s, cx| s.on_command(cx, command));
    }

    /// Tells every service that a peer connected or disconnected.
    fn peer_event(&mut self, event: PeerEvent) {
        for i in 0..self.services.len() {
            self.call(ServiceId(i), |s, cx| s.on_peer_event(cx, event));
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect(addr, reply) => self.dial(addr, reply),
            Command::Live(ids, reply) => _ = reply.send(self.live(ids)),
            Command::ListenAddrs(reply) => _ = reply.send(self.listen_addrs.clone()),
            Command::Stats(reply) => {
                let mut view = self.shared.stats.view();
                view.pool = self.swarm.behaviour_mut().pool.view();
                _ = reply.send(view);
            }
            Command::Service(id, command) => {
                if id.0 < self.services.len() {
                    self.call(id, |s, cx| s.on_command(cx, command));
                }
            }
        }
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.net_event(&NetEvent::ListenAddrs(self.listen_addrs.clone()));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.net_event(&NetEvent::ListenAddrs(self.listen_addrs.clone()));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.on_closed(peer_id, connection_id, num_established),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                self.dial_error(peer_id, error.to_string());
                self.dial_failed(connection_id, NodeError::Dial(error.to_string()));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Envelopes(e)) => self.on_envelopes(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                connection_id,
                peer_id,
                info,
            })) => self.on_identified(peer_id, connection_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(e)) => self.on_mdns(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => {
                if let Some(dead) = self.swarm.behaviour_mut().pool.validated(&e) {
                    tracing::debug!(peer = %e.peer, "keep-alive ping failed: connection closed");
                    self.swarm.close_connection(dead);
                }
            }
            _ => {}
        }
    }
}
