//! Time to bring N bindings from their first `SpecObserved` to Ready: one shared token
//! exchange, then the finalizer, Secret, ServiceAccount reference, status and Event writes of
//! every binding, over the in-memory ports with no latency and no effective rate limit.
//!
//! Each iteration starts a fresh actix `System` and actor system, so the numbers include
//! actor start-up. Bindings sit in namespaces of 100, each with its own `default`
//! ServiceAccount.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acrpull_actors::clock::Clock;
use acrpull_actors::event::{BindingEvent, ObservedBinding, ObservedStatus};
use acrpull_actors::memory::{MemoryClusterWriter, MemoryTokenSource};
use acrpull_actors::model::{BindingKey, DesiredBinding, Identity, v1beta1_secret_name};
use acrpull_actors::{ActorSystem, SystemConfig};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const BINDINGS_PER_NAMESPACE: usize = 100;

fn namespace(index: usize) -> String {
    format!("ns-{}", index / BINDINGS_PER_NAMESPACE)
}

fn spec(name: &str) -> BindingEvent {
    BindingEvent::SpecObserved(ObservedBinding {
        generation: 1,
        spec: Ok(DesiredBinding {
            acr_server: "example.azurecr.io".into(),
            identity: Identity::ClientId("11111111-2222-3333-4444-555555555555".into()),
            scope: Some("repository:app:pull".into()),
            service_account: "default".into(),
            secret_name: v1beta1_secret_name(name),
        }),
        has_finalizer: false,
        status: ObservedStatus::default(),
    })
}

/// Brings `count` bindings to Ready once and returns the time it took.
fn bring_up(count: usize) -> Duration {
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

        let started = Instant::now();
        for index in 0..count {
            let name = format!("app-{index}");
            actors.deliver(BindingKey::new(namespace(index), name.clone()), spec(&name));
        }
        let all_ready = cluster
            .wait_until(Duration::from_mins(10), |cluster| {
                cluster.statuses.len() == count
                    && cluster.statuses.values().all(|status| status.ready.ready)
            })
            .await;
        let elapsed = started.elapsed();
        assert!(all_ready, "not every binding became Ready within 600 s");

        actors.shutdown().await;
        elapsed
    })
}

fn bindings(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("first_token_to_ready");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for count in [1_000, 10_000] {
        group.bench_with_input(
            BenchmarkId::from_parameter(count),
            &count,
            |bencher, &count| {
                bencher.iter_custom(|iterations| (0..iterations).map(|_| bring_up(count)).sum());
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bindings);
criterion_main!(benches);
