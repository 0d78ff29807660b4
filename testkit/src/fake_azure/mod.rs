//! A fake Azure on loopback: IMDS, the Entra ID token endpoint and the ACR token endpoints.
//!
//! [`FakeAzure::start`] binds three listeners on 127.0.0.1:
//!
//! - plain HTTP, like the real IMDS: `GET /metadata/identity/oauth2/token`, plus the JSON admin
//!   API under `/admin` (see below);
//! - HTTPS for Entra ID: `POST /{tenant}/oauth2/v2.0/token`;
//! - HTTPS for ACR: `POST /oauth2/exchange`, `POST /oauth2/token` and `GET /v2/`. Every registry
//!   host name should resolve to [`FakeAzure::acr_addr`].
//!
//! The HTTPS certificate comes from a fresh test CA and covers `localhost`, 127.0.0.1, `::1`,
//! `*.azurecr.io`, `*.azurecr.us`, `*.azurecr.cn` and [`FakeAzureConfig::extra_dns_names`].
//!
//! Tokens are JWT-shaped and carry `exp`, `iat`, `nbf`, `tid` or `tenant`, `aud` and identity
//! claims. [`AccessRules`] decide which identity may use which registry and scope. Tests can add
//! latency, inject failures and read call counters, from Rust or through the admin API:
//!
//! | request | effect |
//! |---|---|
//! | `GET /admin/state` | URLs, ports, CA file and operator flags ([`FakeAzureInfo`]) |
//! | `GET /admin/calls` | `{"totals": {endpoint: {"calls", "tokens_issued"}}, "calls": [CallCount]}` |
//! | `DELETE /admin/calls` | resets the counters |
//! | `GET /admin/failures` | pending failures ([`PendingFailure`]) |
//! | `POST /admin/failures` | adds one, e.g. `{"endpoint": "acr_token", "kind": "status", "status": 503, "times": 2}` |
//! | `DELETE /admin/failures` | drops every pending failure |
//! | `GET`, `PUT` or `POST /admin/rules` | reads or replaces the [`AccessRules`] |
//! | `GET /admin/latency`, `POST /admin/latency` | per endpoint, e.g. `{"endpoint": "imds", "millis": 250}` |
//! | `GET /admin/lifetimes`, `POST /admin/lifetimes` | e.g. `{"kind": "acr_refresh_token", "seconds": 600}` |
//!
//! Endpoint names are `imds`, `entra_token`, `acr_exchange` and `acr_token`. Failure kinds are
//! `status` (`status`, optional `retry_after_secs`), `throttle` (`retry_after_secs`), `hang`,
//! `invalid_json` and `missing_fields`, each with optional `times` (default 1), `identity` and
//! `registry` filters.

mod acr;
mod admin;
mod common;
mod control;
mod entra;
mod imds;
mod rules;
mod server;
mod tokens;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

pub use control::{CallCount, Endpoint, Failure, FailureKind, PendingFailure};
pub use rules::{AccessRules, IdentityRule, RegistryGrant};
pub use tokens::{TokenKind, TokenLifetimes, decode_claims};

use control::{CallCounters, FailureQueue};
use tokens::TokenSigner;

use crate::pki::TestCa;

/// The tenant ID the fake uses when an identity names none.
pub const DEFAULT_TENANT_ID: &str = "5b0e6f0a-3c1d-4e2f-8a9b-0c1d2e3f4a5b";

/// The `ServiceAccount` token audience that acrpull requests for workload identity.
pub const ACR_TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureCRTokenExchange";

/// Registry host name patterns the HTTPS certificate always covers.
pub const REGISTRY_DNS_NAMES: [&str; 3] = ["*.azurecr.io", "*.azurecr.us", "*.azurecr.cn"];

/// The acrpull flags that point every Azure endpoint at a fake.
pub const OPERATOR_ENDPOINT_FLAGS: [&str; 4] = [
    "--imds-endpoint",
    "--entra-authority-host",
    "--acr-address",
    "--extra-ca-file",
];

/// Settings for [`FakeAzure::start`].
#[derive(Clone, Debug)]
pub struct FakeAzureConfig {
    /// Port of the plain HTTP listener (IMDS and admin API). 0 picks a free port.
    pub imds_port: u16,
    /// Port of the Entra ID HTTPS listener. 0 picks a free port.
    pub entra_port: u16,
    /// Port of the ACR HTTPS listener. 0 picks a free port.
    pub acr_port: u16,
    /// The known identities and their access to registries.
    pub rules: AccessRules,
    /// Token lifetimes.
    pub lifetimes: TokenLifetimes,
    /// The tenant for identities that name none.
    pub tenant_id: String,
    /// Client assertion audiences the Entra ID endpoint accepts.
    pub assertion_audiences: Vec<String>,
    /// DNS names the HTTPS certificate covers besides `localhost` and [`REGISTRY_DNS_NAMES`].
    pub extra_dns_names: Vec<String>,
    /// The file to write the CA certificate PEM to. `None` writes it into a temporary directory
    /// that lives as long as the [`FakeAzure`].
    pub ca_file: Option<PathBuf>,
}

impl Default for FakeAzureConfig {
    fn default() -> Self {
        Self {
            imds_port: 0,
            entra_port: 0,
            acr_port: 0,
            rules: AccessRules::default(),
            lifetimes: TokenLifetimes::default(),
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            assertion_audiences: vec![ACR_TOKEN_EXCHANGE_AUDIENCE.to_owned()],
            extra_dns_names: Vec::new(),
            ca_file: None,
        }
    }
}

impl FakeAzureConfig {
    /// Returns the default settings with rules that accept everything.
    #[must_use]
    pub fn allow_all() -> Self {
        Self {
            rules: AccessRules::allow_all(),
            ..Self::default()
        }
    }

    /// Returns the default settings with the given rules.
    #[must_use]
    pub fn with_rules(rules: AccessRules) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }
}

/// The addresses of a running fake, as the admin API and the `--state-file` of
/// `acrpull-fake-azure` report them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeAzureInfo {
    /// Base URL of IMDS, such as `http://127.0.0.1:40001`, in place of `http://169.254.169.254`.
    pub imds_url: String,
    /// Base URL of the admin API, the same listener as IMDS.
    pub admin_url: String,
    /// Entra ID authority host, such as `https://127.0.0.1:40002`.
    pub entra_authority_url: String,
    /// The address every registry host name should resolve to.
    pub acr_address: SocketAddr,
    /// The CA certificate PEM file that HTTPS clients must trust.
    pub ca_file: PathBuf,
    /// The tenant for identities that name none.
    pub tenant_id: String,
    /// acrpull flags that point every Azure endpoint at this fake.
    pub operator_args: Vec<String>,
}

/// State shared by every handler.
pub(crate) struct Shared {
    rules: RwLock<AccessRules>,
    failures: Mutex<FailureQueue>,
    counters: Mutex<CallCounters>,
    latency: Mutex<HashMap<Endpoint, Duration>>,
    lifetimes: Mutex<TokenLifetimes>,
    signer: TokenSigner,
    tenant_id: String,
    assertion_audiences: Vec<String>,
    info: FakeAzureInfo,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn rules(&self) -> AccessRules {
        self.rules.read().expect("rules lock poisoned").clone()
    }

    fn set_rules(&self, rules: AccessRules) {
        *self.rules.write().expect("rules lock poisoned") = rules;
    }

    fn latency(&self, endpoint: Endpoint) -> Duration {
        self.latency
            .lock()
            .expect("latency lock poisoned")
            .get(&endpoint)
            .copied()
            .unwrap_or_default()
    }

    fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.latency
            .lock()
            .expect("latency lock poisoned")
            .insert(endpoint, latency);
    }

    fn lifetimes(&self) -> TokenLifetimes {
        *self.lifetimes.lock().expect("lifetimes lock poisoned")
    }

    fn lifetime(&self, kind: TokenKind) -> Duration {
        self.lifetimes().get(kind)
    }

    fn set_lifetime(&self, kind: TokenKind, lifetime: Duration) {
        self.lifetimes
            .lock()
            .expect("lifetimes lock poisoned")
            .set(kind, lifetime);
    }

    fn inject_failure(&self, endpoint: Endpoint, failure: Failure) -> anyhow::Result<()> {
        failure
            .validate()
            .with_context(|| format!("invalid failure for endpoint {endpoint}"))?;
        info!(%endpoint, ?failure, "queued an injected failure");
        self.failures
            .lock()
            .expect("failure queue lock poisoned")
            .push(endpoint, failure);
        Ok(())
    }

    fn pending_failures(&self) -> Vec<PendingFailure> {
        self.failures
            .lock()
            .expect("failure queue lock poisoned")
            .list()
    }

    fn clear_failures(&self) {
        self.failures
            .lock()
            .expect("failure queue lock poisoned")
            .clear();
    }

    fn call_counts(&self) -> Vec<CallCount> {
        self.counters
            .lock()
            .expect("call counter lock poisoned")
            .snapshot()
    }

    fn reset_counters(&self) {
        self.counters
            .lock()
            .expect("call counter lock poisoned")
            .clear();
    }

    /// Waits until the fake stops, for requests that an injected failure holds.
    async fn wait_for_shutdown(&self) {
        let mut receiver = self.shutdown.subscribe();
        // An error means the sender is gone, which also means the fake is stopping.
        let _ = receiver.wait_for(|stop| *stop).await;
    }
}

/// A running fake Azure. Dropping it stops every listener and drops open connections.
pub struct FakeAzure {
    shared: Arc<Shared>,
    ca_pem: String,
    tasks: JoinSet<()>,
    _ca_dir: Option<tempfile::TempDir>,
}

impl FakeAzure {
    /// Generates a test CA and server certificate, binds the three listeners on 127.0.0.1 and
    /// starts serving.
    ///
    /// # Errors
    /// Fails if a port is in use, if certificate generation fails, or if the CA file cannot be
    /// written.
    pub async fn start(config: FakeAzureConfig) -> anyhow::Result<FakeAzure> {
        let ca = TestCa::generate().context("failed to generate the fake Azure test CA")?;
        let mut dns_names: Vec<&str> = vec!["localhost"];
        dns_names.extend(REGISTRY_DNS_NAMES);
        dns_names.extend(config.extra_dns_names.iter().map(String::as_str));
        let server_cert = ca
            .issue_server(
                &dns_names,
                &[
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
            )
            .context("failed to issue the fake Azure server certificate")?;
        let acceptor = server::tls_acceptor(&server_cert)?;

        let (ca_file, ca_dir) = write_ca_file(config.ca_file.as_deref(), ca.cert_pem())?;

        let imds_listener = bind(config.imds_port, "IMDS").await?;
        let entra_listener = bind(config.entra_port, "Entra ID").await?;
        let acr_listener = bind(config.acr_port, "ACR").await?;
        let imds_addr = imds_listener
            .local_addr()
            .context("failed to read the IMDS address")?;
        let entra_addr = entra_listener
            .local_addr()
            .context("failed to read the Entra ID address")?;
        let acr_address = acr_listener
            .local_addr()
            .context("failed to read the ACR address")?;

        let mut info = FakeAzureInfo {
            imds_url: format!("http://{imds_addr}"),
            admin_url: format!("http://{imds_addr}/admin"),
            entra_authority_url: format!("https://{entra_addr}"),
            acr_address,
            ca_file,
            tenant_id: config.tenant_id.clone(),
            operator_args: Vec::new(),
        };
        info.operator_args = operator_args_for(&info);

        let (shutdown, shutdown_receiver) = watch::channel(false);
        let shared = Arc::new(Shared {
            rules: RwLock::new(config.rules),
            failures: Mutex::new(FailureQueue::default()),
            counters: Mutex::new(CallCounters::default()),
            latency: Mutex::new(HashMap::new()),
            lifetimes: Mutex::new(config.lifetimes),
            signer: TokenSigner::new(),
            tenant_id: config.tenant_id,
            assertion_audiences: config.assertion_audiences,
            info,
            shutdown,
        });

        let (imds_router, entra_router, acr_router) = routers(&shared);

        let mut tasks = JoinSet::new();
        tasks.spawn(server::serve(
            "imds",
            imds_listener,
            None,
            imds_router,
            shutdown_receiver.clone(),
        ));
        tasks.spawn(server::serve(
            "entra",
            entra_listener,
            Some(acceptor.clone()),
            entra_router,
            shutdown_receiver.clone(),
        ));
        tasks.spawn(server::serve(
            "acr",
            acr_listener,
            Some(acceptor),
            acr_router,
            shutdown_receiver,
        ));
        info!(
            imds = %shared.info.imds_url,
            entra = %shared.info.entra_authority_url,
            acr = %shared.info.acr_address,
            ca_file = %shared.info.ca_file.display(),
            "fake Azure started"
        );

        Ok(FakeAzure {
            shared,
            ca_pem: ca.cert_pem().to_owned(),
            tasks,
            _ca_dir: ca_dir,
        })
    }

    /// Stops every listener, responds 503 to held requests and waits for the listeners to end.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        info!("fake Azure stopped");
    }

    /// Returns the addresses of the fake.
    #[must_use]
    pub fn info(&self) -> &FakeAzureInfo {
        &self.shared.info
    }

    /// Returns the IMDS base URL, such as `http://127.0.0.1:40001`, which replaces
    /// `http://169.254.169.254`.
    #[must_use]
    pub fn imds_url(&self) -> &str {
        &self.shared.info.imds_url
    }

    /// Returns the admin API base URL, such as `http://127.0.0.1:40001/admin`.
    #[must_use]
    pub fn admin_url(&self) -> &str {
        &self.shared.info.admin_url
    }

    /// Returns the Entra ID authority host URL, such as `https://127.0.0.1:40002`.
    #[must_use]
    pub fn entra_authority_url(&self) -> &str {
        &self.shared.info.entra_authority_url
    }

    /// Returns the address every registry host name should resolve to.
    #[must_use]
    pub fn acr_addr(&self) -> SocketAddr {
        self.shared.info.acr_address
    }

    /// Returns the CA certificate PEM that HTTPS clients must trust.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Returns the path of the file that contains [`FakeAzure::ca_pem`].
    #[must_use]
    pub fn ca_file(&self) -> &Path {
        &self.shared.info.ca_file
    }

    /// Returns the tenant for identities that name none.
    #[must_use]
    pub fn tenant_id(&self) -> &str {
        &self.shared.tenant_id
    }

    /// Returns the acrpull flags that point every Azure endpoint at this fake:
    /// `--imds-endpoint`, `--entra-authority-host`, `--acr-address` and `--extra-ca-file`.
    #[must_use]
    pub fn operator_args(&self) -> Vec<String> {
        self.shared.info.operator_args.clone()
    }

    /// Returns the current access rules.
    #[must_use]
    pub fn rules(&self) -> AccessRules {
        self.shared.rules()
    }

    /// Replaces the access rules. Requests from then on are checked against the new rules.
    pub fn set_rules(&self, rules: AccessRules) {
        self.shared.set_rules(rules);
    }

    /// Queues a failure for the next matching requests to `endpoint`. Failures apply in the
    /// order they were queued.
    ///
    /// # Errors
    /// Fails if `failure.times` is 0 or a status failure's status is outside 400 to 599.
    pub fn inject_failure(&self, endpoint: Endpoint, failure: Failure) -> anyhow::Result<()> {
        self.shared.inject_failure(endpoint, failure)
    }

    /// Returns the queued failures that have not been used up.
    #[must_use]
    pub fn pending_failures(&self) -> Vec<PendingFailure> {
        self.shared.pending_failures()
    }

    /// Drops every queued failure.
    pub fn clear_failures(&self) {
        self.shared.clear_failures();
    }

    /// Sets how long `endpoint` waits before it responds. Zero removes the delay.
    pub fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.shared.set_latency(endpoint, latency);
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_lifetime(&self, kind: TokenKind, lifetime: Duration) {
        self.shared.set_lifetime(kind, lifetime);
    }

    /// Returns the number of requests to `endpoint`, including rejected ones and injected
    /// failures.
    #[must_use]
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        self.sum(|count| count.endpoint == endpoint, |count| count.calls)
    }

    /// Returns the number of requests to `endpoint` from `identity`, as
    /// [`CallCount::identity`] describes it.
    #[must_use]
    pub fn calls_for(&self, endpoint: Endpoint, identity: &str) -> u64 {
        self.sum(
            |count| count.endpoint == endpoint && count.identity == identity,
            |count| count.calls,
        )
    }

    /// Returns the number of requests to an ACR `endpoint` for `registry`.
    #[must_use]
    pub fn calls_for_registry(&self, endpoint: Endpoint, registry: &str) -> u64 {
        self.sum(
            |count| {
                count.endpoint == endpoint
                    && count
                        .registry
                        .as_deref()
                        .is_some_and(|name| name.eq_ignore_ascii_case(registry))
            },
            |count| count.calls,
        )
    }

    /// Returns the number of tokens `endpoint` issued.
    #[must_use]
    pub fn tokens_issued(&self, endpoint: Endpoint) -> u64 {
        self.sum(
            |count| count.endpoint == endpoint,
            |count| count.tokens_issued,
        )
    }

    /// Returns every counter, by endpoint, identity and registry.
    #[must_use]
    pub fn call_counts(&self) -> Vec<CallCount> {
        self.shared.call_counts()
    }

    /// Sets every counter back to zero.
    pub fn reset_counters(&self) {
        self.shared.reset_counters();
    }

    fn sum(&self, filter: impl Fn(&CallCount) -> bool, value: impl Fn(&CallCount) -> u64) -> u64 {
        self.shared
            .call_counts()
            .iter()
            .filter(|count| filter(count))
            .map(value)
            .sum()
    }
}

impl Drop for FakeAzure {
    fn drop(&mut self) {
        // Held requests see the flag; the listener tasks are aborted when `tasks` drops.
        self.shared.shutdown.send_replace(true);
    }
}

/// Writes the CA certificate to `path`, or into a new temporary directory when `path` is `None`,
/// and returns the file path and the directory to keep alive.
fn write_ca_file(
    path: Option<&Path>,
    ca_pem: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let (ca_file, ca_dir) = if let Some(path) = path {
        (path.to_path_buf(), None)
    } else {
        let dir = tempfile::tempdir()
            .context("failed to create a temporary directory for the fake Azure CA")?;
        (dir.path().join("fake-azure-ca.crt"), Some(dir))
    };
    std::fs::write(&ca_file, ca_pem)
        .with_context(|| format!("failed to write the fake Azure CA to {}", ca_file.display()))?;
    // The operator may run in another directory, so the flags carry an absolute path.
    let ca_file = std::path::absolute(&ca_file)
        .with_context(|| format!("failed to make {} absolute", ca_file.display()))?;
    Ok((ca_file, ca_dir))
}

/// Builds the routers of the plain HTTP (IMDS and admin), Entra ID and ACR listeners.
fn routers(shared: &Arc<Shared>) -> (Router, Router, Router) {
    let imds = Router::new()
        .route("/metadata/identity/oauth2/token", get(imds::token))
        .merge(admin::routes())
        .fallback(not_found)
        .with_state(Arc::clone(shared));
    let entra = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(entra::token))
        .fallback(not_found)
        .with_state(Arc::clone(shared));
    let acr = Router::new()
        .route("/oauth2/exchange", post(acr::exchange))
        .route("/oauth2/token", post(acr::token))
        .route("/v2/", get(acr::challenge))
        .fallback(not_found)
        .with_state(Arc::clone(shared));
    (imds, entra, acr)
}

/// Builds the acrpull flags for a fake listening at the addresses in `info`.
fn operator_args_for(info: &FakeAzureInfo) -> Vec<String> {
    let values = [
        info.imds_url.clone(),
        info.entra_authority_url.clone(),
        info.acr_address.to_string(),
        info.ca_file.display().to_string(),
    ];
    OPERATOR_ENDPOINT_FLAGS
        .iter()
        .zip(values)
        .flat_map(|(flag, value)| [(*flag).to_owned(), value])
        .collect()
}

async fn bind(port: u16, name: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| {
            format!("failed to bind the fake {name} listener to 127.0.0.1:{port}; pick a free port or pass 0")
        })
}

async fn not_found() -> axum::response::Response {
    common::json_response(
        axum::http::StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not_found", "error_description": "no such endpoint on the fake Azure"}),
    )
}
