//! An `azure_core` transport that sends metadata-service requests to a configurable endpoint.
//!
//! `azure_identity` 1.0 has the IMDS address `http://169.254.169.254` as a constant with no
//! override, but lets callers inject the HTTP transport. This transport rewrites that address
//! to the configured one, so tests and the demo reach a fake on loopback.

use std::sync::Arc;

use azure_core::http::{AsyncRawResponse, HttpClient, Request};

/// The host that the `azure_identity` managed identity credential always addresses.
const BUILT_IN_IMDS_HOST: &str = "169.254.169.254";

/// Wraps a transport and redirects metadata-service requests to `endpoint`.
#[derive(Debug)]
pub struct RedirectingTransport {
    /// The transport that performs the request.
    inner: Arc<dyn HttpClient>,
    /// Scheme, host and port that replace `http://169.254.169.254`.
    endpoint: reqwest::Url,
}

impl RedirectingTransport {
    /// Wraps `inner`, redirecting metadata-service requests to `endpoint`.
    #[must_use]
    pub fn new(inner: Arc<dyn HttpClient>, endpoint: reqwest::Url) -> Self {
        Self { inner, endpoint }
    }
}

#[async_trait::async_trait]
impl HttpClient for RedirectingTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        if request.url().host_str() != Some(BUILT_IN_IMDS_HOST) {
            return self.inner.execute_request(request).await;
        }

        let mut redirected = request.clone();
        let url = redirected.url_mut();
        // The CLI accepts only http(s) URLs with a host, and between those the scheme, host and
        // port are always settable, so these calls cannot fail.
        let _ = url.set_scheme(self.endpoint.scheme());
        let _ = url.set_host(self.endpoint.host_str());
        let _ = url.set_port(self.endpoint.port());
        self.inner.execute_request(&redirected).await
    }
}
