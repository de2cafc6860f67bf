//! Heartbeat settings (`[heartbeat]`).

use serde::{Deserialize, Serialize};

/// Heartbeat settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Milliseconds between two heartbeats to a peer, and the time a beat has
    /// to be answered before it counts as missed (default 30,000; at least
    /// 10). Below 1,000 a peer with the default `rate_limits.heartbeat`
    /// (60 a minute) refuses beats once its burst is spent.
    pub interval_ms: u64,
    /// Missed beats in a row after which a peer is unreachable (default 3; at
    /// least 1). One missed beat makes it degraded.
    pub missed_limit: u32,
    /// A peer whose latest round trip took longer than this many ms is
    /// degraded (default 2,000; at least 1).
    pub degraded_rtt_ms: u64,
    /// Most peers tracked; beyond it the peer unreachable the longest is
    /// forgotten first (default 4,096; at least 1).
    pub max_peers: usize,
    /// Largest `status_report` payload taken, in bytes: it is kept as the
    /// peer's last reported status; a larger one is refused
    /// `MESSAGE_TOO_LARGE` (default 4,096; at least 2).
    pub max_status_bytes: usize,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            missed_limit: 3,
            degraded_rtt_ms: 2_000,
            max_peers: 4_096,
            max_status_bytes: 4_096,
        }
    }
}

impl HeartbeatConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms < 10 {
            return Err(format!(
                "heartbeat.interval_ms must be at least 10, not {}",
                self.interval_ms
            ));
        }
        if self.missed_limit == 0 || self.degraded_rtt_ms == 0 || self.max_peers == 0 {
            return Err(
                "heartbeat.missed_limit, heartbeat.degraded_rtt_ms and heartbeat.max_peers must be at least 1"
                    .into(),
            );
        }
        if self.max_status_bytes < 2 {
            return Err(format!(
                "heartbeat.max_status_bytes must be at least 2 (the payload {{}}), not {}",
                self.max_status_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_follow_the_protocol_parameters_and_ranges_are_checked() {
        let c = HeartbeatConfig::default();
        assert_eq!((c.interval_ms, c.missed_limit), (30_000, 3));
        c.validate().expect("the defaults are valid");
        let with = |tune: fn(&mut HeartbeatConfig)| {
            let mut c = HeartbeatConfig::default();
            tune(&mut c);
            c.validate()
        };
        assert!(with(|c| c.interval_ms = 10).is_ok(), "short, for tests");
        for bad in [
            with(|c| c.interval_ms = 9),
            with(|c| c.missed_limit = 0),
            with(|c| c.degraded_rtt_ms = 0),
            with(|c| c.max_peers = 0),
            with(|c| c.max_status_bytes = 1),
        ] {
            let e = bad.expect_err("out of range");
            assert!(e.starts_with("heartbeat."), "{e}");
        }
    }
}
