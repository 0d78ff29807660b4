//! The whole actor system over the in-memory ports: first token, refresh, failure and
//! recovery, shared token requests, deletion, restart and shutdown.
//!
//! Tests that wait for refreshes or backoff pause tokio's clock, and the actors read time
//! through `Clock::tokio()`, so minutes of token lifetime pass in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use acrpull_actors::actor::system::{ActorSystem, DeliverError, SystemConfig};
use acrpull_actors::clock::Clock;
use acrpull_actors::event::{
    BindingEvent, ObservedBinding, ObservedSecret, ObservedServiceAccount, ObservedStatus,
};
use acrpull_actors::memory::{MemoryCluster, MemoryClusterWriter, MemoryTokenSource};
use acrpull_actors::model::{
    BindingKey, DesiredBinding, Identity, TokenError, v1beta1_secret_name,
};
use acrpull_actors::write::{SecretContent, WriteKind};

const WAIT: Duration = Duration::from_secs(30);

struct Fixture {
    system: ActorSystem,
    source: MemoryTokenSource,
    cluster: MemoryClusterWriter,
}

fn start_with(clock: Clock, cluster: MemoryClusterWriter) -> Fixture {
    let mut config = SystemConfig {
        clock,
        ..SystemConfig::default()
    };
    // The writer's rate limit has tests of its own; here it would only slow things down.
    config.writer.qps = 100_000;
    config.writer.burst = 100_000;
    let source = MemoryTokenSource::new(clock);
    let system =
        ActorSystem::start(config, Arc::new(source.clone()), Arc::new(cluster.clone())).unwrap();
    Fixture {
        system,
        source,
        cluster,
    }
}

fn start(clock: Clock) -> Fixture {
    let cluster = MemoryClusterWriter::new();
    cluster.add_service_account("ns", "default");
    start_with(clock, cluster)
}

fn desired(name: &str, identity: &str) -> DesiredBinding {
    DesiredBinding {
        acr_server: "example.azurecr.io".into(),
        identity: Identity::ClientId(identity.into()),
        scope: Some("repository:app:pull".into()),
        service_account: "default".into(),
        secret_name: v1beta1_secret_name(name),
    }
}

fn spec_event(
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

fn key(name: &str) -> BindingKey {
    BindingKey::new("ns", name)
}

fn ready(cluster: &MemoryCluster, name: &str) -> bool {
    cluster
        .statuses
        .get(&key(name))
        .is_some_and(|status| status.ready.ready)
}

fn secret_of<'a>(cluster: &'a MemoryCluster, name: &str) -> Option<&'a SecretContent> {
    cluster.secret("ns", &v1beta1_secret_name(name))
}

#[actix_rt::test]
async fn binding_gets_secret_and_reference() {
    let fixture = start(Clock::System);

    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), false, ObservedStatus::default()),
    );

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    let cluster = fixture.cluster.snapshot();
    assert!(cluster.finalizers.contains(&key("app")));
    let secret = secret_of(&cluster, "app").expect("secret written");
    assert_eq!(secret.acr_server, "example.azurecr.io");
    assert_eq!(secret.inputs_hash, desired("app", "x").inputs_hash());
    assert_eq!(
        cluster.pull_secrets("ns", "default").unwrap(),
        &vec!["app-msi-acrpull-secret".to_owned()]
    );
    let status = &cluster.statuses[&key("app")];
    assert_eq!(status.ready.reason, "TokenRefreshed");
    assert_eq!(status.error, None);
    assert_eq!(
        status.token_expiration.map(jiff::Timestamp::as_second),
        Some(secret.token.expires_at.as_second())
    );
    assert!(
        cluster
            .events
            .iter()
            .any(|(_, notice)| notice.reason == "TokenRefreshed")
    );
    assert_eq!(fixture.source.calls(), 1);
    assert_eq!(fixture.system.binding_count(), 1);
}

#[actix_rt::test]
async fn short_tokens_are_refreshed() {
    tokio::time::pause();
    let fixture = start(Clock::tokio());
    fixture.source.set_lifetime(Duration::from_secs(20));

    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), true, ObservedStatus::default()),
    );
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    let first = secret_of(&fixture.cluster.snapshot(), "app")
        .unwrap()
        .token
        .clone();

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        fixture.source.calls(),
        1,
        "no refresh before half the lifetime"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| secret_of(cluster, "app")
                .is_some_and(|secret| secret.token != first))
            .await
    );
    assert_eq!(fixture.source.calls(), 2);

    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fixture.source.calls(), 5, "one refresh every 10 s");
    let snapshot = fixture.system.inspect(key("app")).await.unwrap();
    assert!(
        snapshot
            .journal
            .iter()
            .any(|entry| entry.event == "TimerFired")
    );
}

#[actix_rt::test]
async fn failure_backs_off_then_recovers() {
    tokio::time::pause();
    let fixture = start(Clock::tokio());
    fixture.source.fail_next(
        3,
        &TokenError {
            message: "IMDS returned 500".into(),
            retryable: true,
            retry_after: None,
        },
    );
    let started = tokio::time::Instant::now();

    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), true, ObservedStatus::default()),
    );

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| cluster
                .statuses
                .get(&key("app"))
                .is_some_and(|status| status.ready.reason == "TokenRefreshFailed"))
            .await
    );
    let failed = fixture.cluster.snapshot();
    assert!(
        secret_of(&failed, "app").is_none(),
        "no Secret without a token"
    );
    let error = failed.statuses[&key("app")].error.clone().unwrap();
    assert!(error.contains("IMDS returned 500"), "{error}");
    assert!(error.contains("ns/app"), "{error}");

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    assert_eq!(fixture.source.calls(), 4);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(3500),
        "three backoff delays of at least 0.5, 1 and 2 s: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let cluster = fixture.cluster.snapshot();
    assert_eq!(
        cluster.statuses[&key("app")].error,
        None,
        "success clears the error"
    );
    let warnings = cluster
        .events
        .iter()
        .filter(|(_, notice)| notice.warning && notice.reason == "TokenRefreshFailed")
        .count();
    assert_eq!(warnings, 1, "a repeated failure is announced once");
}

#[actix_rt::test]
async fn refresh_failure_keeps_the_secret() {
    tokio::time::pause();
    let fixture = start(Clock::tokio());
    fixture.source.set_lifetime(Duration::from_secs(20));
    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), true, ObservedStatus::default()),
    );
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    let stored = secret_of(&fixture.cluster.snapshot(), "app")
        .unwrap()
        .clone();

    fixture.source.fail_next(
        100,
        &TokenError {
            message: "IMDS returned 500".into(),
            retryable: true,
            retry_after: None,
        },
    );
    tokio::time::sleep(Duration::from_secs(15)).await;

    let cluster = fixture.cluster.snapshot();
    assert_eq!(
        secret_of(&cluster, "app"),
        Some(&stored),
        "the Secret keeps the last good token"
    );
    assert_eq!(cluster.count(WriteKind::DeleteSecret), 0);
    let status = &cluster.statuses[&key("app")];
    assert_eq!(status.ready.reason, "TokenRefreshFailed");
    assert_eq!(
        status.token_expiration.map(jiff::Timestamp::as_second),
        Some(stored.token.expires_at.as_second()),
        "the times describe the kept token"
    );
}

#[actix_rt::test]
async fn bindings_share_one_token_request() {
    let fixture = start(Clock::System);
    fixture.source.set_latency(Duration::from_millis(100));

    for index in 0..100 {
        let name = format!("app-{index}");
        fixture.system.deliver(
            key(&name),
            spec_event(desired(&name, "x"), true, ObservedStatus::default()),
        );
    }

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| cluster.statuses.len() == 100)
            .await
    );
    let cluster = fixture.cluster.snapshot();
    assert!(cluster.statuses.values().all(|status| status.ready.ready));
    assert_eq!(
        fixture.source.calls(),
        1,
        "one exchange for 100 bindings with the same inputs"
    );
    assert_eq!(cluster.pull_secrets("ns", "default").unwrap().len(), 100);
    let stats = fixture.system.stats();
    assert_eq!(stats.token_requests, 100);
    assert_eq!(stats.token_source_calls, 1);
    assert_eq!(stats.bindings, 100);
}

#[actix_rt::test]
async fn different_identities_get_separate_tokens() {
    let fixture = start(Clock::System);

    for (name, identity) in [("a", "x"), ("b", "y"), ("c", "x")] {
        fixture.system.deliver(
            key(name),
            spec_event(desired(name, identity), true, ObservedStatus::default()),
        );
    }

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| cluster.statuses.len() == 3)
            .await
    );
    assert_eq!(fixture.source.calls(), 2);
}

#[actix_rt::test]
async fn deletion_cleans_up_and_removes_finalizer() {
    let cluster = MemoryClusterWriter::new();
    cluster.set_service_account("ns", "default", &["unmanaged-first", "unmanaged-second"]);
    let fixture = start_with(Clock::System, cluster);
    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), false, ObservedStatus::default()),
    );
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );

    fixture
        .system
        .deliver(key("app"), BindingEvent::DeletionRequested);

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| !cluster.finalizers.contains(&key("app")))
            .await
    );
    let cluster = fixture.cluster.snapshot();
    assert!(secret_of(&cluster, "app").is_none());
    assert_eq!(
        cluster.pull_secrets("ns", "default").unwrap(),
        &vec!["unmanaged-first".to_owned(), "unmanaged-second".to_owned()],
        "other entries keep their order"
    );

    fixture
        .system
        .deliver(key("app"), BindingEvent::BindingRemoved);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fixture.system.binding_count(), 0);
}

#[actix_rt::test]
async fn deletion_finishes_without_service_account() {
    let fixture = start_with(Clock::System, MemoryClusterWriter::new());
    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), false, ObservedStatus::default()),
    );
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| cluster
                .statuses
                .get(&key("app"))
                .is_some_and(
                    |status| status.ready.reason == "ServiceAccountNotFound"
                ))
            .await
    );

    fixture
        .system
        .deliver(key("app"), BindingEvent::DeletionRequested);

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| !cluster.finalizers.contains(&key("app")))
            .await
    );
    assert!(secret_of(&fixture.cluster.snapshot(), "app").is_none());
}

#[actix_rt::test]
async fn missing_service_account_is_reported_until_it_appears() {
    let fixture = start_with(Clock::System, MemoryClusterWriter::new());
    fixture.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), true, ObservedStatus::default()),
    );
    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| cluster
                .statuses
                .get(&key("app"))
                .is_some_and(
                    |status| status.ready.reason == "ServiceAccountNotFound"
                ))
            .await
    );
    assert!(
        fixture.cluster.snapshot().service_accounts.is_empty(),
        "never creates a ServiceAccount"
    );

    fixture.cluster.add_service_account("ns", "default");
    fixture.system.deliver(
        key("app"),
        BindingEvent::ServiceAccountObserved(ObservedServiceAccount {
            name: "default".into(),
            references_secret: false,
            references_other_owned_secret: false,
        }),
    );

    assert!(
        fixture
            .cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    assert_eq!(fixture.source.calls(), 1);
}

#[actix_rt::test]
async fn restart_adopts_the_stored_secret() {
    let cluster = MemoryClusterWriter::new();
    cluster.add_service_account("ns", "default");
    let first = start_with(Clock::System, cluster.clone());
    first.system.deliver(
        key("app"),
        spec_event(desired("app", "x"), true, ObservedStatus::default()),
    );
    assert!(
        cluster
            .wait_until(WAIT, |cluster| ready(cluster, "app"))
            .await
    );
    first.system.shutdown().await;

    let before = cluster.snapshot();
    let secret = secret_of(&before, "app").unwrap().clone();
    let status = ObservedStatus::from(&before.statuses[&key("app")]);
    let second = start_with(Clock::System, cluster.clone());

    // The Secret list arrives before the bindings list, so the registry keeps the Secret
    // observation until the binding's actor starts.
    second
        .system
        .deliver_async(
            key("app"),
            BindingEvent::SecretObserved(ObservedSecret {
                name: secret.name.clone(),
                inputs_hash: Some(secret.inputs_hash.clone()),
                refreshed_at: Some(secret.refreshed_at),
                token: Some(secret.token.clone()),
                owned: true,
            }),
        )
        .await
        .unwrap();
    assert_eq!(second.system.stats().pending_secrets, 1);
    second
        .system
        .deliver_async(key("app"), spec_event(desired("app", "x"), true, status))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(second.source.calls(), 0, "no token request after a restart");
    let after = cluster.snapshot();
    assert_eq!(after.calls, before.calls, "no write after a restart");
    let snapshot = second.system.inspect(key("app")).await.unwrap();
    assert!(
        snapshot.state.timer_at.is_some(),
        "the refresh timer is armed"
    );
    assert_eq!(
        snapshot
            .journal
            .iter()
            .map(|entry| entry.event)
            .collect::<Vec<_>>(),
        vec!["SecretObserved", "SpecObserved"]
    );
}

#[actix_rt::test]
async fn events_before_the_binding_are_dropped() {
    let fixture = start(Clock::System);

    fixture
        .system
        .deliver(key("ghost"), BindingEvent::TimerFired);
    fixture
        .system
        .deliver_async(key("ghost"), BindingEvent::SecretGone { name: "x".into() })
        .await
        .unwrap();

    let stats = fixture.system.stats();
    assert_eq!(stats.bindings, 0);
    assert_eq!(stats.events_dropped, 1);
}

#[actix_rt::test]
async fn shutdown_drains_and_rejects_later_events() {
    let fixture = start(Clock::System);
    fixture.cluster.set_latency(Duration::from_millis(20));
    for index in 0..5 {
        let name = format!("app-{index}");
        fixture.system.deliver(
            key(&name),
            spec_event(desired(&name, "x"), true, ObservedStatus::default()),
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let report = fixture.system.shutdown().await;

    assert_eq!(report.bindings_stopped, 5);
    assert_eq!(report.writer.dropped, 0);
    let result = fixture
        .system
        .deliver_async(
            key("late"),
            spec_event(desired("late", "x"), true, ObservedStatus::default()),
        )
        .await;
    assert_eq!(result, Err(DeliverError::Stopped { key: key("late") }));
}

#[actix_rt::test]
async fn invalid_config_is_rejected() {
    let mut config = SystemConfig::default();
    config.writer.qps = 0;

    let result = ActorSystem::start(
        config,
        Arc::new(MemoryTokenSource::new(Clock::System)),
        Arc::new(MemoryClusterWriter::new()),
    );

    assert_eq!(result.err().unwrap().field, "writer.qps");
}
