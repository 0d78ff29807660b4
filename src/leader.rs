//! Leader election over a `coordination.k8s.io` Lease, so that only one replica acts.
//!
//! A replica waits until it holds the Lease, then runs the controller. When it loses the Lease
//! (for example after a network partition), it exits so that Kubernetes restarts it as a
//! standby, the same way controller-runtime operators behave.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Name of the Lease that the replicas compete for.
pub const LEASE_NAME: &str = "msi-acrpull-leader";

/// Seconds a Lease stays valid without renewal; a standby takes over this long after the
/// leader stops renewing.
const LEASE_DURATION_SECONDS: u64 = 15;

/// Seconds before expiry at which the leader renews the Lease.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Time that shutdown waits for the Lease to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// File with the namespace of the Pod's ServiceAccount, present in every Pod.
const IN_CLUSTER_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Errors of leader election set-up.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or created.
    #[error(
        "failed to set up leader election on Lease {namespace}/{LEASE_NAME}: {source}; check the controller's RBAC for leases in that namespace"
    )]
    Setup {
        /// Namespace of the Lease.
        namespace: String,
        /// The API error.
        source: LeaseManagerError,
    },
}

/// Leadership of this replica: `true` while it holds the Lease.
pub struct Leadership {
    /// Changes whenever the Lease is acquired or lost. Dropping it releases the Lease.
    state: watch::Receiver<bool>,
    /// The task that renews the Lease; it releases the Lease and ends once `state` is dropped.
    renewal: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Starts competing for the Lease in `namespace` under `identity`.
    ///
    /// # Errors
    /// Returns [`LeaderError`] when the Lease cannot be set up.
    pub async fn start(
        client: Client,
        namespace: &str,
        identity: &str,
    ) -> Result<Self, LeaderError> {
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_DURATION_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .build()
            .await
            .map_err(|source| LeaderError::Setup {
                namespace: namespace.to_owned(),
                source,
            })?;
        let (state, renewal) = manager.watch().await;
        Ok(Self { state, renewal })
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquired(&mut self) {
        info!(lease = LEASE_NAME, "waiting to become the leader");
        let _ = self.state.wait_for(|leader| *leader).await;
        info!(lease = LEASE_NAME, "became the leader");
    }

    /// Waits until this replica loses the Lease.
    pub async fn lost(&mut self) {
        let _ = self.state.wait_for(|leader| !*leader).await;
    }

    /// Releases the Lease so that a standby takes over at once instead of after it expires.
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(RELEASE_TIMEOUT, self.renewal).await {
            Ok(Ok(Ok(_))) => info!(lease = LEASE_NAME, "released the Lease"),
            Ok(Ok(Err(error))) => {
                warn!(lease = LEASE_NAME, %error, "failed to release the Lease; a standby takes over when it expires");
            }
            Ok(Err(error)) => warn!(lease = LEASE_NAME, %error, "the Lease renewal task failed"),
            Err(_) => warn!(
                lease = LEASE_NAME,
                "timed out releasing the Lease; a standby takes over when it expires"
            ),
        }
    }
}

/// Returns the namespace for the Lease: the flag, else the Pod's own namespace, else
/// `msi-acrpull-system`.
#[must_use]
pub fn lease_namespace(flag: Option<&str>) -> String {
    if let Some(namespace) = flag.filter(|namespace| !namespace.is_empty()) {
        return namespace.to_owned();
    }

    std::fs::read_to_string(IN_CLUSTER_NAMESPACE_FILE)
        .ok()
        .map(|namespace| namespace.trim().to_owned())
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or_else(|| "msi-acrpull-system".to_owned())
}

/// Returns this replica's identity in the Lease: `POD_NAME` when set, else the host name
/// and the process ID.
#[must_use]
pub fn identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
    {
        return pod;
    }

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
