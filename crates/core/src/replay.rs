//! Replay protection: a timestamp tolerance and a bounded memory of recent nonces.
//!
//! An envelope is fresh when its timestamp is within `tolerance_ms` of the receiver's
//! clock and its `(sender, nonce)` pair has not been recorded within `window_ms`.
//!
//! The memory holds at most `capacity` nonces, each sender's in its own queue.
//! When it is full, the oldest nonce of the sender that holds the most is
//! evicted, and if it was still within the window, *that sender's* floor rises
//! to its timestamp: from then on, any envelope from that sender stamped at or
//! before its floor is refused, since its nonce can no longer be checked. This
//! fails closed (a full memory may refuse a sender's old-stamped messages, never
//! accept a replay), heals by itself once the floor falls out of the tolerance,
//! and the sender flooding the memory is the one whose messages it refuses: one
//! sender stamping its envelopes ahead cannot push the floor above everyone
//! else's clocks. Only if more senders keep a floor (holding no nonce) than the
//! memory has room for nonces (and at least 1,024) does the oldest such floor
//! become one shared by all senders; with each sender bound to a connection,
//! that takes more identities than any one host gets connections.
//!
//! A nonce is forgotten once its window has passed: when its sender records
//! another, or when its place is needed.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use sha2::{Digest, Sha256};

use crate::envelope::Nonce;
use crate::error::{ErrorCode, Rejection};
use crate::identity::EntityId;

/// Replay protection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How far a timestamp may be from the receiver's clock, either way (default 60 s).
    pub tolerance_ms: u64,
    /// How long a nonce is remembered after it arrives (default 5 min).
    pub window_ms: u64,
    /// Most nonces remembered at once (default 1,000,000, about 80 MB when full).
    pub capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tolerance_ms: 60_000,
            window_ms: 300_000,
            capacity: 1_000_000,
        }
    }
}

/// Senders kept for their floors alone, at least, before the oldest floor
/// becomes shared (with a small memory, a few senders must not make it so).
const MIN_FLOORS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u128,
    arrived_ms: u64,
    timestamp_ms: u64,
}

/// One sender's nonces, oldest first, and its floor.
#[derive(Debug, Default)]
struct Sender {
    held: VecDeque<Entry>,
    /// Envelopes from this sender stamped at or before it are refused.
    floor_ms: Option<u64>,
    /// When the floor last rose (the receiver's clock).
    floor_set_ms: u64,
}

/// The nonce memory of one node. See the module docs for the rules.
#[derive(Debug)]
pub struct ReplayGuard {
    config: Config,
    seen: HashSet<u128>,
    senders: HashMap<EntityId, Sender>,
    /// Senders holding nonces, by how many: the last holds the most.
    by_count: BTreeSet<(usize, EntityId)>,
    /// Senders holding nonces, by when their oldest arrived: the first holds
    /// the oldest.
    by_oldest: BTreeSet<(u64, EntityId)>,
    /// Senders that hold no nonce but keep a floor, with when it was set,
    /// oldest first (lazily: one that holds nonces again, or whose floor moved,
    /// is skipped).
    floor_only: VecDeque<(u64, EntityId)>,
    /// The floor shared by every sender, raised only when floors outnumber the
    /// memory's room (see the module docs).
    floor_ms: Option<u64>,
    /// Envelopes stamped before this were sent before the memory began.
    started_ms: u64,
}

/// The memory key of a `(sender, nonce)` pair: the first 128 bits of
/// SHA-256(sender_id ‖ nonce). A replay always maps to the same key; two different
/// pairs collide only by finding a SHA-256 collision, and an honest sender's random
/// nonce is unknown to everyone else until it is sent.
fn key(sender: &EntityId, nonce: &Nonce) -> u128 {
    let digest = Sha256::new()
        .chain_update(sender.0)
        .chain_update(nonce)
        .finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(k)
}

/// Checks that `timestamp_ms` is within `tolerance_ms` of `now_ms`, either way.
/// Stateless and cheap: run it before verifying a signature.
pub fn check_tolerance(tolerance_ms: u64, now_ms: u64, timestamp_ms: u64) -> Result<(), Rejection> {
    if timestamp_ms.saturating_add(tolerance_ms) < now_ms {
        return Err(Rejection::new(
            ErrorCode::ReplayDetected,
            format!(
                "timestamp is {} ms old; the tolerance is {tolerance_ms} ms",
                now_ms - timestamp_ms
            ),
        ));
    }
    if timestamp_ms > now_ms.saturating_add(tolerance_ms) {
        return Err(Rejection::new(
            ErrorCode::ReplayDetected,
            format!(
                "timestamp is {} ms in the future; the tolerance is {tolerance_ms} ms",
                timestamp_ms - now_ms
            ),
        ));
    }
    Ok(())
}

fn full(floor: u64) -> Rejection {
    Rejection::new(
        ErrorCode::ReplayDetected,
        format!(
            "nonce memory is full: messages stamped at or before {floor} ms can no longer be checked; resend with a fresh timestamp"
        ),
    )
}

impl ReplayGuard {
    /// An empty memory that knows nothing of what came before it: use it only
    /// where no message from before can arrive (tests, tools). A node uses
    /// [`ReplayGuard::started_at`].
    pub fn new(config: Config) -> Self {
        Self::started_at(config, 0)
    }

    /// An empty memory started at `started_ms` (the receiver's clock): nonces of
    /// envelopes stamped before then were never recorded here (they arrived
    /// before a restart, say), so such envelopes are refused. A node restarted
    /// within the tolerance therefore refuses a replay of what it accepted
    /// before, without keeping its memory on disk. Until the tolerance has
    /// passed, a peer whose clock is behind the receiver's is refused too; it
    /// can send again with a fresh timestamp.
    pub fn started_at(config: Config, started_ms: u64) -> Self {
        Self {
            config,
            seen: HashSet::new(),
            senders: HashMap::new(),
            by_count: BTreeSet::new(),
            by_oldest: BTreeSet::new(),
            floor_only: VecDeque::new(),
            floor_ms: None,
            started_ms,
        }
    }

    /// Number of nonces currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Checks a timestamp from `sender` against the tolerance, the start, the
    /// shared floor and the sender's own floor.
    pub fn check_time(
        &self,
        now_ms: u64,
        sender: &EntityId,
        timestamp_ms: u64,
    ) -> Result<(), Rejection> {
        check_tolerance(self.config.tolerance_ms, now_ms, timestamp_ms)?;
        if timestamp_ms < self.started_ms {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                format!(
                    "stamped {} ms before this node's nonce memory began (it restarted); resend with a fresh timestamp",
                    self.started_ms - timestamp_ms
                ),
            ));
        }
        let own = self.senders.get(sender).and_then(|s| s.floor_ms);
        if let Some(floor) = own.into_iter().chain(self.floor_ms).max()
            && timestamp_ms <= floor
        {
            return Err(full(floor));
        }
        Ok(())
    }

    /// Checks freshness and records the nonce. Call only for an authenticated
    /// envelope, so nobody can fill the memory with other senders' nonces.
    pub fn record(
        &mut self,
        now_ms: u64,
        sender: &EntityId,
        nonce: &Nonce,
        timestamp_ms: u64,
    ) -> Result<(), Rejection> {
        self.forget_stale_floors(now_ms);
        self.expire(now_ms, sender);
        self.check_time(now_ms, sender, timestamp_ms)?;
        let key = key(sender, nonce);
        if self.seen.contains(&key) {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                "nonce already used by this sender",
            ));
        }
        // Forget a little of what others hold past its window, so that the
        // memory shrinks when traffic does.
        for _ in 0..2 {
            match self.by_oldest.first() {
                Some(&(arrived, id)) if self.is_expired(now_ms, arrived) => {
                    self.pop_front(now_ms, id)
                }
                _ => break,
            }
        }
        self.seen.insert(key);
        let s = self.senders.entry(*sender).or_default();
        let before = s.held.len();
        s.held.push_back(Entry {
            key,
            arrived_ms: now_ms,
            timestamp_ms,
        });
        if before == 0 {
            self.by_oldest.insert((now_ms, *sender));
        }
        self.by_count.remove(&(before, *sender));
        self.by_count.insert((before + 1, *sender));
        // Over the bound: evict (possibly this very nonce, if its sender holds
        // the most: its floor then refuses any replay of it).
        while self.seen.len() > self.config.capacity.max(1) {
            if !self.evict_one(now_ms) {
                break;
            }
        }
        Ok(())
    }

    /// Whether a nonce that arrived at `arrived_ms` is past its window: its
    /// replays are stale (a timestamp accepted then is outside the tolerance
    /// now, because the window is longer than twice the tolerance).
    fn is_expired(&self, now_ms: u64, arrived_ms: u64) -> bool {
        arrived_ms.saturating_add(self.config.window_ms) <= now_ms
    }

    /// Forgets `sender`'s nonces that are past their window.
    fn expire(&mut self, now_ms: u64, sender: &EntityId) {
        while let Some(front) = self.senders.get(sender).and_then(|s| s.held.front()) {
            if !self.is_expired(now_ms, front.arrived_ms) {
                break;
            }
            self.pop_front(now_ms, *sender);
        }
    }

    /// Makes room for one nonce: the oldest one past its window, if any (no
    /// floor rises); else the oldest nonce of the sender holding the most,
    /// whose floor rises to its timestamp. `false` if nothing is held.
    fn evict_one(&mut self, now_ms: u64) -> bool {
        let victim = match self.by_oldest.first() {
            Some(&(arrived, id)) if self.is_expired(now_ms, arrived) => id,
            _ => match self.by_count.last() {
                Some(&(_, id)) => id,
                None => return false,
            },
        };
        self.pop_front(now_ms, victim);
        true
    }

    /// Removes `id`'s oldest nonce; if it was still within its window, `id`'s
    /// floor rises to its timestamp.
    fn pop_front(&mut self, now_ms: u64, id: EntityId) {
        let window_open = |arrived: u64| arrived.saturating_add(self.config.window_ms) > now_ms;
        let Some(s) = self.senders.get_mut(&id) else {
            return;
        };
        let count = s.held.len();
        let Some(old) = s.held.pop_front() else {
            return;
        };
        if window_open(old.arrived_ms) {
            s.floor_ms = Some(s.floor_ms.unwrap_or(0).max(old.timestamp_ms));
            s.floor_set_ms = now_ms;
        }
        let next = s.held.front().map(|e| e.arrived_ms);
        self.seen.remove(&old.key);
        self.by_oldest.remove(&(old.arrived_ms, id));
        self.by_count.remove(&(count, id));
        match next {
            Some(arrived) => {
                self.by_oldest.insert((arrived, id));
                self.by_count.insert((count - 1, id));
            }
            None => self.left_empty(now_ms, id),
        }
    }

    /// `sender` holds no nonce any more: it is forgotten, or kept for its floor.
    fn left_empty(&mut self, now_ms: u64, sender: EntityId) {
        let keeps_floor = self
            .senders
            .get(&sender)
            .and_then(|s| s.floor_ms)
            .is_some_and(|f| !self.is_stale(now_ms, f));
        if !keeps_floor {
            self.senders.remove(&sender);
            return;
        }
        let set = self.senders.get(&sender).map_or(now_ms, |s| s.floor_set_ms);
        self.floor_only.push_back((set, sender));
        // More senders kept for their floors than the memory has room for
        // nonces (at least MIN_FLOORS): the oldest floor becomes shared.
        while self.floor_only.len() > self.config.capacity.max(MIN_FLOORS) {
            let Some((set, id)) = self.floor_only.pop_front() else {
                break;
            };
            if let Some(s) = self.senders.get(&id)
                && s.held.is_empty()
                && s.floor_set_ms == set
            {
                let floor = s.floor_ms.unwrap_or(0);
                self.floor_ms = Some(self.floor_ms.unwrap_or(0).max(floor));
                self.senders.remove(&id);
            }
        }
    }

    /// Whether a floor no longer refuses anything the tolerance lets through.
    fn is_stale(&self, now_ms: u64, floor_ms: u64) -> bool {
        floor_ms.saturating_add(self.config.tolerance_ms) < now_ms
    }

    /// Drops the senders kept only for floors that are stale by now.
    fn forget_stale_floors(&mut self, now_ms: u64) {
        while let Some(&(set, id)) = self.floor_only.front() {
            // A floor is at most the tolerance ahead of when it was set.
            if set.saturating_add(2 * self.config.tolerance_ms) >= now_ms {
                break;
            }
            self.floor_only.pop_front();
            if self
                .senders
                .get(&id)
                .is_some_and(|s| s.held.is_empty() && s.floor_set_ms == set)
            {
                self.senders.remove(&id);
            }
        }
    }
}

#[cfg(test)]
impl ReplayGuard {
    /// Panics unless the indexes agree with the senders' queues.
    fn assert_consistent(&self) {
        let held: usize = self.senders.values().map(|s| s.held.len()).sum();
        assert_eq!(held, self.seen.len());
        let holding = self.senders.values().filter(|s| !s.held.is_empty()).count();
        assert_eq!(self.by_count.len(), holding);
        assert_eq!(self.by_oldest.len(), holding);
        for (id, s) in &self.senders {
            if let Some(front) = s.held.front() {
                assert!(self.by_count.contains(&(s.held.len(), *id)));
                assert!(self.by_oldest.contains(&(front.arrived_ms, *id)));
            } else {
                assert!(
                    s.floor_ms.is_some(),
                    "an empty sender is kept for its floor only"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_800_000_000_000;

    fn guard(capacity: usize) -> ReplayGuard {
        ReplayGuard::new(Config {
            capacity,
            ..Config::default()
        })
    }

    fn sender(b: u8) -> EntityId {
        EntityId([b; 32])
    }

    #[test]
    fn timestamps_61_s_off_either_way_are_rejected_60_s_accepted() {
        let g = guard(10);
        assert!(g.check_time(T0, &sender(1), T0 - 60_000).is_ok());
        assert!(g.check_time(T0, &sender(1), T0 + 60_000).is_ok());
        for ts in [T0 - 61_000, T0 + 61_000] {
            let e = g
                .check_time(T0, &sender(1), ts)
                .expect_err("outside tolerance");
            assert_eq!(e.code, ErrorCode::ReplayDetected);
        }
    }

    #[test]
    fn a_reused_nonce_is_a_replay_from_the_same_sender_only() {
        let mut g = guard(10);
        g.record(T0, &sender(1), &[5; 16], T0).expect("first");
        let e = g
            .record(T0 + 1, &sender(1), &[5; 16], T0)
            .expect_err("replay");
        assert_eq!(e.code, ErrorCode::ReplayDetected);
        g.record(T0 + 2, &sender(2), &[5; 16], T0)
            .expect("other sender");
    }

    #[test]
    fn nonces_are_remembered_for_the_window_then_forgotten() {
        let mut g = guard(10);
        g.record(T0, &sender(1), &[5; 16], T0).expect("first");
        // Within the window the same nonce is a replay, whatever its stamp.
        let late = T0 + 299_999;
        assert!(g.record(late, &sender(1), &[5; 16], late).is_err());
        assert_eq!(g.len(), 1);
        // After it, the nonce is forgotten (a replay of the first would be stale).
        let after = T0 + 300_000;
        g.record(after, &sender(1), &[5; 16], after)
            .expect("forgotten");
        assert_eq!(g.len(), 1, "the first nonce expired");
    }

    #[test]
    fn envelopes_stamped_before_the_memory_began_are_refused() {
        let mut g = ReplayGuard::started_at(Config::default(), T0);
        // Stamped before the start: its nonce may have been seen by the
        // memory's predecessor, so it cannot be checked.
        let e = g
            .record(T0 + 10, &sender(1), &[1; 16], T0 - 1)
            .expect_err("before the start");
        assert_eq!(e.code, ErrorCode::ReplayDetected);
        assert!(e.reason.contains("restarted"), "{}", e.reason);
        g.record(T0 + 10, &sender(1), &[1; 16], T0)
            .expect("stamped at the start");
        g.record(T0 + 10, &sender(1), &[2; 16], T0 + 5)
            .expect("after it");
    }

    #[test]
    fn at_capacity_old_stamps_are_refused_and_fresh_ones_accepted() {
        let mut g = guard(3);
        for i in 0..3u8 {
            let ts = T0 + u64::from(i);
            g.record(T0 + 10, &sender(1), &[i; 16], ts).expect("fits");
        }
        // A fourth evicts the oldest (stamped T0) and raises the floor to T0.
        g.record(T0 + 10, &sender(1), &[3; 16], T0 + 3)
            .expect("evicts");
        assert_eq!(g.len(), 3);
        // The evicted nonce's replay is still caught, by the floor.
        let e = g
            .record(T0 + 11, &sender(1), &[0; 16], T0)
            .expect_err("replay");
        assert_eq!(e.code, ErrorCode::ReplayDetected);
        // So is any new message of that sender stamped at or before it.
        assert!(g.record(T0 + 11, &sender(1), &[9; 16], T0).is_err());
        // Fresh messages keep flowing.
        g.record(T0 + 11, &sender(1), &[9; 16], T0 + 11)
            .expect("fresh");
        assert_eq!(g.len(), 3);
    }

    #[test]
    fn the_sender_that_fills_the_memory_is_the_one_whose_floor_rises() {
        let mut g = guard(100);
        let honest = sender(1);
        g.record(T0, &honest, &[0; 16], T0).expect("honest");
        // A flood stamped 50 s ahead fills the memory and keeps evicting.
        for i in 0..1000u16 {
            let nonce = [i.to_be_bytes(), [7; 2]].concat();
            let mut n = [0u8; 16];
            n[..4].copy_from_slice(&nonce);
            g.record(T0 + 1, &sender(2), &n, T0 + 50_000).ok();
        }
        assert!(g.len() <= 100);
        // The flooder's floor is ahead of every honest clock; the honest
        // sender's is untouched: its messages stamped now still pass.
        g.record(T0 + 2, &honest, &[1; 16], T0 + 2)
            .expect("the honest sender is not locked out");
        let e = g
            .record(T0 + 2, &sender(2), &[9; 16], T0 + 2)
            .expect_err("the flooder is");
        assert!(e.reason.contains("nonce memory is full"), "{}", e.reason);
        // Nonces past their window make room without raising any floor.
        let later = T0 + 400_000;
        for i in 0..98u8 {
            g.record(later, &sender(3), &[i; 16], later).expect("fresh");
        }
        g.record(later, &honest, &[2; 16], later - 1)
            .expect("no floor from expired nonces");
    }

    proptest! {
        /// However other senders fill the memory (any stamps within the
        /// tolerance), an honest sender stamping its messages with the receiver's
        /// clock (a later millisecond each time) and fresh nonces is never
        /// refused: a floor only rises for the sender whose nonce is evicted, to
        /// that nonce's stamp, and the honest sender's are all older than its next.
        #[test]
        fn other_senders_cannot_lock_out_an_honest_one(
            capacity in 1usize..16,
            steps in proptest::collection::vec((1u8..4, 0u64..120_000, 1u64..5_000, any::<bool>()), 1..400),
        ) {
            let mut g = guard(capacity);
            let mut now = T0;
            let honest = sender(0);
            for (n, (s, skew, step, honest_turn)) in steps.into_iter().enumerate() {
                now += step;
                let mut nonce = [0u8; 16];
                nonce[..8].copy_from_slice(&(n as u64).to_be_bytes());
                if honest_turn {
                    prop_assert!(g.record(now, &honest, &nonce, now).is_ok());
                } else {
                    g.record(now, &sender(s), &nonce, now + 60_000 - skew).ok();
                }
                g.assert_consistent();
            }
        }

        /// Whatever the capacity and arrival pattern, no signed message (sender,
        /// nonce, timestamp) is ever accepted twice.
        #[test]
        fn never_accepts_the_same_message_twice(
            capacity in 1usize..8,
            steps in proptest::collection::vec(
                (any::<bool>(), 0u8..3, any::<u8>(), 0u64..120_000, 0u64..20_000, any::<prop::sample::Index>()),
                1..300,
            ),
        ) {
            let mut g = guard(capacity);
            let mut now = T0;
            let mut sent: Vec<(u8, u8, u64)> = Vec::new();
            let mut accepted = std::collections::HashSet::new();
            for (replay, s, n, skew, step, pick) in steps {
                now += step;
                let msg = if replay && !sent.is_empty() {
                    sent[pick.index(sent.len())]
                } else {
                    let m = (s, n, now + 60_000 - skew);
                    sent.push(m);
                    m
                };
                if g.record(now, &sender(msg.0), &[msg.1; 16], msg.2).is_ok() {
                    prop_assert!(accepted.insert(msg), "accepted twice: {:?}", msg);
                }
                prop_assert!(g.len() <= capacity);
                g.assert_consistent();
            }
        }
    }
}
