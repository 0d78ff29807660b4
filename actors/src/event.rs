//! Inputs to a binding's state machine.
//!
//! The watch actor, the token broker, the writer and the binding's own timer turn everything
//! they see into one of these events, addressed to one binding.

use jiff::Timestamp;

use crate::model::{DesiredBinding, InputsHash, IssuedToken, TokenError};
use crate::spec::InvalidSpec;
use crate::write::{ClusterWrite, ReadyCondition, StatusUpdate, WriteError};

/// One thing that happened to a binding.
#[derive(Clone, Debug, PartialEq)]
pub enum BindingEvent {
    /// The binding was listed, created or changed (including our own status writes).
    SpecObserved(ObservedBinding),
    /// The binding has a deletionTimestamp: clean up, then remove the finalizer.
    ///
    /// When a binding is first seen already terminating, deliver its `SpecObserved` first:
    /// the spec names the ServiceAccount whose reference must be removed.
    DeletionRequested,
    /// The binding is gone from the API server: stop the actor.
    BindingRemoved,
    /// The binding's Secret was listed, created or changed.
    SecretObserved(ObservedSecret),
    /// The binding's Secret was deleted.
    SecretGone {
        /// Name of the deleted Secret; a name other than the binding's Secret is ignored.
        name: String,
    },
    /// A ServiceAccount that this binding targets, or once targeted, was observed.
    ServiceAccountObserved(ObservedServiceAccount),
    /// A ServiceAccount that this binding targets, or once targeted, was deleted.
    ServiceAccountGone {
        /// Name of the deleted ServiceAccount.
        name: String,
    },
    /// The token broker returned a token for the inputs with this hash.
    TokenIssued {
        /// Hash of the inputs the token was requested for; a stale result is ignored.
        inputs_hash: InputsHash,
        /// The token and its validity window.
        token: IssuedToken,
    },
    /// The token broker failed for the inputs with this hash.
    TokenFailed {
        /// Hash of the inputs the token was requested for; a stale result is ignored.
        inputs_hash: InputsHash,
        /// The failure and whether a retry may help.
        error: TokenError,
    },
    /// The writer applied a write for this binding.
    WriteDone(ClusterWrite),
    /// The writer gave up on a write for this binding.
    WriteFailed {
        /// The write that failed.
        write: ClusterWrite,
        /// The cause of the failure.
        error: WriteError,
    },
    /// The binding's timer fired (refresh due or backoff over).
    TimerFired,
}

impl BindingEvent {
    /// Returns the variant name, such as `SpecObserved`, for logs and the journal.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            BindingEvent::SpecObserved(_) => "SpecObserved",
            BindingEvent::DeletionRequested => "DeletionRequested",
            BindingEvent::BindingRemoved => "BindingRemoved",
            BindingEvent::SecretObserved(_) => "SecretObserved",
            BindingEvent::SecretGone { .. } => "SecretGone",
            BindingEvent::ServiceAccountObserved(_) => "ServiceAccountObserved",
            BindingEvent::ServiceAccountGone { .. } => "ServiceAccountGone",
            BindingEvent::TokenIssued { .. } => "TokenIssued",
            BindingEvent::TokenFailed { .. } => "TokenFailed",
            BindingEvent::WriteDone(_) => "WriteDone",
            BindingEvent::WriteFailed { .. } => "WriteFailed",
            BindingEvent::TimerFired => "TimerFired",
        }
    }
}

/// Observation of an AcrPullBinding object by the watch.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedBinding {
    /// `metadata.generation`, reported back as the Ready condition's `observedGeneration`.
    pub generation: i64,
    /// The spec after defaults, or why it is invalid.
    pub spec: Result<DesiredBinding, InvalidSpec>,
    /// Whether our finalizer is present.
    pub has_finalizer: bool,
    /// The status currently stored on the object.
    pub status: ObservedStatus,
}

/// The status fields stored on the binding object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedStatus {
    /// `status.lastTokenRefreshTime`.
    pub last_token_refresh: Option<Timestamp>,
    /// `status.tokenExpirationTime`.
    pub token_expiration: Option<Timestamp>,
    /// `status.error`.
    pub error: Option<String>,
    /// The `Ready` condition, if present.
    pub ready: Option<ReadyCondition>,
}

impl From<&StatusUpdate> for ObservedStatus {
    fn from(update: &StatusUpdate) -> Self {
        Self {
            last_token_refresh: update.last_token_refresh,
            token_expiration: update.token_expiration,
            error: update.error.clone(),
            ready: Some(update.ready.clone()),
        }
    }
}

/// Observation of the binding's Secret by the watch.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedSecret {
    /// Name of the Secret. A labelled Secret whose name is not the binding's Secret name is
    /// ignored, so that a copy under another name is never taken for the binding's own.
    pub name: String,
    /// The inputs-hash annotation, if present.
    pub inputs_hash: Option<InputsHash>,
    /// The last-refresh annotation, if present and valid.
    pub refreshed_at: Option<Timestamp>,
    /// The token read back from `.dockerconfigjson`, when the Secret has the expected type,
    /// layout and server, and the password is a JWT with an `exp` claim. `None` means the
    /// Secret must be rewritten.
    pub token: Option<IssuedToken>,
    /// Whether the Secret is controlled by this binding (label and ownerReference).
    pub owned: bool,
}

/// Observation of a ServiceAccount by the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedServiceAccount {
    /// Name of the ServiceAccount.
    pub name: String,
    /// Whether its `imagePullSecrets` already lists the binding's Secret.
    pub references_secret: bool,
    /// Whether its `imagePullSecrets` lists a Secret name this binding used before
    /// (for example after the Secret was renamed).
    ///
    /// NOTE: the state machine does not act on this yet, because it carries no name to
    /// remove. Only the current Secret name is ever added or removed.
    pub references_other_owned_secret: bool,
}
