//! Property tests of the state machine's invariants, over random event sequences.
//!
//! A small simulation plays the cluster, the broker and the timer. It returns a result for the
//! token request in flight, completes or fails pending writes, fires the timer, and injects
//! watch events, some of them stale or hostile. After every step the invariants are checked.

use std::collections::BTreeSet;

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use crate::command::Command;
use crate::decide::{DecideConfig, step};
use crate::event::{BindingEvent, ObservedSecret, ObservedStatus};
use crate::fixtures::{
    LIFETIME, SECRET, account, at, desired, invalid_spec, observed, spec_with, write_error,
};
use crate::model::{BindingKey, InputsHash, IssuedToken, RegistryToken, TokenError};
use crate::state::{BindingState, FinalizerState, SecretState};
use crate::write::{ClusterWrite, SecretContent, WriteErrorKind};

const ACCOUNTS: [&str; 3] = ["default", "builder", "runner"];
const IDENTITIES: [&str; 2] = ["x", "y"];

/// One thing the simulated world does next.
#[derive(Clone, Debug)]
enum Action {
    /// The binding is observed with this spec.
    Spec {
        account: usize,
        identity: usize,
        has_finalizer: bool,
        valid: bool,
    },
    /// The Secret is observed: 0 our last write, 1 unreadable, 2 not owned, 3 an old token.
    SecretSeen(u8),
    /// The Secret is deleted.
    SecretGone,
    /// A ServiceAccount is observed.
    Account { account: usize, references: bool },
    /// A ServiceAccount is deleted.
    AccountGone(usize),
    /// The broker returns 0 a fresh token, 1 a token already due, 2 a retryable failure or
    /// 3 a permanent failure. Without a request in flight the result is unsolicited.
    AnswerToken(u8),
    /// The writer reports the outcome of the pending write at this index: 0 done, 1 conflict,
    /// 2 throttled, 3 not found, 4 rejected.
    CompleteWrite { index: usize, outcome: u8 },
    /// Time moves to the armed timer and it fires.
    FireTimer,
    /// Time moves on.
    Advance(u16),
    /// The binding gets a deletionTimestamp.
    Delete,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..ACCOUNTS.len(), 0..IDENTITIES.len(), any::<bool>(), prop::bool::weighted(0.9)).prop_map(
            |(account, identity, has_finalizer, valid)| Action::Spec {
                account,
                identity,
                has_finalizer,
                valid,
            }
        ),
        2 => (0u8..4).prop_map(Action::SecretSeen),
        1 => Just(Action::SecretGone),
        2 => (0..ACCOUNTS.len(), any::<bool>()).prop_map(|(account, references)| Action::Account { account, references }),
        1 => (0..ACCOUNTS.len()).prop_map(Action::AccountGone),
        4 => (0u8..4).prop_map(Action::AnswerToken),
        8 => (0usize..8, prop::sample::select(vec![0u8, 0, 0, 1, 2, 3, 4])).prop_map(|(index, outcome)| Action::CompleteWrite { index, outcome }),
        3 => Just(Action::FireTimer),
        2 => (1u16..4000).prop_map(Action::Advance),
        1 => Just(Action::Delete),
    ]
}

/// The simulated world around one binding.
struct World {
    state: BindingState,
    config: DecideConfig,
    now: Timestamp,
    /// The token request still waiting for a result, as the world saw it go out.
    requested: Option<InputsHash>,
    /// The Secret as last written, and whether someone else's Secret sits under its name.
    secret: Option<SecretContent>,
    foreign_secret: bool,
    status: ObservedStatus,
    /// Every token value handed out, to check that none leaks into a text.
    issued: Vec<String>,
    accounts_in_specs: BTreeSet<String>,
    minted: u64,
    /// Set when a token request failed, so that only a timer may lead to the next request.
    failed_since_timer: bool,
}

impl World {
    fn new() -> Self {
        Self {
            state: BindingState::new(BindingKey::new("ns", "app")),
            config: DecideConfig::default(),
            now: at(0),
            requested: None,
            secret: None,
            foreign_secret: false,
            status: ObservedStatus::default(),
            issued: Vec::new(),
            accounts_in_specs: BTreeSet::new(),
            minted: 0,
            failed_since_timer: false,
        }
    }

    /// Mints a token issued `age_secs` before now.
    fn mint(&mut self, age_secs: i64) -> IssuedToken {
        self.minted += 1;
        let value = format!("eyJtoken{}Zq9", self.minted);
        self.issued.push(value.clone());
        let issued_at = self.now - SignedDuration::from_secs(age_secs);
        IssuedToken {
            token: RegistryToken::new(value),
            issued_at,
            expires_at: issued_at + SignedDuration::from_secs(LIFETIME),
        }
    }

    /// Turns an action into an event, or `None` when it does not apply right now.
    #[allow(
        clippy::too_many_lines,
        reason = "one match arm per action keeps the world's rules in one place"
    )]
    fn event_for(&mut self, action: &Action) -> Option<BindingEvent> {
        match action {
            Action::Spec {
                account,
                identity,
                has_finalizer,
                valid,
            } => {
                if !valid {
                    return Some(invalid_spec());
                }
                let desired = desired(ACCOUNTS[*account], IDENTITIES[*identity]);
                self.accounts_in_specs
                    .insert(desired.service_account.clone());
                Some(spec_with(desired, *has_finalizer, self.status.clone()))
            }
            Action::SecretSeen(kind) => {
                self.foreign_secret = false;
                let observed = match kind {
                    0 => observed(self.secret.as_ref()?),
                    1 => ObservedSecret {
                        name: SECRET.into(),
                        inputs_hash: None,
                        refreshed_at: None,
                        token: None,
                        owned: true,
                    },
                    2 => {
                        self.foreign_secret = true;
                        ObservedSecret {
                            name: SECRET.into(),
                            inputs_hash: None,
                            refreshed_at: None,
                            token: None,
                            owned: false,
                        }
                    }
                    _ => {
                        let old = self.mint(100_000);
                        ObservedSecret {
                            name: SECRET.into(),
                            inputs_hash: Some(desired("default", "x").inputs_hash()),
                            refreshed_at: Some(old.issued_at),
                            token: Some(old),
                            owned: true,
                        }
                    }
                };
                Some(BindingEvent::SecretObserved(observed))
            }
            Action::SecretGone => {
                self.secret = None;
                self.foreign_secret = false;
                Some(BindingEvent::SecretGone {
                    name: SECRET.into(),
                })
            }
            Action::Account {
                account,
                references,
            } => Some(crate::fixtures::account(ACCOUNTS[*account], *references)),
            Action::AccountGone(account) => Some(BindingEvent::ServiceAccountGone {
                name: ACCOUNTS[*account].into(),
            }),
            Action::AnswerToken(outcome) => {
                let inputs_hash = self
                    .requested
                    .take()
                    .unwrap_or_else(|| desired("default", "x").inputs_hash());
                let event = match outcome {
                    0 => BindingEvent::TokenIssued {
                        inputs_hash,
                        token: self.mint(0),
                    },
                    1 => BindingEvent::TokenIssued {
                        inputs_hash,
                        token: self.mint(4000),
                    },
                    2 => BindingEvent::TokenFailed {
                        inputs_hash,
                        error: TokenError {
                            message: "IMDS returned 500".into(),
                            retryable: true,
                            retry_after: None,
                        },
                    },
                    _ => BindingEvent::TokenFailed {
                        inputs_hash,
                        error: TokenError {
                            message: "identity not found".into(),
                            retryable: false,
                            retry_after: None,
                        },
                    },
                };
                Some(event)
            }
            Action::CompleteWrite { index, outcome } => {
                let pending: Vec<ClusterWrite> =
                    self.state.pending_writes.values().cloned().collect();
                let write = pending.get(index % pending.len().max(1))?.clone();
                let kind = match outcome {
                    0 => return Some(BindingEvent::WriteDone(self.land(write))),
                    1 => WriteErrorKind::Conflict,
                    2 => WriteErrorKind::Throttled(None),
                    3 => WriteErrorKind::NotFound,
                    _ => WriteErrorKind::Rejected,
                };
                Some(BindingEvent::WriteFailed {
                    write,
                    error: write_error(kind),
                })
            }
            Action::FireTimer => {
                let due = self.state.timer_at?;
                self.now = self.now.max(due);
                Some(BindingEvent::TimerFired)
            }
            Action::Advance(secs) => {
                self.now += SignedDuration::from_secs(i64::from(*secs));
                None
            }
            Action::Delete => Some(BindingEvent::DeletionRequested),
        }
    }

    /// Applies a successful write to the simulated cluster and returns it.
    fn land(&mut self, write: ClusterWrite) -> ClusterWrite {
        match &write {
            ClusterWrite::ApplySecret(content) => {
                self.secret = Some(content.clone());
                self.foreign_secret = false;
            }
            ClusterWrite::DeleteSecret { .. } => self.secret = None,
            ClusterWrite::UpdateStatus(update) => self.status = ObservedStatus::from(update),
            _ => {}
        }
        write
    }

    /// Handles one event and checks every per-step invariant.
    #[allow(
        clippy::too_many_lines,
        reason = "each invariant check is a short block; splitting scatters them"
    )]
    fn step(&mut self, event: &BindingEvent) -> Result<Vec<Command>, TestCaseError> {
        let before = self.state.clone();
        let stored_before = self.secret.clone();
        let foreign_before = self.foreign_secret;
        let now = self.now;

        let commands = step(&mut self.state, event, now, 0.5, &self.config);

        let current_hash = before
            .desired()
            .map(crate::model::DesiredBinding::inputs_hash);
        let answered = before.in_flight.is_some()
            && before.in_flight == current_hash
            && self.state.in_flight.is_none();
        let failure = matches!(event, BindingEvent::TokenFailed { .. })
            || matches!(event, BindingEvent::TokenIssued { token, .. } if !self.config.refresh.is_fresh(token, now));
        // A timer ends the backoff, and so do new token inputs: their failures are new.
        let after_hash = self
            .state
            .desired()
            .map(crate::model::DesiredBinding::inputs_hash);
        if matches!(event, BindingEvent::TimerFired)
            || (current_hash.is_some() && after_hash != current_hash)
        {
            self.failed_since_timer = false;
        }
        if failure && answered && !self.state.deleting {
            self.failed_since_timer = true;
        }
        let requested_now = commands
            .iter()
            .any(|command| matches!(command, Command::RequestToken { .. }));
        prop_assert!(
            !(requested_now && self.failed_since_timer),
            "a token request followed a failure without waiting for the timer"
        );

        let requests = commands
            .iter()
            .filter(|command| matches!(command, Command::RequestToken { .. }))
            .count();
        prop_assert!(
            requests <= 1,
            "two token requests in one step: {commands:?}"
        );
        for command in &commands {
            if let Command::RequestToken { inputs_hash, .. } = command {
                prop_assert!(
                    self.requested.is_none(),
                    "a second token request while one is in flight, before: {:?}",
                    before.in_flight
                );
                self.requested = Some(inputs_hash.clone());
            }
        }
        prop_assert_eq!(
            &self.state.in_flight,
            &self.requested,
            "state and world disagree on the request in flight"
        );

        for command in &commands {
            let Command::Write(write) = command else {
                continue;
            };
            match write {
                ClusterWrite::ApplySecret(content) => {
                    prop_assert!(!failure, "a failed refresh wrote the Secret");
                    prop_assert!(!foreign_before, "wrote a Secret that is not ours");
                    prop_assert_eq!(&content.name, SECRET);
                    prop_assert!(
                        self.config.refresh.is_fresh(&content.token, now),
                        "wrote a token that is not fresh: expires {}",
                        content.token.expires_at
                    );
                    if let Some(stored) = &stored_before
                        && stored.inputs_hash == content.inputs_hash
                    {
                        prop_assert!(
                            content.token.expires_at >= stored.token.expires_at,
                            "replaced a Secret with an older token"
                        );
                    }
                }
                ClusterWrite::DeleteSecret { name } => {
                    prop_assert!(!failure, "a failed refresh deleted the Secret");
                    prop_assert!(!foreign_before, "deleted a Secret that is not ours");
                    prop_assert!(self.state.deleting, "deleted the Secret outside deletion");
                    prop_assert_eq!(name, SECRET);
                }
                ClusterWrite::AddPullSecretReference {
                    service_account,
                    secret_name,
                }
                | ClusterWrite::RemovePullSecretReference {
                    service_account,
                    secret_name,
                } => {
                    prop_assert_eq!(secret_name, SECRET);
                    prop_assert!(
                        self.accounts_in_specs.contains(service_account),
                        "touched ServiceAccount {} that no spec named",
                        service_account
                    );
                }
                ClusterWrite::UpdateStatus(update) => {
                    let texts = [
                        update.error.clone().unwrap_or_default(),
                        update.ready.message.clone(),
                    ];
                    self.check_no_token(&texts)?;
                }
                ClusterWrite::PublishEvent(notice) => {
                    self.check_no_token(std::slice::from_ref(&notice.message))?;
                }
                ClusterWrite::AddFinalizer | ClusterWrite::RemoveFinalizer => {}
            }
        }

        let waiting_allowed = self.state.deleting
            || self.state.desired().is_none()
            || self.state.secret == SecretState::NotOwned;
        prop_assert!(
            waiting_allowed || self.state.timer_at.is_some() || self.state.in_flight.is_some(),
            "binding has neither a timer nor a request in flight: {:?}",
            self.state
        );

        Ok(commands)
    }

    fn check_no_token(&self, texts: &[String]) -> Result<(), TestCaseError> {
        for text in texts {
            for token in &self.issued {
                prop_assert!(
                    !text.contains(token.as_str()),
                    "a token reached a text: {}",
                    text
                );
            }
        }
        Ok(())
    }

    fn run(&mut self, actions: &[Action]) -> Result<(), TestCaseError> {
        for action in actions {
            if let Some(event) = self.event_for(action) {
                self.step(&event)?;
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// At most one request in flight, no retry without a backoff timer, no stale or foreign
    /// Secret writes, nothing unmanaged touched, no token in any text, and a timer or request
    /// for every live binding.
    #[test]
    fn invariants_hold_for_any_sequence(actions in prop::collection::vec(action(), 1..80)) {
        let mut world = World::new();
        world.run(&actions)?;
    }

    /// Deletion ends with the finalizer removed, even when every cleanup write fails.
    #[test]
    fn deletion_always_removes_finalizer(
        actions in prop::collection::vec(action(), 0..40),
        cleanup_fails in any::<bool>(),
    ) {
        let mut world = World::new();
        world.run(&actions)?;
        world.step(&BindingEvent::DeletionRequested)?;

        for _ in 0..500 {
            let pending = world.state.pending_writes.values().next().cloned();
            let event = match pending {
                Some(write) if cleanup_fails && crate::state::is_cleanup(&write) => BindingEvent::WriteFailed {
                    write,
                    error: write_error(WriteErrorKind::Rejected),
                },
                Some(write) => BindingEvent::WriteDone(world.land(write)),
                None => match world.event_for(&Action::FireTimer) {
                    Some(event) => event,
                    None => break,
                },
            };
            world.step(&event)?;
        }

        prop_assert_eq!(world.state.finalizer, FinalizerState::Absent);
        prop_assert!(world.state.pending_writes.is_empty());
    }

    /// A restart that finds a fresh Secret, its ServiceAccount reference and a matching
    /// status makes no token request and no write.
    #[test]
    fn restart_with_valid_secret_is_quiet(
        account_index in 0..ACCOUNTS.len(),
        identity_index in 0..IDENTITIES.len(),
        downtime in 0i64..2700,
        account_first in any::<bool>(),
    ) {
        let mut before = World::new();
        let desired = desired(ACCOUNTS[account_index], IDENTITIES[identity_index]);
        before.accounts_in_specs.insert(desired.service_account.clone());
        before.step(&spec_with(desired.clone(), true, ObservedStatus::default()))?;
        let answer = before.event_for(&Action::AnswerToken(0)).unwrap();
        before.step(&answer)?;
        while let Some(write) = before.state.pending_writes.values().next().cloned() {
            let done = BindingEvent::WriteDone(before.land(write));
            before.step(&done)?;
        }
        let secret = before.secret.clone().unwrap();
        prop_assert!(before.status.ready.as_ref().is_some_and(|ready| ready.ready));

        let mut after = World::new();
        after.now = at(downtime);
        after.accounts_in_specs.insert(desired.service_account.clone());
        let mut events = vec![
            BindingEvent::SecretObserved(observed(&secret)),
            spec_with(desired.clone(), true, before.status.clone()),
        ];
        let account_event = account(&desired.service_account, true);
        if account_first {
            events.insert(0, account_event);
        } else {
            events.push(account_event);
        }

        for event in &events {
            let commands = after.step(event)?;
            let busy: Vec<&Command> = commands
                .iter()
                .filter(|command| !matches!(command, Command::ArmTimer { .. }))
                .collect();
            prop_assert!(busy.is_empty(), "restart sent {busy:?} after {}", event.kind());
        }
        prop_assert!(after.state.timer_at.is_some());
    }

    /// The same state, event, time and jitter always give the same commands.
    #[test]
    fn decide_is_deterministic(actions in prop::collection::vec(action(), 1..40), jitter in 0.0f64..1.0) {
        let mut world = World::new();
        world.run(&actions)?;
        let now = world.now;

        let first = crate::decide::decide(&world.state, &BindingEvent::TimerFired, now, jitter, &world.config);
        let second = crate::decide::decide(&world.state, &BindingEvent::TimerFired, now, jitter, &world.config);

        prop_assert_eq!(first, second);
    }
}
