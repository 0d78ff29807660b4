//! Wall-clock time for the actors, and the timestamp arithmetic the state machine uses.

use std::time::Duration;

use jiff::Timestamp;

/// The time source of the actors.
///
/// Token lifetimes are wall-clock instants (JWT `iat` and `exp`), so production uses the
/// system clock. Tests use [`Clock::tokio`], which follows tokio's clock, so that
/// `tokio::time::pause` and `advance` move token lifetimes and actor timers together.
#[derive(Clone, Copy, Debug, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// A wall clock that advances with tokio's clock from a fixed starting point.
    Tokio {
        /// Wall-clock time at `origin`.
        origin_wall: Timestamp,
        /// Tokio instant at which the clock was created.
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// Creates a clock that starts at the current wall-clock time and then advances with
    /// tokio's clock, including while tokio's time is paused.
    #[must_use]
    pub fn tokio() -> Self {
        Clock::Tokio {
            origin_wall: Timestamp::now(),
            origin: tokio::time::Instant::now(),
        }
    }

    /// Returns the current time.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::Tokio {
                origin_wall,
                origin,
            } => later(*origin_wall, origin.elapsed()),
        }
    }
}

/// Returns `at + delay`, saturating at the largest timestamp.
#[must_use]
pub fn later(at: Timestamp, delay: Duration) -> Timestamp {
    at.saturating_add(delay).unwrap_or(Timestamp::MAX)
}

/// Returns `at - delay`, saturating at the smallest timestamp.
#[must_use]
pub fn earlier(at: Timestamp, delay: Duration) -> Timestamp {
    at.saturating_sub(delay).unwrap_or(Timestamp::MIN)
}

/// Truncates a timestamp to whole seconds.
///
/// Kubernetes stores status times as RFC 3339 with whole seconds, so every time that the
/// state machine writes and later compares with an observed value is truncated first.
#[must_use]
pub fn whole_seconds(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_drops_fraction() {
        let at: Timestamp = "2025-01-01T00:00:01.999Z".parse().unwrap();
        let expected: Timestamp = "2025-01-01T00:00:01Z".parse().unwrap();
        assert_eq!(whole_seconds(at), expected);
    }

    #[test]
    fn later_saturates() {
        assert_eq!(
            later(Timestamp::MAX, Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(
            earlier(Timestamp::MIN, Duration::from_secs(1)),
            Timestamp::MIN
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let start = clock.now();

        tokio::time::advance(Duration::from_secs(90)).await;

        assert_eq!(clock.now().duration_since(start).as_secs(), 90);
    }
}
