//! Prometheus metrics, read from the actor system's counters at each scrape.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use acrpull_actors::ActorSystem;
use acrpull_actors::actor::system::SystemStats;

/// Content type of the `OpenMetrics` text format.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads [`SystemStats`] at each scrape, so nothing is counted twice.
struct StatsCollector {
    /// The actor system whose counters are exported.
    actors: ActorSystem,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector").finish_non_exhaustive()
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.actors.stats();

        for (name, help, value) in counters(&stats) {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        for (name, help, value) in gauges(&stats) {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Returns the monotonic counters as (name, help, value); the `_total` suffix is added by the
/// encoder.
fn counters(stats: &SystemStats) -> [(&'static str, &'static str, u64); 11] {
    [
        (
            "acrpull_bindings_started",
            "Binding actors started since start-up.",
            stats.bindings_started,
        ),
        (
            "acrpull_events_delivered",
            "Events delivered to binding actors.",
            stats.events_delivered,
        ),
        (
            "acrpull_token_requests",
            "Token requests from bindings.",
            stats.token_requests,
        ),
        (
            "acrpull_token_cache_hits",
            "Token requests served from the shared token cache.",
            stats.token_cache_hits,
        ),
        (
            "acrpull_token_requests_joined",
            "Token requests that joined an Azure call already in flight.",
            stats.token_requests_joined,
        ),
        (
            "acrpull_azure_token_calls",
            "Token exchanges with Azure.",
            stats.token_source_calls,
        ),
        (
            "acrpull_azure_token_failures",
            "Token exchanges with Azure that failed or timed out.",
            stats.token_source_failures,
        ),
        (
            "acrpull_writes_applied",
            "Writes applied to the API server.",
            stats.writes_applied,
        ),
        (
            "acrpull_writes_failed",
            "Writes given up after retries.",
            stats.writes_failed,
        ),
        (
            "acrpull_writes_retried",
            "Write attempts repeated after a conflict or throttling.",
            stats.writes_retried,
        ),
        (
            "acrpull_writes_coalesced",
            "Queued writes replaced by a newer write to the same object.",
            stats.writes_coalesced,
        ),
    ]
}

/// Returns the current levels as (name, help, value).
fn gauges(stats: &SystemStats) -> [(&'static str, &'static str, usize); 3] {
    [
        (
            "acrpull_bindings",
            "Bindings with a running actor.",
            stats.bindings,
        ),
        (
            "acrpull_writes_queued",
            "Writes waiting in the writer's queue.",
            stats.writes_queued,
        ),
        (
            "acrpull_writes_in_flight",
            "Writes being applied now.",
            stats.writes_in_flight,
        ),
    ]
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
///
/// # Errors
/// Returns an error when accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    actors: ActorSystem,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector { actors }));

    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(registry));
    info!(addr = %listener.local_addr()?, "serving metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            body,
        ),
        Err(error) => {
            warn!(%error, "failed to encode metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "failed to encode metrics".to_owned(),
            )
        }
    }
}
