//! Exponential backoff with full jitter, bounded.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) spreads the retries of
//! many instances that failed together, so that a recovering downstream is not hit in waves.

use std::time::Duration;

use rand::Rng as _;

use crate::config::RetryConfig;

/// The ceiling of the backoff before attempt `attempt + 1` (attempt counts from 1).
pub fn ceiling(policy: &RetryConfig, attempt: u32) -> Duration {
    let factor = 2_u32.saturating_pow(attempt.saturating_sub(1).min(20));
    policy.initial_backoff.saturating_mul(factor).min(policy.max_backoff)
}

/// A jittered backoff before attempt `attempt + 1`.
pub fn backoff(policy: &RetryConfig, attempt: u32) -> Duration {
    let ceiling = ceiling(policy, attempt);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum_and_draws_stay_under_it() {
        let policy = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 10,
        };
        let ceilings: Vec<u128> = (1..=6).map(|a| ceiling(&policy, a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        for attempt in 1..=6 {
            for _ in 0..50 {
                assert!(backoff(&policy, attempt) <= ceiling(&policy, attempt));
            }
        }
    }
}
