//! A real local Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager, for tests, the demo and CI.
//!
//! [`shared`] starts one control plane per test binary on first use, or attaches to an existing
//! cluster when `ACRPULL_TEST_KUBECONFIG` names its kubeconfig. [`ControlPlane::namespace`]
//! gives each test its own namespace.
//!
//! The components run as child processes that get SIGKILL when the owning process exits, even
//! when it panics or keeps the control plane in a `static`. Their logs go to `logs/` in the
//! control plane folder. Without a node, kubelet or scheduler, Pods are stored but never run.

mod namespace;
mod process;

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;

pub use namespace::{TEST_NAMESPACE_LABEL, TestNamespace};

use crate::pki::{ServiceAccountKeys, TestCa};
use process::Component;

/// Environment variable naming a folder that contains the `etcd`, `kube-apiserver` and
/// `kube-controller-manager` binaries. Without it, `dev/build-control-plane.sh` builds them.
pub const BIN_DIR_ENV: &str = "ACRPULL_CONTROL_PLANE_BIN";

/// Environment variable naming the kubeconfig of an existing cluster for [`shared`] to use
/// instead of starting a control plane.
pub const TEST_KUBECONFIG_ENV: &str = "ACRPULL_TEST_KUBECONFIG";

/// Environment variable that, when set to any value, keeps the folder of a control plane
/// started by [`ControlPlane::start`] (logs, etcd data, certificates) after it stops.
pub const KEEP_DIR_ENV: &str = "ACRPULL_TEST_KEEP_CONTROL_PLANE";

/// The controllers that make the cluster behave like a real one for acrpull: `ownerReference`
/// cascades, namespace deletion, a `default` `ServiceAccount` and `kube-root-ca.crt` in every
/// namespace, and `ServiceAccount` token Secrets.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,\
serviceaccount-controller,serviceaccount-token-controller,\
root-ca-certificate-publisher-controller";

const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
/// The first address of [`SERVICE_CLUSTER_IP_RANGE`], which the `kubernetes` Service gets.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// kube-apiserver 1.37 became ready in about 2 s on a 2-core development machine. The limit
/// leaves room for busy CI runners.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
const CONTROLLER_MANAGER_READY_TIMEOUT: Duration = Duration::from_mins(1);
/// How long a component may take to exit after SIGTERM before it gets SIGKILL.
///
/// kube-apiserver 1.37 keeps running for its request timeout (60 s) after SIGTERM while
/// clients hold watches open, and etcd 3.7 took about 7 s with kube-apiserver connected, so a
/// longer grace only slows tests down. SIGKILL loses no data: even with `--unsafe-no-fsync`,
/// etcd's writes are in the page cache, which survives the process.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A running local control plane, or a connection to an existing cluster.
pub struct ControlPlane {
    kubeconfig_path: PathBuf,
    apiserver_url: String,
    ca_pem: String,
    config: kube::Config,
    /// `None` when attached to an existing cluster.
    local: Option<LocalComponents>,
}

/// The processes and files of a control plane that this process started.
struct LocalComponents {
    dir: PathBuf,
    // Fields drop in declaration order, so the processes die before the folder is removed.
    controller_manager: Component,
    apiserver: Component,
    etcd: Component,
    etcd_url: String,
    /// Removes the folder on drop, unless [`KEEP_DIR_ENV`] is set.
    temp_dir: Option<TempDir>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager in a new folder under
    /// `$TMPDIR/acrpull-control-plane`, which is removed when the control plane is dropped or
    /// the process exits (unless [`KEEP_DIR_ENV`] is set).
    ///
    /// Folders left by earlier processes that died are removed first. The first call may
    /// build the binaries (see [`find_binaries`]), which takes minutes.
    ///
    /// # Errors
    /// Fails if the binaries cannot be found or built, or if a component fails to start or
    /// to become ready. After a component failure the folder is kept and the error names its
    /// log file.
    pub async fn start() -> anyhow::Result<Self> {
        install_crypto_provider();
        let bin_dir = find_binaries().await?;
        let base = env::temp_dir().join("acrpull-control-plane");
        fs::create_dir_all(&base)
            .with_context(|| format!("failed to create {}", base.display()))?;
        remove_stale_dirs(&base);
        let mut temp_dir = tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempdir_in(&base)
            .with_context(|| format!("failed to create a folder in {}", base.display()))?;
        let keep = env::var_os(KEEP_DIR_ENV).is_some();
        if keep {
            temp_dir.disable_cleanup(true);
            fs::write(temp_dir.path().join(KEEP_MARKER), "")
                .context("failed to mark the control plane folder as kept")?;
        }

        match Self::launch(&bin_dir, temp_dir.path()).await {
            Ok(mut control_plane) => {
                if let Some(local) = control_plane.local.as_mut() {
                    local.temp_dir = Some(temp_dir);
                }
                Ok(control_plane)
            }
            Err(error) => {
                let dir = temp_dir.keep();
                // A failed start must not be removed as stale by the next test binary.
                let _ = fs::write(dir.join(KEEP_MARKER), "");
                Err(error.context(format!(
                    "failed to start the control plane; its folder {} was kept for inspection",
                    dir.display()
                )))
            }
        }
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager with their files in `dir`, which
    /// is kept afterwards: `dir/kubeconfig` (admin), `dir/logs/`, `dir/pki/` and
    /// `dir/etcd-data/`. Those four entries are deleted first if they exist, so each start
    /// begins with an empty cluster.
    ///
    /// # Errors
    /// Fails if `dir` cannot be prepared, the binaries cannot be found or built, or a component
    /// fails to start or to become ready.
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        install_crypto_provider();
        let bin_dir = find_binaries().await?;
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("failed to resolve {}", dir.display()))?;
        for stale in ["etcd-data", "logs", "pki"] {
            let path = dir.join(stale);
            if path.exists() {
                fs::remove_dir_all(&path)
                    .with_context(|| format!("failed to remove {}", path.display()))?;
            }
        }
        let kubeconfig = dir.join("kubeconfig");
        if kubeconfig.exists() {
            fs::remove_file(&kubeconfig)
                .with_context(|| format!("failed to remove {}", kubeconfig.display()))?;
        }
        Self::launch(&bin_dir, &dir).await
    }

    /// Connects to an existing cluster through its kubeconfig (current context) without
    /// starting anything. The `stop_*` and `start_*` methods then return errors.
    ///
    /// # Errors
    /// Fails if the kubeconfig cannot be read or the cluster does not respond.
    pub async fn attach(kubeconfig_path: &Path) -> anyhow::Result<Self> {
        install_crypto_provider();
        let config = load_config(kubeconfig_path).await?;
        let ca_pem = config
            .root_cert
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|der| der_to_pem(der))
            .collect::<String>();
        let apiserver_url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let client = kube::Client::try_from(config.clone())
            .context("failed to build a Kubernetes client from the kubeconfig")?;
        let version = client.apiserver_version().await.with_context(|| {
            format!(
                "the cluster at {apiserver_url} (from {}) did not respond to a version request",
                kubeconfig_path.display()
            )
        })?;
        tracing::info!(
            url = %apiserver_url,
            version = %version.git_version,
            kubeconfig = %kubeconfig_path.display(),
            "attached to an existing cluster"
        );
        Ok(Self {
            kubeconfig_path: kubeconfig_path.to_owned(),
            apiserver_url,
            ca_pem,
            config,
            local: None,
        })
    }

    /// Returns the path of the admin kubeconfig.
    #[must_use]
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// Returns the kube-apiserver URL, such as `https://127.0.0.1:43127`.
    #[must_use]
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// Returns the PEM certificate of the CA that signed the kube-apiserver serving
    /// certificate. It is empty when attached to a cluster whose kubeconfig names no CA.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Returns the admin client configuration, for building clients with other credentials.
    #[must_use]
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// Builds a new admin client (a member of `system:masters`, which bypasses RBAC).
    ///
    /// Each call builds a new client because a client's connections belong to the Tokio
    /// runtime that opened them, and each `#[tokio::test]` has its own runtime.
    ///
    /// # Panics
    /// Panics outside a Tokio runtime, or if the client cannot be built from the configuration
    /// (which was already used successfully at start).
    #[must_use]
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config.clone())
            .expect("failed to build a Kubernetes client from the control plane config")
    }

    /// Returns whether this is an existing cluster attached through [`ControlPlane::attach`].
    #[must_use]
    pub fn is_external(&self) -> bool {
        self.local.is_none()
    }

    /// Returns the control plane folder, or `None` for an external cluster.
    #[must_use]
    pub fn dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|local| local.dir.as_path())
    }

    /// Returns the folder with the component log files, or `None` for an external cluster.
    #[must_use]
    pub fn log_dir(&self) -> Option<PathBuf> {
        self.dir().map(|dir| dir.join("logs"))
    }

    /// Starts etcd (on the same port and data folder as before) and waits for `/health`.
    ///
    /// # Errors
    /// Fails for an external cluster, if etcd is already running, or if it does not become
    /// healthy within 30 s.
    pub async fn start_etcd(&self) -> anyhow::Result<()> {
        let local = self.local("start etcd")?;
        local.etcd.spawn()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("failed to build an HTTP client")?;
        let health_url = format!("{}/health", local.etcd_url);
        wait_until_ready(&local.etcd, ETCD_READY_TIMEOUT, || async {
            let response = client.get(&health_url).send().await?;
            let status = response.status();
            let body = response.text().await?;
            if status.is_success() && body.contains(r#""health":"true""#) {
                Ok(true)
            } else {
                bail!("GET {health_url} returned {status}: {body}")
            }
        })
        .await
    }

    /// Stops etcd with SIGTERM (SIGKILL after 5 s). The data folder is kept for
    /// [`ControlPlane::start_etcd`].
    ///
    /// # Errors
    /// Fails for an external cluster.
    pub async fn stop_etcd(&self) -> anyhow::Result<()> {
        self.local("stop etcd")?.etcd.stop(STOP_GRACE).await
    }

    /// Starts kube-apiserver (on the same port as before) and waits for `/readyz`.
    ///
    /// # Errors
    /// Fails for an external cluster, if kube-apiserver is already running, or if it does not
    /// become ready within 90 s.
    pub async fn start_apiserver(&self) -> anyhow::Result<()> {
        let local = self.local("start kube-apiserver")?;
        local.apiserver.spawn()?;
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())
            .context("failed to parse the test CA certificate")?;
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(5))
            .build()
            .context("failed to build an HTTPS client")?;
        let readyz_url = format!("{}/readyz", self.apiserver_url);
        wait_until_ready(&local.apiserver, APISERVER_READY_TIMEOUT, || async {
            let response = client.get(&readyz_url).send().await?;
            let status = response.status();
            if status.is_success() {
                Ok(true)
            } else {
                let body = response.text().await.unwrap_or_default();
                bail!("GET {readyz_url} returned {status}: {body}")
            }
        })
        .await
    }

    /// Stops kube-apiserver with SIGTERM (SIGKILL after 5 s).
    ///
    /// # Errors
    /// Fails for an external cluster.
    pub async fn stop_apiserver(&self) -> anyhow::Result<()> {
        self.local("stop kube-apiserver")?
            .apiserver
            .stop(STOP_GRACE)
            .await
    }

    /// Starts kube-controller-manager and waits until the `default` `ServiceAccount` of the
    /// `default` namespace exists, which its `ServiceAccount` controller creates.
    ///
    /// # Errors
    /// Fails for an external cluster, if kube-controller-manager is already running, or if the
    /// `ServiceAccount` does not appear within 60 s.
    pub async fn start_controller_manager(&self) -> anyhow::Result<()> {
        let local = self.local("start kube-controller-manager")?;
        local.controller_manager.spawn()?;
        let service_accounts: Api<ServiceAccount> = Api::namespaced(self.client(), "default");
        wait_until_ready(
            &local.controller_manager,
            CONTROLLER_MANAGER_READY_TIMEOUT,
            || async { Ok(service_accounts.get_opt("default").await?.is_some()) },
        )
        .await
    }

    /// Stops kube-controller-manager with SIGTERM (SIGKILL after 5 s).
    ///
    /// # Errors
    /// Fails for an external cluster.
    pub async fn stop_controller_manager(&self) -> anyhow::Result<()> {
        self.local("stop kube-controller-manager")?
            .controller_manager
            .stop(STOP_GRACE)
            .await
    }

    /// Returns an error if a component exited on its own. Components stopped through a
    /// `stop_*` method do not count.
    ///
    /// # Errors
    /// Fails with the exit status and the last log lines of the first component that exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        for component in local.components() {
            if let Some(status) = component.exit_status() {
                return Err(component.exited_error(status));
            }
        }
        Ok(())
    }

    /// Stops kube-controller-manager, kube-apiserver and etcd in that order, each with SIGTERM
    /// (SIGKILL after 5 s), then removes the folder if [`ControlPlane::start`] created it.
    ///
    /// # Errors
    /// Fails if waiting for a component fails. The remaining components are then killed
    /// when `self` is dropped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(local) = &self.local {
            for component in local.components() {
                component.stop(STOP_GRACE).await?;
            }
        }
        Ok(())
    }

    fn local(&self, action: &str) -> anyhow::Result<&LocalComponents> {
        self.local.as_ref().with_context(|| {
            format!(
                "cannot {action}: attached to an existing cluster through {TEST_KUBECONFIG_ENV}; \
                 unset it to run this test against a local control plane"
            )
        })
    }

    /// Generates certificates and configuration in `dir`, then starts the three components.
    async fn launch(bin_dir: &Path, dir: &Path) -> anyhow::Result<Self> {
        let layout = Layout::create(dir)?;

        // Holding all listeners until every port is chosen keeps the three ports distinct.
        let listeners = (0..3)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()
            .context("failed to reserve free loopback ports")?;
        let ports = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|address| address.port()))
            .collect::<Result<Vec<_>, _>>()
            .context("failed to read a reserved port")?;
        drop(listeners);
        let (etcd_port, etcd_peer_port, apiserver_port) = (ports[0], ports[1], ports[2]);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let apiserver_url = format!("https://127.0.0.1:{apiserver_port}");

        let pki = Pki::write(&layout.pki)?;
        fs::write(&layout.kubeconfig, admin_kubeconfig(&apiserver_url, &pki))
            .with_context(|| format!("failed to write {}", layout.kubeconfig.display()))?;

        let etcd = Component::new(
            "etcd",
            bin_dir.join("etcd"),
            etcd_args(&layout, etcd_port, etcd_peer_port),
            layout.logs.join("etcd.log"),
        );
        let apiserver = Component::new(
            "kube-apiserver",
            bin_dir.join("kube-apiserver"),
            apiserver_args(&pki, &etcd_url, apiserver_port),
            layout.logs.join("kube-apiserver.log"),
        );
        let controller_manager = Component::new(
            "kube-controller-manager",
            bin_dir.join("kube-controller-manager"),
            controller_manager_args(&pki, &layout.kubeconfig),
            layout.logs.join("kube-controller-manager.log"),
        );
        let config = load_config(&layout.kubeconfig).await?;

        let control_plane = Self {
            kubeconfig_path: layout.kubeconfig,
            apiserver_url,
            ca_pem: pki.ca_pem,
            config,
            local: Some(LocalComponents {
                dir: dir.to_owned(),
                controller_manager,
                apiserver,
                etcd,
                etcd_url,
                temp_dir: None,
            }),
        };
        let started = Instant::now();
        control_plane.start_etcd().await?;
        control_plane.start_apiserver().await?;
        control_plane.start_controller_manager().await?;
        tracing::info!(
            url = %control_plane.apiserver_url,
            kubeconfig = %control_plane.kubeconfig_path.display(),
            logs = %layout.logs.display(),
            seconds = started.elapsed().as_secs_f64(),
            "control plane ready"
        );
        Ok(control_plane)
    }

    /// Kills the components and removes a temporary folder without waiting on other threads.
    fn kill_at_exit(&self) {
        let Some(local) = &self.local else {
            return;
        };
        for component in local.components() {
            component.kill_now();
        }
        if let Some(temp_dir) = &local.temp_dir
            && !temp_dir.path().join(KEEP_MARKER).exists()
        {
            let _ = fs::remove_dir_all(temp_dir.path());
        }
    }
}

impl LocalComponents {
    /// Returns the components in shutdown order.
    fn components(&self) -> [&Component; 3] {
        [&self.controller_manager, &self.apiserver, &self.etcd]
    }
}

/// Returns the shared control plane of this process, starting it on first use.
///
/// When [`TEST_KUBECONFIG_ENV`] is set, the shared value is attached to that cluster instead.
/// The components are killed and the folder removed when the process exits, because statics
/// are never dropped.
///
/// # Panics
/// Panics with the start error, on the first call and on every later call, if the control
/// plane failed to start.
pub async fn shared() -> &'static ControlPlane {
    let result = SHARED
        .get_or_init(|| async {
            let result = match env::var_os(TEST_KUBECONFIG_ENV) {
                Some(path) => ControlPlane::attach(Path::new(&path)).await,
                None => ControlPlane::start().await,
            };
            match result {
                Ok(control_plane) => {
                    register_exit_handler();
                    // Tests show this output only when they fail, which is when it helps.
                    match control_plane.log_dir() {
                        Some(log_dir) => eprintln!(
                            "acrpull-testkit: shared control plane at {}, kubeconfig {}, logs in {}",
                            control_plane.apiserver_url,
                            control_plane.kubeconfig_path.display(),
                            log_dir.display(),
                        ),
                        None => eprintln!(
                            "acrpull-testkit: attached to the cluster at {} through {}",
                            control_plane.apiserver_url,
                            control_plane.kubeconfig_path.display(),
                        ),
                    }
                    Ok(control_plane)
                }
                Err(error) => Err(format!("{error:#}")),
            }
        })
        .await;
    match result {
        Ok(control_plane) => control_plane,
        Err(message) => panic!("the shared control plane is not available: {message}"),
    }
}

static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

fn register_exit_handler() {
    extern "C" fn kill_shared_at_exit() {
        // Unwinding out of an `extern "C"` function aborts, so a panic is caught here.
        let _ = std::panic::catch_unwind(|| {
            if let Some(Ok(control_plane)) = SHARED.get() {
                control_plane.kill_at_exit();
            }
        });
    }
    // SAFETY: the handler is a plain function that does not unwind.
    if unsafe { libc::atexit(kill_shared_at_exit) } != 0 {
        tracing::warn!(
            "failed to register the exit handler; the shared control plane folder will be \
             removed by the next test process instead"
        );
    }
}

/// Polls `probe` every 200 ms until it returns `Ok(Some(value))`, for at most `timeout`.
///
/// Errors from `probe` count as "not yet", because a restarting API server fails requests
/// for a while. The last error is part of the timeout error.
///
/// # Errors
/// Fails with "timed out after N s waiting for `description`" and the last probe error.
pub async fn poll_until<T, F, Fut>(
    description: &str,
    timeout: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(error) => Some(error),
        };
        if Instant::now() >= deadline {
            let mut message = format!(
                "timed out after {} s waiting for {description}",
                timeout.as_secs()
            );
            if let Some(error) = last_error {
                let _ = write!(message, "; last error: {error:#}");
            }
            bail!(message);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `probe` until it returns `Ok(true)`, failing early if the component exits.
async fn wait_until_ready<F, Fut>(
    component: &Component,
    timeout: Duration,
    mut probe: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if let Some(status) = component.exit_status() {
            return Err(component.exited_error(status));
        }
        let last_error = match probe().await {
            Ok(true) => {
                tracing::info!(
                    component = component.name(),
                    seconds = started.elapsed().as_secs_f64(),
                    "control plane component ready"
                );
                return Ok(());
            }
            Ok(false) => None,
            Err(error) => Some(error),
        };
        if Instant::now() >= deadline {
            let last_error =
                last_error.map_or_else(|| "none".to_owned(), |error| format!("{error:#}"));
            bail!(
                "{} did not become ready within {} s; see {}. Last probe error: {last_error}. \
                 Last log lines:\n{}",
                component.name(),
                timeout.as_secs(),
                component.log_path().display(),
                component.log_tail(20)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Returns the folder with the control plane binaries: [`BIN_DIR_ENV`] if set, otherwise the
/// folder that `dev/build-control-plane.sh` prints after building them (once, then cached).
///
/// # Errors
/// Fails if the script fails (it needs the Go toolchain and access to the Go module proxy) or
/// if a binary is missing from the folder.
pub async fn find_binaries() -> anyhow::Result<PathBuf> {
    let bin_dir = match env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => build_binaries().await?,
    };
    for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        let path = bin_dir.join(binary);
        if !path.is_file() {
            bail!(
                "{binary} not found at {}; set {BIN_DIR_ENV} to a folder with etcd, \
                 kube-apiserver and kube-controller-manager, or unset it to build them with \
                 dev/build-control-plane.sh",
                path.display()
            );
        }
    }
    Ok(bin_dir)
}

async fn build_binaries() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dev/build-control-plane.sh")
        .canonicalize()
        .context("dev/build-control-plane.sh not found next to the testkit crate")?;
    tracing::info!(script = %script.display(), "finding or building the control plane binaries");
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("failed to run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}; its messages are on stderr above. Install Go, or set {BIN_DIR_ENV} \
             to a folder with prebuilt binaries",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bin_dir = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .with_context(|| format!("{} printed no binary folder", script.display()))?;
    Ok(PathBuf::from(bin_dir.trim()))
}

/// Paths inside a control plane folder.
struct Layout {
    kubeconfig: PathBuf,
    logs: PathBuf,
    pki: PathBuf,
    etcd_data: PathBuf,
}

impl Layout {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let layout = Self {
            kubeconfig: dir.join("kubeconfig"),
            logs: dir.join("logs"),
            pki: dir.join("pki"),
            etcd_data: dir.join("etcd-data"),
        };
        for folder in [&layout.logs, &layout.pki] {
            fs::create_dir_all(folder)
                .with_context(|| format!("failed to create {}", folder.display()))?;
        }
        Ok(layout)
    }
}

/// Certificate and key files of a control plane.
struct Pki {
    ca_pem: String,
    ca_path: PathBuf,
    serving_cert_path: PathBuf,
    serving_key_path: PathBuf,
    admin_cert_pem: String,
    admin_key_pem: String,
    service_account_private_key_path: PathBuf,
    service_account_public_key_path: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> anyhow::Result<Self> {
        let ca = TestCa::generate()?;
        let ca_path = ca.write_to(dir, "ca")?;
        let serving = ca
            .issue_server(
                &[
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
                &[
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V4(KUBERNETES_SERVICE_IP),
                ],
            )?
            .write_to(dir, "apiserver")?;
        let admin = ca.issue_client("acrpull-test-admin", &["system:masters"])?;
        admin.write_to(dir, "admin")?;
        let service_account = ServiceAccountKeys::generate()?.write_to(dir)?;
        Ok(Self {
            ca_pem: ca.cert_pem().to_owned(),
            ca_path,
            serving_cert_path: serving.cert_path,
            serving_key_path: serving.key_path,
            admin_cert_pem: admin.cert_pem,
            admin_key_pem: admin.key_pem,
            service_account_private_key_path: service_account.private_key_path,
            service_account_public_key_path: service_account.public_key_path,
        })
    }
}

fn etcd_args(layout: &Layout, port: u16, peer_port: u16) -> Vec<OsString> {
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut data_dir = OsString::from("--data-dir=");
    data_dir.push(&layout.etcd_data);
    vec![
        "--name=acrpull-test".into(),
        data_dir,
        format!("--listen-client-urls={client_url}").into(),
        format!("--advertise-client-urls={client_url}").into(),
        format!("--listen-peer-urls={peer_url}").into(),
        format!("--initial-advertise-peer-urls={peer_url}").into(),
        format!("--initial-cluster=acrpull-test={peer_url}").into(),
        // Losing the last writes on a crash does not matter for a throwaway test cluster.
        "--unsafe-no-fsync=true".into(),
    ]
}

fn apiserver_args(pki: &Pki, etcd_url: &str, port: u16) -> Vec<OsString> {
    let flag = |name: &str, path: &Path| {
        let mut argument = OsString::from(format!("--{name}="));
        argument.push(path);
        argument
    };
    vec![
        format!("--etcd-servers={etcd_url}").into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}").into(),
        // kube-apiserver 1.37 rejects a loopback advertise address for the default endpoint
        // reconciler, and no other member needs the `kubernetes` Endpoints here.
        "--advertise-address=127.0.0.1".into(),
        "--endpoint-reconciler-type=none".into(),
        flag("tls-cert-file", &pki.serving_cert_path),
        flag("tls-private-key-file", &pki.serving_key_path),
        flag("client-ca-file", &pki.ca_path),
        "--authorization-mode=RBAC".into(),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}").into(),
        "--allow-privileged=true".into(),
        // The issuer and keys make TokenRequest work. The ServiceAccount admission plugin stays
        // enabled (the default), because it copies a ServiceAccount's imagePullSecrets into
        // new Pods.
        format!("--service-account-issuer=https://127.0.0.1:{port}").into(),
        flag(
            "service-account-key-file",
            &pki.service_account_public_key_path,
        ),
        flag(
            "service-account-signing-key-file",
            &pki.service_account_private_key_path,
        ),
        "--profiling=false".into(),
    ]
}

fn controller_manager_args(pki: &Pki, kubeconfig: &Path) -> Vec<OsString> {
    let flag = |name: &str, path: &Path| {
        let mut argument = OsString::from(format!("--{name}="));
        argument.push(path);
        argument
    };
    vec![
        flag("kubeconfig", kubeconfig),
        "--leader-elect=false".into(),
        // No health or metrics endpoint is needed, so no port is opened.
        "--secure-port=0".into(),
        format!("--controllers={CONTROLLERS}").into(),
        flag(
            "service-account-private-key-file",
            &pki.service_account_private_key_path,
        ),
        flag("root-ca-file", &pki.ca_path),
    ]
}

fn admin_kubeconfig(apiserver_url: &str, pki: &Pki) -> String {
    let ca = BASE64.encode(&pki.ca_pem);
    let cert = BASE64.encode(&pki.admin_cert_pem);
    let key = BASE64.encode(&pki.admin_key_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: acrpull-test
  cluster:
    server: {apiserver_url}
    certificate-authority-data: {ca}
users:
- name: acrpull-test-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: acrpull-test
  context:
    cluster: acrpull-test
    user: acrpull-test-admin
current-context: acrpull-test
"
    )
}

async fn load_config(kubeconfig_path: &Path) -> anyhow::Result<kube::Config> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path)
        .with_context(|| format!("failed to read kubeconfig {}", kubeconfig_path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("invalid kubeconfig {}", kubeconfig_path.display()))
}

/// Installs the aws-lc-rs rustls provider as the process default.
///
/// Some dependencies enable rustls' ring provider too, and with two providers compiled in,
/// rustls cannot pick a default, so building a kube client would panic.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is all that is needed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn der_to_pem(der: &[u8]) -> String {
    let encoded = BASE64.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// File that marks a control plane folder to be kept, so [`remove_stale_dirs`] skips it.
const KEEP_MARKER: &str = ".keep";

/// Removes folders under `base` whose owning process (the number before the first `-`) has
/// exited, unless they contain [`KEEP_MARKER`].
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let owner_alive = Path::new("/proc").join(pid.to_string()).exists();
        if owner_alive || path.join(KEEP_MARKER).exists() {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale control plane folder"),
            Err(error) => {
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "failed to remove stale control plane folder"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_to_pem_wraps_at_64_columns() {
        let pem = der_to_pem(&[0xAB; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert_eq!(lines[1].len(), 64);
        assert_eq!(
            BASE64.decode(lines[1..lines.len() - 1].concat()).unwrap(),
            vec![0xAB; 100]
        );
    }

    #[test]
    fn stale_dirs_of_dead_processes_are_removed() {
        let base = tempfile::tempdir().unwrap();
        // Process ids are at most 2^22 on Linux, so this one never belongs to a live process.
        let dead = base.path().join("99999999-abc");
        let kept = base.path().join("99999998-abc");
        let alive = base.path().join(format!("{}-abc", std::process::id()));
        let unrelated = base.path().join("notes");
        for dir in [&dead, &kept, &alive, &unrelated] {
            fs::create_dir(dir).unwrap();
        }
        fs::write(kept.join(KEEP_MARKER), "").unwrap();

        remove_stale_dirs(base.path());

        assert!(!dead.exists());
        assert!(kept.exists());
        assert!(alive.exists());
        assert!(unrelated.exists());
    }

    #[test]
    fn kubeconfig_embeds_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::write(dir.path()).unwrap();
        let text = admin_kubeconfig("https://127.0.0.1:6443", &pki);
        let kubeconfig = Kubeconfig::from_yaml(&text).unwrap();

        assert_eq!(kubeconfig.current_context.as_deref(), Some("acrpull-test"));
        let cluster = kubeconfig.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        let ca = BASE64
            .decode(cluster.certificate_authority_data.as_ref().unwrap())
            .unwrap();
        assert_eq!(String::from_utf8(ca).unwrap(), pki.ca_pem);
    }
}
