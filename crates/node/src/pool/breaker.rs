//! A circuit breaker for one peer, as a pure state machine (time passed in,
//! monotonic milliseconds).
//!
//! Closed: calls go through; `failures` consecutive failures open it. Open:
//! calls are refused at once (no dial, no send) until `open_ms` have passed,
//! then it is half-open. Half-open: `trials` calls are let through; as many
//! successes close it, and any failure opens it again for another `open_ms`.
//! A trial whose outcome never comes (its message was dropped before it
//! reached the wire) would hold its place for ever: trials not all ended
//! `open_ms` after the breaker turned half-open are started afresh.

/// The breaker's settings (`[pool]`: `breaker_failures`, `breaker_open_secs`,
/// `breaker_trials`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Consecutive failures that open a closed breaker.
    pub failures: u32,
    /// How long it stays open before it lets trial calls through, ms.
    pub open_ms: u64,
    /// Trial calls let through when half-open; as many successes close it.
    pub trials: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_ms: 30_000,
            trials: 3,
        }
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through; `failures` in a row so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Calls are refused until `until_ms`.
    Open {
        /// When it turns half-open.
        until_ms: u64,
    },
    /// Trial calls go through.
    HalfOpen {
        /// Trials let through so far.
        started: u32,
        /// Of them, those that succeeded.
        succeeded: u32,
        /// When this round of trials began.
        since_ms: u64,
    },
}

impl State {
    /// The name shown in metrics and the API: `closed`, `open`, `half_open`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed { .. } => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }
}

/// A call refused by an open breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Milliseconds until trial calls are let through (0 when half-open with
    /// every trial already taken: the next one comes when a trial ends).
    pub retry_after_ms: u64,
}

/// One peer's circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    settings: Settings,
    state: State,
    trips: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            state: State::Closed { failures: 0 },
            trips: 0,
        }
    }

    /// Where it is at `now_ms` (an open breaker whose time is up is half-open).
    pub fn state(&mut self, now_ms: u64) -> State {
        let since_ms = match self.state {
            State::Open { until_ms } if now_ms >= until_ms => until_ms,
            State::HalfOpen { since_ms, .. }
                if now_ms >= since_ms.saturating_add(self.settings.open_ms) =>
            {
                now_ms
            }
            _ => return self.state,
        };
        self.state = State::HalfOpen {
            started: 0,
            succeeded: 0,
            since_ms,
        };
        self.state
    }

    /// Times it opened.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// Whether it is closed (not open or half-open), as of its last change.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Whether it is closed with no failure counted: it holds nothing worth
    /// keeping.
    pub fn is_idle(&self) -> bool {
        self.state == State::Closed { failures: 0 }
    }

    /// Asks to make a call at `now_ms`. When it is allowed, its outcome must be
    /// reported with [`Breaker::success`] or [`Breaker::failure`].
    pub fn allow(&mut self, now_ms: u64) -> Result<(), Refused> {
        match self.state(now_ms) {
            State::Closed { .. } => Ok(()),
            State::Open { until_ms } => Err(Refused {
                retry_after_ms: until_ms - now_ms,
            }),
            State::HalfOpen {
                started,
                succeeded,
                since_ms,
            } if started < self.settings.trials => {
                self.state = State::HalfOpen {
                    started: started + 1,
                    succeeded,
                    since_ms,
                };
                Ok(())
            }
            State::HalfOpen { .. } => Err(Refused { retry_after_ms: 0 }),
        }
    }

    /// A call succeeded (the peer answered, even with a refusal).
    pub fn success(&mut self, now_ms: u64) {
        match self.state(now_ms) {
            State::Closed { .. } => self.state = State::Closed { failures: 0 },
            State::HalfOpen {
                started,
                succeeded,
                since_ms,
            } => {
                let succeeded = succeeded + 1;
                self.state = if succeeded >= self.settings.trials {
                    State::Closed { failures: 0 }
                } else {
                    State::HalfOpen {
                        started,
                        succeeded,
                        since_ms,
                    }
                };
            }
            // A call let through before it opened: it does not close it.
            State::Open { .. } => {}
        }
    }

    /// A call failed (no connection, no answer in time, the connection broke).
    pub fn failure(&mut self, now_ms: u64) {
        match self.state(now_ms) {
            State::Closed { failures } if failures + 1 < self.settings.failures => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
            }
            State::Closed { .. } | State::HalfOpen { .. } => self.open(now_ms),
            State::Open { .. } => {}
        }
    }

    fn open(&mut self, now_ms: u64) {
        self.trips += 1;
        self.state = State::Open {
            until_ms: now_ms.saturating_add(self.settings.open_ms),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(Settings::default())
    }

    #[test]
    fn five_failures_in_a_row_open_it_and_a_success_between_resets_the_count() {
        let mut b = breaker();
        for t in 0..4 {
            b.allow(t).expect("closed");
            b.failure(t);
        }
        b.success(4);
        assert_eq!(b.state(4), State::Closed { failures: 0 });
        for t in 5..9 {
            b.failure(t);
        }
        assert_eq!(b.state(9), State::Closed { failures: 4 });
        assert!(b.allow(9).is_ok());
        b.failure(9);
        assert_eq!(b.state(9), State::Open { until_ms: 30_009 });
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn open_refuses_until_its_time_is_up() {
        let mut b = breaker();
        (0..5).for_each(|_| b.failure(1_000));
        assert_eq!(
            b.allow(1_000),
            Err(Refused {
                retry_after_ms: 30_000
            })
        );
        assert_eq!(b.allow(30_999), Err(Refused { retry_after_ms: 1 }));
        // A late outcome of a call let through earlier changes nothing.
        b.success(2_000);
        b.failure(2_000);
        assert_eq!(b.state(2_000), State::Open { until_ms: 31_000 });
        assert_eq!(b.trips(), 1);
        assert!(b.allow(31_000).is_ok(), "half-open");
    }

    #[test]
    fn half_open_lets_three_trials_through_and_three_successes_close_it() {
        let mut b = breaker();
        (0..5).for_each(|_| b.failure(0));
        for _ in 0..3 {
            assert!(b.allow(30_000).is_ok());
        }
        assert_eq!(b.allow(30_000), Err(Refused { retry_after_ms: 0 }));
        b.success(30_001);
        b.success(30_002);
        assert_eq!(
            b.state(30_002),
            State::HalfOpen {
                started: 3,
                succeeded: 2,
                since_ms: 30_000
            }
        );
        b.success(30_003);
        assert_eq!(b.state(30_003), State::Closed { failures: 0 });
        assert!(b.is_idle());
    }

    #[test]
    fn a_failure_when_half_open_opens_it_again() {
        let mut b = breaker();
        (0..5).for_each(|_| b.failure(0));
        assert!(b.allow(30_000).is_ok());
        b.success(30_001);
        assert!(b.allow(30_001).is_ok());
        b.failure(30_002);
        assert_eq!(b.state(30_002), State::Open { until_ms: 60_002 });
        assert_eq!(b.trips(), 2);
        assert!(b.allow(60_001).is_err());
        assert!(b.allow(60_002).is_ok());
    }

    #[test]
    fn trials_whose_outcome_never_came_are_started_afresh_after_the_open_time() {
        let mut b = breaker();
        (0..5).for_each(|_| b.failure(0));
        for _ in 0..3 {
            assert!(b.allow(30_000).is_ok());
        }
        b.success(30_001);
        assert!(b.allow(59_999).is_err(), "two trials still out");
        assert!(b.allow(60_000).is_ok(), "a new round");
        assert_eq!(
            b.state(60_000),
            State::HalfOpen {
                started: 1,
                succeeded: 0,
                since_ms: 60_000
            }
        );
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn settings_are_honoured() {
        let mut b = Breaker::new(Settings {
            failures: 1,
            open_ms: 10,
            trials: 1,
        });
        b.failure(0);
        assert!(b.allow(9).is_err());
        assert!(b.allow(10).is_ok());
        assert!(b.allow(10).is_err(), "one trial only");
        b.success(11);
        assert!(b.is_idle());
    }
}
