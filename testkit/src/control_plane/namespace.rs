//! Per-test namespaces that are deleted when the test ends.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use super::{ControlPlane, poll_until};

/// Label put on every test namespace, so that leftovers are easy to find and delete.
pub const TEST_NAMESPACE_LABEL: &str = "acrpull.test/namespace";

/// Maximum length of a namespace prefix: a namespace name is a DNS label of at most 63
/// characters, and the API server appends `-` and 5 random characters.
const MAX_PREFIX_LEN: usize = 57;

/// How long to wait for the `default` `ServiceAccount` of a new namespace.
const SERVICE_ACCOUNT_TIMEOUT: Duration = Duration::from_mins(1);

/// How long [`TestNamespace::cleanup`] waits for the namespace to be gone.
const DELETION_TIMEOUT: Duration = Duration::from_mins(1);

/// A uniquely named namespace for one test.
///
/// Dropping it sends a best-effort delete request without waiting for the namespace to go.
/// Call [`TestNamespace::cleanup`] to delete it and wait, with errors reported.
pub struct TestNamespace {
    name: String,
    config: kube::Config,
    deleted: bool,
}

impl ControlPlane {
    /// Creates a namespace named `<prefix>-<5 random characters>` and waits until its `default`
    /// `ServiceAccount` exists, so that Pods can be created in it right away.
    ///
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// Fails if `prefix` is not a valid start of a DNS label, if the namespace cannot be
    /// created, or if the `default` `ServiceAccount` does not appear within 60 s (which means
    /// kube-controller-manager is not running).
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        validate_prefix(prefix)?;
        let client = self.client();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let request = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some(BTreeMap::from([(
                    TEST_NAMESPACE_LABEL.to_owned(),
                    "true".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &request)
            .await
            .with_context(|| format!("failed to create a test namespace with prefix {prefix:?}"))?;
        let name = created
            .metadata
            .name
            .context("the API server returned a namespace without a name")?;
        // From here on, dropping the value deletes the namespace, also on the error path below.
        let namespace = TestNamespace {
            name,
            config: self.config().clone(),
            deleted: false,
        };

        let service_accounts: Api<ServiceAccount> = Api::namespaced(client, &namespace.name);
        poll_until(
            &format!(
                "the default ServiceAccount in namespace {} (created by kube-controller-manager)",
                namespace.name
            ),
            SERVICE_ACCOUNT_TIMEOUT,
            || async { Ok(service_accounts.get_opt("default").await?) },
        )
        .await?;
        Ok(namespace)
    }
}

impl TestNamespace {
    /// Returns the namespace name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace and waits until the API server no longer returns it.
    ///
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// Fails if the delete request fails or the namespace still exists after 60 s (which
    /// usually means kube-controller-manager is not running or a finalizer is stuck).
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        // Set first, so that dropping `self` on any path below sends no second delete request.
        self.deleted = true;
        let client = kube::Client::try_from(self.config.clone())
            .context("failed to build a Kubernetes client from the control plane config")?;
        let namespaces: Api<Namespace> = Api::all(client);
        match namespaces
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            // A test may have deleted the namespace itself.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("failed to delete namespace {}", self.name));
            }
        }
        poll_until(
            &format!("deletion of namespace {}", self.name),
            DELETION_TIMEOUT,
            || async {
                let gone = namespaces.get_opt(&self.name).await?.is_none();
                Ok(gone.then_some(()))
            },
        )
        .await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // A Tokio test drops this at the end of its future, and the runtime shuts down right
        // after, so a spawned task would never run. A separate thread with its own runtime
        // finishes the request first.
        let name = self.name.clone();
        let config = self.config.clone();
        let request = std::thread::spawn(move || delete_blocking(&name, config));
        if let Ok(Err(error)) = request.join() {
            tracing::warn!(
                namespace = %self.name,
                error = format!("{error:#}"),
                "failed to delete test namespace"
            );
        }
    }
}

fn delete_blocking(name: &str, config: kube::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to build a Tokio runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_from(config)?;
        let namespaces: Api<Namespace> = Api::all(client);
        let params = DeleteParams::default();
        let request = namespaces.delete(name, &params);
        match tokio::time::timeout(Duration::from_secs(10), request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(()),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => bail!("the delete request timed out after 10 s"),
        }
    })
}

fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    let valid_characters = prefix
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    let starts_alphanumeric = prefix
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
    if !valid_characters || !starts_alphanumeric || prefix.len() > MAX_PREFIX_LEN {
        bail!(
            "invalid namespace prefix {prefix:?}: use 1 to {MAX_PREFIX_LEN} lowercase letters, \
             digits or '-', starting with a letter or digit"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_validation() {
        for valid in [
            "a",
            "smoke",
            "gc-cascade",
            "t1",
            &"x".repeat(MAX_PREFIX_LEN),
        ] {
            assert!(validate_prefix(valid).is_ok(), "{valid:?} should be valid");
        }
        for invalid in [
            "",
            "Upper",
            "-lead",
            "under_score",
            "dot.ted",
            &"x".repeat(MAX_PREFIX_LEN + 1),
        ] {
            assert!(
                validate_prefix(invalid).is_err(),
                "{invalid:?} should be invalid"
            );
        }
    }
}
