//! Azure endpoints of the controller, and the HTTP clients that reach them.
//!
//! Production defaults are the real Azure endpoints. Every one can be redirected, which is how
//! the tests and the local demo reach the fake Azure on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The instance metadata service that issues managed identity tokens on Azure VMs.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// The Entra ID authority host of the public cloud.
pub const DEFAULT_ENTRA_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// The Azure Resource Manager audience that ACR accepts in `/oauth2/exchange`.
pub const DEFAULT_ARM_RESOURCE: &str = "https://management.azure.com/";

/// Azure endpoints and the transport settings used to reach them.
#[derive(Clone, Debug)]
pub struct AzureEndpoints {
    /// Base URL of the instance metadata service (scheme, host and port).
    pub imds_endpoint: reqwest::Url,
    /// Base URL of the Entra ID authority.
    pub entra_authority_host: reqwest::Url,
    /// Audience of the Azure token exchanged at the registry.
    pub arm_resource: String,
    /// Address to connect to for every registry host name instead of resolving it, like
    /// curl's `--resolve`. TLS still verifies the registry's host name.
    pub acr_address: Option<SocketAddr>,
    /// PEM file with extra CA certificates trusted for HTTPS, in addition to the system roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Time limit for one HTTP request to Azure.
    pub request_timeout: Duration,
}

/// Errors that prevent building the HTTP clients.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The extra CA file could not be read.
    #[error("failed to read the extra CA file {path}: {source}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The extra CA file contains no valid PEM certificate.
    #[error("the extra CA file {path} contains no valid PEM certificate: {source}")]
    ParseCa {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: reqwest::Error,
    },
    /// reqwest rejected the client configuration.
    #[error("failed to build the HTTP client for Azure: {0}")]
    Build(#[source] reqwest::Error),
}

impl AzureEndpoints {
    /// Builds the HTTP client for registry requests, applying the CA file and the address
    /// override.
    ///
    /// # Errors
    /// Returns [`EndpointError`] when the CA file is unreadable or the client cannot be built.
    pub fn registry_client(&self) -> Result<reqwest::Client, EndpointError> {
        let mut builder = self.base_builder()?;
        if let Some(address) = self.acr_address {
            builder = builder.dns_resolver(Arc::new(FixedResolver(address)));
        }
        builder.build().map_err(EndpointError::Build)
    }

    /// Builds the HTTP client for the metadata service and Entra ID.
    ///
    /// # Errors
    /// Returns [`EndpointError`] when the CA file is unreadable or the client cannot be built.
    pub fn identity_client(&self) -> Result<reqwest::Client, EndpointError> {
        self.base_builder()?.build().map_err(EndpointError::Build)
    }

    fn base_builder(&self) -> Result<reqwest::ClientBuilder, EndpointError> {
        let mut builder = reqwest::Client::builder()
            .timeout(self.request_timeout)
            .connect_timeout(self.request_timeout.min(Duration::from_secs(10)))
            // Azure's token endpoints never redirect; following one would send a token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("acrpull/", env!("CARGO_PKG_VERSION")));

        if let Some(path) = &self.extra_ca_file {
            let pem = std::fs::read(path).map_err(|source| EndpointError::ReadCa {
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                EndpointError::ParseCa {
                    path: path.clone(),
                    source,
                }
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(builder)
    }
}

/// Resolves every host name to one address.
struct FixedResolver(SocketAddr);

impl Resolve for FixedResolver {
    fn resolve(&self, _name: Name) -> Resolving {
        let address = self.0;
        Box::pin(async move { Ok(Box::new(std::iter::once(address)) as Addrs) })
    }
}
