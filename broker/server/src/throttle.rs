//! A token bucket for replication traffic a reassignment causes: a leader sends replicas
//! that catch up at most the cluster's `reassignment_throttle_bytes` per second, all
//! together, with at most one second's worth in a burst.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct Throttle {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            state: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }
}

impl Throttle {
    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The bytes that may be sent now at `rate` bytes per second.
    pub fn allowance(&self, rate: u64) -> usize {
        let mut bucket = self.bucket();
        let now = Instant::now();
        let rate = rate as f64;
        let refill = now.duration_since(bucket.refilled).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.refilled = now;
        bucket.tokens.max(0.0) as usize
    }

    /// Takes `bytes` that were sent (the last read may overshoot by one batch).
    pub fn spend(&self, bytes: usize) {
        self.bucket().tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_refills_at_the_rate_and_holds_at_most_a_second() {
        let throttle = Throttle::default();
        assert_eq!(throttle.allowance(1_000), 0, "starts empty");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let after = throttle.allowance(1_000);
        assert!((40..=1_000).contains(&after), "{after}");
        throttle.spend(after + 500);
        assert_eq!(throttle.allowance(1_000), 0, "overspent: wait");
        std::thread::sleep(std::time::Duration::from_millis(1_200));
        assert!(throttle.allowance(1_000) <= 1_000, "one second at most");
    }
}
