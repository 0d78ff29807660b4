//! A binding's state: a fold over the events it received and the commands it issued.
//!
//! [`BindingState::apply`] folds in an event, [`BindingState::record`] folds in a command that
//! [`crate::decide::decide`] returned. Nothing else changes the state, so replaying the same
//! events and commands rebuilds the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;

use crate::clock::whole_seconds;
use crate::command::{Command, TimerPurpose};
use crate::event::{
    BindingEvent, ObservedBinding, ObservedSecret, ObservedServiceAccount, ObservedStatus,
};
use crate::model::{BindingKey, DesiredBinding, InputsHash, IssuedToken, TokenError};
use crate::refresh::RefreshPolicy;
use crate::spec::InvalidSpec;
use crate::write::{ClusterWrite, CoalesceKey, StatusUpdate, WriteError, WriteErrorKind};

/// Everything that [`crate::decide::decide`] needs to know about one binding.
#[derive(Clone, Debug, PartialEq)]
pub struct BindingState {
    /// The binding this state belongs to; named in status messages and events.
    pub key: BindingKey,
    /// `metadata.generation` of the last observed binding, reported as the Ready condition's
    /// `observedGeneration`.
    pub generation: i64,
    /// The last observed spec: `None` until the first `SpecObserved`, then the resolved spec
    /// or why it is invalid.
    pub spec: Option<Result<DesiredBinding, InvalidSpec>>,
    /// Whether our finalizer is on the binding, as last observed or written.
    pub finalizer: FinalizerState,
    /// Whether the binding has a deletionTimestamp. Once set it stays set, because a
    /// deletion cannot be undone.
    pub deleting: bool,
    /// The token written, or to be written, into the Secret. It comes from our own issuance,
    /// or is adopted from an owned Secret after a restart, which avoids an Azure call.
    pub token: Option<HeldToken>,
    /// Name of the binding's Secret, from the last valid spec or else from an observed owned
    /// Secret. It survives an invalid spec so that deletion can still remove the Secret.
    pub secret_name: Option<String>,
    /// The Secret in the cluster, compared with [`Self::token`].
    pub secret: SecretState,
    /// The `imagePullSecrets` entry that the last valid spec requests. It survives an invalid
    /// spec so that deletion can still remove it.
    pub target: Option<PullSecretReference>,
    /// Whether the target ServiceAccount lists the Secret.
    pub target_state: ReferenceState,
    /// Entries this binding added earlier and must remove, after `serviceAccountName`
    /// changed.
    pub stale_references: BTreeSet<PullSecretReference>,
    /// Inputs hash of the token request in flight; at most one is in flight at a time.
    pub in_flight: Option<InputsHash>,
    /// Consecutive failed token requests for the current inputs; a usable token resets it.
    pub token_failures: u32,
    /// The last token failure, reported in status until a usable token arrives.
    pub token_error: Option<TokenError>,
    /// Writes sent to the writer whose outcome has not arrived yet, by the object they change.
    /// Events are not tracked, because they are never retried.
    pub pending_writes: BTreeMap<CoalesceKey, ClusterWrite>,
    /// Writes that failed and are re-sent after the backoff delay, by the object they change.
    /// A successful write to the same object clears the entry.
    pub write_failures: BTreeMap<CoalesceKey, WriteFailure>,
    /// A failure recorded by the last event that still needs a retry instant. `decide`
    /// schedules it, and recording the resulting `ArmTimer` clears it.
    pub unscheduled_retry: Option<RetryRequest>,
    /// Until this instant, no token request goes out and no failed write is re-sent. The
    /// timer is armed for it, and `TimerFired` at or after it clears it.
    pub retry_at: Option<Timestamp>,
    /// The instant the binding's single timer is armed for.
    pub timer_at: Option<Timestamp>,
    /// The status last observed on the binding or written by us; compared with the desired
    /// status so that an unchanged status is never written again.
    pub status: Option<ObservedStatus>,
    /// Cleanup writes (reference removals and the Secret deletion) that failed during
    /// deletion. At the configured limit the finalizer is removed anyway.
    pub cleanup_failures: u32,
}

/// A registry token with what the state machine needs to know about it.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldToken {
    /// The token and its validity window.
    pub token: IssuedToken,
    /// Hash of the inputs it was issued for.
    pub inputs_hash: InputsHash,
    /// When it was received, in whole seconds; written as the Secret's last-refresh
    /// annotation and as `status.lastTokenRefreshTime`.
    pub refreshed_at: Timestamp,
    /// Number of completed Secret writes with this token. An adopted token starts at 1,
    /// because it was read from a stored Secret.
    pub store_count: u32,
}

/// Whether our finalizer is on the binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalizerState {
    /// Not known yet, for example for an actor started by `DeletionRequested`.
    Unknown,
    /// Observed on the binding, or added by us.
    Present,
    /// Observed missing, or removed by us.
    Absent,
}

/// The state of the Secret in the cluster, compared with the held token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretState {
    /// Not observed since the actor started.
    Unknown,
    /// Observed deleted, or deleted by us.
    Missing,
    /// Contains the held token and its inputs hash.
    Current,
    /// Exists but must be rewritten: edited by hand, unreadable, or holding an older token.
    Outdated,
    /// Exists and is not controlled by this binding, so it is never written or deleted.
    NotOwned,
}

/// Whether the target ServiceAccount lists the binding's Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceState {
    /// Not observed since the target was set.
    Unknown,
    /// Listed, as observed or written by us.
    Referenced,
    /// The ServiceAccount exists and does not list the Secret.
    NotReferenced,
    /// The ServiceAccount does not exist.
    ServiceAccountMissing,
}

/// One `imagePullSecrets` entry: a Secret name in a ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PullSecretReference {
    /// The ServiceAccount.
    pub service_account: String,
    /// The Secret it lists.
    pub secret_name: String,
}

/// A write that failed, with the attempt count that drives its backoff.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteFailure {
    /// The write that failed.
    pub write: ClusterWrite,
    /// Consecutive failures for the same object.
    pub attempts: u32,
    /// The last error.
    pub error: WriteError,
}

/// The inputs that `decide` needs to compute a retry instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryRequest {
    /// Consecutive failures of the thing being retried.
    pub attempts: u32,
    /// The delay the server asked for, used as a floor.
    pub retry_after: Option<Duration>,
    /// Whether an early retry may help. A failure that will not go away by itself is retried
    /// at the maximum delay, in case someone fixes the cause.
    pub retryable: bool,
}

impl PullSecretReference {
    /// Builds a reference from a ServiceAccount and a Secret name.
    pub fn new(service_account: impl Into<String>, secret_name: impl Into<String>) -> Self {
        Self {
            service_account: service_account.into(),
            secret_name: secret_name.into(),
        }
    }
}

impl BindingState {
    /// Creates the state of a binding that has seen no event yet.
    #[must_use]
    pub fn new(key: BindingKey) -> Self {
        Self {
            key,
            generation: 0,
            spec: None,
            finalizer: FinalizerState::Unknown,
            deleting: false,
            token: None,
            secret_name: None,
            secret: SecretState::Unknown,
            target: None,
            target_state: ReferenceState::Unknown,
            stale_references: BTreeSet::new(),
            in_flight: None,
            token_failures: 0,
            token_error: None,
            pending_writes: BTreeMap::new(),
            write_failures: BTreeMap::new(),
            unscheduled_retry: None,
            retry_at: None,
            timer_at: None,
            status: None,
            cleanup_failures: 0,
        }
    }

    /// Returns the resolved spec, if the last observed spec is valid.
    #[must_use]
    pub fn desired(&self) -> Option<&DesiredBinding> {
        self.spec.as_ref().and_then(|spec| spec.as_ref().ok())
    }

    /// Returns the held token if it was issued for the current spec and is still fresh.
    #[must_use]
    pub fn usable_token(&self, policy: &RefreshPolicy, now: Timestamp) -> Option<&HeldToken> {
        let wanted = self.desired()?.inputs_hash();
        self.token
            .as_ref()
            .filter(|held| held.inputs_hash == wanted && policy.is_fresh(&held.token, now))
    }

    /// Returns whether a failure holds back token requests and failed writes.
    #[must_use]
    pub fn is_backing_off(&self) -> bool {
        self.retry_at.is_some() || self.unscheduled_retry.is_some()
    }

    /// Returns the status update in flight, if any.
    #[must_use]
    pub fn pending_status(&self) -> Option<&StatusUpdate> {
        match self.pending_writes.get(&CoalesceKey::BindingStatus) {
            Some(ClusterWrite::UpdateStatus(update)) => Some(update),
            _ => None,
        }
    }

    /// Folds one event into the state. `now` is the time the event is handled.
    pub fn apply(&mut self, event: &BindingEvent, now: Timestamp) {
        match event {
            BindingEvent::SpecObserved(observed) => self.observe_spec(observed),
            BindingEvent::DeletionRequested => self.deleting = true,
            BindingEvent::BindingRemoved => {}
            BindingEvent::SecretObserved(secret) => self.observe_secret(secret),
            BindingEvent::SecretGone { name } => {
                if self.is_own_secret(name) {
                    self.secret = SecretState::Missing;
                }
            }
            BindingEvent::ServiceAccountObserved(account) => self.observe_service_account(account),
            BindingEvent::ServiceAccountGone { name } => self.forget_service_account(name),
            BindingEvent::TokenIssued { inputs_hash, token } => {
                self.accept_token(inputs_hash, token, now);
            }
            BindingEvent::TokenFailed { inputs_hash, error } => {
                self.record_token_failure(inputs_hash, error);
            }
            BindingEvent::WriteDone(write) => self.complete_write(write),
            BindingEvent::WriteFailed { write, error } => self.fail_write(write, error),
            BindingEvent::TimerFired => {
                self.timer_at = None;
                if self.retry_at.is_some_and(|at| at <= now) {
                    self.retry_at = None;
                }
            }
        }
    }

    /// Folds one command that `decide` returned into the state.
    pub fn record(&mut self, command: &Command) {
        match command {
            Command::RequestToken { inputs_hash, .. } => self.in_flight = Some(inputs_hash.clone()),
            Command::Write(ClusterWrite::PublishEvent(_)) | Command::Stop => {}
            Command::Write(write) => {
                self.pending_writes
                    .insert(write.coalesce_key(0), write.clone());
            }
            Command::ArmTimer { at, purpose } => {
                self.timer_at = Some(*at);
                if *purpose == TimerPurpose::Retry {
                    self.retry_at = Some(*at);
                    self.unscheduled_retry = None;
                }
            }
        }
    }

    fn observe_spec(&mut self, observed: &ObservedBinding) {
        self.generation = observed.generation;
        self.finalizer = if observed.has_finalizer {
            FinalizerState::Present
        } else {
            FinalizerState::Absent
        };
        self.status = Some(observed.status.clone());

        if let Ok(desired) = &observed.spec {
            // New token inputs are a new request: failures of the old inputs do not apply to
            // them, so their error and backoff are dropped.
            let previous_hash = match &self.spec {
                Some(Ok(previous)) => Some(previous.inputs_hash()),
                _ => None,
            };
            if previous_hash.is_some_and(|hash| hash != desired.inputs_hash()) {
                self.token_failures = 0;
                self.token_error = None;
                self.unscheduled_retry = None;
                self.retry_at = None;
            }

            if self.secret_name.as_deref() != Some(desired.secret_name.as_str()) {
                // A different name is a different object, so observations of the old one do
                // not describe the new one.
                if self.secret_name.is_some() {
                    self.secret = SecretState::Unknown;
                }
                self.secret_name = Some(desired.secret_name.clone());
            }
            self.retarget(PullSecretReference::new(
                &desired.service_account,
                &desired.secret_name,
            ));

            // Ready=True is only written while the target lists the Secret, and the same
            // generation means the same target. Trusting it lets a restart send no write. A
            // ServiceAccount event that reports otherwise still wins.
            let ready_now = observed.status.ready.as_ref().is_some_and(|ready| {
                ready.ready && ready.observed_generation == observed.generation
            });
            if ready_now && self.target_state == ReferenceState::Unknown {
                self.target_state = ReferenceState::Referenced;
            }
        }
        self.spec = Some(observed.spec.clone());
    }

    /// Points the binding at a new `imagePullSecrets` entry; the old one becomes stale unless
    /// the old ServiceAccount is known not to list it.
    fn retarget(&mut self, target: PullSecretReference) {
        if self.target.as_ref() == Some(&target) {
            return;
        }

        if let Some(previous) = self.target.take() {
            let listed = !matches!(
                self.target_state,
                ReferenceState::NotReferenced | ReferenceState::ServiceAccountMissing
            );
            if listed {
                self.stale_references.insert(previous);
            }
        }
        self.stale_references.remove(&target);
        self.target = Some(target);
        self.target_state = ReferenceState::Unknown;
    }

    fn is_own_secret(&self, name: &str) -> bool {
        self.secret_name.as_deref().is_none_or(|own| own == name)
    }

    fn observe_secret(&mut self, secret: &ObservedSecret) {
        if !self.is_own_secret(&secret.name) {
            return;
        }
        // Before the spec names the Secret, the observed name is used in its place, so that a spec
        // naming another Secret later resets what was seen.
        if self.secret_name.is_none() {
            self.secret_name = Some(secret.name.clone());
        }
        if !secret.owned {
            self.secret = SecretState::NotOwned;
            return;
        }

        let (Some(token), Some(hash)) = (&secret.token, &secret.inputs_hash) else {
            self.secret = SecretState::Outdated;
            return;
        };

        let holds_same = self
            .token
            .as_ref()
            .is_some_and(|held| held.token == *token && held.inputs_hash == *hash);
        if holds_same {
            self.secret = SecretState::Current;
        } else if self.should_adopt(token, hash) {
            self.token = Some(HeldToken {
                token: token.clone(),
                inputs_hash: hash.clone(),
                refreshed_at: secret.refreshed_at.unwrap_or(token.issued_at),
                store_count: 1,
            });
            self.secret = SecretState::Current;
        } else {
            self.secret = SecretState::Outdated;
        }
    }

    /// Returns whether a token read from the Secret should replace the held one: always when
    /// nothing is held, else when it fits the spec better or expires later. While a Secret
    /// write is in flight the observation is older than that write, so it never wins.
    fn should_adopt(&self, token: &IssuedToken, hash: &InputsHash) -> bool {
        let Some(held) = &self.token else {
            return true;
        };
        if self.secret_name.as_ref().is_some_and(|name| {
            self.pending_writes
                .contains_key(&CoalesceKey::Secret(name.clone()))
        }) {
            return false;
        }

        let wanted = self.desired().map(DesiredBinding::inputs_hash);
        let rank = |hash: &InputsHash, token: &IssuedToken| {
            (Some(hash) == wanted.as_ref(), token.expires_at)
        };
        rank(hash, token) > rank(&held.inputs_hash, &held.token)
    }

    fn observe_service_account(&mut self, account: &ObservedServiceAccount) {
        if let Some(target) = &self.target
            && target.service_account == account.name
        {
            self.target_state = if account.references_secret {
                ReferenceState::Referenced
            } else {
                ReferenceState::NotReferenced
            };
        }
        if !account.references_secret {
            self.stale_references
                .retain(|stale| stale.service_account != account.name);
        }
    }

    fn forget_service_account(&mut self, name: &str) {
        if self
            .target
            .as_ref()
            .is_some_and(|target| target.service_account == name)
        {
            self.target_state = ReferenceState::ServiceAccountMissing;
        }
        self.stale_references
            .retain(|stale| stale.service_account != name);
    }

    /// Ends the request in flight for `inputs_hash`. Returns `false` for a result that matches
    /// no request in flight or no longer matters, because the binding is being deleted or the
    /// spec changed.
    fn end_request(&mut self, inputs_hash: &InputsHash) -> bool {
        if self.in_flight.as_ref() != Some(inputs_hash) {
            return false;
        }
        self.in_flight = None;

        let wanted = self.desired().map(DesiredBinding::inputs_hash);
        !self.deleting && wanted.as_ref() == Some(inputs_hash)
    }

    fn accept_token(&mut self, inputs_hash: &InputsHash, token: &IssuedToken, now: Timestamp) {
        if !self.end_request(inputs_hash) {
            return;
        }

        let already_held = self
            .token
            .as_ref()
            .is_some_and(|held| held.token == *token && held.inputs_hash == *inputs_hash);
        if !already_held {
            self.token = Some(HeldToken {
                token: token.clone(),
                inputs_hash: inputs_hash.clone(),
                refreshed_at: whole_seconds(now),
                store_count: 0,
            });
            if self.secret == SecretState::Current {
                self.secret = SecretState::Outdated;
            }
        }
        self.token_failures = 0;
        self.token_error = None;

        // Each refresh checks a missing ServiceAccount again, in case its watch event was lost.
        if self.target_state == ReferenceState::ServiceAccountMissing {
            self.target_state = ReferenceState::Unknown;
        }
    }

    fn record_token_failure(&mut self, inputs_hash: &InputsHash, error: &TokenError) {
        if !self.end_request(inputs_hash) {
            return;
        }

        self.token_failures += 1;
        self.token_error = Some(error.clone());
        self.request_retry(RetryRequest {
            attempts: self.token_failures,
            retry_after: error.retry_after,
            retryable: error.retryable,
        });
    }

    fn request_retry(&mut self, request: RetryRequest) {
        let merged = match self.unscheduled_retry {
            Some(earlier) => RetryRequest {
                attempts: earlier.attempts.max(request.attempts),
                retry_after: earlier.retry_after.max(request.retry_after),
                retryable: earlier.retryable && request.retryable,
            },
            None => request,
        };
        self.unscheduled_retry = Some(merged);
    }

    fn complete_write(&mut self, write: &ClusterWrite) {
        if matches!(write, ClusterWrite::PublishEvent(_)) {
            return;
        }

        let key = write.coalesce_key(0);
        if self.pending_writes.get(&key) == Some(write) {
            self.pending_writes.remove(&key);
        }
        self.write_failures.remove(&key);

        match write {
            ClusterWrite::AddFinalizer => self.finalizer = FinalizerState::Present,
            ClusterWrite::RemoveFinalizer => self.finalizer = FinalizerState::Absent,
            ClusterWrite::ApplySecret(content) => {
                if !self.is_own_secret(&content.name) {
                    return;
                }
                match &mut self.token {
                    Some(held)
                        if held.token == content.token
                            && held.inputs_hash == content.inputs_hash =>
                    {
                        held.store_count += 1;
                        self.secret = SecretState::Current;
                    }
                    _ => self.secret = SecretState::Outdated,
                }
            }
            ClusterWrite::DeleteSecret { name } => {
                if self.is_own_secret(name) {
                    self.secret = SecretState::Missing;
                }
            }
            ClusterWrite::AddPullSecretReference {
                service_account,
                secret_name,
            } => {
                if self.is_target(service_account, secret_name) {
                    self.target_state = ReferenceState::Referenced;
                }
            }
            ClusterWrite::RemovePullSecretReference {
                service_account,
                secret_name,
            } => {
                if self.is_target(service_account, secret_name) {
                    self.target_state = ReferenceState::NotReferenced;
                }
                self.stale_references
                    .remove(&PullSecretReference::new(service_account, secret_name));
            }
            ClusterWrite::UpdateStatus(update) => self.status = Some(ObservedStatus::from(update)),
            ClusterWrite::PublishEvent(_) => {}
        }
    }

    fn is_target(&self, service_account: &str, secret_name: &str) -> bool {
        self.target.as_ref().is_some_and(|target| {
            target.service_account == service_account && target.secret_name == secret_name
        })
    }

    fn fail_write(&mut self, write: &ClusterWrite, error: &WriteError) {
        if matches!(write, ClusterWrite::PublishEvent(_)) {
            return;
        }

        let key = write.coalesce_key(0);
        if self.pending_writes.get(&key) != Some(write) {
            // An older write failed; the newer one for the same object is still on its way.
            return;
        }
        self.pending_writes.remove(&key);

        if error.kind == WriteErrorKind::NotFound && self.absorb_not_found(write) {
            return;
        }

        let attempts = self
            .write_failures
            .get(&key)
            .map_or(0, |failure| failure.attempts)
            + 1;
        self.write_failures.insert(
            key,
            WriteFailure {
                write: write.clone(),
                attempts,
                error: error.clone(),
            },
        );
        if self.deleting && is_cleanup(write) {
            self.cleanup_failures += 1;
        }

        let retry_after = match error.kind {
            WriteErrorKind::Throttled(delay) => delay,
            _ => None,
        };
        self.request_retry(RetryRequest {
            attempts,
            retry_after,
            retryable: error.kind != WriteErrorKind::Rejected,
        });
    }

    /// Applies a 404 that is an outcome rather than a failure, and returns whether it was one.
    fn absorb_not_found(&mut self, write: &ClusterWrite) -> bool {
        match write {
            ClusterWrite::AddPullSecretReference {
                service_account,
                secret_name,
            } => {
                if self.is_target(service_account, secret_name) {
                    self.target_state = ReferenceState::ServiceAccountMissing;
                }
                true
            }
            ClusterWrite::RemovePullSecretReference {
                service_account, ..
            } => {
                self.forget_service_account(service_account);
                true
            }
            ClusterWrite::DeleteSecret { name } => {
                if self.is_own_secret(name) {
                    self.secret = SecretState::Missing;
                }
                true
            }
            ClusterWrite::RemoveFinalizer => {
                self.finalizer = FinalizerState::Absent;
                true
            }
            _ => false,
        }
    }
}

/// Returns whether a write is part of deletion cleanup, whose failures are bounded.
#[must_use]
pub fn is_cleanup(write: &ClusterWrite) -> bool {
    matches!(
        write,
        ClusterWrite::DeleteSecret { .. } | ClusterWrite::RemovePullSecretReference { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Identity, RegistryToken};

    const T0: &str = "2025-01-01T00:00:00Z";

    fn at(offset_secs: i64) -> Timestamp {
        T0.parse::<Timestamp>().unwrap() + jiff::SignedDuration::from_secs(offset_secs)
    }

    fn desired(service_account: &str) -> DesiredBinding {
        DesiredBinding {
            acr_server: "example.azurecr.io".into(),
            identity: Identity::ClientId("11111111-2222-3333-4444-555555555555".into()),
            scope: None,
            service_account: service_account.into(),
            secret_name: "app-msi-acrpull-secret".into(),
        }
    }

    fn spec_event(service_account: &str) -> BindingEvent {
        BindingEvent::SpecObserved(ObservedBinding {
            generation: 1,
            spec: Ok(desired(service_account)),
            has_finalizer: true,
            status: ObservedStatus::default(),
        })
    }

    fn issued(value: &str, issued: i64, lifetime: i64) -> IssuedToken {
        IssuedToken {
            token: RegistryToken::new(value.into()),
            issued_at: at(issued),
            expires_at: at(issued + lifetime),
        }
    }

    fn observed_secret(
        token: Option<IssuedToken>,
        hash: Option<InputsHash>,
        owned: bool,
    ) -> ObservedSecret {
        ObservedSecret {
            name: "app-msi-acrpull-secret".into(),
            inputs_hash: hash,
            refreshed_at: Some(at(5)),
            token,
            owned,
        }
    }

    fn state() -> BindingState {
        BindingState::new(BindingKey::new("ns", "app"))
    }

    #[test]
    fn spec_change_marks_old_reference_stale() {
        let mut state = state();
        state.apply(&spec_event("a"), at(0));
        state.target_state = ReferenceState::Referenced;

        state.apply(&spec_event("b"), at(1));

        let previous = PullSecretReference::new("a", "app-msi-acrpull-secret");
        assert!(state.stale_references.contains(&previous));
        assert_eq!(
            state.target,
            Some(PullSecretReference::new("b", "app-msi-acrpull-secret"))
        );
        assert_eq!(state.target_state, ReferenceState::Unknown);
    }

    #[test]
    fn spec_change_back_clears_stale_entry() {
        let mut state = state();
        state.apply(&spec_event("a"), at(0));
        state.apply(&spec_event("b"), at(1));
        state.apply(&spec_event("a"), at(2));

        assert_eq!(
            state.stale_references.iter().collect::<Vec<_>>(),
            vec![&PullSecretReference::new("b", "app-msi-acrpull-secret")]
        );
    }

    #[test]
    fn unreferencing_old_account_is_not_stale() {
        let mut state = state();
        state.apply(&spec_event("a"), at(0));
        state.target_state = ReferenceState::NotReferenced;

        state.apply(&spec_event("b"), at(1));

        assert!(state.stale_references.is_empty());
    }

    #[test]
    fn secret_adoption_table() {
        let hash = desired("default").inputs_hash();
        let other_hash = InputsHash("other".into());
        let cases = [
            // (held token, observed token, observed hash, expected state, expected held value)
            (
                None,
                Some(issued("seen", 0, 4500)),
                Some(hash.clone()),
                SecretState::Current,
                Some("seen"),
            ),
            (None, None, Some(hash.clone()), SecretState::Outdated, None),
            (
                None,
                Some(issued("seen", 0, 4500)),
                None,
                SecretState::Outdated,
                None,
            ),
            (
                Some(issued("held", 0, 4500)),
                Some(issued("held", 0, 4500)),
                Some(hash.clone()),
                SecretState::Current,
                Some("held"),
            ),
            (
                Some(issued("held", 0, 4500)),
                Some(issued("newer", 100, 4500)),
                Some(hash.clone()),
                SecretState::Current,
                Some("newer"),
            ),
            (
                Some(issued("held", 100, 4500)),
                Some(issued("older", 0, 4500)),
                Some(hash.clone()),
                SecretState::Outdated,
                Some("held"),
            ),
            (
                Some(issued("held", 0, 4500)),
                Some(issued("newer-other", 100, 4500)),
                Some(other_hash),
                SecretState::Outdated,
                Some("held"),
            ),
        ];

        for (held, token, observed_hash, expected_state, expected_held) in cases {
            let mut state = state();
            state.apply(&spec_event("default"), at(0));
            state.token = held.map(|token| HeldToken {
                token,
                inputs_hash: hash.clone(),
                refreshed_at: at(0),
                store_count: 1,
            });

            let description = format!("observed {token:?} / {observed_hash:?}");
            state.apply(
                &BindingEvent::SecretObserved(observed_secret(token, observed_hash, true)),
                at(10),
            );

            assert_eq!(state.secret, expected_state, "{description}");
            assert_eq!(
                state
                    .token
                    .as_ref()
                    .map(|held| held.token.token.expose().to_owned()),
                expected_held.map(str::to_owned),
                "{description}"
            );
        }
    }

    #[test]
    fn adopted_token_keeps_annotation_time() {
        let mut state = state();
        let hash = desired("default").inputs_hash();
        state.apply(
            &BindingEvent::SecretObserved(observed_secret(
                Some(issued("seen", 0, 4500)),
                Some(hash),
                true,
            )),
            at(100),
        );

        let held = state.token.unwrap();
        assert_eq!(held.refreshed_at, at(5));
        assert_eq!(held.store_count, 1);
    }

    #[test]
    fn foreign_secret_is_not_owned() {
        let mut state = state();
        state.apply(&spec_event("default"), at(0));
        state.apply(
            &BindingEvent::SecretObserved(observed_secret(Some(issued("x", 0, 4500)), None, false)),
            at(1),
        );

        assert_eq!(state.secret, SecretState::NotOwned);
        assert!(state.token.is_none());
    }

    #[test]
    fn early_foreign_secret_with_other_name_is_forgotten() {
        let mut state = state();
        let mut foreign = observed_secret(None, None, false);
        foreign.name = "someone-elses".into();
        state.apply(&BindingEvent::SecretObserved(foreign), at(0));
        assert_eq!(state.secret, SecretState::NotOwned);

        state.apply(&spec_event("default"), at(1));

        assert_eq!(state.secret, SecretState::Unknown);
        assert_eq!(state.secret_name.as_deref(), Some("app-msi-acrpull-secret"));
    }

    #[test]
    fn secret_with_other_name_is_ignored() {
        let mut state = state();
        state.apply(&spec_event("default"), at(0));
        let mut secret = observed_secret(None, None, true);
        secret.name = "copy".into();

        state.apply(&BindingEvent::SecretObserved(secret), at(1));
        state.apply(
            &BindingEvent::SecretGone {
                name: "copy".into(),
            },
            at(1),
        );

        assert_eq!(state.secret, SecretState::Unknown);
    }

    #[test]
    fn token_answer_without_request_is_ignored() {
        let mut state = state();
        state.apply(&spec_event("default"), at(0));
        let hash = desired("default").inputs_hash();

        state.apply(
            &BindingEvent::TokenIssued {
                inputs_hash: hash,
                token: issued("t", 0, 4500),
            },
            at(1),
        );

        assert!(state.token.is_none());
    }

    #[test]
    fn stale_token_answer_ends_request_only() {
        let mut state = state();
        state.apply(&spec_event("default"), at(0));
        let old_hash = InputsHash("old".into());
        state.in_flight = Some(old_hash.clone());

        state.apply(
            &BindingEvent::TokenFailed {
                inputs_hash: old_hash,
                error: TokenError {
                    message: "boom".into(),
                    retryable: true,
                    retry_after: None,
                },
            },
            at(1),
        );

        assert!(state.in_flight.is_none());
        assert_eq!(state.token_failures, 0);
        assert!(state.unscheduled_retry.is_none());
    }

    #[test]
    fn older_write_failure_is_ignored() {
        let mut state = state();
        let newer = ClusterWrite::RemoveFinalizer;
        state.record(&Command::Write(newer));

        state.apply(
            &BindingEvent::WriteFailed {
                write: ClusterWrite::AddFinalizer,
                error: WriteError {
                    message: "conflict".into(),
                    kind: WriteErrorKind::Conflict,
                },
            },
            at(1),
        );

        assert!(
            state
                .pending_writes
                .contains_key(&CoalesceKey::BindingMetadata)
        );
        assert!(state.write_failures.is_empty());
    }

    #[test]
    fn not_found_answers_table() {
        let cases = [
            (
                ClusterWrite::AddPullSecretReference {
                    service_account: "default".into(),
                    secret_name: "app-msi-acrpull-secret".into(),
                },
                "target missing",
            ),
            (
                ClusterWrite::DeleteSecret {
                    name: "app-msi-acrpull-secret".into(),
                },
                "secret missing",
            ),
            (ClusterWrite::RemoveFinalizer, "finalizer absent"),
        ];
        for (write, expected) in cases {
            let mut state = state();
            state.apply(&spec_event("default"), at(0));
            state.record(&Command::Write(write.clone()));

            state.apply(
                &BindingEvent::WriteFailed {
                    write: write.clone(),
                    error: WriteError {
                        message: "not found".into(),
                        kind: WriteErrorKind::NotFound,
                    },
                },
                at(1),
            );

            let reached = match expected {
                "target missing" => state.target_state == ReferenceState::ServiceAccountMissing,
                "secret missing" => state.secret == SecretState::Missing,
                _ => state.finalizer == FinalizerState::Absent,
            };
            assert!(reached, "{write:?} should leave {expected}");
            assert!(state.write_failures.is_empty(), "{write:?}");
            assert!(state.unscheduled_retry.is_none(), "{write:?}");
        }
    }

    #[test]
    fn timer_releases_due_retry_only() {
        let mut state = state();
        state.record(&Command::ArmTimer {
            at: at(10),
            purpose: TimerPurpose::Retry,
        });

        state.apply(&BindingEvent::TimerFired, at(5));
        assert_eq!(state.retry_at, Some(at(10)));
        assert_eq!(state.timer_at, None);

        state.apply(&BindingEvent::TimerFired, at(10));
        assert_eq!(state.retry_at, None);
    }
}
