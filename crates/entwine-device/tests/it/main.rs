//! The emulator against the real Mosquitto: what a subscriber sees on the wire.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use entwine_device::conf::DeviceConf;
use entwine_device::fleet::{control_topic, state_topic, Broker, FleetOptions};
use entwine_device::Emulator;
use entwine_testing::{eventually, mqtt_address, unique, Subscriber};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod faults;
mod models;
mod outage;
mod schedule;

struct Running {
    emulator: Emulator,
    stop: CancellationToken,
    api: String,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.emulator.wait().await.unwrap();
    }
}

fn conf(device_id: &str, rate: f64) -> DeviceConf {
    let (host, port) = mqtt_address();
    DeviceConf {
        device_id: device_id.to_owned(),
        target_mqtt_broker_address: host,
        target_mqtt_broker_port: port,
        update_period_ms: (1000.0 / rate) as u64,
        update_initial_delay_ms: 0,
        aggregated_telemetry_msg_sec: rate,
        ..DeviceConf::default()
    }
}

async fn start(conf: DeviceConf, options: FleetOptions, broker: Broker) -> Running {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start(conf, options, broker, http, stop.clone()).unwrap();
    let api = format!("http://{}", emulator.http_address);
    Running {
        emulator,
        stop,
        api,
    }
}

fn broker() -> Broker {
    let (host, port) = mqtt_address();
    Broker {
        host,
        port,
        tls: false,
    }
}

/// Waits (up to `timeout`) until `n` messages arrived after `from`, and answers their mean
/// interval on the wire: the rate measured from arrival times, without sleeping for a while.
async fn mean_interval(
    witness: &Subscriber,
    from: Instant,
    n: usize,
    timeout: Duration,
) -> Duration {
    let received = witness
        .wait_for(timeout, &format!("{n} messages"), |r| {
            r.iter().filter(|m| m.at >= from).count() >= n
        })
        .await;
    let at: Vec<Instant> = received
        .iter()
        .filter(|m| m.at >= from)
        .take(n)
        .map(|m| m.at)
        .collect();
    (at[n - 1] - at[0]) / (n as u32 - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_conf_changes_the_message_rate_on_the_wire_at_once() {
    let id = unique("rate");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let device = start(conf(&id, 2.0), FleetOptions::default(), broker()).await;
    let started = Instant::now();
    let before = mean_interval(&witness, started, 4, Duration::from_secs(5)).await;
    assert!(
        (Duration::from_millis(350)..=Duration::from_millis(700)).contains(&before),
        "2 msg/s: one every {before:?}"
    );

    let client = reqwest::Client::new();
    let response = client
        .put(format!("{}/conf", device.api))
        .json(&json!({"aggregatedTelemetryMsgSec": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    // At once: the next messages come at the new rate (the first may still be on the old
    // timer's tick, so the count starts just after).
    let changed = Instant::now() + Duration::from_millis(100);
    let after = mean_interval(&witness, changed, 15, Duration::from_secs(5)).await;
    assert!(
        (Duration::from_millis(35)..=Duration::from_millis(70)).contains(&after),
        "20 msg/s: one every {after:?}"
    );

    let conf: Value = client
        .get(format!("{}/conf", device.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conf["aggregatedTelemetryMsgSec"], json!(20.0));
    assert_eq!(conf["deviceId"], json!(id));
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_put_conf_is_a_400_naming_the_key_and_changes_nothing() {
    let id = unique("badconf");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let device = start(conf(&id, 5.0), FleetOptions::default(), broker()).await;
    let client = reqwest::Client::new();
    for (body, field) in [
        (
            json!({"aggregatedTelemetryMsgSec": 0}),
            "aggregatedTelemetryMsgSec",
        ),
        (json!({"updatePeriodMs": "soon"}), "updatePeriodMs"),
        (json!({"updateInitialDelayMs": -1}), "updateInitialDelayMs"),
        (json!({"deviceId": "someone-else"}), "deviceId"),
        (json!({"aggregatedTelemetryMsgSec": 50, "rate": 2}), "rate"),
    ] {
        let response = client
            .put(format!("{}/conf", device.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field, "{error}");
        assert!(
            error["error"].as_str().unwrap().starts_with(field),
            "{error}"
        );
    }
    let response = client
        .put(format!("{}/conf", device.api))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // Still 5 msg/s.
    let interval = mean_interval(&witness, Instant::now(), 5, Duration::from_secs(5)).await;
    assert!(
        (Duration::from_millis(140)..=Duration::from_millis(280)).contains(&interval),
        "5 msg/s: one every {interval:?}"
    );
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_resource_telemetry_and_the_payload_filler_appear_on_the_wire() {
    let id = unique("single");
    let witness = Subscriber::start(&[format!("device/{id}/telemetry/#")]).await;
    let mut conf = conf(&id, 5.0);
    conf.single_resource_telemetry_enabled = true;
    conf.target_aggregated_telemetry_payload_size_byte = Some(512);
    let device = start(conf, FleetOptions::default(), broker()).await;
    let received = witness
        .wait_for(Duration::from_secs(5), "both kinds of telemetry", |r| {
            r.len() >= 9
        })
        .await;
    device.stop().await;
    let on = |suffix: &str| {
        received
            .iter()
            .filter(|r| r.topic == format!("device/{id}/telemetry/{suffix}"))
            .collect::<Vec<_>>()
    };
    let (states, energy, temperature) = (on("device_state"), on("energy"), on("temperature"));
    assert!(!states.is_empty() && !energy.is_empty() && !temperature.is_empty());
    for state in &states {
        assert_eq!(state.payload.len(), 512, "padded to the target size");
        let v: Value = serde_json::from_slice(&state.payload).unwrap();
        assert_eq!(v["type"], "iot.sensor.state.aggregated");
        assert!(v["data"]["iot.sensor.temperature"].is_f64());
    }
    let e: Value = serde_json::from_slice(&energy[0].payload).unwrap();
    assert_eq!(e["type"], "iot.sensor.energy");
    assert!(e["data"].is_f64() && e["timestamp"].is_i64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_listens_on_its_control_topic() {
    let id = unique("control");
    let device = start(conf(&id, 1.0), FleetOptions::default(), broker()).await;
    let stats = device.emulator.stats.clone();
    eventually(Duration::from_secs(5), "the connection", || {
        let stats = stats.clone();
        async move { stats.connections.load(Ordering::Relaxed) > 0 }
    })
    .await;
    let (host, port) = mqtt_address();
    let (client, mut eventloop) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new(unique("ctl"), host, port), 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // Repeat until seen: the subscription may land just after the connection.
    eventually(Duration::from_secs(5), "a control message", || {
        let (client, stats) = (client.clone(), stats.clone());
        let topic = control_topic(&id);
        async move {
            client
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    "{\"cmd\":\"ping\"}",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            stats.control_messages.load(Ordering::Relaxed) > 0
        }
    })
    .await;
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_spreads_its_devices_over_the_period_and_names_them_by_prefix() {
    let prefix = unique("spread");
    let topics: Vec<String> = (1..=5)
        .map(|i| state_topic(&format!("{prefix}-{i}")))
        .collect();
    let witness = Subscriber::start(&topics).await;
    let options = FleetOptions {
        count: 5,
        prefix: Some(prefix.clone()),
        devices_per_connection: 2,
        ..FleetOptions::default()
    };
    let device = start(conf("unused", 1.0), options, broker()).await;
    let received = witness
        .wait_for(Duration::from_secs(5), "a message from every device", |r| {
            topics.iter().all(|t| r.iter().any(|m| &m.topic == t))
        })
        .await;
    device.stop().await;
    let firsts: Vec<Instant> = topics
        .iter()
        .map(|t| received.iter().find(|m| &m.topic == t).unwrap().at)
        .collect();
    let spread = *firsts.iter().max().unwrap() - *firsts.iter().min().unwrap();
    // Five devices at 1 msg/s start 200 ms apart: the first messages span about 800 ms.
    assert!(
        spread >= Duration::from_millis(600),
        "first messages within {spread:?}: a burst"
    );
}

/// A TCP proxy to the broker that the test can cut and restore.
struct Proxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    let (host, port) = mqtt_address();
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect((host, port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, task }
    }

    /// Cuts every connection and stops listening.
    async fn cut(self) -> u16 {
        self.task.abort();
        let _ = self.task.await;
        self.port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reconnects_when_the_broker_comes_back() {
    let id = unique("reconnect");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let proxy = Proxy::start(0).await;
    let device = start(
        conf(&id, 10.0),
        FleetOptions::default(),
        Broker {
            host: "127.0.0.1".into(),
            port: proxy.port,
            tls: false,
        },
    )
    .await;
    witness
        .wait_for(Duration::from_secs(5), "messages through the proxy", |r| {
            r.len() >= 5
        })
        .await;
    let port = proxy.cut().await;
    let stats = device.emulator.stats.clone();
    eventually(Duration::from_secs(5), "the device to notice", || {
        let stats = stats.clone();
        async move { stats.connection_errors.load(Ordering::Relaxed) > 0 }
    })
    .await;
    let during = witness.received().len();
    let _proxy = Proxy::start(port).await;
    let back = Instant::now();
    // Backoff is at most 2 s (jittered), so the device is back well within 5 s.
    let received = witness
        .wait_for(
            Duration::from_secs(5),
            "messages after the broker came back",
            |r| r.iter().filter(|m| m.at > back).count() >= 5,
        )
        .await;
    assert!(received.len() > during);
    let stats = device.emulator.stats.clone();
    assert!(stats.connections.load(Ordering::Relaxed) >= 2);
    device.stop().await;
    // QoS 0: what was written to the socket is published (at most once); whatever else was
    // due is accounted for, none of it silently.
    assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.ticks.load(Ordering::Relaxed),
        stats.published.load(Ordering::Relaxed) + stats.unsent_total(),
        "{}",
        stats.to_json()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_broker_is_away_still_stops_at_once() {
    // Nothing listens there: the client's queue fills up and publishing waits.
    let port = entwine_testing::free_port();
    let device = start(
        conf(&unique("away"), 200.0),
        FleetOptions::default(),
        Broker {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        },
    )
    .await;
    // Ticks pile up while every connection attempt fails.
    let stats = device.emulator.stats.clone();
    eventually(
        Duration::from_secs(10),
        "failed attempts and due messages",
        || {
            let stats = stats.clone();
            async move {
                stats.connection_errors.load(Ordering::Relaxed) >= 2
                    && stats.ticks.load(Ordering::Relaxed) >= 100
            }
        },
    )
    .await;
    assert_eq!(device.emulator.stats.connections.load(Ordering::Relaxed), 0);
    tokio::time::timeout(Duration::from_secs(5), device.stop())
        .await
        .expect("the device stops within 5 s although its broker is away");
}
