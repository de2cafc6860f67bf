//! The node actor: one task that owns the swarm, the inbound checks, the
//! end-to-end sessions, the rate limits, the counters and the database, and
//! answers the [`NodeHandle`](crate::NodeHandle)'s commands.
//!
//! CPU-heavy work leaves the actor: inbound signature checks run on tasks of
//! their own (results come back on `verified`), and so does signing of outbound
//! envelopes (results come back on `signed`).

mod transfers;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify};
use peer_core::chunk::{self, Manifest, Reassembler, TransferId};
use peer_core::inbound::{Acceptor, Refusal};
use peer_core::rate::Class;
use peer_core::session::Message;
use peer_core::{
    Draft, EntityId, Envelope, ErrorCode, Identity, MessageId, MsgType, Rejection, SessionId,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::Config;
use crate::net::codec::{self, Frame, Request, Response};
use crate::net::{self, Behaviour, BehaviourEvent};
use crate::node::{Delivered, Event, NodeError, PeerView, ReplyView, now_ms};
use crate::outbox::{Admit, Outbox};
use crate::ratelimit::Limits;
use crate::secure::{Opened, Released, SealedParts, Secure, Send};
use crate::stats::{Metrics, Stats, StatsView};
use crate::store::{PeerRecord, Store};
use crate::transfer::{Outgoing as OutgoingTransfer, Part};

/// Capacity of the channels from verification and signing tasks back to the
/// actor. The tasks themselves are bounded: verification by the open inbound
/// streams, signing by the outbox.
const TASK_QUEUE: usize = 1024;
/// Addresses remembered per connected peer.
const MAX_ADDRS_PER_PEER: usize = 8;
/// How often timers (reorder gaps, handshake deadlines) are applied.
const TICK: Duration = Duration::from_millis(100);

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What a handle asks of the actor.
#[derive(Debug)]
pub(crate) enum Command {
    Connect(Multiaddr, Reply<PeerView>),
    Send {
        to: EntityId,
        msg_type: MsgType,
        payload: Vec<u8>,
        reply: Reply<Delivered>,
    },
    Transfer {
        to: EntityId,
        manifest: Manifest,
        payload: Bytes,
        reply: Reply<Delivered>,
    },
    Peers(Reply<Vec<PeerView>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Stats(oneshot::Sender<StatsView>),
}

/// Who waits on a message's outcome.
#[derive(Debug)]
enum Waiter {
    /// The agent, for a message it sent.
    Agent {
        reply: Reply<Delivered>,
        /// An application message's type and plaintext, kept so that it can be
        /// sent again, once, in a new session if the peer no longer has ours
        /// (it restarted, or expired the session first).
        resend: Option<(MsgType, Vec<u8>)>,
    },
    /// An outgoing transfer, for one of its parts.
    Part {
        to: EntityId,
        id: TransferId,
        part: Part,
    },
    /// Nobody: a `chunk_resend` of ours, whose answer changes nothing.
    Nobody,
}

/// Why a request is sent, and who waits for its answer.
#[derive(Debug)]
enum Purpose {
    /// A message for the agent's `send`.
    Message {
        message_id: MessageId,
        waiter: Waiter,
        session: Option<SessionId>,
    },
    /// A handshake step; its reply carries the peer's next step.
    Handshake,
}

/// A signed envelope on its way out.
#[derive(Debug)]
struct Outgoing {
    to: EntityId,
    bytes: Vec<u8>,
    purpose: Purpose,
}

/// A request in flight.
struct Pending {
    peer: PeerId,
    to: EntityId,
    purpose: Purpose,
}

/// An inbound request after the stateless checks, back from a verification task.
struct Verified {
    peer: PeerId,
    result: Result<Envelope, Refusal>,
    channel: ResponseChannel<Response>,
}

struct Connected {
    entity: EntityId,
    connections: u32,
    addrs: Vec<Multiaddr>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    identity: Arc<Identity>,
    acceptor: Acceptor,
    secure: Secure<Waiter>,
    store: Store,
    stats: Stats,
    events: broadcast::Sender<Event>,
    config: Config,
    connected: HashMap<PeerId, Connected>,
    by_entity: HashMap<EntityId, PeerId>,
    dials: HashMap<ConnectionId, Reply<PeerView>>,
    sends: HashMap<OutboundRequestId, Pending>,
    outbox: Outbox<PeerId, Outgoing>,
    limits: Limits,
    /// Transfers this node sends, by receiver and transfer id.
    sending: HashMap<(EntityId, TransferId), OutgoingTransfer<Reply<Delivered>>>,
    /// Transfers in `sending` not started yet, per receiver, oldest first.
    queued_transfers: HashMap<EntityId, VecDeque<TransferId>>,
    /// Transfers this node receives.
    receiving: Reassembler<EntityId>,
    /// Bytes of message payloads handed to the event stream and not yet
    /// consumed by every reader: counted against `transfer.max_buffered_bytes`
    /// when a transfer is offered.
    undelivered: Arc<AtomicU64>,
    listen_addrs: Vec<Multiaddr>,
    verified_tx: mpsc::Sender<Verified>,
    signed_tx: mpsc::Sender<Outgoing>,
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

/// A draft carrying a sealed payload.
fn sealed_draft(to: EntityId, parts: SealedParts) -> Draft {
    let mut d = draft(Some(to), parts.msg_type, parts.ciphertext);
    d.session_id = Some(parts.session_id);
    d.sequence_num = parts.sequence_num;
    d
}

/// Decodes a reply envelope and checks that the recipient signed it.
fn check_reply(to: EntityId, bytes: &[u8]) -> Result<Envelope, NodeError> {
    Envelope::decode(bytes)
        .ok()
        .filter(|e| e.verify() && e.sender_id == to)
        .ok_or_else(|| {
            NodeError::Transport("the reply is not an envelope signed by the recipient".into())
        })
}

/// The rejection an `error` envelope carries.
fn rejection_of(env: &Envelope) -> Rejection {
    let payload: serde_json::Value = serde_json::from_slice(&env.payload).unwrap_or_default();
    let code = payload["error_code"]
        .as_str()
        .and_then(ErrorCode::from_wire);
    let reason = payload["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Rejection::new(code.unwrap_or(ErrorCode::InvalidState), reason)
}

/// Whether `msg_type` travels sealed in a session: application messages and
/// the chunked-transfer types that carry them.
fn is_sealed(msg_type: &MsgType) -> bool {
    msg_type.is_application() || chunk::is_chunk_msg_type(msg_type.as_str())
}

/// Whether a peer's answer says it no longer has the session a message was
/// sealed in.
fn lost_session(e: &NodeError) -> bool {
    matches!(e, NodeError::Rejected { code, .. }
        if code == ErrorCode::SessionNotFound.as_str()
            || code == ErrorCode::SessionExpired.as_str())
}

/// A refusal of the envelope `id`, without a retry-after.
fn refusal(id: MessageId, rejection: Rejection) -> (Refusal, Option<Duration>) {
    let refusal = Refusal {
        rejection,
        message_id: Some(id),
    };
    (refusal, None)
}

fn rejected(r: Rejection) -> NodeError {
    NodeError::Rejected {
        code: r.code.to_string(),
        reason: r.reason,
        retry_after_ms: None,
    }
}

/// Starts the actor task; returns its metrics.
pub(crate) fn spawn(
    swarm: Swarm<Behaviour>,
    config: Config,
    identity: Identity,
    store: Store,
    events: broadcast::Sender<Event>,
    commands: mpsc::Receiver<Command>,
) -> Metrics {
    let (verified_tx, verified_rx) = mpsc::channel(TASK_QUEUE);
    let (signed_tx, signed_rx) = mpsc::channel(TASK_QUEUE);
    let stats = Stats::new(config.protocol.max_stats_peers);
    let metrics = stats.metrics();
    let actor = Actor {
        swarm,
        acceptor: Acceptor::new(identity.entity_id(), config.inbound()),
        secure: Secure::new(config.security.clone(), identity.entity_id()),
        identity: Arc::new(identity),
        store,
        stats,
        events,
        connected: HashMap::new(),
        by_entity: HashMap::new(),
        dials: HashMap::new(),
        sends: HashMap::new(),
        outbox: Outbox::new(
            (config.network.max_concurrent_streams / 2).max(1),
            config.network.max_outbound_in_flight,
        ),
        limits: Limits::new(&config.rate_limits),
        sending: HashMap::new(),
        queued_transfers: HashMap::new(),
        receiving: Reassembler::new(config.transfer.reassembly()),
        undelivered: Arc::new(AtomicU64::new(0)),
        config,
        listen_addrs: Vec::new(),
        verified_tx,
        signed_tx,
    };
    tokio::spawn(actor.run(commands, verified_rx, signed_rx));
    metrics
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut verified: mpsc::Receiver<Verified>,
        mut signed: mpsc::Receiver<Outgoing>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                Some(v) = verified.recv() => self.on_verified(v),
                Some(out) = signed.recv() => self.enqueue(out),
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                _ = tick.tick() => self.handle_timeout(),
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
            Command::Send {
                to,
                msg_type,
                payload,
                reply,
            } => {
                let resend = msg_type
                    .is_application()
                    .then(|| (msg_type.clone(), payload.clone()));
                self.send(to, msg_type, payload, Waiter::Agent { reply, resend });
            }
            Command::Transfer {
                to,
                manifest,
                payload,
                reply,
            } => self.start_transfer(to, manifest, payload, reply),
            Command::Peers(reply) => _ = reply.send(self.peers()),
            Command::ListenAddrs(reply) => _ = reply.send(self.listen_addrs.clone()),
            Command::Stats(reply) => _ = reply.send(self.stats.view()),
        }
    }

    /// A message: sealed in the session with `to` if its type travels sealed
    /// (starting a handshake if needed), else signed as is.
    fn send(&mut self, to: EntityId, msg_type: MsgType, payload: Vec<u8>, waiter: Waiter) {
        if !self.by_entity.contains_key(&to) {
            self.fail(waiter, NodeError::NotConnected(to));
            return;
        }
        if !is_sealed(&msg_type) {
            self.sign_and_send(to, draft(Some(to), msg_type, payload), Some(waiter));
            return;
        }
        match self.secure.send(now_ms(), to, msg_type, payload, waiter) {
            Send::Sealed(parts, waiter) => self.send_sealed(to, parts, waiter),
            Send::Queued(init) => {
                if let Some(init) = init {
                    self.send_handshake(to, &init);
                }
            }
            Send::Refused(waiter, r) => self.fail(waiter, rejected(r)),
        }
    }

    /// Tells whoever waits on a message that it failed.
    fn fail(&mut self, waiter: Waiter, e: NodeError) {
        match waiter {
            Waiter::Agent { reply, .. } => _ = reply.send(Err(e)),
            Waiter::Part { to, id, part } => self.part_failed(to, id, part, e),
            Waiter::Nobody => {}
        }
    }

    fn fail_purpose(&mut self, purpose: Purpose, e: NodeError) {
        if let Purpose::Message { waiter, .. } = purpose {
            self.fail(waiter, e);
        }
    }

    fn send_handshake(&mut self, to: EntityId, msg: &Message) {
        let d = draft(
            Some(to),
            msg.msg_type().parse().expect("handshake types are valid"),
            msg.encode(),
        );
        self.sign_and_send(to, d, None);
    }

    /// Signs on a task of its own; the envelope comes back through `signed`.
    /// `waiter` is `None` for handshake steps.
    fn sign_and_send(&mut self, to: EntityId, d: Draft, waiter: Option<Waiter>) {
        let identity = self.identity.clone();
        let tx = self.signed_tx.clone();
        tokio::spawn(async move {
            let env = d.sign(&identity);
            let purpose = match waiter {
                Some(waiter) => Purpose::Message {
                    message_id: env.message_id,
                    waiter,
                    session: env.session_id,
                },
                None => Purpose::Handshake,
            };
            let out = Outgoing {
                to,
                bytes: env.encode(),
                purpose,
            };
            // Fails only when the node is stopping.
            _ = tx.send(out).await;
        });
    }

    /// A signed envelope: sent now, or queued behind the peer's open streams.
    fn enqueue(&mut self, out: Outgoing) {
        let Some(peer) = self.by_entity.get(&out.to).copied() else {
            let to = out.to;
            self.fail_purpose(out.purpose, NodeError::NotConnected(to));
            return;
        };
        match self.outbox.admit(peer, out) {
            Admit::Send(out) => self.dispatch_request(peer, out),
            Admit::Queued => {}
            Admit::Full(out) => {
                let e = NodeError::Busy(self.outbox.limit());
                self.fail_purpose(out.purpose, e);
            }
        }
    }

    fn dispatch_request(&mut self, peer: PeerId, out: Outgoing) {
        let id = self
            .swarm
            .behaviour_mut()
            .envelopes
            .send_request(&peer, Request::Envelope(Frame::outbound(out.bytes)));
        let pending = Pending {
            peer,
            to: out.to,
            purpose: out.purpose,
        };
        self.sends.insert(id, pending);
    }

    /// A request finished (answered or failed): lets the next waiting one go.
    fn request_done(&mut self, peer: PeerId) {
        if let Some(next) = self.outbox.finished(peer) {
            self.dispatch_request(peer, next);
        }
    }

    fn handle_timeout(&mut self) {
        let now = now_ms();
        let (opened, failed) = self.secure.handle_timeout(now);
        for (from, o) in opened {
            self.deliver(from, o);
        }
        for (waiter, r) in failed {
            self.fail(waiter, rejected(r));
        }
        self.transfer_timers(now);
    }

    fn peers(&self) -> Result<Vec<PeerView>, NodeError> {
        let now = now_ms();
        let mut out: Vec<PeerView> = self
            .store
            .peers()
            .map_err(|e| NodeError::Transport(e.to_string()))?
            .into_iter()
            .map(|p| PeerView {
                connected: self.by_entity.contains_key(&p.entity_id),
                session: self.secure.view(&p.entity_id, now),
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
                        self.fail_purpose(out.purpose, NodeError::NotConnected(c.entity));
                    }
                    self.peer_gone(c.entity);
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
                session: self.secure.view(&entity, record.last_seen_ms),
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
                    let e = NodeError::Transport(error.to_string());
                    if let Purpose::Handshake = p.purpose {
                        let r = Rejection::new(ErrorCode::InvalidState, e.to_string());
                        self.fail_waiting(p.to, &r);
                    }
                    self.fail_purpose(p.purpose, e);
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
            .and_then(|env| self.dispatch(env));
        let response = match outcome {
            Ok(response) => response,
            Err((refusal, retry_after)) => {
                tracing::debug!(%peer, rejection = %refusal.rejection, "rejected");
                // Refusing the losing side of simultaneous handshakes is how they
                // converge, not a fault of the peer: not counted.
                if refusal.rejection.code != ErrorCode::HandshakeInProgress {
                    self.stats.rejected(peer_entity, refusal.rejection.code);
                }
                Response::Refused(codec::Refusal {
                    error_code: refusal.rejection.code.as_str().to_owned(),
                    error_message: refusal.rejection.reason,
                    original_message_id: refusal.message_id.map(|id| id.to_string()),
                    retry_after_ms: retry_after
                        .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
                })
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
    /// A `chunk` takes none here: a transfer is counted once, by its manifest,
    /// and a chunk only if it is refused (see `transfers.rs`).
    fn within_rate(&mut self, env: Envelope) -> Result<Envelope, (Refusal, Option<Duration>)> {
        if env.msg_type.as_str() == chunk::MSG_CHUNK {
            return Ok(env);
        }
        self.charge(env.sender_id, Class::of(&env.msg_type), env.message_id)?;
        Ok(env)
    }

    /// Takes a token from `from`'s bucket for `class`; `RATE_LIMITED` for the
    /// envelope `id` if there is none.
    fn charge(
        &mut self,
        from: EntityId,
        class: Class,
        id: MessageId,
    ) -> Result<(), (Refusal, Option<Duration>)> {
        self.limits.check(from, class).map_err(|wait| {
            let reason = format!(
                "over the {class} rate limit; retry after {} ms",
                wait.as_millis()
            );
            let (refusal, _) = refusal(id, Rejection::new(ErrorCode::RateLimited, reason));
            (refusal, Some(wait))
        })
    }

    /// Handles an admitted envelope by its msg_type.
    fn dispatch(&mut self, env: Envelope) -> Result<Response, (Refusal, Option<Duration>)> {
        let id = env.message_id;
        let refuse = |r: Rejection| refusal(id, r);
        let now = now_ms();
        if env.msg_type == *MsgType::PING {
            let pong = draft(
                Some(env.sender_id),
                MsgType::PONG.parse().expect("valid"),
                env.payload,
            );
            return Ok(Response::Reply(pong.sign(&self.identity).encode()));
        }
        if Message::is_handshake(env.msg_type.as_str()) {
            let from = env.sender_id;
            let (next, released) = self
                .secure
                .handshake(now, &self.identity, &env)
                .map_err(refuse)?;
            self.send_released(from, released);
            return Ok(match next {
                Some(msg) => {
                    let d = draft(
                        Some(from),
                        msg.msg_type().parse().expect("valid"),
                        msg.encode(),
                    );
                    Response::Reply(d.sign(&self.identity).encode())
                }
                None => Response::Accepted,
            });
        }
        if !is_sealed(&env.msg_type) {
            return Err(refuse(Rejection::new(
                ErrorCode::UnsupportedMsgType,
                format!(
                    "this node has no handler for msg_type {:?}",
                    env.msg_type.as_str()
                ),
            )));
        }
        let from = env.sender_id;
        let is_chunk = env.msg_type.as_str() == chunk::MSG_CHUNK;
        if env.session_id.is_some() {
            let unsealed = match self.secure.open(now, env) {
                Ok(u) => u,
                Err(r) => return self.refuse_unopened(is_chunk, from, id, r),
            };
            let read = self.read(now, from, id, unsealed.msg_type, unsealed.plaintext);
            let (item, result) = match read {
                Ok(item) => (item, Ok(Response::Accepted)),
                Err(e) => (None, Err(e)),
            };
            // A refused message still fills its place in the order.
            for o in self.secure.release(now, from, unsealed.slot, item) {
                self.deliver(from, o);
            }
            return result;
        }
        if self.secure.require_encryption() {
            let r = Rejection::new(
                ErrorCode::EncryptionRequired,
                "this node accepts application messages only sealed in a session",
            );
            return self.refuse_unopened(is_chunk, from, id, r);
        }
        if let Some(o) = self.read(now, from, id, env.msg_type, env.payload)? {
            self.deliver(from, o);
        }
        Ok(Response::Accepted)
    }

    /// Refuses a sealed-type envelope that could not be opened. A chunk took no
    /// token on its way in (`within_rate`), so it takes one here.
    fn refuse_unopened(
        &mut self,
        is_chunk: bool,
        from: EntityId,
        id: MessageId,
        r: Rejection,
    ) -> Result<Response, (Refusal, Option<Duration>)> {
        if is_chunk {
            self.charge(from, Class::Chunk, id)?;
        }
        Err(refusal(id, r))
    }

    /// Reads a plaintext application or chunked-transfer payload: an
    /// application message to deliver, or a transfer's part (which delivers its
    /// message when it completes the transfer). A message's payload counts as
    /// undelivered from here (it may wait in the reorder buffer) until the
    /// agent has read it.
    fn read(
        &mut self,
        now: u64,
        from: EntityId,
        id: MessageId,
        msg_type: MsgType,
        plaintext: Vec<u8>,
    ) -> Result<Option<Opened>, (Refusal, Option<Duration>)> {
        let opened = match msg_type.as_str() {
            chunk::MSG_MANIFEST => self.on_manifest(now, from, id, &plaintext).map(|()| None)?,
            chunk::MSG_CHUNK => self.on_chunk(now, from, id, &plaintext)?,
            chunk::MSG_RESEND => self.on_resend(from, id, &plaintext).map(|()| None)?,
            _ => Some(Opened {
                message_id: id.to_string(),
                msg_type,
                payload: crate::secure::parse_json(plaintext).map_err(|r| refusal(id, r))?,
            }),
        };
        Ok(opened.map(|o| Opened {
            payload: o.payload.counted_in(&self.undelivered),
            ..o
        }))
    }

    /// Hands an application message to the agent.
    fn deliver(&mut self, from: EntityId, o: Opened) {
        self.stats.received(from);
        _ = self.events.send(Event::Message {
            message_id: o.message_id,
            from,
            msg_type: o.msg_type.to_string(),
            payload: o.payload,
        });
    }

    fn send_sealed(&mut self, to: EntityId, parts: SealedParts, waiter: Waiter) {
        self.sign_and_send(to, sealed_draft(to, parts), Some(waiter));
    }

    /// Sends the messages a new session released.
    fn send_released(&mut self, to: EntityId, released: Released<Waiter>) {
        for (parts, waiter) in released {
            self.send_sealed(to, parts, waiter);
        }
    }

    fn fail_waiting(&mut self, to: EntityId, r: &Rejection) {
        for (waiter, r) in self.secure.fail_waiting(to, r) {
            self.fail(waiter, rejected(r));
        }
    }

    fn on_response(&mut self, request_id: OutboundRequestId, response: Response) {
        let Some(p) = self.sends.remove(&request_id) else {
            return;
        };
        match p.purpose {
            Purpose::Message {
                message_id,
                waiter,
                session,
            } => {
                let result = match response {
                    Response::Accepted => Ok(Delivered {
                        message_id: message_id.to_string(),
                        reply: None,
                    }),
                    Response::Reply(bytes) => {
                        check_reply(p.to, &bytes).and_then(|env| Self::read_reply(env, message_id))
                    }
                    Response::Refused(r) => Err(NodeError::Rejected {
                        code: r.error_code,
                        reason: r.error_message,
                        retry_after_ms: r.retry_after_ms,
                    }),
                };
                let lost = result.as_ref().err().is_some_and(lost_session);
                if let (true, Some(id)) = (lost, session) {
                    // The peer no longer has our session: the next send starts a new one.
                    self.secure.forget(p.to, id);
                }
                self.answered(p.to, waiter, result, lost);
            }
            Purpose::Handshake => self.on_handshake_reply(p.to, response),
        }
        self.request_done(p.peer);
    }

    /// A message's answer reached us: tells whoever waits on it. An agent's
    /// message whose session the peer had lost is sent again, once, in a new
    /// session, without the agent noticing.
    fn answered(
        &mut self,
        to: EntityId,
        waiter: Waiter,
        result: Result<Delivered, NodeError>,
        lost: bool,
    ) {
        match waiter {
            Waiter::Agent {
                reply,
                resend: Some((msg_type, payload)),
            } if lost => self.send(
                to,
                msg_type,
                payload,
                Waiter::Agent {
                    reply,
                    resend: None,
                },
            ),
            Waiter::Agent { reply, .. } => {
                match &result {
                    Ok(_) => self.stats.sent(to),
                    Err(NodeError::Rejected { code, .. }) => self.stats.refused(to, code),
                    Err(_) => {}
                }
                _ = reply.send(result);
            }
            Waiter::Part { to, id, part } => match result {
                Ok(_) => self.part_accepted(to, id, part),
                Err(e) => self.part_failed(to, id, part, e),
            },
            Waiter::Nobody => {}
        }
    }

    /// The peer's answer to one of our handshake steps: its next step, or a refusal.
    fn on_handshake_reply(&mut self, to: EntityId, response: Response) {
        let env = match response {
            Response::Reply(bytes) => check_reply(to, &bytes),
            Response::Refused(r) => {
                let code = ErrorCode::from_wire(&r.error_code).unwrap_or(ErrorCode::InvalidState);
                return self.handshake_refused(to, &Rejection::new(code, r.error_message));
            }
            Response::Accepted => Err(NodeError::Transport(
                "handshake step answered without a reply".into(),
            )),
        };
        let env = match env {
            Ok(env) => env,
            Err(e) => {
                let r = Rejection::new(ErrorCode::InvalidState, e.to_string());
                return self.fail_waiting(to, &r);
            }
        };
        if env.msg_type == *MsgType::ERROR {
            return self.handshake_refused(to, &rejection_of(&env));
        }
        match self.secure.handshake(now_ms(), &self.identity, &env) {
            Ok((next, released)) => {
                if let Some(next) = next {
                    self.send_handshake(to, &next);
                }
                self.send_released(to, released);
            }
            Err(r) => self.fail_waiting(to, &r),
        }
    }

    /// The peer refused one of our handshake steps.
    fn handshake_refused(&mut self, to: EntityId, r: &Rejection) {
        for (waiter, r) in self.secure.handshake_refused(to, r) {
            self.fail(waiter, rejected(r));
        }
    }

    /// Reads an application message's reply (already checked by [`check_reply`]).
    fn read_reply(env: Envelope, message_id: MessageId) -> Result<Delivered, NodeError> {
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
