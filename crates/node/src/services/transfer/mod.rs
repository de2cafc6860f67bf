//! Chunked transfer (PROTOCOL.md section 9): sending large messages part by
//! part, receiving their parts into the reassembler, asking for missing
//! chunks, and reporting progress on the event stream.
//!
//! Rate limits: a transfer counts once against the sender's `chunk` class (its
//! manifest, charged on arrival) and once against the class of the message it
//! carries; its chunks count only when refused or repeated (the route of
//! `chunk` is charged by this service), so a peer cannot flood chunks for free
//! but a transfer within the receiver's limits is not slowed to 120 chunks a
//! minute.

mod config;
mod outgoing;

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use peer_core::chunk::{
    self, Chunk, MSG_CHUNK, MSG_MANIFEST, MSG_RESEND, Manifest, Progress, Reassembler,
    ResendRequest, Status, TransferId,
};
use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, MessageId, MsgType, Rejection};

pub use config::TransferConfig;
pub use outgoing::{GaveUp, MAX_THROTTLE_WAIT_MS, MAX_THROTTLES, Outgoing, Part, crosses_tenth};

use crate::actor::Reply as Answerer;
use crate::node::{Delivered, Direction, Event, NodeError};
use crate::secure::parse_json;
use crate::service::{
    Answer, Context, Inbound, Outcome, PeerEvent, Refused, Reply, RequestId, Route, Service,
    ServiceId, TransferRequest,
};
use crate::services::card::CardCell;

/// The `transfer_failed` code of an incoming transfer dropped for lack of progress.
const EXPIRED: &str = "EXPIRED";

/// How long a chunk waits when this node's own outbound limits were reached (ms).
const LOCAL_BUSY_WAIT_MS: u64 = 100;

/// What the transfer service takes from handles.
#[derive(Debug)]
pub enum Command {
    /// Send the message `manifest` describes (its bytes are `payload`) to `to`.
    Send {
        /// The recipient.
        to: EntityId,
        /// The transfer's manifest.
        manifest: Manifest,
        /// The whole message.
        payload: Bytes,
        /// Where the outcome goes.
        reply: Answerer<Delivered>,
    },
    /// Send another service's message, too large for one envelope, on its
    /// behalf ([`Context::send_message`]); the outcome goes to its request.
    SendFor(TransferRequest),
}

/// Whom an outgoing transfer's outcome goes to.
#[derive(Debug)]
pub enum Origin {
    /// A handle (the agent's message).
    Handle(Answerer<Delivered>),
    /// A service's request.
    Service(ServiceId, RequestId),
}

impl Origin {
    /// Tells the outcome of transfer `id` to `to`.
    fn finish(
        self,
        cx: &mut Context<'_>,
        to: EntityId,
        id: TransferId,
        result: Result<Delivered, NodeError>,
    ) {
        match self {
            Self::Handle(reply) => _ = reply.send(result),
            Self::Service(owner, request) => cx.hand_back(
                owner,
                request,
                Outcome {
                    message_id: MessageId::from_random(id.0),
                    to,
                    result: result.map(|_| Reply::Accepted),
                },
            ),
        }
    }
}

/// Sends and receives chunked transfers.
pub struct Transfers {
    config: TransferConfig,
    /// The node's card, for the namespaces it accepts.
    card: CardCell,
    /// Transfers this node sends, by receiver and transfer id.
    sending: HashMap<(EntityId, TransferId), Outgoing<Origin>>,
    /// Transfers in `sending` not started yet, per receiver, oldest first.
    queued: HashMap<EntityId, VecDeque<TransferId>>,
    /// Parts in flight, by request.
    parts: HashMap<RequestId, (EntityId, TransferId, Part)>,
    /// Transfers this node receives.
    receiving: Reassembler<EntityId>,
    /// No timer is due before this (monotonic ms); exact after `on_timeout`,
    /// lowered by everything that sets a timer.
    next_deadline: Option<u64>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers")
            .field("sending", &self.sending.len())
            .field("receiving", &self.receiving.len())
            .finish_non_exhaustive()
    }
}

type Refusal = Result<(), Refused>;

fn malformed(what: &str, e: impl std::fmt::Display) -> Refused {
    Rejection::new(ErrorCode::MalformedMessage, format!("{what}: {e}")).into()
}

fn msg_type(name: &str) -> MsgType {
    name.parse().expect("chunk types are valid")
}

fn min_deadline(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Transfers {
    /// A transfer service with `config`, taking transfers of the namespaced
    /// types only if `card` accepts their namespace.
    pub fn new(config: TransferConfig, card: CardCell) -> Self {
        Self {
            receiving: Reassembler::new(config.reassembly()),
            config,
            card,
            sending: HashMap::new(),
            queued: HashMap::new(),
            parts: HashMap::new(),
            next_deadline: None,
        }
    }

    fn wake_at(&mut self, at: Option<u64>) {
        self.next_deadline = min_deadline(self.next_deadline, at);
    }

    /// The agent's large message: announces the transfer, then sends its chunks.
    fn start(
        &mut self,
        cx: &mut Context<'_>,
        to: EntityId,
        manifest: Manifest,
        payload: Bytes,
        reply: Origin,
    ) {
        let tid = manifest.transfer_id;
        if !cx.is_connected(&to) {
            reply.finish(cx, to, tid, Err(NodeError::NotConnected(to)));
            return;
        }
        let (max_transfers, max_bytes) = (self.config.max_outgoing, self.config.max_outgoing_bytes);
        let bytes: u64 = self.sending.values().map(|t| t.manifest.total_len).sum();
        if self.sending.len() >= max_transfers
            || bytes.saturating_add(manifest.total_len) > max_bytes
        {
            let e = NodeError::TooManyTransfers {
                transfers: self.sending.len(),
                bytes,
                max_transfers,
                max_bytes,
            };
            reply.finish(cx, to, tid, Err(e));
            return;
        }
        let id = manifest.transfer_id;
        self.sending
            .insert((to, id), Outgoing::new(to, manifest, payload, reply));
        self.queued.entry(to).or_default().push_back(id);
        self.start_queued(cx, to);
    }

    /// A service's message: its manifest is made here, on the actor. Hashing
    /// it costs about as much as sealing it (a few ms per MB, bounded by
    /// `transfer.max_message_size`); [`Context::send_message`] is for the
    /// node's own rare large messages (task results), the agent's go
    /// through a handle, hashed off the actor.
    fn start_for(&mut self, cx: &mut Context<'_>, t: TransferRequest) {
        let TransferRequest {
            owner,
            id,
            to,
            msg_type,
            payload,
        } = t;
        let tid = TransferId::from_random(rand::random());
        let origin = Origin::Service(owner, id);
        match chunk::split(msg_type, &payload, self.config.chunk_size, tid) {
            Ok((manifest, _)) => self.start(cx, to, manifest, payload.into(), origin),
            Err(e) => origin.finish(cx, to, tid, Err(NodeError::Invalid(e.to_string()))),
        }
    }

    /// Starts queued transfers to `to` while fewer than
    /// `transfer.max_transfers_per_peer` run: the receiver refuses more than its
    /// own limit (the same setting, by default), so more would only fail.
    fn start_queued(&mut self, cx: &mut Context<'_>, to: EntityId) {
        let limit = self.config.max_transfers_per_peer;
        let queued = self.queued.get(&to).map_or(0, |q| q.len());
        let running =
            (self.sending.keys().filter(|(t, _)| *t == to).count()).saturating_sub(queued);
        for _ in running..limit {
            let Some(id) = self.queued.get_mut(&to).and_then(|q| q.pop_front()) else {
                break;
            };
            self.pump(cx, to, id);
        }
        if self.queued.get(&to).is_some_and(|q| q.is_empty()) {
            self.queued.remove(&to);
        }
    }

    /// Transfer `id` to `to` is over: it leaves the table, and the next queued
    /// one to that peer may start.
    fn end(
        &mut self,
        cx: &mut Context<'_>,
        to: EntityId,
        id: TransferId,
    ) -> Option<Outgoing<Origin>> {
        let t = self.sending.remove(&(to, id))?;
        if let Some(q) = self.queued.get_mut(&to) {
            q.retain(|queued| *queued != id);
        }
        self.start_queued(cx, to);
        Some(t)
    }

    /// Sends what transfer `id` to `to` has due.
    fn pump(&mut self, cx: &mut Context<'_>, to: EntityId, id: TransferId) {
        let window = self.config.window;
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        let parts: Vec<(Part, Vec<u8>)> = t
            .due(cx.now_ms(), window)
            .into_iter()
            .map(|part| (part, t.encode(part)))
            .collect();
        for (part, payload) in parts {
            let name = match part {
                Part::Manifest => MSG_MANIFEST,
                Part::Chunk(_) => MSG_CHUNK,
            };
            let req = cx.send(to, msg_type(name), payload);
            self.parts.insert(req, (to, id, part));
        }
    }

    /// The receiver accepted `part`.
    fn part_accepted(&mut self, cx: &mut Context<'_>, to: EntityId, id: TransferId, part: Part) {
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        let (before, _) = t.progress();
        let complete = t.accepted(part);
        let (after, done_bytes) = t.progress();
        let count = t.manifest.chunk_count;
        let total_bytes = t.manifest.total_len;
        if part == Part::Manifest || crosses_tenth(before, after, count) {
            cx.emit(Event::TransferProgress {
                transfer_id: id.to_string(),
                peer: to,
                direction: Direction::Outbound,
                done_bytes,
                total_bytes,
                done_chunks: after,
                chunk_count: count,
            });
        }
        if !complete {
            return self.pump(cx, to, id);
        }
        if let Some(t) = self.end(cx, to, id) {
            cx.stats().sent(to);
            let delivered = Delivered {
                message_id: id.to_string(),
                reply: None,
            };
            t.reply.finish(cx, to, id, Ok(delivered));
        }
    }

    /// `part` did not get through. Sent again after a transport failure or a
    /// lost session, up to `transfer.max_attempts`; any other failure (the
    /// receiver refused it) ends the transfer.
    fn part_failed(
        &mut self,
        cx: &mut Context<'_>,
        to: EntityId,
        id: TransferId,
        part: Part,
        e: NodeError,
    ) {
        let max_attempts = self.config.max_attempts;
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        // The receiver counts chunks against its limits (wait as it says), or
        // this node's outbound limits are reached (wait a moment): throttled.
        let wait = match (&e, part) {
            (
                NodeError::Rejected {
                    code,
                    retry_after_ms,
                    ..
                },
                Part::Chunk(_),
            ) if code == ErrorCode::RateLimited.as_str() => Some(retry_after_ms.unwrap_or(1000)),
            (NodeError::Busy(_), Part::Chunk(_)) => Some(LOCAL_BUSY_WAIT_MS),
            _ => None,
        };
        let now = cx.now_ms();
        // `Ok(true)`: send again now; `Ok(false)`: after the wait.
        let outcome = match (wait, part) {
            (Some(ms), Part::Chunk(i)) => Some(t.throttled(i, now, ms).map(|()| false)),
            _ if matches!(e, NodeError::Transport(_)) || crate::service::lost_session(&e) => {
                Some(t.failed(part, max_attempts).map(|()| true))
            }
            _ => None,
        };
        let resume = t.resume_at();
        let e = match outcome {
            Some(Ok(now)) => {
                if now {
                    self.pump(cx, to, id);
                } else {
                    self.wake_at(resume);
                }
                return;
            }
            Some(Err(gave_up)) => NodeError::Transport(format!(
                "transfer {id}: {:?} failed or was held back {} times, the last: {e}",
                gave_up.part, gave_up.attempts
            )),
            None => e,
        };
        self.fail(cx, to, id, e);
    }

    /// Ends transfer `id` to `to` with `e`: tells the agent and the event stream.
    fn fail(&mut self, cx: &mut Context<'_>, to: EntityId, id: TransferId, e: NodeError) {
        let Some(t) = self.end(cx, to, id) else {
            return;
        };
        let (code, reason) = match &e {
            NodeError::Rejected { code, reason, .. } => (code.clone(), reason.clone()),
            other => ("DELIVERY_FAILED".to_owned(), other.to_string()),
        };
        if let NodeError::Rejected { code, .. } = &e {
            cx.stats().refused(to, code);
        }
        cx.emit(Event::TransferFailed {
            transfer_id: id.to_string(),
            peer: to,
            direction: Direction::Outbound,
            code,
            reason,
        });
        t.reply.finish(cx, to, id, Err(e));
    }

    /// A `chunk_manifest` from `from`: opens the transfer if it is within
    /// this node's limits, before anything is buffered.
    fn on_manifest(&mut self, cx: &mut Context<'_>, from: EntityId, plaintext: &[u8]) -> Refusal {
        let m = Manifest::decode(plaintext).map_err(|e| malformed("chunk_manifest", e))?;
        let for_service = cx.takes_large(&m.msg_type);
        if !for_service && !m.msg_type.is_application() {
            return Err(Rejection::new(
                ErrorCode::UnsupportedMsgType,
                format!(
                    "transfer {}: this node takes transfers of application messages and task results only, not {:?}",
                    m.transfer_id,
                    m.msg_type.as_str()
                ),
            )
            .into());
        }
        if !for_service {
            self.card.check_accepts(&m.msg_type)?;
        }
        // The message it carries counts against its own class, as if it came whole.
        cx.charge(from, cx.class_of(&m.msg_type))?;
        let now = cx.now_ms();
        let new = self.receiving.begin(now, &from, &m)?;
        // Messages the agent has not read yet share the reassembly budget.
        let held = cx.unread_bytes();
        let reserved = self.receiving.reserved_bytes();
        let budget = self.config.max_buffered_bytes;
        if new && held.saturating_add(reserved) > budget {
            self.receiving.abort(&from, m.transfer_id);
            return Err(Rejection::new(
                ErrorCode::ChunkError,
                format!(
                    "receiver busy: {held} bytes of messages wait for its agent and {} are reserved by open transfers; {} more would exceed its budget of {budget} bytes; retry later",
                    reserved.saturating_sub(m.total_len),
                    m.total_len
                ),
            )
            .into());
        }
        if new {
            let start = Status {
                received_chunks: 0,
                chunk_count: m.chunk_count,
                received_bytes: 0,
                total_len: m.total_len,
            };
            // Its first timer: a resend request, or expiry if that comes first.
            let first = self
                .config
                .resend_after_ms
                .min(self.config.expiry_secs.saturating_mul(1000));
            self.wake_at(Some(now.saturating_add(first).saturating_add(1)));
            Self::inbound_progress(cx, from, m.transfer_id, start);
        }
        Ok(())
    }

    fn inbound_progress(cx: &mut Context<'_>, from: EntityId, id: TransferId, st: Status) {
        cx.emit(Event::TransferProgress {
            transfer_id: id.to_string(),
            peer: from,
            direction: Direction::Inbound,
            done_bytes: st.received_bytes,
            total_bytes: st.total_len,
            done_chunks: st.received_chunks,
            chunk_count: st.chunk_count,
        });
    }

    fn inbound_failed(
        cx: &mut Context<'_>,
        from: EntityId,
        id: TransferId,
        code: &str,
        reason: String,
    ) {
        cx.emit(Event::TransferFailed {
            transfer_id: id.to_string(),
            peer: from,
            direction: Direction::Inbound,
            code: code.to_owned(),
            reason,
        });
    }

    /// A `chunk` from `from`: stored in its transfer; when it completes the
    /// transfer, the reassembled message is delivered to the agent, or one of
    /// a [`Route::large`] type forwarded to its service (whose answer is the
    /// chunk's). A refused chunk costs a token of the sender's `chunk` class.
    fn on_chunk(&mut self, cx: &mut Context<'_>, msg: &Inbound) -> Refusal {
        let (from, plaintext) = (msg.from, msg.payload.as_slice());
        let chunk = match Chunk::decode(plaintext) {
            Ok(c) => c,
            Err(e) => {
                cx.charge(from, Class::Chunk)?;
                return Err(malformed("chunk", e));
            }
        };
        let tid = chunk.transfer_id;
        let before = self.receiving.status(&from, tid);
        let now = cx.now_ms();
        match self.receiving.add(now, &from, &chunk) {
            Ok(Progress::Partial(st)) => {
                let done_before = before.map_or(0, |b| b.received_chunks);
                if st.received_chunks == done_before {
                    // A repeat: accepted, but not for free.
                    cx.charge(from, Class::Chunk)?;
                } else if crosses_tenth(done_before, st.received_chunks, st.chunk_count) {
                    Self::inbound_progress(cx, from, tid, st);
                }
                Ok(())
            }
            Ok(Progress::AlreadyComplete) => cx.charge(from, Class::Chunk),
            Ok(Progress::Complete { msg_type, payload }) if cx.takes_large(&msg_type) => {
                if let Some(b) = before {
                    let done = Status {
                        received_chunks: b.chunk_count,
                        received_bytes: b.total_len,
                        ..b
                    };
                    Self::inbound_progress(cx, from, tid, done);
                }
                // Its service checks it (it is not the agent's JSON).
                cx.forward(Inbound {
                    from,
                    sender_key: msg.sender_key,
                    message_id: MessageId::from_random(tid.0),
                    msg_type,
                    payload,
                    sealed: msg.sealed,
                });
                Ok(())
            }
            Ok(Progress::Complete { msg_type, payload }) => {
                match parse_json(payload, cx.config().protocol.max_json_depth) {
                    Ok(payload) => {
                        if let Some(b) = before {
                            let done = Status {
                                received_chunks: b.chunk_count,
                                received_bytes: b.total_len,
                                ..b
                            };
                            Self::inbound_progress(cx, from, tid, done);
                        }
                        let message = Event::message(tid, from, &msg_type, payload);
                        if let Err(full) = cx.deliver(message) {
                            // The whole message is dropped; its sender's
                            // transfer fails with INBOX_FULL and may start
                            // again after the wait.
                            self.receiving.abort(&from, tid);
                            let r = &full.rejection;
                            Self::inbound_failed(cx, from, tid, r.code.as_str(), r.reason.clone());
                            return Err(full);
                        }
                        Ok(())
                    }
                    Err(r) => {
                        // Refused after all: a repeat of its chunks must not pass
                        // for delivered.
                        self.receiving.abort(&from, tid);
                        Self::inbound_failed(cx, from, tid, r.code.as_str(), r.reason.clone());
                        cx.charge(from, Class::Chunk)?;
                        Err(r.into())
                    }
                }
            }
            Err(r) => {
                if before.is_some() && self.receiving.status(&from, tid).is_none() {
                    // The whole message did not match its manifest: dropped.
                    Self::inbound_failed(cx, from, tid, r.code.as_str(), r.reason.clone());
                }
                cx.charge(from, Class::Chunk)?;
                Err(r.into())
            }
        }
    }

    /// A `chunk_resend` from the receiver of one of our transfers: queues the
    /// chunks it lists. One for a transfer we do not hold is ignored.
    fn on_resend(&mut self, cx: &mut Context<'_>, from: EntityId, plaintext: &[u8]) -> Refusal {
        let request = ResendRequest::decode(plaintext).map_err(|e| malformed("chunk_resend", e))?;
        let tid = request.transfer_id;
        // A transfer still waiting its turn has sent nothing to resend.
        if let Some(t) = self.sending.get_mut(&(from, tid))
            && t.is_announced()
        {
            t.resend(request.indexes());
            self.pump(cx, from, tid);
        }
        Ok(())
    }

    /// The exact earliest deadline: throttled transfers resuming, incoming
    /// transfers due a resend request, to be dropped or expired.
    fn recompute_deadline(&mut self) {
        let resume = self.sending.values().filter_map(Outgoing::resume_at).min();
        let receiving = self
            .receiving
            .poll_timeout(self.config.resend_after_ms, self.config.max_resend_requests);
        self.next_deadline = min_deadline(resume, receiving);
    }
}

impl Service for Transfers {
    type Command = Command;

    fn name(&self) -> &'static str {
        "transfer"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::sealed(MSG_MANIFEST, Class::Chunk),
            Route::sealed(MSG_CHUNK, Class::Chunk).charged_by_service(),
            Route::sealed(MSG_RESEND, Class::Chunk),
        ]
    }

    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let result = match msg.msg_type.as_str() {
            MSG_MANIFEST => self.on_manifest(cx, msg.from, &msg.payload),
            MSG_CHUNK => self.on_chunk(cx, &msg),
            _ => self.on_resend(cx, msg.from, &msg.payload),
        };
        match result {
            Ok(()) => Answer::Accepted,
            Err(r) => r.into(),
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: Command) {
        match command {
            Command::Send {
                to,
                manifest,
                payload,
                reply,
            } => self.start(cx, to, manifest, payload, Origin::Handle(reply)),
            Command::SendFor(t) => self.start_for(cx, t),
        }
    }

    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        // Requests not in `parts` are our `chunk_resend`s: their answers change nothing.
        let Some((to, tid, part)) = self.parts.remove(&id) else {
            return;
        };
        match outcome.result {
            Ok(_) => self.part_accepted(cx, to, tid, part),
            Err(e) => self.part_failed(cx, to, tid, part, e),
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.next_deadline
    }

    /// Resumes throttled transfers, drops incoming transfers idle past
    /// `transfer.expiry_secs` or whose resend requests went unanswered, and
    /// asks for the missing chunks of those idle past `transfer.resend_after_ms`.
    fn on_timeout(&mut self, cx: &mut Context<'_>) {
        let now = cx.now_ms();
        let resumed: Vec<(EntityId, TransferId)> = self
            .sending
            .iter()
            .filter(|(_, t)| t.resume_at().is_some_and(|at| at <= now))
            .map(|(key, _)| *key)
            .collect();
        for (to, id) in resumed {
            self.pump(cx, to, id);
        }
        for (from, id) in self.receiving.expire(now) {
            let reason = format!(
                "no new chunk for {} s; transfer dropped",
                self.config.expiry_secs
            );
            Self::inbound_failed(cx, from, id, EXPIRED, reason);
        }
        let (after, max) = (self.config.resend_after_ms, self.config.max_resend_requests);
        for (from, id) in self.receiving.drop_stalled(now, after, max) {
            let reason = format!("no new chunk after {max} resend requests; transfer dropped");
            Self::inbound_failed(cx, from, id, EXPIRED, reason);
        }
        for (from, request) in self.receiving.resend_due(now, after, max) {
            tracing::debug!(%from, transfer = %request.transfer_id, missing = request.indexes().len(), "asking for missing chunks");
            cx.send(from, msg_type(MSG_RESEND), request.encode());
        }
        self.recompute_deadline();
    }

    /// The last connection to a peer closed: its outgoing transfers end,
    /// running or queued (nothing re-dials it).
    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        let PeerEvent::Disconnected(to) = event else {
            return;
        };
        self.queued.remove(&to);
        let ids: Vec<TransferId> = self
            .sending
            .keys()
            .filter(|(peer, _)| *peer == to)
            .map(|(_, id)| *id)
            .collect();
        for id in ids {
            self.fail(cx, to, id, NodeError::NotConnected(to));
        }
    }
}
