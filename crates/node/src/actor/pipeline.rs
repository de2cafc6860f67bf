//! The inbound pipeline: a request from its stream to its service and back.
//!
//! 1. verify (on a task of its own: size, layout, the sender is the
//!    connection's peer, timestamp, key binding, signature), one peer's
//!    waiting requests together, their signatures checked as one batch, at
//!    most `network.max_verifying_per_peer` batches of a peer at once;
//! 2. admit (nonce memory, recipient);
//! 3. route (the service that owns the type; `UNSUPPORTED_MSG_TYPE` if none);
//! 4. rate (one token of the route's class, unless its service charges);
//! 5. open (a sealed type: in its session; unsealed: refused unless
//!    `security.require_encryption` is off);
//! 6. the service's [`Answer`]; a sealed message's delivery is released in
//!    its session's order;
//! 7. the answer on the stream: accepted, a reply envelope (signed off the
//!    actor) or a refusal (response kind 2, unsigned: the connection
//!    authenticates it, so a stranger's garbage costs the node no signature).
//!    An envelope that delivered a durable event is answered (accepted, or
//!    its reply) only once the inbox has stored the event (until then its answer waits, with
//!    its stream, among the pipeline's pending answers).
//!
//! The request's share of the inbound byte budget (its [`Frame`]) is held until
//! its answer is handed to its stream (either envelope protocol: [`Channel`]).

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::PeerId;
use peer_core::inbound::{Acceptor, Refusal};
use peer_core::rate::Class;
use peer_core::{EntityId, Envelope, ErrorCode, MessageId, Rejection};
use tokio::sync::mpsc;

use super::Actor;
use super::batches::{Batch, Batches};
use super::outbound::{Signed, draft};
use crate::clock::Clock;
use crate::inbox::{AckId, Committed};
use crate::net::Channel;
use crate::net::codec::{self, Frame, Request, Response};
use crate::secure::Slot;
use crate::service::{Answer, Charge, InOrder, Inbound, Refused, Sealing, ServiceId};

/// Most requests of one peer verified as one batch.
const MAX_BATCH: usize = 64;

/// One request after the stateless checks.
struct Checked {
    result: Result<Envelope, Refusal>,
    frame: Option<Frame>,
    channel: Channel,
}

/// A batch of one peer's requests after the stateless checks, back from its task.
pub(crate) struct Verified {
    peer: PeerId,
    entity: EntityId,
    /// The epoch of the peer's batches it came from ([`Batches::done`]).
    epoch: u64,
    checked: Vec<Checked>,
}

/// The pipeline's own state.
pub(crate) struct Pipeline {
    acceptor: Acceptor,
    verified_tx: mpsc::Sender<Verified>,
    clock: Arc<dyn Clock>,
    /// At most `network.max_verifying_per_peer` batches of a peer's requests
    /// are verified at once, each of at most [`MAX_BATCH`]; the rest wait in
    /// arrival order and go together in the next batch. So a peer with
    /// hundreds of requests open puts a bounded number of signature checks
    /// ahead of another peer's, however fast it sends, and its signatures
    /// are checked in batches when they arrive faster than they are checked.
    /// The waiting ones are bounded by the requests its connections and
    /// streams may have unanswered.
    verifying: Batches<PeerId, (Request, Channel)>,
    /// Answers that wait for their event to be stored. Bounded by the inbound
    /// streams open (each holds one).
    pending: HashMap<AckId, Pending>,
    next_ack: u64,
}

/// An answer that waits for its event to be stored.
struct Pending {
    entity: EntityId,
    message_id: Option<MessageId>,
    answer: Answer,
    channel: Channel,
    frame: Option<Frame>,
}

impl Pipeline {
    pub fn new(
        acceptor: Acceptor,
        verified_tx: mpsc::Sender<Verified>,
        clock: Arc<dyn Clock>,
        max_verifying: usize,
    ) -> Self {
        Self {
            acceptor,
            verified_tx,
            clock,
            verifying: Batches::new(max_verifying, MAX_BATCH),
            pending: HashMap::new(),
            next_ack: 0,
        }
    }

    /// The last connection to `peer` closed: its waiting requests are dropped
    /// (their streams close).
    pub fn peer_gone(&mut self, peer: &PeerId) {
        self.verifying.gone(peer);
    }
}

/// Whether a request refused at verification with `code` shows its peer
/// misbehaving: nothing an honest implementation sends fails so.
fn is_misbehaviour(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidSignature
            | ErrorCode::UnknownSender
            | ErrorCode::WrongSender
            | ErrorCode::MalformedMessage
    )
}

/// The refusal for `id` with `r`.
fn refused(r: impl Into<Refused>) -> Answer {
    Answer::Refused(r.into())
}

impl Actor {
    /// Step 1, on a task of its own so that signature checks run in parallel
    /// on every core; the result comes back to [`Actor::on_verified`].
    pub(super) fn on_request(&mut self, peer: PeerId, request: Request, channel: Channel) {
        // Only connected peers are served (peers without an Ed25519 key are
        // disconnected when they connect); a request that raced its peer's
        // disconnection has nobody to answer.
        if self.connections.entity(&peer).is_none() {
            return;
        }
        self.pipeline.verifying.push(peer, (request, channel));
        self.verify_next(peer);
    }

    /// Starts verifying `peer`'s waiting requests as one batch, if the peer
    /// has a batch slot free.
    fn verify_next(&mut self, peer: PeerId) {
        let Some(entity) = self.connections.entity(&peer) else {
            // Gone: nobody to answer.
            self.pipeline.peer_gone(&peer);
            return;
        };
        if let Some(batch) = self.pipeline.verifying.take(peer) {
            self.verify(peer, entity, batch);
        }
    }

    /// Verifies a batch of `peer`'s requests (an Ed25519 peer) on a task of
    /// its own.
    fn verify(&mut self, peer: PeerId, entity: EntityId, batch: Batch<(Request, Channel)>) {
        let Batch {
            epoch,
            items: batch,
        } = batch;
        let verifier = self.pipeline.acceptor.verifier();
        let tx = self.pipeline.verified_tx.clone();
        let clock = self.pipeline.clock.clone();
        tokio::spawn(async move {
            let frames: Vec<&[u8]> = batch
                .iter()
                .filter_map(|(r, _)| match r {
                    Request::Envelope(f) => Some(f.bytes.as_slice()),
                    Request::Oversize(_) => None,
                })
                .collect();
            let mut results = verifier
                .verify_many_from(clock.wall_ms(), &entity, &frames, rand::rng())
                .into_iter();
            let checked = batch
                .into_iter()
                .map(|(request, channel)| match request {
                    Request::Oversize(len) => Checked {
                        result: Err(verifier.too_large(len)),
                        frame: None,
                        channel,
                    },
                    Request::Envelope(frame) => Checked {
                        result: results.next().expect("one result per envelope"),
                        frame: Some(frame),
                        channel,
                    },
                })
                .collect();
            // Fails only when the node is stopping.
            _ = tx
                .send(Verified {
                    peer,
                    entity,
                    epoch,
                    checked,
                })
                .await;
        });
    }

    /// Steps 2–7 for each request of a batch.
    pub(super) fn on_verified(&mut self, v: Verified) {
        let Verified {
            peer,
            entity,
            epoch,
            checked,
        } = v;
        // The peer's waiting requests, if any, take this batch's place. A
        // batch whose peer's entry went meanwhile came from a connection that
        // closed: its streams are gone, and its sender saw the requests fail
        // (a retry of one must not become a duplicate), even if the peer is
        // connected again by now.
        if !self.pipeline.verifying.done(peer, epoch) {
            tracing::debug!(peer = %entity, requests = checked.len(), "batch of a closed connection dropped");
            return;
        }
        self.verify_next(peer);
        for c in checked {
            self.on_checked(entity, c);
        }
    }

    /// Steps 2–7.
    fn on_checked(&mut self, entity: EntityId, c: Checked) {
        let Checked {
            result,
            frame,
            channel,
        } = c;
        if !self.shared.by_entity.contains_key(&entity) {
            // The peer's last connection closed while this was being verified:
            // nobody is left to read the answer, and a peer that is gone gets
            // no state (session state made now would count as connected, and
            // nothing would ever forget it). Its sender saw the request fail,
            // so dropping it also keeps a retry from being a duplicate.
            tracing::debug!(peer = %entity, "request from a closed connection dropped");
            return;
        }
        let (message_id, answer) = match result {
            Ok(env) => {
                let id = env.message_id;
                let (answer, ack) = self.handle(entity, env);
                if let Some(ack) = ack {
                    let pending = Pending {
                        entity,
                        message_id: Some(id),
                        answer,
                        channel,
                        frame,
                    };
                    self.pipeline.pending.insert(ack, pending);
                    return;
                }
                (Some(id), answer)
            }
            Err(refusal) => {
                if is_misbehaviour(refusal.rejection.code) {
                    self.misbehaved(entity);
                }
                (refusal.message_id, refused(refusal.rejection))
            }
        };
        self.respond(entity, message_id, answer, channel, frame);
    }

    /// Step 7: `answer` on the stream of the request `message_id` from
    /// `entity`. The request's frame is held until the answer is handed to
    /// the swarm.
    fn respond(
        &mut self,
        entity: EntityId,
        message_id: Option<MessageId>,
        answer: Answer,
        channel: Channel,
        frame: Option<Frame>,
    ) {
        let response = match answer {
            Answer::Accepted => Response::Accepted,
            Answer::Refused(r) => self.refusal(entity, message_id, &r),
            Answer::Reply { msg_type, payload } => {
                let d = draft(
                    self.shared.clock.wall_ms(),
                    Some(entity),
                    MessageId::from_random(rand::random()),
                    msg_type,
                    payload,
                );
                self.outbound
                    .signer()
                    .spawn(d, move |env| Signed::Response {
                        channel,
                        bytes: env.encode(),
                        _frame: frame,
                    });
                return;
            }
        };
        channel.answer(&mut self.swarm, response);
        drop(frame);
    }

    /// The wire refusal `r` of a request from `entity`, counted.
    fn refusal(
        &mut self,
        entity: EntityId,
        message_id: Option<MessageId>,
        r: &Refused,
    ) -> Response {
        tracing::debug!(peer = %entity, rejection = %r.rejection, "rejected");
        // Refusing the losing side of simultaneous handshakes is how they
        // converge, not a fault of the peer: not counted.
        if r.rejection.code != ErrorCode::HandshakeInProgress {
            self.shared.stats.rejected(Some(entity), r.rejection.code);
        }
        Response::Refused(codec::Refusal::new(&r.rejection, message_id, r.retry_after))
    }

    /// The inbox stored a batch (or failed to): the services whose writes it
    /// held are told, and the answers that waited for it go out, or
    /// `UNAVAILABLE` if it failed.
    pub(super) fn on_committed(&mut self, c: Committed) {
        for (service, token) in c.done {
            let result = c.result.clone();
            self.call(service, |s, cx| s.on_persisted(cx, token, result));
        }
        for ack in c.acks {
            let Some(p) = self.pipeline.pending.remove(&ack) else {
                continue;
            };
            let answer = match &c.result {
                Ok(()) => p.answer,
                Err(e) => refused(Rejection::new(
                    ErrorCode::Unavailable,
                    format!("the recipient could not store the message ({e}); retry later"),
                )),
            };
            // The channel is closed if the peer gave up; the event is stored
            // all the same.
            self.respond(p.entity, p.message_id, answer, p.channel, p.frame);
        }
    }

    /// Steps 2–6 for an envelope that passed verification: its answer, and
    /// the id under which "accepted" waits for a durable event to be stored.
    fn handle(&mut self, from: EntityId, env: Envelope) -> (Answer, Option<AckId>) {
        match self.prepare(from, env) {
            Ok((service, inbound, slot)) => self.serve(from, service, inbound, slot),
            Err(refusal) => (refusal, None),
        }
    }

    /// Steps 2–5: the envelope's service and what it gets, or the refusal.
    fn prepare(
        &mut self,
        from: EntityId,
        env: Envelope,
    ) -> Result<(ServiceId, Inbound, Option<Slot>), Answer> {
        let env = match self
            .pipeline
            .acceptor
            .admit(self.shared.clock.wall_ms(), env)
        {
            Ok(env) => env,
            Err(refusal) => return Err(refused(refusal.rejection)),
        };
        let Some(route) = self.routes.inbound(&env.msg_type) else {
            // An unknown type costs a token of the default class, like any request.
            if let Err(r) = self.shared.charge(from, Class::Task) {
                return Err(refused(r));
            }
            return Err(refused(Rejection::new(
                ErrorCode::UnsupportedMsgType,
                format!(
                    "this node has no handler for msg_type {:?}",
                    env.msg_type.as_str()
                ),
            )));
        };
        if route.charge == Charge::OnArrival
            && let Err(r) = self.shared.charge(from, route.class)
        {
            return Err(refused(r));
        }
        // A refusal by the pipeline of a type its service charges costs a token.
        let refuse_unopened = |this: &mut Self, r: Rejection| {
            if route.charge == Charge::ByService
                && let Err(limited) = this.shared.charge(from, route.class)
            {
                return refused(limited);
            }
            refused(r)
        };
        let now = self.now_ms();
        let (inbound, slot) = match (route.sealing, env.session_id.is_some()) {
            (Sealing::Sealed, true) => {
                let sender_key = env.sender_key;
                match self.shared.sessions.open(now, env) {
                    Ok(u) => (
                        Inbound {
                            from,
                            sender_key,
                            message_id: u.message_id,
                            msg_type: u.msg_type,
                            payload: u.plaintext,
                            sealed: true,
                        },
                        Some(u.slot),
                    ),
                    Err(r) => return Err(refuse_unopened(self, r)),
                }
            }
            (Sealing::Sealed, false) if self.shared.sessions.require_encryption() => {
                let r = Rejection::new(
                    ErrorCode::EncryptionRequired,
                    format!(
                        "this node accepts {} only sealed in a session",
                        env.msg_type
                    ),
                );
                return Err(refuse_unopened(self, r));
            }
            _ => (
                Inbound {
                    from,
                    sender_key: env.sender_key,
                    message_id: env.message_id,
                    msg_type: env.msg_type,
                    payload: env.payload,
                    sealed: false,
                },
                None,
            ),
        };
        Ok((route.service, inbound, slot))
    }

    /// Step 6: the service's answer. What it delivers goes out with the
    /// envelope (a sealed one's in its session's order); an envelope that
    /// delivered a durable event is answered once the event is stored: its
    /// answer ("accepted" or a reply) waits under the id returned.
    fn serve(
        &mut self,
        from: EntityId,
        service: ServiceId,
        inbound: Inbound,
        slot: Option<Slot>,
    ) -> (Answer, Option<AckId>) {
        self.effects.in_order = Some(InOrder::default());
        let mut answer = self.call(service, |s, cx| s.on_envelope(cx, inbound));
        // A chunk that completed a message of a type whose service takes
        // large ones: that service handles it now, in the same slot, and its
        // answer is the chunk's.
        if let Some(msg) = self.effects.forward.take()
            && matches!(answer, Answer::Accepted)
        {
            answer = match self.routes.get(&msg.msg_type) {
                Some(route) => self.call(route.service, |s, cx| s.on_envelope(cx, msg)),
                None => refused(Rejection::new(
                    ErrorCode::UnsupportedMsgType,
                    format!(
                        "this node has no handler for msg_type {:?}",
                        msg.msg_type.as_str()
                    ),
                )),
            };
        }
        let mut held = self.effects.in_order.take().and_then(|slot| slot.delivery);
        let mut ack = None;
        if let Some(d) = &mut held
            && d.is_durable()
            && !matches!(answer, Answer::Refused(_))
        {
            let id = AckId(self.pipeline.next_ack);
            self.pipeline.next_ack += 1;
            d.ack = Some(id);
            ack = Some(id);
        }
        match slot {
            // A refused message still fills its place in the order.
            Some(slot) => {
                let now = self.now_ms();
                for d in self.shared.sessions.release(now, from, slot, held) {
                    self.deliver_now(d);
                }
            }
            None => {
                if let Some(d) = held {
                    self.deliver_now(d);
                }
            }
        }
        (answer, ack)
    }
}
