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
    /// Registry refresh tokens per identity and registry, so that bindings that differ only
    /// in scope share one `/oauth2/exchange`. Entries are used only in the first half of
    /// their lifetime.
    refresh_tokens: DashMap<(Identity, String), CachedRefreshToken>,
    /// One lock per identity and registry, held during an exchange so that concurrent scoped
    /// requests wait for it instead of exchanging again.
    exchange_locks: DashMap<(Identity, String), Arc<tokio::sync::Mutex<()>>>,
}

/// A registry refresh token and its validity window.
struct CachedRefreshToken {
    /// The token; never logged.
    token: RegistryToken,
    /// When the token was issued.
    issued_at: Timestamp,
    /// When the token stops working.
    expires_at: Timestamp,
}

impl CachedRefreshToken {
    /// Returns whether the token is still in the first half of its lifetime at `now`.
    fn reusable(&self, now: Timestamp) -> bool {
        let lifetime = self.expires_at.duration_since(self.issued_at);
        now < self.issued_at + lifetime / 2
    }
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
                refresh_tokens: DashMap::new(),
                exchange_locks: DashMap::new(),
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
        let token = match &request.scope {
            Some(scope) => self.scoped_token(&request, scope).await?,
            None => self.refresh_token(&request).await?.expose().to_owned(),
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

    /// Returns an access token for `scope`, reusing the cached refresh token of the same
    /// identity and registry when it is still in the first half of its lifetime.
    async fn scoped_token(
        &self,
        request: &TokenRequest,
        scope: &str,
    ) -> Result<String, TokenError> {
        let (refresh_token, cached) = self.shared_refresh_token(request).await?;
        let scoped = acr::scoped_access_token(
            &self.inner.registry,
            &request.acr_server,
            refresh_token.expose(),
            scope,
        )
        .await;

        match scoped {
            // Rejected with a cached refresh token: it may be revoked, so try once with a new one.
            Err(error) if cached && !error.retryable => {
                self.inner
                    .refresh_tokens
                    .remove(&(request.identity.clone(), request.acr_server.clone()));
                let (refresh_token, _) = self.shared_refresh_token(request).await?;
                acr::scoped_access_token(
                    &self.inner.registry,
                    &request.acr_server,
                    refresh_token.expose(),
                    scope,
                )
                .await
            }
            other => other,
        }
    }

    /// Returns the cached refresh token of the request's identity and registry, or exchanges a
    /// new one. Concurrent requests for the same pair wait for one exchange. The flag is true
    /// when the token came from the cache.
    async fn shared_refresh_token(
        &self,
        request: &TokenRequest,
    ) -> Result<(RegistryToken, bool), TokenError> {
        let key = (request.identity.clone(), request.acr_server.clone());
        let lock = self
            .inner
            .exchange_locks
            .entry(key.clone())
            .or_default()
            .clone();
        let _exchange = lock.lock().await;

        let cached = self
            .inner
            .refresh_tokens
            .get(&key)
            .filter(|cached| cached.reusable(Timestamp::now()))
            .map(|cached| cached.token.clone());
        if let Some(token) = cached {
            debug!("reusing the registry refresh token for another scope");
            return Ok((token, true));
        }
        Ok((self.refresh_token(request).await?, false))
    }

    /// Gets an Azure token from the metadata service and exchanges it for a registry refresh
    /// token, which is cached for requests with other scopes.
    async fn refresh_token(&self, request: &TokenRequest) -> Result<RegistryToken, TokenError> {
        let credential = self.credential(&request.identity)?;
        let scope = format!("{}.default", self.inner.endpoints.arm_resource);
        // azure_identity retries the metadata service on its own for up to about 72 s; the
        // timeout makes a failure visible in status after --azure-request-timeout instead.
        let timeout = self.inner.endpoints.request_timeout;
        let entra = match tokio::time::timeout(timeout, credential.get_token(&[&scope], None)).await
        {
            Ok(Ok(entra)) => entra,
            Ok(Err(error)) => return Err(imds_error(&request.identity, &error.to_string())),
            Err(_) => {
                return Err(imds_error(
                    &request.identity,
                    &format!(
                        "timed out after {} s (--azure-request-timeout)",
                        timeout.as_secs()
                    ),
                ));
            }
        };
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
        let refresh_token = RegistryToken::new(refresh_token);

        let now = Timestamp::now();
        if let Ok((issued_at, expires_at)) = jwt::validity(refresh_token.expose(), now) {
            self.inner.refresh_tokens.insert(
                (request.identity.clone(), request.acr_server.clone()),
                CachedRefreshToken {
                    token: refresh_token.clone(),
                    issued_at,
                    expires_at,
                },
            );
        }
        Ok(refresh_token)
    }
}

/// Builds the error for a failed metadata-service request. The advice about node pool
/// assignment is added only when the service reported the identity as unknown.
fn imds_error(identity: &Identity, cause: &str) -> TokenError {
    let cause = one_line(cause);
    let unknown = cause.contains("400") || cause.to_ascii_lowercase().contains("not found");
    let advice = if unknown {
        "; check that the identity is assigned to the node pool"
    } else {
        ""
    };
    TokenError {
        message: format!(
            "failed to get an Azure token for managed identity {identity} from the instance metadata service: {cause}{advice}"
        ),
        retryable: true,
        retry_after: None,
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
