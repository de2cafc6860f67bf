//! A service's send, from admission to its outcome.
//!
//! 1. Admission: the send takes a [`Ticket`] for one message and its payload
//!    bytes against `network.max_outbound_in_flight` and
//!    `network.max_outbound_bytes`, before anything is sealed or signed; over
//!    either the send fails at once (`UNAVAILABLE`). The ticket travels with the
//!    request and is given back when its outcome is known. Handshake steps
//!    take none (one attempt per peer bounds them).
//! 2. Sealing, for a sealed type: in the session with the recipient, or the
//!    message waits for a handshake the handshake service runs.
//! 3. Signing, on a task of its own; the envelope comes back to the actor.
//! 4. Streams: at most half of `network.max_concurrent_streams` requests in
//!    flight per peer; the rest wait in that peer's FIFO. A request goes on
//!    the peer's long-lived stream (`net::link`) if it speaks them, else on
//!    a request-response stream of its own.
//! 5. The answer goes to the service as an [`Outcome`]; so does a failure,
//!    unless the retry budget sends the same bytes again first.

use std::collections::{BTreeMap, HashMap};

use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};
use peer_core::{Draft, EntityId, Envelope, Identity, MessageId, MsgType, SessionId};
use tokio::sync::mpsc;

use super::Actor;
use crate::config::Config;
use crate::net::codec::{Frame, Request, Response};
use crate::net::{Channel, link};
use crate::node::NodeError;
use crate::outbox::{Admit, InSequence, Outbox};
use crate::secure::{SealedParts, Send as Sealing};
use crate::service::{Outcome, Reply, RequestId, SendRequest, ServiceId, lost_session};
use crate::stats::Metrics;

/// Counts of what outbound admission holds.
#[derive(Debug)]
struct Admission {
    held: AtomicUsize,
    bytes: AtomicU64,
    max: usize,
    max_bytes: u64,
}

/// One admitted send's share of the outbound limits, given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    bytes: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.held.fetch_sub(1, Ordering::Relaxed);
        self.admission
            .bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Admission {
    /// A ticket for a send of `bytes`, or `None` over a limit. Only the actor
    /// admits, so checking and adding need not be one atomic step.
    fn admit(self: &Arc<Self>, bytes: u64) -> Option<Ticket> {
        let held = self.held.load(Ordering::Relaxed);
        let held_bytes = self.bytes.load(Ordering::Relaxed);
        if held >= self.max || held_bytes.saturating_add(bytes) > self.max_bytes {
            return None;
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Some(Ticket {
            admission: self.clone(),
            bytes,
        })
    }
}

/// A send on its way: who waits for its outcome, and its admission ticket.
#[derive(Debug)]
pub(crate) struct Queued {
    pub id: RequestId,
    pub owner: ServiceId,
    pub to: EntityId,
    pub message_id: MessageId,
    pub ticket: Option<Ticket>,
}

/// A signed envelope back from its signing task.
pub(crate) enum Signed {
    /// A request to send.
    Request {
        queued: Queued,
        session: Option<SessionId>,
        /// A sealed request's place in the order its peer's were sealed.
        ticket: Option<u64>,
        bytes: Vec<u8>,
    },
    /// A reply to an inbound request; `_frame` holds the request's share of
    /// the inbound budget until the reply is handed to the swarm.
    Response {
        channel: Channel,
        bytes: Vec<u8>,
        _frame: Option<Frame>,
    },
}

/// A signed request waiting for, or on, a stream.
struct Ready {
    queued: Queued,
    session: Option<SessionId>,
    bytes: Bytes,
    /// 0 for the first attempt, then the retry's number.
    attempt: u32,
}

/// A request on the wire: on its own stream, or on its peer's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sent {
    Single(OutboundRequestId),
    Link(u64),
}

struct InFlight {
    queued: Queued,
    peer: PeerId,
    session: Option<SessionId>,
    bytes: Bytes,
    attempt: u32,
    sent: std::time::Instant,
}

/// The outbound path's state.
pub(crate) struct Outbound {
    admission: Arc<Admission>,
    streams: Outbox<PeerId, Ready>,
    /// Each peer's sealed requests, let into `streams` in the order they
    /// were sealed; an entry lives while one is being signed or held.
    sealed: HashMap<EntityId, InSequence<Ready>>,
    next_ticket: u64,
    in_flight: HashMap<Sent, InFlight>,
    /// Sends that got no answer and wait to go again, by (due ms, id). Each
    /// holds its admission ticket, so they are bounded by it.
    retrying: BTreeMap<(u64, u64), Ready>,
    /// Long-lived streams, to the peers that speak them.
    pub links: link::Links,
    next_link_request: u64,
    signer: Signer,
}

/// Signs envelopes on tasks of their own and sends them back to the actor.
#[derive(Clone)]
pub(crate) struct Signer {
    identity: Arc<Identity>,
    tx: mpsc::Sender<Signed>,
    metrics: Metrics,
}

impl Signer {
    /// Signs `draft` off the actor; `make` wraps the result for the actor.
    pub fn spawn(&self, draft: Draft, make: impl FnOnce(Envelope) -> Signed + Send + 'static) {
        let this = self.clone();
        tokio::spawn(async move {
            let env = draft.sign(&this.identity);
            this.metrics.signed();
            // Fails only when the node is stopping.
            _ = this.tx.send(make(env)).await;
        });
    }
}

impl Outbound {
    pub fn new(
        config: &Config,
        identity: Arc<Identity>,
        tx: mpsc::Sender<Signed>,
        metrics: Metrics,
        links: link::Links,
    ) -> Self {
        let net = &config.network;
        Self {
            admission: Arc::new(Admission {
                held: AtomicUsize::new(0),
                bytes: AtomicU64::new(0),
                max: net.max_outbound_in_flight.max(1),
                max_bytes: net.max_outbound_bytes,
            }),
            streams: Outbox::new((net.max_concurrent_streams / 2).max(1)),
            sealed: HashMap::new(),
            next_ticket: 0,
            in_flight: HashMap::new(),
            retrying: BTreeMap::new(),
            links,
            next_link_request: 0,
            signer: Signer {
                identity,
                tx,
                metrics,
            },
        }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// When the next retry is due (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.retrying.keys().next().map(|(due, _)| *due)
    }
}

/// A draft to `to`, stamped `wall_ms`, with the given id and a fresh nonce.
pub(crate) fn draft(
    wall_ms: u64,
    to: Option<EntityId>,
    message_id: MessageId,
    msg_type: MsgType,
    payload: Vec<u8>,
) -> Draft {
    Draft {
        msg_type,
        message_id,
        recipient_id: to,
        session_id: None,
        sequence_num: 0,
        timestamp_ms: wall_ms,
        nonce: rand::random(),
        payload,
    }
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

/// A reply envelope as an outcome: an `error` envelope (how refusals came
/// before response kind 2) is a refusal.
fn read_reply(env: Envelope) -> Result<Reply, NodeError> {
    if env.msg_type != *MsgType::ERROR {
        return Ok(Reply::Envelope(Box::new(env)));
    }
    let payload: serde_json::Value = serde_json::from_slice(&env.payload).unwrap_or_default();
    let text = |k: &str| {
        payload
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Err(NodeError::Rejected {
        code: text("error_code"),
        reason: text("error_message"),
        retry_after_ms: payload.get("retry_after_ms").and_then(|v| v.as_u64()),
    })
}

impl Actor {
    /// Step 1 and 2 for a service's send.
    pub(super) fn send(&mut self, send: SendRequest) {
        let SendRequest {
            mut queued,
            msg_type,
            payload,
            metered,
        } = send;
        let to = queued.to;
        // A service's send is a call the peer's breaker may refuse; a
        // handshake step is part of one already let through.
        if metered && let Err(open) = self.swarm.behaviour_mut().pool.allow_send(to) {
            return self.outbound_failed(queued, NodeError::CircuitOpen(open));
        }
        let connected = self.shared.by_entity.contains_key(&to);
        self.swarm.behaviour_mut().pool.acquire(connected);
        if !connected {
            return self.park(SendRequest {
                queued,
                msg_type,
                payload,
                metered,
            });
        }
        if metered {
            let Some(ticket) = self.outbound.admission.admit(payload.len() as u64) else {
                let e = NodeError::Busy(self.outbound.admission.max);
                return self.outbound_failed(queued, e);
            };
            queued.ticket = Some(ticket);
        }
        if !self.routes.is_sealed(&msg_type) {
            let d = draft(
                self.shared.clock.wall_ms(),
                Some(to),
                queued.message_id,
                msg_type,
                payload,
            );
            return self.sign_request(queued, d);
        }
        let now = self.now_ms();
        match self
            .shared
            .sessions
            .send(now, to, msg_type, payload, queued)
        {
            Sealing::Sealed(parts, queued) => self.sign_sealed(to, parts, queued),
            Sealing::Queued(init) => {
                if let Some(init) = init {
                    self.start_handshake(to, &init);
                }
            }
            Sealing::Refused(queued, r) => self.outbound_failed(queued, NodeError::rejected(r)),
        }
    }

    /// Sends a session's first handshake step on behalf of the service that
    /// owns the handshake types (its replies go there).
    fn start_handshake(&mut self, to: EntityId, init: &peer_core::session::Message) {
        let Some(owner) = self.routes.owner(init.msg_type()) else {
            tracing::error!("no service owns the handshake; cannot open a session");
            return;
        };
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let queued = Queued {
            id,
            owner,
            to,
            message_id: MessageId::from_random(rand::random()),
            ticket: None,
        };
        self.effects.sends.push_back(SendRequest {
            queued,
            msg_type: init.msg_type().parse().expect("handshake types are valid"),
            payload: init.encode(),
            metered: false,
        });
    }

    /// Signs a sealed message (a session's sealed parts).
    pub(super) fn sign_sealed(&mut self, to: EntityId, parts: SealedParts, queued: Queued) {
        let mut d = draft(
            self.shared.clock.wall_ms(),
            Some(to),
            queued.message_id,
            parts.msg_type,
            parts.ciphertext,
        );
        d.session_id = Some(parts.session_id);
        d.sequence_num = parts.sequence_num;
        let ticket = self.outbound.next_ticket;
        self.outbound.next_ticket += 1;
        self.outbound.sealed.entry(to).or_default().expect(ticket);
        self.sign(queued, d, Some(ticket));
    }

    fn sign_request(&mut self, queued: Queued, d: Draft) {
        self.sign(queued, d, None);
    }

    fn sign(&mut self, queued: Queued, d: Draft, ticket: Option<u64>) {
        self.outbound.signer.spawn(d, move |env| Signed::Request {
            queued,
            session: env.session_id,
            ticket,
            bytes: env.encode(),
        });
    }

    /// A signed envelope is back: a request goes to its peer's stream queue, a
    /// reply onto its stream.
    pub(super) fn on_signed(&mut self, signed: Signed) {
        match signed {
            Signed::Request {
                queued,
                session,
                ticket,
                bytes,
            } => {
                let to = queued.to;
                let ready = Ready {
                    queued,
                    session,
                    bytes: Bytes::from(bytes),
                    attempt: 0,
                };
                let due = match (ticket, self.outbound.sealed.get_mut(&to)) {
                    (Some(ticket), Some(order)) => {
                        let due = order.ready(ticket, ready);
                        if order.is_empty() {
                            self.outbound.sealed.remove(&to);
                        }
                        due
                    }
                    _ => vec![ready],
                };
                for ready in due {
                    self.take_stream(to, ready);
                }
            }
            Signed::Response { channel, bytes, .. } => {
                channel.answer(&mut self.swarm, Response::Reply(bytes));
            }
        }
    }

    /// A signed request takes a stream to its peer, or waits for one.
    fn take_stream(&mut self, to: EntityId, ready: Ready) {
        let Some(peer) = self.shared.by_entity.get(&to).copied() else {
            return self.outbound_failed(ready.queued, NodeError::NotConnected(to));
        };
        if let Admit::Send(ready) = self.outbound.streams.admit(peer, ready) {
            self.dispatch_request(peer, ready);
        }
    }

    /// Sends on the peer's link if it speaks the long-lived streams, else on
    /// a stream of its own.
    fn dispatch_request(&mut self, peer: PeerId, ready: Ready) {
        // A service's send (it holds a ticket) may be retried: its first
        // attempt earns the retry budget its share.
        if ready.attempt == 0 && ready.queued.ticket.is_some() {
            self.swarm.behaviour_mut().pool.sent_first();
        }
        let out = &mut self.outbound;
        let req = if out.links.speaks(&peer) {
            let id = out.next_link_request;
            out.next_link_request += 1;
            out.links.send(peer, id, ready.bytes.clone());
            Sent::Link(id)
        } else {
            let frame = Frame::outbound(ready.bytes.to_vec());
            Sent::Single(
                self.swarm
                    .behaviour_mut()
                    .envelopes
                    .send_request(&peer, Request::Envelope(frame)),
            )
        };
        self.shared.stats.requested(ready.queued.to);
        self.outbound.in_flight.insert(
            req,
            InFlight {
                queued: ready.queued,
                peer,
                session: ready.session,
                bytes: ready.bytes,
                attempt: ready.attempt,
                sent: self.shared.clock.now(),
            },
        );
    }

    /// Retries whose wait is over go to their peer's queue (or fail, if its
    /// breaker opened meanwhile or it is no longer connected).
    pub(super) fn retries_due(&mut self, now_ms: u64) {
        while let Some(entry) = self.outbound.retrying.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ready = entry.remove();
            let to = ready.queued.to;
            match self.swarm.behaviour_mut().pool.allow_send(to) {
                Ok(()) => self.take_stream(to, ready),
                Err(open) => self.outbound_failed(ready.queued, NodeError::CircuitOpen(open)),
            }
        }
    }

    /// A request to `peer` finished: lets the next waiting one go.
    fn stream_done(&mut self, peer: PeerId) {
        if let Some(next) = self.outbound.streams.finished(peer) {
            self.dispatch_request(peer, next);
        }
    }

    /// The request `queued` ended with `result`: its service is told.
    fn finish(&mut self, queued: Queued, result: Result<Reply, NodeError>) {
        let outcome = Outcome {
            message_id: queued.message_id,
            to: queued.to,
            result,
        };
        self.replies.push_back((queued.owner, queued.id, outcome));
    }

    /// The request `queued` failed before or without an answer.
    pub(super) fn outbound_failed(&mut self, queued: Queued, e: NodeError) {
        self.finish(queued, Err(e));
    }

    /// The peer's answer to one of our requests.
    /// `resent` if the link sent the request more than once.
    fn on_response(&mut self, req: Sent, response: Response, resent: bool) {
        let Some(f) = self.outbound.in_flight.remove(&req) else {
            return;
        };
        let to = f.queued.to;
        let latency = self.shared.clock.now().saturating_duration_since(f.sent);
        self.swarm.behaviour_mut().pool.answered(to, latency);
        self.shared.stats.answered(to, latency);
        // A sealed message that overtook the end of its session's handshake
        // (the peer answers `HANDSHAKE_IN_PROGRESS`) goes again, the same
        // bytes, within the retry budget.
        if let (Response::Refused(r), Some(_)) = (&response, f.session)
            && r.error_code == "HANDSHAKE_IN_PROGRESS"
            && let Some(wait) = self.retry_wait(&f)
        {
            self.stream_done(f.peer);
            // The peer recorded the refused copy's nonce: the copy that goes
            // again is signed anew with a fresh one (same sealed payload and
            // sequence number, which the refusal did not use up).
            let mut f = f;
            if let Ok(env) = Envelope::decode(&f.bytes) {
                let d = Draft {
                    timestamp_ms: self.shared.clock.wall_ms(),
                    nonce: rand::random(),
                    ..env.into_draft()
                };
                f.bytes = Bytes::from(d.sign(&self.shared.identity).encode());
                self.shared.stats.metrics().signed();
            }
            return self.retry_after(f, wait, "the peer's handshake was not done yet");
        }
        let result = match response {
            // A copy sent before reached the peer after all (its nonce is
            // known there): that copy's answer is what was lost.
            Response::Refused(r)
                if (f.attempt > 0 || resent) && r.error_code == "REPLAY_DETECTED" =>
            {
                Err(NodeError::Transport(format!(
                    "sent {} times: an earlier copy reached the peer, its answer was lost",
                    f.attempt + 1
                )))
            }
            Response::Accepted => Ok(Reply::Accepted),
            Response::Reply(bytes) => check_reply(to, &bytes).and_then(read_reply),
            Response::Refused(r) => Err(NodeError::Rejected {
                code: r.error_code,
                reason: r.error_message,
                retry_after_ms: r.retry_after_ms,
            }),
        };
        if let (Err(e), Some(id)) = (&result, f.session)
            && lost_session(e)
        {
            // The peer no longer has our session: the next send starts a new one.
            let now = self.now_ms();
            self.shared.sessions.forget(now, to, id);
        }
        self.stream_done(f.peer);
        self.finish(f.queued, result);
    }

    pub(super) fn on_envelopes(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, Channel::Single(channel)),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_response(Sent::Single(request_id), response, false),
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => self.request_failed(Sent::Single(request_id), error.to_string()),
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// What a link tells: a request on it, or the end of one of ours.
    pub(super) fn on_link(&mut self, event: link::Event) {
        match event {
            link::Event::Request {
                peer,
                request,
                channel,
            } => self.on_request(peer, request, Channel::Link(channel)),
            link::Event::Response {
                id,
                response,
                resent,
            } => self.on_response(Sent::Link(id), response, resent),
            link::Event::Failure { id, error } => self.request_failed(Sent::Link(id), error),
        }
    }

    /// Our request `req` got no answer: a failure of its peer. A service's
    /// send goes again, the same bytes, if the retry budget allows (the
    /// receiver's nonce memory keeps a copy from being delivered twice).
    fn request_failed(&mut self, req: Sent, error: String) {
        let Some(f) = self.outbound.in_flight.remove(&req) else {
            return;
        };
        self.swarm.behaviour_mut().pool.failure(f.queued.to);
        let wait = self.retry_wait(&f);
        self.shared.stats.unanswered(f.queued.to, wait.is_some());
        self.stream_done(f.peer);
        match wait {
            Some(wait) => self.retry_after(f, wait, &error),
            None => self.outbound_failed(f.queued, NodeError::Transport(error)),
        }
    }

    /// How long `f` waits before it goes again, if it is a service's send and
    /// the retry budget lets it (counted as a retry).
    fn retry_wait(&mut self, f: &InFlight) -> Option<Duration> {
        f.queued.ticket.as_ref()?;
        let pool = &mut self.swarm.behaviour_mut().pool;
        pool.retry(f.attempt + 1, rand::random())
    }

    /// Queues `f`, the same bytes, to go again after `wait`.
    fn retry_after(&mut self, f: InFlight, wait: Duration, why: &str) {
        let attempt = f.attempt + 1;
        tracing::debug!(peer = %f.queued.to, why, attempt, ?wait, "sending again");
        let due = self.now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let id = self.outbound.next_link_request;
        self.outbound.next_link_request += 1;
        let ready = Ready {
            queued: f.queued,
            session: f.session,
            bytes: f.bytes,
            attempt,
        };
        self.outbound.retrying.insert((due, id), ready);
    }

    /// The last connection to `peer` closed: requests waiting for a stream to
    /// it fail (those in flight fail through libp2p).
    pub(super) fn drop_waiting(&mut self, peer: PeerId, entity: EntityId) {
        let held = self
            .outbound
            .sealed
            .remove(&entity)
            .map(|mut order| order.drain())
            .unwrap_or_default();
        for ready in self
            .outbound
            .streams
            .drain_waiting(peer)
            .into_iter()
            .chain(held)
        {
            self.outbound_failed(ready.queued, NodeError::NotConnected(entity));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_messages_and_bytes_until_tickets_are_dropped() {
        let a = Arc::new(Admission {
            held: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            max: 2,
            max_bytes: 100,
        });
        let t1 = a.admit(60).expect("fits");
        assert!(a.admit(41).is_none(), "60 + 41 bytes is over 100");
        let t2 = a.admit(40).expect("fits exactly");
        assert!(a.admit(0).is_none(), "two held");
        drop(t1);
        let t3 = a.admit(60).expect("room again");
        drop((t2, t3));
        assert_eq!(a.held.load(Ordering::Relaxed), 0);
        assert_eq!(a.bytes.load(Ordering::Relaxed), 0);
    }
}
