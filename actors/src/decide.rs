//! The pure decision step of a binding: which commands follow from its state and an event.
//!
//! The binding actor calls [`step`]. It screens the event, folds it into the state with
//! [`BindingState::apply`], calls [`decide`] for the commands, and folds those back in with
//! [`BindingState::record`]. [`decide`] reads only its arguments, so the same state, event,
//! time and jitter always produce the same commands.
//!
//! The rules are level-based. After any event, `decide` compares what the cluster should
//! contain with what the state records, and sends what is missing unless an identical write
//! or a token request is already in flight. The event itself matters only for the Events
//! (notices) that announce a change, and for `BindingRemoved`.

use std::borrow::Cow;

use jiff::Timestamp;

use crate::backoff::BackoffPolicy;
use crate::clock::{later, whole_seconds};
use crate::command::{Command, TimerPurpose};
use crate::config::ConfigError;
use crate::event::BindingEvent;
use crate::model::{DesiredBinding, TokenError};
use crate::refresh::RefreshPolicy;
use crate::state::{BindingState, FinalizerState, ReferenceState, SecretState, is_cleanup};
use crate::status::{
    REASON_CLEANUP_FAILED, REASON_SECRET_RESTORED, desired_status, status_differs, status_notices,
};
use crate::write::{ClusterWrite, CoalesceKey, Notice, SecretContent};

/// The policies that [`decide`] applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecideConfig {
    /// When a token is refreshed.
    pub refresh: RefreshPolicy,
    /// Delays between retries after a failed token request or write.
    pub backoff: BackoffPolicy,
    /// Failed cleanup writes during deletion after which the finalizer is removed anyway.
    /// Default 5.
    pub max_cleanup_attempts: u32,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            refresh: RefreshPolicy::default(),
            backoff: BackoffPolicy::default(),
            max_cleanup_attempts: 5,
        }
    }
}

impl DecideConfig {
    /// Checks every policy.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.refresh.validate()?;
        self.backoff.validate()?;
        if self.max_cleanup_attempts == 0 {
            return Err(ConfigError {
                field: "max_cleanup_attempts",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

/// Handles one event: screens it, folds it in, decides, and records the commands.
///
/// `jitter` is a random number in [0, 1] that spreads retry delays.
pub fn step(
    state: &mut BindingState,
    event: &BindingEvent,
    now: Timestamp,
    jitter: f64,
    config: &DecideConfig,
) -> Vec<Command> {
    let event = screen_event(event, now, &config.refresh);
    state.apply(&event, now);

    let commands = decide(state, &event, now, jitter, config);
    for command in &commands {
        state.record(command);
    }
    commands
}

/// Turns a token that is no longer fresh on arrival into a retryable failure, so that no
/// Secret is ever written with a token that is already due for refresh. This happens when a
/// clock is off or a token's lifetime is shorter than the time it took to arrive.
#[must_use]
pub fn screen_event<'a>(
    event: &'a BindingEvent,
    now: Timestamp,
    policy: &RefreshPolicy,
) -> Cow<'a, BindingEvent> {
    match event {
        BindingEvent::TokenIssued { inputs_hash, token } if !policy.is_fresh(token, now) => {
            Cow::Owned(BindingEvent::TokenFailed {
                inputs_hash: inputs_hash.clone(),
                error: TokenError {
                    message: format!(
                        "the registry issued a token at {} that expires at {}, which is already due \
                         for refresh at {now}; check the clock of the node and of the registry",
                        whole_seconds(token.issued_at),
                        whole_seconds(token.expires_at),
                    ),
                    retryable: true,
                    retry_after: None,
                },
            })
        }
        _ => Cow::Borrowed(event),
    }
}

/// Extra doublings of the backoff for a request that Azure rejected (401, 403, unknown
/// identity). Such a failure lasts until someone fixes a role assignment, so retrying sooner
/// than 8 s does not help. It is still retried, because the fix needs no change to the binding.
const REJECTED_EXTRA_DOUBLINGS: u32 = 3;

/// Returns the commands that follow from `state`, which already contains `event`.
///
/// Pure and deterministic: it reads only its arguments.
#[must_use]
pub fn decide(
    state: &BindingState,
    event: &BindingEvent,
    now: Timestamp,
    jitter: f64,
    config: &DecideConfig,
) -> Vec<Command> {
    let mut plan = Plan::new(state, now, config);
    plan.schedule_retry(jitter);

    if matches!(event, BindingEvent::BindingRemoved) {
        plan.finish_removed();
        return plan.commands;
    }

    if state.deleting {
        plan.clean_up(event);
    } else {
        match &state.spec {
            None => {}
            Some(Err(_)) => plan.ensure_finalizer(),
            Some(Ok(desired)) => plan.reconcile(desired, event),
        }
        plan.update_status();
    }

    plan.arm_timer();
    plan.commands
}

/// The commands being assembled for one event, with the retry instant they use.
struct Plan<'a> {
    state: &'a BindingState,
    now: Timestamp,
    config: &'a DecideConfig,
    /// The retry instant after scheduling the failure of this event, if any.
    retry_at: Option<Timestamp>,
    /// Whether this event's failure was scheduled, so a Retry timer must be armed.
    retry_scheduled: bool,
    commands: Vec<Command>,
}

impl<'a> Plan<'a> {
    fn new(state: &'a BindingState, now: Timestamp, config: &'a DecideConfig) -> Self {
        Self {
            state,
            now,
            config,
            retry_at: state.retry_at,
            retry_scheduled: false,
            commands: Vec::new(),
        }
    }

    /// Computes the retry instant for a failure that the event recorded. A later instant
    /// already set by an earlier failure is kept, so that no retry comes sooner than the
    /// backoff of any failure requires.
    fn schedule_retry(&mut self, jitter: f64) {
        let Some(request) = self.state.unscheduled_retry else {
            return;
        };

        let backoff = &self.config.backoff;
        let attempts = if request.retryable {
            request.attempts
        } else {
            request.attempts.saturating_add(REJECTED_EXTRA_DOUBLINGS)
        };
        let delay = backoff.delay(attempts, jitter, request.retry_after);
        let at = later(self.now, delay);

        self.retry_at = Some(self.retry_at.map_or(at, |existing| existing.max(at)));
        self.retry_scheduled = true;
    }

    fn backing_off(&self) -> bool {
        self.retry_at.is_some()
    }

    /// Adds `write` unless the same write is in flight, or the same object failed and the
    /// backoff delay is not over. Returns whether it was added.
    fn send(&mut self, write: ClusterWrite) -> bool {
        let key = write.coalesce_key(0);
        if self.state.pending_writes.get(&key) == Some(&write) {
            return false;
        }
        if self.backing_off() && self.state.write_failures.contains_key(&key) {
            return false;
        }
        self.commands.push(Command::Write(write));
        true
    }

    fn notify(&mut self, notice: Notice) {
        self.commands
            .push(Command::Write(ClusterWrite::PublishEvent(notice)));
    }

    fn ensure_finalizer(&mut self) {
        if self.state.finalizer != FinalizerState::Present {
            self.send(ClusterWrite::AddFinalizer);
        }
    }

    /// Brings a binding with a valid spec towards: finalizer present, a fresh token for the
    /// current inputs, the Secret holding it, the target ServiceAccount listing the Secret,
    /// and no stale references.
    fn reconcile(&mut self, desired: &DesiredBinding, event: &BindingEvent) {
        let state = self.state;
        self.ensure_finalizer();

        let usable = state.usable_token(&self.config.refresh, self.now);
        let may_request = state.in_flight.is_none()
            && !self.backing_off()
            && state.secret != SecretState::NotOwned;
        if usable.is_none() && may_request {
            self.commands.push(Command::RequestToken {
                inputs_hash: desired.inputs_hash(),
                request: desired.token_request(),
            });
        }

        // Secret and reference writes wait for the finalizer, so that a deletion can never
        // miss something written before the finalizer was in place.
        let writable =
            state.finalizer == FinalizerState::Present && state.secret != SecretState::NotOwned;
        if let Some(held) = usable
            && writable
        {
            if matches!(
                state.secret,
                SecretState::Unknown | SecretState::Missing | SecretState::Outdated
            ) {
                let content = SecretContent {
                    name: desired.secret_name.clone(),
                    acr_server: desired.acr_server.clone(),
                    token: held.token.clone(),
                    inputs_hash: held.inputs_hash.clone(),
                    refreshed_at: held.refreshed_at,
                };
                let sent = self.send(ClusterWrite::ApplySecret(content));

                let restore = held.store_count > 0
                    && matches!(
                        event,
                        BindingEvent::SecretGone { .. } | BindingEvent::SecretObserved(_)
                    );
                if sent && restore {
                    self.notify(Notice {
                        warning: false,
                        reason: REASON_SECRET_RESTORED.to_owned(),
                        message: format!(
                            "Secret {} was deleted or changed outside the controller; wrote it again \
                             with the current token, which expires at {}.",
                            desired.secret_name,
                            whole_seconds(held.token.expires_at)
                        ),
                    });
                }
            }

            // The reference waits until the Secret is ours and current, so that a ServiceAccount
            // never lists a Secret the controller could not write.
            if state.secret == SecretState::Current
                && matches!(
                    state.target_state,
                    ReferenceState::Unknown | ReferenceState::NotReferenced
                )
            {
                self.send(ClusterWrite::AddPullSecretReference {
                    service_account: desired.service_account.clone(),
                    secret_name: desired.secret_name.clone(),
                });
            }
        }

        for stale in &state.stale_references {
            self.send(ClusterWrite::RemovePullSecretReference {
                service_account: stale.service_account.clone(),
                secret_name: stale.secret_name.clone(),
            });
        }
    }

    /// Writes the desired status when it differs from the one in flight, or else from the
    /// last observed one, with the Events that announce the change.
    fn update_status(&mut self) {
        let state = self.state;
        let Some(update) = desired_status(state, &self.config.refresh, self.now) else {
            return;
        };

        let in_flight = state
            .pending_status()
            .map(crate::event::ObservedStatus::from);
        let previous = in_flight.as_ref().or(state.status.as_ref());
        if !status_differs(previous, &update) {
            return;
        }

        let notices = status_notices(previous, &update, state);
        if self.send(ClusterWrite::UpdateStatus(update)) {
            for notice in notices {
                self.notify(notice);
            }
        }
    }

    /// Removes the references and the Secret, then the finalizer. After
    /// `max_cleanup_attempts` failed cleanup writes the finalizer is removed anyway, with a
    /// Warning event, so that a failing cleanup never blocks deletion. A failed finalizer
    /// removal is retried with backoff for as long as it fails.
    fn clean_up(&mut self, event: &BindingEvent) {
        let state = self.state;
        let gave_up = state.cleanup_failures >= self.config.max_cleanup_attempts;
        let mut outstanding = Vec::new();

        if let Some(target) = &state.target
            && !matches!(
                state.target_state,
                ReferenceState::NotReferenced | ReferenceState::ServiceAccountMissing
            )
        {
            outstanding.push(ClusterWrite::RemovePullSecretReference {
                service_account: target.service_account.clone(),
                secret_name: target.secret_name.clone(),
            });
        }
        for stale in &state.stale_references {
            outstanding.push(ClusterWrite::RemovePullSecretReference {
                service_account: stale.service_account.clone(),
                secret_name: stale.secret_name.clone(),
            });
        }
        if let Some(name) = &state.secret_name
            && !matches!(state.secret, SecretState::Missing | SecretState::NotOwned)
        {
            outstanding.push(ClusterWrite::DeleteSecret { name: name.clone() });
        }

        if gave_up {
            let just_gave_up = state.cleanup_failures == self.config.max_cleanup_attempts
                && matches!(event, BindingEvent::WriteFailed { write, .. } if is_cleanup(write));
            if just_gave_up {
                let notice = self.cleanup_failed_notice(&outstanding);
                self.notify(notice);
            }
        } else {
            for write in outstanding.clone() {
                self.send(write);
            }
        }

        let finalizer_may_be_present = state.finalizer != FinalizerState::Absent
            || matches!(
                state.pending_writes.get(&CoalesceKey::BindingMetadata),
                Some(ClusterWrite::AddFinalizer)
            );
        if (outstanding.is_empty() || gave_up) && finalizer_may_be_present {
            self.send(ClusterWrite::RemoveFinalizer);
        }
    }

    fn cleanup_failed_notice(&self, outstanding: &[ClusterWrite]) -> Notice {
        let state = self.state;
        let last_error = state
            .write_failures
            .values()
            .filter(|failure| is_cleanup(&failure.write))
            .map(|failure| failure.error.message.as_str())
            .next_back()
            .unwrap_or("unknown error");
        let references: Vec<&str> = outstanding
            .iter()
            .filter_map(|write| match write {
                ClusterWrite::RemovePullSecretReference {
                    service_account, ..
                } => Some(service_account.as_str()),
                _ => None,
            })
            .collect();
        let secret = state.secret_name.as_deref().unwrap_or("of this binding");
        let by_hand = if references.is_empty() {
            String::new()
        } else {
            format!(
                " Remove Secret {secret} from the imagePullSecrets of ServiceAccount {} by hand.",
                references.join(", ")
            )
        };

        Notice {
            warning: true,
            reason: REASON_CLEANUP_FAILED.to_owned(),
            message: format!(
                "cleanup of binding {binding} failed {count} times (last error: {last_error}); removed \
                 the finalizer anyway. Garbage collection deletes Secret {secret} through its \
                 ownerReference.{by_hand}",
                binding = state.key,
                count = state.cleanup_failures,
            ),
        }
    }

    /// Stops the actor. A binding that vanished before its cleanup finished gets its
    /// references removed on a best-effort basis; its Secret goes with the binding through
    /// the ownerReference.
    fn finish_removed(&mut self) {
        let state = self.state;
        let cleaned_up = state.deleting && state.finalizer == FinalizerState::Absent;
        if !cleaned_up {
            if let Some(target) = &state.target
                && !matches!(
                    state.target_state,
                    ReferenceState::NotReferenced | ReferenceState::ServiceAccountMissing
                )
            {
                self.send(ClusterWrite::RemovePullSecretReference {
                    service_account: target.service_account.clone(),
                    secret_name: target.secret_name.clone(),
                });
            }
            for stale in &state.stale_references {
                self.send(ClusterWrite::RemovePullSecretReference {
                    service_account: stale.service_account.clone(),
                    secret_name: stale.secret_name.clone(),
                });
            }
        }
        self.commands.push(Command::Stop);
    }

    /// Arms the single timer: for a pending retry first, else for the refresh of a usable
    /// token. A refresh that falls due during a retry delay runs when the retry fires.
    ///
    /// So every binding that is not being deleted has a timer armed or a token request in
    /// flight, with three exceptions in which only a new event can change the outcome: the
    /// spec is not observed yet, the spec is invalid, or a Secret that the binding does not
    /// own sits under its Secret name.
    fn arm_timer(&mut self) {
        let state = self.state;

        if let Some(at) = self.retry_at {
            if self.retry_scheduled || state.timer_at != Some(at) {
                self.commands.push(Command::ArmTimer {
                    at,
                    purpose: TimerPurpose::Retry,
                });
            }
            return;
        }

        if state.deleting {
            return;
        }
        if let Some(held) = state.usable_token(&self.config.refresh, self.now) {
            let at = self.config.refresh.refresh_at(&held.token);
            if state.timer_at != Some(at) {
                self.commands.push(Command::ArmTimer {
                    at,
                    purpose: TimerPurpose::Refresh,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ObservedStatus;
    use crate::fixtures::{
        Harness, SECRET, account, at, desired, invalid_spec, observed, render, spec, spec_with,
        token, token_error, token_for, write_error,
    };
    use crate::model::InputsHash;
    use crate::state::PullSecretReference;
    use crate::write::WriteErrorKind;

    type Setup = fn(&mut Harness);

    /// One transition: a setup, then an event at a time, and the commands it must return.
    struct Case {
        name: &'static str,
        setup: Setup,
        secs: i64,
        event: fn(&Harness) -> BindingEvent,
        expected: &'static [&'static str],
    }

    fn run(cases: &[Case]) {
        for case in cases {
            let mut harness = Harness::new();
            (case.setup)(&mut harness);
            let event = (case.event)(&harness);

            let rendered = harness.rendered(case.secs, event);

            assert_eq!(rendered, case.expected, "{}", case.name);
        }
    }

    fn ready(harness: &mut Harness) {
        *harness = Harness::ready();
    }

    fn requested(harness: &mut Harness) {
        harness.step(0, spec("default"));
    }

    fn failed_once(harness: &mut Harness) {
        requested(harness);
        harness.fail_token(0, token_error("IMDS returned 500"));
        harness.complete_all(0);
    }

    fn deleting(harness: &mut Harness) {
        ready(harness);
        harness.step(10, BindingEvent::DeletionRequested);
    }

    fn in_flight_hash(harness: &Harness) -> InputsHash {
        harness.state.in_flight.clone().expect("request in flight")
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one table row per transition reads better than split tables"
    )]
    fn spec_transitions() {
        run(&[
            Case {
                name: "new binding without finalizer",
                setup: |_| {},
                secs: 0,
                event: |_| spec_with(desired("default", "x"), false, ObservedStatus::default()),
                expected: &["AddFinalizer", "RequestToken"],
            },
            Case {
                name: "new binding with finalizer",
                setup: |_| {},
                secs: 0,
                event: |_| spec("default"),
                expected: &["RequestToken"],
            },
            Case {
                name: "invalid spec reports and requests nothing",
                setup: |_| {},
                secs: 0,
                event: |_| invalid_spec(),
                expected: &["Status(false InvalidSpec)", "Event(Warning InvalidSpec)"],
            },
            Case {
                name: "invalid spec without finalizer adds it",
                setup: |_| {},
                secs: 0,
                event: |_| match invalid_spec() {
                    BindingEvent::SpecObserved(mut observed) => {
                        observed.has_finalizer = false;
                        BindingEvent::SpecObserved(observed)
                    }
                    _ => unreachable!(),
                },
                expected: &[
                    "AddFinalizer",
                    "Status(false InvalidSpec)",
                    "Event(Warning InvalidSpec)",
                ],
            },
            Case {
                name: "spec change while a request is in flight waits",
                setup: requested,
                secs: 1,
                event: |_| spec_with(desired("default", "y"), true, ObservedStatus::default()),
                expected: &[],
            },
            Case {
                name: "echo of our own status is a no-op",
                setup: ready,
                secs: 5,
                event: Harness::status_echo,
                expected: &[],
            },
            Case {
                name: "new generation rewrites the status without an event",
                setup: ready,
                secs: 5,
                event: |harness| match harness.status_echo() {
                    BindingEvent::SpecObserved(mut observed) => {
                        observed.generation = 2;
                        BindingEvent::SpecObserved(observed)
                    }
                    _ => unreachable!(),
                },
                expected: &["Status(true TokenRefreshed)"],
            },
            Case {
                name: "changed inputs request a new token",
                setup: ready,
                secs: 5,
                event: |_| spec_with(desired("default", "y"), true, ObservedStatus::default()),
                expected: &["RequestToken"],
            },
            Case {
                name: "changed inputs end the backoff of old inputs",
                setup: failed_once,
                secs: 1,
                event: |_| spec_with(desired("default", "y"), true, ObservedStatus::default()),
                expected: &["RequestToken"],
            },
            Case {
                name: "changed service account moves the reference",
                setup: ready,
                secs: 5,
                event: |_| spec("builder"),
                expected: &["AddReference(builder)", "RemoveReference(default)"],
            },
            Case {
                name: "spec becomes invalid: status only",
                setup: ready,
                secs: 5,
                event: |_| invalid_spec(),
                expected: &["Status(false InvalidSpec)", "Event(Warning InvalidSpec)"],
            },
        ]);
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one table row per transition reads better than split tables"
    )]
    fn token_transitions() {
        run(&[
            Case {
                name: "token issued: write the secret, arm refresh",
                setup: requested,
                secs: 0,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("t1", 0),
                },
                expected: &["ApplySecret(t1)", "Timer(Refresh @2700)"],
            },
            Case {
                name: "token issued before the finalizer: hold the writes",
                setup: |harness| {
                    harness.step(
                        0,
                        spec_with(desired("default", "x"), false, ObservedStatus::default()),
                    );
                },
                secs: 0,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("t1", 0),
                },
                expected: &["Timer(Refresh @2700)"],
            },
            Case {
                name: "token already due for refresh is a failure",
                setup: requested,
                secs: 3000,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("late", 0),
                },
                expected: &[
                    "Status(false TokenRefreshFailed)",
                    "Event(Warning TokenRefreshFailed)",
                    "Timer(Retry @3001)",
                ],
            },
            Case {
                name: "token failure: error status, warning, backoff",
                setup: requested,
                secs: 0,
                event: |harness| BindingEvent::TokenFailed {
                    inputs_hash: in_flight_hash(harness),
                    error: token_error("IMDS returned 500"),
                },
                expected: &[
                    "Status(false TokenRefreshFailed)",
                    "Event(Warning TokenRefreshFailed)",
                    "Timer(Retry @1)",
                ],
            },
            Case {
                name: "repeated identical failure only backs off further",
                setup: |harness| {
                    failed_once(harness);
                    harness.step(1, BindingEvent::TimerFired);
                },
                secs: 1,
                event: |harness| BindingEvent::TokenFailed {
                    inputs_hash: in_flight_hash(harness),
                    error: token_error("IMDS returned 500"),
                },
                expected: &["Timer(Retry @3)"],
            },
            Case {
                name: "server retry-after is a floor",
                setup: requested,
                secs: 0,
                event: |harness| BindingEvent::TokenFailed {
                    inputs_hash: in_flight_hash(harness),
                    error: TokenError {
                        message: "throttled".into(),
                        retryable: true,
                        retry_after: Some(std::time::Duration::from_secs(30)),
                    },
                },
                expected: &[
                    "Status(false TokenRefreshFailed)",
                    "Event(Warning TokenRefreshFailed)",
                    "Timer(Retry @30)",
                ],
            },
            Case {
                name: "rejected request backs off three doublings further",
                setup: requested,
                secs: 0,
                event: |harness| BindingEvent::TokenFailed {
                    inputs_hash: in_flight_hash(harness),
                    error: TokenError {
                        message: "identity not found".into(),
                        retryable: false,
                        retry_after: None,
                    },
                },
                expected: &[
                    "Status(false TokenRefreshFailed)",
                    "Event(Warning TokenRefreshFailed)",
                    "Timer(Retry @8)",
                ],
            },
            Case {
                name: "refresh failure keeps the secret",
                setup: |harness| {
                    ready(harness);
                    harness.step(2700, BindingEvent::TimerFired);
                },
                secs: 2700,
                event: |harness| BindingEvent::TokenFailed {
                    inputs_hash: in_flight_hash(harness),
                    error: token_error("IMDS returned 500"),
                },
                expected: &[
                    "Status(false TokenRefreshFailed)",
                    "Event(Warning TokenRefreshFailed)",
                    "Timer(Retry @2701)",
                ],
            },
            Case {
                name: "recovery after failure stores the token",
                setup: |harness| {
                    failed_once(harness);
                    harness.step(1, BindingEvent::TimerFired);
                },
                secs: 1,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("t2", 1),
                },
                expected: &["ApplySecret(t2)", "Timer(Refresh @2701)"],
            },
            Case {
                name: "stale answer after a spec change requests the new inputs",
                setup: |harness| {
                    requested(harness);
                    harness.step(
                        1,
                        spec_with(desired("default", "y"), true, ObservedStatus::default()),
                    );
                },
                secs: 2,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("old-inputs", 2),
                },
                expected: &["RequestToken"],
            },
            Case {
                name: "answer without a request is ignored",
                setup: ready,
                secs: 5,
                event: |_| BindingEvent::TokenIssued {
                    inputs_hash: desired("default", "x").inputs_hash(),
                    token: token("unsolicited", 5),
                },
                expected: &[],
            },
        ]);
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one table row per transition reads better than split tables"
    )]
    fn write_result_transitions() {
        run(&[
            Case {
                name: "secret stored: add the reference",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                },
                secs: 0,
                event: |harness| {
                    BindingEvent::WriteDone(ClusterWrite::ApplySecret(harness.last_secret()))
                },
                expected: &["AddReference(default)"],
            },
            Case {
                name: "secret and reference done: ready with event",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                    let secret = harness.last_secret();
                    harness.step(
                        0,
                        BindingEvent::WriteDone(ClusterWrite::ApplySecret(secret)),
                    );
                },
                secs: 0,
                event: |_| {
                    BindingEvent::WriteDone(ClusterWrite::AddPullSecretReference {
                        service_account: "default".into(),
                        secret_name: SECRET.into(),
                    })
                },
                expected: &[
                    "Status(true TokenRefreshed)",
                    "Event(Normal TokenRefreshed)",
                ],
            },
            Case {
                name: "finalizer added: held token is written",
                setup: |harness| {
                    harness.step(
                        0,
                        spec_with(desired("default", "x"), false, ObservedStatus::default()),
                    );
                    harness.issue(0, "t1");
                },
                secs: 0,
                event: |_| BindingEvent::WriteDone(ClusterWrite::AddFinalizer),
                expected: &["ApplySecret(t1)"],
            },
            Case {
                name: "reference to a missing service account",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                    let secret = harness.last_secret();
                    harness.step(
                        0,
                        BindingEvent::WriteDone(ClusterWrite::ApplySecret(secret)),
                    );
                },
                secs: 0,
                event: |_| BindingEvent::WriteFailed {
                    write: ClusterWrite::AddPullSecretReference {
                        service_account: "default".into(),
                        secret_name: SECRET.into(),
                    },
                    error: write_error(WriteErrorKind::NotFound),
                },
                expected: &[
                    "Status(false ServiceAccountNotFound)",
                    "Event(Normal TokenRefreshed)",
                    "Event(Warning ServiceAccountNotFound)",
                ],
            },
            Case {
                name: "secret write throttled: error status and retry",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                },
                secs: 0,
                event: |harness| BindingEvent::WriteFailed {
                    write: ClusterWrite::ApplySecret(harness.last_secret()),
                    error: write_error(WriteErrorKind::Throttled(Some(
                        std::time::Duration::from_secs(7),
                    ))),
                },
                expected: &[
                    "Status(false WriteFailed)",
                    "Event(Warning WriteFailed)",
                    "Timer(Retry @7)",
                ],
            },
            Case {
                name: "secret write retried when the timer fires",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                    let secret = harness.last_secret();
                    harness.step(
                        0,
                        BindingEvent::WriteFailed {
                            write: ClusterWrite::ApplySecret(secret),
                            error: write_error(WriteErrorKind::Conflict),
                        },
                    );
                },
                secs: 1,
                event: |_| BindingEvent::TimerFired,
                expected: &["ApplySecret(t1)", "Timer(Refresh @2700)"],
            },
            Case {
                name: "status write failure only retries",
                setup: |harness| {
                    requested(harness);
                    harness.issue(0, "t1");
                    let secret = harness.last_secret();
                    harness.step(
                        0,
                        BindingEvent::WriteDone(ClusterWrite::ApplySecret(secret)),
                    );
                    harness.step(
                        0,
                        BindingEvent::WriteDone(ClusterWrite::AddPullSecretReference {
                            service_account: "default".into(),
                            secret_name: SECRET.into(),
                        }),
                    );
                },
                secs: 0,
                event: |harness| BindingEvent::WriteFailed {
                    write: harness.last_status_write(),
                    error: write_error(WriteErrorKind::Conflict),
                },
                expected: &["Timer(Retry @1)"],
            },
            Case {
                name: "finalizer write failure is reported and backs off",
                setup: |harness| {
                    harness.step(
                        0,
                        spec_with(desired("default", "x"), false, ObservedStatus::default()),
                    );
                },
                secs: 0,
                event: |_| BindingEvent::WriteFailed {
                    write: ClusterWrite::AddFinalizer,
                    error: write_error(WriteErrorKind::Rejected),
                },
                expected: &[
                    "Status(false WriteFailed)",
                    "Event(Warning WriteFailed)",
                    "Timer(Retry @8)",
                ],
            },
        ]);
    }

    #[test]
    fn timer_transitions() {
        run(&[
            Case {
                name: "refresh due requests a token",
                setup: ready,
                secs: 2700,
                event: |_| BindingEvent::TimerFired,
                expected: &["RequestToken"],
            },
            Case {
                name: "early fire re-arms",
                setup: ready,
                secs: 100,
                event: |_| BindingEvent::TimerFired,
                expected: &["Timer(Refresh @2700)"],
            },
            Case {
                name: "retry due requests again",
                setup: failed_once,
                secs: 1,
                event: |_| BindingEvent::TimerFired,
                expected: &["RequestToken"],
            },
            Case {
                name: "refreshed token replaces the secret",
                setup: |harness| {
                    ready(harness);
                    harness.step(2700, BindingEvent::TimerFired);
                },
                secs: 2700,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("t2", 2700),
                },
                expected: &["ApplySecret(t2)", "Timer(Refresh @5400)"],
            },
        ]);
    }

    #[test]
    fn secret_transitions() {
        run(&[
            Case {
                name: "secret deleted by hand is restored",
                setup: ready,
                secs: 10,
                event: |_| BindingEvent::SecretGone {
                    name: SECRET.into(),
                },
                expected: &["ApplySecret(t1)", "Event(Normal SecretRestored)"],
            },
            Case {
                name: "secret edited by hand is restored",
                setup: ready,
                secs: 10,
                event: |harness| {
                    let mut edited = observed(&harness.last_secret());
                    edited.token = None;
                    BindingEvent::SecretObserved(edited)
                },
                expected: &["ApplySecret(t1)", "Event(Normal SecretRestored)"],
            },
            Case {
                name: "secret deleted after refresh is due needs a new token",
                setup: |harness| {
                    ready(harness);
                    harness.step(2700, BindingEvent::TimerFired);
                    harness.fail_token(2700, token_error("IMDS returned 500"));
                    harness.complete_all(2700);
                    harness.step(2701, BindingEvent::TimerFired);
                    harness.fail_token(2701, token_error("IMDS returned 500"));
                },
                secs: 2702,
                event: |_| BindingEvent::SecretGone {
                    name: SECRET.into(),
                },
                expected: &[],
            },
            Case {
                name: "echo of our own secret is a no-op",
                setup: ready,
                secs: 10,
                event: |harness| BindingEvent::SecretObserved(observed(&harness.last_secret())),
                expected: &[],
            },
            Case {
                name: "secret owned by someone else is reported, not written",
                setup: requested,
                secs: 0,
                event: |_| {
                    BindingEvent::SecretObserved(crate::event::ObservedSecret {
                        name: SECRET.into(),
                        inputs_hash: None,
                        refreshed_at: None,
                        token: None,
                        owned: false,
                    })
                },
                expected: &[
                    "Status(false SecretNotOwned)",
                    "Event(Warning SecretNotOwned)",
                ],
            },
        ]);
    }

    #[test]
    fn service_account_transitions() {
        run(&[
            Case {
                name: "target without our reference gets it",
                setup: ready,
                secs: 10,
                event: |_| account("default", false),
                expected: &["AddReference(default)"],
            },
            Case {
                name: "target gone is reported",
                setup: ready,
                secs: 10,
                event: |_| BindingEvent::ServiceAccountGone {
                    name: "default".into(),
                },
                expected: &[
                    "Status(false ServiceAccountNotFound)",
                    "Event(Warning ServiceAccountNotFound)",
                ],
            },
            Case {
                name: "target appears again",
                setup: |harness| {
                    ready(harness);
                    harness.step(
                        10,
                        BindingEvent::ServiceAccountGone {
                            name: "default".into(),
                        },
                    );
                    harness.complete_all(10);
                },
                secs: 20,
                event: |_| account("default", false),
                expected: &["AddReference(default)"],
            },
            Case {
                name: "unrelated service account is ignored",
                setup: ready,
                secs: 10,
                event: |_| account("other", false),
                expected: &[],
            },
            Case {
                name: "old target already clean needs no removal",
                setup: |harness| {
                    ready(harness);
                    harness.step(10, spec("builder"));
                },
                secs: 11,
                event: |_| account("default", false),
                expected: &[],
            },
        ]);
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one table row per transition reads better than split tables"
    )]
    fn deletion_transitions() {
        run(&[
            Case {
                name: "deletion removes the reference and the secret",
                setup: ready,
                secs: 10,
                event: |_| BindingEvent::DeletionRequested,
                expected: &["RemoveReference(default)", "DeleteSecret"],
            },
            Case {
                name: "cleanup done removes the finalizer",
                setup: |harness| {
                    deleting(harness);
                    harness.step(
                        10,
                        BindingEvent::WriteDone(ClusterWrite::RemovePullSecretReference {
                            service_account: "default".into(),
                            secret_name: SECRET.into(),
                        }),
                    );
                },
                secs: 10,
                event: |_| {
                    BindingEvent::WriteDone(ClusterWrite::DeleteSecret {
                        name: SECRET.into(),
                    })
                },
                expected: &["RemoveFinalizer"],
            },
            Case {
                name: "missing service account counts as done",
                setup: |harness| {
                    deleting(harness);
                    harness.step(
                        10,
                        BindingEvent::WriteDone(ClusterWrite::DeleteSecret {
                            name: SECRET.into(),
                        }),
                    );
                },
                secs: 10,
                event: |_| BindingEvent::WriteFailed {
                    write: ClusterWrite::RemovePullSecretReference {
                        service_account: "default".into(),
                        secret_name: SECRET.into(),
                    },
                    error: write_error(WriteErrorKind::NotFound),
                },
                expected: &["RemoveFinalizer"],
            },
            Case {
                name: "cleanup failure backs off",
                setup: deleting,
                secs: 10,
                event: |_| BindingEvent::WriteFailed {
                    write: ClusterWrite::DeleteSecret {
                        name: SECRET.into(),
                    },
                    error: write_error(WriteErrorKind::Throttled(None)),
                },
                expected: &["Timer(Retry @11)"],
            },
            Case {
                name: "deletion ignores token answers",
                setup: |harness| {
                    ready(harness);
                    harness.step(2700, BindingEvent::TimerFired);
                    harness.step(2700, BindingEvent::DeletionRequested);
                },
                secs: 2701,
                event: |harness| BindingEvent::TokenIssued {
                    inputs_hash: in_flight_hash(harness),
                    token: token("t2", 2701),
                },
                expected: &[],
            },
            Case {
                name: "deletion of a binding never seen before",
                setup: |_| {},
                secs: 0,
                event: |_| BindingEvent::DeletionRequested,
                expected: &["RemoveFinalizer"],
            },
            Case {
                name: "removed binding stops",
                setup: |harness| {
                    deleting(harness);
                    harness.complete_all(10);
                    harness.complete_all(10);
                },
                secs: 11,
                event: |_| BindingEvent::BindingRemoved,
                expected: &["Stop"],
            },
            Case {
                name: "binding removed before cleanup still removes the reference",
                setup: ready,
                secs: 11,
                event: |_| BindingEvent::BindingRemoved,
                expected: &["RemoveReference(default)", "Stop"],
            },
        ]);
    }

    #[test]
    fn deletion_gives_up_after_bounded_failures() {
        let mut harness = Harness::ready();
        harness.config.max_cleanup_attempts = 3;
        harness.step(10, BindingEvent::DeletionRequested);
        harness.step(
            10,
            BindingEvent::WriteDone(ClusterWrite::DeleteSecret {
                name: SECRET.into(),
            }),
        );
        let removal = ClusterWrite::RemovePullSecretReference {
            service_account: "default".into(),
            secret_name: SECRET.into(),
        };

        let mut secs = 10;
        let mut last = Vec::new();
        for _ in 0..3 {
            last = harness.rendered(
                secs,
                BindingEvent::WriteFailed {
                    write: removal.clone(),
                    error: write_error(WriteErrorKind::Rejected),
                },
            );
            secs += 400;
            harness.step(secs, BindingEvent::TimerFired);
        }

        assert!(
            last.contains(&"Event(Warning CleanupFailed)".to_owned()),
            "{last:?}"
        );
        assert!(last.contains(&"RemoveFinalizer".to_owned()), "{last:?}");
    }

    #[test]
    fn restart_with_valid_secret_is_quiet() {
        let before = Harness::ready();
        let secret = before.last_secret();
        let echo = before.status_echo();

        let mut after = Harness::new();
        let first = after.rendered(60, BindingEvent::SecretObserved(observed(&secret)));
        let second = after.rendered(60, echo);
        let third = after.rendered(60, account("default", true));

        assert_eq!(first, Vec::<String>::new());
        assert_eq!(second, vec!["Timer(Refresh @2700)"]);
        assert_eq!(third, Vec::<String>::new());
    }

    #[test]
    fn restart_with_expired_secret_requests_once() {
        let before = Harness::ready();
        let secret = before.last_secret();
        let echo = before.status_echo();

        let mut after = Harness::new();
        after.step(3000, BindingEvent::SecretObserved(observed(&secret)));
        let rendered = after.rendered(3000, echo);

        assert_eq!(rendered, vec!["RequestToken"]);
    }

    #[test]
    fn restart_with_changed_inputs_keeps_old_times() {
        let before = Harness::ready();
        let secret = before.last_secret();

        let mut after = Harness::new();
        after.step(60, BindingEvent::SecretObserved(observed(&secret)));
        after.step(
            60,
            spec_with(desired("default", "y"), true, ObservedStatus::default()),
        );
        after.fail_token(60, token_error("IMDS returned 500"));

        let ClusterWrite::UpdateStatus(update) = after.last_status_write() else {
            unreachable!()
        };
        assert_eq!(update.last_token_refresh, Some(at(0)));
        assert_eq!(update.token_expiration, Some(at(4500)));
        assert_eq!(update.ready.reason, "TokenRefreshFailed");
    }

    #[test]
    fn spec_change_moves_reference_to_new_account() {
        let mut harness = Harness::ready();
        harness.step(10, spec("builder"));
        harness.complete_all(10);

        assert!(harness.state.stale_references.is_empty());
        assert_eq!(
            harness.state.target,
            Some(PullSecretReference::new("builder", SECRET))
        );
    }

    #[test]
    fn short_token_refreshes_at_half_life() {
        let mut harness = Harness::new();
        harness.step(0, spec("default"));
        let inputs_hash = harness.state.in_flight.clone().unwrap();

        let rendered = harness.rendered(
            0,
            BindingEvent::TokenIssued {
                inputs_hash,
                token: token_for("short", 0, 20),
            },
        );

        assert!(
            rendered.contains(&"Timer(Refresh @10)".to_owned()),
            "{rendered:?}"
        );
    }

    #[test]
    fn decide_is_deterministic() {
        let harness = Harness::ready();
        let event = BindingEvent::TimerFired;

        let first = decide(&harness.state, &event, at(2700), 0.3, &harness.config);
        let second = decide(&harness.state, &event, at(2700), 0.3, &harness.config);

        assert_eq!(first, second);
        assert_eq!(
            first.iter().map(render).collect::<Vec<_>>(),
            vec!["RequestToken"]
        );
    }

    #[test]
    fn config_validation() {
        assert!(DecideConfig::default().validate().is_ok());
        let zero = DecideConfig {
            max_cleanup_attempts: 0,
            ..DecideConfig::default()
        };
        assert_eq!(zero.validate().unwrap_err().field, "max_cleanup_attempts");
    }
}
