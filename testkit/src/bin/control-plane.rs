//! `acrpull-control-plane`: runs a local Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager) until SIGTERM or SIGINT, for the demo and manual testing.
//!
//! ```text
//! acrpull-control-plane --dir /tmp/cp &
//! while [ ! -e /tmp/cp/ready ]; do sleep 1; done
//! kubectl --kubeconfig /tmp/cp/kubeconfig get namespaces
//! ```

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use acrpull_testkit::control_plane::ControlPlane;
use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Runs a local Kubernetes control plane until SIGTERM or SIGINT.
#[derive(Parser)]
#[command(name = "acrpull-control-plane", version)]
struct Args {
    /// Folder for the admin kubeconfig (`DIR/kubeconfig`), the `DIR/ready` marker, component
    /// logs (`DIR/logs/`), certificates and etcd data. Earlier contents are replaced.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "control plane failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let ready_path = args.dir.join("ready");
    if ready_path.exists() {
        fs::remove_file(&ready_path)
            .with_context(|| format!("failed to remove {}", ready_path.display()))?;
    }
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;

    let control_plane = ControlPlane::start_in(&args.dir).await?;
    // The marker goes last, so a waiting script can use the kubeconfig as soon as it appears.
    fs::write(&ready_path, format!("{}\n", control_plane.apiserver_url()))
        .with_context(|| format!("failed to write {}", ready_path.display()))?;
    tracing::info!(
        url = control_plane.apiserver_url(),
        kubeconfig = %control_plane.kubeconfig_path().display(),
        logs = %control_plane.log_dir().unwrap_or_default().display(),
        "control plane running; send SIGTERM or SIGINT to stop it"
    );

    let mut health_check = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = health_check.tick() => {
                if let Err(error) = control_plane.check_running() {
                    break Err(error);
                }
            }
        }
    };

    // The marker goes first, so waiting scripts see that the cluster is going away.
    let _ = fs::remove_file(&ready_path);
    match outcome {
        Ok(signal_name) => {
            tracing::info!(signal = signal_name, "stopping the control plane");
            control_plane.shutdown().await?;
            tracing::info!("control plane stopped");
            Ok(())
        }
        Err(error) => {
            tracing::error!("a component exited; stopping the rest of the control plane");
            control_plane.shutdown().await?;
            Err(error)
        }
    }
}
