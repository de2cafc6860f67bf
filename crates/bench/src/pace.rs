//! Sending `message` envelopes through [`NodeHandle::send`], one at a time
//! or at a fixed rate, with each send's latency (until the recipient accepted
//! it) in a histogram.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use peer_core::EntityId;
use peer_node::{NodeError, NodeHandle};
use tokio::task::JoinError;

/// A JSON object of `bytes` bytes (at least 10): `{"pad":"xxx…"}`.
pub fn payload(bytes: usize) -> Arc<Vec<u8>> {
    let pad = "x".repeat(bytes.saturating_sub(10));
    Arc::new(format!("{{\"pad\":\"{pad}\"}}").into_bytes())
}

/// Sends `payload` from `from` to `to` as a `message`; answers how long the
/// recipient took to accept it.
pub async fn send(
    from: NodeHandle,
    to: EntityId,
    payload: Arc<Vec<u8>>,
) -> Result<Duration, NodeError> {
    let started = Instant::now();
    let msg_type = "message".parse().expect("a valid msg_type");
    from.send(to, msg_type, payload.to_vec())
        .await
        .map(|_| started.elapsed())
}

/// Latencies of the sends that succeeded, in µs, and the failures.
#[derive(Debug)]
pub struct Tally {
    /// Latency of each accepted send, in µs.
    pub hist: Histogram<u64>,
    /// Sends that failed.
    pub failed: u64,
    /// Why the first one failed.
    pub first_failure: Option<String>,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Result<Self> {
        Ok(Self {
            hist: Histogram::new(3)?,
            failed: 0,
            first_failure: None,
        })
    }

    /// Records a send that ran on a task of its own; prints the first
    /// failure's reason.
    pub fn record(&mut self, sent: Result<Result<Duration, NodeError>, JoinError>) -> Result<()> {
        match sent {
            Ok(Ok(latency)) => self.hist.record(latency.as_micros() as u64)?,
            Ok(Err(e)) => self.fail(e.to_string()),
            Err(e) => self.fail(e.to_string()),
        }
        Ok(())
    }

    fn fail(&mut self, why: String) {
        if self.first_failure.is_none() {
            eprintln!("first failure: {why}");
            self.first_failure = Some(why);
        }
        self.failed += 1;
    }

    /// Sends accepted.
    pub fn delivered(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at quantile `q` (0.99 for p99), in µs.
    pub fn at(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }
}

/// Runs `send()` on a task of its own `rate` times a second for `seconds`
/// (late ticks are caught up at once), and waits for every send to end.
pub async fn at_rate<F, Fut>(rate: u64, seconds: u64, send: F) -> Result<Tally>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Duration, NodeError>> + Send + 'static,
{
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tally = Tally::new()?;
    let mut inflight = FuturesUnordered::new();
    let mut issued = 0;
    while issued < total || !inflight.is_empty() {
        tokio::select! {
            _ = tick.tick(), if issued < total => {
                inflight.push(tokio::spawn(send()));
                issued += 1;
            }
            Some(sent) = inflight.next() => tally.record(sent)?,
        }
    }
    Ok(tally)
}
