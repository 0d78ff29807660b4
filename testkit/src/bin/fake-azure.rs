//! `acrpull-fake-azure`: runs the fake Azure (IMDS, Entra ID and ACR token endpoints) on
//! 127.0.0.1 until SIGTERM or SIGINT, for the local demo and black-box tests of `acrpull`.
//!
//! Once listening it writes the CA certificate to `--ca-file`, writes its URLs and the acrpull
//! flags as JSON to `--state-file`, and prints the acrpull flags on standard output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use acrpull_testkit::fake_azure::{
    AccessRules, DEFAULT_TENANT_ID, FakeAzure, FakeAzureConfig, TokenLifetimes,
};
use anyhow::{Context as _, bail};
use clap::Parser;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Runs a fake Azure on 127.0.0.1: IMDS and the admin API over HTTP, and the Entra ID and ACR
/// token endpoints over HTTPS.
#[derive(Parser, Debug)]
#[command(name = "acrpull-fake-azure", version)]
struct Args {
    /// Port of the plain HTTP listener for IMDS and the admin API; 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    imds_port: u16,

    /// Port of the Entra ID HTTPS listener; 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    entra_port: u16,

    /// Port of the ACR HTTPS listener that serves every registry host name; 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    acr_port: u16,

    /// Access rules file, JSON (`.json`) or YAML (any other name).
    #[arg(
        long,
        conflicts_with = "allow_all",
        required_unless_present = "allow_all"
    )]
    rules: Option<PathBuf>,

    /// Accept every identity, tenant, registry and scope instead of reading a rules file.
    #[arg(long)]
    allow_all: bool,

    /// Tenant ID for identities whose rule names none.
    #[arg(long, default_value = DEFAULT_TENANT_ID)]
    tenant_id: String,

    /// Lifetime of IMDS access tokens, in seconds.
    #[arg(long, value_name = "SECONDS")]
    imds_token_lifetime: Option<u64>,

    /// Lifetime of Entra ID access tokens, in seconds.
    #[arg(long, value_name = "SECONDS")]
    entra_token_lifetime: Option<u64>,

    /// Lifetime of ACR refresh tokens, in seconds.
    #[arg(long, value_name = "SECONDS")]
    acr_refresh_token_lifetime: Option<u64>,

    /// Lifetime of ACR access tokens, in seconds.
    #[arg(long, value_name = "SECONDS")]
    acr_access_token_lifetime: Option<u64>,

    /// Another DNS name for the HTTPS certificate, besides `localhost`, `*.azurecr.io`,
    /// `*.azurecr.us` and `*.azurecr.cn`; repeat for more names.
    #[arg(long = "extra-dns-name", value_name = "NAME")]
    extra_dns_names: Vec<String>,

    /// Output file for the CA certificate PEM that clients must trust.
    #[arg(long, default_value = "fake-azure-ca.crt")]
    ca_file: PathBuf,

    /// Output file for the JSON state (URLs, address, CA file and acrpull flags), written once
    /// listening.
    #[arg(long)]
    state_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let rules = match &args.rules {
        Some(path) => read_rules(path)?,
        None => AccessRules::allow_all(),
    };
    let config = FakeAzureConfig {
        imds_port: args.imds_port,
        entra_port: args.entra_port,
        acr_port: args.acr_port,
        rules,
        lifetimes: lifetimes(&args),
        tenant_id: args.tenant_id.clone(),
        extra_dns_names: args.extra_dns_names.clone(),
        ca_file: Some(args.ca_file.clone()),
        ..FakeAzureConfig::default()
    };
    let fake = FakeAzure::start(config).await?;

    if let Some(path) = &args.state_file {
        write_state(path, &fake)?;
        info!(state_file = %path.display(), "wrote the state file");
    }
    println!("{}", fake.operator_args().join(" "));

    wait_for_signal().await?;
    info!("stopping on signal");
    fake.shutdown().await;
    if let Some(path) = &args.state_file {
        // A stale state file would point scripts at closed ports.
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(state_file = %path.display(), %error, "failed to remove the state file");
        }
    }
    Ok(())
}

fn lifetimes(args: &Args) -> TokenLifetimes {
    let defaults = TokenLifetimes::default();
    let pick =
        |seconds: Option<u64>, default: Duration| seconds.map_or(default, Duration::from_secs);
    TokenLifetimes {
        imds_access_token: pick(args.imds_token_lifetime, defaults.imds_access_token),
        entra_access_token: pick(args.entra_token_lifetime, defaults.entra_access_token),
        acr_refresh_token: pick(args.acr_refresh_token_lifetime, defaults.acr_refresh_token),
        acr_access_token: pick(args.acr_access_token_lifetime, defaults.acr_access_token),
    }
}

fn read_rules(path: &Path) -> anyhow::Result<AccessRules> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "failed to read the rules file {}; pass an existing file to --rules or use --allow-all",
            path.display()
        )
    })?;
    let is_json = path
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
    let rules = if is_json {
        serde_json::from_str(&text)
            .with_context(|| format!("invalid JSON rules in {}", path.display()))?
    } else {
        serde_saphyr::from_str(&text)
            .with_context(|| format!("invalid YAML rules in {}", path.display()))?
    };
    Ok(rules)
}

/// Writes the state file through a temporary file and a rename, so that a script polling for
/// it never reads a partial file.
fn write_state(path: &Path, fake: &FakeAzure) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(fake.info())
        .context("failed to serialize the fake Azure state")?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, json)
        .with_context(|| format!("failed to write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| {
        format!(
            "failed to rename {} to {}",
            temporary.display(),
            path.display()
        )
    })?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut terminate = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    tokio::select! {
        _ = terminate.recv() => Ok(()),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => Ok(()),
            Err(error) => bail!("failed to listen for SIGINT: {error}"),
        },
    }
}
