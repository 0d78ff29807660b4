//! Builders and a step harness shared by the unit and property tests of the state machine.

use jiff::{SignedDuration, Timestamp};

use crate::command::Command;
use crate::decide::{DecideConfig, step};
use crate::event::{
    BindingEvent, ObservedBinding, ObservedSecret, ObservedServiceAccount, ObservedStatus,
};
use crate::model::{BindingKey, DesiredBinding, Identity, IssuedToken, RegistryToken, TokenError};
use crate::spec::InvalidSpec;
use crate::state::BindingState;
use crate::write::{ClusterWrite, SecretContent, WriteError, WriteErrorKind};

/// Base time of every test: offsets in seconds are relative to it.
pub const T0: &str = "2025-01-01T00:00:00Z";
/// Secret name of the test binding `ns/app`.
pub const SECRET: &str = "app-msi-acrpull-secret";
/// Lifetime of a test token, like an ACR access token: refreshed 2700 s after issue.
pub const LIFETIME: i64 = 4500;

/// Returns `T0 + offset_secs`.
pub fn at(offset_secs: i64) -> Timestamp {
    T0.parse::<Timestamp>().unwrap() + SignedDuration::from_secs(offset_secs)
}

/// Returns the offset of `instant` from `T0` in seconds.
pub fn offset(instant: Timestamp) -> i64 {
    instant.duration_since(at(0)).as_secs()
}

/// Returns a valid spec targeting `service_account`, with identity `x` or another one.
pub fn desired(service_account: &str, identity: &str) -> DesiredBinding {
    DesiredBinding {
        acr_server: "example.azurecr.io".into(),
        identity: Identity::ClientId(identity.into()),
        scope: None,
        service_account: service_account.into(),
        secret_name: SECRET.into(),
    }
}

/// Returns a `SpecObserved` for a valid spec with the finalizer and an empty status.
pub fn spec(service_account: &str) -> BindingEvent {
    spec_with(
        desired(service_account, "x"),
        true,
        ObservedStatus::default(),
    )
}

/// Returns a `SpecObserved` for `desired` at generation 1.
pub fn spec_with(
    desired: DesiredBinding,
    has_finalizer: bool,
    status: ObservedStatus,
) -> BindingEvent {
    BindingEvent::SpecObserved(ObservedBinding {
        generation: 1,
        spec: Ok(desired),
        has_finalizer,
        status,
    })
}

/// Returns a `SpecObserved` with an invalid spec.
pub fn invalid_spec() -> BindingEvent {
    BindingEvent::SpecObserved(ObservedBinding {
        generation: 1,
        spec: Err(InvalidSpec::MissingIdentity),
        has_finalizer: true,
        status: ObservedStatus::default(),
    })
}

/// Returns a token issued at `issued` that lives `LIFETIME` seconds.
pub fn token(value: &str, issued: i64) -> IssuedToken {
    token_for(value, issued, LIFETIME)
}

/// Returns a token issued at `issued` that lives `lifetime` seconds.
pub fn token_for(value: &str, issued: i64, lifetime: i64) -> IssuedToken {
    IssuedToken {
        token: RegistryToken::new(value.into()),
        issued_at: at(issued),
        expires_at: at(issued + lifetime),
    }
}

/// Returns a retryable token failure.
pub fn token_error(message: &str) -> TokenError {
    TokenError {
        message: message.into(),
        retryable: true,
        retry_after: None,
    }
}

/// Returns a write error of `kind`.
pub fn write_error(kind: WriteErrorKind) -> WriteError {
    WriteError {
        message: format!("the API server answered {kind:?}"),
        kind,
    }
}

/// Returns an owned Secret observation as the Secret adapter would report `content`.
pub fn observed(content: &SecretContent) -> ObservedSecret {
    ObservedSecret {
        name: content.name.clone(),
        inputs_hash: Some(content.inputs_hash.clone()),
        refreshed_at: Some(content.refreshed_at),
        token: Some(content.token.clone()),
        owned: true,
    }
}

/// Returns a ServiceAccount observation.
pub fn account(name: &str, references_secret: bool) -> BindingEvent {
    BindingEvent::ServiceAccountObserved(ObservedServiceAccount {
        name: name.into(),
        references_secret,
        references_other_owned_secret: false,
    })
}

/// Renders a command compactly, for table tests: `ApplySecret(t1)`, `Timer(Refresh @2700)`.
pub fn render(command: &Command) -> String {
    match command {
        Command::RequestToken { .. } => "RequestToken".into(),
        Command::Stop => "Stop".into(),
        Command::ArmTimer { at, purpose } => format!("Timer({purpose:?} @{})", offset(*at)),
        Command::Write(write) => match write {
            ClusterWrite::ApplySecret(content) => {
                format!("ApplySecret({})", content.token.token.expose())
            }
            ClusterWrite::AddPullSecretReference {
                service_account, ..
            } => {
                format!("AddReference({service_account})")
            }
            ClusterWrite::RemovePullSecretReference {
                service_account, ..
            } => {
                format!("RemoveReference({service_account})")
            }
            ClusterWrite::UpdateStatus(update) => {
                format!("Status({} {})", update.ready.ready, update.ready.reason)
            }
            ClusterWrite::PublishEvent(notice) => {
                let kind = if notice.warning { "Warning" } else { "Normal" };
                format!("Event({kind} {})", notice.reason)
            }
            other => other.kind().as_str().into(),
        },
    }
}

/// One binding driven through `step` with a fixed clock and jitter 1.
pub struct Harness {
    /// The state under test.
    pub state: BindingState,
    /// The policies.
    pub config: DecideConfig,
    /// Every event handled so far, to print when a test fails.
    pub events: Vec<BindingEvent>,
    /// Every command returned so far.
    pub history: Vec<Command>,
}

impl Harness {
    /// Creates a harness for binding `ns/app`.
    pub fn new() -> Self {
        Self {
            state: BindingState::new(BindingKey::new("ns", "app")),
            config: DecideConfig::default(),
            events: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Handles `event` at `T0 + secs` and returns the commands.
    pub fn step(&mut self, secs: i64, event: BindingEvent) -> Vec<Command> {
        let commands = step(&mut self.state, &event, at(secs), 1.0, &self.config);
        self.events.push(event);
        self.history.extend(commands.iter().cloned());
        commands
    }

    /// Handles `event` at `T0 + secs` and returns the rendered commands.
    pub fn rendered(&mut self, secs: i64, event: BindingEvent) -> Vec<String> {
        self.step(secs, event).iter().map(render).collect()
    }

    /// Returns the last command of the history that matches `pick`.
    pub fn last<T>(&self, pick: impl Fn(&Command) -> Option<T>) -> T {
        self.history
            .iter()
            .rev()
            .find_map(pick)
            .expect("no matching command in history")
    }

    /// Returns the last `ApplySecret` content sent.
    pub fn last_secret(&self) -> SecretContent {
        self.last(|command| match command {
            Command::Write(ClusterWrite::ApplySecret(content)) => Some(content.clone()),
            _ => None,
        })
    }

    /// Returns the last status update sent.
    pub fn last_status_write(&self) -> ClusterWrite {
        self.last(|command| match command {
            Command::Write(write @ ClusterWrite::UpdateStatus(_)) => Some(write.clone()),
            _ => None,
        })
    }

    /// Returns a token for the request in flight at `T0 + secs`, and the rendered commands.
    pub fn issue(&mut self, secs: i64, value: &str) -> Vec<String> {
        let inputs_hash = self
            .state
            .in_flight
            .clone()
            .expect("no token request in flight");
        self.rendered(
            secs,
            BindingEvent::TokenIssued {
                inputs_hash,
                token: token(value, secs),
            },
        )
    }

    /// Fails the token request in flight at `T0 + secs`.
    pub fn fail_token(&mut self, secs: i64, error: TokenError) -> Vec<String> {
        let inputs_hash = self
            .state
            .in_flight
            .clone()
            .expect("no token request in flight");
        self.rendered(secs, BindingEvent::TokenFailed { inputs_hash, error })
    }

    /// Reports every pending write as done, in order, and returns the rendered commands.
    pub fn complete_all(&mut self, secs: i64) -> Vec<String> {
        let mut rendered = Vec::new();
        while let Some(write) = self.state.pending_writes.values().next().cloned() {
            rendered.extend(self.rendered(secs, BindingEvent::WriteDone(write)));
        }
        rendered
    }

    /// Brings the binding to its steady state at `T0`: token `t1` stored, ServiceAccount
    /// `default` referenced, Ready=True written, timer armed for the refresh at 2700 s.
    pub fn ready() -> Self {
        let mut harness = Self::new();
        harness.step(0, spec("default"));
        harness.issue(0, "t1");
        harness.complete_all(0);
        harness
    }

    /// Returns the `SpecObserved` that the API server would send back after our last
    /// status write.
    pub fn status_echo(&self) -> BindingEvent {
        let ClusterWrite::UpdateStatus(update) = self.last_status_write() else {
            unreachable!()
        };
        let desired = self.state.desired().cloned().expect("valid spec");
        spec_with(desired, true, ObservedStatus::from(&update))
    }
}
