//! The writer actor on its own, over the in-memory cluster: coalescing, ordering, per-object
//! exclusion, retries and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use acrpull_actors::actor::Deliver;
use acrpull_actors::actor::writer::{Drain, SubmitWrite, WriterActor, WriterConfig, WriterStats};
use acrpull_actors::event::BindingEvent;
use acrpull_actors::memory::MemoryClusterWriter;
use acrpull_actors::model::BindingKey;
use acrpull_actors::write::{
    ClusterWrite, Notice, ReadyCondition, StatusUpdate, WriteError, WriteErrorKind, WriteKind,
    WriteRequest,
};
use actix::{Actor, Addr, Context, Handler};

/// Stands in for the registry and records every report.
#[derive(Default)]
struct Collector {
    reports: Arc<Mutex<Vec<Deliver>>>,
}

impl Actor for Collector {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Collector {
    type Result = ();

    fn handle(&mut self, message: Deliver, _ctx: &mut Self::Context) {
        self.reports.lock().unwrap().push(message);
    }
}

struct Setup {
    writer: Addr<WriterActor>,
    cluster: MemoryClusterWriter,
    reports: Arc<Mutex<Vec<Deliver>>>,
    stats: Arc<WriterStats>,
}

fn start(config: WriterConfig) -> Setup {
    let cluster = MemoryClusterWriter::new();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let collector = Collector {
        reports: Arc::clone(&reports),
    }
    .start();
    let stats = Arc::new(WriterStats::default());
    let writer = WriterActor::new(
        config,
        Arc::new(cluster.clone()),
        collector.recipient(),
        Arc::clone(&stats),
    )
    .start();
    Setup {
        writer,
        cluster,
        reports,
        stats,
    }
}

fn status(message: &str) -> ClusterWrite {
    ClusterWrite::UpdateStatus(StatusUpdate {
        last_token_refresh: None,
        token_expiration: None,
        error: None,
        ready: ReadyCondition {
            ready: false,
            reason: "Test".into(),
            message: message.into(),
            observed_generation: 1,
        },
    })
}

fn submit(setup: &Setup, binding: &str, write: ClusterWrite) {
    setup.writer.do_send(SubmitWrite(WriteRequest {
        key: BindingKey::new("ns", binding),
        write,
    }));
}

fn serial() -> WriterConfig {
    WriterConfig {
        max_in_flight: 1,
        qps: 10_000,
        burst: 10_000,
        ..WriterConfig::default()
    }
}

#[actix_rt::test]
async fn queued_writes_coalesce_to_newest() {
    let setup = start(serial());
    setup.cluster.set_latency(Duration::from_millis(50));

    submit(&setup, "a", status("a"));
    for round in 0..10 {
        submit(&setup, "b", status(&format!("b{round}")));
    }

    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(5), |cluster| cluster
                .count(WriteKind::UpdateStatus)
                == 2)
            .await
    );
    let cluster = setup.cluster.snapshot();
    let b_status = &cluster.statuses[&BindingKey::new("ns", "b")];
    assert_eq!(b_status.ready.message, "b9");
    assert_eq!(
        setup
            .stats
            .coalesced
            .load(std::sync::atomic::Ordering::Relaxed),
        9
    );

    actix_rt::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        cluster.count(WriteKind::UpdateStatus),
        2,
        "no write beyond the coalesced ones"
    );
    let reports = setup.reports.lock().unwrap();
    assert_eq!(reports.len(), 2, "one report per applied write");
}

#[actix_rt::test]
async fn urgent_writes_go_first() {
    let setup = start(serial());
    setup.cluster.set_latency(Duration::from_millis(20));

    submit(&setup, "a", status("a"));
    submit(&setup, "b", status("b"));
    submit(&setup, "c", ClusterWrite::AddFinalizer);

    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(5), |cluster| cluster.applied.len() == 3)
            .await
    );
    let order: Vec<(String, WriteKind)> = setup
        .cluster
        .snapshot()
        .applied
        .iter()
        .map(|(key, write)| (key.name.clone(), write.kind()))
        .collect();
    assert_eq!(
        order,
        vec![
            ("a".into(), WriteKind::UpdateStatus),
            ("c".into(), WriteKind::AddFinalizer),
            ("b".into(), WriteKind::UpdateStatus),
        ]
    );
}

#[actix_rt::test]
async fn same_object_never_overlaps() {
    let setup = start(WriterConfig {
        max_in_flight: 8,
        qps: 10_000,
        burst: 10_000,
        ..WriterConfig::default()
    });
    setup.cluster.set_latency(Duration::from_millis(30));

    submit(&setup, "a", ClusterWrite::AddFinalizer);
    actix_rt::time::sleep(Duration::from_millis(5)).await;
    submit(&setup, "a", ClusterWrite::RemoveFinalizer);
    submit(&setup, "b", ClusterWrite::AddFinalizer);

    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(5), |cluster| cluster.applied.len() == 3)
            .await
    );
    let cluster = setup.cluster.snapshot();
    assert_eq!(cluster.overlapping_calls, 0);
    assert!(
        !cluster.finalizers.contains(&BindingKey::new("ns", "a")),
        "the later write wins"
    );
    assert!(
        cluster.max_concurrent_calls >= 2,
        "different objects run in parallel"
    );
}

#[actix_rt::test]
async fn concurrency_stays_bounded() {
    let setup = start(WriterConfig {
        max_in_flight: 3,
        qps: 10_000,
        burst: 10_000,
        ..WriterConfig::default()
    });
    setup.cluster.set_latency(Duration::from_millis(10));

    for index in 0..20 {
        submit(&setup, &format!("b{index}"), ClusterWrite::AddFinalizer);
    }

    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(5), |cluster| cluster.applied.len()
                == 20)
            .await
    );
    assert_eq!(setup.cluster.snapshot().max_concurrent_calls, 3);
}

#[actix_rt::test]
async fn conflicts_are_retried_at_once() {
    let setup = start(serial());
    setup.cluster.fail_next(
        WriteKind::AddFinalizer,
        2,
        WriteError {
            message: "the object has been modified".into(),
            kind: WriteErrorKind::Conflict,
        },
    );

    submit(&setup, "a", ClusterWrite::AddFinalizer);

    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(5), |cluster| cluster.applied.len() == 1)
            .await
    );
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    let reports = setup.reports.lock().unwrap();
    assert!(matches!(
        reports[0].event,
        BindingEvent::WriteDone(ClusterWrite::AddFinalizer)
    ));
    assert_eq!(
        setup
            .stats
            .retried
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(setup.cluster.snapshot().calls, 3);
}

#[actix_rt::test]
async fn throttling_gives_up_after_max_attempts() {
    tokio::time::pause();
    let setup = start(WriterConfig {
        max_attempts: 3,
        ..serial()
    });
    setup.cluster.fail_next(
        WriteKind::AddFinalizer,
        10,
        WriteError {
            message: "too many requests".into(),
            kind: WriteErrorKind::Throttled(Some(Duration::from_secs(2))),
        },
    );

    submit(&setup, "a", ClusterWrite::AddFinalizer);
    let started = tokio::time::Instant::now();
    while setup.reports.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let reports = setup.reports.lock().unwrap();
    let BindingEvent::WriteFailed { error, .. } = &reports[0].event else {
        panic!("expected WriteFailed, got {:?}", reports[0].event);
    };
    assert_eq!(
        error.kind,
        WriteErrorKind::Throttled(Some(Duration::from_secs(2)))
    );
    assert_eq!(setup.cluster.snapshot().calls, 3);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "waited Retry-After twice"
    );
}

#[actix_rt::test]
async fn rate_limit_spaces_writes() {
    tokio::time::pause();
    let setup = start(WriterConfig {
        qps: 10,
        burst: 1,
        max_in_flight: 16,
        ..WriterConfig::default()
    });

    let started = tokio::time::Instant::now();
    for index in 0..5 {
        submit(&setup, &format!("b{index}"), ClusterWrite::AddFinalizer);
    }
    assert!(
        setup
            .cluster
            .wait_until(Duration::from_secs(10), |cluster| cluster.applied.len()
                == 5)
            .await
    );

    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "5 writes at 10 per second took {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(700),
        "5 writes at 10 per second took {elapsed:?}"
    );
}

#[actix_rt::test]
async fn drain_finishes_queued_writes() {
    let setup = start(serial());
    setup.cluster.set_latency(Duration::from_millis(10));
    for index in 0..5 {
        submit(
            &setup,
            &format!("b{index}"),
            ClusterWrite::PublishEvent(Notice {
                warning: false,
                reason: "Test".into(),
                message: "drain".into(),
            }),
        );
    }

    let report = setup.writer.send(Drain).await.unwrap();

    assert_eq!(report.dropped, 0);
    assert_eq!(report.applied, 5);
    assert_eq!(setup.cluster.snapshot().events.len(), 5);
}

#[actix_rt::test]
async fn drain_timeout_drops_the_rest() {
    let setup = start(WriterConfig {
        drain_timeout: Duration::from_millis(50),
        ..serial()
    });
    setup.cluster.set_latency(Duration::from_millis(40));
    for index in 0..5 {
        submit(&setup, &format!("b{index}"), ClusterWrite::AddFinalizer);
    }

    let report = setup.writer.send(Drain).await.unwrap();

    assert!(report.dropped >= 3, "{report:?}");
    assert!(report.applied <= 2, "{report:?}");
}
