//! Capability exchange (PROTOCOL.md section 11): the node's own signed card,
//! answered to `capability_query` and pushed to connected peers when it
//! changes, and peers' cards, fetched when they connect, verified and cached.
//!
//! The own card lives in a [`CardCell`] shared with the messaging and
//! transfer services (which refuse namespaced types whose namespace it does
//! not accept) and with the handle (which reads it without asking the actor).
//! This service alone replaces it.

mod cache;
mod config;
pub mod signed;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use peer_core::rate::Class;
use peer_core::{EntityId, ErrorCode, Identity, MsgType, Rejection};
use tokio::sync::oneshot;

pub use config::CardConfig;
pub use signed::{Card, CardContent, CardLimits, NodeFacts, QuotaView, SignedCard, Skill};

use crate::config::Config;
use crate::node::{Event, NodeError};
use crate::service::{
    Answer, Context, Inbound, Outcome, PeerEvent, Reply, RequestId, Route, Service,
};
use crate::store::{Store, StoreError};
use cache::PeerCards;
use signed::Rules;

/// The metadata key the own card is stored under (its wire form).
pub const STORE_KEY: &str = "card";

/// The node's own card, shared by the services that need it and the handle.
/// Empty only until the node starts.
#[derive(Debug, Clone, Default)]
pub struct CardCell(Arc<RwLock<Option<Arc<SignedCard>>>>);

impl CardCell {
    /// The own card (`None` before the node started).
    pub fn get(&self) -> Option<Arc<SignedCard>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, card: Arc<SignedCard>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(card);
    }

    /// Whether the own card accepts namespace `ns`.
    pub fn accepts_namespace(&self, ns: &str) -> bool {
        self.get().is_some_and(|c| c.card().accepts(ns))
    }

    /// `UNSUPPORTED_MSG_TYPE` for a namespaced type whose namespace the own
    /// card does not accept; `Ok` for any other type.
    pub fn check_accepts(&self, msg_type: &MsgType) -> Result<(), Rejection> {
        let Some(ns) = msg_type.namespace() else {
            return Ok(());
        };
        if self.accepts_namespace(ns) {
            return Ok(());
        }
        Err(Rejection::new(
            ErrorCode::UnsupportedMsgType,
            format!("this node's card does not accept the namespace {ns:?} of msg_type {msg_type}"),
        ))
    }
}

/// Where a command's answer goes.
type Answerer<T> = oneshot::Sender<T>;

/// What the card service takes from handles.
#[derive(Debug)]
pub enum Command {
    /// Sign a new card with `content` and the next sequence, without using it
    /// yet (the handle stores it first, then adopts it).
    Sign {
        /// The agent's part.
        content: CardContent,
        /// The signed card, or why not (too large).
        reply: Answerer<Result<Arc<SignedCard>, NodeError>>,
    },
    /// Make a signed card the own card (unless a newer one is) and push it to
    /// connected peers.
    Adopt {
        /// The card, from [`Command::Sign`].
        card: Arc<SignedCard>,
        /// The own card afterwards.
        reply: Answerer<Arc<SignedCard>>,
    },
    /// A peer's card: the cached one, else asked of the peer if it is
    /// connected, else none.
    Peer {
        /// The peer.
        peer: EntityId,
        /// Its card.
        reply: Answerer<Option<Arc<SignedCard>>>,
    },
    /// Whether `msg_type` may be sent to `peer`: refused
    /// `UNSUPPORTED_MSG_TYPE` if the peer's card is known and does not let
    /// this node send it ([`Card::may_send`]): it neither lists the type among
    /// its message types nor, for a namespaced type, lists both the feature
    /// `app-types` and its namespace.
    CheckSend {
        /// The recipient.
        peer: EntityId,
        /// The type to send.
        msg_type: MsgType,
        /// The verdict.
        reply: Answerer<Result<(), NodeError>>,
    },
}

/// Exchanges capability cards.
pub struct Cards {
    own: CardCell,
    peers: PeerCards,
    connected: HashSet<EntityId>,
    /// Our `capability_query` requests in flight, by request and by peer.
    queries: HashMap<RequestId, EntityId>,
    asking: HashMap<EntityId, RequestId>,
    /// Handles waiting for a peer's card, by peer (each an API request, so
    /// bounded by `api.max_concurrent_requests`).
    waiting: HashMap<EntityId, Vec<Answerer<Option<Arc<SignedCard>>>>>,
    /// The highest sequence signed so far (adopted or not).
    signed_up_to: u64,
}

impl std::fmt::Debug for Cards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cards")
            .field("connected", &self.connected.len())
            .field("queries", &self.queries.len())
            .finish_non_exhaustive()
    }
}

impl Cards {
    /// The service, with its cache sized by `config` and the own card in `own`.
    pub fn new(config: &CardConfig, own: CardCell) -> Self {
        Self {
            own,
            peers: PeerCards::new(config.max_peers, config.expiry_secs.saturating_mul(1000)),
            connected: HashSet::new(),
            queries: HashMap::new(),
            asking: HashMap::new(),
            waiting: HashMap::new(),
            signed_up_to: 0,
        }
    }

    fn rules(cx: &Context<'_>) -> Rules {
        let c = cx.config();
        Rules {
            max_bytes: c.card.max_bytes,
            tolerance_ms: c.protocol.timestamp_tolerance_secs.saturating_mul(1000),
        }
    }

    fn query(&mut self, cx: &mut Context<'_>, peer: EntityId) {
        if self.asking.contains_key(&peer) {
            return;
        }
        let t = MsgType::CAPABILITY_QUERY.parse().expect("valid");
        let id = cx.send(peer, t, b"{}".to_vec());
        self.queries.insert(id, peer);
        self.asking.insert(peer, id);
    }

    /// Checks a card `from` sent and caches it if it is new (telling the agent).
    fn receive(
        &mut self,
        cx: &mut Context<'_>,
        from: EntityId,
        payload: &[u8],
    ) -> Result<(), Rejection> {
        let now = cx.now_ms();
        let held = self.peers.get(now, &from);
        let fresh = signed::accept(
            payload,
            &from,
            held.as_deref(),
            cx.wall_ms(),
            Self::rules(cx),
        )?;
        if let Some(card) = fresh {
            let sequence = card.card().sequence;
            self.peers.insert(now, from, Arc::new(card));
            cx.emit(Event::CardUpdated {
                entity_id: from,
                sequence,
            });
        }
        Ok(())
    }

    fn sign(&mut self, cx: &Context<'_>, content: &CardContent) -> Result<SignedCard, NodeError> {
        content.validate().map_err(NodeError::Invalid)?;
        let own = self.own.get().ok_or(NodeError::Stopped)?;
        let sequence = self.signed_up_to.max(own.card().sequence) + 1;
        let facts = NodeFacts {
            message_types: own.card().message_types.clone(),
            limits: own.card().limits.clone(),
        };
        let card = signed::build(&cx.identity(), content, &facts, cx.wall_ms(), sequence);
        let card = SignedCard::sign(card, &cx.identity());
        let (len, max) = (card.to_payload().len(), cx.config().card.max_bytes);
        if len > max {
            return Err(NodeError::Invalid(format!(
                "the signed card is {len} bytes; card.max_bytes is {max}"
            )));
        }
        self.signed_up_to = sequence;
        Ok(card)
    }
}

impl Service for Cards {
    type Command = Command;

    fn name(&self) -> &'static str {
        "card"
    }

    /// Plain: a card is public and signed by its entity whatever carries it,
    /// and a node fetches it as soon as a peer connects, before (and whether
    /// or not) a session is needed.
    fn routes(&self) -> Vec<Route> {
        vec![
            Route::plain(MsgType::CAPABILITY_QUERY, Class::Discovery),
            Route::plain(MsgType::CAPABILITY_RESPONSE, Class::Discovery),
        ]
    }

    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        if msg.msg_type == *MsgType::CAPABILITY_QUERY {
            return match self.own.get() {
                Some(card) => Answer::Reply {
                    msg_type: MsgType::CAPABILITY_RESPONSE.parse().expect("valid"),
                    payload: card.to_payload(),
                },
                None => Rejection::new(ErrorCode::InvalidState, "no card yet").into(),
            };
        }
        match self.receive(cx, msg.from, &msg.payload) {
            Ok(()) => Answer::Accepted,
            Err(r) => r.into(),
        }
    }

    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        // Pushes of the own card are not tracked: a peer that refuses one
        // asks again when it wants the card.
        let Some(peer) = self.queries.remove(&id) else {
            return;
        };
        self.asking.remove(&peer);
        match outcome.result {
            Ok(Reply::Envelope(env)) if env.msg_type == *MsgType::CAPABILITY_RESPONSE => {
                if let Err(r) = self.receive(cx, peer, &env.payload) {
                    tracing::debug!(%peer, rejection = %r, "peer's card refused");
                }
            }
            Ok(_) => tracing::debug!(%peer, "capability_query answered without a card"),
            Err(e) => tracing::debug!(%peer, error = %e, "capability_query failed"),
        }
        let now = cx.now_ms();
        let card = self.peers.get(now, &peer);
        for w in self.waiting.remove(&peer).unwrap_or_default() {
            _ = w.send(card.clone());
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: Command) {
        match command {
            Command::Sign { content, reply } => {
                _ = reply.send(self.sign(cx, &content).map(Arc::new));
            }
            Command::Adopt { card, reply } => {
                let newer = self
                    .own
                    .get()
                    .is_none_or(|own| card.card().sequence > own.card().sequence);
                if newer {
                    self.own.set(card.clone());
                    let t: MsgType = MsgType::CAPABILITY_RESPONSE.parse().expect("valid");
                    let mut peers: Vec<EntityId> = self.connected.iter().copied().collect();
                    peers.sort();
                    for peer in peers {
                        cx.send(peer, t.clone(), card.to_payload());
                    }
                }
                _ = reply.send(self.own.get().unwrap_or(card));
            }
            Command::Peer { peer, reply } => {
                let now = cx.now_ms();
                if let Some(card) = self.peers.get(now, &peer) {
                    _ = reply.send(Some(card));
                } else if self.connected.contains(&peer) {
                    self.waiting.entry(peer).or_default().push(reply);
                    self.query(cx, peer);
                } else {
                    _ = reply.send(None);
                }
            }
            Command::CheckSend {
                peer,
                msg_type,
                reply,
            } => {
                let now = cx.now_ms();
                let verdict = match self.peers.get(now, &peer) {
                    Some(card) => card.card().may_send(&msg_type).map_err(NodeError::rejected),
                    None => Ok(()),
                };
                _ = reply.send(verdict);
            }
        }
    }

    fn on_peer_event(&mut self, cx: &mut Context<'_>, event: PeerEvent) {
        match event {
            PeerEvent::Connected(peer) => {
                self.connected.insert(peer);
                self.query(cx, peer);
            }
            PeerEvent::Disconnected(peer) => {
                self.connected.remove(&peer);
            }
        }
    }
}

/// The node's facts for its card, from its configuration and the message
/// types its services take.
pub(crate) fn facts(config: &Config, message_types: Vec<String>) -> NodeFacts {
    let r = &config.rate_limits;
    let rate_limits = if r.enabled {
        [
            (Class::Handshake, r.handshake),
            (Class::Heartbeat, r.heartbeat),
            (Class::Task, r.task),
            (Class::Discovery, r.discovery),
            (Class::Chunk, r.chunk),
        ]
        .into_iter()
        .map(|(c, q)| {
            let q = QuotaView {
                per_minute: q.per_minute,
                burst: q.burst,
            };
            (c.as_str().to_owned(), q)
        })
        .collect()
    } else {
        Default::default()
    };
    NodeFacts {
        message_types,
        limits: CardLimits {
            max_envelope_size: config.protocol.max_envelope_size as u64,
            max_message_size: config.transfer.max_message_size,
            chunk_size: config.transfer.chunk_size as u64,
            max_json_depth: config.protocol.max_json_depth as u64,
            max_card_bytes: config.card.max_bytes as u64,
            rate_limits,
        },
    }
}

/// The own card stored in `store`, if it is one this identity signed.
fn stored(store: &Store, identity: &Identity) -> Result<Option<SignedCard>, StoreError> {
    let Some(bytes) = store.meta(STORE_KEY)? else {
        return Ok(None);
    };
    let card = SignedCard::parse(&bytes, usize::MAX)
        .and_then(|c| c.verify(&identity.entity_id(), 0, u64::MAX).map(|()| c));
    match card {
        Ok(c) => Ok(Some(c)),
        Err(r) => {
            tracing::warn!(rejection = %r, "the stored card is not this identity's; a new one is made");
            Ok(None)
        }
    }
}

/// The agent's part of a card.
fn content_of(card: &Card) -> CardContent {
    CardContent {
        name: card.name.clone(),
        description: card.description.clone(),
        version: card.version.clone(),
        skills: card.skills.clone(),
        accepts: card.accepts.clone(),
    }
}

/// Stores `card` as the own card unless the stored one is of the same
/// entity with a sequence as high; whether it was stored.
pub fn save(store: &Store, card: &SignedCard) -> Result<bool, StoreError> {
    let (entity, sequence) = (card.card().entity_id, card.card().sequence);
    store.replace_meta(STORE_KEY, &card.to_payload(), |old| {
        SignedCard::parse(old, usize::MAX)
            .is_ok_and(|c| c.card().entity_id == entity && c.card().sequence >= sequence)
    })
}

/// The card the node starts with: the content of `[card]` if it declares
/// one, else the stored card's, else a name made of the entity id; with the
/// node's facts of now. The stored card is kept as it is if nothing differs;
/// else a new one is signed with the next sequence and stored.
pub(crate) fn initial(
    config: &Config,
    identity: &Identity,
    store: &Store,
    message_types: Vec<String>,
    now_ms: u64,
) -> Result<SignedCard, StoreError> {
    let held = stored(store, identity)?;
    let sequence = held.as_ref().map_or(0, |c| c.card().sequence) + 1;
    let content = config
        .card
        .content()
        .or_else(|| held.as_ref().map(|c| content_of(c.card())))
        .unwrap_or_else(|| CardContent {
            name: format!("peer-{}", &identity.entity_id().to_string()[..8]),
            ..CardContent::unnamed()
        });
    let facts = facts(config, message_types);
    let wanted = signed::build(identity, &content, &facts, 0, 0);
    if let Some(held) = held {
        let same = Card {
            issued_at_ms: 0,
            sequence: 0,
            ..held.card().clone()
        };
        if same == wanted {
            return Ok(held);
        }
    }
    let card = SignedCard::sign(
        Card {
            issued_at_ms: now_ms,
            sequence,
            ..wanted
        },
        identity,
    );
    save(store, &card)?;
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(config: &Config, identity: &Identity, store: &Store, now: u64) -> SignedCard {
        initial(config, identity, store, vec!["message".into()], now).expect("card")
    }

    #[test]
    fn a_node_keeps_its_stored_card_until_something_in_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let id = Identity::from_secret(&[4; 32]);
        let mut config = Config::default();
        let first = start(&config, &id, &store, 10);
        assert_eq!(first.card().sequence, 1);
        assert!(first.card().name.starts_with("peer-"));
        // Nothing changed: the very same card, however later.
        assert_eq!(start(&config, &id, &store, 20), first);
        // The configuration declares a card: a new one, the next sequence.
        config.card.name = Some("declared".into());
        let declared = start(&config, &id, &store, 30);
        assert_eq!(
            (declared.card().name.as_str(), declared.card().sequence),
            ("declared", 2)
        );
        // A limit changed: signed again.
        config.protocol.max_json_depth = 32;
        assert_eq!(start(&config, &id, &store, 40).card().sequence, 3);
        // Another identity does not take this one's card or its sequence.
        let new_id = Identity::from_secret(&[5; 32]);
        let other = start(&config, &new_id, &store, 50);
        assert_eq!(other.card().sequence, 1);
        let held = stored(&store, &new_id).expect("read");
        assert_eq!(held, Some(other), "stored in place of the old identity's");
    }

    #[test]
    fn a_stored_card_is_replaced_only_by_a_higher_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let id = Identity::from_secret(&[4; 32]);
        let facts = facts(&Config::default(), vec![]);
        let card = |seq| {
            SignedCard::sign(
                signed::build(&id, &CardContent::unnamed(), &facts, 0, seq),
                &id,
            )
        };
        assert!(save(&store, &card(2)).expect("saved"));
        assert!(
            !save(&store, &card(1)).expect("kept"),
            "an older one is not stored"
        );
        assert!(!save(&store, &card(2)).expect("kept"));
        assert!(save(&store, &card(3)).expect("saved"));
        let held = stored(&store, &id).expect("read").expect("a card");
        assert_eq!(held.card().sequence, 3);
    }
}
