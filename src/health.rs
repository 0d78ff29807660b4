//! Liveness and readiness endpoints for the kubelet's probes.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;
use tracing::info;

/// Serves `/healthz` (the process is up) and `/readyz` (the initial AcrPullBinding list is
/// done) on `addr` until `shutdown` resolves.
///
/// # Errors
/// Returns an error when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    ready: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .with_state(ready);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving health probes");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readiness(State(ready): State<watch::Receiver<bool>>) -> (StatusCode, &'static str) {
    if *ready.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "initial list of AcrPullBindings not complete",
        )
    }
}
