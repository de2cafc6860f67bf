//! DHT lookups in progress and what waits on each: one lookup per entity
//! (later askers join it), one per capability, and walks; at most
//! `discovery.max_lookups` at once.

use std::collections::{HashMap, HashSet};

use peer_core::EntityId;
use tokio::sync::oneshot;

use super::PeerInfo;
use crate::node::NodeError;

/// What to do once an entity's lookup ends.
#[derive(Debug)]
pub enum Then {
    /// Answer the agent with the peer.
    Agent(oneshot::Sender<Result<PeerInfo, NodeError>>),
    /// Count it done for this providers lookup.
    Parent(u64),
    /// Dial it once if found (the reachability check).
    Probe,
    /// Dial it if found (a service wants it); else its messages fail.
    Dial,
}

/// Answers to the agent's capability query.
pub type Waiter = oneshot::Sender<Result<Vec<PeerInfo>, NodeError>>;

/// A lookup that ended, with what waited on it.
#[derive(Debug)]
pub enum Finished {
    /// An entity's record lookup.
    Entity {
        /// The entity.
        entity: EntityId,
        /// Whether a valid record came.
        found: bool,
        /// What waited.
        then: Vec<Then>,
    },
    /// A capability's providers, each one's record looked up.
    Providers {
        /// The capability.
        capability: String,
        /// Who asked.
        waiters: Vec<Waiter>,
    },
}

#[derive(Debug)]
enum Kind {
    Entity {
        entity: EntityId,
        found: bool,
        then: Vec<Then>,
    },
    Providers {
        capability: String,
        waiters: Vec<Waiter>,
        pending: HashSet<EntityId>,
        kad_done: bool,
    },
    Walk,
}

/// The lookups in progress.
#[derive(Debug)]
pub struct Lookups {
    kinds: HashMap<u64, Kind>,
    by_entity: HashMap<EntityId, u64>,
    by_capability: HashMap<String, u64>,
    next: u64,
    max: usize,
}

impl Lookups {
    /// None yet; at most `max` at once.
    pub fn new(max: usize) -> Self {
        Self {
            kinds: HashMap::new(),
            by_entity: HashMap::new(),
            by_capability: HashMap::new(),
            next: 0,
            max: max.max(1),
        }
    }

    fn token(&mut self, kind: Kind) -> u64 {
        self.next += 1;
        self.kinds.insert(self.next, kind);
        self.next
    }

    /// A lookup of `entity`'s record, `then` done when it ends: a new token
    /// to start it with, `Ok(None)` if one runs already (`then` joins it),
    /// or `then` back when too many run.
    pub fn entity(&mut self, entity: EntityId, then: Then) -> Result<Option<u64>, Then> {
        if let Some(t) = self.by_entity.get(&entity)
            && let Some(Kind::Entity { then: all, .. }) = self.kinds.get_mut(t)
        {
            all.push(then);
            return Ok(None);
        }
        if self.kinds.len() >= self.max {
            return Err(then);
        }
        let token = self.token(Kind::Entity {
            entity,
            found: false,
            then: vec![then],
        });
        self.by_entity.insert(entity, token);
        Ok(Some(token))
    }

    /// A lookup of `capability`'s providers: a new token, or `None` if one
    /// runs already (the waiter joins it) or too many run (the waiter is
    /// answered `UNAVAILABLE`).
    pub fn providers(&mut self, capability: &str, waiter: Option<Waiter>) -> Option<u64> {
        if let Some(t) = self.by_capability.get(capability)
            && let Some(Kind::Providers { waiters, .. }) = self.kinds.get_mut(t)
        {
            waiters.extend(waiter);
            return None;
        }
        if self.kinds.len() >= self.max {
            if let Some(w) = waiter {
                _ = w.send(Err(NodeError::Busy(self.max)));
            }
            return None;
        }
        let token = self.token(Kind::Providers {
            capability: capability.to_owned(),
            waiters: waiter.into_iter().collect(),
            pending: HashSet::new(),
            kad_done: false,
        });
        self.by_capability.insert(capability.to_owned(), token);
        Some(token)
    }

    /// A walk (closest peers of a key), if there is room.
    pub fn walk(&mut self) -> Option<u64> {
        (self.kinds.len() < self.max).then(|| self.token(Kind::Walk))
    }

    /// The entity a record lookup is for.
    pub fn entity_of(&self, token: u64) -> Option<EntityId> {
        match self.kinds.get(&token) {
            Some(Kind::Entity { entity, .. }) => Some(*entity),
            _ => None,
        }
    }

    /// The capability a providers lookup is for.
    pub fn capability_of(&self, token: u64) -> Option<String> {
        match self.kinds.get(&token) {
            Some(Kind::Providers { capability, .. }) => Some(capability.clone()),
            _ => None,
        }
    }

    /// Whether `token` is a walk.
    pub fn is_walk(&self, token: u64) -> bool {
        matches!(self.kinds.get(&token), Some(Kind::Walk))
    }

    /// A valid record came for the entity lookup `token`.
    pub fn found(&mut self, token: u64) {
        if let Some(Kind::Entity { found, .. }) = self.kinds.get_mut(&token) {
            *found = true;
        }
    }

    /// A provider of the providers lookup `token` whose record is being
    /// looked up; false if it is already counted.
    pub fn add_pending(&mut self, token: u64, entity: EntityId) -> bool {
        match self.kinds.get_mut(&token) {
            Some(Kind::Providers { pending, .. }) => pending.insert(entity),
            _ => false,
        }
    }

    /// The DHT query of `token` ended.
    pub fn done(&mut self, token: u64) -> Vec<Finished> {
        match self.kinds.get_mut(&token) {
            Some(Kind::Providers { kad_done, .. }) => {
                *kad_done = true;
                self.finish_providers(token)
            }
            Some(_) => match self.kinds.remove(&token) {
                Some(Kind::Entity {
                    entity,
                    found,
                    then,
                }) => {
                    self.by_entity.remove(&entity);
                    vec![Finished::Entity {
                        entity,
                        found,
                        then,
                    }]
                }
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// The record lookup of a provider of `parent` ended.
    pub fn pending_done(&mut self, parent: u64, entity: EntityId) -> Vec<Finished> {
        if let Some(Kind::Providers { pending, .. }) = self.kinds.get_mut(&parent) {
            pending.remove(&entity);
        }
        self.finish_providers(parent)
    }

    fn finish_providers(&mut self, token: u64) -> Vec<Finished> {
        let ready = matches!(self.kinds.get(&token),
            Some(Kind::Providers { pending, kad_done: true, .. }) if pending.is_empty());
        if !ready {
            return Vec::new();
        }
        match self.kinds.remove(&token) {
            Some(Kind::Providers {
                capability,
                waiters,
                ..
            }) => {
                self.by_capability.remove(&capability);
                vec![Finished::Providers {
                    capability,
                    waiters,
                }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EntityId {
        EntityId([n; 32])
    }

    #[test]
    fn one_lookup_per_entity_and_later_askers_join_it() {
        let mut l = Lookups::new(8);
        let t = l.entity(id(1), Then::Probe).expect("room").expect("new");
        assert!(matches!(l.entity(id(1), Then::Dial), Ok(None)));
        l.found(t);
        let done = l.done(t);
        assert!(
            matches!(&done[..], [Finished::Entity { found: true, then, .. }] if then.len() == 2)
        );
        // Ended: a new one starts.
        assert!(matches!(l.entity(id(1), Then::Probe), Ok(Some(_))));
    }

    #[test]
    fn a_providers_lookup_ends_when_the_query_and_every_record_lookup_did() {
        let mut l = Lookups::new(8);
        let (tx, _rx) = oneshot::channel();
        let p = l.providers("code", Some(tx)).expect("new");
        assert!(l.add_pending(p, id(1)));
        assert!(!l.add_pending(p, id(1)));
        assert!(l.add_pending(p, id(2)));
        assert!(l.done(p).is_empty(), "two records still being looked up");
        assert!(l.pending_done(p, id(1)).is_empty());
        let done = l.pending_done(p, id(2));
        assert!(
            matches!(&done[..], [Finished::Providers { capability, waiters }]
            if capability == "code" && waiters.len() == 1)
        );
    }

    #[test]
    fn beyond_the_bound_a_lookup_is_refused_and_its_asker_answered() {
        let mut l = Lookups::new(1);
        assert!(l.walk().is_some());
        assert!(l.walk().is_none());
        assert!(matches!(l.entity(id(1), Then::Probe), Err(Then::Probe)));
        let (tx, mut rx) = oneshot::channel();
        assert!(l.providers("code", Some(tx)).is_none());
        assert!(matches!(rx.try_recv(), Ok(Err(NodeError::Busy(1)))));
    }
}
