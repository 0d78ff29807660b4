//! Exponential backoff with caller-supplied jitter, so that the state machine stays pure.

use std::time::Duration;

use crate::config::ConfigError;

/// Delays between retries: `base × factor^(attempt − 1)`, capped at `max`, with equal jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first retry. Default 1 second.
    pub base: Duration,
    /// Growth per attempt, at least 1. Default 2.
    pub factor: f64,
    /// Largest delay, before a server's `Retry-After` is applied. Default 5 minutes.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_mins(5),
        }
    }
}

impl BackoffPolicy {
    /// Checks that `base` is positive, `factor` is at least 1 and `max` is at least `base`.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.base.is_zero() {
            return Err(ConfigError {
                field: "backoff.base",
                value: format!("{:?}", self.base),
                expected: "greater than zero",
            });
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(ConfigError {
                field: "backoff.factor",
                value: self.factor.to_string(),
                expected: "a finite number of at least 1",
            });
        }
        if self.max < self.base {
            return Err(ConfigError {
                field: "backoff.max",
                value: format!("{:?}", self.max),
                expected: "at least backoff.base",
            });
        }
        Ok(())
    }

    /// Returns the delay before retry number `attempt` (1 after the first failure).
    ///
    /// `jitter` in [0, 1] picks a delay between half and all of the exponential delay
    /// ("equal jitter"), so that bindings that failed together retry apart but never sooner
    /// than half the delay. A server's `retry_after` is a floor and wins over `max`.
    #[must_use]
    pub fn delay(&self, attempt: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let exponential = self.base.as_secs_f64() * self.factor.powi(exponent);
        let capped = exponential.min(self.max.as_secs_f64());

        let jitter = if jitter.is_nan() {
            1.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let jittered = capped * (0.5 + 0.5 * jitter);
        let delay = Duration::try_from_secs_f64(jittered).unwrap_or(self.max);

        delay.max(retry_after.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(
        clippy::duration_suboptimal_units,
        reason = "the table reads best with every delay in seconds"
    )]
    fn delay_table() {
        let policy = BackoffPolicy::default();
        let cases: [(u32, f64, Option<u64>, Duration); 11] = [
            (1, 1.0, None, Duration::from_secs(1)),
            (2, 1.0, None, Duration::from_secs(2)),
            (3, 1.0, None, Duration::from_secs(4)),
            (9, 1.0, None, Duration::from_secs(256)),
            (10, 1.0, None, Duration::from_secs(300)),
            (1000, 1.0, None, Duration::from_secs(300)),
            // Attempt 0 is treated as the first attempt.
            (0, 1.0, None, Duration::from_secs(1)),
            // Jitter 0 halves the delay; 0.5 takes three quarters.
            (3, 0.0, None, Duration::from_secs(2)),
            (3, 0.5, None, Duration::from_secs(3)),
            // Retry-After is a floor, also above the cap.
            (1, 1.0, Some(10), Duration::from_secs(10)),
            (10, 1.0, Some(600), Duration::from_secs(600)),
        ];
        for (attempt, jitter, retry_after, expected) in cases {
            let delay = policy.delay(attempt, jitter, retry_after.map(Duration::from_secs));
            assert_eq!(
                delay, expected,
                "attempt {attempt}, jitter {jitter}, retry_after {retry_after:?}"
            );
        }
    }

    #[test]
    fn retry_after_below_delay_is_ignored() {
        let policy = BackoffPolicy::default();
        assert_eq!(
            policy.delay(5, 1.0, Some(Duration::from_secs(1))),
            Duration::from_secs(16)
        );
    }

    #[test]
    fn out_of_range_jitter_is_clamped() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.delay(2, -3.0, None), Duration::from_secs(1));
        assert_eq!(policy.delay(2, 7.0, None), Duration::from_secs(2));
        assert_eq!(policy.delay(2, f64::NAN, None), Duration::from_secs(2));
    }

    #[test]
    fn validate_rejects_bad_values() {
        let cases = [
            (
                BackoffPolicy {
                    base: Duration::ZERO,
                    ..BackoffPolicy::default()
                },
                "backoff.base",
            ),
            (
                BackoffPolicy {
                    factor: 0.5,
                    ..BackoffPolicy::default()
                },
                "backoff.factor",
            ),
            (
                BackoffPolicy {
                    factor: f64::INFINITY,
                    ..BackoffPolicy::default()
                },
                "backoff.factor",
            ),
            (
                BackoffPolicy {
                    max: Duration::from_millis(10),
                    ..BackoffPolicy::default()
                },
                "backoff.max",
            ),
        ];
        for (policy, field) in cases {
            assert_eq!(policy.validate().unwrap_err().field, field, "{policy:?}");
        }
        assert!(BackoffPolicy::default().validate().is_ok());
    }
}
