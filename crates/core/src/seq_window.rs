//! RFC 6479 sliding anti-replay window for session sequence numbers.
//!
//! Each session keeps one [`Window`] per direction. Sequence numbers start at 1; the
//! window remembers the highest number received and which of the `bits` numbers up to
//! and including it have been seen:
//!
//! | `seq`                                       | result                        |
//! |---------------------------------------------|-------------------------------|
//! | `0`                                         | `SEQUENCE_ERROR`              |
//! | `> highest`                                 | accepted (slides the window)  |
//! | `<= highest - bits` (behind the window)     | `SEQUENCE_ERROR`              |
//! | inside the window, already seen             | `REPLAY_DETECTED`             |
//! | inside the window, not seen                 | accepted (reordering is fine) |
//!
//! Any forward jump is accepted, however large: it only slides the window, and every
//! number the jump leaves behind is refused from then on. This is safe because the
//! window is updated only after the message authenticated, so only the peer holding
//! the session keys can move it, and a peer that skips ahead only loses its own
//! in-flight messages.
//!
//! The order of operations is the one RFC 6479 prescribes: [`Window::check`] (cheap,
//! read-only) before the expensive authentication or decryption, then
//! [`Window::update`] once the message proved genuine. A forged message must never
//! reach `update`, or it could slide the window and make the genuine traffic look old.
//!
//! The bitmap is a ring of `bits / 64 + 1` `u64` blocks indexed by `seq / 64`; the
//! spare block lets the window slide by whole blocks, so each check and update is
//! O(1) (a jump clears at most the whole ring once). No arithmetic here can overflow,
//! up to and including `seq == u64::MAX`.

use crate::error::{ErrorCode, Rejection};

/// A window size outside the allowed range: [`Window::new`] takes a power of two
/// from [`Window::MIN_BITS`] to [`Window::MAX_BITS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a sequence window is a power of two from 1024 to 1048576 bits, got {0}")]
pub struct SizeError(pub usize);

/// The anti-replay window of one session direction. See the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Window size in sequence numbers (a power of two).
    bits: u64,
    /// Highest sequence number recorded; 0 before the first.
    highest: u64,
    /// Ring of `bits / 64 + 1` blocks; block `seq / 64` lives at index
    /// `(seq / 64) % blocks.len()`, bit `seq % 64`.
    blocks: Box<[u64]>,
}

impl Window {
    /// Default window size, in sequence numbers.
    pub const DEFAULT_BITS: usize = 1024;
    /// Smallest allowed window size.
    pub const MIN_BITS: usize = 1024;
    /// Largest allowed window size (128 KiB of bitmap per window).
    pub const MAX_BITS: usize = 1 << 20;

    /// An empty window tracking the last `bits` sequence numbers.
    ///
    /// Errors if `bits` is not a power of two from [`Self::MIN_BITS`] to
    /// [`Self::MAX_BITS`]; the size comes from local configuration, never from a peer.
    pub fn new(bits: usize) -> Result<Self, SizeError> {
        if !bits.is_power_of_two() || !(Self::MIN_BITS..=Self::MAX_BITS).contains(&bits) {
            return Err(SizeError(bits));
        }
        Ok(Self::empty(bits))
    }

    /// An empty window of `bits`, already validated.
    fn empty(bits: usize) -> Self {
        Self {
            bits: bits as u64,
            highest: 0,
            blocks: vec![0; bits / 64 + 1].into_boxed_slice(),
        }
    }

    /// The window size, in sequence numbers.
    pub fn bits(&self) -> usize {
        // Lossless: `new` only accepts sizes that came from a `usize`.
        self.bits as usize
    }

    /// The highest sequence number recorded so far; 0 before the first.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Checks `seq` without recording it. Call before authenticating or decrypting
    /// the message, then [`Self::update`] once it proved genuine.
    ///
    /// Errors: `SEQUENCE_ERROR` for 0 or a number behind the window
    /// (`seq <= highest - bits`); `REPLAY_DETECTED` for a number already recorded.
    pub fn check(&self, seq: u64) -> Result<(), Rejection> {
        if seq == 0 {
            return Err(Rejection::new(
                ErrorCode::SequenceError,
                "sequence number 0 is not valid; sequence numbers start at 1",
            ));
        }
        if seq > self.highest {
            return Ok(());
        }
        if self.highest - seq >= self.bits {
            return Err(Rejection::new(
                ErrorCode::SequenceError,
                format!(
                    "sequence number {seq} is behind the window (highest {}, window {} numbers)",
                    self.highest, self.bits
                ),
            ));
        }
        let (index, mask) = self.slot(seq);
        if self.blocks[index] & mask != 0 {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                format!("sequence number {seq} was already received"),
            ));
        }
        Ok(())
    }

    /// Records `seq` as received, sliding the window forward if it is the new highest.
    ///
    /// Call only after [`Self::check`] passed **and** the message authenticated
    /// (signature verified, payload decrypted): recording a forged number could slide
    /// the window past genuine traffic. A number `check` would refuse (0, behind the
    /// window, already seen) is ignored, so `update` never weakens the window.
    pub fn update(&mut self, seq: u64) {
        if seq == 0 {
            return;
        }
        if seq > self.highest {
            let len = self.blocks.len() as u64;
            let old_block = self.highest / 64;
            let new_block = seq / 64;
            // Clear the blocks the window slides into; past a full turn of the ring
            // every block is stale, so stop there.
            let fresh = (new_block - old_block).min(len);
            for i in 1..=fresh {
                let index = (old_block + i) % len;
                self.blocks[index as usize] = 0;
            }
            self.highest = seq;
        } else if self.highest - seq >= self.bits {
            return;
        }
        let (index, mask) = self.slot(seq);
        self.blocks[index] |= mask;
    }

    /// [`Self::check`], then [`Self::update`] if it passed. Only for a message that
    /// is already authenticated; otherwise call the two separately around the
    /// authentication.
    pub fn check_and_update(&mut self, seq: u64) -> Result<(), Rejection> {
        self.check(seq)?;
        self.update(seq);
        Ok(())
    }

    /// The ring index and bit mask of `seq`.
    fn slot(&self, seq: u64) -> (usize, u64) {
        // The index is below `blocks.len()`, itself a `usize`.
        let index = ((seq / 64) % self.blocks.len() as u64) as usize;
        (index, 1 << (seq % 64))
    }
}

impl Default for Window {
    /// A window of [`Window::DEFAULT_BITS`] sequence numbers.
    fn default() -> Self {
        Self::empty(Self::DEFAULT_BITS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn window(bits: usize) -> Window {
        Window::new(bits).expect("valid size")
    }

    fn code(w: &Window, seq: u64) -> Option<ErrorCode> {
        w.check(seq).err().map(|r| r.code)
    }

    #[test]
    fn default_is_1024_and_equals_new_1024() {
        let w = Window::default();
        assert_eq!(w.bits(), 1024);
        assert_eq!(w.highest(), 0);
        assert_eq!(w, window(1024));
    }

    #[test]
    fn sizes_must_be_powers_of_two_in_range() {
        for bad in [
            0,
            1,
            64,
            512,
            1000,
            1025,
            1536,
            3000,
            Window::MAX_BITS * 2,
            usize::MAX,
        ] {
            assert_eq!(Window::new(bad), Err(SizeError(bad)), "{bad}");
        }
        for good in [1024, 2048, 4096, 1 << 16, Window::MAX_BITS] {
            assert_eq!(window(good).bits(), good);
        }
        let msg = SizeError(3).to_string();
        assert!(msg.contains(&format!(
            "from {} to {} bits",
            Window::MIN_BITS,
            Window::MAX_BITS
        )));
    }

    #[test]
    fn zero_is_a_sequence_error_always() {
        let mut w = window(1024);
        assert_eq!(code(&w, 0), Some(ErrorCode::SequenceError));
        w.update(0);
        assert_eq!(w, window(1024), "update(0) is ignored");
        w.check_and_update(5).expect("fresh");
        assert_eq!(code(&w, 0), Some(ErrorCode::SequenceError));
        assert!(w.check_and_update(0).is_err());
    }

    #[test]
    fn first_packet_is_accepted_whatever_its_number() {
        for first in [1, 2, 1023, 1024, 1025, 1 << 40, u64::MAX] {
            let mut w = window(1024);
            w.check_and_update(first).expect("first");
            assert_eq!(w.highest(), first);
            assert_eq!(code(&w, first), Some(ErrorCode::ReplayDetected));
        }
    }

    #[test]
    fn check_alone_records_nothing() {
        let mut w = window(1024);
        w.check(7).expect("fresh");
        w.check(7).expect("still fresh: check does not record");
        w.update(7);
        assert_eq!(code(&w, 7), Some(ErrorCode::ReplayDetected));
    }

    #[test]
    fn early_numbers_below_the_window_size_are_all_in_the_window() {
        let mut w = window(1024);
        w.check_and_update(1000).expect("fresh");
        for seq in 1..1000 {
            w.check_and_update(seq).expect("in window, unseen");
        }
        for seq in 1..=1000 {
            assert_eq!(code(&w, seq), Some(ErrorCode::ReplayDetected));
        }
    }

    #[test]
    fn exactly_window_size_behind_is_refused_one_less_accepted() {
        for bits in [1024usize, 4096] {
            let b = bits as u64;
            let mut w = window(bits);
            w.check_and_update(10_000).expect("fresh");
            // Oldest number still inside: highest - bits + 1.
            w.check(10_000 - b + 1).expect("inside");
            // Exactly `bits` behind, and one more: outside.
            assert_eq!(code(&w, 10_000 - b), Some(ErrorCode::SequenceError));
            assert_eq!(code(&w, 10_000 - b - 1), Some(ErrorCode::SequenceError));
            // An update with an outside number is ignored.
            let before = w.clone();
            w.update(10_000 - b);
            assert_eq!(w, before);
            // Accept the oldest, then sliding by one pushes it out.
            w.check_and_update(10_000 - b + 1).expect("inside");
            assert_eq!(code(&w, 10_000 - b + 1), Some(ErrorCode::ReplayDetected));
            w.check_and_update(10_001).expect("fresh");
            assert_eq!(code(&w, 10_000 - b + 1), Some(ErrorCode::SequenceError));
        }
    }

    #[test]
    fn reordering_inside_the_window_is_accepted_once() {
        let mut w = window(1024);
        for seq in (1..=1024).rev() {
            w.check_and_update(seq).expect("unseen, in window");
        }
        for seq in 1..=1024 {
            assert_eq!(code(&w, seq), Some(ErrorCode::ReplayDetected));
        }
    }

    #[test]
    fn jumps_clear_stale_bits_of_the_ring() {
        // Block count is 17 for 1024 bits; jumps around multiples of 64 and of the
        // ring's span (17 * 64 = 1088) are where stale bits would show.
        let jumps = [
            1,
            63,
            64,
            65,
            960,
            1023,
            1024,
            1025,
            1087,
            1088,
            1089,
            2176,
            10_000,
            1 << 40,
        ];
        for jump in jumps {
            let mut w = window(1024);
            for seq in 1..=3000 {
                w.check_and_update(seq).expect("dense fill");
            }
            let top = 3000 + jump;
            w.check_and_update(top).expect("jump ahead");
            assert_eq!(w.highest(), top);
            for seq in top - 1023..top {
                let expected = (seq > 3000).then_some(()).ok_or(ErrorCode::ReplayDetected);
                assert_eq!(
                    w.check(seq).map_err(|r| r.code),
                    expected,
                    "jump {jump}, seq {seq}"
                );
            }
            assert_eq!(code(&w, top - 1024), Some(ErrorCode::SequenceError));
        }
    }

    #[test]
    fn huge_jump_to_the_top_of_u64_does_not_overflow() {
        let mut w = window(1024);
        w.check_and_update(1).expect("fresh");
        w.check_and_update(u64::MAX - 5)
            .expect("any forward jump is fine");
        assert_eq!(code(&w, 1), Some(ErrorCode::SequenceError));
        w.check_and_update(u64::MAX).expect("fresh");
        assert_eq!(w.highest(), u64::MAX);
        assert_eq!(code(&w, u64::MAX), Some(ErrorCode::ReplayDetected));
        assert_eq!(code(&w, u64::MAX - 5), Some(ErrorCode::ReplayDetected));
        w.check_and_update(u64::MAX - 1).expect("in window");
        w.check_and_update(u64::MAX - 1023).expect("oldest inside");
        assert_eq!(code(&w, u64::MAX - 1024), Some(ErrorCode::SequenceError));
        assert_eq!(code(&w, 1 << 63), Some(ErrorCode::SequenceError));
        w.update(u64::MAX);
        assert_eq!(w.highest(), u64::MAX);
    }

    /// The specification, written as plainly as possible: every number seen, and
    /// the highest.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
        highest: u64,
    }

    impl Model {
        fn check(&self, bits: u64, seq: u64) -> Result<(), ErrorCode> {
            if seq == 0 || (seq <= self.highest && self.highest - seq >= bits) {
                Err(ErrorCode::SequenceError)
            } else if self.seen.contains(&seq) {
                Err(ErrorCode::ReplayDetected)
            } else {
                Ok(())
            }
        }

        fn update(&mut self, seq: u64) {
            self.seen.insert(seq);
            self.highest = self.highest.max(seq);
        }
    }

    /// Feeds `seqs` to a window and the model; `authentic[i]` says whether message
    /// `i` authenticates (an unauthentic one is checked but never recorded).
    fn run(bits: usize, seqs: &[u64], authentic: &[bool]) -> Result<(), TestCaseError> {
        let mut w = window(bits);
        let mut model = Model::default();
        let b = bits as u64;
        for (i, &seq) in seqs.iter().enumerate() {
            let got = w.check(seq).map_err(|r| r.code);
            prop_assert_eq!(got, model.check(b, seq), "seq {} at step {}", seq, i);
            let in_window = seq > 0 && u128::from(seq) + u128::from(b) > u128::from(model.highest);
            if got.is_ok() {
                // (b) accepted numbers are inside the window (or ahead of it).
                prop_assert!(
                    in_window,
                    "accepted {} behind highest {}",
                    seq,
                    model.highest
                );
                // (a) at most once.
                prop_assert!(!model.seen.contains(&seq), "accepted {} twice", seq);
                if authentic.get(i).copied().unwrap_or(true) {
                    w.update(seq);
                    model.update(seq);
                }
            } else if in_window {
                // (c) an unseen number inside the window is never refused.
                prop_assert!(model.seen.contains(&seq), "refused unseen {}", seq);
            }
            prop_assert_eq!(w.highest(), model.highest);
        }
        Ok(())
    }

    fn arb_bits() -> impl Strategy<Value = usize> {
        (10u32..=12).prop_map(|k| 1usize << k)
    }

    /// 1..=n, each moved ahead by up to `spread` places (so reordering reaches
    /// around the window size), then with random copies inserted.
    fn arb_reordered() -> impl Strategy<Value = Vec<u64>> {
        (1u64..3000, 0u64..3000).prop_flat_map(|(n, spread)| {
            (
                proptest::collection::vec(0..=spread, n as usize),
                proptest::collection::vec(
                    (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
                    0..200,
                ),
            )
                .prop_map(move |(delays, dups)| {
                    let mut keyed: Vec<(u64, u64)> =
                        (1..=n).zip(delays).map(|(seq, d)| (seq + d, seq)).collect();
                    keyed.sort_unstable();
                    let mut seqs: Vec<u64> = keyed.into_iter().map(|(_, seq)| seq).collect();
                    for (from, to) in dups {
                        let copy = seqs[from.index(seqs.len())];
                        seqs.insert(to.index(seqs.len() + 1), copy);
                    }
                    seqs
                })
        })
    }

    /// How the next number relates to the model's highest so far.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Any(u64),
        Behind(u64),
        Ahead(u64),
        NearMax(u64),
    }

    fn arb_steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                any::<u64>().prop_map(Step::Any),
                (0u64..5000).prop_map(Step::Behind),
                (0u64..200).prop_map(Step::Ahead),
                (0u64..3000).prop_map(Step::NearMax),
            ],
            1..500,
        )
    }

    proptest! {
        #[test]
        fn permutations_with_duplicates_match_the_model(
            bits in arb_bits(),
            seqs in arb_reordered(),
            authentic in proptest::collection::vec(proptest::bool::weighted(0.9), 0..3000),
        ) {
            run(bits, &seqs, &authentic)?;
        }

        #[test]
        fn arbitrary_u64s_match_the_model(
            bits in arb_bits(),
            steps in arb_steps(),
            authentic in proptest::collection::vec(proptest::bool::weighted(0.9), 0..500),
        ) {
            // Resolve relative steps against the highest number recorded so far,
            // replaying the same check/update decisions `run` makes.
            let mut model = Model::default();
            let mut seqs = Vec::with_capacity(steps.len());
            for (i, step) in steps.into_iter().enumerate() {
                let seq = match step {
                    Step::Any(s) => s,
                    Step::Behind(d) => model.highest.saturating_sub(d),
                    Step::Ahead(d) => model.highest.saturating_add(d),
                    Step::NearMax(d) => u64::MAX - d,
                };
                if model.check(bits as u64, seq).is_ok() && authentic.get(i).copied().unwrap_or(true) {
                    model.update(seq);
                }
                seqs.push(seq);
            }
            run(bits, &seqs, &authentic)?;
        }
    }
}
