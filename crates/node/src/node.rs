//! The node's public surface: [`start`] and [`Builder`], the [`NodeHandle`]
//! and the types it returns.
//!
//! One task (the actor) owns the swarm, the services and the state they share.
//! The rest of the program holds a cloneable [`NodeHandle`] that sends it
//! commands over a bounded channel, each with a oneshot for the answer. Peer
//! sightings go to the database through a [`Writer`] thread; the handle reads
//! the database itself.

use std::any::TypeId;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use peer_core::chunk::{self, TransferId};
use peer_core::envelope::FIXED_OVERHEAD;
use peer_core::session::keys::TAG_LEN;
use peer_core::{EntityId, Identity, MsgType, Rejection};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::actor::{self, Command};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::inbox::{Acked, Inbox, Stored};
use crate::json::{self, RawJson};
use crate::net;
use crate::secure::SessionView;
use crate::service::{Erased, Routes, Service, ServiceHandle, ServiceId};
use crate::services::card::{self, CardCell, CardContent, SignedCard};
use crate::services::heartbeat::{self, Health, HealthView};
pub use crate::services::tasks::task::NewTask;
use crate::services::tasks::{self, task::Task};
use crate::services::{discovery, handshake, messaging, ping, transfer};
use crate::stats::{Metrics, StatsView};
use crate::store::{PeerRecord, Store, StoreError, Writer};

/// Capacity of the command channel between handles and the actor.
const COMMAND_QUEUE: usize = 1024;

/// Something the node tells its agent, on `/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// An application message arrived and was verified. Durable: kept in the
    /// inbox until the agent acknowledges it.
    Message {
        /// Its id in the inbox, set once it is stored.
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<u64>,
        /// The message's id (for a message that came as a chunked transfer, the
        /// transfer's id).
        message_id: String,
        /// The sender's entity id.
        from: EntityId,
        /// Its type.
        msg_type: String,
        /// Its JSON payload, exactly as sent.
        payload: RawJson,
    },
    /// A chunked transfer moved on: sent when it starts, then each time another
    /// tenth of its chunks has been accepted (outbound) or received (inbound).
    TransferProgress {
        /// The transfer's id.
        transfer_id: String,
        /// The other end: the receiver (outbound) or the sender (inbound).
        peer: EntityId,
        /// Which way it goes.
        direction: Direction,
        /// Bytes of the message accepted or received so far.
        done_bytes: u64,
        /// Length of the whole message.
        total_bytes: u64,
        /// Chunks accepted or received so far.
        done_chunks: u32,
        /// Chunks in the transfer.
        chunk_count: u32,
    },
    /// A chunked transfer stopped without delivering its message.
    TransferFailed {
        /// The transfer's id.
        transfer_id: String,
        /// The other end.
        peer: EntityId,
        /// Which way it went.
        direction: Direction,
        /// A protocol error code, or `EXPIRED` for an incoming transfer that
        /// made no progress for `transfer.expiry_secs`.
        code: String,
        /// Why.
        reason: String,
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
    /// A peer's health (heartbeat) changed.
    PeerHealth {
        /// Its entity id.
        entity_id: EntityId,
        /// Its new state.
        state: Health,
    },
    /// A task changed (or arrived), on either side. Durable.
    TaskUpdate {
        /// Its id in the inbox, set once it is stored.
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<u64>,
        /// The task as it is now.
        task: Box<Task>,
    },
    /// A peer's capability card arrived (the first one known, or a newer one)
    /// and was verified.
    CardUpdated {
        /// The peer.
        entity_id: EntityId,
        /// The card's sequence.
        sequence: u64,
    },
}

impl Event {
    /// An application message for the agent, not yet stored.
    pub fn message(
        message_id: impl ToString,
        from: EntityId,
        msg_type: impl ToString,
        payload: RawJson,
    ) -> Self {
        Self::Message {
            event_id: None,
            message_id: message_id.to_string(),
            from,
            msg_type: msg_type.to_string(),
            payload,
        }
    }

    /// Whether the event is kept in the inbox until the agent acknowledges it
    /// (else it is only published to the readers connected at the time).
    pub fn is_durable(&self) -> bool {
        matches!(self, Self::Message { .. } | Self::TaskUpdate { .. })
    }

    /// Its id in the inbox, once stored.
    pub fn event_id(&self) -> Option<u64> {
        match self {
            Self::Message { event_id, .. } | Self::TaskUpdate { event_id, .. } => *event_id,
            _ => None,
        }
    }

    /// Sets its id in the inbox.
    pub(crate) fn set_event_id(&mut self, id: u64) {
        if let Self::Message { event_id, .. } | Self::TaskUpdate { event_id, .. } = self {
            *event_id = Some(id);
        }
    }

    /// Bytes of the payload it carries.
    pub(crate) fn payload_len(&self) -> u64 {
        match self {
            Self::Message { payload, .. } => payload.as_str().len() as u64,
            Self::TaskUpdate { task, .. } => task.size(),
            _ => 0,
        }
    }
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From this node.
    Outbound,
    /// To this node.
    Inbound,
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
    /// The end-to-end session with it, if one is live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionView>,
    /// Last time it was connected, ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Its health, if the heartbeat service tracks it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthView>,
    /// Whether discovery holds a verified record of it.
    pub verified: bool,
    /// Its capabilities, from its verified record.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// A change this node's agent makes to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskChange {
    /// The delegator calls it off.
    Cancel {
        /// The task.
        task_id: String,
        /// Why.
        message: Option<String>,
    },
    /// The assignee reports `working`, `input-required`, `failed` or `rejected`.
    Status {
        /// The task.
        task_id: String,
        /// The new state.
        state: tasks::task::State,
        /// Why, or what is needed.
        message: Option<String>,
    },
    /// The assignee completes it.
    Complete {
        /// The task.
        task_id: String,
        /// The output.
        output: serde_json::Value,
        /// Named outputs.
        artifacts: Vec<tasks::task::Artifact>,
    },
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
    /// The message is larger than this node sends (`transfer.max_message_size`).
    #[error("message of {size} bytes exceeds transfer.max_message_size ({limit} bytes)")]
    TooLarge {
        /// The payload's length.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// There is no such thing here (a task id this node does not know).
    #[error("{0}")]
    NotFound(String),
    /// No open connection to the entity.
    #[error(
        "not connected to {0}, and no address or DHT record of it was found; connect to one of its addresses first (POST /v1/peers)"
    )]
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
    /// This node's own database or inbox files could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// The peer's circuit breaker is open: its last calls failed, and no
    /// send or dial to it is tried until it lets trial calls through.
    #[error("{0}; retry later")]
    CircuitOpen(crate::pool::behaviour::CircuitOpen),
    /// Too many requests are in flight; retry later.
    #[error("too many messages in flight ({0}); retry later")]
    Busy(usize),
    /// Outgoing transfers hold as many messages or bytes as they may
    /// (`transfer.max_outgoing`, `transfer.max_outgoing_bytes`); retry later.
    #[error(
        "too many large messages being sent ({transfers} held, {bytes} bytes; transfer.max_outgoing is {max_transfers}, transfer.max_outgoing_bytes {max_bytes}); retry later"
    )]
    TooManyTransfers {
        /// Transfers held.
        transfers: usize,
        /// Their payload bytes.
        bytes: u64,
        /// `transfer.max_outgoing`.
        max_transfers: usize,
        /// `transfer.max_outgoing_bytes`.
        max_bytes: u64,
    },
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        Self::Storage(e.to_string())
    }
}

/// The outcome of storage work run on a blocking thread: a panic there is a
/// storage failure too; a task that was cancelled means the node is stopping.
fn stored<T>(r: Result<Result<T, StoreError>, tokio::task::JoinError>) -> Result<T, NodeError> {
    match r {
        Ok(r) => r.map_err(NodeError::from),
        Err(e) if e.is_panic() => Err(NodeError::Storage(format!("database error: {e}"))),
        Err(_) => Err(NodeError::Stopped),
    }
}

impl NodeError {
    /// The error for a message the peer (or this node, for it) refused.
    pub(crate) fn rejected(r: Rejection) -> Self {
        Self::Rejected {
            code: r.code.to_string(),
            reason: r.reason,
            retry_after_ms: None,
        }
    }
}

/// A cheap, cloneable handle on a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    max_envelope_size: usize,
    chunk_size: usize,
    max_message_size: u64,
    max_json_depth: usize,
    entity_id: EntityId,
    peer_id: PeerId,
    events: broadcast::Sender<Event>,
    metrics: Metrics,
    services: Arc<HashMap<TypeId, ServiceId>>,
    store: Arc<Store>,
    inbox: Inbox,
    card: CardCell,
}

impl NodeHandle {
    /// A handle on the node's service of type `S`, if it runs one.
    pub fn service<S: Service>(&self) -> Option<ServiceHandle<S>> {
        let id = *self.services.get(&TypeId::of::<S>())?;
        Some(ServiceHandle {
            id,
            tx: self.tx.clone(),
            _service: std::marker::PhantomData,
        })
    }

    /// A built-in service; a bootstrap node runs only some of them.
    fn builtin<S: Service>(&self) -> Result<ServiceHandle<S>, NodeError> {
        self.service::<S>().ok_or_else(|| {
            NodeError::NotFound(format!(
                "this node runs no {} service (a bootstrap node serves the DHT only)",
                std::any::type_name::<S>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("such")
            ))
        })
    }

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

    /// Largest payload [`NodeHandle::send`] takes (`transfer.max_message_size`).
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Deepest nesting of arrays and objects [`NodeHandle::send`] takes in an
    /// application payload (`protocol.max_json_depth`).
    pub fn max_json_depth(&self) -> usize {
        self.max_json_depth
    }

    /// Sends a message and answers once the recipient accepted or refused it.
    /// Application messages (`MsgType::is_application`), `wake_up` and
    /// `status_report` are sealed in an end-to-end session with the
    /// recipient, which is set up (or renewed after its lifetime) on the way;
    /// other types travel signed but not sealed. An application payload
    /// larger than `transfer.chunk_size` goes as a chunked transfer, and the
    /// answer comes once every chunk is accepted (`wake_up` and
    /// `status_report` go in one envelope). A payload of those types nested
    /// deeper than `protocol.max_json_depth` is refused with
    /// [`NodeError::Invalid`] before anything is sent (its JSON is the
    /// caller's to check; the recipient refuses what is not JSON).
    pub async fn send(
        &self,
        to: EntityId,
        msg_type: MsgType,
        payload: impl Into<Bytes>,
    ) -> Result<Delivered, NodeError> {
        let payload: Bytes = payload.into();
        if msg_type.namespace().is_some() {
            self.check_send(to, msg_type.clone()).await?;
        }
        if msg_type.is_application() && payload.len() > self.chunk_size {
            return self.send_transfer(to, msg_type, payload).await;
        }
        if msg_type.is_application() || heartbeat::is_agent_type(&msg_type) {
            check_depth(&payload, self.max_json_depth)?;
        }
        // Version "1.2", the recipient, a session id and the AEAD tag at most.
        let worst = FIXED_OVERHEAD + 3 + msg_type.as_str().len() + 32 + 16 + TAG_LEN;
        let size = worst + payload.len();
        if size > self.max_envelope_size {
            return Err(NodeError::Invalid(format!(
                "message is {size} bytes encoded; the limit is {} (protocol.max_envelope_size)",
                self.max_envelope_size
            )));
        }
        self.builtin::<messaging::Messaging>()?
            .ask(|reply| messaging::Command::Send {
                to,
                msg_type,
                payload: payload.into(),
                reply,
            })
            .await?
    }

    async fn send_transfer(
        &self,
        to: EntityId,
        msg_type: MsgType,
        payload: Bytes,
    ) -> Result<Delivered, NodeError> {
        let size = payload.len() as u64;
        if size > self.max_message_size {
            return Err(NodeError::TooLarge {
                size,
                limit: self.max_message_size,
            });
        }
        // Checking and hashing a large message take tens of ms: not on a
        // runtime worker.
        let (chunk_size, max_depth) = (self.chunk_size, self.max_json_depth);
        let (manifest, payload) = tokio::task::spawn_blocking(move || {
            check_depth(&payload, max_depth)?;
            let id = TransferId::from_random(rand::random());
            let manifest = chunk::split(msg_type, &payload, chunk_size, id)
                .map(|(m, _)| m)
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
            Ok::<_, NodeError>((manifest, payload))
        })
        .await
        .map_err(|_| NodeError::Stopped)??;
        self.builtin::<transfer::Transfers>()?
            .ask(|reply| transfer::Command::Send {
                to,
                manifest,
                payload,
                reply,
            })
            .await?
    }

    /// Connected and remembered peers, most recently seen first. The database
    /// is read on a blocking thread; the actor only adds what it alone knows
    /// (who is connected, and sessions).
    pub async fn peers(&self) -> Result<Vec<PeerView>, NodeError> {
        let store = self.store.clone();
        let records = stored(tokio::task::spawn_blocking(move || store.peers()).await)?;
        let ids = records.iter().map(|r| r.entity_id).collect();
        let live = self.ask(|reply| Command::Live(ids, reply)).await?;
        let mut peers = peer_list(records, live);
        let discovered = self
            .builtin::<discovery::Discovery>()?
            .ask(discovery::Command::Table)
            .await?;
        merge_discovered(&mut peers, discovered);
        let ids = peers.iter().map(|p| p.entity_id).collect();
        let mut health = self
            .builtin::<heartbeat::Heartbeat>()?
            .ask(|reply| heartbeat::Command::Health(ids, reply))
            .await?;
        for p in &mut peers {
            p.health = health.remove(&p.entity_id);
        }
        Ok(peers)
    }

    /// A peer by entity id: its verified record, looked up in the DHT if it
    /// is not known (`NotFound` if no valid record is found).
    pub async fn find(&self, entity: EntityId) -> Result<discovery::PeerInfo, NodeError> {
        self.builtin::<discovery::Discovery>()?
            .ask(|reply| discovery::Command::Find(entity, reply))
            .await?
    }

    /// The peers offering `capability`: the DHT's providers of it, each
    /// with a verified record that lists it, and the other peers known with
    /// such a record.
    pub async fn discover(
        &self,
        capability: String,
    ) -> Result<Vec<discovery::PeerInfo>, NodeError> {
        self.builtin::<discovery::Discovery>()?
            .ask(|reply| discovery::Command::Discover(capability, reply))
            .await?
    }

    /// What discovery knows and did.
    pub async fn discovery_stats(&self) -> Result<discovery::DiscoveryStats, NodeError> {
        self.builtin::<discovery::Discovery>()?
            .ask(discovery::Command::Stats)
            .await
    }

    /// Up to `limit` events waiting in the inbox after id `after`, oldest
    /// first (at most [`crate::inbox::MAX_PAGE`]).
    pub async fn inbox(&self, after: u64, limit: usize) -> Result<Vec<Stored>, NodeError> {
        let inbox = self.inbox.clone();
        stored(tokio::task::spawn_blocking(move || inbox.page(after, limit)).await)
    }

    /// Releases every event in the inbox with an id up to `up_to`: the agent
    /// has handled them.
    pub async fn ack(&self, up_to: u64) -> Result<Acked, NodeError> {
        self.inbox.ack(up_to).await.map_err(NodeError::from)
    }

    /// Whether `peer`'s card, if known, lets this node send it `msg_type`.
    async fn check_send(&self, peer: EntityId, msg_type: MsgType) -> Result<(), NodeError> {
        self.builtin::<card::Cards>()?
            .ask(|reply| card::Command::CheckSend {
                peer,
                msg_type,
                reply,
            })
            .await?
    }

    fn tasks(&self) -> Result<ServiceHandle<tasks::Tasks>, NodeError> {
        self.builtin::<tasks::Tasks>()
    }

    /// Hands a task to `to`: answers the task once it is stored (it is sent
    /// at once if `to` is connected, else when it connects).
    /// A peer whose card is known and does not list `task_delegate` (a node
    /// without tasks) is refused here, `UNSUPPORTED_MSG_TYPE`.
    pub async fn delegate(&self, task: NewTask) -> Result<Task, NodeError> {
        self.check_send(task.to, tasks::DELEGATE.parse().expect("a valid type"))
            .await?;
        self.tasks()?
            .ask(|reply| tasks::Command::Delegate { task, reply })
            .await?
    }

    /// One task, of either role.
    pub async fn task(&self, task_id: String) -> Result<Task, NodeError> {
        self.tasks()?
            .ask(|reply| tasks::Command::Get { task_id, reply })
            .await?
    }

    /// The tasks of a role and state, if given: submitted ones by priority
    /// (higher first) then age, others oldest first.
    pub async fn task_list(
        &self,
        role: Option<tasks::task::Role>,
        state: Option<tasks::task::State>,
    ) -> Result<Vec<Task>, NodeError> {
        self.tasks()?
            .ask(|reply| tasks::Command::List { role, state, reply })
            .await
    }

    /// A task's change by this node's agent: `Cancel` as its delegator,
    /// `Status` or `Complete` as its assignee. Answers the task once the
    /// change is stored; `INVALID_STATE` if the change is not allowed.
    pub async fn change_task(&self, change: TaskChange) -> Result<Task, NodeError> {
        self.tasks()?
            .ask(|reply| match change {
                TaskChange::Cancel { task_id, message } => tasks::Command::Cancel {
                    task_id,
                    message,
                    reply,
                },
                TaskChange::Status {
                    task_id,
                    state,
                    message,
                } => tasks::Command::Status {
                    task_id,
                    state,
                    message,
                    reply,
                },
                TaskChange::Complete {
                    task_id,
                    output,
                    artifacts,
                } => tasks::Command::Complete {
                    task_id,
                    output,
                    artifacts,
                    reply,
                },
            })
            .await?
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Message counters per peer.
    pub async fn stats(&self) -> Result<StatsView, NodeError> {
        self.ask(Command::Stats).await
    }

    /// This node's signed capability card.
    pub fn card(&self) -> Result<Arc<SignedCard>, NodeError> {
        self.card.get().ok_or(NodeError::Stopped)
    }

    /// Replaces the agent's part of the card: signs it with the next
    /// sequence, stores it (so the sequence keeps increasing across
    /// restarts), then uses it and pushes it to every connected peer.
    /// Answers the card now in use.
    pub async fn set_card(&self, content: CardContent) -> Result<Arc<SignedCard>, NodeError> {
        let cards = self.builtin::<card::Cards>()?;
        let signed = cards
            .ask(|reply| card::Command::Sign { content, reply })
            .await??;
        let store = self.store.clone();
        let to_store = signed.clone();
        stored(tokio::task::spawn_blocking(move || card::save(&store, &to_store)).await).map_err(
            |e| match e {
                NodeError::Storage(e) => {
                    NodeError::Storage(format!("the card could not be stored: {e}"))
                }
                e => e,
            },
        )?;
        cards
            .ask(|reply| card::Command::Adopt {
                card: signed,
                reply,
            })
            .await
    }

    /// A peer's verified card: the one cached, else asked of the peer if it
    /// is connected; `None` if there is none.
    pub async fn peer_card(&self, peer: EntityId) -> Result<Option<Arc<SignedCard>>, NodeError> {
        self.builtin::<card::Cards>()?
            .ask(|reply| card::Command::Peer { peer, reply })
            .await
    }
}

/// `NodeError::Invalid` if `payload` nests deeper than `max_depth`.
fn check_depth(payload: &[u8], max_depth: usize) -> Result<(), NodeError> {
    json::check_depth(payload, max_depth).map_err(|e| NodeError::Invalid(format!("payload is {e}")))
}

/// What only the actor knows about peers.
#[derive(Debug)]
pub(crate) struct Live {
    /// The connected peers, as of now.
    pub(crate) connected: Vec<PeerView>,
    /// The live sessions of the peers asked about.
    pub(crate) sessions: HashMap<EntityId, SessionView>,
}

/// The peer list: the remembered peers, each replaced by its live view if it
/// is connected, then the connected peers not (yet) remembered; most recently
/// seen first.
fn peer_list(records: Vec<PeerRecord>, live: Live) -> Vec<PeerView> {
    let mut connected: HashMap<EntityId, PeerView> = live
        .connected
        .into_iter()
        .map(|p| (p.entity_id, p))
        .collect();
    let mut sessions = live.sessions;
    let mut out: Vec<PeerView> = records
        .into_iter()
        .map(|r| match connected.remove(&r.entity_id) {
            Some(view) => view,
            None => PeerView {
                session: sessions.remove(&r.entity_id),
                entity_id: r.entity_id,
                peer_id: r.peer_id,
                addrs: r.addrs,
                connected: false,
                last_seen_ms: r.last_seen_ms,
                health: None,
                verified: false,
                capabilities: Vec::new(),
            },
        })
        .collect();
    out.extend(connected.into_values());
    out.sort_by_key(|p| (Reverse(p.last_seen_ms), p.entity_id));
    out
}

/// Adds what discovery knows to the peer list: whether each peer's record is
/// verified and its capabilities, and the peers only discovery knows.
fn merge_discovered(peers: &mut Vec<PeerView>, discovered: Vec<discovery::PeerInfo>) {
    let mut by_id: HashMap<EntityId, discovery::PeerInfo> =
        discovered.into_iter().map(|d| (d.entity_id, d)).collect();
    for p in peers.iter_mut() {
        if let Some(d) = by_id.remove(&p.entity_id) {
            p.verified = d.verified;
            p.capabilities = d.capabilities;
        }
    }
    let mut rest: Vec<PeerView> = by_id
        .into_values()
        .map(|d| PeerView {
            entity_id: d.entity_id,
            peer_id: d.peer_id,
            addrs: d.addresses,
            connected: d.connected,
            session: None,
            last_seen_ms: 0,
            health: None,
            verified: d.verified,
            capabilities: d.capabilities,
        })
        .collect();
    rest.sort_by_key(|p| p.entity_id);
    peers.extend(rest);
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the node: {0}")]
pub struct StartError(String);

/// `e` and its sources, joined by `: `. A text already shown by the error
/// before it is left out (many errors repeat their source), and so are empty
/// ones (libp2p's `TransportError::Other` shows nothing of its own).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemClock.wall_ms()
}

/// Starts a node with the built-in services on the current tokio runtime (see
/// [`Builder`]).
pub fn start(config: Config, identity: Identity, store: Store) -> Result<NodeHandle, StartError> {
    Builder::new(config, identity, store).start()
}

/// Builds a node: its configuration, identity and database, its services (the
/// built-in ones, and any added with [`Builder::service`]) and its clock.
pub struct Builder {
    config: Config,
    identity: Identity,
    store: Store,
    clock: Arc<dyn Clock>,
    services: Vec<Box<dyn Erased>>,
    types: HashMap<TypeId, ServiceId>,
    card: CardCell,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field(
                "services",
                &self.services.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// A node with the built-in services (ping, handshake, messaging, chunked
    /// transfer, heartbeat, capability cards; tasks and discovery are added
    /// at start) and the system clock. In the bootstrap role
    /// (`discovery.bootstrap_node`) only ping and heartbeat (and discovery):
    /// the node serves the DHT and keeps no application state.
    pub fn new(config: Config, identity: Identity, store: Store) -> Self {
        let card = CardCell::default();
        let heartbeat = heartbeat::Heartbeat::new(config.heartbeat.clone());
        let bootstrap_node = config.discovery.bootstrap_node;
        let app = (!bootstrap_node).then(|| {
            (
                messaging::Messaging::new(card.clone(), config.card.classes().collect()),
                transfer::Transfers::new(config.transfer.clone(), card.clone()),
                card::Cards::new(&config.card, card.clone()),
            )
        });
        let builder = Self {
            config,
            identity,
            store,
            clock: Arc::new(SystemClock),
            services: Vec::new(),
            types: HashMap::new(),
            card,
        }
        .service(ping::Ping);
        match app {
            None => builder.service(heartbeat),
            Some((messaging, transfers, cards)) => builder
                .service(handshake::Handshake)
                .service(messaging)
                .service(transfers)
                .service(heartbeat)
                .service(cards),
        }
    }

    /// Adds a service; [`NodeHandle::service`] reaches it by its type. A
    /// second service of the same type replaces nothing: the first is reached.
    pub fn service<S: Service>(mut self, service: S) -> Self {
        let id = ServiceId(self.services.len());
        self.types.entry(TypeId::of::<S>()).or_insert(id);
        self.services.push(Box::new(service));
        self
    }

    /// Reads the time from `clock` instead of the system's.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Starts the node actor on the current tokio runtime: listens, dials the
    /// bootstrap peers, and serves commands until every handle is dropped.
    /// Peer sightings are written to the database by a thread of their own,
    /// which ends after the actor. Fails if the configuration is invalid
    /// ([`Config::check`]), two services own one message type, or the network
    /// cannot start.
    pub fn start(self) -> Result<NodeHandle, StartError> {
        // The tasks and discovery services start from what the database holds.
        let discovery = discovery::Discovery::load(
            &self.store,
            self.config.discovery.clone(),
            self.card.clone(),
            self.clock.wall_ms(),
        )
        .map_err(|e| StartError(format!("cannot load the DHT records: {e}")))?;
        let mut builder = self.service(discovery);
        if !builder.config.discovery.bootstrap_node {
            let tasks = tasks::Tasks::load(
                &builder.store,
                builder.config.tasks.clone(),
                builder.card.clone(),
            )
            .map_err(|e| StartError(format!("cannot load the tasks: {e}")))?;
            builder = builder.service(tasks);
        }
        let Self {
            config,
            identity,
            store,
            clock,
            services,
            types,
            card,
        } = builder;
        config.check().map_err(|e| StartError(e.to_string()))?;
        let routes = Routes::build(&services).map_err(StartError)?;
        let own = card::initial(&config, &identity, &store, routes.types(), clock.wall_ms())
            .map_err(|e| StartError(format!("cannot load or store the capability card: {e}")))?;
        card.set(Arc::new(own));
        let key = net::keypair(identity.secret_bytes());
        let peer_id = key.public().to_peer_id();
        let (mut swarm, inbound) =
            net::build_swarm(key, &config).map_err(|e| StartError(error_chain(&*e)))?;
        for addr in &config.network.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| StartError(format!("cannot listen on {addr}: {}", error_chain(&e))))?;
        }
        for addr in &config.network.bootstrap {
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
        let store = Arc::new(store);
        // The thread is not joined: it ends by itself once the actor drops the writer.
        let (writer, _) = Writer::spawn(
            store.clone(),
            config.network.store_queue,
            config.network.max_known_peers,
        )
        .map_err(|e| StartError(format!("cannot start the database writer: {e}")))?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(config.api.event_buffer.max(1));
        let (committed_tx, committed) = mpsc::channel(COMMAND_QUEUE);
        let inbox = Inbox::start(
            store.clone(),
            config.inbox.clone(),
            committed_tx,
            events.clone(),
        )
        .map_err(|e| StartError(format!("cannot open the inbox: {e}")))?;
        let metrics = Metrics::new(
            writer.counters(),
            inbox.counters(),
            swarm.behaviour().pool.counters(),
        );
        let handle = NodeHandle {
            tx,
            max_envelope_size: config.protocol.max_envelope_size,
            chunk_size: config.transfer.chunk_size,
            max_message_size: config.transfer.max_message_size,
            max_json_depth: config.protocol.max_json_depth,
            entity_id: identity.entity_id(),
            peer_id,
            events: events.clone(),
            metrics: metrics.clone(),
            services: Arc::new(types),
            store,
            inbox: inbox.clone(),
            card,
        };
        let parts = actor::Parts {
            swarm,
            inbound,
            config: Arc::new(config),
            identity,
            writer,
            clock,
            events,
            inbox,
            committed,
            services,
            routes,
            metrics,
        };
        actor::spawn(parts, rx);
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn storage_work_that_failed_or_panicked_is_a_storage_failure() {
        let failed: Result<(), StoreError> = Err("disk full".to_owned().into());
        let e = stored(tokio::task::spawn_blocking(move || failed).await).expect_err("failed");
        assert_eq!(e, NodeError::Storage("database error: disk full".into()));
        let panicked = tokio::task::spawn_blocking(|| -> Result<(), StoreError> { panic!("boom") });
        let e = stored(panicked.await).expect_err("panicked");
        assert!(
            matches!(&e, NodeError::Storage(m) if m.contains("panic")),
            "{e:?}"
        );
        let cancelled = tokio::spawn(async {
            std::future::pending::<()>().await;
            Ok::<(), StoreError>(())
        });
        cancelled.abort();
        assert_eq!(stored(cancelled.await), Err(NodeError::Stopped));
    }

    #[tokio::test]
    async fn a_listen_error_names_the_os_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let mut config = Config::default();
        config.network.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")];
        let store = Store::open(&tmp.path().join("db")).expect("store");
        let err = start(config, Identity::from_secret(&[5; 32]), store).expect_err("port taken");
        let text = err.to_string();
        assert!(
            text.contains(&format!("cannot listen on /ip4/127.0.0.1/tcp/{port}: ")),
            "{text}"
        );
        // "Address already in use (os error 98)" on Linux.
        assert!(text.contains("in use"), "{text}");
    }

    #[test]
    fn events_are_tagged_by_type_and_carry_payloads_verbatim() {
        let peer = Identity::from_secret(&[3; 32]).entity_id();
        let progress = Event::TransferProgress {
            transfer_id: "t".into(),
            peer,
            direction: Direction::Inbound,
            done_bytes: 1,
            total_bytes: 2,
            done_chunks: 3,
            chunk_count: 4,
        };
        assert_eq!(
            serde_json::to_value(&progress).expect("json"),
            serde_json::json!({
                "type": "transfer_progress", "transfer_id": "t", "peer": peer,
                "direction": "inbound", "done_bytes": 1, "total_bytes": 2,
                "done_chunks": 3, "chunk_count": 4,
            })
        );
        let message = Event::Message {
            event_id: None,
            message_id: "m".into(),
            from: peer,
            msg_type: "message".into(),
            payload: RawJson::parse(br#"{ "a" : 1 }"#.to_vec(), 64).expect("json"),
        };
        let text = serde_json::to_string(&message).expect("json");
        assert!(text.contains(r#""payload":{ "a" : 1 }"#), "{text}");
        let health = Event::PeerHealth {
            entity_id: peer,
            state: Health::Unreachable,
        };
        assert_eq!(
            serde_json::to_value(&health).expect("json"),
            serde_json::json!({"type": "peer_health", "entity_id": peer, "state": "unreachable"})
        );
    }

    #[test]
    fn the_peer_list_joins_remembered_and_live_peers() {
        let id = |b: u8| EntityId([b; 32]);
        let record = |b: u8, seen: u64| PeerRecord {
            entity_id: id(b),
            peer_id: format!("stored{b}"),
            addrs: vec![],
            last_seen_ms: seen,
        };
        let view = |b: u8, seen: u64| PeerView {
            entity_id: id(b),
            peer_id: format!("live{b}"),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{b}")],
            connected: true,
            session: None,
            last_seen_ms: seen,
            health: None,
            verified: false,
            capabilities: Vec::new(),
        };
        let session = SessionView {
            session_id: "s".into(),
            state: "READY".into(),
            role: "initiator".into(),
            expires_ms: 9,
        };
        // 1 is remembered with a session, 2 remembered and connected again,
        // 3 connected and not written yet.
        let live = Live {
            connected: vec![view(2, 50), view(3, 40)],
            sessions: HashMap::from([(id(1), session.clone())]),
        };
        let list = peer_list(vec![record(1, 10), record(2, 20)], live);
        let got: Vec<(u8, bool, u64, &str)> = list
            .iter()
            .map(|p| (p.entity_id.0[0], p.connected, p.last_seen_ms, &*p.peer_id))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, true, 50, "live2"),
                (3, true, 40, "live3"),
                (1, false, 10, "stored1"),
            ]
        );
        assert_eq!(list[2].session, Some(session));
    }

    #[test]
    fn the_error_chain_skips_repeats_and_empty_texts() {
        #[derive(Debug)]
        struct Outer(std::io::Error, &'static str);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.1)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = || std::io::Error::other("boom");
        assert_eq!(error_chain(&Outer(io(), "")), "boom");
        assert_eq!(error_chain(&Outer(io(), "failed: boom")), "failed: boom");
        assert_eq!(error_chain(&Outer(io(), "failed")), "failed: boom");
    }
}
