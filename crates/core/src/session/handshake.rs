//! One handshake attempt between a local entity and a peer, as a pure state
//! machine.
//!
//! Inputs are pushed with the time: [`Handshake::start`] (initiator),
//! [`Handshake::handle`] (a verified message from the peer) and
//! [`Handshake::handle_timeout`]. Each input returns its reply, if any, as a
//! [`Message`] to send to the peer in a signed envelope, or a [`Rejection`] to
//! send back as an `error` envelope. [`Handshake::poll_timeout`] says when to
//! call `handle_timeout` next; [`Handshake::poll_session`] yields the session
//! once the state is READY.
//!
//! Transitions (see `docs/PROTOCOL.md` for the full table):
//!
//! ```text
//! initiator  INITIAL ─start→ HANDSHAKE_INIT_SENT ─ack→ (HANDSHAKE_ACK_RECEIVED) → CHALLENGE_SENT
//!            ─established→ (SESSION_ESTABLISHED) → SESSION_CONFIRMED ─ready→ READY
//! responder  INITIAL ─init→ CHALLENGE_SENT ─challenge_response→ SESSION_ESTABLISHED
//!            ─confirm→ READY
//! both       READY ─lifetime over→ EXPIRED;  any running state ─fatal error or timeout→ ERROR
//! ```
//!
//! Refusals come in two kinds. A message that does not fit (wrong state:
//! `INVALID_STATE`; another attempt's or session's id, or another sender:
//! `SESSION_NOT_FOUND`; another attempt's init: `HANDSHAKE_IN_PROGRESS`) is
//! refused and the state is unchanged, so a stray or duplicated message cannot
//! break a handshake. A failed proof (`CHALLENGE_INVALID`) or a timeout
//! (`CHALLENGE_EXPIRED`) moves the attempt to ERROR, drops its key material, and
//! is returned again for every later input (errors are sticky).

use std::fmt;

use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::keys::{self, HandshakeId, Keys, Transcript};
use super::messages::{
    ChallengeResponse, HandshakeInit, HandshakeInitAck, Message, Ready, SessionConfirm,
    SessionEstablished,
};
use super::{Config, Role, Session, State};
use crate::envelope::SessionId;
use crate::error::{ErrorCode, Rejection};
use crate::identity::{self, EntityId, Identity, PublicKey};

/// The random bytes one handshake attempt needs, from a cryptographic RNG.
/// An initiator uses `handshake_id` and `ephemeral`; a responder uses
/// `ephemeral`, `challenge` and `session_id`. Zeroised on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Random {
    /// The attempt's id (initiator).
    pub handshake_id: [u8; 16],
    /// The X25519 ephemeral secret (both roles). Never reuse it.
    pub ephemeral: [u8; 32],
    /// The challenge (responder).
    pub challenge: [u8; 32],
    /// Random bytes of the session id, a UUID v4 (responder).
    pub session_id: [u8; 16],
}

impl Random {
    /// Bytes [`Random::from_bytes`] takes.
    pub const LEN: usize = 96;

    /// Splits 96 random bytes: handshake_id 0..16, ephemeral 16..48,
    /// challenge 48..80, session_id 80..96.
    pub fn from_bytes(bytes: &[u8; Self::LEN]) -> Self {
        let mut r = Self {
            handshake_id: [0; 16],
            ephemeral: [0; 32],
            challenge: [0; 32],
            session_id: [0; 16],
        };
        r.handshake_id.copy_from_slice(&bytes[..16]);
        r.ephemeral.copy_from_slice(&bytes[16..48]);
        r.challenge.copy_from_slice(&bytes[48..80]);
        r.session_id.copy_from_slice(&bytes[80..]);
        r
    }
}

impl fmt::Debug for Random {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Random(..)")
    }
}

/// What both sides know once the ephemeral keys are exchanged.
struct Derived {
    th: [u8; 32],
    keys: Keys,
    challenge: [u8; 32],
    /// Responder: when its challenge stops being answerable.
    challenge_deadline_ms: Option<u64>,
    /// Responder: chosen at the start; initiator: learnt from `session_established`.
    session_id: Option<SessionId>,
}

enum Stage {
    Initial(Random),
    InitSent {
        secret: StaticSecret,
        ephemeral: [u8; 32],
    },
    ChallengeSent(Box<Derived>),
    Established(Box<Derived>),
    Confirmed(Box<Derived>),
    Ready {
        session: Option<Session>,
        expires_ms: u64,
    },
    Error(Rejection),
    Expired,
}

/// How an input was refused.
enum Fail {
    /// The message does not fit; the state is unchanged.
    Refuse(Rejection),
    /// The attempt is over: the state becomes ERROR with this rejection.
    Abort(Rejection),
}

fn refuse(code: ErrorCode, reason: impl Into<String>) -> Fail {
    Fail::Refuse(Rejection::new(code, reason))
}

fn abort(code: ErrorCode, reason: impl Into<String>) -> Fail {
    Fail::Abort(Rejection::new(code, reason))
}

/// One handshake attempt with one peer, in one role. See the module docs.
pub struct Handshake {
    config: Config,
    role: Role,
    local: EntityId,
    peer: EntityId,
    handshake_id: Option<HandshakeId>,
    started_ms: Option<u64>,
    stage: Stage,
}

impl Handshake {
    /// An initiator for a handshake from `local` to `peer`, in INITIAL. Call
    /// [`Handshake::start`] to get the `handshake_init` to send.
    pub fn initiator(config: Config, local: EntityId, peer: EntityId, random: Random) -> Self {
        Self::new(config, Role::Initiator, local, peer, random)
    }

    /// A responder of `local` for a handshake `peer` starts, in INITIAL. Pass it
    /// the peer's `handshake_init` with [`Handshake::handle`].
    pub fn responder(config: Config, local: EntityId, peer: EntityId, random: Random) -> Self {
        Self::new(config, Role::Responder, local, peer, random)
    }

    fn new(config: Config, role: Role, local: EntityId, peer: EntityId, random: Random) -> Self {
        Self {
            config,
            role,
            local,
            peer,
            handshake_id: None,
            started_ms: None,
            stage: Stage::Initial(random),
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This side's entity id.
    pub fn local(&self) -> EntityId {
        self.local
    }

    /// The peer's entity id.
    pub fn peer(&self) -> EntityId {
        self.peer
    }

    /// The attempt's id, once `handshake_init` was sent or received.
    pub fn handshake_id(&self) -> Option<HandshakeId> {
        self.handshake_id
    }

    /// When the attempt started (init sent or received), if it has.
    pub fn started_ms(&self) -> Option<u64> {
        self.started_ms
    }

    /// The current state.
    pub fn state(&self) -> State {
        match self.stage {
            Stage::Initial(_) => State::Initial,
            Stage::InitSent { .. } => State::HandshakeInitSent,
            Stage::ChallengeSent(_) => State::ChallengeSent,
            Stage::Established(_) => State::SessionEstablished,
            Stage::Confirmed(_) => State::SessionConfirmed,
            Stage::Ready { .. } => State::Ready,
            Stage::Error(_) => State::Error,
            Stage::Expired => State::Expired,
        }
    }

    /// The error that ended the attempt, in state ERROR.
    pub fn error(&self) -> Option<&Rejection> {
        match &self.stage {
            Stage::Error(r) => Some(r),
            _ => None,
        }
    }

    /// The session, once, when the state is READY. Call it after every
    /// [`Handshake::handle`] that returned `Ok`.
    pub fn poll_session(&mut self) -> Option<Session> {
        match &mut self.stage {
            Stage::Ready { session, .. } => session.take(),
            _ => None,
        }
    }

    /// The instant (ms) at which [`Handshake::handle_timeout`] has work to do:
    /// the challenge deadline (responder in CHALLENGE_SENT), the handshake
    /// deadline (any other running state) or the session's expiry (READY).
    /// `None` in INITIAL, ERROR and EXPIRED.
    pub fn poll_timeout(&self) -> Option<u64> {
        let handshake_deadline = self
            .started_ms
            .map(|t| t.saturating_add(self.config.handshake_timeout_ms));
        match &self.stage {
            Stage::Initial(_) | Stage::Error(_) | Stage::Expired => None,
            Stage::Ready { expires_ms, .. } => Some(*expires_ms),
            Stage::ChallengeSent(d) => match (d.challenge_deadline_ms, handshake_deadline) {
                (Some(c), Some(h)) => Some(c.min(h)),
                (c, h) => c.or(h),
            },
            Stage::InitSent { .. } | Stage::Established(_) | Stage::Confirmed(_) => {
                handshake_deadline
            }
        }
    }

    /// Applies the timers at `now_ms`: a running attempt past its handshake
    /// deadline, or a responder whose challenge went unanswered past the
    /// challenge timeout, moves to ERROR (`CHALLENGE_EXPIRED`); a READY attempt
    /// past the session lifetime moves to EXPIRED. Every other input applies
    /// the timers first, so calling this is needed only to notice silence.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Stage::Ready { expires_ms, .. } = self.stage {
            if now_ms >= expires_ms {
                self.stage = Stage::Expired;
            }
            return;
        }
        if !self.state().is_running() {
            return;
        }
        if let Stage::ChallengeSent(d) = &self.stage
            && let Some(deadline) = d.challenge_deadline_ms
            && now_ms >= deadline
        {
            self.stage = Stage::Error(Rejection::new(
                ErrorCode::ChallengeExpired,
                format!(
                    "no valid challenge_response within {} ms of the challenge",
                    self.config.challenge_timeout_ms
                ),
            ));
            return;
        }
        if let Some(started) = self.started_ms
            && now_ms >= started.saturating_add(self.config.handshake_timeout_ms)
        {
            self.stage = Stage::Error(Rejection::new(
                ErrorCode::ChallengeExpired,
                format!(
                    "handshake not completed within {} ms",
                    self.config.handshake_timeout_ms
                ),
            ));
        }
    }

    /// The rejection every input gets in ERROR (the stored error) or EXPIRED.
    fn terminal(&self) -> Option<Rejection> {
        match &self.stage {
            Stage::Error(r) => Some(r.clone()),
            Stage::Expired => Some(Rejection::new(
                ErrorCode::SessionExpired,
                "the session's lifetime is over; start a new handshake",
            )),
            _ => None,
        }
    }

    fn settle<T>(&mut self, r: Result<T, Fail>) -> Result<T, Rejection> {
        match r {
            Ok(v) => Ok(v),
            Err(Fail::Refuse(e)) => Err(e),
            Err(Fail::Abort(e)) => {
                self.stage = Stage::Error(e.clone());
                Err(e)
            }
        }
    }

    /// Initiator: sends `handshake_init` (INITIAL → HANDSHAKE_INIT_SENT) and
    /// starts the handshake timer. `INVALID_STATE` for a responder or after
    /// the first call.
    pub fn start(&mut self, now_ms: u64) -> Result<Message, Rejection> {
        self.handle_timeout(now_ms);
        if let Some(e) = self.terminal() {
            return Err(e);
        }
        let Stage::Initial(random) = &self.stage else {
            return Err(Rejection::new(
                ErrorCode::InvalidState,
                format!("handshake already started (state {})", self.state()),
            ));
        };
        if self.role != Role::Initiator {
            return Err(Rejection::new(
                ErrorCode::InvalidState,
                "a responder waits for handshake_init",
            ));
        }
        let handshake_id = HandshakeId(random.handshake_id);
        let secret = StaticSecret::from(random.ephemeral);
        let ephemeral = x25519_dalek::PublicKey::from(&secret).to_bytes();
        self.handshake_id = Some(handshake_id);
        self.started_ms = Some(now_ms);
        // Replacing the stage drops (and zeroises) the rest of the randomness.
        self.stage = Stage::InitSent { secret, ephemeral };
        Ok(Message::Init(HandshakeInit {
            handshake_id,
            ephemeral,
        }))
    }

    /// Handles a handshake message from the peer, received at `now_ms` in an
    /// envelope that passed the inbound checks; `sender` is that envelope's
    /// `sender_public_key`. `identity` is the local identity (the initiator
    /// signs the challenge with it). Returns the message to send back, if any.
    ///
    /// Errors (see the module docs for which ones end the attempt):
    /// `SESSION_NOT_FOUND` (not from this attempt's peer, or another attempt's
    /// handshake or session id), `INVALID_STATE` (not valid in this state),
    /// `HANDSHAKE_IN_PROGRESS` (a `handshake_init` of another attempt while
    /// this one runs), `CHALLENGE_INVALID` (bad signature or confirmation MAC,
    /// low-order ephemeral key), `CHALLENGE_EXPIRED` (too late), and in
    /// EXPIRED, `SESSION_EXPIRED`.
    pub fn handle(
        &mut self,
        now_ms: u64,
        identity: &Identity,
        sender: &PublicKey,
        msg: &Message,
    ) -> Result<Option<Message>, Rejection> {
        self.handle_timeout(now_ms);
        if let Some(e) = self.terminal() {
            return Err(e);
        }
        let from = EntityId::of(sender);
        if from != self.peer {
            return Err(Rejection::new(
                ErrorCode::SessionNotFound,
                format!(
                    "no handshake with {from} here (this one is with {})",
                    self.peer
                ),
            ));
        }
        if identity.entity_id() != self.local {
            return Err(Rejection::new(
                ErrorCode::InvalidState,
                "handshake driven with another local identity",
            ));
        }
        let r = match (self.role, msg) {
            (_, Message::Init(m)) => self.on_init(now_ms, m).map(Some),
            (Role::Initiator, Message::InitAck(m)) => self.on_ack(identity, m).map(Some),
            (Role::Responder, Message::ChallengeResponse(m)) => {
                self.on_challenge_response(sender, m).map(Some)
            }
            (Role::Initiator, Message::Established(m)) => self.on_established(m).map(Some),
            (Role::Responder, Message::Confirm(m)) => self.on_confirm(now_ms, m).map(Some),
            (Role::Initiator, Message::Ready(m)) => self.on_ready(now_ms, m).map(|()| None),
            (role, m) => Err(self.unexpected(role, m)),
        };
        self.settle(r)
    }

    fn unexpected(&self, role: Role, msg: &Message) -> Fail {
        refuse(
            ErrorCode::InvalidState,
            format!(
                "{} is not valid for the {role} in state {}",
                msg.msg_type(),
                self.state()
            ),
        )
    }

    fn check_handshake_id(&self, id: HandshakeId) -> Result<(), Fail> {
        if self.handshake_id == Some(id) {
            Ok(())
        } else {
            Err(refuse(
                ErrorCode::SessionNotFound,
                format!("handshake {id} is not the one in progress"),
            ))
        }
    }

    fn check_session_id(d: &Derived, id: SessionId) -> Result<(), Fail> {
        if d.session_id == Some(id) {
            Ok(())
        } else {
            Err(refuse(
                ErrorCode::SessionNotFound,
                format!("session {id} is not the one being established"),
            ))
        }
    }

    /// Responder, INITIAL → CHALLENGE_SENT.
    fn on_init(&mut self, now_ms: u64, m: &HandshakeInit) -> Result<Message, Fail> {
        if self.handshake_id == Some(m.handshake_id) {
            return Err(refuse(
                ErrorCode::InvalidState,
                format!(
                    "handshake_init of handshake {} already handled (state {})",
                    m.handshake_id,
                    self.state()
                ),
            ));
        }
        let random = match (&self.stage, self.role) {
            (Stage::Initial(random), Role::Responder) => random,
            _ if self.state().is_running() => {
                return Err(refuse(
                    ErrorCode::HandshakeInProgress,
                    format!(
                        "handshake {:?} with this peer is in progress",
                        self.handshake_id
                    ),
                ));
            }
            _ => return Err(self.unexpected(self.role, &Message::Init(*m))),
        };
        self.handshake_id = Some(m.handshake_id);
        self.started_ms = Some(now_ms);
        let secret = StaticSecret::from(random.ephemeral);
        let ephemeral = x25519_dalek::PublicKey::from(&secret).to_bytes();
        let challenge = random.challenge;
        let session_id = SessionId::from_random(random.session_id);
        let shared = keys::agree(&secret, &m.ephemeral).map_err(Fail::Abort)?;
        drop(secret);
        let th = Transcript {
            initiator: self.peer,
            responder: self.local,
            initiator_ephemeral: m.ephemeral,
            responder_ephemeral: ephemeral,
            handshake_id: m.handshake_id,
            challenge,
        }
        .hash();
        let keys = Keys::derive(&shared, &th).map_err(Fail::Abort)?;
        drop(shared);
        self.stage = Stage::ChallengeSent(Box::new(Derived {
            th,
            keys,
            challenge,
            challenge_deadline_ms: Some(now_ms.saturating_add(self.config.challenge_timeout_ms)),
            session_id: Some(session_id),
        }));
        Ok(Message::InitAck(HandshakeInitAck {
            handshake_id: m.handshake_id,
            ephemeral,
            challenge,
        }))
    }

    /// Initiator, HANDSHAKE_INIT_SENT → HANDSHAKE_ACK_RECEIVED → CHALLENGE_SENT.
    fn on_ack(&mut self, identity: &Identity, m: &HandshakeInitAck) -> Result<Message, Fail> {
        let Stage::InitSent { secret, ephemeral } = &self.stage else {
            return Err(self.unexpected(self.role, &Message::InitAck(*m)));
        };
        self.check_handshake_id(m.handshake_id)?;
        let shared = keys::agree(secret, &m.ephemeral).map_err(Fail::Abort)?;
        let th = Transcript {
            initiator: self.local,
            responder: self.peer,
            initiator_ephemeral: *ephemeral,
            responder_ephemeral: m.ephemeral,
            handshake_id: m.handshake_id,
            challenge: m.challenge,
        }
        .hash();
        let keys = Keys::derive(&shared, &th).map_err(Fail::Abort)?;
        drop(shared);
        let signature = identity.sign(&keys::challenge_signed_bytes(&th, &m.challenge));
        // Replacing InitSent drops (and zeroises) the ephemeral secret.
        self.stage = Stage::ChallengeSent(Box::new(Derived {
            th,
            keys,
            challenge: m.challenge,
            challenge_deadline_ms: None,
            session_id: None,
        }));
        Ok(Message::ChallengeResponse(ChallengeResponse {
            handshake_id: m.handshake_id,
            signature,
        }))
    }

    /// Responder, CHALLENGE_SENT → SESSION_ESTABLISHED.
    fn on_challenge_response(
        &mut self,
        sender: &PublicKey,
        m: &ChallengeResponse,
    ) -> Result<Message, Fail> {
        let Stage::ChallengeSent(d) = &self.stage else {
            return Err(self.unexpected(self.role, &Message::ChallengeResponse(*m)));
        };
        self.check_handshake_id(m.handshake_id)?;
        let signed = keys::challenge_signed_bytes(&d.th, &d.challenge);
        if !identity::verify(sender, &signed, &m.signature) {
            return Err(abort(
                ErrorCode::ChallengeInvalid,
                "challenge signature does not verify over this side's transcript",
            ));
        }
        let Some(session_id) = d.session_id else {
            return Err(abort(ErrorCode::InvalidState, "no session id chosen"));
        };
        let confirm = d.keys.confirm_tag(Role::Responder, &d.th, &session_id);
        let Some(d) = self.take_derived() else {
            return Err(abort(ErrorCode::InvalidState, "handshake keys missing"));
        };
        self.stage = Stage::Established(d);
        Ok(Message::Established(SessionEstablished {
            handshake_id: m.handshake_id,
            session_id,
            confirm,
        }))
    }

    /// Initiator, CHALLENGE_SENT → SESSION_ESTABLISHED → SESSION_CONFIRMED.
    fn on_established(&mut self, m: &SessionEstablished) -> Result<Message, Fail> {
        let Stage::ChallengeSent(d) = &self.stage else {
            return Err(self.unexpected(self.role, &Message::Established(*m)));
        };
        self.check_handshake_id(m.handshake_id)?;
        if !d
            .keys
            .verify_confirm(Role::Responder, &d.th, &m.session_id, &m.confirm)
        {
            return Err(abort(
                ErrorCode::ChallengeInvalid,
                "session_established confirmation does not verify",
            ));
        }
        let confirm = d.keys.confirm_tag(Role::Initiator, &d.th, &m.session_id);
        let Some(mut d) = self.take_derived() else {
            return Err(abort(ErrorCode::InvalidState, "handshake keys missing"));
        };
        d.session_id = Some(m.session_id);
        self.stage = Stage::Confirmed(d);
        Ok(Message::Confirm(SessionConfirm {
            session_id: m.session_id,
            confirm,
        }))
    }

    /// Responder, SESSION_ESTABLISHED → READY.
    fn on_confirm(&mut self, now_ms: u64, m: &SessionConfirm) -> Result<Message, Fail> {
        let Stage::Established(d) = &self.stage else {
            return Err(self.unexpected(self.role, &Message::Confirm(*m)));
        };
        Self::check_session_id(d, m.session_id)?;
        if !d
            .keys
            .verify_confirm(Role::Initiator, &d.th, &m.session_id, &m.confirm)
        {
            return Err(abort(
                ErrorCode::ChallengeInvalid,
                "session_confirm confirmation does not verify",
            ));
        }
        self.become_ready(now_ms, m.session_id);
        Ok(Message::Ready(Ready {
            session_id: m.session_id,
        }))
    }

    /// Initiator, SESSION_CONFIRMED → READY.
    fn on_ready(&mut self, now_ms: u64, m: &Ready) -> Result<(), Fail> {
        let Stage::Confirmed(d) = &self.stage else {
            return Err(self.unexpected(self.role, &Message::Ready(*m)));
        };
        Self::check_session_id(d, m.session_id)?;
        self.become_ready(now_ms, m.session_id);
        Ok(())
    }

    fn become_ready(&mut self, now_ms: u64, session_id: SessionId) {
        let Some(d) = self.take_derived() else {
            return;
        };
        let session = Session::new(
            session_id,
            self.local,
            self.peer,
            self.role,
            now_ms,
            self.config.session_lifetime_ms,
            &d.keys,
        );
        // `d` (with the handshake keys) is dropped, and zeroised, here.
        self.stage = Stage::Ready {
            expires_ms: session.expires_ms(),
            session: Some(session),
        };
    }

    /// Moves the derived keys out of a stage that holds them.
    fn take_derived(&mut self) -> Option<Box<Derived>> {
        match std::mem::replace(&mut self.stage, Stage::Expired) {
            Stage::ChallengeSent(d) | Stage::Established(d) | Stage::Confirmed(d) => Some(d),
            other => {
                self.stage = other;
                None
            }
        }
    }
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("local", &self.local)
            .field("peer", &self.peer)
            .field("handshake_id", &self.handshake_id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::testing::{T0, assert_paired, identity, random};
    use proptest::prelude::*;

    /// An initiator (identity 1) and a responder (identity 2).
    struct Pair {
        a: Identity,
        b: Identity,
        ia: Handshake,
        rb: Handshake,
    }

    fn pair() -> Pair {
        pair_with(Config::default())
    }

    fn pair_with(config: Config) -> Pair {
        let (a, b) = (identity(1), identity(2));
        let ia = Handshake::initiator(config, a.entity_id(), b.entity_id(), random(10));
        let rb = Handshake::responder(config, b.entity_id(), a.entity_id(), random(20));
        Pair { a, b, ia, rb }
    }

    impl Pair {
        fn send_b(&mut self, now: u64, m: &Message) -> Result<Option<Message>, Rejection> {
            self.rb.handle(now, &self.b, &self.a.public_key(), m)
        }
        fn send_a(&mut self, now: u64, m: &Message) -> Result<Option<Message>, Rejection> {
            self.ia.handle(now, &self.a, &self.b.public_key(), m)
        }
    }

    fn reply(r: Result<Option<Message>, Rejection>) -> Message {
        r.expect("accepted").expect("a reply")
    }

    fn code<T: fmt::Debug>(r: Result<T, Rejection>) -> ErrorCode {
        r.expect_err("refused").code
    }

    /// The six messages of a complete run, each step 1 s after the previous.
    fn run(p: &mut Pair) -> [Message; 6] {
        let init = p.ia.start(T0).expect("starts");
        let ack = reply(p.send_b(T0 + 1000, &init));
        let resp = reply(p.send_a(T0 + 2000, &ack));
        let est = reply(p.send_b(T0 + 3000, &resp));
        let conf = reply(p.send_a(T0 + 4000, &est));
        let ready = reply(p.send_b(T0 + 5000, &conf));
        assert_eq!(p.send_a(T0 + 6000, &ready), Ok(None));
        [init, ack, resp, est, conf, ready]
    }

    #[test]
    fn full_handshake_gives_both_sides_the_same_session() {
        let mut p = pair();
        assert_eq!(
            (p.ia.state(), p.rb.state()),
            (State::Initial, State::Initial)
        );
        assert_eq!((p.ia.poll_timeout(), p.rb.poll_timeout()), (None, None));

        let init = p.ia.start(T0).expect("starts");
        assert_eq!(init.msg_type(), "handshake_init");
        assert_eq!(p.ia.state(), State::HandshakeInitSent);
        assert_eq!(p.ia.poll_timeout(), Some(T0 + 60_000));

        let ack = reply(p.send_b(T0 + 1000, &init));
        assert_eq!(ack.msg_type(), "handshake_init_ack");
        assert_eq!(p.rb.state(), State::ChallengeSent);
        assert_eq!(p.rb.poll_timeout(), Some(T0 + 1000 + 30_000));
        assert_eq!(p.rb.handshake_id(), p.ia.handshake_id());

        let resp = reply(p.send_a(T0 + 2000, &ack));
        assert_eq!(resp.msg_type(), "challenge_response");
        assert_eq!(p.ia.state(), State::ChallengeSent);

        let est = reply(p.send_b(T0 + 3000, &resp));
        assert_eq!(est.msg_type(), "session_established");
        assert_eq!(p.rb.state(), State::SessionEstablished);
        assert_eq!(p.rb.poll_timeout(), Some(T0 + 1000 + 60_000));

        let conf = reply(p.send_a(T0 + 4000, &est));
        assert_eq!(conf.msg_type(), "session_confirm");
        assert_eq!(p.ia.state(), State::SessionConfirmed);
        assert!(p.ia.poll_session().is_none());

        let ready = reply(p.send_b(T0 + 5000, &conf));
        assert_eq!(ready.msg_type(), "ready");
        assert_eq!(p.rb.state(), State::Ready);
        assert_eq!(p.send_a(T0 + 6000, &ready), Ok(None));
        assert_eq!(p.ia.state(), State::Ready);

        let mut sa = p.ia.poll_session().expect("initiator session");
        let mut sb = p.rb.poll_session().expect("responder session");
        assert!(p.ia.poll_session().is_none() && p.rb.poll_session().is_none());
        assert_eq!(sa.role(), Role::Initiator);
        assert_eq!(sb.role(), Role::Responder);
        assert_eq!(sa.established_ms(), T0 + 6000);
        assert_eq!(sb.established_ms(), T0 + 5000);
        assert_eq!(sa.id().to_string().as_bytes()[14], b'4', "UUID v4");
        assert_paired(&mut sa, &mut sb, T0 + 7000);
    }

    #[test]
    fn swapped_ephemeral_keys_fail_with_challenge_invalid_and_no_session() {
        // 0: the initiator's key is replaced on its way to B; 1: the
        // responder's on its way to A; 2: both, each with a key of the MITM's.
        for case in 0..3 {
            let mut p = pair();
            let mitm = [
                keys::ephemeral_public(&[0x99; 32]),
                keys::ephemeral_public(&[0x98; 32]),
            ];
            let mut init = p.ia.start(T0).expect("starts");
            if case != 1
                && let Message::Init(m) = &mut init
            {
                m.ephemeral = mitm[0];
            }
            let mut ack = reply(p.send_b(T0, &init));
            if case != 0
                && let Message::InitAck(m) = &mut ack
            {
                m.ephemeral = mitm[1];
            }
            let resp = reply(p.send_a(T0, &ack));
            let e = p.send_b(T0, &resp).expect_err("the transcripts differ");
            assert_eq!(e.code, ErrorCode::ChallengeInvalid, "case {case}");
            assert_eq!(p.rb.state(), State::Error);
            assert!(p.rb.poll_session().is_none() && p.ia.poll_session().is_none());
            // The initiator never gets further and times out.
            p.ia.handle_timeout(T0 + 60_000);
            assert_eq!(p.ia.state(), State::Error);
            assert!(p.ia.poll_session().is_none());
        }
    }

    #[test]
    fn forged_signature_and_confirmation_macs_fail() {
        // A bad challenge signature.
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        let ack = reply(p.send_b(T0, &init));
        let mut resp = reply(p.send_a(T0, &ack));
        if let Message::ChallengeResponse(m) = &mut resp {
            m.signature[3] ^= 1;
        }
        assert_eq!(code(p.send_b(T0, &resp)), ErrorCode::ChallengeInvalid);

        // A bad session_established MAC, then a bad session_confirm MAC.
        for at_initiator in [true, false] {
            let mut p = pair();
            let init = p.ia.start(T0).expect("starts");
            let ack = reply(p.send_b(T0, &init));
            let resp = reply(p.send_a(T0, &ack));
            let mut est = reply(p.send_b(T0, &resp));
            if at_initiator {
                if let Message::Established(m) = &mut est {
                    m.confirm[0] ^= 0x80;
                }
                assert_eq!(code(p.send_a(T0, &est)), ErrorCode::ChallengeInvalid);
                assert_eq!(p.ia.state(), State::Error);
            } else {
                let mut conf = reply(p.send_a(T0, &est));
                if let Message::Confirm(m) = &mut conf {
                    m.confirm[31] ^= 1;
                }
                assert_eq!(code(p.send_b(T0, &conf)), ErrorCode::ChallengeInvalid);
                assert_eq!(p.rb.state(), State::Error);
            }
        }
    }

    #[test]
    fn a_session_id_changed_in_flight_fails_the_confirmation() {
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        let ack = reply(p.send_b(T0, &init));
        let resp = reply(p.send_a(T0, &ack));
        let mut est = reply(p.send_b(T0, &resp));
        if let Message::Established(m) = &mut est {
            m.session_id.0[0] ^= 1;
        }
        assert_eq!(code(p.send_a(T0, &est)), ErrorCode::ChallengeInvalid);
    }

    #[test]
    fn low_order_ephemeral_keys_are_refused_on_both_sides() {
        let mut p = pair();
        let init = Message::Init(HandshakeInit {
            handshake_id: HandshakeId([1; 16]),
            ephemeral: [0; 32],
        });
        assert_eq!(code(p.send_b(T0, &init)), ErrorCode::ChallengeInvalid);
        assert_eq!(p.rb.state(), State::Error);

        let mut p = pair();
        let Message::Init(m) = p.ia.start(T0).expect("starts") else {
            panic!("init");
        };
        let ack = Message::InitAck(HandshakeInitAck {
            handshake_id: m.handshake_id,
            ephemeral: [0; 32],
            challenge: [1; 32],
        });
        assert_eq!(code(p.send_a(T0, &ack)), ErrorCode::ChallengeInvalid);
        assert_eq!(p.ia.state(), State::Error);
    }

    #[test]
    fn replayed_and_out_of_order_messages_are_invalid_state_and_harmless() {
        // Learn every message of a complete run, then replay each one into
        // every state of a fresh run where it does not belong.
        let all = run(&mut pair());
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        // Initiator in HANDSHAKE_INIT_SENT: only the ack (of this attempt) fits.
        for m in [&all[2], &all[3], &all[4], &all[5]] {
            assert_eq!(
                code(p.send_a(T0, m)),
                ErrorCode::InvalidState,
                "{}",
                m.msg_type()
            );
        }
        // Responder in INITIAL: only an init fits.
        for m in [&all[1], &all[2], &all[3], &all[4], &all[5]] {
            assert_eq!(
                code(p.send_b(T0, m)),
                ErrorCode::InvalidState,
                "{}",
                m.msg_type()
            );
        }
        assert_eq!(code(p.ia.start(T0)), ErrorCode::InvalidState);
        assert_eq!(code(p.rb.start(T0)), ErrorCode::InvalidState);
        let ack = reply(p.send_b(T0, &init));
        // Responder in CHALLENGE_SENT: the init again is a duplicate.
        assert_eq!(code(p.send_b(T0, &init)), ErrorCode::InvalidState);
        for m in [&all[3], &all[4], &all[5]] {
            assert_eq!(
                code(p.send_b(T0, m)),
                ErrorCode::InvalidState,
                "{}",
                m.msg_type()
            );
        }
        let resp = reply(p.send_a(T0, &ack));
        // Initiator in CHALLENGE_SENT: the ack again, a ready, a confirm.
        assert_eq!(code(p.send_a(T0, &ack)), ErrorCode::InvalidState);
        assert_eq!(code(p.send_a(T0, &all[5])), ErrorCode::InvalidState);
        assert_eq!(code(p.send_a(T0, &init)), ErrorCode::InvalidState);
        let est = reply(p.send_b(T0, &resp));
        // Responder in SESSION_ESTABLISHED: the challenge response again.
        assert_eq!(code(p.send_b(T0, &resp)), ErrorCode::InvalidState);
        assert_eq!(code(p.send_b(T0, &ack)), ErrorCode::InvalidState);
        let conf = reply(p.send_a(T0, &est));
        // Initiator in SESSION_CONFIRMED: the established again.
        assert_eq!(code(p.send_a(T0, &est)), ErrorCode::InvalidState);
        let ready = reply(p.send_b(T0, &conf));
        // Responder in READY: the confirm again.
        assert_eq!(code(p.send_b(T0, &conf)), ErrorCode::InvalidState);
        assert_eq!(p.send_a(T0, &ready), Ok(None));
        assert_eq!(code(p.send_a(T0, &ready)), ErrorCode::InvalidState);
        // None of it hurt: the two sessions match.
        let mut sa = p.ia.poll_session().expect("session");
        let mut sb = p.rb.poll_session().expect("session");
        assert_paired(&mut sa, &mut sb, T0);
    }

    #[test]
    fn other_attempts_ids_and_other_senders_are_session_not_found() {
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        let Message::InitAck(mut ack) = reply(p.send_b(T0, &init)) else {
            panic!("ack");
        };
        let good = ack;
        ack.handshake_id.0[0] ^= 1;
        assert_eq!(
            code(p.send_a(T0, &Message::InitAck(ack))),
            ErrorCode::SessionNotFound
        );
        assert_eq!(p.ia.state(), State::HandshakeInitSent);
        // From a third entity.
        let c = identity(3);
        assert_eq!(
            code(p.ia.handle(T0, &p.a, &c.public_key(), &Message::InitAck(good))),
            ErrorCode::SessionNotFound
        );
        let Message::ChallengeResponse(mut resp) = reply(p.send_a(T0, &Message::InitAck(good)))
        else {
            panic!("response");
        };
        let good = resp;
        resp.handshake_id.0[15] ^= 1;
        assert_eq!(
            code(p.send_b(T0, &Message::ChallengeResponse(resp))),
            ErrorCode::SessionNotFound
        );
        assert_eq!(p.rb.state(), State::ChallengeSent);
        let est = reply(p.send_b(T0, &Message::ChallengeResponse(good)));
        let Message::Confirm(mut conf) = reply(p.send_a(T0, &est)) else {
            panic!("confirm");
        };
        let good = conf;
        conf.session_id.0[0] ^= 1;
        assert_eq!(
            code(p.send_b(T0, &Message::Confirm(conf))),
            ErrorCode::SessionNotFound
        );
        let Message::Ready(mut ready) = reply(p.send_b(T0, &Message::Confirm(good))) else {
            panic!("ready");
        };
        let good = ready;
        ready.session_id.0[0] ^= 1;
        assert_eq!(
            code(p.send_a(T0, &Message::Ready(ready))),
            ErrorCode::SessionNotFound
        );
        assert_eq!(p.send_a(T0, &Message::Ready(good)), Ok(None));
        assert_eq!(p.ia.state(), State::Ready);
    }

    #[test]
    fn another_attempts_init_while_running_is_handshake_in_progress() {
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        reply(p.send_b(T0, &init));
        let other = Message::Init(HandshakeInit {
            handshake_id: HandshakeId([0xee; 16]),
            ephemeral: keys::ephemeral_public(&[5; 32]),
        });
        assert_eq!(code(p.send_b(T0, &other)), ErrorCode::HandshakeInProgress);
        assert_eq!(p.rb.state(), State::ChallengeSent);
        // The initiator's own view: the peer's init is another attempt.
        let theirs = Message::Init(HandshakeInit {
            handshake_id: HandshakeId([0xdd; 16]),
            ephemeral: keys::ephemeral_public(&[6; 32]),
        });
        assert_eq!(code(p.send_a(T0, &theirs)), ErrorCode::HandshakeInProgress);
        // Its own init reflected back is a duplicate, not another attempt.
        assert_eq!(code(p.send_a(T0, &init)), ErrorCode::InvalidState);
        assert_eq!(p.ia.state(), State::HandshakeInitSent);
    }

    #[test]
    fn a_challenge_response_after_30_s_is_challenge_expired() {
        for (delay, ok) in [(29_999, true), (30_000, false), (45_000, false)] {
            let mut p = pair();
            let init = p.ia.start(T0).expect("starts");
            let ack = reply(p.send_b(T0, &init));
            let resp = reply(p.send_a(T0 + 10, &ack));
            let r = p.send_b(T0 + delay, &resp);
            if ok {
                assert_eq!(reply(r).msg_type(), "session_established");
            } else {
                let e = r.expect_err("late");
                assert_eq!(e.code, ErrorCode::ChallengeExpired);
                // Sticky: the same error for every later input, valid or not.
                assert_eq!(p.send_b(T0 + delay, &resp), Err(e.clone()));
                assert_eq!(p.send_b(T0 + delay + 1, &init), Err(e.clone()));
                assert_eq!(p.rb.error(), Some(&e));
                assert_eq!(p.rb.poll_timeout(), None);
            }
        }
        // Without any message, the timer fires at the deadline.
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        reply(p.send_b(T0, &init));
        assert_eq!(p.rb.poll_timeout(), Some(T0 + 30_000));
        p.rb.handle_timeout(T0 + 29_999);
        assert_eq!(p.rb.state(), State::ChallengeSent);
        p.rb.handle_timeout(T0 + 30_000);
        assert_eq!(p.rb.state(), State::Error);
        assert_eq!(
            p.rb.error().map(|e| e.code),
            Some(ErrorCode::ChallengeExpired)
        );
    }

    #[test]
    fn a_handshake_not_ready_within_60_s_fails() {
        // Silence after the init.
        let mut p = pair();
        let init = p.ia.start(T0).expect("starts");
        p.ia.handle_timeout(T0 + 59_999);
        assert_eq!(p.ia.state(), State::HandshakeInitSent);
        p.ia.handle_timeout(T0 + 60_000);
        assert_eq!(p.ia.state(), State::Error);
        assert_eq!(
            p.ia.error().map(|e| e.code),
            Some(ErrorCode::ChallengeExpired)
        );
        let e = p.ia.error().cloned().expect("error");
        assert_eq!(p.ia.start(T0 + 60_001), Err(e));

        // Every step in time, but the whole run too slow: the confirm at 61 s.
        let mut p = pair();
        let init2 = p.ia.start(T0).expect("starts");
        let ack = reply(p.send_b(T0 + 100, &init2));
        let resp = reply(p.send_a(T0 + 200, &ack));
        let est = reply(p.send_b(T0 + 29_000, &resp));
        let conf = reply(p.send_a(T0 + 59_000, &est));
        assert_eq!(p.ia.poll_timeout(), Some(T0 + 60_000));
        assert_eq!(
            code(p.send_b(T0 + 100 + 60_000, &conf)),
            ErrorCode::ChallengeExpired
        );
        assert_eq!(p.rb.state(), State::Error);
        assert!(p.rb.poll_session().is_none());
        let _ = init;
    }

    #[test]
    fn sessions_expire_after_their_lifetime() {
        let mut p = pair();
        run(&mut p);
        let mut sa = p.ia.poll_session().expect("session");
        let sb = p.rb.poll_session().expect("session");
        let mt: crate::MsgType = "message".parse().expect("valid");
        let end = sa.established_ms() + 3_600_000;
        assert_eq!(sa.expires_ms(), end);
        assert!(!sa.is_expired(end - 1));
        assert_eq!(sa.state(end - 1), State::Ready);
        // The responder became READY one step earlier, so its lifetime ends first.
        assert_eq!(sb.expires_ms(), end - 1000);
        let (seq, c) = sa.seal(end - 1, &mt, b"last").expect("still alive");
        assert_eq!(sb.open(end - 1001, &mt, seq, &c).expect("opens"), b"last");
        assert!(sa.is_expired(end));
        assert_eq!(sa.state(end), State::Expired);
        assert_eq!(code(sa.seal(end, &mt, b"late")), ErrorCode::SessionExpired);
        let sb_end = sb.expires_ms();
        assert_eq!(
            code(sb.open(sb_end, &mt, seq, &c)),
            ErrorCode::SessionExpired
        );

        // The machine itself moves READY → EXPIRED on its timer.
        assert_eq!(p.ia.poll_timeout(), Some(end));
        p.ia.handle_timeout(end - 1);
        assert_eq!(p.ia.state(), State::Ready);
        p.ia.handle_timeout(end);
        assert_eq!(p.ia.state(), State::Expired);
        assert_eq!(p.ia.poll_timeout(), None);
        let ready = Message::Ready(Ready {
            session_id: sa.id(),
        });
        assert_eq!(code(p.send_a(end, &ready)), ErrorCode::SessionExpired);
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let mut p = pair();
        run(&mut p);
        let s = p.ia.poll_session().expect("session");
        let text = format!("{:?} {:?} {:?}", p.ia, s, random(1));
        assert!(text.contains("READY") || text.contains("Ready"));
        assert!(text.contains("Random(..)"));
        assert!(!text.contains("key: ["));
    }

    proptest! {
        /// Messages from two complete runs (this attempt's and another
        /// attempt's), delivered to a fresh pair in any order, any number of
        /// times, at any time: nothing panics, and if both sides reach READY
        /// their sessions are the two ends of one channel.
        #[test]
        fn any_delivery_order_is_safe(
            steps in proptest::collection::vec((0usize..12, any::<bool>(), 0u64..20_000), 0..40)
        ) {
            let mut pool: Vec<Message> = run(&mut pair()).to_vec();
            let mut other = pair();
            other.ia = Handshake::initiator(
                Config::default(), other.a.entity_id(), other.b.entity_id(), random(30));
            pool.extend(run(&mut other));
            let mut p = pair();
            let mut now = T0;
            let first = p.ia.start(now).expect("starts");
            pool.push(first);
            let mut sessions = (None, None);
            for (i, to_a, dt) in steps {
                now += dt;
                let m = pool[i % pool.len()];
                let r = if to_a { p.send_a(now, &m) } else { p.send_b(now, &m) };
                if let Ok(Some(out)) = r {
                    pool.push(out);
                }
                if let Some(s) = p.ia.poll_session() { sessions.0 = Some(s); }
                if let Some(s) = p.rb.poll_session() { sessions.1 = Some(s); }
            }
            if let (Some(mut a), Some(mut b)) = sessions {
                let t = a.established_ms().max(b.established_ms());
                assert_paired(&mut a, &mut b, t);
            }
        }
    }
}
