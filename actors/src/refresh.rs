//! The refresh rule: when a registry token must be replaced.
//!
//! Every other module calls [`RefreshPolicy`] instead of comparing expiry times itself, so the
//! rule lives in one place.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::clock::earlier;
use crate::config::ConfigError;
use crate::model::IssuedToken;

/// When to replace a registry token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefreshPolicy {
    /// Time before expiry at which a long-lived token is replaced. Default 30 minutes.
    pub margin: Duration,
    /// Share of the lifetime after which a token shorter than twice `margin` is replaced,
    /// in (0, 1]. Default 0.5.
    pub short_token_fraction: f64,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            margin: Duration::from_mins(30),
            short_token_fraction: 0.5,
        }
    }
}

impl RefreshPolicy {
    /// Checks that the fraction is in (0, 1] and the margin is not zero.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.margin.is_zero() {
            return Err(ConfigError {
                field: "refresh.margin",
                value: format!("{:?}", self.margin),
                expected: "greater than zero",
            });
        }
        if !(self.short_token_fraction > 0.0 && self.short_token_fraction <= 1.0) {
            return Err(ConfigError {
                field: "refresh.short_token_fraction",
                value: self.short_token_fraction.to_string(),
                expected: "greater than 0 and at most 1",
            });
        }
        Ok(())
    }

    /// Returns the instant at which `token` is due for refresh.
    ///
    /// A token whose lifetime (`expires_at - issued_at`) is at least twice the margin is
    /// refreshed `margin` before it expires. A shorter one is refreshed after
    /// `short_token_fraction` of its lifetime. So a 75-minute ACR token is refreshed 30 minutes
    /// before expiry, and a 20-second test token after 10 seconds. A token that expires at or
    /// before its issue time is due at once.
    #[must_use]
    pub fn refresh_at(&self, token: &IssuedToken) -> Timestamp {
        let lifetime = token.expires_at.duration_since(token.issued_at);
        if lifetime <= SignedDuration::ZERO {
            return token.issued_at;
        }

        let margin = SignedDuration::try_from(self.margin).unwrap_or(SignedDuration::MAX);
        let long_lived = margin.checked_mul(2).is_some_and(|twice| lifetime >= twice);
        if long_lived {
            return earlier(token.expires_at, self.margin);
        }

        let seconds = lifetime.as_secs_f64() * self.short_token_fraction;
        let delay = SignedDuration::try_from_secs_f64(seconds).unwrap_or(lifetime);
        token
            .issued_at
            .saturating_add(delay)
            .unwrap_or(token.expires_at)
    }

    /// Returns whether `token` may still be used and written at `now`: `now < refresh_at`.
    #[must_use]
    pub fn is_fresh(&self, token: &IssuedToken, now: Timestamp) -> bool {
        now < self.refresh_at(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RegistryToken;

    fn token(issued_at: &str, expires_at: &str) -> IssuedToken {
        IssuedToken {
            token: RegistryToken::new("test".into()),
            issued_at: issued_at.parse().unwrap(),
            expires_at: expires_at.parse().unwrap(),
        }
    }

    #[test]
    fn refresh_at_table() {
        let policy = RefreshPolicy::default();
        let cases = [
            // 75-minute ACR access token: 30 minutes before expiry.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T01:15:00Z",
                "2025-01-01T00:45:00Z",
            ),
            // 3-hour refresh token: 30 minutes before expiry.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T03:00:00Z",
                "2025-01-01T02:30:00Z",
            ),
            // Exactly twice the margin: still the margin rule.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T01:00:00Z",
                "2025-01-01T00:30:00Z",
            ),
            // Just under twice the margin: half the lifetime.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:59:58Z",
                "2025-01-01T00:29:59Z",
            ),
            // 20-second test token: after 10 seconds.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:20Z",
                "2025-01-01T00:00:10Z",
            ),
            // Expired at issue: due at once.
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:00Z",
            ),
            (
                "2025-01-01T00:00:10Z",
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:10Z",
            ),
        ];
        for (issued, expires, expected) in cases {
            let refresh_at = policy.refresh_at(&token(issued, expires));
            assert_eq!(
                refresh_at,
                expected.parse::<Timestamp>().unwrap(),
                "issued {issued}, expires {expires}"
            );
        }
    }

    #[test]
    fn custom_fraction_applies_to_short_tokens() {
        let policy = RefreshPolicy {
            margin: Duration::from_mins(1),
            short_token_fraction: 0.8,
        };
        let short = token("2025-01-01T00:00:00Z", "2025-01-01T00:01:40Z");
        assert_eq!(
            policy.refresh_at(&short),
            "2025-01-01T00:01:20Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn is_fresh_table() {
        let policy = RefreshPolicy::default();
        let acr = token("2025-01-01T00:00:00Z", "2025-01-01T01:15:00Z");
        let cases = [
            ("2025-01-01T00:00:00Z", true),
            ("2025-01-01T00:44:59Z", true),
            ("2025-01-01T00:45:00Z", false),
            ("2025-01-01T02:00:00Z", false),
        ];
        for (now, fresh) in cases {
            assert_eq!(
                policy.is_fresh(&acr, now.parse().unwrap()),
                fresh,
                "at {now}"
            );
        }
    }

    #[test]
    fn validate_rejects_bad_values() {
        let zero_margin = RefreshPolicy {
            margin: Duration::ZERO,
            ..RefreshPolicy::default()
        };
        assert_eq!(zero_margin.validate().unwrap_err().field, "refresh.margin");

        for fraction in [0.0, -0.5, 1.5, f64::NAN] {
            let policy = RefreshPolicy {
                short_token_fraction: fraction,
                ..RefreshPolicy::default()
            };
            assert_eq!(
                policy.validate().unwrap_err().field,
                "refresh.short_token_fraction",
                "fraction {fraction}"
            );
        }

        assert!(RefreshPolicy::default().validate().is_ok());
    }
}
