//! Liveness and readiness endpoints for the kubelet's probes.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

/// Serves `/healthz` (the process is up) and `/readyz` (the initial AcrPullBinding list is
/// done) on `listener` until `shutdown` resolves.
///
/// # Errors
/// Returns an error when accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    ready: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .with_state(ready);

    info!(addr = %listener.local_addr()?, "serving health probes");
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
