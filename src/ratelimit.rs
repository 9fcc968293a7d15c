//! Per-key token buckets (used for `SetTyping`, a few calls per second per user).
//!
//! Bounded: at most [`MAX_KEYS`] buckets; when full, buckets that have refilled (and so carry no state
//! worth keeping) are dropped, and if none has, the call is refused rather than the table growing.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

/// Most keys tracked at once.
pub const MAX_KEYS: usize = 100_000;

/// A token bucket per key: `rate` tokens per second, bursts of up to `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` calls per second per key.
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; false when the key is over its rate.
    pub fn try_acquire(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
            if buckets.len() >= MAX_KEYS {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn allows_a_burst_then_refills() {
        let limiter = RateLimiter::new(3);
        assert!((0..3).all(|_| limiter.try_acquire("u1")));
        assert!(!limiter.try_acquire("u1"));
        assert!(limiter.try_acquire("u2"), "keys are independent");
        tokio::time::advance(Duration::from_millis(340)).await;
        assert!(limiter.try_acquire("u1"));
        assert!(!limiter.try_acquire("u1"));
    }
}
