//! Exponential backoff with jitter, for reconnecting streams and retrying publishes.
//!
//! Attempt `n` (from 0) waits a random time in `[c/2, c]` where `c = min(max, initial * multiplier^n)`
//! ("equal jitter"): never longer than `max` (30 s by default), never shorter than half the ceiling, so a
//! fleet of clients that lost the same server spreads its reconnects instead of arriving together.

use std::time::Duration;

use rand::Rng;

/// Default first retry ceiling.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Default longest wait between two attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default growth factor per failed attempt.
pub const DEFAULT_BACKOFF_MULTIPLIER: f64 = 2.0;

/// How long to wait between attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first wait.
    pub initial: Duration,
    /// Longest wait, whatever the attempt.
    pub max: Duration,
    /// Growth of the ceiling per failed attempt (values below 1 count as 1).
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: DEFAULT_INITIAL_BACKOFF,
            max: DEFAULT_MAX_BACKOFF,
            multiplier: DEFAULT_BACKOFF_MULTIPLIER,
        }
    }
}

impl Backoff {
    /// The longest wait before attempt `attempt` (0-based): `min(max, initial * multiplier^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let max = self.max.as_secs_f64();
        let factor = self.multiplier.max(1.0).powi(attempt.min(1024) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if secs.is_finite() && secs < max {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        }
    }

    /// A random wait before attempt `attempt`, uniformly in `[ceiling/2, ceiling]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.gen_range(0..=spread))
    }
}

/// Attempts counted since the last success.
#[derive(Debug)]
pub(crate) struct BackoffState {
    policy: Backoff,
    attempt: u32,
}

impl BackoffState {
    pub(crate) fn new(policy: Backoff) -> Self {
        Self { policy, attempt: 0 }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt, &mut rand::thread_rng());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the first, shortest wait (after a success or a healthy period).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use tokio::time::Instant;

    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_thirty_seconds() {
        let b = Backoff::default();
        let ceilings: Vec<_> = (0..10).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(
            ceilings,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn odd_policies_stay_bounded() {
        let shrinking = Backoff {
            multiplier: 0.5,
            ..Backoff::default()
        };
        assert_eq!(shrinking.ceiling(5), DEFAULT_INITIAL_BACKOFF);
        let huge_start = Backoff {
            initial: Duration::from_secs(3600),
            ..Backoff::default()
        };
        assert_eq!(huge_start.ceiling(0), DEFAULT_MAX_BACKOFF);
        let zero = Backoff {
            initial: Duration::ZERO,
            ..Backoff::default()
        };
        assert_eq!(zero.delay(3, &mut StdRng::seed_from_u64(1)), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_between_half_and_the_ceiling_and_varies() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let ceiling = b.ceiling(attempt);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                let d = b.delay(attempt, &mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
                seen.insert(d);
            }
            assert!(seen.len() > 40, "jitter should spread the delays: {seen:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_grow_with_failures_and_reset_after_success() {
        let mut state = BackoffState::new(Backoff::default());
        let mut waited = Vec::new();
        for _ in 0..12 {
            let start = Instant::now();
            tokio::time::sleep(state.next_delay()).await;
            waited.push(start.elapsed());
        }
        for (attempt, w) in waited.iter().enumerate() {
            let ceiling = Backoff::default().ceiling(attempt as u32);
            assert!(
                *w >= ceiling / 2 && *w <= ceiling + Duration::from_millis(1),
                "attempt {attempt}: {w:?}"
            );
        }
        assert!(waited[11] >= Duration::from_secs(15), "{waited:?}");
        state.reset();
        let start = Instant::now();
        tokio::time::sleep(state.next_delay()).await;
        assert!(start.elapsed() <= Duration::from_millis(201));
    }
}
