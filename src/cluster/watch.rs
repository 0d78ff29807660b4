//! The watch side of the Kubernetes adapter: API watch events in, binding events out.
//!
//! Three watches feed the actor system:
//! - AcrPullBindings, optionally narrowed by a label selector;
//! - Secrets carrying the binding label, so only this controller's own Secrets are streamed;
//! - ServiceAccounts, filtered against the ServiceAccounts that bindings target. Nothing is
//!   cached per ServiceAccount, so memory grows with the number of bindings, not with the
//!   number of ServiceAccounts in the cluster.
//!
//! A watch restart relists; objects that disappeared while the watch was down get a
//! synthesized delete, because the relist itself does not report them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dashmap::DashMap;
use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use acrpull_actors::event::{
    BindingEvent, ObservedBinding, ObservedServiceAccount, ObservedStatus,
};
use acrpull_actors::model::BindingKey;
use acrpull_actors::spec::{Defaults, RegistryPolicy, resolve_v1beta1};
use acrpull_actors::write::ReadyCondition;

use super::names::{BINDING_LABEL, FINALIZER};
use super::secret;
use super::writer::BindingDirectory;
use crate::crd::v1beta1::{AcrPullBinding, AcrPullBindingStatus};

/// Destination of binding events, implemented by the actor system.
pub trait EventSink: Clone + Send + 'static {
    /// Delivers one event to the binding `key`.
    fn deliver(&self, key: BindingKey, event: BindingEvent);
}

/// Settings of the watches.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Label selector narrowing which AcrPullBindings this controller serves.
    pub binding_selector: Option<String>,
    /// Defaults applied to empty spec fields.
    pub defaults: Defaults,
    /// Registries a binding may name.
    pub policy: RegistryPolicy,
    /// Page size of the initial lists, bounding the memory a relist needs.
    pub page_size: u32,
}

/// Index of the bindings the watches have seen. Each map has one entry per
/// binding, never one per Secret or ServiceAccount in the cluster.
#[derive(Default)]
struct Index {
    /// Registry host per binding, to check a Secret's content against.
    servers: DashMap<BindingKey, String>,
    /// Bindings per targeted ServiceAccount `(namespace, name)`.
    targets: DashMap<(String, String), HashSet<String>>,
    /// Targeted ServiceAccount and Secret name per binding, to keep `targets` current.
    bindings: DashMap<BindingKey, (String, String)>,
}

/// Runs the three watches until the process stops.
///
/// The Secret watch completes its first list before the binding watch starts, so that after
/// a restart every binding actor receives its existing Secret before its spec and can decide that
/// no new token is needed.
pub async fn run<S: EventSink>(
    client: Client,
    config: WatchConfig,
    directory: BindingDirectory,
    sink: S,
    ready: watch::Sender<bool>,
) {
    let index = Arc::new(Index::default());

    let (secrets_synced_tx, mut secrets_synced) = watch::channel(false);
    let secrets = watch_secrets(
        client.clone(),
        config.page_size,
        index.clone(),
        sink.clone(),
        secrets_synced_tx,
    );
    let accounts = watch_service_accounts(
        client.clone(),
        config.page_size,
        index.clone(),
        sink.clone(),
    );
    let bindings = async {
        let _ = secrets_synced.wait_for(|synced| *synced).await;
        info!("initial Secret list complete, starting the AcrPullBinding watch");
        watch_bindings(
            client.clone(),
            &config,
            index.clone(),
            directory,
            sink.clone(),
            ready,
        )
        .await;
    };

    tokio::join!(secrets, accounts, bindings);
}

async fn watch_bindings<S: EventSink>(
    client: Client,
    config: &WatchConfig,
    index: Arc<Index>,
    directory: BindingDirectory,
    sink: S,
    ready: watch::Sender<bool>,
) {
    let api: Api<AcrPullBinding> = Api::all(client);
    let mut watch_config = watcher::Config::default().page_size(config.page_size);
    if let Some(selector) = &config.binding_selector {
        watch_config = watch_config.labels(selector);
    }

    let mut relist: Relist<()> = Relist::default();
    let mut stream = std::pin::pin!(events(watcher(api, watch_config), "AcrPullBinding"));
    while let Some(event) = stream.next().await {
        match event {
            Event::Init => relist.start(),
            Event::InitApply(binding) | Event::Apply(binding) => {
                let key = key_of(&binding);
                relist.seen(&key, ());
                observe_binding(&binding, &key, config, &index, &directory, &sink);
            }
            Event::InitDone => {
                for (key, ()) in relist.finish() {
                    forget_binding(&key, &index, &directory, &sink);
                }
                let _ = ready.send(true);
            }
            Event::Delete(binding) => {
                let key = key_of(&binding);
                relist.forget(&key);
                forget_binding(&key, &index, &directory, &sink);
            }
        }
    }
}

fn observe_binding<S: EventSink>(
    binding: &AcrPullBinding,
    key: &BindingKey,
    config: &WatchConfig,
    index: &Index,
    directory: &BindingDirectory,
    sink: &S,
) {
    if let Some(uid) = binding.uid() {
        directory.insert(key.clone(), uid);
    }

    let spec = resolve_v1beta1(
        &key.name,
        &binding.spec.to_raw(),
        &config.defaults,
        &config.policy,
    );
    if let Ok(desired) = &spec {
        index
            .servers
            .insert(key.clone(), desired.acr_server.clone());
        retarget(index, key, &desired.service_account, &desired.secret_name);
    }

    let observed = ObservedBinding {
        generation: binding.metadata.generation.unwrap_or_default(),
        spec,
        has_finalizer: binding.finalizers().iter().any(|f| f == FINALIZER),
        status: observed_status(binding.status.as_ref()),
    };
    sink.deliver(key.clone(), BindingEvent::SpecObserved(observed));

    if binding.metadata.deletion_timestamp.is_some() {
        sink.deliver(key.clone(), BindingEvent::DeletionRequested);
    }
}

fn forget_binding<S: EventSink>(
    key: &BindingKey,
    index: &Index,
    directory: &BindingDirectory,
    sink: &S,
) {
    directory.remove(key);
    index.servers.remove(key);
    if let Some((_, (account, _))) = index.bindings.remove(key) {
        untarget(index, key, &account);
    }
    sink.deliver(key.clone(), BindingEvent::BindingRemoved);
}

/// Points the ServiceAccount index at the binding's current target.
fn retarget(index: &Index, key: &BindingKey, account: &str, secret_name: &str) {
    let previous = index
        .bindings
        .insert(key.clone(), (account.to_owned(), secret_name.to_owned()));
    if let Some((old_account, _)) = previous
        && old_account != account
    {
        untarget(index, key, &old_account);
    }
    index
        .targets
        .entry((key.namespace.clone(), account.to_owned()))
        .or_default()
        .insert(key.name.clone());
}

fn untarget(index: &Index, key: &BindingKey, account: &str) {
    let target = (key.namespace.clone(), account.to_owned());
    if let Some(mut names) = index.targets.get_mut(&target) {
        names.remove(&key.name);
    }
    index
        .targets
        .remove_if(&target, |_, names| names.is_empty());
}

fn observed_status(status: Option<&AcrPullBindingStatus>) -> ObservedStatus {
    let Some(status) = status else {
        return ObservedStatus::default();
    };
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| ReadyCondition {
            ready: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
            observed_generation: c.observed_generation.unwrap_or_default(),
        });
    ObservedStatus {
        last_token_refresh: status.last_token_refresh_time.as_ref().map(|t| t.0),
        token_expiration: status.token_expiration_time.as_ref().map(|t| t.0),
        error: status.error.clone(),
        ready,
    }
}

async fn watch_secrets<S: EventSink>(
    client: Client,
    page_size: u32,
    index: Arc<Index>,
    sink: S,
    synced: watch::Sender<bool>,
) {
    let api: Api<Secret> = Api::all(client);
    let config = watcher::Config::default()
        .labels(BINDING_LABEL)
        .page_size(page_size);

    // Keyed by the Secret; the value is the binding that controls it.
    let mut relist: Relist<BindingKey> = Relist::default();
    let mut stream = std::pin::pin!(events(watcher(api, config), "Secret"));
    while let Some(event) = stream.next().await {
        match event {
            Event::Init => relist.start(),
            Event::InitApply(secret) | Event::Apply(secret) => {
                let Some(binding) = owner_key(&secret) else {
                    continue;
                };
                relist.seen(&object_key(&secret), binding.clone());
                let server = index.servers.get(&binding).map(|s| s.clone());
                let observed = secret::observe(&secret, None, server.as_deref(), Timestamp::now());
                sink.deliver(binding, BindingEvent::SecretObserved(observed));
            }
            Event::InitDone => {
                for (secret, binding) in relist.finish() {
                    sink.deliver(binding, BindingEvent::SecretGone { name: secret.name });
                }
                let _ = synced.send(true);
            }
            Event::Delete(secret) => {
                if let Some(binding) = owner_key(&secret) {
                    relist.forget(&object_key(&secret));
                    sink.deliver(
                        binding,
                        BindingEvent::SecretGone {
                            name: secret.name_any(),
                        },
                    );
                }
            }
        }
    }
}

/// Returns the `namespace/name` of any namespaced object.
fn object_key<K: kube::Resource>(object: &K) -> BindingKey {
    BindingKey::new(object.namespace().unwrap_or_default(), object.name_any())
}

/// Returns the binding that controls a Secret, from its controller ownerReference.
fn owner_key(secret: &Secret) -> Option<BindingKey> {
    let namespace = secret.namespace()?;
    secret
        .owner_references()
        .iter()
        .find(|owner| owner.kind == "AcrPullBinding" && owner.controller == Some(true))
        .map(|owner| BindingKey::new(namespace, owner.name.clone()))
}

async fn watch_service_accounts<S: EventSink>(
    client: Client,
    page_size: u32,
    index: Arc<Index>,
    sink: S,
) {
    let api: Api<ServiceAccount> = Api::all(client);
    let config = watcher::Config::default().page_size(page_size);

    // Only targeted ServiceAccounts are remembered, to synthesize deletes after a relist.
    let mut relist: Relist<()> = Relist::default();
    let mut stream = std::pin::pin!(events(watcher(api, config), "ServiceAccount"));
    while let Some(event) = stream.next().await {
        match event {
            Event::Init => relist.start(),
            Event::InitApply(account) | Event::Apply(account) => {
                let Some(namespace) = account.namespace() else {
                    continue;
                };
                let target = (namespace, account.name_any());
                let Some(names) = index.targets.get(&target).map(|names| names.clone()) else {
                    continue;
                };
                relist.seen(&BindingKey::new(target.0.clone(), target.1.clone()), ());
                for name in names {
                    let key = BindingKey::new(target.0.clone(), name);
                    let secret_name = index
                        .bindings
                        .get(&key)
                        .map(|entry| entry.1.clone())
                        .unwrap_or_default();
                    let references_secret = account
                        .image_pull_secrets
                        .iter()
                        .flatten()
                        .any(|entry| entry.name == secret_name);
                    let observed = ObservedServiceAccount {
                        name: target.1.clone(),
                        references_secret,
                        references_other_owned_secret: false,
                    };
                    sink.deliver(key, BindingEvent::ServiceAccountObserved(observed));
                }
            }
            Event::InitDone => {
                for (gone, ()) in relist.finish() {
                    deliver_account_gone(&index, &sink, &gone.namespace, &gone.name);
                }
            }
            Event::Delete(account) => {
                let Some(namespace) = account.namespace() else {
                    continue;
                };
                let name = account.name_any();
                relist.forget(&BindingKey::new(namespace.clone(), name.clone()));
                deliver_account_gone(&index, &sink, &namespace, &name);
            }
        }
    }
}

fn deliver_account_gone<S: EventSink>(index: &Index, sink: &S, namespace: &str, name: &str) {
    let target = (namespace.to_owned(), name.to_owned());
    let Some(names) = index.targets.get(&target).map(|names| names.clone()) else {
        return;
    };
    for binding in names {
        sink.deliver(
            BindingKey::new(namespace, binding),
            BindingEvent::ServiceAccountGone {
                name: name.to_owned(),
            },
        );
    }
}

/// Wraps a watcher with kube's default backoff and logs every error it retries.
fn events<K, S>(stream: S, kind: &'static str) -> impl Stream<Item = Event<K>> + Send
where
    K: Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    stream
        .default_backoff()
        .filter_map(move |result| async move {
            match result {
                Ok(event) => Some(event),
                Err(error) => {
                    warn!(kind, %error, "watch failed; retrying with backoff");
                    None
                }
            }
        })
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, config)
}

fn key_of(binding: &AcrPullBinding) -> BindingKey {
    object_key(binding)
}

/// Tracks which objects a relist reported, to find the ones that vanished while the watch was
/// down. Each object key maps to a value the caller needs to report the deletion.
struct Relist<V> {
    /// Objects known before the current relist started.
    known: HashMap<BindingKey, V>,
    /// Objects reported by the relist in progress, or `None` outside a relist.
    listing: Option<HashMap<BindingKey, V>>,
}

impl<V: Clone> Default for Relist<V> {
    fn default() -> Self {
        Self {
            known: HashMap::new(),
            listing: None,
        }
    }
}

impl<V: Clone> Relist<V> {
    fn start(&mut self) {
        self.listing = Some(HashMap::new());
    }

    fn seen(&mut self, key: &BindingKey, value: V) {
        match &mut self.listing {
            Some(listing) => listing.insert(key.clone(), value),
            None => self.known.insert(key.clone(), value),
        };
    }

    fn forget(&mut self, key: &BindingKey) {
        self.known.remove(key);
    }

    /// Ends a relist and returns the objects that it no longer reported.
    fn finish(&mut self) -> Vec<(BindingKey, V)> {
        let listed = self.listing.take().unwrap_or_default();
        let gone: Vec<(BindingKey, V)> = self
            .known
            .iter()
            .filter(|(key, _)| !listed.contains_key(*key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if !gone.is_empty() {
            debug!(
                count = gone.len(),
                "objects vanished while the watch was down"
            );
        }
        self.known = listed;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relist_reports_vanished_keys() {
        let mut relist = Relist::default();
        relist.start();
        relist.seen(&BindingKey::new("a", "1"), 1);
        relist.seen(&BindingKey::new("a", "2"), 2);
        assert!(relist.finish().is_empty());

        relist.start();
        relist.seen(&BindingKey::new("a", "2"), 2);
        assert_eq!(relist.finish(), vec![(BindingKey::new("a", "1"), 1)]);
    }

    #[test]
    fn relist_forgets_deleted_keys() {
        let mut relist = Relist::default();
        relist.start();
        relist.seen(&BindingKey::new("a", "1"), ());
        relist.finish();
        relist.forget(&BindingKey::new("a", "1"));

        relist.start();
        assert!(relist.finish().is_empty());
    }
}
