//! Batches (issue #13, group commit): a lane sends what is queued for it as one JSON array per
//! route, without waiting for more. The messages are queued in the broker for the connector's
//! persistent session before it starts, so batches form whatever the machine's speed; the real
//! functions answer over HTTP behind a proxy that records every call (route, body, status).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use entwine_connector::{ConnectorConfig, ConnectorStats};
use entwine_store::{Store, StoreOptions};
use entwine_testing::{eventually, mqtt_address, unique, PgCluster};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::outages::serve_functions_on_store;
use crate::support::*;

/// One call the proxy forwarded (or refused itself), with the status answered.
#[derive(Debug, Clone)]
struct Call {
    route: String,
    body: Value,
    status: u16,
}

impl Call {
    /// How many messages the call carried: an array's length, 1 for an object.
    fn messages(&self) -> usize {
        self.body.as_array().map_or(1, Vec::len)
    }
}

/// What the proxy does besides forwarding.
#[derive(Default)]
struct ProxyOptions {
    /// Added to every call, so that lanes fall behind and their queues fill.
    latency: Duration,
    /// Answers 400 to every array, as functions that take only objects (the seed's) do.
    refuse_arrays: bool,
    /// Holds the first array sent to `/physicalevents` until the test opens the gate.
    hold_first_batch: Option<Arc<Gate>>,
}

/// The first batch reached the proxy (`seen`); it is forwarded once `open` is true.
struct Gate {
    seen: Notify,
    open: watch::Sender<bool>,
    held: AtomicBool,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: Notify::new(),
            open: watch::channel(false).0,
            held: AtomicBool::new(false),
        })
    }
}

struct Proxy {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Proxy {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn calls_of(&self, route: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.route == route)
            .collect()
    }
}

/// A proxy in front of the functions at `upstream` that records every call.
async fn proxy(upstream: String, options: ProxyOptions) -> Proxy {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let options = Arc::new(options);
    let client = reqwest::Client::new();
    let router = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (upstream, calls, options, client) = (
            upstream.clone(),
            recorded.clone(),
            options.clone(),
            client.clone(),
        );
        async move {
            let route = request.uri().path().to_owned();
            let bytes = axum::body::to_bytes(request.into_body(), 2 << 20)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            tokio::time::sleep(options.latency).await;
            if options.refuse_arrays && body.is_array() {
                calls.lock().unwrap().push(Call {
                    route,
                    body,
                    status: 400,
                });
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    [("content-type", "application/json")],
                    "{\"error\":\"body: expected a JSON object\"}",
                )
                    .into_response();
            }
            if let Some(gate) = &options.hold_first_batch {
                if route == "/physicalevents"
                    && body.is_array()
                    && !gate.held.swap(true, Ordering::SeqCst)
                {
                    gate.seen.notify_one();
                    let mut open = gate.open.subscribe();
                    open.wait_for(|open| *open).await.unwrap();
                }
            }
            let answer = client
                .post(format!("{upstream}{route}"))
                .header("content-type", "application/json")
                .body(bytes)
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            calls.lock().unwrap().push(Call {
                route,
                body,
                status,
            });
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                answer.bytes().await.unwrap(),
            )
                .into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Proxy { url, calls }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A device's telemetry payload.
fn payload(timestamp: i64, energy: Value) -> String {
    json!({"timestamp": timestamp, "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": energy, "iot.sensor.temperature": 26.5}})
    .to_string()
}

/// A burst: `per_device` messages from each of `devices` devices under `root`, interleaved
/// (device 1's first, device 2's first, …), each device's timestamps increasing. Answers the
/// messages in publishing order: topic, `(device id, timestamp)`, payload.
fn burst(root: &str, devices: usize, per_device: usize) -> Vec<(String, (String, i64), String)> {
    let t0 = now_ms() - 10_000;
    (0..per_device)
        .flat_map(|j| {
            (1..=devices).map(move |i| {
                let device = format!("{root}-press-{i}");
                let timestamp = t0 + 10 * j as i64;
                (
                    format!("{root}/{device}/telemetry/device_state"),
                    (device, timestamp),
                    payload(timestamp, json!(3.0 + j as f64)),
                )
            })
        })
        .collect()
}

/// Publishes `messages` (QoS 1, not retained) and waits until the broker acknowledged all.
async fn publish_all(messages: &[(String, String)]) {
    let (host, port) = mqtt_address();
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(unique("burst"), host, port), 10);
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let events = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let expected = messages.len();
    eventually(
        Duration::from_secs(20),
        "the broker acknowledged the burst",
        || {
            let acked = acked.clone();
            async move { acked.load(Ordering::SeqCst) == expected }
        },
    )
    .await;
    let _ = client.disconnect().await;
    let _ = events.await;
}

/// Creates the connector's persistent session and subscription (a connector started and
/// stopped), then publishes the burst's `messages`: they wait in the broker for that session.
async fn queue_for_session(config: &ConnectorConfig, messages: &[(String, (String, i64), String)]) {
    start_connector(config.clone()).await.stop().await;
    let published: Vec<(String, String)> = messages
        .iter()
        .map(|(topic, _, payload)| (topic.clone(), payload.clone()))
        .collect();
    publish_all(&published).await;
}

/// Starts the connector on its queued session, waits until it completed `completed` messages
/// and dead-lettered `dead_lettered`, stops it; answers its counters.
async fn run_queued(
    config: ConnectorConfig,
    completed: u64,
    dead_lettered: u64,
) -> Arc<ConnectorStats> {
    let connector = start_connector(config).await;
    wait_until_finished(&connector, completed, dead_lettered).await;
    let stats = connector.stats.clone();
    connector.stop().await;
    stats
}

/// The connector's settings for a burst under `root`: `lanes` lanes, batches of `max_batch`.
fn burst_config(url: &str, root: &str, lanes: usize, max_batch: usize) -> ConnectorConfig {
    let mut config = connector_config(
        url,
        vec![format!("{root}/+/telemetry/device_state")],
        &unique("connector"),
    );
    config.lanes = lanes;
    config.max_batch = max_batch;
    config
}

async fn wait_until_finished(connector: &Connector, completed: u64, dead_lettered: u64) {
    let stats = connector.stats.clone();
    eventually(
        Duration::from_secs(60),
        "every message of the burst finished",
        || {
            let stats = stats.clone();
            async move {
                stats.completed.load(Ordering::Relaxed) == completed
                    && stats.dead_lettered.load(Ordering::Relaxed) == dead_lettered
            }
        },
    )
    .await;
}

/// The four routes saw the same calls, carrying `events` messages each in all, no call over
/// `max_batch` messages or the functions' 1 MiB; and answers whether any was an array.
fn assert_calls_within_limits(proxy: &Proxy, events: usize, max_batch: usize) -> bool {
    for route in entwine_connector::ROUTES {
        let calls = proxy.calls_of(route);
        assert!(calls.iter().all(|c| c.status == 200), "{route}: {calls:?}");
        assert_eq!(
            calls.iter().map(Call::messages).sum::<usize>(),
            events,
            "{route}"
        );
        for call in &calls {
            assert!(call.messages() <= max_batch, "{route}: {}", call.messages());
            assert!(serde_json::to_vec(&call.body).unwrap().len() <= 1024 * 1024);
        }
    }
    proxy.calls().iter().any(|c| c.body.is_array())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_several_devices_goes_in_batches_stored_exactly_once_in_order() {
    let functions = serve_functions(fast_odte()).await;
    let proxy = proxy(
        functions.url.clone(),
        ProxyOptions {
            latency: Duration::from_millis(10),
            ..ProxyOptions::default()
        },
    )
    .await;
    let root = unique("batches");
    let messages = burst(&root, 4, 25);
    let config = burst_config(&proxy.url, &root, 2, 8);
    queue_for_session(&config, &messages).await;
    let stats = run_queued(config, 100, 0).await;

    let events: BTreeSet<(String, i64)> = messages.iter().map(|(_, e, _)| e.clone()).collect();
    assert_exactly_once_in_order(&functions.store.store, &events).await;
    let batches = stats.batches.load(Ordering::Relaxed);
    let largest = stats.largest_batch.load(Ordering::Relaxed);
    assert!(batches < 100, "{batches} batches for 100 events");
    assert!((2..=8).contains(&largest), "largest batch {largest}");
    assert_eq!(stats.batched_events.load(Ordering::Relaxed), 100);
    assert_eq!(stats.batch_fallbacks.load(Ordering::Relaxed), 0);
    assert_eq!(stats.retries.load(Ordering::Relaxed), 0);
    let json = stats.to_json();
    assert_eq!(json["batches"], batches);
    assert_eq!(json["largest_batch"], largest);
    assert_eq!(json["batched_events"], 100);
    // One call of the first route per batch, exactly as counted; arrays of up to 8.
    let first = proxy.calls_of("/physicalevents");
    assert_eq!(first.len() as u64, batches);
    assert_eq!(
        first.iter().map(Call::messages).max().unwrap() as u64,
        largest
    );
    assert!(assert_calls_within_limits(&proxy, 100, 8));
    assert_eq!(
        functions.store.store.dead_letter_count().await.unwrap(),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_element_is_dead_lettered_alone_and_the_rest_of_its_batch_completes() {
    let functions = serve_functions(fast_odte()).await;
    let proxy = proxy(
        functions.url.clone(),
        ProxyOptions {
            latency: Duration::from_millis(10),
            ..ProxyOptions::default()
        },
    )
    .await;
    let root = unique("refused");
    let mut messages = burst(&root, 3, 10);
    // The 15th of 30 (device 3's fifth): a reading that is not a number.
    let (_, bad_event, bad_payload) = &mut messages[14];
    *bad_payload = payload(bad_event.1, json!("high"));
    let bad_event = bad_event.clone();
    let bad_payload = bad_payload.clone();
    // One lane: the whole burst queues behind the first message.
    let config = burst_config(&proxy.url, &root, 1, 64);
    queue_for_session(&config, &messages).await;
    let stats = run_queued(config, 29, 1).await;

    let good: BTreeSet<(String, i64)> = messages
        .iter()
        .map(|(_, e, _)| e.clone())
        .filter(|e| *e != bad_event)
        .collect();
    assert_exactly_once_in_order(&functions.store.store, &good).await;
    let letters = functions.store.store.dead_letters(100, None).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.stage, "physicalevents");
    assert_eq!(letter.status, Some(400));
    assert_eq!(
        letter.error,
        "data.iot.sensor.energy: expected a number, got a string"
    );
    assert_eq!(letter.device_id.as_deref(), Some(bad_event.0.as_str()));
    assert_eq!(letter.payload_bytes, bad_payload.len() as i64);

    // It went in an array with others, and only it was left out of the next route's call.
    let calls = proxy.calls();
    let (at, batch) = calls
        .iter()
        .enumerate()
        .find(|(_, c)| {
            c.route == "/physicalevents"
                && c.body.as_array().is_some_and(|elements| {
                    elements
                        .iter()
                        .any(|e| e["data"]["iot.sensor.energy"] == "high")
                })
        })
        .expect("the refused message was sent in an array");
    let len = batch.messages();
    assert!(len > 1, "{batch:?}");
    let next = calls[at + 1..]
        .iter()
        .find(|c| c.route == "/physicalstates")
        .unwrap();
    assert_eq!(next.messages(), len - 1, "{next:?}");
    assert_eq!(stats.batch_fallbacks.load(Ordering::Relaxed), 0);
    assert_eq!(stats.batched_events.load(Ordering::Relaxed), 30);
    assert!(stats.largest_batch.load(Ordering::Relaxed) > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_one_never_sends_an_array() {
    let functions = serve_functions(fast_odte()).await;
    let proxy = proxy(
        functions.url.clone(),
        ProxyOptions {
            latency: Duration::from_millis(10),
            ..ProxyOptions::default()
        },
    )
    .await;
    let root = unique("unbatched");
    let messages = burst(&root, 2, 20);
    let config = burst_config(&proxy.url, &root, 1, 1);
    queue_for_session(&config, &messages).await;
    let stats = run_queued(config, 40, 0).await;

    let events: BTreeSet<(String, i64)> = messages.iter().map(|(_, e, _)| e.clone()).collect();
    assert_exactly_once_in_order(&functions.store.store, &events).await;
    assert_eq!(stats.largest_batch.load(Ordering::Relaxed), 1);
    assert_eq!(stats.batches.load(Ordering::Relaxed), 40);
    assert_eq!(stats.batched_events.load(Ordering::Relaxed), 40);
    assert!(
        !assert_calls_within_limits(&proxy, 40, 1),
        "every call is one JSON object"
    );
    assert_eq!(proxy.calls().len(), 4 * 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_that_take_only_objects_get_each_message_of_a_refused_batch_alone() {
    // As the seed's functions: an array is refused with a 400. Nothing is dead-lettered for
    // having been batched.
    let functions = serve_functions(fast_odte()).await;
    let proxy = proxy(
        functions.url.clone(),
        ProxyOptions {
            latency: Duration::from_millis(10),
            refuse_arrays: true,
            ..ProxyOptions::default()
        },
    )
    .await;
    let root = unique("objects");
    let messages = burst(&root, 2, 15);
    let config = burst_config(&proxy.url, &root, 1, 64);
    queue_for_session(&config, &messages).await;
    let stats = run_queued(config, 30, 0).await;

    let events: BTreeSet<(String, i64)> = messages.iter().map(|(_, e, _)| e.clone()).collect();
    assert_exactly_once_in_order(&functions.store.store, &events).await;
    let fallbacks = stats.batch_fallbacks.load(Ordering::Relaxed) as usize;
    assert!(fallbacks > 0, "batches formed and were refused");
    let refused: Vec<Call> = proxy
        .calls()
        .into_iter()
        .filter(|c| c.status == 400)
        .collect();
    assert_eq!(refused.len(), fallbacks);
    assert!(refused.iter().all(|c| c.body.is_array()));
    // Every message was then stored by single calls: 30 objects on each route.
    for route in entwine_connector::ROUTES {
        let objects = proxy
            .calls_of(route)
            .into_iter()
            .filter(|c| c.body.is_object())
            .collect::<Vec<_>>();
        assert_eq!(objects.len(), 30, "{route}");
        assert!(objects.iter().all(|c| c.status == 200), "{route}");
    }
    assert_eq!(
        functions.store.store.dead_letter_count().await.unwrap(),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answered_503_while_postgresql_is_down_is_retried_whole_and_nothing_is_lost() {
    let cluster = PgCluster::start().await;
    let store = Store::postgres(cluster.options(), &StoreOptions::default());
    store.migrate().await.unwrap();
    let functions = serve_functions_on_store(store.clone()).await;
    let gate = Gate::new();
    let proxy = proxy(
        functions.url.clone(),
        ProxyOptions {
            latency: Duration::from_millis(10),
            hold_first_batch: Some(gate.clone()),
            ..ProxyOptions::default()
        },
    )
    .await;
    let root = unique("batch503");
    let messages = burst(&root, 3, 20);
    let config = burst_config(&proxy.url, &root, 1, 64);
    queue_for_session(&config, &messages).await;
    let connector = start_connector(config).await;

    // The first batch reaches the functions while PostgreSQL is down: 503, retried whole.
    gate.seen.notified().await;
    cluster.crash().await;
    gate.open.send_replace(true);
    let stats = connector.stats.clone();
    eventually(
        Duration::from_secs(30),
        "the batch retried while PostgreSQL is down",
        || {
            let stats = stats.clone();
            async move { stats.retries.load(Ordering::Relaxed) >= 3 }
        },
    )
    .await;
    cluster.restart_after_crash().await;
    wait_until_finished(&connector, 60, 0).await;
    let stats = connector.stats.clone();
    connector.stop().await;

    let events: BTreeSet<(String, i64)> = messages.iter().map(|(_, e, _)| e.clone()).collect();
    assert_exactly_once_in_order(&store, &events).await;
    assert_eq!(
        entwine_testing::scalar(&store, "SELECT COUNT(*) FROM physicalstate").await,
        60
    );
    assert_eq!(store.dead_letter_count().await.unwrap(), (0, 0));
    // The held batch: answered 503 (at least three times), then 200, each time whole.
    let calls = proxy.calls();
    let held = calls
        .iter()
        .find(|c| c.route == "/physicalevents" && c.body.is_array())
        .unwrap();
    let attempts: Vec<u16> = calls
        .iter()
        .filter(|c| c.route == "/physicalevents" && c.body == held.body)
        .map(|c| c.status)
        .collect();
    assert!(held.messages() > 1, "{held:?}");
    assert!(attempts.len() >= 4, "{attempts:?}");
    let (last, failed) = attempts.split_last().unwrap();
    assert_eq!(*last, 200, "{attempts:?}");
    assert!(failed.iter().all(|s| *s == 503), "{attempts:?}");
    assert_eq!(stats.batch_fallbacks.load(Ordering::Relaxed), 0);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    store.close().await;
}

#[test]
fn the_connectors_batch_limits_are_the_functions() {
    use entwine_functions::http::{MAX_BATCH_BODY_BYTES, MAX_BATCH_ELEMENTS};
    assert_eq!(entwine_connector::MAX_BATCH, MAX_BATCH_ELEMENTS);
    assert_eq!(entwine_connector::MAX_BATCH_BYTES, MAX_BATCH_BODY_BYTES);
    // The defaults are within them.
    let config = connector_config("r", vec!["device/+/telemetry/device_state".into()], "c");
    assert_eq!(config.max_batch, 64);
    assert!(config.max_batch_bytes < MAX_BATCH_BODY_BYTES);
    config.check().unwrap();
}
