//! The node's two clocks. Protocol timers (session lifetimes, handshake and
//! reorder deadlines, transfer expiry and resends) run on a monotonic clock, so
//! a step of the wall clock cannot expire or stretch them; the wall clock only
//! stamps outgoing envelopes, checks incoming timestamps, and labels times shown
//! to people (`last_seen_ms`, a session's `expires_ms`).

use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where the node reads the time. [`SystemClock`] is the real one; tests pass
/// their own to step the wall clock.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// A monotonic instant: never goes back, never jumps with the wall clock.
    fn now(&self) -> Instant;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Monotonic milliseconds since a fixed start, as the protocol core takes them
/// (`now_ms` of sessions, reorder buffers and transfers).
#[derive(Debug, Clone, Copy)]
pub struct Monotonic {
    start: Instant,
}

impl Monotonic {
    /// Counting from `start`.
    pub fn new(start: Instant) -> Self {
        Self { start }
    }

    /// Milliseconds from the start to `at` (0 before it).
    pub fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` milliseconds after the start.
    pub fn instant(&self, ms: u64) -> Instant {
        self.start + std::time::Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn monotonic_ms_round_trip_and_never_go_below_zero() {
        let start = Instant::now();
        let m = Monotonic::new(start);
        assert_eq!(m.ms(start), 0);
        assert_eq!(m.ms(start + Duration::from_millis(1500)), 1500);
        assert_eq!(m.instant(1500), start + Duration::from_millis(1500));
        let before = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
        assert_eq!(m.ms(before), 0);
    }
}
