//! Test harness: the real control plane, a fake Azure, and the `acrpull` binary as a child
//! process that serves only the bindings of one test.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use acrpull::crd::v1beta1::{AcrPullBinding, AcrPullBindingSpec};
use acrpull_testkit::control_plane::{self, ControlPlane, TestNamespace, poll_until};
use acrpull_testkit::fake_azure::{AccessRules, FakeAzure, FakeAzureConfig};
use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::OnceCell;

/// Label that ties a binding to the operator process of one test.
pub const TEST_LABEL: &str = "acrpull.test/run";

/// Identity the fake serves in most tests.
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

/// Resource ID of [`CLIENT_ID`]'s identity.
pub const RESOURCE_ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/puller";

/// Registry most tests bind to.
pub const REGISTRY: &str = "demo.azurecr.io";

/// Default time to wait for the operator to converge.
pub const CONVERGE: Duration = Duration::from_mins(1);

static CRDS: OnceCell<()> = OnceCell::const_new();

/// One test's world: its namespace, its fake Azure and its operator.
pub struct Harness {
    /// The shared control plane of this test binary.
    pub control_plane: &'static ControlPlane,
    /// Admin client.
    pub client: Client,
    /// The test's namespace.
    pub namespace: TestNamespace,
    /// The fake Azure this test's operator talks to.
    pub azure: FakeAzure,
    /// The running operator, if started.
    pub operator: Option<Operator>,
    /// Extra operator flags for this test.
    pub extra_args: Vec<String>,
}

impl Harness {
    /// Starts a namespace and a fake Azure that accepts everything, and the operator.
    pub async fn start(prefix: &str) -> Harness {
        Self::start_with(prefix, FakeAzureConfig::allow_all(), Vec::new()).await
    }

    /// Starts a namespace, a fake Azure with `config`, and the operator with `extra_args`.
    pub async fn start_with(
        prefix: &str,
        config: FakeAzureConfig,
        extra_args: Vec<String>,
    ) -> Harness {
        let mut harness = Self::without_operator(prefix, config).await;
        harness.extra_args = extra_args;
        harness.start_operator();
        harness
    }

    /// Starts a namespace and a fake Azure, but no operator.
    pub async fn without_operator(prefix: &str, config: FakeAzureConfig) -> Harness {
        let control_plane = control_plane::shared().await;
        let client = control_plane.client();
        install_crds(&client).await;
        let namespace = control_plane
            .namespace(prefix)
            .await
            .expect("test namespace");
        let azure = FakeAzure::start(config).await.expect("fake Azure starts");
        Harness {
            control_plane,
            client,
            namespace,
            azure,
            operator: None,
            extra_args: Vec::new(),
        }
    }

    /// Returns the test's namespace name.
    pub fn ns(&self) -> &str {
        self.namespace.name()
    }

    /// Starts (or restarts) the operator process.
    pub fn start_operator(&mut self) {
        self.operator = Some(self.spawn_operator());
    }

    /// Starts one more operator process for this test, owned by the caller.
    pub fn spawn_operator(&self) -> Operator {
        let mut args = self.azure.operator_args();
        args.extend([
            "--label-selector".to_owned(),
            format!("{TEST_LABEL}={}", self.ns()),
            "--health-probe-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ]);
        if !self.extra_args.iter().any(|arg| arg == "--metrics-addr") {
            args.extend(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        args.extend(self.extra_args.iter().cloned());
        let log = std::env::temp_dir().join(format!("acrpull-{}-{}.log", self.ns(), rand_suffix()));
        Operator::spawn(self.control_plane.kubeconfig_path().to_owned(), &args, log)
    }

    /// Stops the operator process and waits for it to exit.
    pub fn stop_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.stop();
        }
    }

    /// Returns the operator's log so far, for assertion messages.
    pub fn logs(&self) -> String {
        self.operator
            .as_ref()
            .map(Operator::logs)
            .unwrap_or_default()
    }

    /// Creates a binding labelled for this test's operator.
    pub async fn create_binding(&self, name: &str, spec: AcrPullBindingSpec) -> AcrPullBinding {
        let mut binding = AcrPullBinding::new(name, spec);
        binding.metadata.labels = Some(BTreeMap::from([(
            TEST_LABEL.to_owned(),
            self.ns().to_owned(),
        )]));
        self.bindings()
            .create(&PostParams::default(), &binding)
            .await
            .expect("binding is created")
    }

    /// Merges `spec` into the binding's spec.
    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        self.bindings()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await
            .expect("binding spec is patched");
    }

    /// Deletes a binding.
    pub async fn delete_binding(&self, name: &str) {
        self.bindings()
            .delete(name, &DeleteParams::default())
            .await
            .expect("binding delete is accepted");
    }

    pub fn bindings(&self) -> Api<AcrPullBinding> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    pub fn service_accounts(&self) -> Api<ServiceAccount> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    /// Creates a ServiceAccount with no imagePullSecrets.
    pub async fn create_service_account(&self, name: &str) -> ServiceAccount {
        let mut account = ServiceAccount::default();
        account.metadata.name = Some(name.to_owned());
        self.service_accounts()
            .create(&PostParams::default(), &account)
            .await
            .expect("ServiceAccount is created")
    }

    /// Waits until the binding's Secret exists and returns it.
    pub async fn wait_for_secret(&self, name: &str) -> Secret {
        let secrets = self.secrets();
        let name = name.to_owned();
        self.poll(&format!("Secret {name}"), CONVERGE, || {
            let secrets = secrets.clone();
            let name = name.clone();
            async move { Ok(secrets.get_opt(&name).await?) }
        })
        .await
    }

    /// Waits until `ServiceAccount` `account` lists `secret` in imagePullSecrets.
    pub async fn wait_for_reference(
        &self,
        account: &str,
        secret: &str,
        present: bool,
    ) -> ServiceAccount {
        let accounts = self.service_accounts();
        let (account, secret) = (account.to_owned(), secret.to_owned());
        let what = format!(
            "ServiceAccount {account} {} {secret}",
            if present { "to reference" } else { "to drop" }
        );
        self.poll(&what, CONVERGE, || {
            let accounts = accounts.clone();
            let (account, secret) = (account.clone(), secret.clone());
            async move {
                let found = accounts.get_opt(&account).await?;
                Ok(found.filter(|sa| references(sa, &secret) == present))
            }
        })
        .await
    }

    /// Waits until the binding satisfies `check` and returns it.
    pub async fn wait_for_binding(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&AcrPullBinding) -> bool + Clone,
    ) -> AcrPullBinding {
        let bindings = self.bindings();
        let name = name.to_owned();
        self.poll(&format!("binding {name} {what}"), CONVERGE, || {
            let bindings = bindings.clone();
            let name = name.clone();
            let check = check.clone();
            async move { Ok(bindings.get_opt(&name).await?.filter(|b| check(b))) }
        })
        .await
    }

    /// Waits until the binding's status has an error containing `fragment`.
    pub async fn wait_for_error(&self, name: &str, fragment: &str) -> AcrPullBinding {
        let fragment = fragment.to_owned();
        self.wait_for_binding(
            name,
            &format!("to report an error containing {fragment:?}"),
            move |b| status_error(b).is_some_and(|error| error.contains(&fragment)),
        )
        .await
    }

    /// Waits until the binding is Ready with no error.
    pub async fn wait_for_ready(&self, name: &str) -> AcrPullBinding {
        self.wait_for_binding(name, "to become Ready", |b| {
            is_ready(b) && status_error(b).is_none()
        })
        .await
    }

    /// Polls `probe` until it returns `Some`, failing the test with the operator log.
    pub async fn poll<T, F, Fut>(&self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        match poll_until(what, timeout, probe).await {
            Ok(value) => value,
            Err(error) => panic!(
                "{error:#}\n--- operator log ({}) ---\n{}",
                self.operator
                    .as_ref()
                    .map(|operator| operator.log.display().to_string())
                    .unwrap_or_default(),
                self.logs()
            ),
        }
    }
}

/// Returns whether the ServiceAccount lists the Secret.
pub fn references(account: &ServiceAccount, secret: &str) -> bool {
    account
        .image_pull_secrets
        .iter()
        .flatten()
        .any(|entry| entry.name == secret)
}

/// Returns the binding's `status.error`.
pub fn status_error(binding: &AcrPullBinding) -> Option<&str> {
    binding.status.as_ref()?.error.as_deref()
}

/// Returns whether the binding's Ready condition is True.
pub fn is_ready(binding: &AcrPullBinding) -> bool {
    binding.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Returns the Ready condition's reason.
pub fn ready_reason(binding: &AcrPullBinding) -> Option<String> {
    binding
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
}

/// Returns the password stored in a pull Secret.
pub fn secret_password(secret: &Secret, server: &str) -> String {
    let bytes = &secret.data.as_ref().expect("Secret has data")[".dockerconfigjson"].0;
    let json: serde_json::Value = serde_json::from_slice(bytes).expect(".dockerconfigjson is JSON");
    json["auths"][server]["password"]
        .as_str()
        .unwrap_or_else(|| panic!("no password for {server} in {json}"))
        .to_owned()
}

/// Returns a spec for [`REGISTRY`] with the test identity by client ID.
pub fn spec() -> AcrPullBindingSpec {
    AcrPullBindingSpec {
        acr_server: Some(REGISTRY.to_owned()),
        managed_identity_client_id: Some(CLIENT_ID.to_owned()),
        ..AcrPullBindingSpec::default()
    }
}

/// Returns fake Azure settings that accept everything with the given ACR token lifetimes.
pub fn azure_with_lifetime(lifetime: Duration) -> FakeAzureConfig {
    let mut config = FakeAzureConfig::allow_all();
    config.lifetimes.acr_refresh_token = lifetime;
    config.lifetimes.acr_access_token = lifetime;
    config
}

/// Returns fake Azure settings that know only the given rules.
pub fn azure_with_rules(rules: AccessRules) -> FakeAzureConfig {
    FakeAzureConfig::with_rules(rules)
}

async fn install_crds(client: &Client) {
    CRDS.get_or_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in acrpull::crd::definitions() {
            let name = crd.metadata.name.clone().expect("CRD has a name");
            api.patch(
                &name,
                &PatchParams::apply("acrpull-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("CRD applies");
            poll_until(&format!("CRD {name} to be established"), CONVERGE, || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            })
            .await
            .expect("CRD is established");
        }
    })
    .await;
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
}

/// The `acrpull` binary running as a child process.
pub struct Operator {
    /// The process; killed on drop.
    child: Child,
    /// File with the process's stdout and stderr.
    log: PathBuf,
}

impl Operator {
    fn spawn(kubeconfig: PathBuf, args: &[String], log: PathBuf) -> Operator {
        let out = File::create(&log).expect("operator log file");
        let err = out.try_clone().expect("operator log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_acrpull"));
        command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,acrpull=debug,acrpull_actors=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It makes the
        // kernel kill the operator when the spawning thread exits, even after a panic.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .context("failed to start the acrpull binary")
            .unwrap();
        Operator { child, log }
    }

    /// Returns the process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to 10 s, then kills.
    pub fn stop(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Returns the log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test keeps the log for inspection; its path is in the failure message.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
