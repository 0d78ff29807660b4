//! The actor system as one value: what the Kubernetes and Azure adapters call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::{Actor, Addr, AsyncContext, Context};
use tracing::info;

use crate::actor::Deliver;
use crate::actor::binding::{BindingContext, BindingSnapshot};
use crate::actor::broker::{BrokerConfig, BrokerStats, TokenBroker};
use crate::actor::registry::{InspectBinding, Registry, RegistryStats, StopBindings};
use crate::actor::writer::{Drain, DrainReport, WriterActor, WriterConfig, WriterStats};
use crate::clock::Clock;
use crate::config::ConfigError;
use crate::decide::DecideConfig;
use crate::event::BindingEvent;
use crate::journal::DEFAULT_JOURNAL_CAPACITY;
use crate::model::BindingKey;
use crate::ports::{ClusterWriter, TokenSource};

/// Everything the actor system can be configured with.
#[derive(Clone, Copy, Debug)]
pub struct SystemConfig {
    /// The state machine's policies: refresh, backoff, cleanup attempts.
    pub decide: DecideConfig,
    /// Rate limit, coalescing and retries of the writer.
    pub writer: WriterConfig,
    /// Concurrency and timeout of the token broker.
    pub broker: BrokerConfig,
    /// The time source of the actors: [`Clock::System`] in production.
    pub clock: Clock,
    /// Entries each binding's journal keeps. Default 32.
    pub journal_capacity: usize,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            decide: DecideConfig::default(),
            writer: WriterConfig::default(),
            broker: BrokerConfig::default(),
            clock: Clock::System,
            journal_capacity: DEFAULT_JOURNAL_CAPACITY,
        }
    }
}

impl SystemConfig {
    /// Checks every part of the configuration.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.decide.validate()?;
        self.writer.validate()?;
        self.broker.validate()
    }
}

/// The reason an event could not be delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The system was shut down.
    #[error("the actor system is shut down, so the event for binding {key} was not delivered")]
    Stopped {
        /// The binding the event was for.
        key: BindingKey,
    },
}

/// A point-in-time copy of the actor system's counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemStats {
    /// Binding actors running.
    pub bindings: usize,
    /// Secret observations held for bindings without an actor.
    pub pending_secrets: usize,
    /// Binding actors started since start-up.
    pub bindings_started: u64,
    /// Events forwarded to binding actors.
    pub events_delivered: u64,
    /// Events dropped because their binding had no actor.
    pub events_dropped: u64,
    /// Token requests from bindings.
    pub token_requests: u64,
    /// Token requests served from the cache.
    pub token_cache_hits: u64,
    /// Token requests that joined a call in flight.
    pub token_requests_joined: u64,
    /// Calls to the token source.
    pub token_source_calls: u64,
    /// Token source calls that failed or timed out.
    pub token_source_failures: u64,
    /// Writes submitted to the writer.
    pub writes_submitted: u64,
    /// Writes that replaced a queued write for the same object.
    pub writes_coalesced: u64,
    /// Writes applied.
    pub writes_applied: u64,
    /// Writes reported failed.
    pub writes_failed: u64,
    /// Write attempts repeated by the writer.
    pub writes_retried: u64,
    /// Writes queued now.
    pub writes_queued: usize,
    /// Writes in flight now.
    pub writes_in_flight: usize,
}

/// The actors stopped and the writes dropped at shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Binding actors stopped.
    pub bindings_stopped: usize,
    /// The writer's totals and the writes it dropped.
    pub writer: DrainReport,
}

/// The running actor system: registry, binding actors, token broker and writer.
///
/// Cloning is cheap, and every clone addresses the same actors.
#[derive(Clone)]
pub struct ActorSystem {
    registry: Addr<Registry>,
    writer: Addr<WriterActor>,
    broker: Addr<TokenBroker>,
    registry_stats: Arc<RegistryStats>,
    broker_stats: Arc<BrokerStats>,
    writer_stats: Arc<WriterStats>,
    shut_down: Arc<AtomicBool>,
}

impl ActorSystem {
    /// Starts the actors on the current arbiter.
    ///
    /// Must run inside a running actix `System` (for example under `actix_rt::System` or
    /// `#[actix_rt::main]`), and not inside a task spawned with `tokio::spawn`, where starting
    /// an actor panics.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] when a configuration value is out of range.
    pub fn start(
        config: SystemConfig,
        token_source: Arc<dyn TokenSource>,
        cluster_writer: Arc<dyn ClusterWriter>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;

        let registry_stats = Arc::new(RegistryStats::default());
        let broker_stats = Arc::new(BrokerStats::default());
        let writer_stats = Arc::new(WriterStats::default());

        // The broker and the writer reply through the registry, and the registry hands their
        // addresses to every binding actor, so the registry's address comes first.
        let registry_context = Context::<Registry>::new();
        let registry_address = registry_context.address();

        let broker = TokenBroker::new(
            token_source,
            config.decide.refresh,
            config.clock,
            config.broker,
            registry_address.clone().recipient(),
            Arc::clone(&broker_stats),
        )
        .start();
        let writer = WriterActor::new(
            config.writer,
            cluster_writer,
            registry_address.clone().recipient(),
            Arc::clone(&writer_stats),
        )
        .start();

        let binding_context = BindingContext {
            decide: config.decide,
            clock: config.clock,
            journal_capacity: config.journal_capacity,
            broker: broker.clone().recipient(),
            writer: writer.clone().recipient(),
            registry: registry_address.recipient(),
        };
        let registry =
            registry_context.run(Registry::new(binding_context, Arc::clone(&registry_stats)));
        info!(
            writer_qps = config.writer.qps,
            writer_burst = config.writer.burst,
            refresh_margin_secs = config.decide.refresh.margin.as_secs(),
            "actor system started"
        );

        Ok(Self {
            registry,
            writer,
            broker,
            registry_stats,
            broker_stats,
            writer_stats,
            shut_down: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sends an event to a binding without waiting. After shutdown the event is dropped.
    pub fn deliver(&self, key: BindingKey, event: BindingEvent) {
        if self.shut_down.load(Ordering::Acquire) {
            return;
        }
        self.registry.do_send(Deliver { key, event });
    }

    /// Sends an event to a binding and waits until the registry has routed it, so that a
    /// caller producing events faster than they are routed slows down.
    ///
    /// # Errors
    /// Returns [`DeliverError::Stopped`] after shutdown.
    pub async fn deliver_async(
        &self,
        key: BindingKey,
        event: BindingEvent,
    ) -> Result<(), DeliverError> {
        if self.shut_down.load(Ordering::Acquire) {
            return Err(DeliverError::Stopped { key });
        }
        self.registry
            .send(Deliver {
                key: key.clone(),
                event,
            })
            .await
            .map_err(|_| DeliverError::Stopped { key })
    }

    /// Returns the number of binding actors running.
    #[must_use]
    pub fn binding_count(&self) -> usize {
        self.registry_stats.bindings.load(Ordering::Relaxed)
    }

    /// Returns a copy of every counter.
    #[must_use]
    pub fn stats(&self) -> SystemStats {
        let registry = &self.registry_stats;
        let broker = &self.broker_stats;
        let writer = &self.writer_stats;
        SystemStats {
            bindings: registry.bindings.load(Ordering::Relaxed),
            pending_secrets: registry.pending_secrets.load(Ordering::Relaxed),
            bindings_started: registry.bindings_started.load(Ordering::Relaxed),
            events_delivered: registry.events_delivered.load(Ordering::Relaxed),
            events_dropped: registry.events_dropped.load(Ordering::Relaxed),
            token_requests: broker.requests.load(Ordering::Relaxed),
            token_cache_hits: broker.cache_hits.load(Ordering::Relaxed),
            token_requests_joined: broker.joined.load(Ordering::Relaxed),
            token_source_calls: broker.source_calls.load(Ordering::Relaxed),
            token_source_failures: broker.source_failures.load(Ordering::Relaxed),
            writes_submitted: writer.submitted.load(Ordering::Relaxed),
            writes_coalesced: writer.coalesced.load(Ordering::Relaxed),
            writes_applied: writer.applied.load(Ordering::Relaxed),
            writes_failed: writer.failed.load(Ordering::Relaxed),
            writes_retried: writer.retried.load(Ordering::Relaxed),
            writes_queued: writer.queued.load(Ordering::Relaxed),
            writes_in_flight: writer.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Returns a copy of a binding's state and journal, or `None` when it has no actor.
    pub async fn inspect(&self, key: BindingKey) -> Option<BindingSnapshot> {
        self.registry
            .send(InspectBinding { key })
            .await
            .ok()
            .flatten()
    }

    /// Stops the binding actors, drains the writer for up to its drain timeout, then stops
    /// the broker. Events delivered afterwards are dropped.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shut_down.store(true, Ordering::Release);
        let bindings_stopped = self.registry.send(StopBindings).await.unwrap_or(0);
        let writer = self.writer.send(Drain).await.unwrap_or_default();
        self.broker.do_send(crate::actor::broker::StopBroker);

        info!(
            bindings_stopped,
            writes_applied = writer.applied,
            writes_dropped = writer.dropped,
            "actor system stopped"
        );
        ShutdownReport {
            bindings_stopped,
            writer,
        }
    }
}
