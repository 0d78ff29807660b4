//! The actor that owns one binding: its state, its journal and its single timer.
//!
//! It performs no I/O itself. Each event goes through [`step`], and the resulting commands go
//! to the token broker, the writer, or the binding's own timer.

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, MessageResult, Recipient,
    SpawnHandle,
};
use jiff::Timestamp;
use tracing::{Span, debug, info, info_span, warn};

use crate::actor::Deliver;
use crate::actor::broker::IssueToken;
use crate::actor::writer::SubmitWrite;
use crate::clock::Clock;
use crate::command::Command;
use crate::decide::{DecideConfig, step};
use crate::event::BindingEvent;
use crate::journal::{Journal, JournalEntry};
use crate::model::BindingKey;
use crate::state::BindingState;
use crate::write::{ClusterWrite, WriteRequest};

/// The policies, clock and command recipients that every binding actor shares.
#[derive(Clone)]
pub struct BindingContext {
    /// The state machine's policies.
    pub decide: DecideConfig,
    /// The time source.
    pub clock: Clock,
    /// Entries each binding's journal keeps.
    pub journal_capacity: usize,
    /// The token broker.
    pub broker: Recipient<IssueToken>,
    /// The writer.
    pub writer: Recipient<SubmitWrite>,
    /// The registry, notified when the actor stops.
    pub registry: Recipient<BindingStopped>,
}

/// Sent to the registry when a binding actor stops, so that it removes the address.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct BindingStopped {
    /// The binding whose actor stopped.
    pub key: BindingKey,
    /// Sequence number of the stopped actor, so that a newer actor for the same key stays
    /// registered.
    pub incarnation: u64,
}

/// Asks a binding actor for a copy of its state and journal.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "BindingSnapshot")]
pub struct Inspect;

/// Stops a binding actor without cleanup, for shutdown.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct Halt;

/// A copy of one binding's state and recent history, for debugging and tests.
#[derive(Clone, Debug)]
pub struct BindingSnapshot {
    /// The state after the last handled event. It contains the held token, whose `Debug`
    /// output is redacted.
    pub state: BindingState,
    /// The most recent events, oldest first.
    pub journal: Vec<JournalEntry>,
}

/// The actor of one binding.
pub struct BindingActor {
    state: BindingState,
    journal: Journal,
    context: BindingContext,
    incarnation: u64,
    timer: Option<SpawnHandle>,
    span: Span,
}

impl BindingActor {
    /// Creates the actor for `key`. The `incarnation` number distinguishes it from earlier
    /// actors of the same key.
    #[must_use]
    pub fn new(key: BindingKey, incarnation: u64, context: BindingContext) -> Self {
        let span = info_span!("binding", namespace = %key.namespace, name = %key.name);
        Self {
            state: BindingState::new(key),
            journal: Journal::with_capacity(context.journal_capacity),
            context,
            incarnation,
            timer: None,
            span,
        }
    }

    fn handle_event(&mut self, event: &BindingEvent, ctx: &mut Context<Self>) {
        let span = self.span.clone();
        let _entered = span.enter();

        let now = self.context.clock.now();
        let jitter = rand::random::<f64>();
        let commands = step(&mut self.state, event, now, jitter, &self.context.decide);
        self.journal.record(now, event, &commands);

        log_event(event);
        debug!(
            event = event.kind(),
            commands = ?commands.iter().map(Command::kind).collect::<Vec<_>>(),
            "handled event"
        );

        for command in commands {
            self.execute(command, now, ctx);
        }
    }

    fn execute(&mut self, command: Command, now: Timestamp, ctx: &mut Context<Self>) {
        match command {
            Command::RequestToken {
                inputs_hash,
                request,
            } => {
                self.context.broker.do_send(IssueToken {
                    key: self.state.key.clone(),
                    inputs_hash,
                    request,
                });
            }
            Command::Write(write) => {
                self.context.writer.do_send(SubmitWrite(WriteRequest {
                    key: self.state.key.clone(),
                    write,
                }));
            }
            Command::ArmTimer { at, purpose } => {
                if let Some(previous) = self.timer.take() {
                    ctx.cancel_future(previous);
                }
                let delay = Command::ArmTimer { at, purpose }
                    .timer_delay(now)
                    .unwrap_or_default();
                debug!(%at, ?purpose, "timer armed");
                self.timer = Some(ctx.run_later(delay, |actor, ctx| {
                    actor.timer = None;
                    actor.handle_event(&BindingEvent::TimerFired, ctx);
                }));
            }
            Command::Stop => {
                debug!("binding removed, stopping its actor");
                ctx.stop();
            }
        }
    }
}

/// Logs the events worth a line at info or warn level. Tokens are never formatted: only
/// their expiry and the error messages, which never contain one.
fn log_event(event: &BindingEvent) {
    match event {
        BindingEvent::TokenFailed { error, .. } => {
            warn!(error = %error.message, retryable = error.retryable, "token request failed");
        }
        BindingEvent::WriteFailed { write, error } => {
            warn!(write = write.kind().as_str(), error = %error.message, kind = ?error.kind, "write failed");
        }
        BindingEvent::WriteDone(ClusterWrite::ApplySecret(content)) => {
            info!(secret = %content.name, expires_at = %content.token.expires_at, "stored token in Secret");
        }
        BindingEvent::WriteDone(ClusterWrite::RemoveFinalizer) => info!("removed finalizer"),
        _ => {}
    }
}

impl Actor for BindingActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.context.registry.do_send(BindingStopped {
            key: self.state.key.clone(),
            incarnation: self.incarnation,
        });
    }
}

impl Handler<Deliver> for BindingActor {
    type Result = ();

    fn handle(&mut self, message: Deliver, ctx: &mut Self::Context) {
        self.handle_event(&message.event, ctx);
    }
}

impl Handler<Inspect> for BindingActor {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _message: Inspect, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(BindingSnapshot {
            state: self.state.clone(),
            journal: self.journal.entries(),
        })
    }
}

impl Handler<Halt> for BindingActor {
    type Result = ();

    fn handle(&mut self, _message: Halt, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
