//! Outbound flow control: at most `per_peer` requests in flight to one peer (a
//! libp2p request-response stream each), the rest wait in that peer's FIFO; at
//! most `total` sends are held in all, beyond which senders are told to retry.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// What happened to an item handed to [`Outbox::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Send it now.
    Send(T),
    /// It waits its turn; [`Outbox::finished`] will hand it back.
    Queued,
    /// The outbox is full; the item is returned to be refused.
    Full(T),
}

/// Per-peer in-flight counts and waiting queues.
#[derive(Debug)]
pub struct Outbox<K, T> {
    per_peer: usize,
    total: usize,
    held: usize,
    in_flight: HashMap<K, usize>,
    waiting: HashMap<K, VecDeque<T>>,
}

impl<K: Hash + Eq + Copy, T> Outbox<K, T> {
    /// An empty outbox with the two limits (each at least 1).
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            per_peer: per_peer.max(1),
            total: total.max(1),
            held: 0,
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// The total limit.
    pub fn limit(&self) -> usize {
        self.total
    }

    /// Offers an item for `peer`.
    pub fn admit(&mut self, peer: K, item: T) -> Admit<T> {
        if self.held >= self.total {
            return Admit::Full(item);
        }
        self.held += 1;
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
        self.held = self.held.saturating_sub(1);
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
        let items: Vec<T> = self
            .waiting
            .remove(&peer)
            .map(Vec::from)
            .unwrap_or_default();
        self.held = self.held.saturating_sub(items.len());
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_limit_queues_and_total_limit_refuses() {
        let mut o: Outbox<u8, u32> = Outbox::new(2, 4);
        assert_eq!(o.admit(1, 10), Admit::Send(10));
        assert_eq!(o.admit(1, 11), Admit::Send(11));
        assert_eq!(o.admit(1, 12), Admit::Queued);
        assert_eq!(o.admit(2, 20), Admit::Send(20));
        assert_eq!(o.admit(2, 21), Admit::Full(21), "4 held in all");
        // A finished request to peer 1 releases its queued item, in order.
        assert_eq!(o.finished(1), Some(12));
        assert_eq!(o.admit(2, 21), Admit::Send(21));
        assert_eq!(o.admit(2, 22), Admit::Full(22), "11, 12, 20, 21 held");
        assert_eq!(o.finished(1), None);
        assert_eq!(o.admit(2, 22), Admit::Queued, "peer 2 has 2 in flight");
    }

    #[test]
    fn a_disconnected_peer_gives_back_its_queue() {
        let mut o: Outbox<u8, u32> = Outbox::new(1, 10);
        assert_eq!(o.admit(1, 1), Admit::Send(1));
        assert_eq!(o.admit(1, 2), Admit::Queued);
        assert_eq!(o.admit(1, 3), Admit::Queued);
        assert_eq!(o.drain_waiting(1), vec![2, 3]);
        assert_eq!(o.finished(1), None);
        for i in 0..10 {
            assert!(!matches!(o.admit(2, i), Admit::Full(_)), "all room is back");
        }
    }
}
