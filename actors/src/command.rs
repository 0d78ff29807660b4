//! Outputs of a binding's state machine.

use std::time::Duration;

use jiff::Timestamp;

use crate::model::{InputsHash, TokenRequest};
use crate::write::ClusterWrite;

/// One thing that the binding actor must do after an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Ask the token broker for a token; it replies with `TokenIssued` or `TokenFailed`.
    RequestToken {
        /// Hash of the inputs, echoed back so that a stale reply is recognized.
        inputs_hash: InputsHash,
        /// The inputs of the token to mint.
        request: TokenRequest,
    },
    /// Send a write to the writer actor; it replies with `WriteDone` or `WriteFailed`.
    Write(ClusterWrite),
    /// Arm the binding's single timer for this instant, replacing any armed one.
    ArmTimer {
        /// When `TimerFired` is due.
        at: Timestamp,
        /// The reason for the timer. A `Retry` timer also holds back token requests and the
        /// re-sending of failed writes until it fires.
        purpose: TimerPurpose,
    },
    /// Stop the binding actor: the binding is gone.
    Stop,
}

/// The reason a binding's timer is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerPurpose {
    /// The held token falls due for refresh.
    Refresh,
    /// A backoff delay after a failure is over.
    Retry,
}

impl Command {
    /// Returns the delay from `now` until an `ArmTimer` is due, or `None` for other commands.
    #[must_use]
    pub fn timer_delay(&self, now: Timestamp) -> Option<Duration> {
        match self {
            Command::ArmTimer { at, .. } => {
                let span = at.duration_since(now);
                Some(Duration::try_from(span).unwrap_or(Duration::ZERO))
            }
            _ => None,
        }
    }

    /// Returns the variant name, with the write kind for writes, for logs and the journal.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RequestToken { .. } => "RequestToken",
            Command::Write(write) => write.kind().as_str(),
            Command::ArmTimer { .. } => "ArmTimer",
            Command::Stop => "Stop",
        }
    }
}
