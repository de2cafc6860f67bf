//! End-to-end sessions with each peer, as the node actor drives them: the
//! handshake [`Link`], the live [`Session`] with its replay window and reorder
//! buffer, and the application messages waiting for a session. No I/O: the actor
//! signs and sends what this returns.

use std::collections::{HashMap, VecDeque};

use peer_core::reorder::{self, Reorder};
use peer_core::seq_window::Window;
use peer_core::session::{self, Link, Message, Random, Role, Session, State};
use peer_core::{
    EntityId, Envelope, ErrorCode, Identity, MessageId, MsgType, Rejection, SessionId,
};
use serde::{Deserialize, Serialize};

use crate::json::RawJson;

/// End-to-end session settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Refuse application messages that are not sealed in a session with
    /// `ENCRYPTION_REQUIRED` (default true). Outbound application messages are
    /// always sealed.
    pub require_encryption: bool,
    /// A session's lifetime, in seconds (default 3,600); the next send after it
    /// runs a new handshake.
    pub session_lifetime_secs: u64,
    /// The whole handshake must finish within this many seconds (default 60).
    pub handshake_timeout_secs: u64,
    /// The challenge must be answered within this many seconds (default 30).
    pub challenge_timeout_secs: u64,
    /// Width of the anti-replay window for sequence numbers, in bits (a power of
    /// two from 1,024; default 1,024).
    pub replay_window_bits: usize,
    /// Longest a message received out of order waits for an earlier one before
    /// the gap is skipped, in ms (default 2,000).
    pub reorder_wait_ms: u64,
    /// Application messages waiting per peer for a session; more are refused
    /// with `HANDSHAKE_IN_PROGRESS` (default 1,024).
    pub max_waiting_per_peer: usize,
    /// Peers with session state at once (default 10,000).
    pub max_peers: usize,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        let s = session::Config::default();
        Self {
            require_encryption: true,
            session_lifetime_secs: s.session_lifetime_ms / 1000,
            handshake_timeout_secs: s.handshake_timeout_ms / 1000,
            challenge_timeout_secs: s.challenge_timeout_ms / 1000,
            replay_window_bits: Window::DEFAULT_BITS,
            reorder_wait_ms: reorder::Config::default().max_wait_ms,
            max_waiting_per_peer: 1024,
            max_peers: 10_000,
        }
    }
}

impl SecurityConfig {
    fn session(&self) -> session::Config {
        session::Config {
            handshake_timeout_ms: self.handshake_timeout_secs.saturating_mul(1000),
            challenge_timeout_ms: self.challenge_timeout_secs.saturating_mul(1000),
            session_lifetime_ms: self.session_lifetime_secs.saturating_mul(1000),
        }
    }

    /// Checks the window width.
    pub fn validate(&self) -> Result<(), String> {
        Window::new(self.replay_window_bits)
            .map(|_| ())
            .map_err(|e| format!("security.replay_window_bits: {e}"))
    }
}

/// A session as shown in `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionView {
    /// The session id.
    pub session_id: String,
    /// READY or EXPIRED.
    pub state: String,
    /// This node's role in the handshake.
    pub role: String,
    /// When the session expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// An application message for the agent, released in send order.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The envelope's message id (a transfer's id for a reassembled message).
    pub message_id: String,
    /// The message's type.
    pub msg_type: MsgType,
    /// The plaintext, which is JSON.
    pub payload: RawJson,
}

/// An application payload as JSON nested at most `max_depth` deep
/// (`protocol.max_json_depth`); `MALFORMED_MESSAGE` if it is not.
pub fn parse_json(bytes: Vec<u8>, max_depth: usize) -> Result<RawJson, Rejection> {
    RawJson::parse(bytes, max_depth)
        .map_err(|e| refuse(ErrorCode::MalformedMessage, format!("payload is {e}")))
}

/// Where a sealed message sits in its session's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The session.
    pub session_id: SessionId,
    /// The sequence number.
    pub sequence_num: u64,
}

/// A sealed envelope, opened: authenticated, decrypted, its sequence number
/// used up. Its place in the order is given back with [`Secure::release`].
#[derive(Debug)]
pub struct Unsealed {
    /// Its place in the session's order.
    pub slot: Slot,
    /// The envelope's message id.
    pub message_id: MessageId,
    /// The envelope's type.
    pub msg_type: MsgType,
    /// The plaintext.
    pub plaintext: Vec<u8>,
}

/// What to do with an application message for a peer.
#[derive(Debug)]
pub enum Send<T> {
    /// Sign and send this sealed draft (payload, session id and sequence set).
    Sealed(SealedParts, T),
    /// Queued until a session is ready; also send this `handshake_init` if given.
    Queued(Option<Message>),
    /// Refused (too many waiting, or no handshake possible).
    Refused(T, Rejection),
}

/// Sealed messages ready to sign and send, each with what travels with it.
pub type Released<T> = Vec<(SealedParts, T)>;

/// What a timer tick produced: messages now deliverable (with their sender) and
/// messages that failed because no session could be had.
pub type Timeouts<T> = (Vec<(EntityId, Opened)>, Vec<(T, Rejection)>);

/// The sealed parts of an application envelope.
#[derive(Debug)]
pub struct SealedParts {
    /// Message type.
    pub msg_type: MsgType,
    /// Session the payload is sealed in.
    pub session_id: SessionId,
    /// Its sequence number.
    pub sequence_num: u64,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
}

struct Live {
    session: Session,
    window: Window,
    /// `None` for a sequence number that delivers nothing (a chunk, a refused
    /// message): it still fills its place, so later messages do not wait for it.
    reorder: Reorder<Option<Opened>>,
}

impl Live {
    fn seal(
        &mut self,
        now_ms: u64,
        msg_type: MsgType,
        payload: &[u8],
    ) -> Result<SealedParts, Rejection> {
        let (sequence_num, ciphertext) = self.session.seal(now_ms, &msg_type, payload)?;
        Ok(SealedParts {
            msg_type,
            session_id: self.session.id(),
            sequence_num,
            ciphertext,
        })
    }
}

struct Peer<T> {
    link: Link,
    live: Option<Live>,
    waiting: VecDeque<(u64, MsgType, Vec<u8>, T)>,
    /// Messages a replaced session still held behind a gap: already accepted, so
    /// delivered at the next timer tick rather than dropped.
    retired: Vec<Opened>,
}

impl<T> Peer<T> {
    /// Ends the live session, keeping what its reorder buffer held.
    fn retire(&mut self) {
        if let Some(mut old) = self.live.take() {
            let held = old.reorder.handle_timeout(u64::MAX);
            self.retired.extend(held.into_iter().filter_map(|(_, o)| o));
        }
    }
}

/// Session state for every peer. `T` is what travels with a queued message (the
/// reply channel).
pub struct Secure<T> {
    config: SecurityConfig,
    session: session::Config,
    local: EntityId,
    peers: HashMap<EntityId, Peer<T>>,
}

impl<T> std::fmt::Debug for Secure<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure")
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// Fresh randomness for one handshake attempt.
fn random() -> Random {
    let mut bytes = [0u8; Random::LEN];
    bytes[..32].copy_from_slice(&rand::random::<[u8; 32]>());
    bytes[32..64].copy_from_slice(&rand::random::<[u8; 32]>());
    bytes[64..].copy_from_slice(&rand::random::<[u8; 32]>());
    Random::from_bytes(&bytes)
}

fn refuse(code: ErrorCode, reason: impl Into<String>) -> Rejection {
    Rejection::new(code, reason)
}

impl<T> Secure<T> {
    /// No sessions yet, for the node `local`.
    pub fn new(config: SecurityConfig, local: EntityId) -> Self {
        Self {
            session: config.session(),
            config,
            local,
            peers: HashMap::new(),
        }
    }

    /// Whether plaintext application messages are refused.
    pub fn require_encryption(&self) -> bool {
        self.config.require_encryption
    }

    /// A session ends this much before its lifetime on the sending side, so that
    /// the receiver (which started its clock up to a round trip earlier) never
    /// sees a message in a session it has expired.
    fn margin_ms(&self) -> u64 {
        (self.session.session_lifetime_ms / 10).min(10_000)
    }

    fn peer(&mut self, id: EntityId) -> Result<&mut Peer<T>, Rejection> {
        if !self.peers.contains_key(&id) && self.peers.len() >= self.config.max_peers.max(1) {
            // Forget a peer with nothing of ours under way: no session, nothing
            // waiting, and no handshake or only one the peer started (it may
            // retry). So identities made up by the thousand cannot fill the table
            // with handshakes they never finish.
            let idle = self.peers.iter().find_map(|(k, p)| {
                let theirs_or_none = p
                    .link
                    .handshake()
                    .is_none_or(|h| !h.state().is_running() || h.role() == Role::Responder);
                (p.live.is_none() && p.waiting.is_empty() && p.retired.is_empty() && theirs_or_none)
                    .then_some(*k)
            });
            match idle {
                Some(k) => _ = self.peers.remove(&k),
                None => {
                    return Err(refuse(
                        ErrorCode::InvalidState,
                        format!(
                            "this node holds sessions with {} peers, its maximum; retry later",
                            self.peers.len()
                        ),
                    ));
                }
            }
        }
        let (session, local) = (self.session, self.local);
        Ok(self.peers.entry(id).or_insert_with(|| Peer {
            link: Link::new(session, local, id),
            live: None,
            waiting: VecDeque::new(),
            retired: Vec::new(),
        }))
    }

    /// Seals an application message to `to`, or queues it and starts a handshake.
    pub fn send(
        &mut self,
        now_ms: u64,
        to: EntityId,
        msg_type: MsgType,
        payload: Vec<u8>,
        tag: T,
    ) -> Send<T> {
        let margin = self.margin_ms();
        let max_waiting = self.config.max_waiting_per_peer.max(1);
        let peer = match self.peer(to) {
            Ok(p) => p,
            Err(e) => return Send::Refused(tag, e),
        };
        if let Some(live) = &mut peer.live {
            if now_ms.saturating_add(margin) < live.session.expires_ms() {
                return match live.seal(now_ms, msg_type, &payload) {
                    Ok(parts) => Send::Sealed(parts, tag),
                    Err(e) => Send::Refused(tag, e),
                };
            }
            peer.retire();
        }
        if peer.waiting.len() >= max_waiting {
            return Send::Refused(
                tag,
                refuse(
                    ErrorCode::HandshakeInProgress,
                    format!(
                        "{max_waiting} messages already wait for a session with {to}; retry later"
                    ),
                ),
            );
        }
        peer.waiting.push_back((now_ms, msg_type, payload, tag));
        let running = peer.link.state().is_some_and(State::is_running);
        if running {
            return Send::Queued(None);
        }
        match peer.link.connect(now_ms, random()) {
            Ok(init) => Send::Queued(Some(init)),
            Err(_) => Send::Queued(None),
        }
    }

    /// A handshake message from `env`'s sender (a request, or a reply to ours).
    /// Returns the message to send back (as a reply to a request, or as the next
    /// request after a reply), and the queued messages a new session releases.
    pub fn handshake(
        &mut self,
        now_ms: u64,
        identity: &Identity,
        env: &Envelope,
    ) -> Result<(Option<Message>, Released<T>), Rejection> {
        let msg = Message::from_envelope(env)?;
        let window_bits = self.config.replay_window_bits;
        let reorder_wait = self.config.reorder_wait_ms;
        let peer = self.peer(env.sender_id)?;
        let next = peer
            .link
            .handle(now_ms, identity, &env.sender_key, &msg, random)?;
        let mut released = Vec::new();
        if let Some(session) = peer.link.poll_session() {
            peer.retire();
            peer.live = Some(Live {
                session,
                window: Window::new(window_bits).unwrap_or_default(),
                reorder: Reorder::new(reorder::Config {
                    max_wait_ms: reorder_wait,
                    capacity: window_bits,
                }),
            });
            released = Self::flush(now_ms, peer);
        }
        Ok((next, released))
    }

    fn flush(now_ms: u64, peer: &mut Peer<T>) -> Released<T> {
        let Some(live) = &mut peer.live else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some((_, msg_type, payload, tag)) = peer.waiting.pop_front() {
            match live.seal(now_ms, msg_type.clone(), &payload) {
                Ok(parts) => out.push((parts, tag)),
                Err(_) => {
                    peer.waiting.push_front((now_ms, msg_type, payload, tag));
                    break;
                }
            }
        }
        out
    }

    /// Our handshake request to `peer` was refused with `rejection`. A
    /// `HANDSHAKE_IN_PROGRESS` means the peer's own attempt wins and will arrive;
    /// anything else fails the messages waiting for that peer.
    pub fn handshake_refused(
        &mut self,
        peer: EntityId,
        rejection: &Rejection,
    ) -> Vec<(T, Rejection)> {
        if rejection.code == ErrorCode::HandshakeInProgress {
            return Vec::new();
        }
        self.fail_waiting(peer, rejection)
    }

    /// Drops the session `id` with `peer` (the peer no longer has it); the next
    /// send runs a new handshake.
    pub fn forget(&mut self, peer: EntityId, id: SessionId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.live.as_ref().is_some_and(|l| l.session.id() == id)
        {
            p.retire();
        }
    }

    /// Fails every message waiting for `peer` (no session can be had).
    pub fn fail_waiting(&mut self, peer: EntityId, rejection: &Rejection) -> Vec<(T, Rejection)> {
        self.peers
            .get_mut(&peer)
            .map(|p| {
                p.waiting
                    .drain(..)
                    .map(|(_, _, _, t)| (t, rejection.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Opens a sealed envelope: session lookup, replay window, decryption. The
    /// sequence number is used up once the payload authenticates; the caller
    /// then reads the plaintext and gives the slot back with [`Secure::release`].
    pub fn open(&mut self, now_ms: u64, env: Envelope) -> Result<Unsealed, Rejection> {
        let Some(session_id) = env.session_id else {
            return Err(refuse(
                ErrorCode::EncryptionRequired,
                "not sealed in a session",
            ));
        };
        let not_found = || {
            refuse(
                ErrorCode::SessionNotFound,
                format!(
                    "no session {session_id} with {}; run a new handshake",
                    env.sender_id
                ),
            )
        };
        let live = self
            .peers
            .get_mut(&env.sender_id)
            .and_then(|p| p.live.as_mut())
            .filter(|l| l.session.id() == session_id)
            .ok_or_else(not_found)?;
        live.window.check(env.sequence_num)?;
        let plaintext = live
            .session
            .open(now_ms, &env.msg_type, env.sequence_num, &env.payload)?;
        live.window.update(env.sequence_num);
        Ok(Unsealed {
            slot: Slot {
                session_id,
                sequence_num: env.sequence_num,
            },
            message_id: env.message_id,
            msg_type: env.msg_type,
            plaintext,
        })
    }

    /// Gives back the slot of a message from `from` that [`Secure::open`]
    /// opened, with what it delivers (`None`: nothing); returns the messages
    /// now deliverable in order. If the session has been replaced meanwhile,
    /// `item` is returned at once.
    pub fn release(
        &mut self,
        now_ms: u64,
        from: EntityId,
        slot: Slot,
        item: Option<Opened>,
    ) -> Vec<Opened> {
        let live = self
            .peers
            .get_mut(&from)
            .and_then(|p| p.live.as_mut())
            .filter(|l| l.session.id() == slot.session_id);
        match live {
            Some(live) => live
                .reorder
                .push(now_ms, slot.sequence_num, item)
                .into_iter()
                .filter_map(|(_, o)| o)
                .collect(),
            None => item.into_iter().collect(),
        }
    }

    /// Applies timers: releases messages whose gaps waited too long, ends expired
    /// sessions, and fails messages whose handshake failed or never finished.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Timeouts<T> {
        let handshake_timeout = self.session.handshake_timeout_ms;
        let mut opened = Vec::new();
        let mut failed = Vec::new();
        for (id, peer) in &mut self.peers {
            opened.extend(peer.retired.drain(..).map(|o| (*id, o)));
            if let Some(live) = &mut peer.live {
                opened.extend(
                    live.reorder
                        .handle_timeout(now_ms)
                        .into_iter()
                        .filter_map(|(_, o)| Some((*id, o?))),
                );
                if live.session.is_expired(now_ms) && live.reorder.is_empty() {
                    peer.live = None;
                }
            }
            peer.link.handle_timeout(now_ms);
            let stuck = peer
                .waiting
                .front()
                .is_some_and(|(since, ..)| now_ms.saturating_sub(*since) > handshake_timeout);
            let failed_attempt = peer.link.handshake().and_then(|h| h.error()).cloned();
            if let Some(e) =
                failed_attempt.filter(|_| !peer.waiting.is_empty() && peer.live.is_none())
            {
                failed.extend(peer.waiting.drain(..).map(|(.., t)| (t, e.clone())));
            } else if stuck && peer.live.is_none() {
                let e = refuse(
                    ErrorCode::ChallengeExpired,
                    format!("no session with {id} within {handshake_timeout} ms"),
                );
                failed.extend(peer.waiting.drain(..).map(|(.., t)| (t, e.clone())));
            }
        }
        (opened, failed)
    }

    /// The live session with `peer`, for `GET /v1/peers`.
    pub fn view(&self, peer: &EntityId, now_ms: u64) -> Option<SessionView> {
        let live = self.peers.get(peer)?.live.as_ref()?;
        Some(SessionView {
            session_id: live.session.id().to_string(),
            state: live.session.state(now_ms).to_string(),
            role: match live.session.role() {
                Role::Initiator => "initiator".into(),
                Role::Responder => "responder".into(),
            },
            expires_ms: live.session.expires_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer_core::{Draft, MessageId};

    const NOW: u64 = 1_800_000_000_000;

    fn signed(from: &Identity, to: EntityId, msg_type: &str, payload: Vec<u8>, n: u8) -> Envelope {
        Draft {
            msg_type: msg_type.parse().expect("valid"),
            message_id: MessageId::from_random([n; 16]),
            recipient_id: Some(to),
            session_id: None,
            sequence_num: 0,
            timestamp_ms: NOW,
            nonce: [n; 16],
            payload,
        }
        .sign(from)
    }

    #[test]
    fn messages_held_by_a_replaced_session_are_still_delivered() {
        let (ia, ib) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let (a_id, b_id) = (ia.entity_id(), ib.entity_id());
        let mut a: Secure<()> = Secure::new(SecurityConfig::default(), a_id);
        let mut b: Secure<()> = Secure::new(SecurityConfig::default(), b_id);
        let mt: MsgType = "message".parse().expect("valid");
        let Send::Queued(Some(mut step)) = a.send(NOW, b_id, mt.clone(), b"{}".to_vec(), ()) else {
            panic!("a starts a handshake");
        };
        let mut released = Vec::new();
        for n in 0.. {
            let to_b = signed(&ia, b_id, step.msg_type(), step.encode(), n);
            let (reply, _) = b.handshake(NOW, &ib, &to_b).expect("b answers");
            let reply = reply.expect("a reply to every step");
            let to_a = signed(&ib, a_id, reply.msg_type(), reply.encode(), n);
            let (next, r) = a.handshake(NOW, &ia, &to_a).expect("a goes on");
            released = r;
            match next {
                Some(m) => step = m,
                None => break,
            }
        }
        assert_eq!(released.len(), 1, "the first message was waiting");
        // Seal three more; b receives only the 3rd and 4th: they wait for the 2nd.
        let mut sealed = Vec::new();
        for text in ["1", "2", "3"] {
            let payload = format!("{{\"t\":\"{text}\"}}").into_bytes();
            match a.send(NOW, b_id, mt.clone(), payload, ()) {
                Send::Sealed(parts, ()) => sealed.push(parts),
                other => panic!("sealed directly, got {other:?}"),
            }
        }
        let envelope = |parts: &SealedParts, n: u8| {
            let mut env = signed(&ia, b_id, "message", parts.ciphertext.clone(), n);
            env.session_id = Some(parts.session_id);
            env.sequence_num = parts.sequence_num;
            env
        };
        let mut receive = |env: Envelope| {
            let u = b.open(NOW, env).expect("opens");
            let opened = Opened {
                message_id: u.message_id.to_string(),
                msg_type: u.msg_type,
                payload: parse_json(u.plaintext, 64).expect("json"),
            };
            b.release(NOW, a_id, u.slot, Some(opened))
        };
        assert_eq!(receive(envelope(&released[0].0, 100)).len(), 1);
        for (i, parts) in sealed.iter().enumerate().skip(1) {
            let env = envelope(parts, 101 + i as u8);
            assert!(receive(env).is_empty(), "held behind the gap");
        }
        b.forget(a_id, sealed[0].session_id);
        let (opened, _) = b.handle_timeout(NOW);
        let texts: Vec<_> = opened
            .iter()
            .map(|(_, o)| o.payload.to_value()["t"].clone())
            .collect();
        assert_eq!(texts, vec!["2", "3"], "released in order, not dropped");
    }

    /// A signed `handshake_init` from `from` to `to`.
    fn init(from: &Identity, to: EntityId, seed: u8) -> Envelope {
        let mut link = Link::new(session::Config::default(), from.entity_id(), to);
        let msg = link
            .connect(NOW, Random::from_bytes(&[seed; Random::LEN]))
            .expect("init");
        signed(from, to, msg.msg_type(), msg.encode(), seed)
    }

    #[test]
    fn handshakes_nobody_finishes_cannot_fill_the_table() {
        let me = Identity::from_secret(&[1; 32]);
        let config = SecurityConfig {
            max_peers: 2,
            ..SecurityConfig::default()
        };
        let mut secure: Secure<()> = Secure::new(config, me.entity_id());
        // Made-up identities start handshakes and never answer the challenge.
        for seed in 10..20u8 {
            let sybil = Identity::from_secret(&[seed; 32]);
            let (reply, _) = secure
                .handshake(NOW, &me, &init(&sybil, me.entity_id(), seed))
                .expect("answered: their unfinished attempts make room for new ones");
            assert!(matches!(reply, Some(Message::InitAck(_))));
        }
        assert!(secure.peers.len() <= 2);
        // Our own pending sends are never forgotten to make room.
        for seed in [2u8, 3] {
            let friend = Identity::from_secret(&[seed; 32]).entity_id();
            let sent = secure.send(
                NOW,
                friend,
                "message".parse().expect("valid"),
                b"{}".to_vec(),
                (),
            );
            assert!(matches!(sent, Send::Queued(Some(_))));
        }
        let third = Identity::from_secret(&[4; 32]);
        let refused = secure.handshake(NOW, &me, &init(&third, me.entity_id(), 4));
        assert_eq!(
            refused.expect_err("full of our own").code,
            ErrorCode::InvalidState
        );
    }
}
