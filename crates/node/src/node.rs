//! The node actor and its handle.
//!
//! One task owns the swarm, the inbound [`Acceptor`], the counters and the
//! database. The rest of the program holds a cloneable [`NodeHandle`] that sends
//! it [`Command`]s over a bounded channel, each with a oneshot for the answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify};
use peer_core::inbound::{Acceptor, Refusal};
use peer_core::rate::Class;
use peer_core::{Draft, EntityId, Envelope, ErrorCode, Identity, MessageId, MsgType, Rejection};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::Config;
use crate::net::codec::{Frame, Request, Response};
use crate::net::{self, Behaviour, BehaviourEvent};
use crate::outbox::{Admit, Outbox};
use crate::ratelimit::Limits;
use crate::stats::{Metrics, Stats, StatsView};
use crate::store::{PeerRecord, Store};

/// Capacity of the command channel between handles and the actor.
const COMMAND_QUEUE: usize = 1024;
/// Capacity of the channel from verification tasks back to the actor. The tasks
/// themselves are bounded by the open inbound streams
/// (`max_concurrent_streams` per connection).
const VERIFIED_QUEUE: usize = 1024;
/// Addresses remembered per connected peer.
const MAX_ADDRS_PER_PEER: usize = 8;

/// Something the node tells its agent, on `/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// An application message arrived and was verified.
    Message {
        /// The message's id.
        message_id: String,
        /// The sender's entity id.
        from: EntityId,
        /// Its type.
        msg_type: String,
        /// Its JSON payload.
        payload: serde_json::Value,
    },
    /// A peer connected.
    PeerConnected {
        /// Its entity id.
        entity_id: EntityId,
    },
    /// A peer's last connection closed.
    PeerDisconnected {
        /// Its entity id.
        entity_id: EntityId,
    },
}

/// A peer as listed by `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// Its entity id.
    pub entity_id: EntityId,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Addresses it was seen at.
    pub addrs: Vec<String>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Last time it was connected, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

/// A reply envelope's content, as returned to the sender's agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyView {
    /// Reply type (e.g. `pong`).
    pub msg_type: String,
    /// Reply payload.
    pub payload: serde_json::Value,
}

/// A message the recipient accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivered {
    /// The id of the message sent.
    pub message_id: String,
    /// The recipient's reply, for messages that have one (`ping` → `pong`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyView>,
}

/// Why a node operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The recipient refused the message with a protocol error code.
    #[error("recipient rejected the message ({code}): {reason}")]
    Rejected {
        /// The wire code (kept as text: the peer may know codes we do not).
        code: String,
        /// The peer's reason.
        reason: String,
        /// For `RATE_LIMITED`: how long to wait before sending again.
        retry_after_ms: Option<u64>,
    },
    /// No open connection to the entity.
    #[error("not connected to {0}; connect to one of its addresses first (POST /v1/peers)")]
    NotConnected(EntityId),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A dial failed.
    #[error("could not connect: {0}")]
    Dial(String),
    /// The peer did not answer in time, or the connection broke.
    #[error("delivery failed: {0}")]
    Transport(String),
    /// Too many requests are in flight; retry later.
    #[error("too many messages in flight ({0}); retry later")]
    Busy(usize),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// What the handle asks of the actor.
#[derive(Debug)]
enum Command {
    Connect(Multiaddr, oneshot::Sender<Result<PeerView, NodeError>>),
    Send(Outgoing),
    Peers(oneshot::Sender<Result<Vec<PeerView>, NodeError>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Stats(oneshot::Sender<StatsView>),
}

/// A cheap, cloneable handle on a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    identity: Arc<Identity>,
    max_envelope_size: usize,
    entity_id: EntityId,
    peer_id: PeerId,
    events: broadcast::Sender<Event>,
    metrics: Metrics,
}

impl NodeHandle {
    /// This node's entity id.
    pub fn entity_id(&self) -> EntityId {
        self.entity_id
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A stream of events from now on. A reader that falls more than
    /// `api.event_buffer` events behind misses the oldest (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Dials `addr` and answers once connected, with the peer.
    pub async fn connect(&self, addr: Multiaddr) -> Result<PeerView, NodeError> {
        self.ask(|tx| Command::Connect(addr, tx)).await?
    }

    /// Signs and sends a message; answers once the recipient accepted or refused it.
    /// Signing happens on the caller's task, so many senders sign in parallel.
    pub async fn send(
        &self,
        to: EntityId,
        msg_type: MsgType,
        payload: Vec<u8>,
    ) -> Result<Delivered, NodeError> {
        let envelope = draft(Some(to), msg_type, payload).sign(&self.identity);
        if envelope.encoded_len() > self.max_envelope_size {
            return Err(NodeError::Invalid(format!(
                "message is {} bytes encoded; the limit is {} (protocol.max_envelope_size)",
                envelope.encoded_len(),
                self.max_envelope_size
            )));
        }
        let (message_id, bytes) = (envelope.message_id, envelope.encode());
        self.ask(|reply| {
            Command::Send(Outgoing {
                to,
                message_id,
                bytes,
                reply,
            })
        })
        .await?
    }

    /// Connected and remembered peers.
    pub async fn peers(&self) -> Result<Vec<PeerView>, NodeError> {
        self.ask(Command::Peers).await?
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Message counters per peer.
    pub async fn stats(&self) -> Result<StatsView, NodeError> {
        self.ask(Command::Stats).await
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the node: {0}")]
pub struct StartError(String);

struct Connected {
    entity: EntityId,
    connections: u32,
    addrs: Vec<Multiaddr>,
}

/// A signed message on its way out.
#[derive(Debug)]
struct Outgoing {
    to: EntityId,
    message_id: MessageId,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Result<Delivered, NodeError>>,
}

/// A message whose request is in flight.
struct PendingSend {
    peer: PeerId,
    to: EntityId,
    message_id: MessageId,
    reply: oneshot::Sender<Result<Delivered, NodeError>>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    identity: Arc<Identity>,
    acceptor: Acceptor,
    store: Store,
    stats: Stats,
    events: broadcast::Sender<Event>,
    config: Config,
    connected: HashMap<PeerId, Connected>,
    by_entity: HashMap<EntityId, PeerId>,
    dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerView, NodeError>>>,
    sends: HashMap<OutboundRequestId, PendingSend>,
    outbox: Outbox<PeerId, Outgoing>,
    limits: Limits,
    listen_addrs: Vec<Multiaddr>,
    verified_tx: mpsc::Sender<Verified>,
}

/// An inbound request after the stateless checks, back from a verification task.
struct Verified {
    peer: PeerId,
    result: Result<Envelope, Refusal>,
    channel: ResponseChannel<Response>,
}

/// A fresh draft to `to`, stamped now, with a random id and nonce.
fn draft(to: Option<EntityId>, msg_type: MsgType, payload: Vec<u8>) -> Draft {
    Draft {
        msg_type,
        message_id: MessageId::from_random(rand::random()),
        recipient_id: to,
        session_id: None,
        sequence_num: 0,
        timestamp_ms: now_ms(),
        nonce: rand::random(),
        payload,
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Starts the node actor on the current tokio runtime: listens, dials the
/// bootstrap peers, and serves commands until every handle is dropped.
pub fn start(config: Config, identity: Identity, store: Store) -> Result<NodeHandle, StartError> {
    let key = net::keypair(identity.secret_bytes());
    let peer_id = key.public().to_peer_id();
    let mut swarm = net::build_swarm(key, &config).map_err(|e| StartError(e.to_string()))?;
    for addr in &config.network.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?;
    }
    for addr in &config.network.bootstrap {
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (verified_tx, verified_rx) = mpsc::channel(VERIFIED_QUEUE);
    let (events, _) = broadcast::channel(config.api.event_buffer.max(1));
    let stats = Stats::new(config.protocol.max_stats_peers);
    let identity = Arc::new(identity);
    let handle = NodeHandle {
        tx,
        identity: identity.clone(),
        max_envelope_size: config.protocol.max_envelope_size,
        entity_id: identity.entity_id(),
        peer_id,
        events: events.clone(),
        metrics: stats.metrics(),
    };
    let outbox = Outbox::new(
        config.network.max_concurrent_streams,
        config.network.max_outbound_in_flight,
    );
    let limits = Limits::new(&config.rate_limits);
    let actor = Actor {
        swarm,
        acceptor: Acceptor::new(identity.entity_id(), config.inbound()),
        identity,
        store,
        stats,
        events,
        config,
        connected: HashMap::new(),
        by_entity: HashMap::new(),
        dials: HashMap::new(),
        sends: HashMap::new(),
        outbox,
        limits,
        listen_addrs: Vec::new(),
        verified_tx,
    };
    tokio::spawn(actor.run(rx, verified_rx));
    Ok(handle)
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut verified: mpsc::Receiver<Verified>,
    ) {
        loop {
            tokio::select! {
                biased;
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                Some(v) = verified.recv() => self.on_verified(v),
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
            }
        }
        tracing::info!("node stopped");
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect(addr, reply) => {
                let opts = DialOpts::unknown_peer_id().address(addr).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, reply);
                    }
                    Err(e) => _ = reply.send(Err(NodeError::Dial(e.to_string()))),
                }
            }
            Command::Send(out) => self.send(out),
            Command::Peers(reply) => _ = reply.send(self.peers()),
            Command::ListenAddrs(reply) => _ = reply.send(self.listen_addrs.clone()),
            Command::Stats(reply) => _ = reply.send(self.stats.view()),
        }
    }

    fn send(&mut self, out: Outgoing) {
        let Some(peer) = self.by_entity.get(&out.to).copied() else {
            _ = out.reply.send(Err(NodeError::NotConnected(out.to)));
            return;
        };
        match self.outbox.admit(peer, out) {
            Admit::Send(out) => self.dispatch_request(peer, out),
            Admit::Queued => {}
            Admit::Full(out) => _ = out.reply.send(Err(NodeError::Busy(self.outbox.limit()))),
        }
    }

    fn dispatch_request(&mut self, peer: PeerId, out: Outgoing) {
        let id = self
            .swarm
            .behaviour_mut()
            .envelopes
            .send_request(&peer, Request::Envelope(Frame::outbound(out.bytes)));
        let pending = PendingSend {
            peer,
            to: out.to,
            message_id: out.message_id,
            reply: out.reply,
        };
        self.sends.insert(id, pending);
    }

    /// A request finished (answered or failed): lets the next waiting one go.
    fn request_done(&mut self, peer: PeerId) {
        if let Some(next) = self.outbox.finished(peer) {
            self.dispatch_request(peer, next);
        }
    }

    fn peers(&self) -> Result<Vec<PeerView>, NodeError> {
        let mut out: Vec<PeerView> = self
            .store
            .peers()
            .map_err(|e| NodeError::Transport(e.to_string()))?
            .into_iter()
            .map(|p| PeerView {
                connected: self.by_entity.contains_key(&p.entity_id),
                entity_id: p.entity_id,
                peer_id: p.peer_id,
                addrs: p.addrs,
                last_seen_ms: p.last_seen_ms,
            })
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.last_seen_ms));
        Ok(out)
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0
                    && let Some(c) = self.connected.remove(&peer_id)
                {
                    self.by_entity.remove(&c.entity);
                    self.stats.set_connected(self.connected.len());
                    for out in self.outbox.drain_waiting(peer_id) {
                        _ = out.reply.send(Err(NodeError::NotConnected(c.entity)));
                    }
                    _ = self.events.send(Event::PeerDisconnected {
                        entity_id: c.entity,
                    });
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(reply) = self.dials.remove(&connection_id) {
                    _ = reply.send(Err(NodeError::Dial(error.to_string())));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Envelopes(e)) => self.on_envelopes(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if let Some(c) = self.connected.get_mut(&peer_id) {
                    for a in info.listen_addrs {
                        if c.addrs.len() < MAX_ADDRS_PER_PEER && !c.addrs.contains(&a) {
                            c.addrs.push(a);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let Some(entity) = net::entity_of(&peer_id) else {
            // Only Ed25519 peers have an entity id; nobody else speaks this protocol.
            tracing::warn!(%peer_id, "peer without an Ed25519 key; disconnecting");
            _ = self.swarm.disconnect_peer_id(peer_id);
            if let Some(reply) = self.dials.remove(&connection_id) {
                _ = reply.send(Err(NodeError::Dial(format!(
                    "{peer_id} does not use an Ed25519 key"
                ))));
            }
            return;
        };
        let addr = endpoint.get_remote_address().clone();
        let first = !self.connected.contains_key(&peer_id);
        let c = self.connected.entry(peer_id).or_insert_with(|| Connected {
            entity,
            connections: 0,
            addrs: Vec::new(),
        });
        c.connections += 1;
        if endpoint.is_dialer() && !c.addrs.contains(&addr) && c.addrs.len() < MAX_ADDRS_PER_PEER {
            c.addrs.push(addr);
        }
        let addrs: Vec<String> = c.addrs.iter().map(ToString::to_string).collect();
        self.by_entity.insert(entity, peer_id);
        self.stats.set_connected(self.connected.len());
        let record = PeerRecord {
            entity_id: entity,
            peer_id: peer_id.to_string(),
            addrs,
            last_seen_ms: now_ms(),
        };
        if let Err(e) = self
            .store
            .upsert_peer(&record, self.config.network.max_known_peers)
        {
            tracing::error!(error = %e, "cannot record peer");
        }
        if first {
            _ = self.events.send(Event::PeerConnected { entity_id: entity });
        }
        if let Some(reply) = self.dials.remove(&connection_id) {
            _ = reply.send(Ok(PeerView {
                entity_id: entity,
                peer_id: record.peer_id,
                addrs: record.addrs,
                connected: true,
                last_seen_ms: record.last_seen_ms,
            }));
        }
    }

    fn on_envelopes(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_response(request_id, response),
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(p) = self.sends.remove(&request_id) {
                    _ = p.reply.send(Err(NodeError::Transport(error.to_string())));
                    self.request_done(p.peer);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Starts the stateless checks (signature verification is most of the CPU
    /// work) on a task of their own, so they run in parallel on every core; the
    /// result comes back to [`Actor::on_verified`].
    fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        let verifier = self.acceptor.verifier();
        let tx = self.verified_tx.clone();
        tokio::spawn(async move {
            let result = match request {
                Request::Oversize(len) => Err(verifier.too_large(len)),
                Request::Envelope(frame) => verifier.verify(now_ms(), &frame.bytes),
            };
            // Fails only when the node is stopping.
            _ = tx
                .send(Verified {
                    peer,
                    result,
                    channel,
                })
                .await;
        });
    }

    fn on_verified(
        &mut self,
        Verified {
            peer,
            result,
            channel,
        }: Verified,
    ) {
        let peer_entity = net::entity_of(&peer);
        let outcome = result
            .and_then(|env| self.acceptor.admit(now_ms(), env))
            .map_err(|r| (r, None))
            .and_then(|env| self.within_rate(env))
            .and_then(|env| self.dispatch(env).map_err(|r| (r, None)));
        let response = match outcome {
            Ok(response) => response,
            Err((refusal, retry_after)) => {
                tracing::debug!(%peer, rejection = %refusal.rejection, "rejected");
                self.stats.rejected(peer_entity, refusal.rejection.code);
                Response::Reply(self.error_envelope(peer_entity, refusal, retry_after))
            }
        };
        // The channel is closed if the peer gave up; nothing to do then.
        _ = self
            .swarm
            .behaviour_mut()
            .envelopes
            .send_response(channel, response);
    }

    /// Takes a token from the sender's bucket for the message's class. Runs after
    /// the signature and nonce checks, so only the sender can spend its budget.
    fn within_rate(&mut self, env: Envelope) -> Result<Envelope, (Refusal, Option<Duration>)> {
        let class = Class::of(&env.msg_type);
        match self.limits.check(env.sender_id, class) {
            Ok(()) => Ok(env),
            Err(wait) => {
                let reason = format!(
                    "over the {class} rate limit; retry after {} ms",
                    wait.as_millis()
                );
                let refusal = Refusal {
                    rejection: Rejection::new(ErrorCode::RateLimited, reason),
                    message_id: Some(env.message_id),
                };
                Err((refusal, Some(wait)))
            }
        }
    }

    /// Handles a verified envelope by its msg_type.
    fn dispatch(&mut self, env: Envelope) -> Result<Response, Refusal> {
        let refuse = |code, reason: String| Refusal {
            rejection: Rejection::new(code, reason),
            message_id: Some(env.message_id),
        };
        if env.msg_type == *MsgType::PING {
            let pong = draft(
                Some(env.sender_id),
                MsgType::PONG.parse().expect("valid"),
                env.payload,
            );
            return Ok(Response::Reply(pong.sign(&self.identity).encode()));
        }
        if !env.msg_type.is_application() {
            return Err(refuse(
                ErrorCode::UnsupportedMsgType,
                format!(
                    "this node has no handler for msg_type {:?}",
                    env.msg_type.as_str()
                ),
            ));
        }
        let payload: serde_json::Value = serde_json::from_slice(&env.payload).map_err(|e| {
            refuse(
                ErrorCode::MalformedMessage,
                format!("payload is not JSON: {e}"),
            )
        })?;
        self.stats.received(env.sender_id);
        _ = self.events.send(Event::Message {
            message_id: env.message_id.to_string(),
            from: env.sender_id,
            msg_type: env.msg_type.to_string(),
            payload,
        });
        Ok(Response::Accepted)
    }

    fn error_envelope(
        &self,
        to: Option<EntityId>,
        refusal: Refusal,
        retry_after: Option<Duration>,
    ) -> Vec<u8> {
        let mut payload = serde_json::json!({
            "error_code": refusal.rejection.code.as_str(),
            "error_message": refusal.rejection.reason,
        });
        if let Some(id) = refusal.message_id {
            payload["original_message_id"] = id.to_string().into();
        }
        if let Some(wait) = retry_after {
            payload["retry_after_ms"] = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into();
        }
        draft(
            to,
            MsgType::ERROR.parse().expect("valid"),
            payload.to_string().into_bytes(),
        )
        .sign(&self.identity)
        .encode()
    }

    fn on_response(&mut self, request_id: OutboundRequestId, response: Response) {
        let Some(p) = self.sends.remove(&request_id) else {
            return;
        };
        let result = match response {
            Response::Accepted => Ok(Delivered {
                message_id: p.message_id.to_string(),
                reply: None,
            }),
            Response::Reply(bytes) => self.read_reply(p.to, p.message_id, &bytes),
        };
        match &result {
            Ok(_) => self.stats.sent(p.to),
            Err(NodeError::Rejected { code, .. }) => self.stats.refused(p.to, code),
            Err(_) => {}
        }
        _ = p.reply.send(result);
        self.request_done(p.peer);
    }

    /// Checks a reply envelope (it must be signed by the recipient) and reads it.
    fn read_reply(
        &self,
        to: EntityId,
        message_id: MessageId,
        bytes: &[u8],
    ) -> Result<Delivered, NodeError> {
        let env = Envelope::decode(bytes)
            .ok()
            .filter(|e| e.verify() && e.sender_id == to)
            .ok_or_else(|| {
                NodeError::Transport("the reply is not an envelope signed by the recipient".into())
            })?;
        let payload: serde_json::Value =
            serde_json::from_slice(&env.payload).unwrap_or(serde_json::Value::Null);
        if env.msg_type == *MsgType::ERROR {
            let text = |k: &str| {
                payload
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            return Err(NodeError::Rejected {
                code: text("error_code"),
                reason: text("error_message"),
                retry_after_ms: payload.get("retry_after_ms").and_then(|v| v.as_u64()),
            });
        }
        Ok(Delivered {
            message_id: message_id.to_string(),
            reply: Some(ReplyView {
                msg_type: env.msg_type.to_string(),
                payload,
            }),
        })
    }
}
