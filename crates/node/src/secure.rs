//! End-to-end sessions with each peer, as the node drives them: the handshake
//! [`Link`], the live [`Session`] with its replay window and reorder buffer, and
//! the messages waiting for a session. No I/O: the node signs and sends what
//! this returns. Times are monotonic milliseconds.
//!
//! The inbound pipeline opens sealed envelopes here and gives their place in
//! the order back with [`Secure::release`]; the outbound path seals here
//! ([`Secure::send`]); the handshake service feeds handshake messages in
//! ([`Secure::handshake`]).

use std::collections::{BTreeSet, HashMap, VecDeque};

use peer_core::reorder::{self, Reorder};
use peer_core::seq_window::Window;
use peer_core::session::{self, Link, Message, Random, Role, Session, State};
use peer_core::{
    EntityId, Envelope, ErrorCode, Identity, MessageId, MsgType, PublicKey, Rejection, SessionId,
};
use serde::{Deserialize, Serialize};

use crate::inbox::Delivery;
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
    /// Bytes of messages one session's reorder buffer holds; beyond it the
    /// oldest gap is skipped at once (default 4 MiB).
    pub reorder_max_bytes: u64,
    /// Bytes held by the reorder buffers of all sessions together; a message
    /// that would go over releases everything its own session holds (default
    /// 64 MiB).
    pub max_reorder_bytes: u64,
    /// Messages waiting per peer for a session; more are refused with
    /// `HANDSHAKE_IN_PROGRESS` (default 1,024).
    pub max_waiting_per_peer: usize,
    /// Bytes of messages waiting per peer for a session; more are refused
    /// with `HANDSHAKE_IN_PROGRESS` (default 8 MiB).
    pub max_waiting_bytes_per_peer: u64,
    /// Peers with session state at once (default 10,000; at least
    /// `network.max_connections`, so that a connected newcomer always finds
    /// room: the state of a disconnected peer is forgotten first).
    pub max_peers: usize,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        let s = session::Config::default();
        let r = reorder::Config::default();
        Self {
            require_encryption: true,
            session_lifetime_secs: s.session_lifetime_ms / 1000,
            handshake_timeout_secs: s.handshake_timeout_ms / 1000,
            challenge_timeout_secs: s.challenge_timeout_ms / 1000,
            replay_window_bits: Window::DEFAULT_BITS,
            reorder_wait_ms: r.max_wait_ms,
            reorder_max_bytes: r.max_bytes,
            max_reorder_bytes: 64 * 1024 * 1024,
            max_waiting_per_peer: 1024,
            max_waiting_bytes_per_peer: 8 * 1024 * 1024,
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

/// What to do with a sealed message for a peer.
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

/// What the timers produced: events now deliverable and messages that failed
/// because no session could be had.
pub type Timeouts<T> = (Vec<Delivery>, Vec<(T, Rejection)>);

/// The sealed parts of an envelope.
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

/// The size an event held for in-order delivery counts as.
fn event_bytes(item: &Option<Delivery>) -> u64 {
    item.as_ref().map_or(0, Delivery::held_bytes)
}

struct Live {
    session: Session,
    window: Window,
    /// `None` for a sequence number that delivers nothing (a chunk, a refused
    /// message): it still fills its place, so later messages do not wait for it.
    reorder: Reorder<Option<Delivery>>,
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

struct Waiting<T> {
    since_ms: u64,
    msg_type: MsgType,
    payload: Vec<u8>,
    tag: T,
}

struct Peer<T> {
    link: Link,
    live: Option<Live>,
    waiting: VecDeque<Waiting<T>>,
    waiting_bytes: u64,
    /// Messages a replaced session still held behind a gap: already accepted, so
    /// delivered at the next timer rather than dropped.
    retired: Vec<Delivery>,
    connected: bool,
    /// Times it disconnected.
    disconnections: u64,
    /// The deadline it is filed under in [`Secure`]'s timers.
    filed: Option<u64>,
}

/// Session state for every peer. `T` is what travels with a queued message
/// (who waits for its outcome).
pub struct Secure<T> {
    config: SecurityConfig,
    session: session::Config,
    local: EntityId,
    peers: HashMap<EntityId, Peer<T>>,
    /// Peers in the order they disconnected, with the count of their
    /// disconnections then, whose state is forgotten first when the table is
    /// full. Lazy: an entry whose peer reconnected, or disconnected again
    /// since, is skipped.
    gone: VecDeque<(EntityId, u64)>,
    /// Messages of forgotten peers that waited for a session, failed at the
    /// next timer.
    forgotten: Vec<(T, Rejection)>,
    /// Accepted messages a forgotten peer's session still held, delivered at
    /// the next timer.
    orphaned: Vec<Delivery>,
    /// Bytes held by every session's reorder buffer.
    reorder_bytes: u64,
    /// Every peer with a deadline, by deadline: a timer visits only the peers
    /// due, however many others there are.
    timers: BTreeSet<(u64, EntityId)>,
    /// When `forgotten` and `orphaned` started waiting, if they do.
    asap: Option<u64>,
    /// Peers a timer visited (tests count them).
    #[cfg(test)]
    visited: usize,
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

fn min_deadline(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<T> Peer<T> {
    /// Whether it is disconnected and has not reconnected since its
    /// `disconnections`-th disconnection.
    fn is_gone(&self, disconnections: u64) -> bool {
        !self.connected && self.disconnections == disconnections
    }

    /// Whether nothing is left of it but its handshake link at rest: once
    /// disconnected too, it is forgotten.
    fn is_idle(&self) -> bool {
        self.live.is_none()
            && self.waiting.is_empty()
            && self.link.state().is_none_or(|s| !s.is_running())
    }

    /// Ends the live session, keeping what its reorder buffer held; returns the
    /// bytes that buffer held.
    fn retire(&mut self) -> u64 {
        let Some(mut old) = self.live.take() else {
            return 0;
        };
        let bytes = old.reorder.held_bytes();
        let held = old.reorder.flush();
        self.retired.extend(held.into_iter().filter_map(|(_, e)| e));
        bytes
    }

    /// Its earliest deadline (`now_ms` if retired messages wait).
    fn deadline(&self, now_ms: u64, handshake_timeout_ms: u64) -> Option<u64> {
        if !self.retired.is_empty() {
            return Some(now_ms);
        }
        let mut d = self.link.poll_timeout();
        if let Some(live) = &self.live {
            d = min_deadline(d, live.reorder.poll_timeout());
            // Once past, the expiry is acted on when the reorder buffer is
            // empty: its own deadline is the one to wait for, or the timer
            // would be due again at once until then.
            if !live.session.is_expired(now_ms) {
                d = min_deadline(d, Some(live.session.expires_ms()));
            }
        }
        let stuck = self
            .waiting
            .front()
            .map(|w| w.since_ms.saturating_add(handshake_timeout_ms));
        min_deadline(d, stuck)
    }
}

impl<T> Secure<T> {
    /// No sessions yet, for the node `local`.
    pub fn new(config: SecurityConfig, local: EntityId) -> Self {
        Self {
            session: config.session(),
            config,
            local,
            peers: HashMap::new(),
            gone: VecDeque::new(),
            forgotten: Vec::new(),
            orphaned: Vec::new(),
            reorder_bytes: 0,
            timers: BTreeSet::new(),
            asap: None,
            #[cfg(test)]
            visited: 0,
        }
    }

    /// Whether plaintext application messages are refused.
    pub fn require_encryption(&self) -> bool {
        self.config.require_encryption
    }

    /// Peers with session state.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer has session state.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Whether `peer` has session state.
    #[cfg(test)]
    fn knows(&self, peer: &EntityId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Bytes held by all reorder buffers.
    #[cfg(test)]
    fn reorder_bytes(&self) -> u64 {
        self.reorder_bytes
    }

    /// A session ends this much before its lifetime on the sending side, so that
    /// the receiver (which started its clock up to a round trip earlier) never
    /// sees a message in a session it has expired.
    fn margin_ms(&self) -> u64 {
        (self.session.session_lifetime_ms / 10).min(10_000)
    }

    /// Files `id` under its deadline as of `now_ms` (a disconnected peer with
    /// nothing left is due at once, to be forgotten). Called by everything that
    /// changes a peer's state, once it is done.
    fn refile(&mut self, id: EntityId, now_ms: u64) {
        let handshake_timeout = self.session.handshake_timeout_ms;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let next = if !p.connected && p.is_idle() {
            Some(now_ms)
        } else {
            p.deadline(now_ms, handshake_timeout)
        };
        if p.filed != next {
            if let Some(t) = p.filed {
                self.timers.remove(&(t, id));
            }
            if let Some(t) = next {
                self.timers.insert((t, id));
            }
            p.filed = next;
        }
    }

    /// Takes `id` out of the table and its timers.
    fn remove(&mut self, id: &EntityId) -> Option<Peer<T>> {
        let p = self.peers.remove(id)?;
        if let Some(t) = p.filed {
            self.timers.remove(&(t, *id));
        }
        Some(p)
    }

    /// The earliest time [`Secure::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        min_deadline(self.asap, self.timers.first().map(|(t, _)| *t))
    }

    /// `peer`'s first connection opened, or its last one closed, at `now_ms`.
    /// The state of a disconnected peer is the first to be forgotten when the
    /// table is full, and is forgotten at the next timer once nothing is left
    /// of it.
    pub fn set_connected(&mut self, now_ms: u64, peer: EntityId, connected: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.connected && !connected {
            p.disconnections += 1;
            self.gone.push_back((peer, p.disconnections));
        }
        p.connected = connected;
        self.refile(peer, now_ms);
        // Entries of peers that came back or are forgotten are dropped lazily;
        // peers that come and go often cannot make the list outgrow the table.
        if self.gone.len() > 2 * self.peers.len() + 16 {
            let peers = &self.peers;
            self.gone
                .retain(|(id, seq)| peers.get(id).is_some_and(|p| p.is_gone(*seq)));
        }
    }

    /// The state of `id`, made if new. Only called for connected peers (a send
    /// to a connected peer, or a handshake message from one). When the table is
    /// full, the state of the peer that disconnected longest ago is forgotten
    /// first (its waiting messages fail at the next timer).
    fn peer(&mut self, now_ms: u64, id: EntityId) -> Result<&mut Peer<T>, Rejection> {
        if !self.peers.contains_key(&id) && self.peers.len() >= self.config.max_peers.max(1) {
            self.forget_one_gone(now_ms).map_err(|()| {
                refuse(
                    ErrorCode::InvalidState,
                    format!(
                        "this node holds sessions with {} connected peers, its maximum; retry later",
                        self.peers.len()
                    ),
                )
            })?;
        }
        let (session, local) = (self.session, self.local);
        Ok(self.peers.entry(id).or_insert_with(|| Peer {
            link: Link::new(session, local, id),
            live: None,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            retired: Vec::new(),
            connected: true,
            disconnections: 0,
            filed: None,
        }))
    }

    /// Forgets the peer that disconnected longest ago; `Err` if every peer in
    /// the table is connected.
    fn forget_one_gone(&mut self, now_ms: u64) -> Result<(), ()> {
        while let Some((id, seq)) = self.gone.pop_front() {
            if !self.peers.get(&id).is_some_and(|p| p.is_gone(seq)) {
                continue;
            }
            let Some(mut p) = self.remove(&id) else {
                continue;
            };
            self.reorder_bytes -= p.retire();
            // What its old session held was accepted: still delivered.
            self.orphaned.append(&mut p.retired);
            let e = refuse(
                ErrorCode::InvalidState,
                format!("the state of {id} was forgotten to make room for a connected peer"),
            );
            self.forgotten
                .extend(p.waiting.drain(..).map(|w| (w.tag, e.clone())));
            self.asap = min_deadline(self.asap, Some(now_ms));
            return Ok(());
        }
        Err(())
    }

    /// Seals a message to `to`, or queues it and starts a handshake.
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
        let max_bytes = self.config.max_waiting_bytes_per_peer;
        let peer = match self.peer(now_ms, to) {
            Ok(p) => p,
            Err(e) => return Send::Refused(tag, e),
        };
        let mut retired = 0;
        if let Some(live) = &mut peer.live {
            if now_ms.saturating_add(margin) < live.session.expires_ms() {
                return match live.seal(now_ms, msg_type, &payload) {
                    Ok(parts) => Send::Sealed(parts, tag),
                    Err(e) => Send::Refused(tag, e),
                };
            }
            retired = peer.retire();
        }
        let bytes = payload.len() as u64;
        if peer.waiting.len() >= max_waiting || peer.waiting_bytes.saturating_add(bytes) > max_bytes
        {
            let held = (peer.waiting.len(), peer.waiting_bytes);
            self.reorder_bytes -= retired;
            self.refile(to, now_ms);
            return Send::Refused(
                tag,
                refuse(
                    ErrorCode::HandshakeInProgress,
                    format!(
                        "{} messages ({} bytes) already wait for a session with {to} (at most {max_waiting} and {max_bytes} bytes); retry later",
                        held.0, held.1
                    ),
                ),
            );
        }
        peer.waiting_bytes += bytes;
        peer.waiting.push_back(Waiting {
            since_ms: now_ms,
            msg_type,
            payload,
            tag,
        });
        let running = peer.link.state().is_some_and(State::is_running);
        let init = if running {
            None
        } else {
            peer.link.connect(now_ms, random()).ok()
        };
        self.reorder_bytes -= retired;
        self.refile(to, now_ms);
        Send::Queued(init)
    }

    /// A handshake message `msg` from `from` (whose key is `sender_key`): a
    /// request, or a reply to ours. Returns the message to send back (as a
    /// reply to a request, or as the next request after a reply), and the
    /// queued messages a new session releases.
    pub fn handshake(
        &mut self,
        now_ms: u64,
        identity: &Identity,
        from: EntityId,
        sender_key: &PublicKey,
        msg: &Message,
    ) -> Result<(Option<Message>, Released<T>), Rejection> {
        let window_bits = self.config.replay_window_bits;
        let reorder = reorder::Config {
            max_wait_ms: self.config.reorder_wait_ms,
            capacity: window_bits,
            max_bytes: self.config.reorder_max_bytes,
        };
        let peer = self.peer(now_ms, from)?;
        let next = match peer.link.handle(now_ms, identity, sender_key, msg, random) {
            Ok(next) => next,
            Err(e) => {
                // The attempt may have failed: its waiting messages fail at the
                // next timer.
                self.refile(from, now_ms);
                return Err(e);
            }
        };
        let mut released = Vec::new();
        let mut retired = 0;
        if let Some(session) = peer.link.poll_session() {
            retired = peer.retire();
            peer.live = Some(Live {
                session,
                window: Window::new(window_bits).unwrap_or_default(),
                reorder: Reorder::new(reorder),
            });
            released = Self::flush(now_ms, peer);
        }
        self.reorder_bytes -= retired;
        self.refile(from, now_ms);
        Ok((next, released))
    }

    fn flush(now_ms: u64, peer: &mut Peer<T>) -> Released<T> {
        let Some(live) = &mut peer.live else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(w) = peer.waiting.pop_front() {
            match live.seal(now_ms, w.msg_type.clone(), &w.payload) {
                Ok(parts) => {
                    peer.waiting_bytes -= w.payload.len() as u64;
                    out.push((parts, w.tag));
                }
                Err(_) => {
                    peer.waiting.push_front(w);
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
        now_ms: u64,
        peer: EntityId,
        rejection: &Rejection,
    ) -> Vec<(T, Rejection)> {
        if rejection.code == ErrorCode::HandshakeInProgress {
            return Vec::new();
        }
        self.fail_waiting(now_ms, peer, rejection)
    }

    /// Drops the session `id` with `peer` (the peer no longer has it); the next
    /// send runs a new handshake.
    pub fn forget(&mut self, now_ms: u64, peer: EntityId, id: SessionId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.live.as_ref().is_some_and(|l| l.session.id() == id)
        {
            let bytes = p.retire();
            self.reorder_bytes -= bytes;
            self.refile(peer, now_ms);
        }
    }

    /// Fails every message waiting for `peer` (no session can be had).
    pub fn fail_waiting(
        &mut self,
        now_ms: u64,
        peer: EntityId,
        rejection: &Rejection,
    ) -> Vec<(T, Rejection)> {
        let failed = self
            .peers
            .get_mut(&peer)
            .map(|p| {
                p.waiting_bytes = 0;
                p.waiting
                    .drain(..)
                    .map(|w| (w.tag, rejection.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.refile(peer, now_ms);
        failed
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
        let peer = self.peers.get_mut(&env.sender_id);
        // A sealed message can overtake the `ready` that completes the session
        // it was sealed in (the peer, as responder, seals as soon as it has
        // sent `ready`): while an attempt runs, the sender is told to send
        // again shortly rather than to start over.
        let handshaking = peer.as_ref().is_some_and(|p| {
            p.link.state().is_some_and(|s| s.is_running())
                && p.live.as_ref().is_none_or(|l| l.session.id() != session_id)
        });
        if handshaking {
            return Err(refuse(
                ErrorCode::HandshakeInProgress,
                format!(
                    "no session {session_id} with {} yet: a handshake with it is in progress; send again",
                    env.sender_id
                ),
            ));
        }
        let live = peer
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
    /// opened, with what it delivers (`None`: nothing); returns the events now
    /// deliverable in order. If the session has been replaced meanwhile,
    /// `item` is returned at once. A message that would take the session's
    /// buffer over `security.reorder_max_bytes`, or all buffers over
    /// `security.max_reorder_bytes`, skips gaps: it and what its session held
    /// are released at once.
    pub fn release(
        &mut self,
        now_ms: u64,
        from: EntityId,
        slot: Slot,
        item: Option<Delivery>,
    ) -> Vec<Delivery> {
        let live = self
            .peers
            .get_mut(&from)
            .and_then(|p| p.live.as_mut())
            .filter(|l| l.session.id() == slot.session_id);
        let Some(live) = live else {
            return item.into_iter().collect();
        };
        let bytes = event_bytes(&item);
        let before = live.reorder.held_bytes();
        let mut out = live.reorder.push(now_ms, slot.sequence_num, item, bytes);
        if self.reorder_bytes - before + live.reorder.held_bytes() > self.config.max_reorder_bytes {
            out.extend(live.reorder.flush());
        }
        let after = live.reorder.held_bytes();
        self.reorder_bytes = self.reorder_bytes - before + after;
        self.refile(from, now_ms);
        out.into_iter().filter_map(|(_, e)| e).collect()
    }

    /// Applies timers to the peers due at `now_ms`: releases messages whose
    /// gaps waited too long, ends expired sessions, fails messages whose
    /// handshake failed or never finished, and forgets the state of
    /// disconnected peers with nothing left.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Timeouts<T> {
        let handshake_timeout = self.session.handshake_timeout_ms;
        let mut failed = std::mem::take(&mut self.forgotten);
        let mut opened = std::mem::take(&mut self.orphaned);
        self.asap = None;
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.timers.first() {
            if t > now_ms {
                break;
            }
            self.timers.pop_first();
            if let Some(p) = self.peers.get_mut(&id) {
                p.filed = None;
            }
            due.push(id);
        }
        for id in due {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            #[cfg(test)]
            {
                self.visited += 1;
            }
            opened.append(&mut peer.retired);
            if let Some(live) = &mut peer.live {
                let before = live.reorder.held_bytes();
                opened.extend(
                    live.reorder
                        .handle_timeout(now_ms)
                        .into_iter()
                        .filter_map(|(_, e)| e),
                );
                self.reorder_bytes -= before - live.reorder.held_bytes();
                if live.session.is_expired(now_ms) && live.reorder.is_empty() {
                    peer.live = None;
                }
            }
            peer.link.handle_timeout(now_ms);
            let stuck = peer
                .waiting
                .front()
                .is_some_and(|w| now_ms.saturating_sub(w.since_ms) >= handshake_timeout);
            let failed_attempt = peer.link.handshake().and_then(|h| h.error()).cloned();
            if let Some(e) =
                failed_attempt.filter(|_| !peer.waiting.is_empty() && peer.live.is_none())
            {
                peer.waiting_bytes = 0;
                failed.extend(peer.waiting.drain(..).map(|w| (w.tag, e.clone())));
            } else if stuck && peer.live.is_none() {
                let e = refuse(
                    ErrorCode::ChallengeExpired,
                    format!("no session with {id} within {handshake_timeout} ms"),
                );
                peer.waiting_bytes = 0;
                failed.extend(peer.waiting.drain(..).map(|w| (w.tag, e.clone())));
            }
            if !peer.connected && peer.is_idle() {
                self.remove(&id);
            } else {
                self.refile(id, now_ms);
            }
        }
        (opened, failed)
    }

    /// The live session with `peer`, for `GET /v1/peers`; its expiry is shown
    /// on the wall clock (`wall_ms` is the wall-clock time at `now_ms`).
    pub fn view(&self, peer: &EntityId, now_ms: u64, wall_ms: u64) -> Option<SessionView> {
        let live = self.peers.get(peer)?.live.as_ref()?;
        let left = live.session.expires_ms().saturating_sub(now_ms);
        Some(SessionView {
            session_id: live.session.id().to_string(),
            state: live.session.state(now_ms).to_string(),
            role: match live.session.role() {
                Role::Initiator => "initiator".into(),
                Role::Responder => "responder".into(),
            },
            expires_ms: wall_ms.saturating_add(left),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Event;
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

    fn step(
        secure: &mut Secure<()>,
        me: &Identity,
        env: &Envelope,
    ) -> Result<(Option<Message>, Released<()>), Rejection> {
        let msg = Message::from_envelope(env)?;
        secure.handshake(NOW, me, env.sender_id, &env.sender_key, &msg)
    }

    fn message_event(from: EntityId, text: &str) -> Delivery {
        Delivery::ephemeral(Event::Message {
            event_id: None,
            message_id: text.into(),
            from,
            msg_type: "message".into(),
            payload: parse_json(format!("{{\"t\":\"{text}\"}}").into_bytes(), 64).expect("json"),
        })
    }

    fn text(d: &Delivery) -> String {
        match &d.event {
            Event::Message { payload, .. } => {
                payload.to_value()["t"].as_str().unwrap_or("").to_owned()
            }
            other => panic!("{other:?}"),
        }
    }

    /// A and B with a session, started by A; returns what A's first message
    /// released and both sides.
    fn sessions(
        config: SecurityConfig,
    ) -> (Identity, Identity, Secure<()>, Secure<()>, Released<()>) {
        let (ia, ib) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let (a_id, b_id) = (ia.entity_id(), ib.entity_id());
        let mut a: Secure<()> = Secure::new(config.clone(), a_id);
        let mut b: Secure<()> = Secure::new(config, b_id);
        let mt: MsgType = "message".parse().expect("valid");
        let Send::Queued(Some(mut next)) = a.send(NOW, b_id, mt, b"{}".to_vec(), ()) else {
            panic!("a starts a handshake");
        };
        let mut released = Vec::new();
        for n in 0.. {
            let to_b = signed(&ia, b_id, next.msg_type(), next.encode(), n);
            let (reply, _) = step(&mut b, &ib, &to_b).expect("b answers");
            let reply = reply.expect("a reply to every step");
            let to_a = signed(&ib, a_id, reply.msg_type(), reply.encode(), n);
            let (after, r) = step(&mut a, &ia, &to_a).expect("a goes on");
            released = r;
            match after {
                Some(m) => next = m,
                None => break,
            }
        }
        (ia, ib, a, b, released)
    }

    fn sealed_env(from: &Identity, to: EntityId, parts: &SealedParts, n: u8) -> Envelope {
        let mut env = signed(
            from,
            to,
            parts.msg_type.as_str(),
            parts.ciphertext.clone(),
            n,
        );
        env.session_id = Some(parts.session_id);
        env.sequence_num = parts.sequence_num;
        env
    }

    #[test]
    fn messages_held_by_a_replaced_session_are_still_delivered() {
        let (ia, ib, mut a, mut b, released) = sessions(SecurityConfig::default());
        let (a_id, b_id) = (ia.entity_id(), ib.entity_id());
        assert_eq!(released.len(), 1, "the first message was waiting");
        let mt: MsgType = "message".parse().expect("valid");
        // Seal three more; b receives only the 3rd and 4th: they wait for the 2nd.
        let mut sealed = Vec::new();
        for text in ["1", "2", "3"] {
            let payload = format!("{{\"t\":\"{text}\"}}").into_bytes();
            match a.send(NOW, b_id, mt.clone(), payload, ()) {
                Send::Sealed(parts, ()) => sealed.push(parts),
                other => panic!("sealed directly, got {other:?}"),
            }
        }
        let mut receive = |env: Envelope, t: &str| {
            let u = b.open(NOW, env).expect("opens");
            b.release(NOW, a_id, u.slot, Some(message_event(a_id, t)))
        };
        assert_eq!(
            receive(sealed_env(&ia, b_id, &released[0].0, 100), "0").len(),
            1
        );
        for (i, parts) in sealed.iter().enumerate().skip(1) {
            let env = sealed_env(&ia, b_id, parts, 101 + i as u8);
            assert!(
                receive(env, &(i + 1).to_string()).is_empty(),
                "held behind the gap"
            );
        }
        assert!(b.reorder_bytes() > 0);
        assert!(b.poll_timeout().is_some_and(|t| t <= NOW + 2_000));
        b.forget(NOW, a_id, sealed[0].session_id);
        let (opened, _) = b.handle_timeout(NOW);
        let texts: Vec<_> = opened.iter().map(text).collect();
        assert_eq!(texts, vec!["2", "3"], "released in order, not dropped");
        assert_eq!(b.reorder_bytes(), 0);
    }

    #[test]
    fn an_expired_session_still_holding_messages_sets_no_deadline_in_the_past() {
        let config = SecurityConfig {
            session_lifetime_secs: 10,
            ..SecurityConfig::default()
        };
        let (ia, ib, mut a, mut b, released) = sessions(config);
        let (a_id, b_id) = (ia.entity_id(), ib.entity_id());
        let first = b
            .open(NOW, sealed_env(&ia, b_id, &released[0].0, 60))
            .expect("opens");
        assert_eq!(b.release(NOW, a_id, first.slot, None).len(), 0);
        // Shortly before the session ends, a message arrives ahead of a gap.
        let mt: MsgType = "message".parse().expect("valid");
        let mut parts = Vec::new();
        for _ in 0..2 {
            let Send::Sealed(p, ()) = a.send(NOW + 8_000, b_id, mt.clone(), b"{}".to_vec(), ())
            else {
                panic!("sealed");
            };
            parts.push(p);
        }
        let late = b
            .open(NOW + 9_500, sealed_env(&ia, b_id, &parts[1], 61))
            .expect("opens before the end");
        let held = b.release(NOW + 9_500, a_id, late.slot, Some(message_event(a_id, "3")));
        assert!(held.is_empty(), "waits for the gap until NOW + 11,500");
        // The session ends at NOW + 10,000 with that message still held: the
        // timer runs then, and must not ask to run again at once (the node
        // would spin until the gap is skipped).
        let (opened, _) = b.handle_timeout(NOW + 10_000);
        assert!(opened.is_empty());
        let next = b.poll_timeout().expect("the gap's deadline");
        assert!(next > NOW + 10_000, "next deadline {next} is not after now");
        let (opened, _) = b.handle_timeout(NOW + 11_500);
        assert_eq!(opened.iter().map(text).collect::<Vec<_>>(), vec!["3"]);
        assert_eq!(b.reorder_bytes(), 0);
    }

    #[test]
    fn the_reorder_buffers_of_all_sessions_are_bounded_in_bytes() {
        let config = SecurityConfig {
            max_reorder_bytes: 30,
            ..SecurityConfig::default()
        };
        let (ia, ib, mut a, mut b, released) = sessions(config);
        let (a_id, b_id) = (ia.entity_id(), ib.entity_id());
        let first = b
            .open(NOW, sealed_env(&ia, b_id, &released[0].0, 50))
            .expect("opens");
        assert_eq!(b.release(NOW, a_id, first.slot, None).len(), 0);
        let mt: MsgType = "message".parse().expect("valid");
        let mut parts = Vec::new();
        for _ in 0..3 {
            let Send::Sealed(p, ()) = a.send(NOW, b_id, mt.clone(), b"{}".to_vec(), ()) else {
                panic!("sealed");
            };
            parts.push(p);
        }
        // Skip seq 2: 3 and 4 wait. Each event is about 9 bytes of payload.
        let u3 = b
            .open(NOW, sealed_env(&ia, b_id, &parts[1], 51))
            .expect("opens");
        assert!(
            b.release(NOW, a_id, u3.slot, Some(message_event(a_id, "3")))
                .is_empty()
        );
        let held = b.reorder_bytes();
        assert!(held > 0 && held <= 30);
        let u4 = b
            .open(NOW, sealed_env(&ia, b_id, &parts[2], 52))
            .expect("opens");
        let big = Event::Message {
            event_id: None,
            message_id: "4".into(),
            from: a_id,
            msg_type: "message".into(),
            payload: parse_json(
                format!("{{\"t\":\"4\",\"pad\":\"{}\"}}", "x".repeat(40)).into_bytes(),
                64,
            )
            .expect("json"),
        };
        // Over the bound: the session's buffer is released at once, in order.
        let out = b.release(NOW, a_id, u4.slot, Some(Delivery::ephemeral(big)));
        assert_eq!(out.iter().map(text).collect::<Vec<_>>(), vec!["3", "4"]);
        assert_eq!(b.reorder_bytes(), 0);
    }

    #[test]
    fn messages_waiting_for_a_session_are_bounded_in_bytes() {
        let me = Identity::from_secret(&[1; 32]);
        let config = SecurityConfig {
            max_waiting_bytes_per_peer: 10,
            ..SecurityConfig::default()
        };
        let mut secure: Secure<u8> = Secure::new(config, me.entity_id());
        let peer = Identity::from_secret(&[2; 32]).entity_id();
        let mt: MsgType = "message".parse().expect("valid");
        assert!(matches!(
            secure.send(NOW, peer, mt.clone(), vec![b'1'; 6], 1),
            Send::Queued(Some(_))
        ));
        match secure.send(NOW, peer, mt.clone(), vec![b'1'; 5], 2) {
            Send::Refused(2, r) => assert_eq!(r.code, ErrorCode::HandshakeInProgress),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            secure.send(NOW, peer, mt, vec![b'1'; 4], 3),
            Send::Queued(None)
        ));
        let failed = secure.fail_waiting(NOW, peer, &refuse(ErrorCode::InvalidState, "x"));
        assert_eq!(
            failed.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![1, 3]
        );
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
    fn a_timer_visits_only_the_peers_due() {
        let me = Identity::from_secret(&[1; 32]);
        let mut secure: Secure<()> = Secure::new(SecurityConfig::default(), me.entity_id());
        // One peer's challenge deadline is at NOW + 30 s; a hundred others'
        // are 10 s later.
        let first = Identity::from_secret(&[2; 32]);
        step(&mut secure, &me, &init(&first, me.entity_id(), 2)).expect("answered");
        for seed in 100..200u8 {
            let other = Identity::from_secret(&[seed; 32]);
            let env = init(&other, me.entity_id(), seed);
            let msg = Message::from_envelope(&env).expect("init");
            secure
                .handshake(NOW + 10_000, &me, env.sender_id, &env.sender_key, &msg)
                .expect("answered");
        }
        assert_eq!(secure.poll_timeout(), Some(NOW + 30_000));
        secure.handle_timeout(NOW + 30_000);
        assert_eq!(secure.visited, 1, "only the peer due is visited");
        assert_eq!(secure.poll_timeout(), Some(NOW + 40_000));
        // The first one's attempt failed; once it disconnects it is due at
        // once, and forgotten.
        secure.set_connected(NOW + 30_001, first.entity_id(), false);
        assert_eq!(secure.poll_timeout(), Some(NOW + 30_001));
        secure.handle_timeout(NOW + 30_001);
        assert_eq!(secure.visited, 2);
        assert!(!secure.knows(&first.entity_id()));
        assert_eq!(secure.len(), 100);
        assert_eq!(secure.poll_timeout(), Some(NOW + 40_000));
    }

    #[test]
    fn a_full_table_forgets_disconnected_peers_first_never_connected_ones() {
        let me = Identity::from_secret(&[1; 32]);
        let config = SecurityConfig {
            max_peers: 2,
            ..SecurityConfig::default()
        };
        let mut secure: Secure<()> = Secure::new(config, me.entity_id());
        // Two identities start handshakes and stay connected: the table is full
        // of connected peers, so a third is refused.
        for seed in [10u8, 11] {
            let sybil = Identity::from_secret(&[seed; 32]);
            step(&mut secure, &me, &init(&sybil, me.entity_id(), seed)).expect("answered");
        }
        let third = Identity::from_secret(&[12; 32]);
        let refused = step(&mut secure, &me, &init(&third, me.entity_id(), 12));
        assert_eq!(
            refused.expect_err("full of connected peers").code,
            ErrorCode::InvalidState
        );
        // Once one of them disconnects, a newcomer takes its place.
        let first = Identity::from_secret(&[10; 32]).entity_id();
        secure.set_connected(NOW, first, false);
        step(&mut secure, &me, &init(&third, me.entity_id(), 13)).expect("room made");
        assert!(!secure.knows(&first));
        assert_eq!(secure.len(), 2);
    }

    #[test]
    fn the_deadline_follows_the_earliest_timer_and_a_disconnected_idle_peer_is_dropped() {
        let me = Identity::from_secret(&[1; 32]);
        let mut secure: Secure<()> = Secure::new(SecurityConfig::default(), me.entity_id());
        assert_eq!(secure.poll_timeout(), None);
        let peer = Identity::from_secret(&[2; 32]);
        step(&mut secure, &me, &init(&peer, me.entity_id(), 2)).expect("answered");
        // The responder's challenge deadline (30 s) is the earliest.
        assert_eq!(secure.poll_timeout(), Some(NOW + 30_000));
        let (_, failed) = secure.handle_timeout(NOW + 30_000);
        assert!(failed.is_empty());
        secure.set_connected(NOW + 30_001, peer.entity_id(), false);
        assert_eq!(
            secure.poll_timeout(),
            Some(NOW + 30_001),
            "due to be forgotten"
        );
        secure.handle_timeout(NOW + 30_001);
        assert!(!secure.knows(&peer.entity_id()), "nothing left of it");
        assert_eq!(secure.poll_timeout(), None);
    }
}
