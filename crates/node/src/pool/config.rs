//! Connection pool settings (`[pool]`). The connection limits themselves
//! (`network.max_connections_per_peer`, `network.max_idle_secs`,
//! `network.connection_timeout_secs`) stay in `[network]`, where libp2p
//! applies them.

use serde::{Deserialize, Serialize};

use super::breaker::Settings;

/// Connection pool settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Consecutive failed calls (dials, sends without an answer) that open a
    /// peer's circuit breaker (default 5; at least 1).
    pub breaker_failures: u32,
    /// Milliseconds an open breaker refuses calls before it lets trial calls
    /// through (default 30,000; at least 1).
    pub breaker_open_ms: u64,
    /// Trial calls a half-open breaker lets through; as many successes close
    /// it, a failure opens it again (default 3; at least 1).
    pub breaker_trials: u32,
    /// Seconds between two validations of a connection: a ping on it, which
    /// must be answered within `network.connection_timeout_secs` or the
    /// connection is closed (evicted) and the next send dials again
    /// (default 30; at least 1).
    pub keep_alive_secs: u64,
    /// Most peers whose breaker is remembered (one with failures counted or
    /// not closed); beyond it the one whose last call ended longest ago is
    /// forgotten, closed again (default 4,096; at least 1).
    pub max_peers: usize,
    /// Times a send that got no answer (timeout, or the connection broke) is
    /// sent again, the same signed bytes, while its peer is connected
    /// (default 2; 0 turns retries off).
    pub max_retries: u32,
    /// The first retry waits a random time up to this, each further one up to
    /// twice as long (default 100).
    pub retry_base_ms: u64,
    /// No retry waits longer than this (default 5,000).
    pub retry_max_ms: u64,
    /// Retries per first attempt the budget earns: at most this share of the
    /// sends is retried (default 0.2).
    pub retry_ratio: f64,
    /// Retries a second the budget allows whatever is sent; it holds at most
    /// ten seconds' worth (default 10).
    pub retry_per_sec: f64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        let s = Settings::default();
        Self {
            breaker_failures: s.failures,
            breaker_open_ms: s.open_ms,
            breaker_trials: s.trials,
            keep_alive_secs: 30,
            max_peers: 4_096,
            max_retries: 2,
            retry_base_ms: 100,
            retry_max_ms: 5_000,
            retry_ratio: 0.2,
            retry_per_sec: 10.0,
        }
    }
}

impl PoolConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.breaker_failures == 0
            || self.breaker_open_ms == 0
            || self.breaker_trials == 0
            || self.keep_alive_secs == 0
            || self.max_peers == 0
        {
            return Err(
                "pool.breaker_failures, pool.breaker_open_ms, pool.breaker_trials, pool.keep_alive_secs and pool.max_peers must be at least 1"
                    .into(),
            );
        }
        if self.retry_base_ms == 0
            || self.retry_max_ms < self.retry_base_ms
            || !(0.0..=1.0).contains(&self.retry_ratio)
            || !(0.0..=10_000.0).contains(&self.retry_per_sec)
        {
            return Err(
                "pool.retry_base_ms must be at least 1 and at most pool.retry_max_ms, pool.retry_ratio 0 to 1, pool.retry_per_sec 0 to 10000"
                    .into(),
            );
        }
        Ok(())
    }

    /// The retries' settings.
    pub fn retry(&self) -> super::retry::Settings {
        super::retry::Settings {
            max_retries: self.max_retries,
            base_ms: self.retry_base_ms,
            max_ms: self.retry_max_ms,
            ratio: self.retry_ratio,
            per_sec: self.retry_per_sec,
            cap: (self.retry_per_sec * 10.0).max(1.0),
        }
    }

    /// The breaker's settings.
    pub fn breaker(&self) -> Settings {
        Settings {
            failures: self.breaker_failures,
            open_ms: self.breaker_open_ms,
            trials: self.breaker_trials,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_follow_the_protocol_parameters_and_zero_is_refused() {
        let c = PoolConfig::default();
        assert_eq!(
            (c.breaker_failures, c.breaker_open_ms, c.breaker_trials),
            (5, 30_000, 3)
        );
        c.validate().expect("valid");
        for tune in [
            |c: &mut PoolConfig| c.breaker_failures = 0,
            |c: &mut PoolConfig| c.breaker_open_ms = 0,
            |c: &mut PoolConfig| c.breaker_trials = 0,
            |c: &mut PoolConfig| c.keep_alive_secs = 0,
            |c: &mut PoolConfig| c.max_peers = 0,
        ] {
            let mut c = PoolConfig::default();
            tune(&mut c);
            assert!(c.validate().expect_err("zero").starts_with("pool."));
        }
    }
}
