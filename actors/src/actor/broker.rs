//! The token broker: one token source call per distinct request, shared by every binding that
//! needs it, and a cache of tokens that are still fresh.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::fut::{ActorFutureExt, wrap_future};
use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, Recipient};
use tracing::{debug, warn};

use crate::actor::Deliver;
use crate::backoff::BackoffPolicy;
use crate::clock::{Clock, earlier, later};
use crate::config::ConfigError;
use crate::event::BindingEvent;
use crate::model::{BindingKey, InputsHash, IssuedToken, TokenError, TokenRequest};
use crate::ports::TokenSource;
use crate::refresh::RefreshPolicy;

/// Window during which a failed request's error is shared instead of calling again: the
/// lower bound of the bindings' own backoff (0.5 s, then doubling, at most 2.5 min).
const FAILURE_BACKOFF: BackoffPolicy = BackoffPolicy {
    base: Duration::from_secs(1),
    factor: 2.0,
    max: Duration::from_mins(5),
};

/// Limits of the token broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Token source calls that may run at the same time. Default 16.
    pub max_concurrent: usize,
    /// Time after which a token source call counts as failed. Default 120 seconds, above the
    /// roughly 72 seconds that the Azure IMDS credential may spend on its own retries.
    pub request_timeout: Duration,
    /// How often tokens that are no longer fresh are dropped from the cache. Default 60 s.
    pub cache_sweep_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            request_timeout: Duration::from_mins(2),
            cache_sweep_interval: Duration::from_mins(1),
        }
    }
}

impl BrokerConfig {
    /// Checks that every limit is above zero.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(ConfigError {
                field: "broker.max_concurrent",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        for (field, value) in [
            ("broker.request_timeout", self.request_timeout),
            ("broker.cache_sweep_interval", self.cache_sweep_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError {
                    field,
                    value: format!("{value:?}"),
                    expected: "greater than zero",
                });
            }
        }
        Ok(())
    }
}

/// Counters of the broker, readable without a message.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Requests received from bindings.
    pub requests: AtomicU64,
    /// Requests served from the cache.
    pub cache_hits: AtomicU64,
    /// Requests that joined a call already in flight for the same inputs.
    pub joined: AtomicU64,
    /// Calls to the token source.
    pub source_calls: AtomicU64,
    /// Calls that failed or timed out.
    pub source_failures: AtomicU64,
}

/// A binding's request for a token. The broker replies with `TokenIssued` or `TokenFailed`
/// through the registry.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct IssueToken {
    /// The binding to reply to.
    pub key: BindingKey,
    /// Echoed back in the reply.
    pub inputs_hash: InputsHash,
    /// The registry, identity and scope of the token.
    pub request: TokenRequest,
}

/// Stops the broker. Calls in flight are abandoned, and their waiters get no reply.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct StopBroker;

/// A failed call whose result is shared until `until`.
struct RecentFailure {
    /// The error every request gets until `until`.
    error: TokenError,
    /// Consecutive failures of this request; each one doubles the window.
    count: u32,
    /// End of the window.
    until: jiff::Timestamp,
}

struct Waiter {
    key: BindingKey,
    inputs_hash: InputsHash,
}

/// Shares token source calls and caches their results.
///
/// Bindings with the same registry, identity and scope send equal [`TokenRequest`]s: while a
/// call for one is in flight, later requests wait for it, and afterwards they get the cached
/// token for as long as [`RefreshPolicy::is_fresh`] holds. Every waiter gets the result,
/// and a failure is returned to later requests until its backoff window has passed.
pub struct TokenBroker {
    source: Arc<dyn TokenSource>,
    refresh: RefreshPolicy,
    clock: Clock,
    config: BrokerConfig,
    reply: Recipient<Deliver>,
    cache: HashMap<TokenRequest, IssuedToken>,
    /// The last failure per request and until when it is returned without a new call, so
    /// that during an outage bindings sharing a request make one call per backoff window
    /// instead of one each.
    failures: HashMap<TokenRequest, RecentFailure>,
    waiters: HashMap<TokenRequest, Vec<Waiter>>,
    queue: VecDeque<TokenRequest>,
    running: usize,
    stats: Arc<BrokerStats>,
}

impl TokenBroker {
    /// Creates a broker over `source` that replies through `reply`.
    #[must_use]
    pub fn new(
        source: Arc<dyn TokenSource>,
        refresh: RefreshPolicy,
        clock: Clock,
        config: BrokerConfig,
        reply: Recipient<Deliver>,
        stats: Arc<BrokerStats>,
    ) -> Self {
        Self {
            source,
            refresh,
            clock,
            config,
            reply,
            cache: HashMap::new(),
            failures: HashMap::new(),
            waiters: HashMap::new(),
            queue: VecDeque::new(),
            running: 0,
            stats,
        }
    }

    fn start_calls(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.config.max_concurrent {
            let Some(request) = self.queue.pop_front() else {
                return;
            };
            self.running += 1;
            self.stats.source_calls.fetch_add(1, Ordering::Relaxed);

            let call = self.source.issue(request.clone());
            let timeout = self.config.request_timeout;
            let future =
                wrap_future::<_, Self>(async move { tokio::time::timeout(timeout, call).await });
            ctx.spawn(future.map(move |result, broker, ctx| {
                let result = result.unwrap_or_else(|_| Err(timed_out(&request, timeout)));
                broker.finish_call(&request, &result, ctx);
            }));
        }
    }

    fn finish_call(
        &mut self,
        request: &TokenRequest,
        result: &Result<IssuedToken, TokenError>,
        ctx: &mut Context<Self>,
    ) {
        self.running -= 1;
        let waiters = self.waiters.remove(request).unwrap_or_default();

        match result {
            Ok(token) => {
                debug!(registry = %request.acr_server, identity = %request.identity, waiters = waiters.len(), "token issued");
                if self.refresh.is_fresh(token, self.clock.now()) {
                    self.cache.insert(request.clone(), token.clone());
                }
                self.failures.remove(request);
            }
            Err(error) => {
                self.stats.source_failures.fetch_add(1, Ordering::Relaxed);
                let count = self
                    .failures
                    .get(request)
                    .map_or(0, |failure| failure.count)
                    + 1;
                // The lower bound of the jittered backoff: no binding retries sooner.
                let window = FAILURE_BACKOFF.delay(count, 0.0, error.retry_after);
                self.failures.insert(
                    request.clone(),
                    RecentFailure {
                        error: error.clone(),
                        count,
                        until: later(self.clock.now(), window),
                    },
                );
                warn!(
                    registry = %request.acr_server,
                    identity = %request.identity,
                    waiters = waiters.len(),
                    error = %error.message,
                    "token request failed"
                );
            }
        }

        for waiter in waiters {
            let event = match result {
                Ok(token) => BindingEvent::TokenIssued {
                    inputs_hash: waiter.inputs_hash,
                    token: token.clone(),
                },
                Err(error) => BindingEvent::TokenFailed {
                    inputs_hash: waiter.inputs_hash,
                    error: error.clone(),
                },
            };
            self.reply.do_send(Deliver {
                key: waiter.key,
                event,
            });
        }

        self.start_calls(ctx);
    }

    fn sweep_cache(&mut self) {
        let now = self.clock.now();
        let refresh = self.refresh;
        self.cache.retain(|_, token| refresh.is_fresh(token, now));
        self.failures
            .retain(|_, failure| failure.until > earlier(now, FAILURE_BACKOFF.max));
    }
}

fn timed_out(request: &TokenRequest, timeout: Duration) -> TokenError {
    TokenError {
        message: format!(
            "requesting a token for registry {} with identity {} timed out after {} s",
            request.acr_server,
            request.identity,
            timeout.as_secs()
        ),
        retryable: true,
        retry_after: None,
    }
}

impl Actor for TokenBroker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.config.cache_sweep_interval, |broker, _| {
            broker.sweep_cache();
        });
    }
}

impl Handler<IssueToken> for TokenBroker {
    type Result = ();

    fn handle(&mut self, message: IssueToken, ctx: &mut Self::Context) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);

        let cached = self
            .cache
            .get(&message.request)
            .filter(|token| self.refresh.is_fresh(token, self.clock.now()));
        if let Some(token) = cached {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.reply.do_send(Deliver {
                key: message.key,
                event: BindingEvent::TokenIssued {
                    inputs_hash: message.inputs_hash,
                    token: token.clone(),
                },
            });
            return;
        }

        let now = self.clock.now();
        let recent = self
            .failures
            .get(&message.request)
            .filter(|failure| now < failure.until);
        if let Some(failure) = recent {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.reply.do_send(Deliver {
                key: message.key,
                event: BindingEvent::TokenFailed {
                    inputs_hash: message.inputs_hash,
                    error: failure.error.clone(),
                },
            });
            return;
        }

        let waiter = Waiter {
            key: message.key,
            inputs_hash: message.inputs_hash,
        };
        if let Some(waiting) = self.waiters.get_mut(&message.request) {
            self.stats.joined.fetch_add(1, Ordering::Relaxed);
            waiting.push(waiter);
        } else {
            self.waiters.insert(message.request.clone(), vec![waiter]);
            self.queue.push_back(message.request);
            self.start_calls(ctx);
        }
    }
}

impl Handler<StopBroker> for TokenBroker {
    type Result = ();

    fn handle(&mut self, _message: StopBroker, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_config_validation() {
        assert!(BrokerConfig::default().validate().is_ok());
        let cases = [
            (
                BrokerConfig {
                    max_concurrent: 0,
                    ..BrokerConfig::default()
                },
                "broker.max_concurrent",
            ),
            (
                BrokerConfig {
                    request_timeout: Duration::ZERO,
                    ..BrokerConfig::default()
                },
                "broker.request_timeout",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }
}
