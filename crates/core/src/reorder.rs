//! In-order delivery of a session's messages: messages may arrive in any order
//! inside the sequence window, but the agent sees them in send order.
//!
//! A message that arrives ahead of a gap waits until the gap fills, for at most
//! `max_wait_ms` (then the gap is skipped: the sender's copy was lost and a new
//! sequence number is used for any retry), and while the buffer holds at most
//! `capacity` messages and `max_bytes` bytes (beyond either, the oldest gap is
//! skipped at once). A message that arrives after its gap was
//! skipped is delivered at once, out of order: it was authenticated and its
//! sender told it was accepted, so it is never dropped. Apart from such late
//! arrivals the order of what is delivered never goes backwards.

use std::collections::{BTreeMap, BTreeSet};

/// Reorder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Longest a message waits for an earlier one, in ms (default 2,000).
    pub max_wait_ms: u64,
    /// Most messages held per session (default 1,024, the window size).
    pub capacity: usize,
    /// Most bytes held per session, counted as the caller sizes each message
    /// (default 4 MiB).
    pub max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_wait_ms: 2_000,
            capacity: 1024,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Holds out-of-order messages of one session until they can be delivered in order.
#[derive(Debug)]
pub struct Reorder<T> {
    config: Config,
    next: u64,
    /// Held messages by sequence number: (arrival, size, message).
    held: BTreeMap<u64, (u64, u64, T)>,
    /// The same messages by (arrival, sequence number), so that the earliest
    /// deadline is found in O(log n), not by a walk over every held message.
    by_arrival: BTreeSet<(u64, u64)>,
    held_bytes: u64,
}

impl<T> Reorder<T> {
    /// A buffer expecting sequence number 1 first.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            next: 1,
            held: BTreeMap::new(),
            by_arrival: BTreeSet::new(),
            held_bytes: 0,
        }
    }

    /// The next sequence number it waits for.
    pub fn next_expected(&self) -> u64 {
        self.next
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes held, as sized by the caller.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Takes an authenticated message of `bytes` bytes; returns what can be
    /// delivered now, in order. A number below the next expected one is
    /// returned at once: the replay window stops duplicates before this, so
    /// that only happens to a message that arrived after its gap was skipped.
    pub fn push(&mut self, now_ms: u64, seq: u64, item: T, bytes: u64) -> Vec<(u64, T)> {
        if seq < self.next {
            return vec![(seq, item)];
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.held.entry(seq) {
            e.insert((now_ms, bytes, item));
            self.by_arrival.insert((now_ms, seq));
            self.held_bytes = self.held_bytes.saturating_add(bytes);
        }
        let mut out = self.release();
        while self.held.len() > self.config.capacity.max(1)
            || (self.held_bytes > self.config.max_bytes && !self.held.is_empty())
        {
            out.extend(self.skip_gap());
        }
        out
    }

    /// Releases everything held, skipping every gap.
    pub fn flush(&mut self) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        while !self.held.is_empty() {
            out.extend(self.skip_gap());
        }
        out
    }

    /// Skips gaps while any held message has waited `max_wait_ms` or more;
    /// returns what that releases.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        while self
            .poll_timeout()
            .is_some_and(|deadline| now_ms >= deadline)
        {
            out.extend(self.skip_gap());
        }
        out
    }

    /// When [`Reorder::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.by_arrival
            .first()
            .map(|(arrived, _)| arrived.saturating_add(self.config.max_wait_ms))
    }

    fn release(&mut self) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        while let Some((seq, (arrived, bytes, item))) = self.held.remove_entry(&self.next) {
            self.by_arrival.remove(&(arrived, seq));
            self.held_bytes -= bytes;
            out.push((seq, item));
            self.next = seq.saturating_add(1);
        }
        out
    }

    /// Gives up on the first gap: jumps to the lowest held number and releases.
    fn skip_gap(&mut self) -> Vec<(u64, T)> {
        match self.held.keys().next() {
            Some(&first) => {
                self.next = first;
                self.release()
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seqs(v: Vec<(u64, u64)>) -> Vec<u64> {
        v.into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn in_order_passes_through_and_gaps_wait() {
        let mut r = Reorder::new(Config::default());
        assert_eq!(seqs(r.push(0, 1, 1, 1)), vec![1]);
        assert!(r.push(0, 3, 3, 1).is_empty());
        assert!(r.push(0, 4, 4, 1).is_empty());
        assert_eq!(seqs(r.push(0, 2, 2, 1)), vec![2, 3, 4]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_lost_message_is_skipped_after_the_wait() {
        let mut r = Reorder::new(Config::default());
        assert!(r.push(100, 2, 2, 1).is_empty());
        assert_eq!(r.poll_timeout(), Some(2_100));
        assert!(r.handle_timeout(2_099).is_empty());
        assert_eq!(seqs(r.handle_timeout(2_100)), vec![2]);
        // The lost one arriving late is delivered at once rather than dropped.
        assert_eq!(seqs(r.push(2_200, 1, 1, 1)), vec![1]);
    }

    #[test]
    fn the_wait_counts_from_the_oldest_arrival_not_the_lowest_number() {
        let mut r = Reorder::new(Config {
            max_wait_ms: 1_000,
            capacity: 10,
            ..Config::default()
        });
        assert!(r.push(0, 5, 5, 1).is_empty());
        assert!(r.push(900, 3, 3, 1).is_empty());
        assert!(r.handle_timeout(999).is_empty());
        // 5 has waited 1,000 ms (3 only 100): every gap before 5 is skipped.
        assert_eq!(seqs(r.handle_timeout(1_000)), vec![3, 5]);
        assert!(r.is_empty());
    }

    #[test]
    fn at_capacity_the_oldest_gap_is_skipped() {
        let mut r = Reorder::new(Config {
            max_wait_ms: 1_000,
            capacity: 2,
            ..Config::default()
        });
        assert!(r.push(0, 3, 3, 1).is_empty());
        assert!(r.push(0, 4, 4, 1).is_empty());
        assert_eq!(seqs(r.push(0, 6, 6, 1)), vec![3, 4]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn beyond_the_byte_bound_the_oldest_gap_is_skipped() {
        let mut r = Reorder::new(Config {
            max_bytes: 100,
            ..Config::default()
        });
        assert!(r.push(0, 3, 3, 60).is_empty());
        assert_eq!(r.held_bytes(), 60);
        // 60 + 50 > 100: the gap before 3 is skipped, releasing 3; 5 waits alone.
        assert_eq!(seqs(r.push(0, 5, 5, 50)), vec![3]);
        assert_eq!(r.held_bytes(), 50);
        // A message larger than the bound on its own is released at once.
        assert_eq!(seqs(r.push(0, 7, 7, 500)), vec![5, 7]);
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(seqs(r.push(0, 9, 9, 1)), Vec::<u64>::new());
        assert_eq!(seqs(r.flush()), vec![9]);
        assert!(r.is_empty() && r.held_bytes() == 0);
    }

    proptest! {
        /// Whatever the arrival order and capacity, everything is delivered exactly
        /// once, and only a message whose gap was skipped before it arrived comes
        /// out of order.
        #[test]
        fn delivery_is_complete_and_in_order_but_for_late_arrivals(
            order in Just((1u64..=200).collect::<Vec<_>>()).prop_shuffle(),
            capacity in 1usize..64,
        ) {
            let mut r = Reorder::new(Config { max_wait_ms: 10, capacity, ..Config::default() });
            let mut out = Vec::new();
            let mut late = Vec::new();
            for (t, s) in order.iter().enumerate() {
                let behind = *s < r.next_expected();
                let released = seqs(r.push(t as u64, *s, *s, 1));
                if behind {
                    prop_assert_eq!(&released, &vec![*s]);
                    late.push(*s);
                } else {
                    out.extend(released);
                }
                prop_assert!(r.len() <= capacity);
                // The arrival index agrees with a walk over what is held.
                let earliest = r.held.values().map(|(a, _, _)| a + 10).min();
                prop_assert_eq!(r.poll_timeout(), earliest);
                prop_assert_eq!(r.by_arrival.len(), r.held.len());
                if t % 7 == 6 {
                    // Now and then a timer, which skips gaps that waited long enough.
                    let now = t as u64;
                    out.extend(seqs(r.handle_timeout(now)));
                    prop_assert!(r.poll_timeout().is_none_or(|d| d > now));
                }
            }
            out.extend(seqs(r.handle_timeout(u64::MAX)));
            prop_assert!(out.windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<u64> = out.into_iter().chain(late).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (1..=200).collect::<Vec<_>>());
        }

        #[test]
        fn with_a_large_buffer_nothing_is_lost(
            order in Just((1u64..=100).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            let mut r = Reorder::new(Config::default());
            let mut out = Vec::new();
            for s in order {
                out.extend(seqs(r.push(0, s, s, 1)));
            }
            prop_assert_eq!(out, (1..=100).collect::<Vec<_>>());
        }
    }
}
