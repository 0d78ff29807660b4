//! Command-line flags. Every flag can also be set by the environment variable named in its
//! help text, so a Deployment can configure the controller either way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::azure::endpoints::{
    DEFAULT_ARM_RESOURCE, DEFAULT_ENTRA_AUTHORITY_HOST, DEFAULT_IMDS_ENDPOINT,
};

/// Keeps Azure Container Registry pull secrets fresh for AcrPullBindings.
///
/// With no subcommand, runs the controller.
#[derive(Debug, Parser)]
#[command(name = "acrpull", version, about, long_about = None)]
pub struct Cli {
    /// The subcommand; the controller runs when it is omitted.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Controller settings, used when no subcommand is given.
    #[command(flatten)]
    pub controller: ControllerArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the `CustomResourceDefinitions` as YAML, as committed in deploy/latest/crd.yaml.
    Crd,
}

/// Settings of the controller.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Address of the Prometheus endpoint `/metrics`.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:8080")]
    pub metrics_addr: SocketAddr,

    /// Run as one of several replicas, only the elected leader acting.
    #[arg(long, env = "ENABLE_LEADER_ELECTION")]
    pub enable_leader_election: bool,

    /// Namespace of the leader election Lease; defaults to the controller's own namespace.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Address of the health endpoints /healthz (alive) and /readyz (initial list done).
    #[arg(long, env = "HEALTH_PROBE_ADDR", default_value = "0.0.0.0:8081")]
    pub health_probe_addr: SocketAddr,

    /// Serve only AcrPullBindings matching this label selector, for example `team=payments`.
    #[arg(long, env = "BINDING_LABEL_SELECTOR")]
    pub label_selector: Option<String>,

    /// Renew a token when less than this much validity remains, for example `30m`. Tokens
    /// valid for less than twice this margin are renewed at half their lifetime instead.
    #[arg(long, env = "REFRESH_MARGIN", default_value = "30m", value_parser = parse_duration)]
    pub refresh_margin: Duration,

    /// Sustained rate of writes to the API server, in writes per second.
    #[arg(long, env = "WRITER_QPS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub writer_qps: u32,

    /// Writes allowed in a burst above the sustained rate.
    #[arg(long, env = "WRITER_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub writer_burst: u32,

    /// Registry used when a binding's spec.acrServer is empty.
    #[arg(long = "default-acr-server", env = "ACR_SERVER")]
    pub default_acr_server: Option<String>,

    /// Managed identity resource ID used when a binding names no identity.
    #[arg(
        long = "default-managed-identity-resource-id",
        env = "MANAGED_IDENTITY_RESOURCE_ID"
    )]
    pub default_managed_identity_resource_id: Option<String>,

    /// Managed identity client ID used when a binding names no identity; wins over the
    /// default resource ID.
    #[arg(
        long = "default-managed-identity-client-id",
        env = "MANAGED_IDENTITY_CLIENT_ID"
    )]
    pub default_managed_identity_client_id: Option<String>,

    /// Comma-separated host name suffixes that spec.acrServer must end with; tokens are never
    /// sent to other hosts. An empty value allows any host.
    #[arg(
        long,
        env = "ALLOWED_ACR_SERVER_SUFFIXES",
        value_delimiter = ',',
        default_value = ".azurecr.io,.azurecr.us,.azurecr.cn"
    )]
    pub allowed_acr_server_suffixes: Vec<String>,

    /// Azure endpoints.
    #[command(flatten)]
    pub azure: AzureArgs,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Azure endpoint settings. The defaults are the real Azure endpoints; tests and the local demo
/// point every one of them at fakes on loopback.
#[derive(Debug, Args)]
pub struct AzureArgs {
    /// Base URL of the instance metadata service that issues managed identity tokens.
    #[arg(long, env = "AZURE_IMDS_ENDPOINT", default_value = DEFAULT_IMDS_ENDPOINT, value_parser = parse_http_url)]
    pub imds_endpoint: reqwest::Url,

    /// Base URL of the Entra ID authority (for workload identity).
    #[arg(long, env = "AZURE_AUTHORITY_HOST", default_value = DEFAULT_ENTRA_AUTHORITY_HOST, value_parser = parse_http_url)]
    pub entra_authority_host: reqwest::Url,

    /// Audience of the Azure token exchanged at the registry.
    #[arg(long, env = "AZURE_ARM_RESOURCE", default_value = DEFAULT_ARM_RESOURCE)]
    pub arm_resource: String,

    /// Connect to this address (IP:PORT) for every registry host name instead of resolving it
    /// by DNS, like curl's --resolve. TLS still checks the registry's host name.
    #[arg(long, env = "ACR_ADDRESS")]
    pub acr_address: Option<SocketAddr>,

    /// PEM file of extra CA certificates to trust for Azure HTTPS endpoints.
    #[arg(long, env = "AZURE_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,

    /// Time limit for one HTTP request to Azure, for example `30s`.
    #[arg(long, env = "AZURE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub azure_request_timeout: Duration,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses an `http` or `https` URL with a host, the only kind an endpoint override can be.
fn parse_http_url(value: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(value).map_err(|error| {
        format!("invalid URL {value:?} ({error}); use a value such as http://127.0.0.1:8080")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "invalid URL {value:?}: it must start with http:// or https:// and name a host"
        ));
    }
    Ok(url)
}

/// Parses a positive duration such as `30m`, `90s` or `1h30m`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let parsed: jiff::SignedDuration = value.parse().map_err(|error| {
        format!("invalid duration {value:?} ({error}); use a value such as 30s, 15m or 1h")
    })?;
    match Duration::try_from(parsed) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(format!(
            "invalid duration {value:?}: it must be greater than zero"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn original_deployment_arguments_are_accepted() {
        let cli = Cli::try_parse_from([
            "acrpull",
            "--metrics-addr=127.0.0.1:8080",
            "--enable-leader-election",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert!(cli.controller.enable_leader_election);
    }

    #[test]
    fn durations_parse_friendly_units() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_mins(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_mins(90)));
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn endpoint_urls_must_be_http() {
        assert!(parse_http_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_http_url("https://login.example").is_ok());
        assert!(parse_http_url("file:///tmp/x").is_err());
        assert!(parse_http_url("unix:socket").is_err());
        assert!(parse_http_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn production_defaults_are_azure() {
        let cli = Cli::try_parse_from(["acrpull"]).unwrap();
        assert_eq!(
            cli.controller.azure.imds_endpoint.as_str(),
            "http://169.254.169.254/"
        );
        assert_eq!(cli.controller.azure.acr_address, None);
        assert_eq!(cli.controller.allowed_acr_server_suffixes.len(), 3);
    }
}
