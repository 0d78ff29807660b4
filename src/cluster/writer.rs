//! The Kubernetes side of the writer actor: one write, one attempt.
//!
//! The writer actor in `acrpull-actors` owns rate limiting, coalescing and retries; this adapter
//! only turns a [`ClusterWrite`] into API calls and classifies the failure.

use std::sync::Arc;

use dashmap::DashMap;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{LocalObjectReference, ObjectReference, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use serde_json::json;
use tracing::{debug, instrument};

use acrpull_actors::model::BindingKey;
use acrpull_actors::ports::ClusterWriter;
use acrpull_actors::write::{
    ClusterWrite, Notice, SecretContent, StatusUpdate, WriteError, WriteErrorKind,
};

use super::names::{FIELD_MANAGER, FINALIZER};
use super::secret;
use crate::crd::v1beta1::AcrPullBinding;

/// UIDs of the bindings the watch has seen, needed for ownerReferences and Event targets.
pub type BindingDirectory = Arc<DashMap<BindingKey, String>>;

/// Applies writes with the Kubernetes API.
#[derive(Clone)]
pub struct KubeWriter {
    /// Client with the controller's credentials.
    client: Client,
    /// Binding UIDs, filled by the watch.
    directory: BindingDirectory,
    /// Publishes Events (deduplicated by kube-runtime).
    recorder: Recorder,
}

impl KubeWriter {
    /// Builds a writer; `recorder` names this controller instance as the Events' reporter.
    #[must_use]
    pub fn new(client: Client, directory: BindingDirectory, recorder: Recorder) -> Self {
        Self {
            client,
            directory,
            recorder,
        }
    }

    #[instrument(name = "apply", skip_all, fields(namespace = %key.namespace, name = %key.name, write = write_name(&write)))]
    async fn apply_write(self, key: BindingKey, write: ClusterWrite) -> Result<(), WriteError> {
        let result = match &write {
            ClusterWrite::AddFinalizer => self.set_finalizer(&key, true).await,
            ClusterWrite::RemoveFinalizer => self.set_finalizer(&key, false).await,
            ClusterWrite::ApplySecret(content) => self.apply_secret(&key, content).await,
            ClusterWrite::DeleteSecret { name } => self.delete_secret(&key, name).await,
            ClusterWrite::AddPullSecretReference {
                service_account,
                secret_name,
            } => self.add_reference(&key, service_account, secret_name).await,
            ClusterWrite::RemovePullSecretReference {
                service_account,
                secret_name,
            } => {
                self.remove_reference(&key, service_account, secret_name)
                    .await
            }
            ClusterWrite::UpdateStatus(status) => self.update_status(&key, status).await,
            ClusterWrite::PublishEvent(notice) => self.publish(&key, notice).await,
        };
        result.map_err(|error| classify(&error))
    }

    fn owner_uid(&self, key: &BindingKey) -> Result<String, kube::Error> {
        self.directory
            .get(key)
            .map(|uid| uid.clone())
            .ok_or_else(|| {
                kube::Error::Api(
                    kube::core::Status::failure(
                        &format!("binding {key} is not known to the controller yet"),
                        "NotFound",
                    )
                    .with_code(404)
                    .boxed(),
                )
            })
    }

    async fn set_finalizer(&self, key: &BindingKey, present: bool) -> Result<(), kube::Error> {
        let api: Api<AcrPullBinding> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(binding) = api.get_opt(&key.name).await? else {
            debug!("binding is gone, nothing to do");
            return Ok(());
        };

        let mut finalizers = binding.metadata.finalizers.clone().unwrap_or_default();
        let has = finalizers.iter().any(|f| f == FINALIZER);
        if has == present {
            return Ok(());
        }
        if present {
            finalizers.push(FINALIZER.to_owned());
        } else {
            finalizers.retain(|f| f != FINALIZER);
        }

        // The resourceVersion makes this a compare-and-swap: a concurrent change gives 409.
        let patch = json!({
            "metadata": {
                "resourceVersion": binding.metadata.resource_version,
                "finalizers": finalizers,
            }
        });
        match api
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(status)) if !present && status.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }

    async fn apply_secret(
        &self,
        key: &BindingKey,
        content: &SecretContent,
    ) -> Result<(), kube::Error> {
        let uid = self.owner_uid(key)?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);

        // A Secret of the same name that this binding does not control belongs to someone
        // else: it is never overwritten. The watch cannot report it, because it selects only
        // labelled Secrets.
        if let Some(existing) = api.get_opt(&content.name).await?
            && !controlled_by(&existing, &uid)
        {
            return Err(not_owned(&content.name, key));
        }

        let owner = OwnerReference {
            api_version: AcrPullBinding::api_version(&()).into_owned(),
            kind: AcrPullBinding::kind(&()).into_owned(),
            name: key.name.clone(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let rendered = secret::render(&key.namespace, &key.name, owner, content);
        api.patch(
            &content.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rendered),
        )
        .await?;
        Ok(())
    }

    async fn delete_secret(&self, key: &BindingKey, name: &str) -> Result<(), kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(existing) = api.get_opt(name).await? else {
            return Ok(());
        };
        let owned = self
            .directory
            .get(key)
            .is_some_and(|uid| controlled_by(&existing, &uid));
        if !owned {
            debug!(
                secret = name,
                "Secret is not controlled by this binding; leaving it in place"
            );
            return Ok(());
        }

        // The UID precondition makes sure a Secret recreated meanwhile by someone else stays.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: existing.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }

    /// Adds the Secret to `imagePullSecrets` with read-modify-write: the list is atomic under
    /// server-side apply, so applying it would take over entries this controller does not own.
    async fn add_reference(
        &self,
        key: &BindingKey,
        service_account: &str,
        secret_name: &str,
    ) -> Result<(), kube::Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &key.namespace);
        let mut account = api.get(service_account).await?;
        let entries = account.image_pull_secrets.get_or_insert_with(Vec::new);
        if entries.iter().any(|entry| entry.name == secret_name) {
            return Ok(());
        }

        entries.push(LocalObjectReference {
            name: secret_name.to_owned(),
        });
        // `replace` sends the resourceVersion read above, so a concurrent change gives 409.
        api.replace(service_account, &PostParams::default(), &account)
            .await?;
        Ok(())
    }

    async fn remove_reference(
        &self,
        key: &BindingKey,
        service_account: &str,
        secret_name: &str,
    ) -> Result<(), kube::Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(mut account) = api.get_opt(service_account).await? else {
            return Ok(());
        };
        let Some(entries) = account.image_pull_secrets.as_mut() else {
            return Ok(());
        };
        let before = entries.len();
        entries.retain(|entry| entry.name != secret_name);
        if entries.len() == before {
            return Ok(());
        }

        match api
            .replace(service_account, &PostParams::default(), &account)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }

    async fn update_status(
        &self,
        key: &BindingKey,
        status: &StatusUpdate,
    ) -> Result<(), kube::Error> {
        let api: Api<AcrPullBinding> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(current) = api.get_opt(&key.name).await? else {
            return Ok(());
        };

        let ready_status = if status.ready.ready { "True" } else { "False" };
        // The transition time changes only when the condition's status does.
        let previous = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| c.status == ready_status)
            .map(|c| c.last_transition_time.clone());
        let condition = Condition {
            type_: "Ready".to_owned(),
            status: ready_status.to_owned(),
            reason: status.ready.reason.clone(),
            message: status.ready.message.clone(),
            observed_generation: Some(status.ready.observed_generation),
            last_transition_time: previous.unwrap_or_else(|| Time(Timestamp::now())),
        };

        let patch = json!({
            "status": {
                "lastTokenRefreshTime": status.last_token_refresh.map(Time),
                "tokenExpirationTime": status.token_expiration.map(Time),
                "error": status.error,
                "conditions": [condition],
            }
        });
        api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    async fn publish(&self, key: &BindingKey, notice: &Notice) -> Result<(), kube::Error> {
        // NOTE: kube-runtime names an Event `<object name>.<suffix>`. For binding names longer
        // than about 235 characters that exceeds the 253-character limit, so the API server
        // rejects their Events. Their status still reports everything.
        let reference = ObjectReference {
            api_version: Some(AcrPullBinding::api_version(&()).into_owned()),
            kind: Some(AcrPullBinding::kind(&()).into_owned()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid: self.directory.get(key).map(|uid| uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason.clone(),
            note: Some(notice.message.clone()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }
}

impl ClusterWriter for KubeWriter {
    fn apply(
        &self,
        key: BindingKey,
        write: ClusterWrite,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        self.clone().apply_write(key, write).boxed()
    }
}

/// Returns whether `secret` has a controller ownerReference to the binding with `uid`.
fn controlled_by(secret: &Secret, uid: &str) -> bool {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// Returns the 409 for a Secret name taken by an object the binding does not control.
fn not_owned(secret: &str, key: &BindingKey) -> kube::Error {
    let message = format!(
        "Secret {secret} already exists and is not managed by AcrPullBinding {}; delete or rename \
         that Secret, or give the binding another name",
        key.name
    );
    kube::Error::Api(
        kube::core::Status::failure(&message, "AlreadyExists")
            .with_code(409)
            .boxed(),
    )
}

fn write_name(write: &ClusterWrite) -> &'static str {
    match write {
        ClusterWrite::AddFinalizer => "add-finalizer",
        ClusterWrite::RemoveFinalizer => "remove-finalizer",
        ClusterWrite::ApplySecret(_) => "apply-secret",
        ClusterWrite::DeleteSecret { .. } => "delete-secret",
        ClusterWrite::AddPullSecretReference { .. } => "add-reference",
        ClusterWrite::RemovePullSecretReference { .. } => "remove-reference",
        ClusterWrite::UpdateStatus(_) => "update-status",
        ClusterWrite::PublishEvent(_) => "publish-event",
    }
}

/// Turns an API error into the class the writer actor retries on.
fn classify(error: &kube::Error) -> WriteError {
    let kind = match error {
        kube::Error::Api(status) => match status.code {
            409 if status.reason == "AlreadyExists" => WriteErrorKind::Rejected,
            409 => WriteErrorKind::Conflict,
            404 => WriteErrorKind::NotFound,
            429 | 500..=599 => WriteErrorKind::Throttled(
                status
                    .details
                    .as_ref()
                    .map(|details| u64::from(details.retry_after_seconds))
                    .filter(|seconds| *seconds > 0)
                    .map(std::time::Duration::from_secs),
            ),
            _ => WriteErrorKind::Rejected,
        },
        // Connection and transport errors: the API server may be restarting.
        _ => WriteErrorKind::Throttled(None),
    };

    let hint = match error {
        kube::Error::Api(status)
            if status.code == 403 && status.message.contains("being terminated") =>
        {
            "; the namespace is being deleted"
        }
        kube::Error::Api(status) if status.code == 403 => "; check the controller's RBAC",
        _ if kind == WriteErrorKind::NotFound => "; it is retried when the object appears",
        _ => "",
    };
    let cause = match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => other.to_string(),
    };
    WriteError {
        // The binding's status names the object and the binding around this message.
        message: format!("{cause}{hint}"),
        kind,
    }
}
