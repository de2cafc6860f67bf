//! The handshake a node runs with one peer: at most one attempt at a time, and
//! the rule that settles simultaneous initiation.
//!
//! If both entities send `handshake_init` at about the same time, the attempt
//! initiated by the entity with the lower entity id (compared byte-wise) wins:
//! the higher side drops its own attempt and answers the winner's init as
//! responder; the lower side answers the loser's init with
//! `HANDSHAKE_IN_PROGRESS` and carries on. Both sides reach the same decision
//! without talking, so exactly one session results.

use super::handshake::{Handshake, Random};
use super::messages::{HandshakeInit, Message};
use super::{Config, Role, Session, State};
use crate::error::{ErrorCode, Rejection};
use crate::identity::{EntityId, Identity, PublicKey};

/// The role `local` ends up in when it and `peer` initiated at the same time:
/// [`Role::Initiator`] (its own attempt survives) if its entity id is the lower
/// one byte-wise, else [`Role::Responder`] (it answers the peer's attempt).
pub fn resolve_simultaneous(local: &EntityId, peer: &EntityId) -> Role {
    if local.0 <= peer.0 {
        Role::Initiator
    } else {
        Role::Responder
    }
}

/// The handshake between a local entity and one peer. It holds at most one
/// [`Handshake`] and decides, for each `handshake_init` the peer sends, whether
/// it starts a new responder attempt:
///
/// | running attempt | the peer's `handshake_init` |
/// |---|---|
/// | none, or finished (READY, ERROR, EXPIRED) | new responder attempt answers it |
/// | same handshake id | passed to it (a duplicate: `INVALID_STATE`, or its sticky error) |
/// | our initiator attempt, our id lower | refused, `HANDSHAKE_IN_PROGRESS`; ours continues |
/// | our initiator attempt, our id higher | ours is dropped; new responder attempt answers it |
/// | a responder attempt (the peer's earlier one) | the peer abandoned it: new responder attempt |
///
/// Every other message goes to the running attempt. The node calls
/// [`Link::poll_session`] after each successful input and keeps the session.
#[derive(Debug)]
pub struct Link {
    config: Config,
    local: EntityId,
    peer: EntityId,
    attempt: Option<Handshake>,
}

impl Link {
    /// No handshake yet between `local` and `peer`.
    pub fn new(config: Config, local: EntityId, peer: EntityId) -> Self {
        Self {
            config,
            local,
            peer,
            attempt: None,
        }
    }

    /// This side's entity id.
    pub fn local(&self) -> EntityId {
        self.local
    }

    /// The peer's entity id.
    pub fn peer(&self) -> EntityId {
        self.peer
    }

    /// The current (or last) attempt.
    pub fn handshake(&self) -> Option<&Handshake> {
        self.attempt.as_ref()
    }

    /// The current attempt's state; `None` before any attempt.
    pub fn state(&self) -> Option<State> {
        self.attempt.as_ref().map(Handshake::state)
    }

    /// Starts a handshake as initiator, returning the `handshake_init` to send.
    /// `HANDSHAKE_IN_PROGRESS` if an attempt is running; a finished one is
    /// replaced (poll its session first).
    pub fn connect(&mut self, now_ms: u64, random: Random) -> Result<Message, Rejection> {
        if let Some(h) = &mut self.attempt {
            h.handle_timeout(now_ms);
            if h.state().is_running() {
                return Err(Rejection::new(
                    ErrorCode::HandshakeInProgress,
                    format!("a handshake with {} is in progress", self.peer),
                ));
            }
        }
        let mut h = Handshake::initiator(self.config, self.local, self.peer, random);
        let init = h.start(now_ms)?;
        self.attempt = Some(h);
        Ok(init)
    }

    /// Handles a handshake message from the peer (see [`Handshake::handle`] for
    /// the arguments and errors). `random` is called, once, only when a new
    /// responder attempt is needed.
    pub fn handle(
        &mut self,
        now_ms: u64,
        identity: &Identity,
        sender: &PublicKey,
        msg: &Message,
        random: impl FnOnce() -> Random,
    ) -> Result<Option<Message>, Rejection> {
        let from = EntityId::of(sender);
        if from != self.peer {
            return Err(Rejection::new(
                ErrorCode::SessionNotFound,
                format!(
                    "no handshake with {from} here (this link is with {})",
                    self.peer
                ),
            ));
        }
        if let Message::Init(init) = msg
            && self.answers_as_new_responder(now_ms, init)
        {
            self.attempt = Some(Handshake::responder(
                self.config,
                self.local,
                self.peer,
                random(),
            ));
        }
        match &mut self.attempt {
            Some(h) => h.handle(now_ms, identity, sender, msg),
            None => Err(Rejection::new(
                ErrorCode::SessionNotFound,
                format!("no handshake with {} in progress", self.peer),
            )),
        }
    }

    /// Whether a new responder attempt should answer `init` (the table above).
    fn answers_as_new_responder(&mut self, now_ms: u64, init: &HandshakeInit) -> bool {
        let Some(h) = &mut self.attempt else {
            return true;
        };
        h.handle_timeout(now_ms);
        if h.handshake_id() == Some(init.handshake_id) {
            return false;
        }
        if !h.state().is_running() {
            return true;
        }
        match h.role() {
            Role::Responder => true,
            Role::Initiator => resolve_simultaneous(&self.local, &self.peer) == Role::Responder,
        }
    }

    /// See [`Handshake::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<u64> {
        self.attempt.as_ref().and_then(Handshake::poll_timeout)
    }

    /// See [`Handshake::handle_timeout`].
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(h) = &mut self.attempt {
            h.handle_timeout(now_ms);
        }
    }

    /// The session, once, when the attempt reached READY.
    pub fn poll_session(&mut self) -> Option<Session> {
        self.attempt.as_mut().and_then(Handshake::poll_session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::testing::{T0, assert_paired, identity, random};

    #[test]
    fn the_lower_entity_id_wins_and_both_sides_agree() {
        let (a, b) = (identity(1).entity_id(), identity(2).entity_id());
        assert_ne!(resolve_simultaneous(&a, &b), resolve_simultaneous(&b, &a));
        let lower = if a.0 < b.0 { a } else { b };
        let higher = if a.0 < b.0 { b } else { a };
        assert_eq!(resolve_simultaneous(&lower, &higher), Role::Initiator);
        assert_eq!(resolve_simultaneous(&higher, &lower), Role::Responder);
        // Byte-wise: the first differing byte decides.
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        x[0] = 1;
        y[31] = 0xff;
        assert_eq!(
            resolve_simultaneous(&EntityId(y), &EntityId(x)),
            Role::Initiator
        );
    }

    /// One side of the simulated network.
    struct Node {
        identity: Identity,
        link: Link,
        connected: bool,
        sessions: Vec<Session>,
    }

    /// The events a step can choose from, in a fixed order.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        Connect(usize),
        Deliver(usize),
    }

    /// Runs the two nodes, letting `choose(n)` pick each step among `n`
    /// possible events, until nothing is left to do. In-flight messages are
    /// delivered in any order (not FIFO), once, or up to twice if `duplicate`;
    /// `connects` says which sides call `connect` (at a time of the chooser's
    /// choice). Returns the nodes and the sequence of choice counts.
    fn simulate(
        connects: [bool; 2],
        duplicate: bool,
        mut choose: impl FnMut(usize) -> usize,
    ) -> ([Node; 2], Vec<usize>) {
        let ids = [identity(1), identity(2)];
        let eids = [ids[0].entity_id(), ids[1].entity_id()];
        let [i0, i1] = ids;
        let mut nodes = [
            Node {
                link: Link::new(Config::default(), eids[0], eids[1]),
                identity: i0,
                connected: !connects[0],
                sessions: vec![],
            },
            Node {
                link: Link::new(Config::default(), eids[1], eids[0]),
                identity: i1,
                connected: !connects[1],
                sessions: vec![],
            },
        ];
        // (to, message, copies left after this one)
        let mut in_flight: Vec<(usize, Message, u8)> = vec![];
        let copies = u8::from(duplicate);
        let mut counts = vec![];
        let mut seed = 0u8;
        let mut now = T0;
        loop {
            let mut events: Vec<Event> = (0..2)
                // A node initiates only while it has no session with the peer.
                .filter(|&s| !nodes[s].connected && nodes[s].sessions.is_empty())
                .map(Event::Connect)
                .collect();
            events.extend((0..in_flight.len()).map(Event::Deliver));
            if events.is_empty() {
                break;
            }
            counts.push(events.len());
            now += 1;
            seed = seed.wrapping_add(1);
            match events[choose(events.len())] {
                Event::Connect(s) => {
                    nodes[s].connected = true;
                    if let Ok(m) = nodes[s].link.connect(now, random(seed)) {
                        in_flight.push((1 - s, m, copies));
                    }
                }
                Event::Deliver(i) => {
                    let (to, m, left) = in_flight.remove(i);
                    if left > 0 {
                        in_flight.push((to, m, left - 1));
                    }
                    let sender = nodes[1 - to].identity.public_key();
                    let node = &mut nodes[to];
                    let r = node
                        .link
                        .handle(now, &node.identity, &sender, &m, || random(seed));
                    // Refusals would go back as `error` envelopes, which the
                    // handshake does not consume.
                    if let Ok(Some(reply)) = r {
                        in_flight.push((1 - to, reply, copies));
                    }
                    if let Some(s) = node.link.poll_session() {
                        node.sessions.push(s);
                    }
                }
            }
        }
        (nodes, counts)
    }

    /// Exactly one session on each side, the same one. Returns whether a side
    /// was left with a stray responder attempt: the loser's init delivered
    /// after the winner's session was READY looks like a re-handshake; the
    /// loser refuses its ack, and it times out without touching the session.
    fn check_converged(nodes: &mut [Node; 2], trace: &[usize]) -> bool {
        let [a, b] = nodes;
        assert_eq!(a.sessions.len(), 1, "A's sessions, trace {trace:?}");
        assert_eq!(b.sessions.len(), 1, "B's sessions, trace {trace:?}");
        assert_paired(&mut a.sessions[0], &mut b.sessions[0], T0 + 100);
        let mut stray = false;
        for n in [a, b] {
            let h = n.link.handshake().expect("an attempt");
            if h.state() != State::Ready {
                assert_eq!(h.state(), State::ChallengeSent, "trace {trace:?}");
                assert_eq!(h.role(), Role::Responder, "trace {trace:?}");
                stray = true;
                n.link.handle_timeout(T0 + 60_000);
                assert_eq!(n.link.state(), Some(State::Error));
                assert!(n.link.poll_session().is_none());
            }
        }
        stray
    }

    /// Every interleaving of the two `connect` calls and of the deliveries
    /// (in any order), for each choice of which sides initiate, ends with
    /// exactly one session on each side, and they are the same session.
    /// Every interleaving of the two `connect` calls and of the deliveries
    /// (in any order), for each choice of which sides initiate, ends with
    /// exactly one session on each side, and they are the same session.
    fn every_interleaving(duplicate: bool) -> (usize, usize, usize) {
        let (mut total, mut both_initiated, mut stray) = (0, 0, 0);
        for connects in [[true, false], [false, true], [true, true]] {
            // Depth-first over choice sequences, replaying from the start.
            let mut stack: Vec<Vec<usize>> = vec![vec![]];
            while let Some(prefix) = stack.pop() {
                let mut step = 0;
                let (mut nodes, counts) = simulate(connects, duplicate, |n| {
                    let c = prefix.get(step).copied().unwrap_or(0);
                    step += 1;
                    assert!(c < n);
                    c
                });
                // Branch at every step past the prefix on the other choices.
                for (depth, &n) in counts.iter().enumerate().skip(prefix.len()) {
                    for alt in 1..n {
                        let mut p: Vec<usize> = vec![0; depth + 1];
                        p[..prefix.len()].copy_from_slice(&prefix);
                        p[depth] = alt;
                        stack.push(p);
                    }
                }
                let trace: Vec<usize> = (0..counts.len())
                    .map(|i| prefix.get(i).copied().unwrap_or(0))
                    .collect();
                if check_converged(&mut nodes, &trace) {
                    stray += 1;
                }
                total += 1;
                if connects == [true, true] {
                    both_initiated += 1;
                }
            }
        }
        println!(
            "duplicates {duplicate}: {total} interleavings checked ({both_initiated} with both \
             initiating, {stray} leaving a stray responder attempt)"
        );
        (total, both_initiated, stray)
    }

    #[test]
    fn simultaneous_initiation_converges_under_every_interleaving() {
        let (_, both, _) = every_interleaving(false);
        assert!(both > 10, "{both} interleavings");
    }

    proptest::proptest! {
        /// With every message possibly delivered twice (a resent envelope), the
        /// interleavings are too many to enumerate: sample them.
        #[test]
        fn simultaneous_initiation_converges_with_duplicated_messages(
            connects in proptest::sample::select(vec![[true, false], [false, true], [true, true]]),
            choices in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 64),
        ) {
            let mut trace = vec![];
            let (mut nodes, _) = simulate(connects, true, |n| {
                let c = choices[trace.len() % choices.len()].index(n);
                trace.push(c);
                c
            });
            check_converged(&mut nodes, &trace);
        }
    }

    #[test]
    fn connect_while_running_is_handshake_in_progress() {
        let (a, b) = (identity(1), identity(2));
        let mut link = Link::new(Config::default(), a.entity_id(), b.entity_id());
        link.connect(T0, random(1)).expect("first");
        let e = link.connect(T0 + 1, random(2)).expect_err("running");
        assert_eq!(e.code, ErrorCode::HandshakeInProgress);
        // Once the attempt timed out, a new one may start.
        assert!(link.connect(T0 + 60_000, random(3)).is_ok());
        assert_eq!(link.state(), Some(State::HandshakeInitSent));
    }

    #[test]
    fn a_peer_that_restarts_its_handshake_is_answered_afresh() {
        let (a, b) = (identity(1), identity(2));
        let mut at_b = Link::new(Config::default(), b.entity_id(), a.entity_id());
        let mut at_a = Link::new(Config::default(), a.entity_id(), b.entity_id());
        let first = at_a.connect(T0, random(1)).expect("starts");
        let ack1 = at_b
            .handle(T0, &b, &a.public_key(), &first, || random(2))
            .expect("ok")
            .expect("ack");
        // A lost its state and starts over before answering.
        let mut at_a = Link::new(Config::default(), a.entity_id(), b.entity_id());
        let second = at_a.connect(T0 + 5, random(3)).expect("starts");
        let ack2 = at_b
            .handle(T0 + 5, &b, &a.public_key(), &second, || random(4))
            .expect("ok")
            .expect("ack");
        assert_ne!(ack1, ack2);
        // The duplicate of the current init is refused, not restarted.
        let dup = at_b.handle(T0 + 6, &b, &a.public_key(), &second, || random(5));
        assert_eq!(dup.expect_err("dup").code, ErrorCode::InvalidState);
        // The new attempt completes.
        let mut to_b = ack2;
        let mut now = T0 + 10;
        let mut msg = at_a
            .handle(now, &a, &b.public_key(), &to_b, || random(6))
            .expect("ok");
        while let Some(m) = msg {
            now += 1;
            to_b = m;
            let back = at_b
                .handle(now, &b, &a.public_key(), &to_b, || random(7))
                .expect("ok");
            msg = match back {
                Some(m) => at_a
                    .handle(now, &a, &b.public_key(), &m, || random(8))
                    .expect("ok"),
                None => None,
            };
        }
        let mut sa = at_a.poll_session().expect("session");
        let mut sb = at_b.poll_session().expect("session");
        assert_paired(&mut sa, &mut sb, now);
        // A later init (the peer re-handshakes) starts a new responder attempt.
        let third = at_a.connect(now + 1, random(9)).expect("re-handshake");
        let r = at_b.handle(now + 1, &b, &a.public_key(), &third, || random(10));
        assert!(matches!(r, Ok(Some(Message::InitAck(_)))));
        assert_eq!(at_b.state(), Some(State::ChallengeSent));
    }

    #[test]
    fn messages_from_others_or_without_an_attempt_are_session_not_found() {
        let (a, b, c) = (identity(1), identity(2), identity(3));
        let mut at_b = Link::new(Config::default(), b.entity_id(), a.entity_id());
        let ready = Message::Ready(super::super::messages::Ready {
            session_id: crate::SessionId([1; 16]),
        });
        let r = at_b.handle(T0, &b, &a.public_key(), &ready, || random(1));
        assert_eq!(r.expect_err("none").code, ErrorCode::SessionNotFound);
        let mut at_c = Link::new(Config::default(), c.entity_id(), a.entity_id());
        let init = at_c.connect(T0, random(2)).expect("starts");
        let r = at_b.handle(T0, &b, &c.public_key(), &init, || random(3));
        assert_eq!(r.expect_err("other").code, ErrorCode::SessionNotFound);
        assert_eq!(at_b.state(), None);
    }
}
