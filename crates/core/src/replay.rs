//! Replay protection: a timestamp tolerance and a bounded memory of recent nonces.
//!
//! An envelope is fresh when its timestamp is within `tolerance_ms` of the receiver's
//! clock and its `(sender, nonce)` pair has not been recorded within `window_ms`.
//!
//! The memory holds at most `capacity` nonces. When it is full, the oldest entry is
//! evicted and the guard raises a *floor*: from then on, any envelope stamped at or
//! before the evicted entry's timestamp is rejected, since its nonce can no longer be
//! checked. This fails closed — a full memory may refuse old-stamped messages, never
//! accept a replay — and heals by itself once the floor falls out of the tolerance.

use std::collections::{HashSet, VecDeque};

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
    /// Most nonces remembered at once (default 1,000,000, about 50 MB).
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

#[derive(Debug, Clone, Copy)]
struct Entry {
    arrived_ms: u64,
    timestamp_ms: u64,
    key: u128,
}

/// The nonce memory of one node. See the module docs for the rules.
#[derive(Debug)]
pub struct ReplayGuard {
    config: Config,
    seen: HashSet<u128>,
    order: VecDeque<Entry>,
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
            order: VecDeque::new(),
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

    /// Checks a timestamp against the tolerance and the floor.
    pub fn check_time(&self, now_ms: u64, timestamp_ms: u64) -> Result<(), Rejection> {
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
        if let Some(floor) = self.floor_ms
            && timestamp_ms <= floor
        {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                format!(
                    "nonce memory is full: messages stamped at or before {floor} ms can no longer be checked; resend with a fresh timestamp"
                ),
            ));
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
        self.expire(now_ms);
        self.check_time(now_ms, timestamp_ms)?;
        let key = key(sender, nonce);
        if self.seen.contains(&key) {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                "nonce already used by this sender",
            ));
        }
        while self.seen.len() >= self.config.capacity.max(1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.seen.remove(&old.key);
            self.floor_ms = Some(self.floor_ms.unwrap_or(0).max(old.timestamp_ms));
        }
        self.seen.insert(key);
        self.order.push_back(Entry {
            arrived_ms: now_ms,
            timestamp_ms,
            key,
        });
        Ok(())
    }

    /// Forgets nonces that arrived more than `window_ms` ago. Their replays are
    /// stale: a timestamp accepted then is outside the tolerance now, because the
    /// window is longer than twice the tolerance.
    fn expire(&mut self, now_ms: u64) {
        while let Some(front) = self.order.front() {
            if front.arrived_ms.saturating_add(self.config.window_ms) > now_ms {
                break;
            }
            self.seen.remove(&front.key);
            self.order.pop_front();
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
        assert!(g.check_time(T0, T0 - 60_000).is_ok());
        assert!(g.check_time(T0, T0 + 60_000).is_ok());
        for ts in [T0 - 61_000, T0 + 61_000] {
            let e = g.check_time(T0, ts).expect_err("outside tolerance");
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
        g.record(T0 + 299_999, &sender(2), &[6; 16], T0 + 299_999)
            .expect("other");
        assert_eq!(g.len(), 2);
        g.record(T0 + 300_000, &sender(3), &[7; 16], T0 + 300_000)
            .expect("other");
        assert_eq!(g.len(), 2, "the first nonce expired");
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
        // So is any new message stamped at or before the floor.
        assert!(g.record(T0 + 11, &sender(2), &[9; 16], T0).is_err());
        // Fresh messages keep flowing.
        g.record(T0 + 11, &sender(2), &[9; 16], T0 + 11)
            .expect("fresh");
        assert_eq!(g.len(), 3);
    }

    proptest! {
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
            }
        }
    }
}
