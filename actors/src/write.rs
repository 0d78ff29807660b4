//! Writes to the API server, which only the writer actor performs.

use std::time::Duration;

use jiff::Timestamp;

use crate::model::{BindingKey, InputsHash, IssuedToken};

/// One write for one binding. The writer coalesces queued writes with the same
/// [`ClusterWrite::coalesce_key`], keeping the newest.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterWrite {
    /// Add our finalizer to the binding.
    AddFinalizer,
    /// Create or update the binding's Secret (server-side apply).
    ApplySecret(SecretContent),
    /// Delete the binding's Secret; a missing Secret counts as done.
    DeleteSecret {
        /// Name of the Secret.
        name: String,
    },
    /// Add the Secret to a ServiceAccount's `imagePullSecrets`, keeping every other entry in
    /// its order.
    AddPullSecretReference {
        /// ServiceAccount to change.
        service_account: String,
        /// Secret name to add.
        secret_name: String,
    },
    /// Remove the Secret from a ServiceAccount's `imagePullSecrets`; a missing ServiceAccount
    /// counts as done.
    RemovePullSecretReference {
        /// ServiceAccount to change.
        service_account: String,
        /// Secret name to remove.
        secret_name: String,
    },
    /// Replace the binding's status.
    UpdateStatus(StatusUpdate),
    /// Record a Kubernetes Event on the binding.
    PublishEvent(Notice),
    /// Remove our finalizer from the binding; a missing binding counts as done.
    RemoveFinalizer,
}

/// Identity of the object a write changes, used to coalesce queued writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CoalesceKey {
    /// The binding's metadata (finalizer).
    BindingMetadata,
    /// The binding's status.
    BindingStatus,
    /// A Secret, by name.
    Secret(String),
    /// A ServiceAccount reference, by ServiceAccount and Secret name.
    Reference(String, String),
    /// Events are never coalesced; the sequence number keeps them apart.
    Event(u64),
}

/// The variant of a [`ClusterWrite`] without its data, for logs, metrics and test matchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKind {
    /// [`ClusterWrite::AddFinalizer`].
    AddFinalizer,
    /// [`ClusterWrite::ApplySecret`].
    ApplySecret,
    /// [`ClusterWrite::DeleteSecret`].
    DeleteSecret,
    /// [`ClusterWrite::AddPullSecretReference`].
    AddPullSecretReference,
    /// [`ClusterWrite::RemovePullSecretReference`].
    RemovePullSecretReference,
    /// [`ClusterWrite::UpdateStatus`].
    UpdateStatus,
    /// [`ClusterWrite::PublishEvent`].
    PublishEvent,
    /// [`ClusterWrite::RemoveFinalizer`].
    RemoveFinalizer,
}

impl WriteKind {
    /// Returns the variant name, such as `ApplySecret`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::AddFinalizer => "AddFinalizer",
            WriteKind::ApplySecret => "ApplySecret",
            WriteKind::DeleteSecret => "DeleteSecret",
            WriteKind::AddPullSecretReference => "AddPullSecretReference",
            WriteKind::RemovePullSecretReference => "RemovePullSecretReference",
            WriteKind::UpdateStatus => "UpdateStatus",
            WriteKind::PublishEvent => "PublishEvent",
            WriteKind::RemoveFinalizer => "RemoveFinalizer",
        }
    }
}

impl ClusterWrite {
    /// Returns the variant without its data.
    #[must_use]
    pub fn kind(&self) -> WriteKind {
        match self {
            ClusterWrite::AddFinalizer => WriteKind::AddFinalizer,
            ClusterWrite::ApplySecret(_) => WriteKind::ApplySecret,
            ClusterWrite::DeleteSecret { .. } => WriteKind::DeleteSecret,
            ClusterWrite::AddPullSecretReference { .. } => WriteKind::AddPullSecretReference,
            ClusterWrite::RemovePullSecretReference { .. } => WriteKind::RemovePullSecretReference,
            ClusterWrite::UpdateStatus(_) => WriteKind::UpdateStatus,
            ClusterWrite::PublishEvent(_) => WriteKind::PublishEvent,
            ClusterWrite::RemoveFinalizer => WriteKind::RemoveFinalizer,
        }
    }

    /// Returns whether the writer sends this write before status updates and events.
    ///
    /// Everything that pods or deletion wait on is urgent: the finalizer, the Secret and the
    /// ServiceAccount references. Status and events only report.
    #[must_use]
    pub fn is_urgent(&self) -> bool {
        !matches!(
            self,
            ClusterWrite::UpdateStatus(_) | ClusterWrite::PublishEvent(_)
        )
    }

    /// Returns the key under which a newer queued write replaces an older one.
    #[must_use]
    pub fn coalesce_key(&self, sequence: u64) -> CoalesceKey {
        match self {
            ClusterWrite::AddFinalizer | ClusterWrite::RemoveFinalizer => {
                CoalesceKey::BindingMetadata
            }
            ClusterWrite::ApplySecret(content) => CoalesceKey::Secret(content.name.clone()),
            ClusterWrite::DeleteSecret { name } => CoalesceKey::Secret(name.clone()),
            ClusterWrite::AddPullSecretReference {
                service_account,
                secret_name,
            }
            | ClusterWrite::RemovePullSecretReference {
                service_account,
                secret_name,
            } => CoalesceKey::Reference(service_account.clone(), secret_name.clone()),
            ClusterWrite::UpdateStatus(_) => CoalesceKey::BindingStatus,
            ClusterWrite::PublishEvent(_) => CoalesceKey::Event(sequence),
        }
    }
}

/// Everything the Secret adapter needs to render the Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretContent {
    /// Secret name.
    pub name: String,
    /// Registry host name, the key under `auths`.
    pub acr_server: String,
    /// The token, written as the password.
    pub token: IssuedToken,
    /// Written as an annotation so that a restart can tell whether the spec changed.
    pub inputs_hash: InputsHash,
    /// Written as the last-refresh annotation.
    pub refreshed_at: Timestamp,
}

/// The binding's whole status, as the writer stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// `status.lastTokenRefreshTime`.
    pub last_token_refresh: Option<Timestamp>,
    /// `status.tokenExpirationTime`.
    pub token_expiration: Option<Timestamp>,
    /// `status.error`; `None` clears it.
    pub error: Option<String>,
    /// The `Ready` condition.
    pub ready: ReadyCondition,
}

/// The `Ready` condition of a binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyCondition {
    /// Whether the Secret holds a valid token and the ServiceAccount references it.
    pub ready: bool,
    /// CamelCase reason, for example `TokenRefreshed` or `ServiceAccountNotFound`.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// The binding generation this condition describes.
    pub observed_generation: i64,
}

/// A Kubernetes Event to record on the binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message; never contains a token.
    pub message: String,
}

/// Failure of a write after the writer's own retries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WriteError {
    /// Description of the failure, fit for a status field.
    pub message: String,
    /// The failure class, which decides how the caller reacts.
    pub kind: WriteErrorKind,
}

/// Classes of write failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteErrorKind {
    /// 409: the object changed underneath; retried by re-reading.
    Conflict,
    /// 429 or 5xx; retried after the delay, if the server gave one.
    Throttled(Option<Duration>),
    /// 404: the target object does not exist (for example the ServiceAccount).
    NotFound,
    /// Anything else (validation, forbidden): retrying the same write will not help.
    Rejected,
}

/// A write addressed to one binding, as the writer actor receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRequest {
    /// The binding the write belongs to.
    pub key: BindingKey,
    /// The write itself.
    pub write: ClusterWrite,
}
