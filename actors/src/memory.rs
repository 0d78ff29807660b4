//! In-memory ports for tests and benchmarks: a token source with programmable results and a
//! cluster writer that keeps a small model of the objects it writes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::clock::{Clock, later};
use crate::model::{BindingKey, IssuedToken, RegistryToken, TokenError, TokenRequest};
use crate::ports::{ClusterWriter, TokenSource};
use crate::write::{
    ClusterWrite, CoalesceKey, Notice, SecretContent, StatusUpdate, WriteError, WriteErrorKind,
    WriteKind,
};

/// Locks a mutex, ignoring poisoning: a panicking test thread must not hide the state.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`TokenSource`] that mints `memory-token-<n>` tokens valid for a configurable lifetime.
///
/// Clones share their state, so a test keeps one clone to program and inspect it.
#[derive(Clone)]
pub struct MemoryTokenSource {
    clock: Clock,
    inner: Arc<Mutex<TokenSourceState>>,
}

struct TokenSourceState {
    lifetime: Duration,
    latency: Duration,
    scripted_failures: VecDeque<TokenError>,
    calls: u64,
    calls_by_request: HashMap<TokenRequest, u64>,
}

impl MemoryTokenSource {
    /// Creates a source whose tokens live 75 minutes, like ACR access tokens, and which
    /// returns at once. Issue times come from `clock`.
    #[must_use]
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            inner: Arc::new(Mutex::new(TokenSourceState {
                lifetime: Duration::from_mins(75),
                latency: Duration::ZERO,
                scripted_failures: VecDeque::new(),
                calls: 0,
                calls_by_request: HashMap::new(),
            })),
        }
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        lock(&self.inner).lifetime = lifetime;
    }

    /// Sets how long each call waits before it returns.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.inner).latency = latency;
    }

    /// Makes the next `count` calls fail with `error`, whatever they request.
    pub fn fail_next(&self, count: usize, error: &TokenError) {
        let mut inner = lock(&self.inner);
        inner
            .scripted_failures
            .extend(std::iter::repeat_n(error.clone(), count));
    }

    /// Returns the number of calls so far.
    #[must_use]
    pub fn calls(&self) -> u64 {
        lock(&self.inner).calls
    }

    /// Returns the number of calls so far for one request.
    #[must_use]
    pub fn calls_for(&self, request: &TokenRequest) -> u64 {
        lock(&self.inner)
            .calls_by_request
            .get(request)
            .copied()
            .unwrap_or(0)
    }
}

impl TokenSource for MemoryTokenSource {
    fn issue(&self, request: TokenRequest) -> BoxFuture<'static, Result<IssuedToken, TokenError>> {
        let (latency, failure, sequence) = {
            let mut inner = lock(&self.inner);
            inner.calls += 1;
            *inner.calls_by_request.entry(request).or_default() += 1;
            let failure = inner.scripted_failures.pop_front();
            (inner.latency, failure, inner.calls)
        };
        let clock = self.clock;
        let inner = Arc::clone(&self.inner);

        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            if let Some(error) = failure {
                return Err(error);
            }

            let lifetime = lock(&inner).lifetime;
            let issued_at = clock.now();
            Ok(IssuedToken {
                token: RegistryToken::new(format!("memory-token-{sequence}")),
                issued_at,
                expires_at: later(issued_at, lifetime),
            })
        })
    }
}

/// The objects of the in-memory cluster, and the calls made to it.
#[derive(Clone, Debug, Default)]
pub struct MemoryCluster {
    /// Secrets by `(namespace, name)`.
    pub secrets: BTreeMap<(String, String), SecretContent>,
    /// ServiceAccounts by `(namespace, name)`, with their `imagePullSecrets` names in order.
    pub service_accounts: BTreeMap<(String, String), Vec<String>>,
    /// Bindings that carry our finalizer.
    pub finalizers: BTreeSet<BindingKey>,
    /// The last status written per binding.
    pub statuses: BTreeMap<BindingKey, StatusUpdate>,
    /// Every Event recorded, in order.
    pub events: Vec<(BindingKey, Notice)>,
    /// Every write that succeeded, in order, including those that changed nothing.
    pub applied: Vec<(BindingKey, ClusterWrite)>,
    /// Calls that changed an object; a reference that was already present changes nothing.
    pub mutations: u64,
    /// All calls, including failed ones.
    pub calls: u64,
    /// The highest number of calls that ran at the same time.
    pub max_concurrent_calls: usize,
    /// Calls that started while another call for the same object was running.
    pub overlapping_calls: u64,
}

impl MemoryCluster {
    /// Returns the number of successful writes of `kind`.
    #[must_use]
    pub fn count(&self, kind: WriteKind) -> usize {
        self.applied
            .iter()
            .filter(|(_, write)| write.kind() == kind)
            .count()
    }

    /// Returns the Secret of a binding, by namespace and Secret name.
    #[must_use]
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&SecretContent> {
        self.secrets.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Returns the `imagePullSecrets` of a ServiceAccount, if it exists.
    #[must_use]
    pub fn pull_secrets(&self, namespace: &str, service_account: &str) -> Option<&Vec<String>> {
        self.service_accounts
            .get(&(namespace.to_owned(), service_account.to_owned()))
    }
}

struct FailureRule {
    kind: WriteKind,
    remaining: usize,
    error: WriteError,
}

struct WriterState {
    cluster: MemoryCluster,
    failures: Vec<FailureRule>,
    latency: Duration,
    running: usize,
    running_objects: HashMap<(BindingKey, CoalesceKey), usize>,
}

/// A [`ClusterWriter`] over a [`MemoryCluster`], with programmable failures and latency.
///
/// ServiceAccounts exist only once added with [`Self::add_service_account`], so that tests
/// can exercise the missing-ServiceAccount paths. Clones share their state.
#[derive(Clone)]
pub struct MemoryClusterWriter {
    inner: Arc<Mutex<WriterState>>,
}

impl Default for MemoryClusterWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryClusterWriter {
    /// Creates an empty cluster whose calls return at once.
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(WriterState {
                cluster: MemoryCluster::default(),
                failures: Vec::new(),
                latency: Duration::ZERO,
                running: 0,
                running_objects: HashMap::new(),
            })),
        }
    }

    /// Creates a ServiceAccount with no `imagePullSecrets`, or keeps an existing one.
    pub fn add_service_account(&self, namespace: &str, name: &str) {
        lock(&self.inner)
            .cluster
            .service_accounts
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default();
    }

    /// Creates a ServiceAccount that already lists `pull_secrets`, or replaces its list.
    pub fn set_service_account(&self, namespace: &str, name: &str, pull_secrets: &[&str]) {
        lock(&self.inner).cluster.service_accounts.insert(
            (namespace.to_owned(), name.to_owned()),
            pull_secrets
                .iter()
                .map(|secret| (*secret).to_owned())
                .collect(),
        );
    }

    /// Deletes a ServiceAccount.
    pub fn remove_service_account(&self, namespace: &str, name: &str) {
        lock(&self.inner)
            .cluster
            .service_accounts
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Makes the next `count` writes of `kind` fail with `error`.
    pub fn fail_next(&self, kind: WriteKind, count: usize, error: WriteError) {
        lock(&self.inner).failures.push(FailureRule {
            kind,
            remaining: count,
            error,
        });
    }

    /// Sets how long each call waits before it applies.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.inner).latency = latency;
    }

    /// Returns a copy of the cluster.
    #[must_use]
    pub fn snapshot(&self) -> MemoryCluster {
        lock(&self.inner).cluster.clone()
    }

    /// Polls every millisecond until `predicate` holds, for at most `timeout`; returns whether
    /// it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        predicate: impl Fn(&MemoryCluster) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if predicate(&lock(&self.inner).cluster) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn start_call(&self, key: &BindingKey, write: &ClusterWrite) -> (Duration, Option<WriteError>) {
        let mut inner = lock(&self.inner);
        inner.cluster.calls += 1;
        inner.running += 1;
        inner.cluster.max_concurrent_calls = inner.cluster.max_concurrent_calls.max(inner.running);

        let object = (key.clone(), write.coalesce_key(0));
        let running_for_object = inner.running_objects.entry(object).or_default();
        *running_for_object += 1;
        if *running_for_object > 1 {
            inner.cluster.overlapping_calls += 1;
        }

        let kind = write.kind();
        let failure = inner
            .failures
            .iter_mut()
            .find(|rule| rule.kind == kind && rule.remaining > 0)
            .map(|rule| {
                rule.remaining -= 1;
                rule.error.clone()
            });
        (inner.latency, failure)
    }

    fn finish_call(
        &self,
        key: &BindingKey,
        write: &ClusterWrite,
        failure: Option<WriteError>,
    ) -> Result<(), WriteError> {
        let mut inner = lock(&self.inner);
        inner.running -= 1;
        let object = (key.clone(), write.coalesce_key(0));
        if let Some(running) = inner.running_objects.get_mut(&object) {
            *running -= 1;
            if *running == 0 {
                inner.running_objects.remove(&object);
            }
        }

        if let Some(error) = failure {
            return Err(error);
        }
        let changed = apply_write(&mut inner.cluster, key, write)?;
        if changed {
            inner.cluster.mutations += 1;
        }
        inner.cluster.applied.push((key.clone(), write.clone()));
        Ok(())
    }
}

/// Applies one write to the model; returns whether anything changed.
fn apply_write(
    cluster: &mut MemoryCluster,
    key: &BindingKey,
    write: &ClusterWrite,
) -> Result<bool, WriteError> {
    let namespaced = |name: &str| (key.namespace.clone(), name.to_owned());
    let changed = match write {
        ClusterWrite::AddFinalizer => cluster.finalizers.insert(key.clone()),
        ClusterWrite::RemoveFinalizer => cluster.finalizers.remove(key),
        ClusterWrite::ApplySecret(content) => {
            let previous = cluster
                .secrets
                .insert(namespaced(&content.name), content.clone());
            previous.as_ref() != Some(content)
        }
        ClusterWrite::DeleteSecret { name } => cluster.secrets.remove(&namespaced(name)).is_some(),
        ClusterWrite::AddPullSecretReference {
            service_account,
            secret_name,
        } => {
            let Some(pull_secrets) = cluster
                .service_accounts
                .get_mut(&namespaced(service_account))
            else {
                return Err(WriteError {
                    message: format!(
                        "ServiceAccount {service_account} not found in namespace {}",
                        key.namespace
                    ),
                    kind: WriteErrorKind::NotFound,
                });
            };
            if pull_secrets.contains(secret_name) {
                false
            } else {
                pull_secrets.push(secret_name.clone());
                true
            }
        }
        ClusterWrite::RemovePullSecretReference {
            service_account,
            secret_name,
        } => match cluster
            .service_accounts
            .get_mut(&namespaced(service_account))
        {
            Some(pull_secrets) => {
                let before = pull_secrets.len();
                pull_secrets.retain(|name| name != secret_name);
                pull_secrets.len() != before
            }
            None => false,
        },
        ClusterWrite::UpdateStatus(update) => {
            let previous = cluster.statuses.insert(key.clone(), update.clone());
            previous.as_ref() != Some(update)
        }
        ClusterWrite::PublishEvent(notice) => {
            cluster.events.push((key.clone(), notice.clone()));
            true
        }
    };
    Ok(changed)
}

impl ClusterWriter for MemoryClusterWriter {
    fn apply(
        &self,
        key: BindingKey,
        write: ClusterWrite,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        let (latency, failure) = self.start_call(&key, &write);
        let this = self.clone();

        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            this.finish_call(&key, &write, failure)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Identity;

    fn request() -> TokenRequest {
        TokenRequest {
            acr_server: "example.azurecr.io".into(),
            identity: Identity::ClientId("x".into()),
            scope: None,
        }
    }

    #[tokio::test]
    async fn token_source_scripts_failures_then_issues() {
        let source = MemoryTokenSource::new(Clock::System);
        source.fail_next(
            1,
            &TokenError {
                message: "IMDS returned 500".into(),
                retryable: true,
                retry_after: None,
            },
        );

        let first = source.issue(request()).await;
        let second = source.issue(request()).await.unwrap();

        assert_eq!(first.unwrap_err().message, "IMDS returned 500");
        assert_eq!(second.token.expose(), "memory-token-2");
        assert_eq!(
            second.expires_at.duration_since(second.issued_at).as_secs(),
            75 * 60
        );
        assert_eq!(source.calls(), 2);
        assert_eq!(source.calls_for(&request()), 2);
    }

    #[tokio::test]
    async fn cluster_keeps_unmanaged_references_in_order() {
        let writer = MemoryClusterWriter::new();
        writer.set_service_account("ns", "default", &["first", "second"]);
        let key = BindingKey::new("ns", "app");
        let reference = |add: bool| {
            if add {
                ClusterWrite::AddPullSecretReference {
                    service_account: "default".into(),
                    secret_name: "ours".into(),
                }
            } else {
                ClusterWrite::RemovePullSecretReference {
                    service_account: "default".into(),
                    secret_name: "ours".into(),
                }
            }
        };

        writer.apply(key.clone(), reference(true)).await.unwrap();
        writer.apply(key.clone(), reference(true)).await.unwrap();
        assert_eq!(
            writer.snapshot().pull_secrets("ns", "default").unwrap(),
            &vec!["first".to_owned(), "second".to_owned(), "ours".to_owned()]
        );
        assert_eq!(writer.snapshot().mutations, 1);

        writer.apply(key, reference(false)).await.unwrap();
        assert_eq!(
            writer.snapshot().pull_secrets("ns", "default").unwrap(),
            &vec!["first".to_owned(), "second".to_owned()]
        );
    }

    #[tokio::test]
    async fn cluster_reports_missing_service_account() {
        let writer = MemoryClusterWriter::new();
        let result = writer
            .apply(
                BindingKey::new("ns", "app"),
                ClusterWrite::AddPullSecretReference {
                    service_account: "ghost".into(),
                    secret_name: "ours".into(),
                },
            )
            .await;

        assert_eq!(result.unwrap_err().kind, WriteErrorKind::NotFound);
    }

    #[tokio::test]
    async fn cluster_fails_scripted_writes() {
        let writer = MemoryClusterWriter::new();
        writer.fail_next(
            WriteKind::AddFinalizer,
            1,
            WriteError {
                message: "conflict".into(),
                kind: WriteErrorKind::Conflict,
            },
        );
        let key = BindingKey::new("ns", "app");

        assert!(
            writer
                .apply(key.clone(), ClusterWrite::AddFinalizer)
                .await
                .is_err()
        );
        assert!(
            writer
                .apply(key.clone(), ClusterWrite::AddFinalizer)
                .await
                .is_ok()
        );
        assert!(writer.snapshot().finalizers.contains(&key));
        assert_eq!(writer.snapshot().calls, 2);
    }
}
