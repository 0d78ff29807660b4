//! Two replicas with leader election: one acts, the other takes over when it dies.

use acrpull_testkit::fake_azure::{Endpoint, FakeAzureConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn standby_takes_over_after_leader_dies() {
    let mut harness = Harness::without_operator("leader", FakeAzureConfig::allow_all()).await;
    harness.extra_args = vec![
        "--enable-leader-election".to_owned(),
        "--leader-election-namespace".to_owned(),
        harness.ns().to_owned(),
    ];
    let mut first = harness.spawn_operator();
    let mut second = harness.spawn_operator();

    harness.create_binding("app", spec()).await;
    harness.wait_for_ready("app").await;
    // Only the leader acts: one Azure exchange, not one per replica.
    assert_eq!(harness.azure.calls(Endpoint::AcrExchange), 1);

    let leases: Api<Lease> = Api::namespaced(harness.client.clone(), harness.ns());
    let lease = leases.get("msi-acrpull-leader").await.unwrap();
    let holder = lease
        .spec
        .and_then(|spec| spec.holder_identity)
        .unwrap_or_default();
    let first_leads = holder.ends_with(&format!("-{}", first.pid()));
    let second_leads = holder.ends_with(&format!("-{}", second.pid()));
    assert!(
        first_leads != second_leads,
        "holder {holder:?} is neither replica"
    );

    // The leader crashes without releasing the Lease; the standby takes over once it expires.
    let (leader, standby) = if first_leads {
        (&mut first, &second)
    } else {
        (&mut second, &first)
    };
    leader.kill();
    harness
        .patch_spec("app", json!({ "scope": "repository:app:pull" }))
        .await;
    harness
        .poll(
            "the standby to mint a token for the new scope",
            CONVERGE,
            || {
                let azure = &harness.azure;
                async move { Ok((azure.calls(Endpoint::AcrToken) >= 1).then_some(())) }
            },
        )
        .await;
    harness.wait_for_ready("app").await;

    let lease = leases.get("msi-acrpull-leader").await.unwrap();
    let holder = lease
        .spec
        .and_then(|spec| spec.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.ends_with(&format!("-{}", standby.pid())),
        "holder {holder:?}\n{}",
        standby.logs()
    );
}
