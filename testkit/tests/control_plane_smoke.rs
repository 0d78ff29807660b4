//! Smoke tests for the local control plane: the cluster behaviours that acrpull relies on, and
//! component restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use acrpull_testkit::control_plane::{self, ControlPlane, poll_until};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, LocalObjectReference, Namespace, Pod, PodSpec, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const AZURE_AUDIENCE: &str = "api://AzureCRTokenExchange";
const GC_TIMEOUT: Duration = Duration::from_mins(1);

fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

#[tokio::test]
async fn pull_secrets_reach_new_pods() -> anyhow::Result<()> {
    let control_plane = control_plane::shared().await;
    let namespace = control_plane.namespace("smoke-pull-secrets").await?;
    let client = control_plane.client();
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace.name());

    let default = service_accounts.get_opt("default").await?;
    assert!(default.is_some(), "the default ServiceAccount is missing");

    service_accounts
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: named("puller"),
                ..ServiceAccount::default()
            },
        )
        .await?;
    let patch = json!({ "imagePullSecrets": [{ "name": "acr-pull" }] });
    let patched = service_accounts
        .patch("puller", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    assert_eq!(
        patched.image_pull_secrets,
        Some(vec![LocalObjectReference {
            name: "acr-pull".to_owned()
        }])
    );

    let pods: Api<Pod> = Api::namespaced(client, namespace.name());
    let pod = Pod {
        metadata: named("app"),
        spec: Some(PodSpec {
            service_account_name: Some("puller".to_owned()),
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("example.invalid/app:1".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let created = pods.create(&PostParams::default(), &pod).await?;
    let spec = created.spec.context("the created Pod has no spec")?;
    assert_eq!(
        spec.image_pull_secrets,
        Some(vec![LocalObjectReference {
            name: "acr-pull".to_owned()
        }]),
        "the ServiceAccount admission plugin did not copy imagePullSecrets into the Pod"
    );
    let volumes = spec.volumes.unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|volume| volume.name.starts_with("kube-api-access-")),
        "the ServiceAccount admission plugin did not add the token volume: {volumes:?}"
    );

    namespace.cleanup().await
}

#[tokio::test]
async fn token_request_with_azure_audience() -> anyhow::Result<()> {
    let control_plane = control_plane::shared().await;
    let namespace = control_plane.namespace("smoke-token").await?;
    let service_accounts: Api<ServiceAccount> =
        Api::namespaced(control_plane.client(), namespace.name());
    service_accounts
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: named("workload"),
                ..ServiceAccount::default()
            },
        )
        .await?;

    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![AZURE_AUDIENCE.to_owned()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let response = service_accounts
        .create_token_request("workload", &PostParams::default(), &request)
        .await?;
    let status = response.status.context("the TokenRequest has no status")?;
    let payload = status
        .token
        .split('.')
        .nth(1)
        .context("the token is not a JWT")?;
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;

    assert_eq!(claims["aud"], json!([AZURE_AUDIENCE]));
    assert_eq!(
        claims["sub"],
        json!(format!(
            "system:serviceaccount:{}:workload",
            namespace.name()
        ))
    );
    if !control_plane.is_external() {
        assert_eq!(claims["iss"], json!(control_plane.apiserver_url()));
    }
    let lifetime =
        claims["exp"].as_i64().unwrap_or_default() - claims["iat"].as_i64().unwrap_or_default();
    assert_eq!(lifetime, 600);

    namespace.cleanup().await
}

#[tokio::test]
async fn owner_deletion_collects_owned_object() -> anyhow::Result<()> {
    let control_plane = control_plane::shared().await;
    let namespace = control_plane.namespace("smoke-gc").await?;
    let client = control_plane.client();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace.name());
    let secrets: Api<Secret> = Api::namespaced(client, namespace.name());

    let owner = config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: named("owner"),
                ..ConfigMap::default()
            },
        )
        .await?;
    let owner_reference = OwnerReference {
        api_version: "v1".to_owned(),
        kind: "ConfigMap".to_owned(),
        name: "owner".to_owned(),
        uid: owner.metadata.uid.context("the owner has no uid")?,
        ..OwnerReference::default()
    };
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("owned".to_owned()),
                    owner_references: Some(vec![owner_reference]),
                    ..ObjectMeta::default()
                },
                string_data: Some(BTreeMap::from([("key".to_owned(), "value".to_owned())])),
                ..Secret::default()
            },
        )
        .await?;

    config_maps
        .delete("owner", &DeleteParams::background())
        .await?;
    poll_until(
        "the garbage collector to delete the owned Secret",
        GC_TIMEOUT,
        || async { Ok(secrets.get_opt("owned").await?.is_none().then_some(())) },
    )
    .await?;

    namespace.cleanup().await
}

#[tokio::test]
async fn namespace_deletion_completes() -> anyhow::Result<()> {
    let control_plane = control_plane::shared().await;
    let namespace = control_plane.namespace("smoke-ns-delete").await?;
    let name = namespace.name().to_owned();
    let client = control_plane.client();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: named("content"),
                ..ConfigMap::default()
            },
        )
        .await?;

    // Waits until the namespace controller has emptied and removed the namespace.
    namespace.cleanup().await?;

    let namespaces: Api<Namespace> = Api::all(client);
    assert!(namespaces.get_opt(&name).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn dropped_namespace_is_deleted() -> anyhow::Result<()> {
    let control_plane = control_plane::shared().await;
    let namespace = control_plane.namespace("smoke-ns-drop").await?;
    let name = namespace.name().to_owned();

    drop(namespace);

    // The drop sends the delete request before it returns, so the namespace is already
    // terminating or gone.
    let namespaces: Api<Namespace> = Api::all(control_plane.client());
    let remaining = namespaces.get_opt(&name).await?;
    let terminating = remaining
        .as_ref()
        .is_none_or(|namespace| namespace.metadata.deletion_timestamp.is_some());
    assert!(
        terminating,
        "namespace {name} is not being deleted: {remaining:?}"
    );
    Ok(())
}

/// Returns the body of `GET /readyz`, failing unless the status is 200.
async fn readyz(control_plane: &ControlPlane) -> anyhow::Result<String> {
    let ca = reqwest::Certificate::from_pem(control_plane.ca_pem().as_bytes())?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(5))
        .build()?;
    let response = client
        .get(format!("{}/readyz", control_plane.apiserver_url()))
        .send()
        .await?
        .error_for_status()?;
    Ok(response.text().await?)
}

/// Restarts every component of a private control plane, because stopping the shared one
/// would break tests running at the same time.
#[tokio::test]
async fn components_restart_on_same_ports() -> anyhow::Result<()> {
    let control_plane = ControlPlane::start().await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(control_plane.client(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: named("survives-restart"),
                ..ConfigMap::default()
            },
        )
        .await?;

    control_plane.stop_apiserver().await?;
    assert!(
        readyz(&control_plane).await.is_err(),
        "/readyz answered while kube-apiserver was stopped"
    );
    control_plane.start_apiserver().await?;
    assert_eq!(readyz(&control_plane).await?, "ok");
    assert!(config_maps.get_opt("survives-restart").await?.is_some());

    control_plane.stop_etcd().await?;
    control_plane.start_etcd().await?;
    poll_until(
        "/readyz after the etcd restart",
        Duration::from_secs(30),
        || async {
            Ok(readyz(&control_plane)
                .await
                .ok()
                .filter(|body| body == "ok"))
        },
    )
    .await?;
    assert!(config_maps.get_opt("survives-restart").await?.is_some());

    control_plane.stop_controller_manager().await?;
    control_plane.start_controller_manager().await?;
    control_plane.check_running()?;

    control_plane.shutdown().await
}
