//! The actor's side of chunked transfer (protocol section 9): sending
//! transfers part by part, receiving their parts into the reassembler, asking
//! for missing chunks, and reporting progress on the event stream.
//!
//! Rate limits: a transfer counts once against the sender's `chunk` class (its
//! manifest) and once against the class of the message it carries; its chunks
//! count only when refused or repeated, so a peer cannot flood chunks for free
//! but a transfer within the receiver's limits is not slowed to 120 chunks a
//! minute.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use peer_core::chunk::{Chunk, Manifest, Progress, ResendRequest, Status, TransferId};
use peer_core::inbound::Refusal;
use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, MessageId, MsgType, Rejection};

use super::{Actor, Reply, Waiter, lost_session, refusal};
use crate::node::{Delivered, Direction, Event, NodeError, now_ms};
use crate::secure::{Opened, parse_json};
use crate::transfer::{Outgoing, Part, crosses_tenth};

type Refused = (Refusal, Option<Duration>);

/// The `transfer_failed` code of an incoming transfer dropped for lack of progress.
const EXPIRED: &str = "EXPIRED";

/// How long a chunk waits when this node's own outbound queue was full (ms).
const LOCAL_BUSY_WAIT_MS: u64 = 100;

fn malformed(id: MessageId, what: &str, e: impl std::fmt::Display) -> Refused {
    refusal(
        id,
        Rejection::new(ErrorCode::MalformedMessage, format!("{what}: {e}")),
    )
}

fn msg_type(name: &str) -> MsgType {
    name.parse().expect("chunk types are valid")
}

impl Actor {
    /// The agent's large message: announces the transfer, then sends its chunks.
    pub(super) fn start_transfer(
        &mut self,
        to: EntityId,
        manifest: Manifest,
        payload: Bytes,
        reply: Reply<Delivered>,
    ) {
        if !self.by_entity.contains_key(&to) {
            _ = reply.send(Err(NodeError::NotConnected(to)));
            return;
        }
        let (max_transfers, max_bytes) = (
            self.config.transfer.max_outgoing,
            self.config.transfer.max_outgoing_bytes,
        );
        let bytes: u64 = self.sending.values().map(|t| t.manifest.total_len).sum();
        if self.sending.len() >= max_transfers
            || bytes.saturating_add(manifest.total_len) > max_bytes
        {
            _ = reply.send(Err(NodeError::TooManyTransfers {
                transfers: self.sending.len(),
                bytes,
                max_transfers,
                max_bytes,
            }));
            return;
        }
        let id = manifest.transfer_id;
        self.sending
            .insert((to, id), Outgoing::new(to, manifest, payload, reply));
        self.queued_transfers.entry(to).or_default().push_back(id);
        self.start_queued(to);
    }

    /// Starts queued transfers to `to` while fewer than
    /// `transfer.max_transfers_per_peer` run: the receiver refuses more than its
    /// own limit (the same setting, by default), so more would only fail.
    fn start_queued(&mut self, to: EntityId) {
        let limit = self.config.transfer.max_transfers_per_peer;
        let queued = self.queued_transfers.get(&to).map_or(0, |q| q.len());
        let running =
            (self.sending.keys().filter(|(t, _)| *t == to).count()).saturating_sub(queued);
        for _ in running..limit {
            let Some(id) = self
                .queued_transfers
                .get_mut(&to)
                .and_then(|q| q.pop_front())
            else {
                break;
            };
            self.pump(to, id);
        }
        if self.queued_transfers.get(&to).is_some_and(|q| q.is_empty()) {
            self.queued_transfers.remove(&to);
        }
    }

    /// Transfer `id` to `to` is over: it leaves the table, and the next queued
    /// one to that peer may start.
    fn end_transfer(&mut self, to: EntityId, id: TransferId) -> Option<Outgoing<Reply<Delivered>>> {
        let t = self.sending.remove(&(to, id))?;
        if let Some(q) = self.queued_transfers.get_mut(&to) {
            q.retain(|queued| *queued != id);
        }
        self.start_queued(to);
        Some(t)
    }

    /// Sends what transfer `id` to `to` has due.
    fn pump(&mut self, to: EntityId, id: TransferId) {
        let window = self.config.transfer.window;
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        let parts: Vec<(Part, Vec<u8>)> = t
            .due(now_ms(), window)
            .into_iter()
            .map(|part| (part, t.encode(part)))
            .collect();
        for (part, payload) in parts {
            let name = match part {
                Part::Manifest => peer_core::chunk::MSG_MANIFEST,
                Part::Chunk(_) => peer_core::chunk::MSG_CHUNK,
            };
            self.send(to, msg_type(name), payload, Waiter::Part { to, id, part });
        }
    }

    /// The receiver accepted `part`.
    pub(super) fn part_accepted(&mut self, to: EntityId, id: TransferId, part: Part) {
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        let (before, _) = t.progress();
        let complete = t.accepted(part);
        let (after, done_bytes) = t.progress();
        let count = t.manifest.chunk_count;
        let total_bytes = t.manifest.total_len;
        if part == Part::Manifest || crosses_tenth(before, after, count) {
            _ = self.events.send(Event::TransferProgress {
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
            return self.pump(to, id);
        }
        if let Some(t) = self.end_transfer(to, id) {
            self.stats.sent(to);
            _ = t.reply.send(Ok(Delivered {
                message_id: id.to_string(),
                reply: None,
            }));
        }
    }

    /// `part` did not get through. Sent again after a transport failure or a
    /// lost session, up to `transfer.max_attempts`; any other failure (the
    /// receiver refused it) ends the transfer.
    pub(super) fn part_failed(&mut self, to: EntityId, id: TransferId, part: Part, e: NodeError) {
        let max_attempts = self.config.transfer.max_attempts;
        let Some(t) = self.sending.get_mut(&(to, id)) else {
            return;
        };
        // The receiver counts chunks against its limits (wait as it says), or
        // this node's outbound queue is full (wait a moment): throttled.
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
        // `Ok(true)`: send again now; `Ok(false)`: after the wait.
        let outcome = match (wait, part) {
            (Some(ms), Part::Chunk(i)) => Some(t.throttled(i, now_ms(), ms).map(|()| false)),
            _ if matches!(e, NodeError::Transport(_)) || lost_session(&e) => {
                Some(t.failed(part, max_attempts).map(|()| true))
            }
            _ => None,
        };
        let e = match outcome {
            Some(Ok(now)) => {
                if now {
                    self.pump(to, id);
                }
                return;
            }
            Some(Err(gave_up)) => NodeError::Transport(format!(
                "transfer {id}: {:?} failed or was held back {} times, the last: {e}",
                gave_up.part, gave_up.attempts
            )),
            None => e,
        };
        self.fail_transfer(to, id, e);
    }

    /// The last connection to `to` closed: its transfers end, running or
    /// queued (nothing re-dials it).
    pub(super) fn peer_gone(&mut self, to: EntityId) {
        self.queued_transfers.remove(&to);
        let ids: Vec<TransferId> = self
            .sending
            .keys()
            .filter(|(peer, _)| *peer == to)
            .map(|(_, id)| *id)
            .collect();
        for id in ids {
            self.fail_transfer(to, id, NodeError::NotConnected(to));
        }
    }

    /// Ends transfer `id` to `to` with `e`: tells the agent and the event stream.
    fn fail_transfer(&mut self, to: EntityId, id: TransferId, e: NodeError) {
        let Some(t) = self.end_transfer(to, id) else {
            return;
        };
        let (code, reason) = match &e {
            NodeError::Rejected { code, reason, .. } => (code.clone(), reason.clone()),
            other => ("DELIVERY_FAILED".to_owned(), other.to_string()),
        };
        if let NodeError::Rejected { code, .. } = &e {
            self.stats.refused(to, code);
        }
        _ = self.events.send(Event::TransferFailed {
            transfer_id: id.to_string(),
            peer: to,
            direction: Direction::Outbound,
            code,
            reason,
        });
        _ = t.reply.send(Err(e));
    }

    /// A `chunk_manifest` from `from`: opens the transfer if it is within
    /// this node's limits, before anything is buffered.
    pub(super) fn on_manifest(
        &mut self,
        now: u64,
        from: EntityId,
        id: MessageId,
        plaintext: &[u8],
    ) -> Result<(), Refused> {
        let m = Manifest::decode(plaintext).map_err(|e| malformed(id, "chunk_manifest", e))?;
        if !m.msg_type.is_application() {
            return Err(refusal(
                id,
                Rejection::new(
                    ErrorCode::UnsupportedMsgType,
                    format!(
                        "transfer {}: this node takes transfers of application messages only, not {:?}",
                        m.transfer_id,
                        m.msg_type.as_str()
                    ),
                ),
            ));
        }
        // The message it carries counts against its own class, as if it came whole.
        self.charge(from, Class::of(&m.msg_type), id)?;
        let new = self
            .receiving
            .begin(now, &from, &m)
            .map_err(|r| refusal(id, r))?;
        // Messages the agent has not read yet share the reassembly budget.
        let held = self.undelivered.load(Ordering::Relaxed);
        let reserved = self.receiving.reserved_bytes();
        let budget = self.config.transfer.max_buffered_bytes;
        if new && held.saturating_add(reserved) > budget {
            self.receiving.abort(&from, m.transfer_id);
            return Err(refusal(
                id,
                Rejection::new(
                    ErrorCode::ChunkError,
                    format!(
                        "receiver busy: {held} bytes of messages wait for its agent and {} are reserved by open transfers; {} more would exceed its budget of {budget} bytes; retry later",
                        reserved.saturating_sub(m.total_len),
                        m.total_len
                    ),
                ),
            ));
        }
        if new {
            let start = Status {
                received_chunks: 0,
                chunk_count: m.chunk_count,
                received_bytes: 0,
                total_len: m.total_len,
            };
            self.inbound_progress(from, m.transfer_id, start);
        }
        Ok(())
    }

    fn inbound_progress(&self, from: EntityId, id: TransferId, st: Status) {
        _ = self.events.send(Event::TransferProgress {
            transfer_id: id.to_string(),
            peer: from,
            direction: Direction::Inbound,
            done_bytes: st.received_bytes,
            total_bytes: st.total_len,
            done_chunks: st.received_chunks,
            chunk_count: st.chunk_count,
        });
    }

    /// A `chunk` from `from`: stored in its transfer; when it completes the
    /// transfer, the reassembled message is returned for delivery. A refused
    /// chunk costs a token of the sender's `chunk` class.
    pub(super) fn on_chunk(
        &mut self,
        now: u64,
        from: EntityId,
        id: MessageId,
        plaintext: &[u8],
    ) -> Result<Option<Opened>, Refused> {
        let chunk = match Chunk::decode(plaintext) {
            Ok(c) => c,
            Err(e) => {
                self.charge(from, Class::Chunk, id)?;
                return Err(malformed(id, "chunk", e));
            }
        };
        let tid = chunk.transfer_id;
        let before = self.receiving.status(&from, tid);
        match self.receiving.add(now, &from, &chunk) {
            Ok(Progress::Partial(st)) => {
                let done_before = before.map_or(0, |b| b.received_chunks);
                if st.received_chunks == done_before {
                    // A repeat: accepted, but not for free.
                    self.charge(from, Class::Chunk, id)?;
                } else if crosses_tenth(done_before, st.received_chunks, st.chunk_count) {
                    self.inbound_progress(from, tid, st);
                }
                Ok(None)
            }
            Ok(Progress::AlreadyComplete) => {
                self.charge(from, Class::Chunk, id)?;
                Ok(None)
            }
            Ok(Progress::Complete { msg_type, payload }) => {
                match parse_json(payload, self.config.protocol.max_json_depth) {
                    Ok(payload) => {
                        if let Some(b) = before {
                            let done = Status {
                                received_chunks: b.chunk_count,
                                received_bytes: b.total_len,
                                ..b
                            };
                            self.inbound_progress(from, tid, done);
                        }
                        Ok(Some(Opened {
                            message_id: tid.to_string(),
                            msg_type,
                            payload,
                        }))
                    }
                    Err(r) => {
                        // Refused after all: a repeat of its chunks must not pass
                        // for delivered.
                        self.receiving.abort(&from, tid);
                        self.inbound_failed(from, tid, r.code.as_str(), r.reason.clone());
                        self.charge(from, Class::Chunk, id)?;
                        Err(refusal(id, r))
                    }
                }
            }
            Err(r) => {
                if before.is_some() && self.receiving.status(&from, tid).is_none() {
                    // The whole message did not match its manifest: dropped.
                    self.inbound_failed(from, tid, r.code.as_str(), r.reason.clone());
                }
                self.charge(from, Class::Chunk, id)?;
                Err(refusal(id, r))
            }
        }
    }

    fn inbound_failed(&self, from: EntityId, id: TransferId, code: &str, reason: String) {
        _ = self.events.send(Event::TransferFailed {
            transfer_id: id.to_string(),
            peer: from,
            direction: Direction::Inbound,
            code: code.to_owned(),
            reason,
        });
    }

    /// A `chunk_resend` from the receiver of one of our transfers: queues the
    /// chunks it lists. One for a transfer we do not hold is ignored.
    pub(super) fn on_resend(
        &mut self,
        from: EntityId,
        id: MessageId,
        plaintext: &[u8],
    ) -> Result<(), Refused> {
        let request =
            ResendRequest::decode(plaintext).map_err(|e| malformed(id, "chunk_resend", e))?;
        let tid = request.transfer_id;
        // A transfer still waiting its turn has sent nothing to resend.
        if let Some(t) = self.sending.get_mut(&(from, tid))
            && t.is_announced()
        {
            t.resend(request.indexes());
            self.pump(from, tid);
        }
        Ok(())
    }

    /// Drops incoming transfers idle past `transfer.expiry_secs`, and asks for
    /// the missing chunks of those idle past `transfer.resend_after_ms`.
    pub(super) fn transfer_timers(&mut self, now: u64) {
        let resumed: Vec<(EntityId, TransferId)> = self
            .sending
            .iter()
            .filter(|(_, t)| t.resume_at().is_some_and(|at| at <= now))
            .map(|(key, _)| *key)
            .collect();
        for (to, id) in resumed {
            self.pump(to, id);
        }
        if self.receiving.is_empty() {
            return;
        }
        for (from, id) in self.receiving.expire(now) {
            let reason = format!(
                "no new chunk for {} s; transfer dropped",
                self.config.transfer.expiry_secs
            );
            self.inbound_failed(from, id, EXPIRED, reason);
        }
        let (after, max) = (
            self.config.transfer.resend_after_ms,
            self.config.transfer.max_resend_requests,
        );
        for (from, id) in self.receiving.drop_stalled(now, after, max) {
            let reason = format!("no new chunk after {max} resend requests; transfer dropped");
            self.inbound_failed(from, id, EXPIRED, reason);
        }
        for (from, request) in self.receiving.resend_due(now, after, max) {
            let name = peer_core::chunk::MSG_RESEND;
            tracing::debug!(%from, transfer = %request.transfer_id, missing = request.indexes().len(), "asking for missing chunks");
            self.send(from, msg_type(name), request.encode(), Waiter::Nobody);
        }
    }
}
