//! The two boundaries of the actor system: where tokens come from and where writes go.
//!
//! The `acrpull` binary implements them with Azure and the Kubernetes API; tests and benchmarks
//! implement them in memory.

use futures::future::BoxFuture;

use crate::model::{BindingKey, IssuedToken, TokenError, TokenRequest};
use crate::write::{ClusterWrite, WriteError};

/// Mints registry tokens. One call is one attempt: the token broker owns caching, sharing of
/// in-flight requests and backoff.
pub trait TokenSource: Send + Sync + 'static {
    /// Returns a registry token for the request, or why none could be minted.
    fn issue(&self, request: TokenRequest) -> BoxFuture<'static, Result<IssuedToken, TokenError>>;
}

/// Applies one write to the API server. One call is one attempt: the writer actor owns rate
/// limiting, coalescing and retries.
pub trait ClusterWriter: Send + Sync + 'static {
    /// Applies `write` for the binding `key`.
    fn apply(
        &self,
        key: BindingKey,
        write: ClusterWrite,
    ) -> BoxFuture<'static, Result<(), WriteError>>;
}
