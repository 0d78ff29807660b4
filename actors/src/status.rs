//! The status a binding should show, and the Kubernetes Events that go with a status change.
//!
//! Every text built here names the binding, the registry or the object involved, and never a
//! token: only timestamps and names are formatted.

use jiff::Timestamp;

use crate::clock::whole_seconds;
use crate::event::ObservedStatus;
use crate::model::DesiredBinding;
use crate::refresh::RefreshPolicy;
use crate::spec::InvalidSpec;
use crate::state::{BindingState, ReferenceState, SecretState};
use crate::write::{ClusterWrite, CoalesceKey, Notice, ReadyCondition, StatusUpdate};

/// Ready reason when the Secret contains a fresh token and the ServiceAccount lists it.
pub const REASON_TOKEN_REFRESHED: &str = "TokenRefreshed";
/// Ready reason when the last token request failed.
pub const REASON_TOKEN_REFRESH_FAILED: &str = "TokenRefreshFailed";
/// Ready reason when the spec cannot be used.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Ready reason when the target ServiceAccount does not exist.
pub const REASON_SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
/// Ready reason when a Secret with the binding's Secret name belongs to someone else.
pub const REASON_SECRET_NOT_OWNED: &str = "SecretNotOwned";
/// Ready reason when the writer gave up on a Secret, reference or finalizer write.
pub const REASON_WRITE_FAILED: &str = "WriteFailed";
/// Event reason when a Secret deleted or changed by hand was written again.
pub const REASON_SECRET_RESTORED: &str = "SecretRestored";
/// Event reason when deletion removed the finalizer without finishing its cleanup.
pub const REASON_CLEANUP_FAILED: &str = "CleanupFailed";

/// Returns the status the binding should show, or `None` while there is nothing new to
/// report: the spec is not observed yet, the binding is being deleted, or a token or a write
/// is still on its way.
#[must_use]
pub fn desired_status(
    state: &BindingState,
    policy: &RefreshPolicy,
    now: Timestamp,
) -> Option<StatusUpdate> {
    if state.deleting {
        return None;
    }

    let (error, ready, reason, message) = match state.spec.as_ref()? {
        Err(invalid) => {
            let error = invalid_spec_error(state, invalid);
            (Some(error.clone()), false, REASON_INVALID_SPEC, error)
        }
        Ok(desired) => {
            let (error, reason, message) = valid_spec_condition(state, desired, policy, now)?;
            (error.clone(), error.is_none(), reason, message)
        }
    };

    let (last_token_refresh, token_expiration) = status_times(state);
    Some(StatusUpdate {
        last_token_refresh,
        token_expiration,
        error,
        ready: ReadyCondition {
            ready,
            reason: reason.to_owned(),
            message,
            observed_generation: state.generation,
        },
    })
}

/// Returns `(error, reason, message)` for a binding with a valid spec, or `None` while work
/// is in progress.
fn valid_spec_condition(
    state: &BindingState,
    desired: &DesiredBinding,
    policy: &RefreshPolicy,
    now: Timestamp,
) -> Option<(Option<String>, &'static str, String)> {
    if state.secret == SecretState::NotOwned {
        let error = format!(
            "Secret {secret} in namespace {namespace} exists and is not controlled by binding {binding}: \
             delete or rename that Secret so that the controller can create its own",
            secret = desired.secret_name,
            namespace = state.key.namespace,
            binding = state.key.name,
        );
        return Some((Some(error.clone()), REASON_SECRET_NOT_OWNED, error));
    }

    if let Some(token_error) = &state.token_error {
        let kept = match &state.token {
            Some(held) => {
                let origin = if held.inputs_hash == desired.inputs_hash() {
                    ""
                } else {
                    ", issued for the previous spec,"
                };
                let tense = if held.token.expires_at <= now {
                    "expired"
                } else {
                    "expires"
                };
                format!(
                    " Secret {} keeps its previous token{origin} which {tense} at {}.",
                    desired.secret_name,
                    whole_seconds(held.token.expires_at)
                )
            }
            None => String::new(),
        };
        let error = format!(
            "token refresh for binding {binding} failed: registry {server} with identity {identity}: \
             {cause}.{kept} The controller retries with backoff.",
            binding = state.key,
            server = desired.acr_server,
            identity = desired.identity,
            cause = token_error.message.trim_end_matches('.'),
        );
        return Some((Some(error.clone()), REASON_TOKEN_REFRESH_FAILED, error));
    }

    if let Some(failure) = reported_write_failure(state) {
        let error = format!(
            "writing {object} for binding {binding} failed: {cause}; the controller retries with backoff",
            object = describe_object(&failure.write),
            binding = state.key,
            cause = failure.error.message,
        );
        return Some((Some(error.clone()), REASON_WRITE_FAILED, error));
    }

    state.usable_token(policy, now)?;
    if state.secret != SecretState::Current {
        return None;
    }

    match state.target_state {
        ReferenceState::Referenced => {
            let message = format!(
                "Secret {secret} holds a registry token for {server}, and ServiceAccount {account} \
                 lists it in imagePullSecrets",
                secret = desired.secret_name,
                server = desired.acr_server,
                account = desired.service_account,
            );
            Some((None, REASON_TOKEN_REFRESHED, message))
        }
        ReferenceState::ServiceAccountMissing => {
            let error = format!(
                "ServiceAccount {account} not found in namespace {namespace}: create it, and the \
                 controller adds Secret {secret} to its imagePullSecrets",
                account = desired.service_account,
                namespace = state.key.namespace,
                secret = desired.secret_name,
            );
            Some((Some(error.clone()), REASON_SERVICE_ACCOUNT_NOT_FOUND, error))
        }
        ReferenceState::Unknown | ReferenceState::NotReferenced => None,
    }
}

fn invalid_spec_error(state: &BindingState, invalid: &InvalidSpec) -> String {
    format!("binding {} has an invalid spec: {invalid}", state.key)
}

/// Returns the first failed write that the status reports. A failed status update cannot
/// report itself, so it is left out.
fn reported_write_failure(state: &BindingState) -> Option<&crate::state::WriteFailure> {
    state
        .write_failures
        .iter()
        .find(|(key, _)| !matches!(key, CoalesceKey::BindingStatus | CoalesceKey::Event(_)))
        .map(|(_, failure)| failure)
}

fn describe_object(write: &ClusterWrite) -> String {
    match write {
        ClusterWrite::AddFinalizer | ClusterWrite::RemoveFinalizer => "the finalizer".to_owned(),
        ClusterWrite::ApplySecret(content) => format!("Secret {}", content.name),
        ClusterWrite::DeleteSecret { name } => format!("Secret {name}"),
        ClusterWrite::AddPullSecretReference {
            service_account, ..
        }
        | ClusterWrite::RemovePullSecretReference {
            service_account, ..
        } => {
            format!("the imagePullSecrets of ServiceAccount {service_account}")
        }
        ClusterWrite::UpdateStatus(_) => "the status".to_owned(),
        ClusterWrite::PublishEvent(_) => "an event".to_owned(),
    }
}

/// Returns the status times: from the held token once a Secret contains it, else as last
/// observed. After a restart the held token is the one adopted from the Secret, so the times
/// come from its annotations. A token whose Secret write has not succeeded yet is not shown.
fn status_times(state: &BindingState) -> (Option<Timestamp>, Option<Timestamp>) {
    match state.token.as_ref().filter(|held| held.store_count > 0) {
        Some(held) => (
            Some(whole_seconds(held.refreshed_at)),
            Some(whole_seconds(held.token.expires_at)),
        ),
        None => state.status.as_ref().map_or((None, None), |status| {
            (status.last_token_refresh, status.token_expiration)
        }),
    }
}

/// Returns whether `update` would change what `previous` shows.
#[must_use]
pub fn status_differs(previous: Option<&ObservedStatus>, update: &StatusUpdate) -> bool {
    previous != Some(&ObservedStatus::from(update))
}

/// Returns the Events that announce a status change from `previous` to `update`.
///
/// A newer refresh time announces a stored token (Normal `TokenRefreshed`). A new or changed
/// error is a Warning with the Ready reason. A cleared error with no new token is a Normal
/// event with the Ready reason. An unchanged status announces nothing, so a failure that
/// repeats at every retry produces one Event, not one per retry.
#[must_use]
pub fn status_notices(
    previous: Option<&ObservedStatus>,
    update: &StatusUpdate,
    state: &BindingState,
) -> Vec<Notice> {
    let mut notices = Vec::new();

    let previous_refresh = previous.and_then(|status| status.last_token_refresh);
    let refreshed =
        update.last_token_refresh.is_some() && update.last_token_refresh > previous_refresh;
    if refreshed && let (Some(desired), Some(expires)) = (state.desired(), update.token_expiration)
    {
        notices.push(Notice {
            warning: false,
            reason: REASON_TOKEN_REFRESHED.to_owned(),
            message: format!(
                "Stored a new registry token for {} in Secret {}; it expires at {expires}.",
                desired.acr_server, desired.secret_name
            ),
        });
    }

    let previous_error = previous.and_then(|status| status.error.as_ref());
    if previous_error != update.error.as_ref() {
        match &update.error {
            Some(error) => notices.push(Notice {
                warning: true,
                reason: update.ready.reason.clone(),
                message: error.clone(),
            }),
            None if !refreshed => notices.push(Notice {
                warning: false,
                reason: update.ready.reason.clone(),
                message: update.ready.message.clone(),
            }),
            None => {}
        }
    }

    notices
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BindingEvent, ObservedBinding};
    use crate::model::{BindingKey, Identity, IssuedToken, RegistryToken, TokenError};
    use crate::state::HeldToken;

    fn at(offset_secs: i64) -> Timestamp {
        "2025-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
            + jiff::SignedDuration::from_secs(offset_secs)
    }

    fn desired() -> DesiredBinding {
        DesiredBinding {
            acr_server: "example.azurecr.io".into(),
            identity: Identity::ClientId("11111111-2222-3333-4444-555555555555".into()),
            scope: None,
            service_account: "default".into(),
            secret_name: "app-msi-acrpull-secret".into(),
        }
    }

    fn ready_state() -> BindingState {
        let mut state = BindingState::new(BindingKey::new("ns", "app"));
        state.apply(
            &BindingEvent::SpecObserved(ObservedBinding {
                generation: 3,
                spec: Ok(desired()),
                has_finalizer: true,
                status: ObservedStatus::default(),
            }),
            at(0),
        );
        state.token = Some(HeldToken {
            token: IssuedToken {
                token: RegistryToken::new("secret-token-value".into()),
                issued_at: at(0),
                expires_at: at(4500),
            },
            inputs_hash: desired().inputs_hash(),
            refreshed_at: at(0),
            store_count: 1,
        });
        state.secret = SecretState::Current;
        state.target_state = ReferenceState::Referenced;
        state
    }

    type Setup = fn(&mut BindingState);
    /// A case name, how to change the ready state, and the expected `(ready, reason)`.
    type StatusCase = (&'static str, Setup, Option<(bool, &'static str)>);

    #[test]
    fn desired_status_table() {
        let policy = RefreshPolicy::default();
        let cases: [StatusCase; 8] = [
            ("ready", |_| {}, Some((true, REASON_TOKEN_REFRESHED))),
            (
                "account missing",
                |state| state.target_state = ReferenceState::ServiceAccountMissing,
                Some((false, REASON_SERVICE_ACCOUNT_NOT_FOUND)),
            ),
            (
                "reference pending",
                |state| state.target_state = ReferenceState::Unknown,
                None,
            ),
            (
                "secret outdated",
                |state| state.secret = SecretState::Outdated,
                None,
            ),
            (
                "secret not owned",
                |state| state.secret = SecretState::NotOwned,
                Some((false, REASON_SECRET_NOT_OWNED)),
            ),
            (
                "token failed",
                |state| {
                    state.token_error = Some(TokenError {
                        message: "IMDS returned 500".into(),
                        retryable: true,
                        retry_after: None,
                    });
                },
                Some((false, REASON_TOKEN_REFRESH_FAILED)),
            ),
            (
                "invalid spec",
                |state| state.spec = Some(Err(InvalidSpec::MissingIdentity)),
                Some((false, REASON_INVALID_SPEC)),
            ),
            ("deleting", |state| state.deleting = true, None),
        ];

        for (name, setup, expected) in cases {
            let mut state = ready_state();
            setup(&mut state);

            let status = desired_status(&state, &policy, at(10));

            let summary = status
                .as_ref()
                .map(|status| (status.ready.ready, status.ready.reason.as_str()));
            assert_eq!(summary, expected, "{name}");
            if let Some(status) = status {
                assert_eq!(
                    status.error.is_none(),
                    status.ready.ready,
                    "{name}: error iff not ready"
                );
                assert_eq!(status.ready.observed_generation, 3, "{name}");
                assert_eq!(status.last_token_refresh, Some(at(0)), "{name}: times kept");
                assert_eq!(
                    status.token_expiration,
                    Some(at(4500)),
                    "{name}: times kept"
                );
            }
        }
    }

    #[test]
    fn token_failure_message_names_binding_and_fix() {
        let mut state = ready_state();
        state.token_error = Some(TokenError {
            message: "IMDS returned 500.".into(),
            retryable: true,
            retry_after: None,
        });

        let status = desired_status(&state, &RefreshPolicy::default(), at(10)).unwrap();
        let error = status.error.unwrap();

        assert!(error.contains("ns/app"), "{error}");
        assert!(error.contains("example.azurecr.io"), "{error}");
        assert!(error.contains("IMDS returned 500."), "{error}");
        assert!(error.contains("retries with backoff"), "{error}");
        assert!(!error.contains("secret-token-value"), "{error}");
    }

    #[test]
    fn stale_token_reports_nothing() {
        let state = ready_state();
        assert_eq!(
            desired_status(&state, &RefreshPolicy::default(), at(4000)),
            None
        );
    }

    #[test]
    fn times_come_from_status_without_token() {
        let mut state = ready_state();
        state.token = None;
        state.spec = Some(Err(InvalidSpec::MissingServer));
        state.status = Some(ObservedStatus {
            last_token_refresh: Some(at(-100)),
            token_expiration: Some(at(100)),
            error: None,
            ready: None,
        });

        let status = desired_status(&state, &RefreshPolicy::default(), at(10)).unwrap();

        assert_eq!(status.last_token_refresh, Some(at(-100)));
        assert_eq!(status.token_expiration, Some(at(100)));
    }

    #[test]
    fn notices_table() {
        let state = ready_state();
        let ready = desired_status(&state, &RefreshPolicy::default(), at(10)).unwrap();
        let mut failing = ready.clone();
        failing.error = Some("token refresh failed".into());
        failing.ready.ready = false;
        failing.ready.reason = REASON_TOKEN_REFRESH_FAILED.into();
        let mut older = ObservedStatus::from(&ready);
        older.last_token_refresh = Some(at(-4000));

        let cases = [
            (
                "first refresh",
                None,
                ready.clone(),
                vec![(false, REASON_TOKEN_REFRESHED)],
            ),
            (
                "newer refresh",
                Some(older),
                ready.clone(),
                vec![(false, REASON_TOKEN_REFRESHED)],
            ),
            (
                "unchanged",
                Some(ObservedStatus::from(&ready)),
                ready.clone(),
                vec![],
            ),
            (
                "new failure",
                Some(ObservedStatus::from(&ready)),
                failing.clone(),
                vec![(true, REASON_TOKEN_REFRESH_FAILED)],
            ),
            (
                "repeated failure",
                Some(ObservedStatus::from(&failing)),
                failing.clone(),
                vec![],
            ),
            (
                "recovered without new token",
                Some(ObservedStatus::from(&failing)),
                ready.clone(),
                vec![(false, REASON_TOKEN_REFRESHED)],
            ),
        ];

        for (name, previous, update, expected) in cases {
            let notices = status_notices(previous.as_ref(), &update, &state);
            let summary: Vec<(bool, &str)> = notices
                .iter()
                .map(|notice| (notice.warning, notice.reason.as_str()))
                .collect();
            assert_eq!(summary, expected, "{name}");
        }
    }

    #[test]
    fn status_differs_compares_all_fields() {
        let state = ready_state();
        let update = desired_status(&state, &RefreshPolicy::default(), at(10)).unwrap();
        assert!(!status_differs(
            Some(&ObservedStatus::from(&update)),
            &update
        ));
        assert!(status_differs(None, &update));

        let mut other_generation = ObservedStatus::from(&update);
        other_generation.ready.as_mut().unwrap().observed_generation = 2;
        assert!(status_differs(Some(&other_generation), &update));
    }
}
