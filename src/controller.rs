//! Wires the adapters to the actor system and runs the controller until a signal stops it.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tracing::{info, warn};

use acrpull_actors::event::BindingEvent;
use acrpull_actors::model::BindingKey;
use acrpull_actors::spec::{Defaults, RegistryPolicy};
use acrpull_actors::{ActorSystem, SystemConfig};

use crate::azure::AzureTokenSource;
use crate::azure::endpoints::AzureEndpoints;
use crate::cli::{ControllerArgs, LogFormat};
use crate::cluster::watch::{self, EventSink, WatchConfig};
use crate::cluster::writer::{BindingDirectory, KubeWriter};
use crate::crd::v1beta1::AcrPullBinding;
use crate::leader::{self, Leadership};
use crate::{health, metrics};

/// Page size of the initial lists; bounds the memory a relist needs.
const LIST_PAGE_SIZE: u32 = 500;

/// Runs the controller until SIGTERM or SIGINT.
///
/// # Errors
/// Returns an error when the Kubernetes client, the Azure clients or the health endpoint
/// cannot be set up.
///
/// # Panics
/// Panics when the Tokio runtime cannot be built (the operating system refused threads).
pub fn run(args: &ControllerArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    install_crypto_provider();

    // A multi-thread Tokio runtime under actix: actors run on the System's arbiter, while
    // watches and HTTP calls may use every core.
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("failed to build the Tokio runtime")
    });
    system.block_on(run_async(args))
}

async fn run_async(args: &ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.context(
        "failed to create the Kubernetes client; check KUBECONFIG or the in-cluster ServiceAccount",
    )?;
    check_api(&client, args.label_selector.as_deref()).await?;

    let (ready_tx, ready_rx) = signal::channel(false);
    let (stop_tx, stop_rx) = signal::channel(false);
    let health = tokio::spawn(health::serve(
        listen(
            args.health_probe_addr,
            "health probes (--health-probe-addr)",
        )
        .await?,
        ready_rx,
        wait_for(stop_rx.clone()),
    ));
    let mut shutdown = std::pin::pin!(shutdown_signal());

    let mut leadership = None;
    if args.enable_leader_election {
        let namespace = leader::lease_namespace(args.leader_election_namespace.as_deref());
        let mut lease = Leadership::start(client.clone(), &namespace, &leader::identity()).await?;
        // A standby replica is healthy and ready: it takes over when the leader goes.
        let _ = ready_tx.send(true);
        tokio::select! {
            () = lease.acquired() => {}
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                return Ok(());
            }
        }
        let _ = ready_tx.send(false);
        leadership = Some(lease);
    }

    let directory = BindingDirectory::default();
    let actors = start_actors(args, &client, &directory)?;
    let watch_config = watch_config(args);
    let metrics = tokio::spawn(metrics::serve(
        listen(args.metrics_addr, "metrics (--metrics-addr)").await?,
        actors.clone(),
        wait_for(stop_rx),
    ));

    let watches = tokio::spawn(watch::run(
        client,
        watch_config,
        directory,
        Sink(actors.clone()),
        ready_tx,
    ));
    info!("controller started");

    let lost_leadership = async {
        match &mut leadership {
            Some(lease) => lease.lost().await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        () = lost_leadership => Err(anyhow::anyhow!(
            "lost the leader election Lease {}; exiting so that Kubernetes restarts this replica as a standby",
            leader::LEASE_NAME
        )),
    };

    info!("shutting down: stopping watches, then draining queued writes");
    watches.abort();
    let _ = stop_tx.send(true);
    actors.shutdown().await;
    for (endpoint, task) in [("health", health), ("metrics", metrics)] {
        match task.await {
            Ok(Err(error)) => warn!(endpoint, %error, "endpoint failed"),
            Err(error) if !error.is_cancelled() => warn!(endpoint, %error, "endpoint task failed"),
            _ => {}
        }
    }
    if let Some(lease) = leadership {
        lease.release().await;
    }
    info!("controller stopped");
    outcome
}

/// Builds the Azure and Kubernetes adapters and starts the actor system on them.
fn start_actors(
    args: &ControllerArgs,
    client: &Client,
    directory: &BindingDirectory,
) -> anyhow::Result<ActorSystem> {
    let endpoints = AzureEndpoints {
        imds_endpoint: args.azure.imds_endpoint.clone(),
        entra_authority_host: args.azure.entra_authority_host.clone(),
        arm_resource: args.azure.arm_resource.clone(),
        acr_address: args.azure.acr_address,
        extra_ca_file: args.azure.extra_ca_file.clone(),
        request_timeout: args.azure.azure_request_timeout,
    };
    let token_source =
        AzureTokenSource::new(endpoints).context("failed to set up the Azure clients")?;

    let reporter = Reporter {
        controller: "acrpull".to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let writer = KubeWriter::new(
        client.clone(),
        directory.clone(),
        Recorder::new(client.clone(), reporter),
    );

    let mut config = SystemConfig::default();
    config.decide.refresh.margin = args.refresh_margin;
    config.writer.qps = args.writer_qps;
    config.writer.burst = args.writer_burst;
    ActorSystem::start(config, Arc::new(token_source), Arc::new(writer))
        .context("invalid controller settings")
}

/// Returns the watch settings from the flags.
fn watch_config(args: &ControllerArgs) -> WatchConfig {
    WatchConfig {
        binding_selector: args.label_selector.clone(),
        defaults: Defaults {
            acr_server: args.default_acr_server.clone(),
            managed_identity_resource_id: args.default_managed_identity_resource_id.clone(),
            managed_identity_client_id: args.default_managed_identity_client_id.clone(),
        },
        policy: RegistryPolicy {
            allowed_suffixes: args
                .allowed_acr_server_suffixes
                .iter()
                .map(|suffix| suffix.trim().to_owned())
                .filter(|suffix| !suffix.is_empty())
                .collect(),
        },
        page_size: LIST_PAGE_SIZE,
    }
}

/// Lists one AcrPullBinding, so that a missing CRD, an invalid label selector or missing RBAC
/// stops start-up with the fix instead of a watch that retries forever.
async fn check_api(client: &Client, selector: Option<&str>) -> anyhow::Result<()> {
    let api: Api<AcrPullBinding> = Api::all(client.clone());
    let mut params = ListParams::default().limit(1);
    if let Some(selector) = selector {
        params = params.labels(selector);
    }

    match api.list_metadata(&params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(anyhow::anyhow!(
            "the AcrPullBinding CRD (acrpullbindings.msi-acrpull.microsoft.com) is not installed; \
             apply deploy/latest/crd.yaml or the output of `acrpull crd`"
        )),
        Err(kube::Error::Api(status)) if status.code == 400 => Err(anyhow::anyhow!(
            "invalid --label-selector {:?}: {}",
            selector.unwrap_or_default(),
            status.message
        )),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(anyhow::anyhow!(
            "the controller may not list AcrPullBindings ({}); apply the RBAC rules in deploy/latest/deploy.yaml",
            status.message
        )),
        Err(error) => Err(error).context(
            "failed to list AcrPullBindings at start-up; check that the API server is reachable",
        ),
    }
}

/// Binds a listening socket, with an error that names the flag to change.
async fn listen(addr: SocketAddr, purpose: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("failed to listen on {addr} for {purpose}; choose another address")
    })
}

/// Delivers watch events to the actor system.
#[derive(Clone)]
struct Sink(ActorSystem);

impl EventSink for Sink {
    fn deliver(&self, key: BindingKey, event: BindingEvent) {
        self.0.deliver(key, event);
    }
}

async fn wait_for(mut stop: signal::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("failed to install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("received SIGINT"),
        _ = terminate.recv() => info!("received SIGTERM"),
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider. kube and reqwest both link rustls;
/// without an explicit choice, building a client panics.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;

    // azure_core logs each failed attempt with the metadata-service URL as azure_identity built
    // it (169.254.169.254), before the transport redirects it, so its lines would mislead
    // whenever --imds-endpoint is set. The controller logs every final failure itself.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,azure_core=error,azure_identity=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
