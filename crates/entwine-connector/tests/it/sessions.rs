//! The connector's session identity, as the Kubernetes layout (`deploy/k8s/60-connector.yaml`)
//! gives it: two replicas of a StatefulSet in one share group, each with the persistent session
//! named after its stable pod name.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use entwine_testing::{eventually, unique, Subscriber};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_statefulset_connector_replaced_under_its_name_resumes_its_session_and_loses_nothing(
) {
    // 5 ms per call: each replica holds messages in flight when one is killed.
    let functions = serve_slow_functions(fast_odte(), Duration::from_millis(5)).await;
    let prefix = unique("statefulset");
    let topics: Vec<String> = (1..=6)
        .map(|i| entwine_device::fleet::state_topic(&format!("{prefix}-{i}")))
        .collect();
    let witness = Subscriber::start(&topics).await;
    let group = unique("group");
    let shared: Vec<String> = topics
        .iter()
        .map(|t| format!("$share/{group}/{t}"))
        .collect();
    // The StatefulSet's pods: entwine-connector-0 and entwine-connector-1 (made unique here, as
    // the test broker is shared).
    let statefulset = unique("entwine-connector");
    let pod = |ordinal: usize| {
        let mut config = connector_config(
            &functions.url,
            shared.clone(),
            &format!("{statefulset}-{ordinal}"),
        );
        config.ack_order = entwine_connector::AckOrder::Completion;
        config
    };
    let killed = start_connector(pod(0)).await;
    let other = start_connector(pod(1)).await;
    let fleet = start_fleet(&prefix, 6, 20.0).await;
    let fleet_stats = fleet.emulator.stats.clone();
    let published = move || fleet_stats.published.load(Ordering::Relaxed);
    // Both replicas take part before one is killed.
    let killed_stats = killed.stats.clone();
    let other_stats = other.stats.clone();
    eventually(
        Duration::from_secs(20),
        "both replicas completing chains",
        || {
            let (a, b) = (killed_stats.clone(), other_stats.clone());
            async move {
                a.completed.load(Ordering::Relaxed) >= 10
                    && b.completed.load(Ordering::Relaxed) >= 10
            }
        },
    )
    .await;

    // The pod is killed: no leave, no drain, no DISCONNECT; its chains are cut anywhere.
    killed.task.abort();
    let _ = killed.task.await;
    // While it is away the broker keeps routing its share to its session: 40 more messages
    // published (two seconds of the fleet) before the replacement comes.
    let at_kill = published();
    eventually(
        Duration::from_secs(20),
        "40 messages published while it is away",
        || {
            let now = published();
            async move { now >= at_kill + 40 }
        },
    )
    .await;
    let replacement = start_connector(pod(0)).await;
    let replacement_stats = replacement.stats.clone();
    eventually(
        Duration::from_secs(20),
        "the replacement completing chains",
        || {
            let stats = replacement_stats.clone();
            async move { stats.completed.load(Ordering::Relaxed) > 0 }
        },
    )
    .await;

    let published = fleet.emulator.stats.clone();
    fleet.stop().await;
    let published = published.aggregated.load(Ordering::Relaxed) as usize;
    let received = witness
        .wait_for(Duration::from_secs(10), "the fleet's messages", |r| {
            r.len() >= published
        })
        .await;
    let events: BTreeSet<(String, i64)> = events(&received);
    assert_eq!(events.len(), published);
    // Until all are stored, or 60 s: then the comparison below names what is missing.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while physical_count(&functions.store.store).await < events.len() as i64
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        replacement.stats.completed.load(Ordering::Relaxed) > 0,
        "the replacement took its share"
    );
    replacement.stop().await;
    other.stop().await;
    assert_exactly_once(&functions.store.store, &events).await;
}
