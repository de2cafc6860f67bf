//! The crypto-only ceiling of sealed messages between two nodes: the machine's
//! cores ÷ (one Ed25519 signature + one single verification), timed in this
//! process the way the criterion bench `ed25519/{sign,verify}_64B` times them.
//! Timed seconds before and after a load, it gives that load's share of the
//! ceiling on a machine whose speed drifts (a VM's can move by a third within
//! an hour), where a criterion run minutes away would not. It is issue 10's
//! definition: one single verification per message, though the node verifies
//! a busy peer's envelopes in batches, which cost less, so a share above
//! 100 % would not be an error.

use std::hint::black_box;
use std::time::{Duration, Instant};

use peer_core::Identity;
use peer_core::identity::verify;

/// One signature and one verification, timed.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// Mean time of one signature of 64 bytes.
    pub sign: Duration,
    /// Mean time of one verification.
    pub verify: Duration,
    /// Cores of the machine.
    pub cores: usize,
}

impl Ceiling {
    /// Signs, then verifies, a 64-byte message for about `budget` each, on
    /// this thread.
    pub fn measure(budget: Duration) -> Self {
        let id = Identity::from_secret(&[2; 32]);
        let key = id.public_key();
        let msg = [0xA5u8; 64];
        let sig = id.sign(&msg);
        assert!(verify(&key, &msg, &sig), "a fresh signature verifies");
        let sign = mean(budget, || {
            black_box(id.sign(black_box(&msg)));
        });
        let verify = mean(budget, || {
            black_box(verify(black_box(&key), black_box(&msg), black_box(&sig)));
        });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            sign,
            verify,
            cores,
        }
    }

    /// Messages a second the cores could sign and verify with nothing else.
    pub fn per_second(&self) -> f64 {
        self.cores as f64 / (self.sign + self.verify).as_secs_f64()
    }
}

/// Mean time of `f`, run in rounds of 64 until `budget` has passed.
fn mean(budget: Duration, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || started.elapsed() < budget {
        for _ in 0..64 {
            f();
        }
        runs += 64;
    }
    started.elapsed() / runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_is_the_cores_over_one_signature_and_one_verification() {
        let c = Ceiling {
            sign: Duration::from_micros(20),
            verify: Duration::from_micros(60),
            cores: 2,
        };
        assert!((c.per_second() - 25_000.0).abs() < 1e-6);
        let measured = Ceiling::measure(Duration::from_millis(5));
        assert!(measured.sign > Duration::ZERO && measured.verify > Duration::ZERO);
    }
}
