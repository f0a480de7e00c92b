//! The whole physical side carrying a fleet, and surviving a connector restart.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use entwine_testing::{eventually, unique, Subscriber};

use crate::support::*;

/// Waits until the store holds an evaluated digital state for each of `expected` events.
async fn wait_until_stored(functions: &Functions, expected: usize) {
    let store = functions.store.store.clone();
    eventually(
        Duration::from_secs(60),
        "every event stored and evaluated",
        || {
            let store = store.clone();
            async move { physical_count(&store).await as usize >= expected }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_ten_devices_is_mirrored_exactly_once_in_order_and_entangles() {
    let functions = serve_functions(fast_odte()).await;
    let prefix = unique("fleet");
    // 100 events/s: well within what a debug build absorbs while the other tests of this
    // binary run beside it on two cores.
    let topics = fleet_topics(&prefix, 10);
    let witness = Subscriber::start(&topics).await;
    let connector = start_connector(connector_config(
        &functions.url,
        topics,
        &unique("connector"),
    ))
    .await;

    let fleet = start_fleet(&prefix, 10, 10.0).await;
    // 25 events per device (2.5 s at 10/s) crossed the broker: then stop.
    witness
        .wait_for(
            Duration::from_secs(30),
            "250 of the fleet's messages",
            |r| r.len() >= 10 * 25,
        )
        .await;
    let events = stop_fleet_and_wait_until_stored(fleet, &witness, &functions).await;
    assert!(
        events.len() >= 10 * 25,
        "the fleet published fast: {} events",
        events.len()
    );
    connector.stop().await;

    assert_exactly_once_in_order(&functions.store.store, &events).await;
    // A full window (ten updates in one second) entangles each twin. Not necessarily its very
    // last state: the window is 1 s, and a stall of half a second on a loaded machine (CI runs
    // tests in parallel) while the fleet stops leaves that one with half a window.
    let rows = rows(&functions.store.store).await;
    for id in (1..=10).map(|i| format!("{prefix}-{i}")) {
        let history: Vec<_> = rows.iter().filter(|r| r.device_id == id).collect();
        assert!(
            history
                .iter()
                .any(|r| r.lifecycle.as_deref() == Some("entangled")),
            "{id} never entangled: {history:?}"
        );
    }
}

/// The state topics of the fleet `<prefix>-1` … `<prefix>-count`.
fn fleet_topics(prefix: &str, count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| entwine_device::fleet::state_topic(&format!("{prefix}-{i}")))
        .collect()
}

/// The same topics joined to the share group `group`.
fn shared_filters(group: &str, topics: &[String]) -> Vec<String> {
    topics
        .iter()
        .map(|t| format!("$share/{group}/{t}"))
        .collect()
}

/// Stops a fleet, waits until the witness has seen all it published (QoS 1: all reach the
/// broker before its connections close) and the store holds an evaluated digital state for as
/// many events; answers the events the witness saw.
async fn stop_fleet_and_wait_until_stored(
    fleet: Fleet,
    witness: &Subscriber,
    functions: &Functions,
) -> BTreeSet<(String, i64)> {
    let stats = fleet.emulator.stats.clone();
    fleet.stop().await;
    let published = stats.aggregated.load(Ordering::Relaxed) as usize;
    let received = witness
        .wait_for(Duration::from_secs(10), "the fleet's messages", |r| {
            r.len() >= published
        })
        .await;
    let events = events(&received);
    wait_until_stored(functions, events.len()).await;
    events
}

/// Waits until a connector completed at least `n` events.
async fn completed_at_least(
    stats: &std::sync::Arc<entwine_connector::ConnectorStats>,
    n: u64,
    what: &str,
) {
    eventually(Duration::from_secs(30), what, || {
        let stats = stats.clone();
        async move { stats.completed.load(Ordering::Relaxed) >= n }
    })
    .await;
}

type Interrupt = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Starts a fleet, runs a connector that is stopped by `interrupt` mid-stream, then a second one
/// with the same client id, and checks that every event ends up stored exactly once.
async fn restart_scenario(
    ack_order: entwine_connector::AckOrder,
    interrupt: impl FnOnce(Connector) -> Interrupt,
) {
    // 15 ms per call: a chain takes 60 ms, a device publishes every 50 ms, so the connector
    // holds a backlog (up to the broker's in-flight window) when it is interrupted.
    let functions = serve_slow_functions(fast_odte(), Duration::from_millis(15)).await;
    let prefix = unique("restart");
    let topics = fleet_topics(&prefix, 5);
    let witness = Subscriber::start(&topics).await;
    let client_id = unique("connector");
    let mut config = connector_config(&functions.url, topics.clone(), &client_id);
    config.ack_order = ack_order;
    let first = start_connector(config).await;
    let fleet = start_fleet(&prefix, 5, 20.0).await;

    // Interrupted once it has done some work and holds a backlog.
    let first_stats = first.stats.clone();
    completed_at_least(&first_stats, 20, "the first connector's first 20 events").await;
    interrupt(first).await;
    let done_by_first = first_stats.completed.load(Ordering::Relaxed);
    assert!(
        done_by_first > 0,
        "the first connector did some of the work"
    );
    // Published while no connector runs: the broker keeps them for the persistent session.
    let seen = witness.received().len();
    witness
        .wait_for(
            Duration::from_secs(30),
            "20 messages published while no connector runs",
            |r| r.len() >= seen + 20,
        )
        .await;
    let mut config = connector_config(&functions.url, topics, &client_id);
    config.ack_order = ack_order;
    let second = start_connector(config).await;
    completed_at_least(&second.stats, 20, "the second connector's first 20 events").await;
    let events = stop_fleet_and_wait_until_stored(fleet, &witness, &functions).await;
    assert!(
        second.stats.completed.load(Ordering::Relaxed) > 0,
        "the second connector took over"
    );
    second.stop().await;
    // Not in order: after a reconnect with a backlog, Mosquitto interleaves the messages it
    // queued for the session with new ones (eclipse-mosquitto/mosquitto#192).
    assert_exactly_once(&functions.store.store, &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_stopped_mid_stream_and_started_again_loses_and_duplicates_nothing() {
    restart_scenario(entwine_connector::AckOrder::Arrival, |connector| {
        Box::pin(connector.stop())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_crashes_mid_stream_loses_and_duplicates_nothing() {
    // No drain, no DISCONNECT: chains cut anywhere, acknowledgements never sent. The broker
    // delivers the unacknowledged messages again and the idempotent functions absorb them.
    // Acknowledging as each message completes (Mosquitto accepts it): still nothing lost.
    restart_scenario(entwine_connector::AckOrder::Completion, |connector| {
        Box::pin(async move {
            connector.task.abort();
            let _ = connector.task.await;
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_on_a_shared_subscription_split_the_stream_without_loss() {
    let functions = serve_functions(fast_odte()).await;
    let prefix = unique("shared");
    let topics = fleet_topics(&prefix, 10);
    let witness = Subscriber::start(&topics).await;
    let group = unique("group");
    let shared = shared_filters(&group, &topics);
    let a = start_connector(connector_config(
        &functions.url,
        shared.clone(),
        &unique("connector-a"),
    ))
    .await;
    let b = start_connector(connector_config(
        &functions.url,
        shared,
        &unique("connector-b"),
    ))
    .await;
    let fleet = start_fleet(&prefix, 10, 10.0).await;
    let (a_stats, b_stats) = (a.stats.clone(), b.stats.clone());
    eventually(
        Duration::from_secs(30),
        "both connectors received 20 messages",
        || {
            let (a, b) = (a_stats.clone(), b_stats.clone());
            async move {
                a.received.load(Ordering::Relaxed) >= 20 && b.received.load(Ordering::Relaxed) >= 20
            }
        },
    )
    .await;
    let events = stop_fleet_and_wait_until_stored(fleet, &witness, &functions).await;
    let (got_a, got_b) = (
        a.stats.received.load(Ordering::Relaxed),
        b.stats.received.load(Ordering::Relaxed),
    );
    assert!(
        got_a > 0 && got_b > 0,
        "both connectors took a share: {got_a} and {got_b}"
    );
    assert_eq!(
        got_a + got_b,
        events.len() as u64,
        "each message went to one connector"
    );
    a.stop().await;
    b.stop().await;
    let rows = rows(&functions.store.store).await;
    assert_eq!(rows.len(), events.len());
    assert!(rows
        .iter()
        .all(|r| r.digital_states == 1 && r.odte.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_connector_replaced_mid_stream_leaves_nothing_behind() {
    // As on Kubernetes: a replica stops for good (its pod is replaced under another name) while
    // the other carries on. Whatever the stopped one had taken is finished or handed back, and
    // the broker routes nothing more to its session.
    let functions = serve_slow_functions(fast_odte(), Duration::from_millis(5)).await;
    let prefix = unique("replaced");
    let topics = fleet_topics(&prefix, 6);
    let witness = Subscriber::start(&topics).await;
    let group = unique("group");
    let shared = shared_filters(&group, &topics);
    let leaving = start_connector(connector_config(
        &functions.url,
        shared.clone(),
        &unique("pod-a"),
    ))
    .await;
    let staying = start_connector(connector_config(&functions.url, shared, &unique("pod-b"))).await;
    let fleet = start_fleet(&prefix, 6, 20.0).await;
    completed_at_least(&leaving.stats, 10, "the leaving replica's first 10 events").await;
    leaving.stop().await;
    let done = staying.stats.completed.load(Ordering::Relaxed);
    completed_at_least(
        &staying.stats,
        done + 30,
        "30 more events by the staying replica",
    )
    .await;
    let events = stop_fleet_and_wait_until_stored(fleet, &witness, &functions).await;
    staying.stop().await;
    assert_exactly_once(&functions.store.store, &events).await;
}
