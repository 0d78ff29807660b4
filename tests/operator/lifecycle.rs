//! A binding's life: create, refresh, change, retarget, delete.

use std::time::Duration;

use acrpull_testkit::fake_azure::Endpoint;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn binding_creates_secret_and_reference() {
    let harness = Harness::start("create").await;
    harness.create_binding("app", spec()).await;

    let secret = harness.wait_for_secret("app-msi-acrpull-secret").await;
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("acr.microsoft.com/binding").map(String::as_str),
        Some("app")
    );
    let owner = &secret.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(owner.kind, "AcrPullBinding");
    assert_eq!(owner.controller, Some(true));
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    for key in [
        "acrpull.microsoft.com/token-expiry",
        "acrpull.microsoft.com/last-refresh",
        "acrpull.microsoft.com/inputs-hash",
    ] {
        assert!(
            annotations.contains_key(key),
            "missing annotation {key}: {annotations:?}"
        );
    }
    assert!(secret_password(&secret, REGISTRY).starts_with("eyJ"));

    // No serviceAccountName: the `default` ServiceAccount gets the reference.
    harness
        .wait_for_reference("default", "app-msi-acrpull-secret", true)
        .await;

    let binding = harness.wait_for_ready("app").await;
    let status = binding.status.clone().unwrap();
    assert!(status.last_token_refresh_time.is_some());
    assert!(status.token_expiration_time.is_some());
    assert_eq!(ready_reason(&binding).as_deref(), Some("TokenRefreshed"));
    assert!(
        binding
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"msi-acrpull.microsoft.com/finalizer".to_owned())
    );

    // Admission copies the ServiceAccount's imagePullSecrets into a new Pod.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "puller" },
        "spec": { "containers": [{ "name": "app", "image": "demo.azurecr.io/app:1" }] }
    }))
    .unwrap();
    let pods: kube::Api<Pod> = kube::Api::namespaced(harness.client.clone(), harness.ns());
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let names: Vec<String> = created
        .spec
        .unwrap()
        .image_pull_secrets
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["app-msi-acrpull-secret".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn short_tokens_refresh_once_per_window() {
    // 20 s tokens are renewed at half their lifetime: every 10 s.
    let harness = Harness::start_with(
        "refresh",
        azure_with_lifetime(Duration::from_secs(20)),
        Vec::new(),
    )
    .await;
    harness.create_binding("app", spec()).await;
    let first = secret_password(
        &harness.wait_for_secret("app-msi-acrpull-secret").await,
        REGISTRY,
    );

    // Watch the Secret for 45 s, sampling every 250 ms, and record each new token.
    let mut tokens = vec![first];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(45) {
        let secret = harness
            .secrets()
            .get("app-msi-acrpull-secret")
            .await
            .unwrap();
        let token = secret_password(&secret, REGISTRY);
        if tokens.last() != Some(&token) {
            tokens.push(token);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let exchanges = harness.azure.calls(Endpoint::AcrExchange);
    // 45 s of 10 s windows: 4 or 5 refreshes after the first token, never a stall.
    assert!(
        (4..=6).contains(&(tokens.len() - 1)),
        "refreshes: {}\n{}",
        tokens.len() - 1,
        harness.logs()
    );
    // Exactly one exchange per token written (the sampled Secret may miss none at 250 ms).
    let exchanges = usize::try_from(exchanges).unwrap();
    assert!(
        exchanges == tokens.len() || exchanges == tokens.len() + 1,
        "exchanges {exchanges}, tokens {}\n{}",
        tokens.len(),
        harness.logs()
    );
    assert!(status_error(&harness.bindings().get("app").await.unwrap()).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_change_mints_new_token() {
    let harness = Harness::start("respec").await;
    harness.create_binding("app", spec()).await;
    let secret = harness.wait_for_secret("app-msi-acrpull-secret").await;
    harness.wait_for_ready("app").await;
    let first_hash =
        secret.metadata.annotations.clone().unwrap()["acrpull.microsoft.com/inputs-hash"].clone();
    let exchanges = harness.azure.calls(Endpoint::AcrExchange);

    // Change the scope: a new access token is requested for it.
    harness
        .patch_spec("app", json!({ "scope": "repository:app:pull" }))
        .await;
    let changed = harness
        .poll("Secret with a new inputs hash", CONVERGE, || {
            let secrets = harness.secrets();
            let first_hash = first_hash.clone();
            async move {
                let secret = secrets.get("app-msi-acrpull-secret").await?;
                let hash = secret.metadata.annotations.clone().unwrap_or_default()["acrpull.microsoft.com/inputs-hash"].clone();
                Ok((hash != first_hash).then_some(secret))
            }
        })
        .await;
    // The refresh token from the first exchange is reused for the scope.
    assert_eq!(harness.azure.calls(Endpoint::AcrExchange), exchanges);
    assert_eq!(harness.azure.calls(Endpoint::AcrToken), 1);
    assert_ne!(
        secret_password(&changed, REGISTRY),
        secret_password(&secret, REGISTRY)
    );

    // Change the server: the Secret's auths entry follows.
    harness
        .patch_spec("app", json!({ "acrServer": "other.azurecr.io" }))
        .await;
    harness
        .poll("Secret for other.azurecr.io", CONVERGE, || {
            let secrets = harness.secrets();
            async move {
                let secret = secrets.get("app-msi-acrpull-secret").await?;
                let bytes = &secret.data.clone().unwrap_or_default()[".dockerconfigjson"].0;
                let json: serde_json::Value = serde_json::from_slice(bytes)?;
                Ok(json["auths"].get("other.azurecr.io").map(|_| ()))
            }
        })
        .await;
    harness.wait_for_ready("app").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_change_moves_reference() {
    let harness = Harness::start("retarget").await;
    harness.create_service_account("a").await;
    harness.create_service_account("b").await;
    let mut with_a = spec();
    with_a.service_account_name = Some("a".to_owned());
    harness.create_binding("app", with_a).await;
    harness
        .wait_for_reference("a", "app-msi-acrpull-secret", true)
        .await;

    harness
        .patch_spec("app", json!({ "serviceAccountName": "b" }))
        .await;
    harness
        .wait_for_reference("b", "app-msi-acrpull-secret", true)
        .await;
    harness
        .wait_for_reference("a", "app-msi-acrpull-secret", false)
        .await;
    let default = harness.service_accounts().get("default").await.unwrap();
    assert!(!references(&default, "app-msi-acrpull-secret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_keeps_other_entries_in_order() {
    let harness = Harness::start("order").await;
    let mut account = k8s_openapi::api::core::v1::ServiceAccount::default();
    account.metadata.name = Some("builder".to_owned());
    account.image_pull_secrets = Some(vec![
        k8s_openapi::api::core::v1::LocalObjectReference {
            name: "first".to_owned(),
        },
        k8s_openapi::api::core::v1::LocalObjectReference {
            name: "second".to_owned(),
        },
    ]);
    harness
        .service_accounts()
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let mut target = spec();
    target.service_account_name = Some("builder".to_owned());
    harness.create_binding("app", target).await;

    let account = harness
        .wait_for_reference("builder", "app-msi-acrpull-secret", true)
        .await;
    let names: Vec<String> = account
        .image_pull_secrets
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["first", "second", "app-msi-acrpull-secret"]);

    harness.delete_binding("app").await;
    let account = harness
        .wait_for_reference("builder", "app-msi-acrpull-secret", false)
        .await;
    let names: Vec<String> = account
        .image_pull_secrets
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["first", "second"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_service_account_reports_then_recovers() {
    let harness = Harness::start("nosa").await;
    let mut target = spec();
    target.service_account_name = Some("later".to_owned());
    harness.create_binding("app", target).await;

    let binding = harness.wait_for_error("app", "later").await;
    assert!(!is_ready(&binding));
    assert_eq!(
        ready_reason(&binding).as_deref(),
        Some("ServiceAccountNotFound")
    );
    // The Secret is written anyway, so that it is ready when the ServiceAccount appears.
    harness.wait_for_secret("app-msi-acrpull-secret").await;

    harness.create_service_account("later").await;
    harness
        .wait_for_reference("later", "app-msi-acrpull-secret", true)
        .await;
    harness.wait_for_ready("app").await;
    assert!(
        harness
            .service_accounts()
            .get_opt("default")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_reference_secret_and_finalizer() {
    let harness = Harness::start("delete").await;
    harness.create_binding("app", spec()).await;
    harness
        .wait_for_reference("default", "app-msi-acrpull-secret", true)
        .await;
    harness.wait_for_ready("app").await;

    harness.delete_binding("app").await;
    wait_gone(&harness, "app").await;
    harness
        .wait_for_reference("default", "app-msi-acrpull-secret", false)
        .await;
    wait_secret_gone(&harness, "app-msi-acrpull-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_finishes_when_service_account_is_gone() {
    let harness = Harness::start("delsa").await;
    harness.create_service_account("short-lived").await;
    let mut target = spec();
    target.service_account_name = Some("short-lived".to_owned());
    harness.create_binding("app", target).await;
    harness
        .wait_for_reference("short-lived", "app-msi-acrpull-secret", true)
        .await;

    harness
        .service_accounts()
        .delete("short-lived", &DeleteParams::default())
        .await
        .unwrap();
    harness.wait_for_error("app", "short-lived").await;

    harness.delete_binding("app").await;
    wait_gone(&harness, "app").await;
    wait_secret_gone(&harness, "app-msi-acrpull-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_deleted_by_hand_is_restored() {
    let harness = Harness::start("restore").await;
    harness.create_binding("app", spec()).await;
    let original = harness.wait_for_secret("app-msi-acrpull-secret").await;
    harness.wait_for_ready("app").await;

    harness
        .secrets()
        .delete("app-msi-acrpull-secret", &DeleteParams::default())
        .await
        .unwrap();
    let restored = harness
        .poll("Secret to be recreated", CONVERGE, || {
            let secrets = harness.secrets();
            let uid = original.metadata.uid.clone();
            async move {
                Ok(secrets
                    .get_opt("app-msi-acrpull-secret")
                    .await?
                    .filter(|s| s.metadata.uid != uid))
            }
        })
        .await;
    assert!(secret_password(&restored, REGISTRY).starts_with("eyJ"));

    // An edit by hand is reverted too.
    let edited = json!({ "data": { ".dockerconfigjson": "e30=" } });
    harness
        .secrets()
        .patch(
            "app-msi-acrpull-secret",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(edited),
        )
        .await
        .unwrap();
    harness
        .poll("edited Secret to be repaired", CONVERGE, || {
            let secrets = harness.secrets();
            async move {
                let secret = secrets.get("app-msi-acrpull-secret").await?;
                let bytes = &secret.data.clone().unwrap_or_default()[".dockerconfigjson"].0;
                Ok((bytes.as_slice() != b"{}").then_some(()))
            }
        })
        .await;
}

async fn wait_gone(harness: &Harness, name: &str) {
    harness
        .poll(&format!("binding {name} to be deleted"), CONVERGE, || {
            let bindings = harness.bindings();
            let name = name.to_owned();
            async move { Ok(bindings.get_opt(&name).await?.is_none().then_some(())) }
        })
        .await;
}

async fn wait_secret_gone(harness: &Harness, name: &str) {
    harness
        .poll(&format!("Secret {name} to be deleted"), CONVERGE, || {
            let secrets = harness.secrets();
            let name = name.to_owned();
            async move { Ok(secrets.get_opt(&name).await?.is_none().then_some(())) }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_bindings_and_azure_calls() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = vec!["--metrics-addr".to_owned(), format!("127.0.0.1:{port}")];
    let harness = Harness::start_with(
        "metrics",
        acrpull_testkit::fake_azure::FakeAzureConfig::allow_all(),
        args,
    )
    .await;
    harness.create_binding("app", spec()).await;
    harness.wait_for_ready("app").await;

    let url = format!("http://127.0.0.1:{port}/metrics");
    let body = harness
        .poll("metrics to be served", CONVERGE, || {
            let url = url.clone();
            async move {
                let response = reqwest::get(&url).await?;
                Ok(response
                    .status()
                    .is_success()
                    .then_some(response.text().await?))
            }
        })
        .await;
    for line in [
        "acrpull_bindings 1",
        "acrpull_azure_token_calls_total 1",
        "acrpull_writes_failed_total 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "{line:?} missing from:\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_share_one_exchange() {
    let harness = Harness::start("scopes").await;
    for app in ["one", "two", "three"] {
        let mut scoped = spec();
        scoped.scope = Some(format!("repository:{app}:pull"));
        harness.create_binding(app, scoped).await;
    }
    for app in ["one", "two", "three"] {
        harness.wait_for_ready(app).await;
    }

    assert_eq!(
        harness.azure.calls(Endpoint::AcrExchange),
        1,
        "{}",
        harness.logs()
    );
    assert_eq!(
        harness.azure.calls(Endpoint::AcrToken),
        3,
        "{}",
        harness.logs()
    );
}
