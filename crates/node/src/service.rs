//! Services: how a capability plugs into the node.
//!
//! A service is one module with its own state: the message types it owns (its
//! [`Route`]s), the commands it takes from handles, its timers and the replies
//! to the requests it sends. It never holds the actor or the swarm: it acts
//! through a [`Context`], which sends envelopes, emits events, charges rate
//! classes and reads the clocks, and which the actor turns into I/O once the
//! service has returned. rust-libp2p's behaviours (state plus queued actions,
//! the swarm routes them) and quinn's split of a pure state machine from its
//! driver are the models.
//!
//! The actor builds one table from every service's routes, once: each message
//! type names its service, rate class and sealing rule. An inbound envelope goes
//! through the pipeline (verify, bind to its connection, admit, route, rate,
//! open) and reaches [`Service::on_envelope`] as an [`Inbound`]; the
//! [`Answer`] goes back on the stream it came on. A request sent with
//! [`Context::send`] returns a [`RequestId`]; its [`Outcome`] comes back in
//! [`Service::on_reply`]. Timers are deadlines: the actor sleeps until the
//! earliest [`Service::poll_timeout`] of all services and sessions, then calls
//! [`Service::on_timeout`] of those due.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use peer_core::rate::Class;
use peer_core::session::Message;
use peer_core::{EntityId, Identity, MessageId, MsgType, PublicKey, Rejection};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{Command, Queued, Shared};
use crate::config::Config;
use crate::inbox::{Delivery, StoreOp};
use crate::network::{NetEvent, NetOp};
use crate::node::{Event, NodeError};
use crate::secure::{Released, Secure};
use crate::stats::Stats;

/// A service's place in the node's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(pub(crate) usize);

/// A request a service sent; its [`Outcome`] comes back with it in
/// [`Service::on_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub(crate) u64);

/// Whether a message type travels sealed in an end-to-end session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// Sent sealed (a session is set up first if needed); received unsealed
    /// only when `security.require_encryption` is off, else refused
    /// `ENCRYPTION_REQUIRED`.
    Sealed,
    /// Sent and received as a signed envelope only.
    Plain,
}

/// When the sender's rate bucket is charged for an inbound envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// One token of the route's class when it arrives, before its service sees it.
    OnArrival,
    /// The service charges it (through [`Context::charge`]) as it decides; the
    /// pipeline charges one token only when it refuses the envelope itself
    /// (it could not be opened, or arrived unsealed).
    ByService,
}

/// One message type a service owns, and how the pipeline treats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The message type.
    pub msg_type: MsgType,
    /// The rate class it counts against.
    pub class: Class,
    /// Sealed or plain.
    pub sealing: Sealing,
    /// When it is charged.
    pub charge: Charge,
    /// Whether it may also arrive as a chunked transfer (PROTOCOL.md section
    /// 9) when it does not fit one envelope: the transfer service takes a
    /// manifest of this type and hands the reassembled message to this
    /// route's service (see [`Context::send_message`]).
    pub large: bool,
}

impl Route {
    /// A plain type, charged on arrival.
    ///
    /// # Panics
    /// If `msg_type` is not a valid message type name (a programming error).
    pub fn plain(msg_type: &str, class: Class) -> Self {
        Self {
            msg_type: msg_type.parse().expect("a valid msg_type"),
            class,
            sealing: Sealing::Plain,
            charge: Charge::OnArrival,
            large: false,
        }
    }

    /// A sealed type, charged on arrival.
    ///
    /// # Panics
    /// If `msg_type` is not a valid message type name (a programming error).
    pub fn sealed(msg_type: &str, class: Class) -> Self {
        Self {
            sealing: Sealing::Sealed,
            ..Self::plain(msg_type, class)
        }
    }

    /// The same route, charged by its service.
    pub fn charged_by_service(self) -> Self {
        Self {
            charge: Charge::ByService,
            ..self
        }
    }

    /// The same route, taking messages too large for one envelope as chunked
    /// transfers.
    pub fn large(self) -> Self {
        Self {
            large: true,
            ..self
        }
    }
}

/// Whether a namespace's types are taken now.
pub type Takes = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The namespaced message types (with a dot: `chat.message`) a service owns:
/// every one no [`Route`] names exactly, each counted against its namespace's
/// class. An inbound one whose namespace `takes` refuses is refused
/// `UNSUPPORTED_MSG_TYPE` like a type no service owns.
#[derive(Clone)]
pub struct Namespaced {
    /// Sealed or plain.
    pub sealing: Sealing,
    /// The class of a namespace `classes` does not name.
    pub default_class: Class,
    /// Classes by namespace (the part before the first dot).
    pub classes: HashMap<String, Class>,
    /// Which namespaces are taken now.
    pub takes: Takes,
}

impl std::fmt::Debug for Namespaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespaced")
            .field("sealing", &self.sealing)
            .field("default_class", &self.default_class)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

/// An inbound envelope that passed the pipeline, for its service.
#[derive(Debug)]
pub struct Inbound {
    /// The sender: the peer of the connection it came on.
    pub from: EntityId,
    /// The sender's public key.
    pub sender_key: PublicKey,
    /// The envelope's id.
    pub message_id: MessageId,
    /// Its type.
    pub msg_type: MsgType,
    /// Its payload; the plaintext if it came sealed.
    pub payload: Vec<u8>,
    /// Whether it came sealed in a session.
    pub sealed: bool,
}

/// A refusal: the wire code and reason, and for `RATE_LIMITED` how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Code and reason.
    pub rejection: Rejection,
    /// How long the sender should wait before sending again.
    pub retry_after: Option<Duration>,
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Self {
        Self {
            rejection,
            retry_after: None,
        }
    }
}

/// A service's answer to an inbound envelope.
#[derive(Debug)]
pub enum Answer {
    /// Accepted (response kind `0x00`).
    Accepted,
    /// A reply envelope of this type and payload, which the node signs.
    Reply {
        /// The reply's type.
        msg_type: MsgType,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// Refused.
    Refused(Refused),
}

impl From<Refused> for Answer {
    fn from(r: Refused) -> Self {
        Self::Refused(r)
    }
}

impl From<Rejection> for Answer {
    fn from(r: Rejection) -> Self {
        Self::Refused(r.into())
    }
}

/// What a request's recipient answered.
#[derive(Debug)]
pub enum Reply {
    /// Accepted.
    Accepted,
    /// A reply envelope, verified and signed by the recipient.
    Envelope(Box<peer_core::Envelope>),
}

/// How a request ended.
#[derive(Debug)]
pub struct Outcome {
    /// The id of the envelope sent.
    pub message_id: MessageId,
    /// Its recipient.
    pub to: EntityId,
    /// The recipient's answer, or why there is none.
    pub result: Result<Reply, NodeError>,
}

impl Outcome {
    /// Whether the recipient refused a sealed request because it no longer
    /// has the session it was sealed in (the node has dropped that session:
    /// the next send runs a new handshake).
    pub fn lost_session(&self) -> bool {
        matches!(&self.result, Err(e) if lost_session(e))
    }
}

/// Whether a peer's answer says it no longer has the session a message was
/// sealed in.
pub(crate) fn lost_session(e: &NodeError) -> bool {
    use peer_core::ErrorCode;
    matches!(e, NodeError::Rejected { code, .. }
        if code == ErrorCode::SessionNotFound.as_str()
            || code == ErrorCode::SessionExpired.as_str())
}

/// A change in the set of connected peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The first connection to this peer opened.
    Connected(EntityId),
    /// The last connection to this peer closed.
    Disconnected(EntityId),
}

/// A capability of the node. Every method has a default that does nothing (an
/// envelope is refused `UNSUPPORTED_MSG_TYPE`), so a service implements only
/// what it uses.
pub trait Service: Send + 'static {
    /// What handles ask of it (see [`crate::NodeHandle::service`]).
    type Command: Send + 'static;

    /// Its name, for logs and errors.
    fn name(&self) -> &'static str;

    /// The message types it owns. Read once, when the node starts; two services
    /// owning one type is a start error.
    fn routes(&self) -> Vec<Route> {
        Vec::new()
    }

    /// The namespaced types it owns, if any; at most one service may (a
    /// second is a start error). Charged on arrival.
    fn namespaced(&self) -> Option<Namespaced> {
        None
    }

    /// An inbound envelope of one of its types.
    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let _ = cx;
        peer_core::Rejection::new(
            peer_core::ErrorCode::UnsupportedMsgType,
            format!("{} takes no {} requests", self.name(), msg.msg_type),
        )
        .into()
    }

    /// The outcome of a request it sent.
    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        let _ = (cx, id, outcome);
    }

    /// A command from a handle.
    fn on_command(&mut self, cx: &mut Context<'_>, command: Self::Command) {
        let _ = (cx, command);
    }

    /// Its earliest deadline, in monotonic ms ([`Context::now_ms`]). It may be
    /// early (the service is then called and finds nothing due), never late.
    fn poll_timeout(&self) -> Option<u64> {
        None
    }

    /// Called once [`Service::poll_timeout`] has passed.
    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        let _ = cx;
    }

    /// A peer connected or disconnected.
    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        let _ = (cx, event);
    }

    /// A write it asked for with [`Context::persist`] and a token was
    /// committed (`Ok`) or failed.
    fn on_persisted(&mut self, cx: &mut Context<'_>, token: u64, result: Result<(), String>) {
        let _ = (cx, token, result);
    }

    /// An event of the discovery protocols: a lookup's progress reaches the
    /// service that started it, every other event every service.
    fn on_network(&mut self, cx: &mut Context<'_>, event: &NetEvent) {
        let _ = (cx, event);
    }
}

/// A service with its command type erased, as the actor holds it.
pub(crate) trait Erased: Send {
    fn name(&self) -> &'static str;
    fn routes(&self) -> Vec<Route>;
    fn namespaced(&self) -> Option<Namespaced>;
    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer;
    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome);
    fn on_command(&mut self, cx: &mut Context<'_>, command: Box<dyn std::any::Any + Send>);
    fn poll_timeout(&self) -> Option<u64>;
    fn on_timeout(&mut self, cx: &mut Context<'_>);
    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent);
    fn on_persisted(&mut self, cx: &mut Context<'_>, token: u64, result: Result<(), String>);
    fn on_network(&mut self, cx: &mut Context<'_>, event: &NetEvent);
}

impl<S: Service> Erased for S {
    fn name(&self) -> &'static str {
        Service::name(self)
    }
    fn routes(&self) -> Vec<Route> {
        Service::routes(self)
    }
    fn namespaced(&self) -> Option<Namespaced> {
        Service::namespaced(self)
    }
    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        Service::on_envelope(self, cx, msg)
    }
    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        Service::on_reply(self, cx, id, outcome);
    }
    fn on_command(&mut self, cx: &mut Context<'_>, command: Box<dyn std::any::Any + Send>) {
        // Handles are typed by the service (`ServiceHandle<S>`), so the command
        // is always `S::Command`.
        if let Ok(command) = command.downcast::<S::Command>() {
            Service::on_command(self, cx, *command);
        }
    }
    fn poll_timeout(&self) -> Option<u64> {
        Service::poll_timeout(self)
    }
    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        Service::on_timeout(self, cx);
    }
    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        Service::on_peer_event(self, cx, event);
    }
    fn on_persisted(&mut self, cx: &mut Context<'_>, token: u64, result: Result<(), String>) {
        Service::on_persisted(self, cx, token, result);
    }
    fn on_network(&mut self, cx: &mut Context<'_>, event: &NetEvent) {
        Service::on_network(self, cx, event);
    }
}

/// What a route table entry says about a message type (its key).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routed {
    pub service: ServiceId,
    pub class: Class,
    pub sealing: Sealing,
    pub charge: Charge,
    pub large: bool,
}

/// The one table from message type to service, rate class and sealing rule:
/// exact types first, then the namespaced types' owner.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    by_type: HashMap<MsgType, Routed>,
    /// The entry of a namespaced type no route names, and its owner's rules.
    namespaced: Option<(Routed, Namespaced)>,
}

impl Routes {
    /// The table of `services`' routes; an error names a type owned twice.
    pub fn build(services: &[Box<dyn Erased>]) -> Result<Self, String> {
        let mut by_type: HashMap<MsgType, Routed> = HashMap::new();
        let mut namespaced: Option<(Routed, Namespaced)> = None;
        for (i, s) in services.iter().enumerate() {
            if let Some(n) = s.namespaced() {
                if let Some((other, _)) = &namespaced {
                    return Err(format!(
                        "namespaced message types are owned by two services: {} and {}",
                        services[other.service.0].name(),
                        s.name()
                    ));
                }
                let routed = Routed {
                    service: ServiceId(i),
                    class: n.default_class,
                    sealing: n.sealing,
                    charge: Charge::OnArrival,
                    large: false,
                };
                namespaced = Some((routed, n));
            }
            for route in s.routes() {
                if let Some(other) = by_type.get(&route.msg_type) {
                    return Err(format!(
                        "message type {} is owned by two services: {} and {}",
                        route.msg_type,
                        services[other.service.0].name(),
                        s.name()
                    ));
                }
                let routed = Routed {
                    service: ServiceId(i),
                    class: route.class,
                    sealing: route.sealing,
                    charge: route.charge,
                    large: route.large,
                };
                by_type.insert(route.msg_type, routed);
            }
        }
        Ok(Self {
            by_type,
            namespaced,
        })
    }

    /// The entry for `msg_type`: its route's, else for a namespaced type the
    /// namespaced types' owner's, with its namespace's class.
    pub fn get(&self, msg_type: &MsgType) -> Option<Routed> {
        if let Some(r) = self.by_type.get(msg_type) {
            return Some(*r);
        }
        let ns = msg_type.namespace()?;
        let (routed, n) = self.namespaced.as_ref()?;
        Some(Routed {
            class: n.classes.get(ns).copied().unwrap_or(routed.class),
            ..*routed
        })
    }

    /// The entry for an inbound request of `msg_type`: as [`Routes::get`],
    /// but a namespaced type no route names only if its namespace is taken now.
    pub fn inbound(&self, msg_type: &MsgType) -> Option<Routed> {
        if !self.by_type.contains_key(msg_type)
            && let (Some(ns), Some((_, n))) = (msg_type.namespace(), &self.namespaced)
            && !(n.takes)(ns)
        {
            return None;
        }
        self.get(msg_type)
    }

    /// The message types routes name exactly, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.by_type.keys().map(ToString::to_string).collect();
        types.sort();
        types
    }

    /// Whether `msg_type` travels sealed.
    pub fn is_sealed(&self, msg_type: &MsgType) -> bool {
        self.get(msg_type)
            .is_some_and(|r| r.sealing == Sealing::Sealed)
    }

    /// The class `msg_type` counts against: its route's, or `task` for a type
    /// no service owns.
    pub fn class_of(&self, msg_type: &MsgType) -> Class {
        self.get(msg_type).map_or(Class::Task, |r| r.class)
    }

    /// Whether `msg_type` is a type a route names that may arrive as a
    /// chunked transfer ([`Route::large`]).
    pub fn takes_large(&self, msg_type: &MsgType) -> bool {
        self.by_type.get(msg_type).is_some_and(|r| r.large)
    }

    /// The service that owns `msg_type`.
    pub fn owner(&self, msg_type: &str) -> Option<ServiceId> {
        let t: MsgType = msg_type.parse().ok()?;
        self.get(&t).map(|r| r.service)
    }
}

/// A send a service asked for.
#[derive(Debug)]
pub(crate) struct SendRequest {
    pub queued: Queued,
    pub msg_type: MsgType,
    pub payload: Vec<u8>,
    /// Whether it counts against the outbound admission limits. Handshake
    /// steps do not: one attempt per peer bounds them, and a full queue of
    /// messages waiting for that very session must not keep it from opening.
    pub metered: bool,
}

/// A message a service asked to send as a chunked transfer
/// ([`Context::send_message`]), for the transfer service to run on its behalf.
#[derive(Debug)]
pub struct TransferRequest {
    /// The service that sent it, and its request id.
    pub(crate) owner: ServiceId,
    pub(crate) id: RequestId,
    pub(crate) to: EntityId,
    pub(crate) msg_type: MsgType,
    pub(crate) payload: Vec<u8>,
}

/// What services asked for, run by the actor once the service has returned.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Requests to send, in order.
    pub sends: std::collections::VecDeque<SendRequest>,
    /// Sealed messages a new session released, to sign and send.
    pub released: Vec<(EntityId, Released<Queued>)>,
    /// Requests that failed without being sent.
    pub failed: Vec<(Queued, NodeError)>,
    /// Messages to send as chunked transfers, by the transfer service.
    pub transfers: std::collections::VecDeque<TransferRequest>,
    /// Outcomes one service hands to another's request (the transfer
    /// service's, of a transfer it ran on that service's behalf).
    pub outcomes: Vec<(ServiceId, RequestId, Outcome)>,
    /// Set by the transfer service when the chunk being handled completed a
    /// message of a [`Route::large`] type: the pipeline hands it to its
    /// service in the same delivery slot, and that service's answer is the
    /// chunk's.
    pub forward: Option<Inbound>,
    /// What services asked of the discovery protocols, in order.
    pub network: std::collections::VecDeque<(ServiceId, NetOp)>,
    /// Set while a service handles an envelope: the event it delivers,
    /// released with the envelope's answer (a sealed one's in its session's
    /// order).
    pub in_order: Option<InOrder>,
}

/// The delivery slot of the envelope being handled.
#[derive(Debug, Default)]
pub(crate) struct InOrder {
    pub delivery: Option<Delivery>,
}

/// A service's view of the node while one of its methods runs.
pub struct Context<'a> {
    pub(crate) me: ServiceId,
    pub(crate) now_ms: u64,
    pub(crate) shared: &'a mut Shared,
    pub(crate) routes: &'a Routes,
    pub(crate) effects: &'a mut Effects,
    pub(crate) next_request: &'a mut u64,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("service", &self.me)
            .field("now_ms", &self.now_ms)
            .finish_non_exhaustive()
    }
}

impl Context<'_> {
    /// Monotonic milliseconds (protocol timers, deadlines).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Milliseconds since the Unix epoch (for people, not for timers).
    pub fn wall_ms(&self) -> u64 {
        self.shared.clock.wall_ms()
    }

    /// This node's entity id.
    pub fn local(&self) -> EntityId {
        self.shared.identity.entity_id()
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Whether a connection to `peer` is open.
    pub fn is_connected(&self, peer: &EntityId) -> bool {
        self.shared.by_entity.contains_key(peer)
    }

    /// The libp2p peer id of a connected peer.
    pub fn peer_id(&self, peer: &EntityId) -> Option<libp2p::PeerId> {
        self.shared.by_entity.get(peer).copied()
    }

    /// How many peers a connection is open to.
    pub fn connected_peers(&self) -> usize {
        self.shared.by_entity.len()
    }

    /// Asks the discovery protocols for something (see [`NetOp`]); done
    /// once the service has returned.
    pub fn network(&mut self, op: NetOp) {
        self.effects.network.push_back((self.me, op));
    }

    /// Says that this service needs a connection to `peer` (it has
    /// something to send): the discovery service finds and dials it.
    pub fn want(&mut self, peer: EntityId) {
        if !self.is_connected(&peer) {
            self.effects.network.push_back((self.me, NetOp::Want(peer)));
        }
    }

    /// Sends `payload` as a `msg_type` request to `to`: sealed in the session
    /// with `to` if the type is sealed (a handshake runs first if needed), else
    /// signed as is. The outcome comes back in [`Service::on_reply`] with the
    /// returned id, also when the send fails at once (not connected, the
    /// node's outbound limits reached).
    pub fn send(&mut self, to: EntityId, msg_type: MsgType, payload: Vec<u8>) -> RequestId {
        self.send_request(to, msg_type, payload, true)
    }

    /// Sends `payload` as a `msg_type` request to `to`, whatever its size up
    /// to `transfer.max_message_size`: as [`Context::send`] if it is at most
    /// `transfer.chunk_size` bytes, else as a chunked transfer (PROTOCOL.md
    /// section 9) that the transfer service runs on this service's behalf
    /// (the recipient must take the type as a transfer: its route is
    /// [`Route::large`]). Either way the outcome comes back in
    /// [`Service::on_reply`] with the returned id; a transfer's is
    /// "accepted" once the receiver accepted its last chunk (no reply
    /// envelope), or the first failure that ended it.
    pub fn send_message(&mut self, to: EntityId, msg_type: MsgType, payload: Vec<u8>) -> RequestId {
        let transfer = &self.shared.config.transfer;
        let (chunk_size, limit) = (transfer.chunk_size, transfer.max_message_size);
        if payload.len() <= chunk_size {
            return self.send(to, msg_type, payload);
        }
        let id = self.next_id();
        let size = payload.len() as u64;
        if size > limit {
            let outcome = Outcome {
                message_id: MessageId::from_random(rand::random()),
                to,
                result: Err(NodeError::TooLarge { size, limit }),
            };
            self.effects.outcomes.push((self.me, id, outcome));
            return id;
        }
        self.effects.transfers.push_back(TransferRequest {
            owner: self.me,
            id,
            to,
            msg_type,
            payload,
        });
        id
    }

    fn next_id(&mut self) -> RequestId {
        let id = RequestId(*self.next_request);
        *self.next_request += 1;
        id
    }

    /// Hands `outcome` to `owner`'s request `id` (its [`Service::on_reply`]
    /// is called once this service has returned).
    pub(crate) fn hand_back(&mut self, owner: ServiceId, id: RequestId, outcome: Outcome) {
        self.effects.outcomes.push((owner, id, outcome));
    }

    /// Whether `msg_type` may arrive as a chunked transfer for the service
    /// that owns it ([`Route::large`]).
    pub(crate) fn takes_large(&self, msg_type: &MsgType) -> bool {
        self.routes.takes_large(msg_type)
    }

    /// Hands a message reassembled from a chunked transfer to the service
    /// that owns its type, while its last chunk is being handled: the
    /// pipeline calls that service's [`Service::on_envelope`] in the same
    /// delivery slot once this one has returned, and its answer is the
    /// chunk's (so a durable event it delivers holds the chunk's answer
    /// until it is stored).
    pub(crate) fn forward(&mut self, msg: Inbound) {
        self.effects.forward = Some(msg);
    }

    fn send_request(
        &mut self,
        to: EntityId,
        msg_type: MsgType,
        payload: Vec<u8>,
        metered: bool,
    ) -> RequestId {
        let id = self.next_id();
        let queued = Queued {
            id,
            owner: self.me,
            to,
            message_id: MessageId::from_random(rand::random()),
            ticket: None,
        };
        self.effects.sends.push_back(SendRequest {
            queued,
            msg_type,
            payload,
            metered,
        });
        id
    }

    /// Tells the agent (`/v1/events`) now.
    pub fn emit(&mut self, event: Event) {
        _ = self.shared.events.send(event);
    }

    /// Hands an event to the agent: while an envelope is being handled, with
    /// the envelope (a sealed one's in the order its session sent them; at
    /// most one per envelope, a further one goes at once), otherwise at once.
    /// A durable event ([`Event::is_durable`]) gets room in the inbox first:
    /// `INBOX_FULL` if its sender's share or the inbox is full, and then
    /// nothing is delivered; the envelope it came with is answered once it
    /// is stored. A message's payload counts against
    /// `transfer.max_buffered_bytes` until every live reader has read it.
    pub fn deliver(&mut self, event: Event) -> Result<(), Refused> {
        let (event, from) = match event {
            Event::Message {
                event_id,
                message_id,
                from,
                msg_type,
                payload,
            } => (
                Event::Message {
                    event_id,
                    message_id,
                    from,
                    msg_type,
                    payload: payload.counted_in(&self.shared.unread),
                },
                Some(from),
            ),
            other => (other, None),
        };
        let delivery = if event.is_durable() {
            self.shared.inbox.reserve(event, from)?
        } else {
            Delivery::ephemeral(event)
        };
        match &mut self.effects.in_order {
            Some(slot) if slot.delivery.is_none() => slot.delivery = Some(delivery),
            _ => self.shared.deliver(delivery),
        }
        Ok(())
    }

    /// Writes records of the service's own to the node's database, on the
    /// inbox writer's thread, in order with the events delivered after it: an
    /// event delivered after this call is stored only once this write is.
    /// With a token, [`Service::on_persisted`] tells when it is committed.
    pub fn persist(&mut self, op: StoreOp, token: Option<u64>) {
        self.shared.inbox.write(op, token.map(|t| (self.me, t)));
    }

    /// Takes one token of `class` from `peer`'s bucket; `RATE_LIMITED` with
    /// the wait if it is empty.
    pub fn charge(&mut self, peer: EntityId, class: Class) -> Result<(), Refused> {
        self.shared.charge(peer, class)
    }

    /// The class a message type counts against.
    pub fn class_of(&self, msg_type: &MsgType) -> Class {
        self.routes.class_of(msg_type)
    }

    /// Whether a message type travels sealed (its route says so).
    pub fn is_sealed(&self, msg_type: &MsgType) -> bool {
        self.routes.is_sealed(msg_type)
    }

    /// The node's counters.
    pub fn stats(&mut self) -> &mut Stats {
        &mut self.shared.stats
    }

    /// Bytes of delivered message payloads that not every event reader has read.
    pub fn unread_bytes(&self) -> u64 {
        self.shared.unread.load(Ordering::Relaxed)
    }

    /// The end-to-end sessions (for the handshake service).
    pub(crate) fn sessions(&mut self) -> &mut Secure<Queued> {
        &mut self.shared.sessions
    }

    /// The node's identity (for the handshake service's challenge signature).
    pub(crate) fn identity(&self) -> Arc<Identity> {
        self.shared.identity.clone()
    }

    /// Sends the sealed messages a new session released.
    pub(crate) fn release(&mut self, to: EntityId, released: Released<Queued>) {
        if !released.is_empty() {
            self.effects.released.push((to, released));
        }
    }

    /// Fails requests that waited for a session that cannot be had.
    pub(crate) fn fail(&mut self, failed: Vec<(Queued, Rejection)>) {
        self.effects
            .failed
            .extend(failed.into_iter().map(|(q, r)| (q, NodeError::rejected(r))));
    }

    /// Sends a handshake step to `to`, as a request of this service.
    pub(crate) fn send_handshake(&mut self, to: EntityId, msg: &Message) -> RequestId {
        let msg_type = msg.msg_type().parse().expect("handshake types are valid");
        self.send_request(to, msg_type, msg.encode(), false)
    }
}

/// A typed handle on one service of a running node.
pub struct ServiceHandle<S: Service> {
    pub(crate) id: ServiceId,
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) _service: PhantomData<fn() -> S>,
}

impl<S: Service> Clone for ServiceHandle<S> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            tx: self.tx.clone(),
            _service: PhantomData,
        }
    }
}

impl<S: Service> std::fmt::Debug for ServiceHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl<S: Service> ServiceHandle<S> {
    /// Sends the service a command.
    pub async fn command(&self, command: S::Command) -> Result<(), NodeError> {
        self.tx
            .send(Command::Service(self.id, Box::new(command)))
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Sends the service a command made with a reply channel, and waits for
    /// the reply.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> S::Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(make(tx)).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{card, handshake, heartbeat, messaging, ping, transfer};

    fn builtins() -> Routes {
        let services: Vec<Box<dyn Erased>> = vec![
            Box::new(ping::Ping),
            Box::new(handshake::Handshake),
            Box::new(messaging::Messaging::new(
                Default::default(),
                Default::default(),
            )),
            Box::new(transfer::Transfers::new(
                Default::default(),
                Default::default(),
            )),
            Box::new(heartbeat::Heartbeat::new(Default::default())),
            Box::new(card::Cards::new(&Default::default(), Default::default())),
        ];
        Routes::build(&services).expect("no type owned twice")
    }

    fn t(s: &str) -> MsgType {
        s.parse().expect("valid")
    }

    #[test]
    fn the_built_in_routes_follow_the_protocol_table() {
        let r = builtins();
        // Classes, as PROTOCOL.md section 5a lists them.
        for (msg_type, class) in [
            ("handshake_init", Class::Handshake),
            ("ready", Class::Handshake),
            ("ping", Class::Heartbeat),
            ("heartbeat", Class::Heartbeat),
            ("wake_up", Class::Task),
            ("status_report", Class::Task),
            ("message", Class::Task),
            ("task_delegate", Class::Task),
            ("chunk_manifest", Class::Chunk),
            ("chunk", Class::Chunk),
            ("chunk_resend", Class::Chunk),
            ("capability_query", Class::Discovery),
            ("capability_response", Class::Discovery),
            ("chat.message", Class::Task),
            ("no_such_type", Class::Task),
        ] {
            assert_eq!(r.class_of(&t(msg_type)), class, "{msg_type}");
        }
        // Sealing: application, chunked-transfer, wake_up and status_report types only.
        assert!(r.is_sealed(&t("message")) && r.is_sealed(&t("chunk")));
        assert!(r.is_sealed(&t("wake_up")) && r.is_sealed(&t("status_report")));
        assert!(!r.is_sealed(&t("ping")) && !r.is_sealed(&t("handshake_init")));
        assert!(!r.is_sealed(&t("heartbeat")));
        assert!(!r.is_sealed(&t("no_such_type")));
        // Cards travel plain; namespaced types are application types.
        assert!(!r.is_sealed(&t("capability_response")));
        assert!(r.is_sealed(&t("chat.message")));
        assert_eq!(r.owner("chat.message"), r.owner("message"));
        // A chunk is charged by its service; everything else on arrival.
        let charge = |s: &str| r.get(&t(s)).map(|x| x.charge);
        assert_eq!(charge("chunk"), Some(Charge::ByService));
        assert_eq!(charge("chunk_manifest"), Some(Charge::OnArrival));
        assert_eq!(charge("pong"), None, "a reply, not a request");
        assert_eq!(charge("heartbeat_ack"), None, "a reply, not a request");
        assert_eq!(charge("wake_up_ack"), None, "a reply, not a request");
        assert_eq!(r.owner("handshake_init"), r.owner("ready"));
        assert_eq!(r.owner("heartbeat"), r.owner("wake_up"));
        assert_eq!(r.owner("heartbeat"), r.owner("status_report"));
        assert_ne!(r.owner("message"), r.owner("wake_up"));
    }

    #[test]
    fn namespaced_types_take_their_namespace_class_and_exact_routes_win() {
        struct Exact;
        impl Service for Exact {
            type Command = ();
            fn name(&self) -> &'static str {
                "exact"
            }
            fn routes(&self) -> Vec<Route> {
                vec![Route::plain("chat.ping", Class::Heartbeat)]
            }
        }
        let classes = HashMap::from([("live".to_owned(), Class::Heartbeat)]);
        let services: Vec<Box<dyn Erased>> = vec![
            Box::new(messaging::Messaging::new(Default::default(), classes)),
            Box::new(Exact),
        ];
        let r = Routes::build(&services).expect("built");
        assert_eq!(r.class_of(&t("live.beat")), Class::Heartbeat);
        assert_eq!(r.class_of(&t("chat.message")), Class::Task);
        assert_eq!(r.owner("chat.ping"), Some(ServiceId(1)));
        assert!(!r.is_sealed(&t("chat.ping")));
        assert_eq!(r.owner("chat.message"), Some(ServiceId(0)));
        // The messaging service's card accepts no namespace (it is empty).
        assert!(r.inbound(&t("chat.message")).is_none());
        assert!(r.inbound(&t("chat.ping")).is_some());
        assert!(r.get(&t("nodots")).is_none());
        let twice: Vec<Box<dyn Erased>> = vec![
            Box::new(messaging::Messaging::new(
                Default::default(),
                HashMap::new(),
            )),
            Box::new(messaging::Messaging::new(
                Default::default(),
                HashMap::new(),
            )),
        ];
        let e = Routes::build(&twice).expect_err("two owners");
        assert!(e.contains("namespaced"), "{e}");
    }
}
