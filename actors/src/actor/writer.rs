//! The writer: the only actor that writes to the API server.
//!
//! Writes are queued per object. A newer write for an object that is still queued replaces the
//! older one (coalescing). A write for an object with a write in flight waits for it, so writes
//! to one object never overlap and keep their order. Urgent writes (finalizer,
//! Secret, references) go before status updates and Events. A token bucket limits the rate,
//! and a bound limits the writes in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use actix::fut::{ActorFutureExt, wrap_future};
use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, Recipient, ResponseFuture,
};
use governor::clock::Clock as RateLimiterClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::actor::Deliver;
use crate::backoff::BackoffPolicy;
use crate::config::ConfigError;
use crate::event::BindingEvent;
use crate::model::BindingKey;
use crate::ports::ClusterWriter;
use crate::write::{CoalesceKey, WriteError, WriteErrorKind, WriteRequest};

/// Limits and retry rules of the writer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WriterConfig {
    /// Sustained writes per second. Default 50.
    pub qps: u32,
    /// Writes that may go out at once after a quiet period. Default 100.
    pub burst: u32,
    /// Writes in flight at the same time. Default 16.
    pub max_in_flight: usize,
    /// Immediate retries after a 409 Conflict, before the write is reported failed. Default 10,
    /// because each retry re-reads the object and bindings sharing a ServiceAccount race on it.
    pub conflict_retries: u32,
    /// Attempts in total for a throttled or timed-out write (429, 5xx), including the first.
    /// Default 5.
    pub max_attempts: u32,
    /// Delays between attempts of a throttled write; a server's `Retry-After` is a floor.
    /// Default 500 ms, doubling, at most 30 s.
    pub backoff: BackoffPolicy,
    /// Time after which one write attempt counts as throttled. Default 30 s.
    pub write_timeout: Duration,
    /// Time that shutdown waits for queued and in-flight writes. Default 10 s.
    pub drain_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            qps: 50,
            burst: 100,
            max_in_flight: 16,
            conflict_retries: 10,
            max_attempts: 5,
            backoff: BackoffPolicy {
                base: Duration::from_millis(500),
                factor: 2.0,
                max: Duration::from_secs(30),
            },
            write_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl WriterConfig {
    /// Checks that the rate, burst, bounds and write timeout are above zero, and checks the
    /// backoff policy.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("writer.qps", u64::from(self.qps)),
            ("writer.burst", u64::from(self.burst)),
            ("writer.max_in_flight", self.max_in_flight as u64),
            ("writer.max_attempts", u64::from(self.max_attempts)),
        ];
        for (field, value) in counts {
            if value == 0 {
                return Err(ConfigError {
                    field,
                    value: "0".into(),
                    expected: "at least 1",
                });
            }
        }
        if self.write_timeout.is_zero() {
            return Err(ConfigError {
                field: "writer.write_timeout",
                value: format!("{:?}", self.write_timeout),
                expected: "greater than zero",
            });
        }
        self.backoff.validate()
    }
}

/// Counters of the writer, readable without a message.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Writes received.
    pub submitted: AtomicU64,
    /// Writes that replaced a queued write for the same object.
    pub coalesced: AtomicU64,
    /// Writes applied.
    pub applied: AtomicU64,
    /// Writes reported failed after the writer's own retries.
    pub failed: AtomicU64,
    /// Attempts repeated after a conflict, throttling or a timeout.
    pub retried: AtomicU64,
    /// Writes rejected because the writer was shutting down.
    pub rejected: AtomicU64,
    /// Writes queued or waiting for a retry now.
    pub queued: AtomicUsize,
    /// Writes in flight now.
    pub in_flight: AtomicUsize,
}

/// A write for the writer to queue.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct SubmitWrite(pub WriteRequest);

/// Stops accepting writes, waits up to the drain timeout for the queue to empty, drops what
/// is left, and stops the writer.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "DrainReport")]
pub struct Drain;

/// The writer's totals at shutdown, and the writes it dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Writes applied over the writer's lifetime.
    pub applied: u64,
    /// Writes reported failed over the writer's lifetime.
    pub failed: u64,
    /// Writes queued or in flight when the drain timeout ran out, which were dropped.
    pub dropped: usize,
}

/// The governor clock over tokio's clock, so that paused time in tests also pauses the rate
/// limiter.
#[derive(Clone, Copy, Debug, Default)]
struct TokioClock;

impl RateLimiterClock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A binding and the object one of its writes changes.
type Slot = (BindingKey, CoalesceKey);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryState {
    /// In a queue, waiting for its turn.
    Queued,
    /// Waiting for the write in flight for the same object to finish.
    Blocked,
    /// Waiting for a retry delay.
    Delayed,
}

struct Entry {
    request: WriteRequest,
    attempts: u32,
    /// Matches the queue position that is current; older positions are skipped.
    ticket: u64,
    urgent: bool,
    state: EntryState,
}

/// The only writer to the API server.
pub struct WriterActor {
    config: WriterConfig,
    writer: Arc<dyn ClusterWriter>,
    reply: Recipient<Deliver>,
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>,
    entries: HashMap<Slot, Entry>,
    urgent: VecDeque<(Slot, u64)>,
    normal: VecDeque<(Slot, u64)>,
    in_flight: HashSet<Slot>,
    next_ticket: u64,
    wake_scheduled: bool,
    accepting: bool,
    drain_waiters: Vec<oneshot::Sender<DrainReport>>,
    stats: Arc<WriterStats>,
}

impl WriterActor {
    /// Creates a writer over `writer` that reports through `reply`.
    ///
    /// # Panics
    /// Panics if `config.qps` or `config.burst` is zero; [`WriterConfig::validate`] rejects
    /// both.
    #[must_use]
    pub fn new(
        config: WriterConfig,
        writer: Arc<dyn ClusterWriter>,
        reply: Recipient<Deliver>,
        stats: Arc<WriterStats>,
    ) -> Self {
        let qps = NonZeroU32::new(config.qps).expect("writer.qps is validated to be at least 1");
        let burst =
            NonZeroU32::new(config.burst).expect("writer.burst is validated to be at least 1");
        let quota = Quota::per_second(qps).allow_burst(burst);

        Self {
            config,
            writer,
            reply,
            limiter: RateLimiter::direct_with_clock(quota, TokioClock),
            entries: HashMap::new(),
            urgent: VecDeque::new(),
            normal: VecDeque::new(),
            in_flight: HashSet::new(),
            next_ticket: 0,
            wake_scheduled: false,
            accepting: true,
            drain_waiters: Vec::new(),
            stats,
        }
    }

    fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    fn enqueue(&mut self, slot: Slot, ticket: u64, urgent: bool, front: bool) {
        let queue = if urgent {
            &mut self.urgent
        } else {
            &mut self.normal
        };
        if front {
            queue.push_front((slot, ticket));
        } else {
            queue.push_back((slot, ticket));
        }
    }

    fn submit(&mut self, request: WriteRequest, ctx: &mut Context<Self>) {
        if !self.accepting {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            debug!(namespace = %request.key.namespace, name = %request.key.name, write = request.write.kind().as_str(), "writer is shutting down, dropped write");
            return;
        }
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);

        let ticket = self.ticket();
        let slot = (request.key.clone(), request.write.coalesce_key(ticket));
        let urgent = request.write.is_urgent();

        if let Some(entry) = self.entries.get_mut(&slot) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            entry.request = request;
            entry.attempts = 0;
            let promote = urgent && !entry.urgent;
            entry.urgent |= urgent;

            // A queued entry keeps its place unless it moves up to the urgent queue. A delayed
            // entry is new work, so it goes back into a queue now.
            let requeue = match entry.state {
                EntryState::Queued => promote,
                EntryState::Delayed => true,
                EntryState::Blocked => false,
            };
            if requeue {
                entry.ticket = ticket;
                entry.state = EntryState::Queued;
                let urgent = entry.urgent;
                self.enqueue(slot, ticket, urgent, false);
            }
        } else {
            let blocked = self.in_flight.contains(&slot);
            let state = if blocked {
                EntryState::Blocked
            } else {
                EntryState::Queued
            };
            self.entries.insert(
                slot.clone(),
                Entry {
                    request,
                    attempts: 0,
                    ticket,
                    urgent,
                    state,
                },
            );
            if !blocked {
                self.enqueue(slot, ticket, urgent, false);
            }
        }

        self.pump(ctx);
    }

    /// Returns the next queued slot whose ticket is current; stale positions are dropped.
    fn pop_next(&mut self) -> Option<(Slot, u64)> {
        loop {
            let (slot, ticket) = self
                .urgent
                .pop_front()
                .or_else(|| self.normal.pop_front())?;
            let current = self
                .entries
                .get(&slot)
                .is_some_and(|entry| entry.ticket == ticket && entry.state == EntryState::Queued);
            if current {
                return Some((slot, ticket));
            }
        }
    }

    /// Starts as many queued writes as the bound and the rate limit allow.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight.len() < self.config.max_in_flight {
            let Some((slot, ticket)) = self.pop_next() else {
                break;
            };

            if let Err(not_until) = self.limiter.check() {
                let urgent = self.entries.get(&slot).is_some_and(|entry| entry.urgent);
                self.enqueue(slot, ticket, urgent, true);
                if !self.wake_scheduled {
                    self.wake_scheduled = true;
                    let wait = not_until.wait_time_from(TokioClock.now());
                    ctx.run_later(wait, |writer, ctx| {
                        writer.wake_scheduled = false;
                        writer.pump(ctx);
                    });
                }
                break;
            }

            self.dispatch(slot, ctx);
        }

        self.update_gauges();
        self.finish_drain_if_idle(ctx);
    }

    fn dispatch(&mut self, slot: Slot, ctx: &mut Context<Self>) {
        let Some(entry) = self.entries.remove(&slot) else {
            return;
        };
        self.in_flight.insert(slot.clone());

        let call = self
            .writer
            .apply(entry.request.key.clone(), entry.request.write.clone());
        let timeout = self.config.write_timeout;
        let future =
            wrap_future::<_, Self>(async move { tokio::time::timeout(timeout, call).await });
        ctx.spawn(future.map(move |result, writer, ctx| {
            let result = result.unwrap_or_else(|_| {
                Err(WriteError {
                    message: format!(
                        "{} timed out after {} s",
                        entry.request.write.kind().as_str(),
                        timeout.as_secs()
                    ),
                    kind: WriteErrorKind::Throttled(None),
                })
            });
            writer.finish(slot, entry, result, ctx);
        }));
    }

    fn finish(
        &mut self,
        slot: Slot,
        entry: Entry,
        result: Result<(), WriteError>,
        ctx: &mut Context<Self>,
    ) {
        self.in_flight.remove(&slot);
        let superseded = self.entries.contains_key(&slot);

        match result {
            Ok(()) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                self.report(entry.request, None);
            }
            Err(error) if superseded => {
                // A newer write for the same object is waiting: it replaces this one.
                debug!(write = entry.request.write.kind().as_str(), error = %error.message, "failed write superseded by a newer one");
                self.report(entry.request, Some(error));
            }
            Err(error) => self.retry_or_fail(slot.clone(), entry, error, ctx),
        }

        if let Some(waiting) = self.entries.get_mut(&slot)
            && waiting.state == EntryState::Blocked
        {
            waiting.state = EntryState::Queued;
            let (ticket, urgent) = (waiting.ticket, waiting.urgent);
            self.enqueue(slot, ticket, urgent, true);
        }

        self.pump(ctx);
    }

    fn retry_or_fail(
        &mut self,
        slot: Slot,
        mut entry: Entry,
        error: WriteError,
        ctx: &mut Context<Self>,
    ) {
        entry.attempts += 1;
        let conflict_retry = error.kind == WriteErrorKind::Conflict
            && entry.attempts <= self.config.conflict_retries;
        let throttled_retry = matches!(error.kind, WriteErrorKind::Throttled(_))
            && entry.attempts < self.config.max_attempts;

        if conflict_retry {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            debug!(
                write = entry.request.write.kind().as_str(),
                attempt = entry.attempts,
                "conflict, retrying at once"
            );
            entry.ticket = self.ticket();
            entry.state = EntryState::Queued;
            let (ticket, urgent) = (entry.ticket, entry.urgent);
            self.entries.insert(slot.clone(), entry);
            self.enqueue(slot, ticket, urgent, true);
            return;
        }

        if throttled_retry {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            let retry_after = match error.kind {
                WriteErrorKind::Throttled(delay) => delay,
                _ => None,
            };
            let delay =
                self.config
                    .backoff
                    .delay(entry.attempts, rand::random::<f64>(), retry_after);
            debug!(
                write = entry.request.write.kind().as_str(),
                attempt = entry.attempts,
                ?delay,
                "throttled, retrying later"
            );

            entry.ticket = self.ticket();
            entry.state = EntryState::Delayed;
            let ticket = entry.ticket;
            self.entries.insert(slot.clone(), entry);
            ctx.run_later(delay, move |writer, ctx| writer.release(&slot, ticket, ctx));
            return;
        }

        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        warn!(
            namespace = %entry.request.key.namespace,
            name = %entry.request.key.name,
            write = entry.request.write.kind().as_str(),
            attempts = entry.attempts,
            error = %error.message,
            "write failed, reporting to the binding"
        );
        self.report(entry.request, Some(error));
    }

    /// Puts a delayed entry back into its queue, unless a newer write replaced it meanwhile.
    fn release(&mut self, slot: &Slot, ticket: u64, ctx: &mut Context<Self>) {
        let Some(entry) = self.entries.get_mut(slot) else {
            return;
        };
        if entry.ticket != ticket || entry.state != EntryState::Delayed {
            return;
        }
        if self.in_flight.contains(slot) {
            entry.state = EntryState::Blocked;
            return;
        }

        entry.state = EntryState::Queued;
        let urgent = entry.urgent;
        self.enqueue(slot.clone(), ticket, urgent, false);
        self.pump(ctx);
    }

    fn report(&self, request: WriteRequest, error: Option<WriteError>) {
        let event = match error {
            None => BindingEvent::WriteDone(request.write),
            Some(error) => BindingEvent::WriteFailed {
                write: request.write,
                error,
            },
        };
        self.reply.do_send(Deliver {
            key: request.key,
            event,
        });
    }

    fn update_gauges(&self) {
        self.stats
            .queued
            .store(self.entries.len(), Ordering::Relaxed);
        self.stats
            .in_flight
            .store(self.in_flight.len(), Ordering::Relaxed);
    }

    fn report_drain(&self, dropped: usize) -> DrainReport {
        DrainReport {
            applied: self.stats.applied.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            dropped,
        }
    }

    fn finish_drain_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.accepting || !self.entries.is_empty() || !self.in_flight.is_empty() {
            return;
        }
        let report = self.report_drain(0);
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(report);
        }
        info!(
            applied = report.applied,
            failed = report.failed,
            "writer drained and stopped"
        );
        ctx.stop();
    }

    fn abandon(&mut self, ctx: &mut Context<Self>) {
        let dropped = self.entries.len() + self.in_flight.len();
        if dropped > 0 {
            warn!(
                dropped,
                "writer stopped before its queue drained; dropped the remaining writes"
            );
        }
        self.entries.clear();
        self.urgent.clear();
        self.normal.clear();

        let report = self.report_drain(dropped);
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(report);
        }
        ctx.stop();
    }
}

impl Actor for WriterActor {
    type Context = Context<Self>;
}

impl Handler<SubmitWrite> for WriterActor {
    type Result = ();

    fn handle(&mut self, message: SubmitWrite, ctx: &mut Self::Context) {
        self.submit(message.0, ctx);
    }
}

impl Handler<Drain> for WriterActor {
    type Result = ResponseFuture<DrainReport>;

    fn handle(&mut self, _message: Drain, ctx: &mut Self::Context) -> Self::Result {
        let (sender, receiver) = oneshot::channel();
        self.drain_waiters.push(sender);

        if self.accepting {
            self.accepting = false;
            info!(
                queued = self.entries.len(),
                in_flight = self.in_flight.len(),
                "writer stopped accepting writes, draining"
            );
            ctx.run_later(self.config.drain_timeout, WriterActor::abandon);
        }
        self.finish_drain_if_idle(ctx);

        Box::pin(async move { receiver.await.unwrap_or_default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_config_validation() {
        assert!(WriterConfig::default().validate().is_ok());
        let cases = [
            (
                WriterConfig {
                    qps: 0,
                    ..WriterConfig::default()
                },
                "writer.qps",
            ),
            (
                WriterConfig {
                    burst: 0,
                    ..WriterConfig::default()
                },
                "writer.burst",
            ),
            (
                WriterConfig {
                    max_in_flight: 0,
                    ..WriterConfig::default()
                },
                "writer.max_in_flight",
            ),
            (
                WriterConfig {
                    max_attempts: 0,
                    ..WriterConfig::default()
                },
                "writer.max_attempts",
            ),
            (
                WriterConfig {
                    write_timeout: Duration::ZERO,
                    ..WriterConfig::default()
                },
                "writer.write_timeout",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }
}
