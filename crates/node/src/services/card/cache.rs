//! Peers' verified cards, at most `card.max_peers` of them, each forgotten
//! `card.expiry_secs` after it arrived. At the bound the card stored longest
//! ago goes first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use peer_core::EntityId;

use super::signed::SignedCard;

struct Entry {
    card: Arc<SignedCard>,
    /// Monotonic ms it was stored at.
    stored_ms: u64,
    /// Its place in `order`.
    stamp: u64,
}

/// The cache of peers' cards.
pub(crate) struct PeerCards {
    max: usize,
    expiry_ms: u64,
    by_peer: HashMap<EntityId, Entry>,
    /// Peers by when their card was stored, oldest first.
    order: BTreeMap<u64, EntityId>,
    next_stamp: u64,
}

impl PeerCards {
    /// At most `max` (at least 1) cards, each kept `expiry_ms`.
    pub fn new(max: usize, expiry_ms: u64) -> Self {
        Self {
            max: max.max(1),
            expiry_ms,
            by_peer: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// `peer`'s card, unless it has expired (it is then forgotten).
    pub fn get(&mut self, now_ms: u64, peer: &EntityId) -> Option<Arc<SignedCard>> {
        let e = self.by_peer.get(peer)?;
        if now_ms.saturating_sub(e.stored_ms) >= self.expiry_ms {
            self.remove(peer);
            return None;
        }
        self.by_peer.get(peer).map(|e| e.card.clone())
    }

    /// Stores `peer`'s card (replacing the one held), forgetting the card
    /// stored longest ago if the cache is full.
    pub fn insert(&mut self, now_ms: u64, peer: EntityId, card: Arc<SignedCard>) {
        self.remove(&peer);
        while self.by_peer.len() >= self.max {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_peer.remove(&oldest);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.insert(stamp, peer);
        self.by_peer.insert(
            peer,
            Entry {
                card,
                stored_ms: now_ms,
                stamp,
            },
        );
    }

    fn remove(&mut self, peer: &EntityId) {
        if let Some(e) = self.by_peer.remove(peer) {
            self.order.remove(&e.stamp);
        }
    }

    /// Cards held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_peer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::signed::{CardContent, NodeFacts, build};
    use super::*;
    use peer_core::Identity;

    fn card(seed: u8) -> (EntityId, Arc<SignedCard>) {
        let id = Identity::from_secret(&[seed; 32]);
        let facts = NodeFacts {
            message_types: vec![],
            limits: Default::default(),
        };
        let c = build(&id, &CardContent::unnamed(), &facts, 0, 1);
        (id.entity_id(), Arc::new(SignedCard::sign(c, &id)))
    }

    #[test]
    fn at_the_bound_the_card_stored_longest_ago_goes() {
        let mut cache = PeerCards::new(2, 1_000);
        let (a, b, c) = (card(1), card(2), card(3));
        cache.insert(0, a.0, a.1.clone());
        cache.insert(1, b.0, b.1.clone());
        // A again: it is now the newest.
        cache.insert(2, a.0, a.1.clone());
        cache.insert(3, c.0, c.1.clone());
        assert_eq!(cache.len(), 2);
        assert!(cache.get(3, &b.0).is_none(), "B was stored longest ago");
        assert!(cache.get(3, &a.0).is_some() && cache.get(3, &c.0).is_some());
    }

    #[test]
    fn a_card_expires() {
        let mut cache = PeerCards::new(8, 1_000);
        let a = card(1);
        cache.insert(100, a.0, a.1);
        assert!(cache.get(1_099, &a.0).is_some());
        assert!(cache.get(1_100, &a.0).is_none());
        assert_eq!(cache.len(), 0, "forgotten once expired");
    }
}
