//! Azure failures, bad input and controller restarts.

use std::time::Duration;

use acrpull::crd::v1beta1::AcrPullBindingSpec;
use acrpull_testkit::fake_azure::{AccessRules, Endpoint, Failure, IdentityRule};
use serde_json::json;

use crate::support::*;

/// Azure returns `failure`: the error shows in status, the old Secret stays untouched,
/// retries back off, and the error clears once Azure recovers.
async fn azure_failure_keeps_secret(prefix: &str, failure: Failure, fragment: &str) {
    let harness = Harness::start_with(
        prefix,
        azure_with_lifetime(Duration::from_secs(20)),
        Vec::new(),
    )
    .await;
    harness.create_binding("app", spec()).await;
    let before = harness.wait_for_secret("app-msi-acrpull-secret").await;
    let ready = harness.wait_for_ready("app").await;
    let times = ready.status.clone().unwrap();

    // Fail the next refreshes (due 10 s after the first token).
    harness
        .azure
        .inject_failure(Endpoint::AcrExchange, failure)
        .unwrap();
    let failed = harness.wait_for_error("app", fragment).await;
    assert!(!is_ready(&failed));
    assert_eq!(ready_reason(&failed).as_deref(), Some("TokenRefreshFailed"));
    let failed_status = failed.status.clone().unwrap();
    assert_eq!(
        failed_status.last_token_refresh_time,
        times.last_token_refresh_time
    );
    assert_eq!(
        failed_status.token_expiration_time,
        times.token_expiration_time
    );

    let during = harness
        .secrets()
        .get("app-msi-acrpull-secret")
        .await
        .unwrap();
    assert_eq!(
        during.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(
        secret_password(&during, REGISTRY),
        secret_password(&before, REGISTRY)
    );

    // Recovery: once the queued failures are used up, the next retry succeeds.
    let recovered = harness.wait_for_ready("app").await;
    assert!(status_error(&recovered).is_none());
    let after = harness
        .secrets()
        .get("app-msi-acrpull-secret")
        .await
        .unwrap();
    assert_ne!(
        secret_password(&after, REGISTRY),
        secret_password(&before, REGISTRY)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_error_keeps_secret_then_recovers() {
    azure_failure_keeps_secret("fail5xx", Failure::status(503, 3), "503").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_keeps_secret_then_recovers() {
    azure_failure_keeps_secret(
        "fail429",
        Failure::throttle(Duration::from_secs(2), 2),
        "429",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorized_keeps_secret_then_recovers() {
    azure_failure_keeps_secret("fail401", Failure::status(401, 2), "401").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_back_off() {
    let harness = Harness::start("backoff").await;
    // Every exchange fails for the whole test.
    harness
        .azure
        .inject_failure(Endpoint::AcrExchange, Failure::status(500, 1_000))
        .unwrap();
    harness.create_binding("app", spec()).await;
    harness.wait_for_error("app", "500").await;

    tokio::time::sleep(Duration::from_secs(20)).await;
    let calls = harness.azure.calls(Endpoint::AcrExchange);
    // Exponential backoff from 1 s doubles: about 5 attempts in 20 s, never a storm.
    assert!(
        (2..=8).contains(&calls),
        "{calls} exchange attempts in about 20 s\n{}",
        harness.logs()
    );
    assert!(
        harness
            .secrets()
            .get_opt("app-msi-acrpull-secret")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_scope_reports_then_clears() {
    let rules = AccessRules::new(vec![
        IdentityRule::new(CLIENT_ID).with_registry(REGISTRY, &["repository:app:pull"]),
    ]);
    let harness = Harness::start_with("scope", azure_with_rules(rules), Vec::new()).await;
    let mut scoped = spec();
    scoped.scope = Some("repository:app:pull".to_owned());
    harness.create_binding("app", scoped).await;
    let ready = harness.wait_for_ready("app").await;
    let times = ready.status.clone().unwrap();
    let secret = harness.wait_for_secret("app-msi-acrpull-secret").await;

    // A scope the identity may not use: an error, times and Secret kept.
    harness
        .patch_spec("app", json!({ "scope": "repository:secret-app:pull" }))
        .await;
    let failed = harness.wait_for_error("app", "secret-app").await;
    let status = failed.status.clone().unwrap();
    assert_eq!(
        status.last_token_refresh_time,
        times.last_token_refresh_time
    );
    assert_eq!(status.token_expiration_time, times.token_expiration_time);
    let kept = harness
        .secrets()
        .get("app-msi-acrpull-secret")
        .await
        .unwrap();
    assert_eq!(
        secret_password(&kept, REGISTRY),
        secret_password(&secret, REGISTRY)
    );

    // Reverting the scope clears the error.
    harness
        .patch_spec("app", json!({ "scope": "repository:app:pull" }))
        .await;
    harness.wait_for_ready("app").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_reports_without_azure_calls() {
    let harness = Harness::start("badinput").await;

    let cases = [
        (
            "badserver",
            AcrPullBindingSpec {
                acr_server: Some("https://demo.azurecr.io/".to_owned()),
                managed_identity_client_id: Some(CLIENT_ID.to_owned()),
                ..AcrPullBindingSpec::default()
            },
            "not a valid host name",
        ),
        (
            "foreign",
            AcrPullBindingSpec {
                acr_server: Some("registry.example.com".to_owned()),
                managed_identity_client_id: Some(CLIENT_ID.to_owned()),
                ..AcrPullBindingSpec::default()
            },
            "not allowed",
        ),
        (
            "noidentity",
            AcrPullBindingSpec {
                acr_server: Some(REGISTRY.to_owned()),
                ..AcrPullBindingSpec::default()
            },
            "no managed identity",
        ),
    ];
    for (name, spec, fragment) in cases {
        harness.create_binding(name, spec).await;
        let binding = harness.wait_for_error(name, fragment).await;
        assert_eq!(
            ready_reason(&binding).as_deref(),
            Some("InvalidSpec"),
            "{name}"
        );
    }

    for endpoint in Endpoint::ALL {
        assert_eq!(
            harness.azure.calls(endpoint),
            0,
            "{endpoint} was called\n{}",
            harness.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_makes_no_calls_or_writes() {
    let mut harness = Harness::start("restart").await;
    for name in ["one", "two", "three"] {
        let mut scoped = spec();
        if name == "two" {
            scoped.scope = Some("repository:app:pull".to_owned());
        }
        if name == "three" {
            scoped.managed_identity_client_id = None;
            scoped.managed_identity_resource_id = Some(RESOURCE_ID.to_owned());
        }
        harness.create_binding(name, scoped).await;
    }
    for name in ["one", "two", "three"] {
        harness.wait_for_ready(name).await;
        harness
            .wait_for_reference("default", &format!("{name}-msi-acrpull-secret"), true)
            .await;
    }
    // Let the status writes settle before taking the snapshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.stop_operator();

    let versions = |harness: &Harness| {
        let bindings = harness.bindings();
        let secrets = harness.secrets();
        let accounts = harness.service_accounts();
        async move {
            let mut versions = Vec::new();
            for name in ["one", "two", "three"] {
                versions.push(bindings.get(name).await.unwrap().metadata.resource_version);
                versions.push(
                    secrets
                        .get(&format!("{name}-msi-acrpull-secret"))
                        .await
                        .unwrap()
                        .metadata
                        .resource_version,
                );
            }
            versions.push(
                accounts
                    .get("default")
                    .await
                    .unwrap()
                    .metadata
                    .resource_version,
            );
            versions
        }
    };
    let before = versions(&harness).await;
    harness.azure.reset_counters();

    harness.start_operator();
    // Wait until the restarted operator has listed everything and decided.
    tokio::time::sleep(Duration::from_secs(10)).await;

    for endpoint in Endpoint::ALL {
        assert_eq!(
            harness.azure.calls(endpoint),
            0,
            "{endpoint} called after restart\n{}",
            harness.logs()
        );
    }
    assert_eq!(
        versions(&harness).await,
        before,
        "objects were written after restart\n{}",
        harness.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_secret_is_never_touched() {
    let harness = Harness::start("foreign").await;
    let mut foreign = k8s_openapi::api::core::v1::Secret::default();
    foreign.metadata.name = Some("app-msi-acrpull-secret".to_owned());
    foreign.string_data = Some(std::collections::BTreeMap::from([(
        "password".to_owned(),
        "precious".to_owned(),
    )]));
    let created = harness
        .secrets()
        .create(&kube::api::PostParams::default(), &foreign)
        .await
        .unwrap();

    harness.create_binding("app", spec()).await;
    let binding = harness.wait_for_error("app", "not managed by").await;
    assert!(!is_ready(&binding));

    // Not rewritten, not listed on the ServiceAccount, and still there after the binding goes.
    let unchanged = harness
        .secrets()
        .get("app-msi-acrpull-secret")
        .await
        .unwrap();
    assert_eq!(
        unchanged.metadata.resource_version,
        created.metadata.resource_version
    );
    let account = harness.service_accounts().get("default").await.unwrap();
    assert!(!references(&account, "app-msi-acrpull-secret"));

    harness.delete_binding("app").await;
    harness
        .poll("binding app to be deleted", CONVERGE, || {
            let bindings = harness.bindings();
            async move { Ok(bindings.get_opt("app").await?.is_none().then_some(())) }
        })
        .await;
    let survivor = harness
        .secrets()
        .get("app-msi-acrpull-secret")
        .await
        .unwrap();
    assert_eq!(survivor.metadata.uid, created.metadata.uid);
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_shares_retries_between_bindings() {
    let harness = Harness::start("outage").await;
    harness
        .azure
        .inject_failure(Endpoint::AcrExchange, Failure::status(503, 100_000))
        .unwrap();
    let names: Vec<String> = (0..20).map(|index| format!("app-{index}")).collect();
    for name in &names {
        harness.create_binding(name, spec()).await;
    }
    for name in &names {
        harness.wait_for_error(name, "503").await;
    }

    tokio::time::sleep(Duration::from_secs(20)).await;
    // Twenty bindings share one request, so they share its backoff too: about as many calls
    // as one binding would make, never one per binding per retry.
    let calls = harness.azure.calls(Endpoint::AcrExchange);
    assert!(
        calls <= 12,
        "{calls} exchange calls for 20 bindings in about 25 s\n{}",
        harness.logs()
    );
}
