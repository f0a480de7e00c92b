//! Starting the pieces of the pipeline for a test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use entwine_connector::{ConnectorConfig, ConnectorStats};
use entwine_core::odte::OdteConfig;
use entwine_device::conf::DeviceConf;
use entwine_device::fleet::{Broker, FleetOptions};
use entwine_device::Emulator;
use entwine_functions::handlers::{SystemClock, TwinFunctions};
use entwine_store::Store;
use entwine_testing::{eventually, mqtt_address, Received, TestStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The four functions served over HTTP on a port of their own, on a fresh PostgreSQL schema.
pub(crate) struct Functions {
    pub(crate) url: String,
    pub(crate) store: TestStore,
    stop: CancellationToken,
}

/// A short window so twins entangle within a test: 10 updates/s expected over 1 s.
pub(crate) fn fast_odte() -> OdteConfig {
    OdteConfig::new(10.0, 1.0, 1.0, 0.9).unwrap()
}

pub(crate) async fn serve_functions(odte: OdteConfig) -> Functions {
    let store = TestStore::postgres().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_functions_on(listener, store, odte)
}

pub(crate) fn serve_functions_on(
    listener: tokio::net::TcpListener,
    store: TestStore,
    odte: OdteConfig,
) -> Functions {
    serve_slow_functions_on(listener, store, odte, Duration::ZERO)
}

/// The functions behind a network that adds `latency` to every call, so a connector falls
/// behind a fast fleet and holds a backlog.
pub(crate) async fn serve_slow_functions(odte: OdteConfig, latency: Duration) -> Functions {
    let store = TestStore::postgres().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_slow_functions_on(listener, store, odte, latency)
}

fn serve_slow_functions_on(
    listener: tokio::net::TcpListener,
    store: TestStore,
    odte: OdteConfig,
    latency: Duration,
) -> Functions {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let functions = Arc::new(TwinFunctions::new(
        store.store.clone(),
        odte,
        Arc::new(SystemClock),
    ));
    let router = entwine_functions::http::router(functions).layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            tokio::time::sleep(latency).await;
            next.run(request).await
        },
    ));
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .unwrap();
    });
    Functions { url, store, stop }
}

impl Drop for Functions {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn connector_config(
    router_url: &str,
    topics: Vec<String>,
    client_id: &str,
) -> ConnectorConfig {
    let (host, port) = mqtt_address();
    let mut config = ConnectorConfig::new(&format!("{host}:{port}"), topics, router_url).unwrap();
    config.client_id = client_id.to_owned();
    config.lanes = 16;
    config.dead_letter_topic = entwine_testing::unique("deadletter");
    config.retry_initial = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(400);
    config.drain_timeout = Duration::from_secs(5);
    config
}

pub(crate) struct Connector {
    pub(crate) stats: Arc<ConnectorStats>,
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<anyhow::Result<()>>,
}

/// Starts a connector and waits until its subscription is in place.
pub(crate) async fn start_connector(config: ConnectorConfig) -> Connector {
    let stats = Arc::new(ConnectorStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(entwine_connector::run(config, stats.clone(), stop.clone()));
    let watched = stats.clone();
    eventually(
        Duration::from_secs(10),
        "the connector's subscription",
        || {
            let stats = watched.clone();
            async move { stats.subscribed.load(Ordering::Relaxed) > 0 }
        },
    )
    .await;
    Connector { stats, stop, task }
}

impl Connector {
    /// Graceful stop, as on SIGTERM.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the connector stops within 15 s")
            .unwrap()
            .unwrap();
    }
}

/// A device configuration publishing `rate` aggregated messages per second from the start.
pub(crate) fn fast_device(rate: f64) -> DeviceConf {
    let (host, port) = mqtt_address();
    DeviceConf {
        target_mqtt_broker_address: host,
        target_mqtt_broker_port: port,
        update_period_ms: (1000.0 / rate) as u64,
        update_initial_delay_ms: 0,
        aggregated_telemetry_msg_sec: rate,
        ..DeviceConf::default()
    }
}

pub(crate) struct Fleet {
    pub(crate) emulator: Emulator,
    pub(crate) stop: CancellationToken,
}

pub(crate) async fn start_fleet(prefix: &str, count: usize, rate: f64) -> Fleet {
    let conf = fast_device(rate);
    let broker = Broker {
        host: conf.target_mqtt_broker_address.clone(),
        port: conf.target_mqtt_broker_port,
        tls: false,
    };
    let options = FleetOptions {
        count,
        prefix: Some(prefix.to_owned()),
        qos: rumqttc::QoS::AtLeastOnce,
        devices_per_connection: 8,
        seed: 42,
        ..Default::default()
    };
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start(conf, options, broker, http, stop.clone()).unwrap();
    Fleet { emulator, stop }
}

impl Fleet {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.emulator.wait().await.unwrap();
    }
}

/// `(device id, device timestamp)` of each telemetry message received.
pub(crate) fn events(received: &[Received]) -> BTreeSet<(String, i64)> {
    received
        .iter()
        .map(|r| {
            let device = r.topic.split('/').nth(1).unwrap().to_owned();
            let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (device, payload["timestamp"].as_i64().unwrap())
        })
        .collect()
}

/// One row per physical state, with its digital state's evaluation.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Row {
    pub(crate) device_id: String,
    pub(crate) device_timestamp: i64,
    pub(crate) digital_states: i64,
    pub(crate) odte: Option<f32>,
    pub(crate) lifecycle: Option<String>,
}

pub(crate) async fn rows(store: &Store) -> Vec<Row> {
    let Store::Postgres(pool) = store else {
        panic!("end-to-end tests run on PostgreSQL")
    };
    sqlx::query_as(
        "SELECT p.device_id, p.device_timestamp,
                COUNT(d.id) AS digital_states, MAX(d.odte) AS odte, MAX(d.lifecycle) AS lifecycle
         FROM physicalstate p LEFT JOIN digitalstate d ON d.physicalstate_id = p.id
         GROUP BY p.id ORDER BY p.id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

pub(crate) async fn physical_count(store: &Store) -> i64 {
    entwine_testing::scalar(
        store,
        "SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL",
    )
    .await
}

/// Every published event has exactly one physical and one evaluated digital state, and each
/// device's events were stored in the order the device sent them.
pub(crate) async fn assert_exactly_once_in_order(
    store: &Store,
    published: &BTreeSet<(String, i64)>,
) {
    assert_exactly_once(store, published).await;
    let rows = rows(store).await;
    let mut by_device: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for row in &rows {
        by_device
            .entry(row.device_id.as_str())
            .or_default()
            .push(row.device_timestamp);
    }
    for (device, timestamps) in by_device {
        assert!(
            timestamps.windows(2).all(|w| w[0] < w[1]),
            "{device} stored out of order: {timestamps:?}"
        );
    }
}

/// Every published event has exactly one physical and one evaluated digital state.
pub(crate) async fn assert_exactly_once(store: &Store, published: &BTreeSet<(String, i64)>) {
    let rows = rows(store).await;
    let stored: BTreeSet<(String, i64)> = rows
        .iter()
        .map(|r| (r.device_id.clone(), r.device_timestamp))
        .collect();
    assert_eq!(rows.len(), stored.len(), "no event is stored twice");
    assert_eq!(
        &stored, published,
        "every published event is stored, and nothing else"
    );
    for row in &rows {
        assert_eq!(row.digital_states, 1, "{row:?}");
        assert!(row.odte.is_some() && row.lifecycle.is_some(), "{row:?}");
    }
}
