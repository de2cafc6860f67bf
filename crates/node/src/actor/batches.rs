//! Each peer's requests waiting for signature checks, and the batches of them
//! being checked: at most `max_running` batches of a peer at once, each of at
//! most `max_batch` requests; the rest wait in arrival order and go together in
//! the next batch. Pure state: the pipeline runs the batches.
//!
//! A peer's entry lives while it has requests waiting or batches running. Each
//! entry gets an epoch of its own, which its batches carry: a batch that ends
//! after its peer's entry was dropped (the peer disconnected) and made anew
//! (it connected again) does not free a slot of the new entry.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// One peer's entry.
struct Peer<T> {
    epoch: u64,
    running: usize,
    waiting: VecDeque<T>,
}

/// A batch handed out by [`Batches::take`]: its requests, and the epoch of
/// the entry it came from, to give to [`Batches::done`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Batch<T> {
    pub epoch: u64,
    pub items: Vec<T>,
}

/// Every peer's waiting requests and running batches.
pub(crate) struct Batches<K, T> {
    peers: HashMap<K, Peer<T>>,
    next_epoch: u64,
    max_running: usize,
    max_batch: usize,
}

impl<K: Eq + Hash + Copy, T> Batches<K, T> {
    /// At most `max_running` (at least 1) batches of a peer at once, each of
    /// at most `max_batch` (at least 1) requests.
    pub fn new(max_running: usize, max_batch: usize) -> Self {
        Self {
            peers: HashMap::new(),
            next_epoch: 0,
            max_running: max_running.max(1),
            max_batch: max_batch.max(1),
        }
    }

    /// `item` of `peer` waits for a batch.
    pub fn push(&mut self, peer: K, item: T) {
        let next_epoch = &mut self.next_epoch;
        self.peers
            .entry(peer)
            .or_insert_with(|| {
                *next_epoch += 1;
                Peer {
                    epoch: *next_epoch,
                    running: 0,
                    waiting: VecDeque::new(),
                }
            })
            .waiting
            .push_back(item);
    }

    /// The next batch of `peer`'s waiting requests, if it has any and a batch
    /// slot is free; the batch then runs until [`Batches::done`].
    pub fn take(&mut self, peer: K) -> Option<Batch<T>> {
        let p = self.peers.get_mut(&peer)?;
        if p.running >= self.max_running || p.waiting.is_empty() {
            return None;
        }
        p.running += 1;
        let n = p.waiting.len().min(self.max_batch);
        Some(Batch {
            epoch: p.epoch,
            items: p.waiting.drain(..n).collect(),
        })
    }

    /// A batch of `peer` from `epoch` ended: its slot is free if its entry
    /// still lives (and the entry goes if nothing else is left in it).
    /// Answers whether a slot was freed, so another batch may be taken.
    pub fn done(&mut self, peer: K, epoch: u64) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        if p.epoch != epoch {
            return false;
        }
        p.running = p.running.saturating_sub(1);
        if p.running == 0 && p.waiting.is_empty() {
            self.peers.remove(&peer);
        }
        true
    }

    /// `peer` is gone: its waiting requests are dropped, and its running
    /// batches no longer count.
    pub fn gone(&mut self, peer: &K) {
        self.peers.remove(peer);
    }

    /// Batches of `peer` running.
    #[cfg(test)]
    fn running(&self, peer: &K) -> usize {
        self.peers.get(peer).map_or(0, |p| p.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items<K: Eq + Hash + Copy>(b: &mut Batches<K, u32>, peer: K) -> Option<Vec<u32>> {
        b.take(peer).map(|b| b.items)
    }

    #[test]
    fn a_peer_runs_at_most_its_slots_and_the_rest_wait_to_go_together() {
        let mut b = Batches::new(2, 3);
        for i in 0..8 {
            b.push('a', i);
        }
        let first = b.take('a').expect("a slot");
        assert_eq!(first.items, [0, 1, 2]);
        assert_eq!(items(&mut b, 'a'), Some(vec![3, 4, 5]));
        assert_eq!(b.take('a'), None, "both slots busy");
        // Another peer is not held up.
        b.push('b', 9);
        assert_eq!(items(&mut b, 'b'), Some(vec![9]));
        assert!(b.done('a', first.epoch));
        assert_eq!(items(&mut b, 'a'), Some(vec![6, 7]));
        assert_eq!(b.take('a'), None, "nothing waits");
    }

    #[test]
    fn an_entry_goes_once_nothing_waits_or_runs() {
        let mut b = Batches::new(1, 10);
        b.push('a', 1);
        let batch = b.take('a').expect("a slot");
        assert_eq!(b.running(&'a'), 1);
        assert!(b.done('a', batch.epoch));
        assert!(b.peers.is_empty());
        assert!(!b.done('a', batch.epoch), "already gone");
    }

    #[test]
    fn a_batch_of_a_gone_entry_does_not_free_a_slot_of_the_new_one() {
        let mut b = Batches::new(2, 1);
        b.push('a', 1);
        let old = b.take('a').expect("a slot");
        // Disconnected, then connected again with requests of its own.
        b.gone(&'a');
        for i in 2..5 {
            b.push('a', i);
        }
        let new = b.take('a').expect("a slot");
        assert_eq!(items(&mut b, 'a'), Some(vec![3]));
        assert_eq!(b.running(&'a'), 2);
        // The old batch ends: the new entry's slots stay taken.
        assert!(!b.done('a', old.epoch));
        assert_eq!(b.running(&'a'), 2);
        assert_eq!(b.take('a'), None, "still at most two at once");
        assert!(b.done('a', new.epoch));
        assert_eq!(items(&mut b, 'a'), Some(vec![4]));
    }

    #[test]
    fn gone_drops_what_waits() {
        let mut b = Batches::new(1, 10);
        b.push('a', 1);
        b.gone(&'a');
        assert_eq!(b.take('a'), None);
    }
}
