//! The registry: `namespace/name` → binding actor, and the route every event takes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message, ResponseFuture};
use tracing::{debug, info};

use crate::actor::Deliver;
use crate::actor::binding::{
    BindingActor, BindingContext, BindingSnapshot, BindingStopped, Halt, Inspect,
};
use crate::event::{BindingEvent, ObservedSecret};
use crate::model::BindingKey;

/// Counters of the registry, readable without a message.
#[derive(Debug, Default)]
pub struct RegistryStats {
    /// Binding actors running now.
    pub bindings: AtomicUsize,
    /// Secret observations held for bindings that have no actor yet.
    pub pending_secrets: AtomicUsize,
    /// Binding actors started since the registry started.
    pub bindings_started: AtomicU64,
    /// Events forwarded to a binding actor.
    pub events_delivered: AtomicU64,
    /// Events dropped because their binding has no actor and they do not start one.
    pub events_dropped: AtomicU64,
}

/// Requests a binding's snapshot from the registry, which returns `None` when the binding has
/// no actor.
#[derive(Message, Clone, Debug)]
#[rtype(result = "Option<BindingSnapshot>")]
pub struct InspectBinding {
    /// The binding to inspect.
    pub key: BindingKey,
}

/// Stops every binding actor and every later delivery, for shutdown. Returns the number of
/// actors stopped.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "usize")]
pub struct StopBindings;

/// Starts binding actors, routes events to them, and removes them when they stop.
///
/// An actor starts on the first `SpecObserved` or `DeletionRequested` for its key. Other
/// events for a key without an actor are dropped, except Secret observations: the latest one
/// per key is kept and delivered right before the event that starts the actor. So when the
/// Secrets are listed before the bindings, a restarted binding receives its Secret before it
/// decides anything, and adopts the stored token instead of requesting one.
pub struct Registry {
    bindings: HashMap<BindingKey, (Addr<BindingActor>, u64)>,
    pending_secrets: HashMap<BindingKey, ObservedSecret>,
    context: BindingContext,
    next_incarnation: u64,
    stopping: bool,
    stats: Arc<RegistryStats>,
}

impl Registry {
    /// Creates a registry whose binding actors share `context`.
    #[must_use]
    pub fn new(context: BindingContext, stats: Arc<RegistryStats>) -> Self {
        Self {
            bindings: HashMap::new(),
            pending_secrets: HashMap::new(),
            context,
            next_incarnation: 0,
            stopping: false,
            stats,
        }
    }

    fn update_gauges(&self) {
        self.stats
            .bindings
            .store(self.bindings.len(), Ordering::Relaxed);
        self.stats
            .pending_secrets
            .store(self.pending_secrets.len(), Ordering::Relaxed);
    }

    fn spawn(&mut self, key: &BindingKey) -> Addr<BindingActor> {
        self.next_incarnation += 1;
        let incarnation = self.next_incarnation;
        let address = BindingActor::new(key.clone(), incarnation, self.context.clone()).start();
        self.bindings
            .insert(key.clone(), (address.clone(), incarnation));
        self.stats.bindings_started.fetch_add(1, Ordering::Relaxed);
        debug!(namespace = %key.namespace, name = %key.name, "binding actor started");
        address
    }

    fn deliver(&mut self, key: BindingKey, event: BindingEvent) {
        if let Some((address, _)) = self.bindings.get(&key) {
            let address = address.clone();
            // Remove the actor from the map as soon as its binding is removed, so that a binding
            // created again under the same name gets a new actor instead of the stopping one.
            if matches!(event, BindingEvent::BindingRemoved) {
                self.bindings.remove(&key);
                self.pending_secrets.remove(&key);
            }
            address.do_send(Deliver { key, event });
            self.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
            return;
        }

        match event {
            BindingEvent::SpecObserved(_) | BindingEvent::DeletionRequested => {
                let address = self.spawn(&key);
                if let Some(secret) = self.pending_secrets.remove(&key) {
                    address.do_send(Deliver {
                        key: key.clone(),
                        event: BindingEvent::SecretObserved(secret),
                    });
                    self.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
                }
                address.do_send(Deliver { key, event });
                self.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
            }
            BindingEvent::SecretObserved(secret) => {
                self.pending_secrets.insert(key, secret);
            }
            BindingEvent::SecretGone { .. } | BindingEvent::BindingRemoved => {
                self.pending_secrets.remove(&key);
            }
            other => {
                debug!(
                    namespace = %key.namespace,
                    name = %key.name,
                    event = other.kind(),
                    "dropped event for a binding without an actor"
                );
                self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Registry {
    type Result = ();

    fn handle(&mut self, message: Deliver, _ctx: &mut Self::Context) {
        if self.stopping {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.deliver(message.key, message.event);
        self.update_gauges();
    }
}

impl Handler<BindingStopped> for Registry {
    type Result = ();

    fn handle(&mut self, message: BindingStopped, _ctx: &mut Self::Context) {
        let current = self
            .bindings
            .get(&message.key)
            .is_some_and(|(_, incarnation)| *incarnation == message.incarnation);
        if current {
            self.bindings.remove(&message.key);
        }
        self.update_gauges();
    }
}

impl Handler<InspectBinding> for Registry {
    type Result = ResponseFuture<Option<BindingSnapshot>>;

    fn handle(&mut self, message: InspectBinding, _ctx: &mut Self::Context) -> Self::Result {
        let address = self
            .bindings
            .get(&message.key)
            .map(|(address, _)| address.clone());
        Box::pin(async move {
            match address {
                Some(address) => address.send(Inspect).await.ok(),
                None => None,
            }
        })
    }
}

impl Handler<StopBindings> for Registry {
    type Result = usize;

    fn handle(&mut self, _message: StopBindings, ctx: &mut Self::Context) -> usize {
        self.stopping = true;
        let stopped = self.bindings.len();
        for (address, _) in self.bindings.values() {
            address.do_send(Halt);
        }
        self.bindings.clear();
        self.pending_secrets.clear();
        self.update_gauges();
        info!(bindings = stopped, "stopped all binding actors");

        // Stop the registry itself once the Halt messages are out.
        ctx.run_later(std::time::Duration::ZERO, |_, ctx| {
            use actix::ActorContext;
            ctx.stop();
        });
        stopped
    }
}
