//! Retries of sends that got no answer: exponential backoff with full jitter,
//! within a budget so that retries cannot multiply the load on a struggling
//! peer. Pure: time and randomness are passed in.
//!
//! The budget holds tokens: every first attempt deposits `ratio` of a token,
//! every retry takes a whole one, and a reserve of `per_sec` tokens a second
//! trickles in so that a quiet node can still retry now and then. Tokens never
//! exceed `cap`. So over any stretch retries are at most `ratio` of the sends
//! plus `per_sec` a second, however many of them fail.

/// How retries are spaced and budgeted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Retries of one send at most (0: never retried).
    pub max_retries: u32,
    /// The first retry waits up to this long, each further one twice as long.
    pub base_ms: u64,
    /// No wait is longer than this.
    pub max_ms: u64,
    /// Tokens a first attempt deposits (0.2: retries add at most 20 % to the sends).
    pub ratio: f64,
    /// Tokens that trickle in each second whatever is sent.
    pub per_sec: f64,
    /// Most tokens held.
    pub cap: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_ms: 100,
            max_ms: 5_000,
            ratio: 0.2,
            per_sec: 10.0,
            cap: 100.0,
        }
    }
}

impl Settings {
    /// How long retry `attempt` (1 for the first retry) waits: a uniform draw
    /// from 0 to `base_ms · 2^(attempt-1)` (at most `max_ms`), from `random`.
    pub fn backoff_ms(&self, attempt: u32, random: u64) -> u64 {
        let shift = attempt.saturating_sub(1).min(32);
        let ceiling = self.base_ms.saturating_mul(1 << shift).min(self.max_ms);
        random % (ceiling + 1)
    }
}

/// Thousandths of a token: the budget counts in whole numbers, so that five
/// deposits of 0.2 make exactly one retry.
const MILLI: u64 = 1_000;

fn milli(tokens: f64) -> u64 {
    // Settings are checked to be small and non-negative.
    (tokens * MILLI as f64).round() as u64
}

/// The retry budget of a node.
#[derive(Debug, Clone)]
pub struct Budget {
    settings: Settings,
    /// Thousandths of a token held.
    tokens: u64,
    /// When the reserve last trickled in.
    at_ms: u64,
}

impl Budget {
    /// A full budget at `now_ms`.
    pub fn new(settings: Settings, now_ms: u64) -> Self {
        Self {
            settings,
            tokens: milli(settings.cap),
            at_ms: now_ms,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn refill(&mut self, now_ms: u64) {
        let ms = now_ms.saturating_sub(self.at_ms);
        // per_sec tokens a second = per_sec thousandths a ms.
        let earned = milli(self.settings.per_sec).saturating_mul(ms) / MILLI;
        self.tokens = self
            .tokens
            .saturating_add(earned)
            .min(milli(self.settings.cap));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// A first attempt was sent.
    pub fn sent(&mut self, now_ms: u64) {
        self.refill(now_ms);
        self.tokens = self
            .tokens
            .saturating_add(milli(self.settings.ratio))
            .min(milli(self.settings.cap));
    }

    /// Whether retry `attempt` (1 for the first) of a send may go; if so its
    /// token is taken.
    pub fn try_retry(&mut self, now_ms: u64, attempt: u32) -> bool {
        if attempt > self.settings.max_retries {
            return false;
        }
        self.refill(now_ms);
        if self.tokens < MILLI {
            return false;
        }
        self.tokens -= MILLI;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            max_retries: 3,
            base_ms: 100,
            max_ms: 1_000,
            ratio: 0.2,
            per_sec: 1.0,
            cap: 5.0,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_jitters_below_it() {
        let s = settings();
        let most = |attempt| s.backoff_ms(attempt, u64::MAX - 1);
        assert_eq!(s.backoff_ms(1, 0), 0);
        assert!(most(1) <= 100);
        assert!(most(2) <= 200);
        assert!(most(3) <= 400);
        assert!(most(9) <= 1_000, "capped");
        // The draw spreads over the whole range.
        let draws: Vec<u64> = (0..50u64).map(|r| s.backoff_ms(2, r * 7_919)).collect();
        assert!(draws.iter().all(|d| *d <= 200));
        assert!(draws.iter().any(|d| *d < 50) && draws.iter().any(|d| *d > 150));
        assert_eq!(s.backoff_ms(40, u64::MAX), u64::MAX % 1_001, "no overflow");
    }

    #[test]
    fn retries_are_bounded_by_the_ratio_of_sends_plus_the_reserve() {
        let mut b = Budget::new(settings(), 0);
        // The full budget (5 tokens) goes first.
        let granted = (0..10).filter(|_| b.try_retry(0, 1)).count();
        assert_eq!(granted, 5);
        assert!(!b.try_retry(0, 1), "empty");
        // 100 sends at the same instant earn 20 retries' worth, capped at 5.
        for _ in 0..100 {
            b.sent(0);
        }
        assert_eq!((0..100).filter(|_| b.try_retry(0, 1)).count(), 5);
        // 10 sends earn 2 retries.
        for _ in 0..10 {
            b.sent(0);
        }
        assert_eq!((0..100).filter(|_| b.try_retry(0, 1)).count(), 2);
        // With no sends, the reserve trickles in at 1 a second.
        assert!(!b.try_retry(999, 1), "0.999 of a token");
        assert!(b.try_retry(2_000, 1));
        assert!(b.try_retry(2_000, 1), "two seconds, two tokens");
        assert!(!b.try_retry(2_000, 1));
    }

    #[test]
    fn a_send_is_retried_at_most_max_retries_times() {
        let mut b = Budget::new(settings(), 0);
        assert!(b.try_retry(0, 3));
        assert!(!b.try_retry(0, 4), "past max_retries, however full");
        let mut none = Budget::new(
            Settings {
                max_retries: 0,
                ..settings()
            },
            0,
        );
        assert!(!none.try_retry(0, 1));
    }

    #[test]
    fn time_going_backwards_neither_refills_nor_panics() {
        let mut b = Budget::new(settings(), 10_000);
        for _ in 0..5 {
            assert!(b.try_retry(10_000, 1));
        }
        assert!(!b.try_retry(5_000, 1));
        assert!(b.try_retry(11_000, 1), "refills from the latest time seen");
    }
}
