//! Outbound streams per peer: at most `per_peer` requests in flight to one
//! peer (a libp2p request-response stream each), the rest wait in that peer's
//! FIFO. How many sends are held in all is bounded before this, when they are
//! admitted (see `actor::outbound`).
//!
//! Sealed requests reach the FIFO in the order they were sealed
//! ([`InSequence`]): they are signed in parallel and come back in any order, and a receiver answers a
//! sealed message only once it is delivered, in order (PROTOCOL.md §13). If a
//! later message took the last stream while an earlier one waited in the
//! FIFO, the later ones' answers would wait for the earlier one and the
//! earlier one for a stream: both sides would stall until the receiver gave
//! up on the gap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;

/// What happened to an item handed to [`Outbox::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Send it now.
    Send(T),
    /// It waits its turn; [`Outbox::finished`] will hand it back.
    Queued,
}

/// Per-peer in-flight counts and waiting queues.
#[derive(Debug)]
pub struct Outbox<K, T> {
    per_peer: usize,
    in_flight: HashMap<K, usize>,
    waiting: HashMap<K, VecDeque<T>>,
}

impl<K: Hash + Eq + Copy, T> Outbox<K, T> {
    /// An empty outbox with `per_peer` requests in flight per peer (at least 1).
    pub fn new(per_peer: usize) -> Self {
        Self {
            per_peer: per_peer.max(1),
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// Offers an item for `peer`.
    pub fn admit(&mut self, peer: K, item: T) -> Admit<T> {
        let n = self.in_flight.entry(peer).or_default();
        if *n < self.per_peer {
            *n += 1;
            Admit::Send(item)
        } else {
            self.waiting.entry(peer).or_default().push_back(item);
            Admit::Queued
        }
    }

    /// A request to `peer` finished; returns the next waiting item to send, if any.
    pub fn finished(&mut self, peer: K) -> Option<T> {
        if let Some(q) = self.waiting.get_mut(&peer) {
            let next = q.pop_front();
            if q.is_empty() {
                self.waiting.remove(&peer);
            }
            if next.is_some() {
                return next;
            }
        }
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&peer);
            }
        }
        None
    }

    /// Removes and returns everything waiting for `peer` (it disconnected).
    pub fn drain_waiting(&mut self, peer: K) -> Vec<T> {
        self.waiting
            .remove(&peer)
            .map(Vec::from)
            .unwrap_or_default()
    }
}

/// Items let go in the order they were announced, whatever order they come
/// back in: [`InSequence::expect`] when a sealed request is sealed,
/// [`InSequence::ready`] when it is signed.
#[derive(Debug)]
pub struct InSequence<T> {
    /// Announced items by ticket; `Some` once ready.
    pending: BTreeMap<u64, Option<T>>,
}

impl<T> Default for InSequence<T> {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
        }
    }
}

impl<T> InSequence<T> {
    /// Announces the item with `ticket` (tickets increase).
    pub fn expect(&mut self, ticket: u64) {
        self.pending.insert(ticket, None);
    }

    /// The item with `ticket` is ready; returns the items now due, in ticket
    /// order (none while an earlier one is not ready). An item never
    /// announced goes at once.
    pub fn ready(&mut self, ticket: u64, item: T) -> Vec<T> {
        match self.pending.get_mut(&ticket) {
            Some(slot) => *slot = Some(item),
            None => return vec![item],
        }
        let mut out = Vec::new();
        while let Some(mut first) = self.pending.first_entry() {
            match first.get_mut().take() {
                Some(item) => {
                    first.remove();
                    out.push(item);
                }
                None => break,
            }
        }
        out
    }

    /// Whether nothing is announced and not let go.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The items ready but held back (the peer is gone).
    pub fn drain(&mut self) -> Vec<T> {
        std::mem::take(&mut self.pending)
            .into_values()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_items_go_in_the_order_they_were_sealed() {
        let mut s: InSequence<&str> = InSequence::default();
        for t in 1..=4 {
            s.expect(t);
        }
        assert!(s.ready(2, "b").is_empty(), "waits for 1");
        assert!(s.ready(3, "c").is_empty());
        assert_eq!(s.ready(1, "a"), vec!["a", "b", "c"]);
        assert!(!s.is_empty(), "4 is announced");
        assert_eq!(s.ready(4, "d"), vec!["d"]);
        assert!(s.is_empty());
        // Tickets need not be contiguous; one never announced goes at once.
        s.expect(10);
        s.expect(12);
        assert!(s.ready(12, "f").is_empty());
        assert_eq!(s.ready(99, "x"), vec!["x"]);
        assert_eq!(s.drain(), vec!["f"]);
        assert!(s.is_empty());
    }

    #[test]
    fn beyond_the_per_peer_limit_items_wait_in_order() {
        let mut o: Outbox<u8, u32> = Outbox::new(2);
        assert_eq!(o.admit(1, 10), Admit::Send(10));
        assert_eq!(o.admit(1, 11), Admit::Send(11));
        assert_eq!(o.admit(1, 12), Admit::Queued);
        assert_eq!(o.admit(1, 13), Admit::Queued);
        assert_eq!(o.admit(2, 20), Admit::Send(20), "another peer has its own");
        // A finished request to peer 1 releases its queued items, in order.
        assert_eq!(o.finished(1), Some(12));
        assert_eq!(o.finished(1), Some(13));
        assert_eq!(o.finished(1), None);
        assert_eq!(o.finished(1), None);
        assert_eq!(o.admit(1, 14), Admit::Send(14), "room again");
    }

    #[test]
    fn a_disconnected_peer_gives_back_its_queue() {
        let mut o: Outbox<u8, u32> = Outbox::new(1);
        assert_eq!(o.admit(1, 1), Admit::Send(1));
        assert_eq!(o.admit(1, 2), Admit::Queued);
        assert_eq!(o.admit(1, 3), Admit::Queued);
        assert_eq!(o.drain_waiting(1), vec![2, 3]);
        assert_eq!(o.finished(1), None);
        assert_eq!(o.admit(1, 4), Admit::Send(4));
    }
}
