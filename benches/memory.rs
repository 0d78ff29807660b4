//! Resident memory of the actor system per binding.
//!
//! Brings 1,000 and then 10,000 bindings to Ready over the in-memory ports and prints the
//! growth of the process's resident set size (`/proc/self/statm`, Linux only) per binding.
//! Run with `cargo bench --bench memory`; the output is a table, not a criterion report.

use std::sync::Arc;
use std::time::Duration;

use acrpull_actors::clock::Clock;
use acrpull_actors::event::{BindingEvent, ObservedBinding, ObservedStatus};
use acrpull_actors::memory::{MemoryClusterWriter, MemoryTokenSource};
use acrpull_actors::model::{BindingKey, DesiredBinding, Identity, v1beta1_secret_name};
use acrpull_actors::{ActorSystem, SystemConfig};

const BINDINGS_PER_NAMESPACE: usize = 100;

fn namespace(index: usize) -> String {
    format!("ns-{}", index / BINDINGS_PER_NAMESPACE)
}

fn spec(name: &str, identity: usize) -> BindingEvent {
    BindingEvent::SpecObserved(ObservedBinding {
        generation: 1,
        spec: Ok(DesiredBinding {
            acr_server: "example.azurecr.io".into(),
            identity: Identity::ClientId(format!("11111111-2222-3333-4444-{identity:012}")),
            scope: Some("repository:app:pull".into()),
            service_account: "default".into(),
            secret_name: v1beta1_secret_name(name),
        }),
        has_finalizer: false,
        status: ObservedStatus::default(),
    })
}

/// Returns the resident set size in bytes.
fn resident_bytes() -> usize {
    let statm =
        std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm is readable on Linux");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("statm has a resident field");
    pages * 4096
}

/// Brings `count` bindings to Ready and returns the resident growth in bytes, measured while
/// they are all alive. Each group of ten bindings shares an identity, so the token cache has
/// `count / 10` entries.
fn measure(count: usize) -> usize {
    let system = actix_rt::System::new();
    system.block_on(async move {
        let cluster = MemoryClusterWriter::new();
        for index in (0..count).step_by(BINDINGS_PER_NAMESPACE) {
            cluster.add_service_account(&namespace(index), "default");
        }
        let mut config = SystemConfig::default();
        config.writer.qps = 1_000_000;
        config.writer.burst = 1_000_000;
        config.writer.max_in_flight = 64;
        let source = MemoryTokenSource::new(Clock::System);
        let actors = ActorSystem::start(config, Arc::new(source), Arc::new(cluster.clone()))
            .expect("the benchmark configuration is valid");

        let before = resident_bytes();
        for index in 0..count {
            let name = format!("app-{index}");
            actors.deliver(
                BindingKey::new(namespace(index), name.clone()),
                spec(&name, index / 10),
            );
        }
        let all_ready = cluster
            .wait_until(Duration::from_mins(10), |cluster| {
                cluster.statuses.len() == count
                    && cluster.statuses.values().all(|status| status.ready.ready)
            })
            .await;
        assert!(all_ready, "not every binding became Ready within 600 s");
        let after = resident_bytes();

        actors.shutdown().await;
        after.saturating_sub(before)
    })
}

#[allow(
    clippy::cast_precision_loss,
    reason = "a byte count below 2^52 converts exactly, and the MiB column is for reading"
)]
fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` one small run proves the bench works.
    let counts: &[usize] = if std::env::args().any(|arg| arg == "--bench") {
        &[1_000, 10_000]
    } else {
        &[100]
    };

    println!(
        "{:>10} {:>14} {:>18}",
        "bindings", "RSS growth", "bytes per binding"
    );
    for &count in counts {
        let growth = measure(count);
        println!(
            "{count:>10} {:>11.1} MiB {:>18}",
            growth as f64 / 1_048_576.0,
            growth / count
        );
    }
}
