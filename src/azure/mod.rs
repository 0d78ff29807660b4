//! The Azure adapter: turns a token request into a registry token.
//!
//! Managed identity token from the metadata service (through `azure_identity`), then the
//! registry's `/oauth2/exchange`, then `/oauth2/token` when the binding has a scope.

pub mod acr;
pub mod endpoints;
pub mod imds;
pub mod jwt;

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use dashmap::DashMap;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use tracing::{debug, instrument};

use acrpull_actors::model::{Identity, IssuedToken, RegistryToken, TokenError, TokenRequest};
use acrpull_actors::ports::TokenSource;

use self::endpoints::{AzureEndpoints, EndpointError};
use self::imds::RedirectingTransport;

/// Mints registry tokens with managed identities.
#[derive(Clone)]
pub struct AzureTokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    /// Endpoints and timeouts.
    endpoints: AzureEndpoints,
    /// Client for registry requests (address override applied).
    registry: reqwest::Client,
    /// Transport for `azure_identity`, redirecting the metadata service.
    transport: Arc<RedirectingTransport>,
    /// One credential per identity, so that the token cache of `azure_identity` is reused.
    credentials: DashMap<Identity, Arc<ManagedIdentityCredential>>,
}

impl AzureTokenSource {
    /// Builds the token source and its HTTP clients.
    ///
    /// # Errors
    /// Returns [`EndpointError`] when an HTTP client cannot be built.
    pub fn new(endpoints: AzureEndpoints) -> Result<Self, EndpointError> {
        let registry = endpoints.registry_client()?;
        let identity_client: Arc<dyn azure_core::http::HttpClient> =
            Arc::new(endpoints.identity_client()?);
        let transport = Arc::new(RedirectingTransport::new(
            identity_client,
            endpoints.imds_endpoint.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                registry,
                transport,
                credentials: DashMap::new(),
            }),
        })
    }

    fn credential(
        &self,
        identity: &Identity,
    ) -> Result<Arc<ManagedIdentityCredential>, TokenError> {
        if let Some(existing) = self.inner.credentials.get(identity) {
            return Ok(existing.clone());
        }

        let user_assigned_id = match identity {
            Identity::ClientId(id) => UserAssignedId::ClientId(id.clone()),
            Identity::ResourceId(id) => UserAssignedId::ResourceId(id.clone()),
        };
        let options = ManagedIdentityCredentialOptions {
            user_assigned_id: Some(user_assigned_id),
            client_options: ClientOptions {
                transport: Some(Transport::new(self.inner.transport.clone())),
                ..ClientOptions::default()
            },
        };
        let credential =
            ManagedIdentityCredential::new(Some(options)).map_err(|error| TokenError {
                message: format!(
                    "failed to set up the managed identity credential for {identity}: {error}"
                ),
                retryable: false,
                retry_after: None,
            })?;
        self.inner
            .credentials
            .insert(identity.clone(), credential.clone());
        Ok(credential)
    }

    #[instrument(skip_all, fields(server = %request.acr_server, identity = %request.identity))]
    async fn issue_token(self, request: TokenRequest) -> Result<IssuedToken, TokenError> {
        let credential = self.credential(&request.identity)?;
        let scope = format!("{}.default", self.inner.endpoints.arm_resource);
        let entra = credential.get_token(&[&scope], None).await.map_err(|error| TokenError {
            message: format!(
                "failed to get an Azure token for managed identity {} from the instance metadata service: {}; check that the identity is assigned to the node pool",
                request.identity,
                one_line(&error.to_string()),
            ),
            retryable: true,
            retry_after: None,
        })?;
        let entra_token = entra.token.secret();
        let tenant = jwt::read_claims(entra_token)
            .ok()
            .and_then(|claims| claims.tid);
        debug!("received the Azure token, exchanging it at the registry");

        let refresh_token = acr::exchange_refresh_token(
            &self.inner.registry,
            &request.acr_server,
            entra_token,
            tenant.as_deref(),
        )
        .await?;
        let token = match &request.scope {
            Some(scope) => {
                acr::scoped_access_token(
                    &self.inner.registry,
                    &request.acr_server,
                    &refresh_token,
                    scope,
                )
                .await?
            }
            None => refresh_token,
        };

        let (issued_at, expires_at) =
            jwt::validity(&token, Timestamp::now()).map_err(|error| TokenError {
                message: format!(
                    "the registry {} returned a token whose expiry cannot be read: {error}",
                    request.acr_server
                ),
                retryable: true,
                retry_after: None,
            })?;
        Ok(IssuedToken {
            token: RegistryToken::new(token),
            issued_at,
            expires_at,
        })
    }
}

/// Joins the lines of an error message, so that it fits a status field and a log line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl TokenSource for AzureTokenSource {
    fn issue(&self, request: TokenRequest) -> BoxFuture<'static, Result<IssuedToken, TokenError>> {
        self.clone().issue_token(request).boxed()
    }
}
