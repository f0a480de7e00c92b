//! Fault injection as a subscriber sees it on the wire, and `GET`/`PUT`/`DELETE /faults`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use entwine_device::faults::{FaultPlan, Faults, Preset};
use entwine_device::fleet::{state_topic, FleetOptions};
use entwine_device::Emulator;
use entwine_testing::{eventually, unique, Received, Subscriber};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{broker, conf, start, Running};

/// Maps the subscriber's arrival instants to wall-clock milliseconds, the payloads' clock.
struct Wall {
    unix_ms: f64,
    at: Instant,
}

impl Wall {
    fn now() -> Self {
        let at = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            * 1000.0;
        Self { unix_ms, at }
    }

    fn ms(&self, at: Instant) -> f64 {
        if at >= self.at {
            self.unix_ms + (at - self.at).as_secs_f64() * 1000.0
        } else {
            self.unix_ms - (self.at - at).as_secs_f64() * 1000.0
        }
    }

    /// How long after its payload's timestamp a message arrived, ms.
    fn latency(&self, r: &Received) -> f64 {
        self.ms(r.at) - timestamp(r) as f64
    }
}

fn timestamp(r: &Received) -> i64 {
    let v: Value = serde_json::from_slice(&r.payload).unwrap();
    v["timestamp"].as_i64().unwrap()
}

fn from(received: &[Received], device: &str) -> Vec<Received> {
    received
        .iter()
        .filter(|r| r.topic.split('/').nth(1) == Some(device))
        .cloned()
        .collect()
}

async fn start_with(
    conf: entwine_device::conf::DeviceConf,
    options: FleetOptions,
    plan: FaultPlan,
) -> Running {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator =
        Emulator::start_with_faults(conf, options, plan, broker(), http, stop.clone()).unwrap();
    let api = format!("http://{}", emulator.http_address);
    Running {
        emulator,
        stop,
        api,
    }
}

fn fleet(prefix: &str, count: usize) -> FleetOptions {
    FleetOptions {
        count,
        prefix: Some(prefix.to_owned()),
        qos: rumqttc::QoS::AtLeastOnce,
        ..FleetOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_delay_reaches_the_subscriber_as_latency_after_the_payload_timestamp() {
    let id = unique("delay");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let wall = Wall::now();
    let plan = FaultPlan::fleet(Faults {
        delay_ms: 200.0,
        ..Faults::NONE
    });
    let device = start_with(conf(&id, 5.0), FleetOptions::default(), plan).await;
    let received = witness
        .wait_for(Duration::from_secs(5), "five delayed messages", |r| {
            r.len() >= 5
        })
        .await;
    let stats = device.emulator.stats.clone();
    device.stop().await;
    for r in &received {
        let latency = wall.latency(r);
        // The timestamp is the creation time rounded down to the ms, so a 200 ms delay arrives
        // at least 200 ms later; 1 ms is left for reading the two clocks.
        assert!(
            (199.0..700.0).contains(&latency),
            "arrived {latency:.1} ms after its timestamp"
        );
    }
    assert!(stats.delayed_by_faults.load(Ordering::Relaxed) >= 5);
    assert_eq!(stats.dropped_by_faults.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_skew_shifts_the_timestamps_of_both_kinds_of_telemetry() {
    let id = unique("skew");
    let witness = Subscriber::start(&[format!("device/{id}/telemetry/#")]).await;
    let wall = Wall::now();
    let mut conf = conf(&id, 5.0);
    conf.single_resource_telemetry_enabled = true;
    let skew = 3_600_000;
    let plan = FaultPlan::fleet(Faults {
        clock_skew_ms: skew,
        ..Faults::NONE
    });
    let device = start_with(conf, FleetOptions::default(), plan).await;
    let received = witness
        .wait_for(Duration::from_secs(5), "both kinds of telemetry", |r| {
            r.len() >= 9
        })
        .await;
    device.stop().await;
    assert!(received.iter().any(|r| r.topic.ends_with("/device_state")));
    assert!(received.iter().any(|r| r.topic.ends_with("/energy")));
    for r in &received {
        let ahead = -wall.latency(r);
        assert!(
            (skew as f64 - 500.0..=skew as f64 + 1.0).contains(&ahead),
            "{}: timestamp {ahead:.1} ms ahead of its arrival",
            r.topic
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_faults_switches_a_preset_at_run_time_and_a_device_override_affects_that_device_only() {
    let prefix = unique("putfaults");
    let (one, two) = (format!("{prefix}-1"), format!("{prefix}-2"));
    let witness = Subscriber::start(&[state_topic(&one), state_topic(&two)]).await;
    let wall = Wall::now();
    let device = start(conf("unused", 10.0), fleet(&prefix, 2), broker()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/faults", device.api);
    let plan: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        plan,
        json!({"fleet": {"delayMs": 0.0, "jitterMs": 0.0, "loss": 0.0, "clockSkewMs": 0}, "devices": {}})
    );
    witness
        .wait_for(Duration::from_secs(5), "messages without faults", |r| {
            r.len() >= 4
        })
        .await;

    // Fleet-wide: layer 3, critical (175 ± 75 ms, 15 % loss).
    let response = client
        .put(&url)
        .json(&json!({"preset": "layer3-critical"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let critical = wall.ms(Instant::now());
    let answered: Value = response.json().await.unwrap();
    let expected = json!({"delayMs": 175.0, "jitterMs": 75.0, "loss": 0.15, "clockSkewMs": 0});
    assert_eq!(answered["fleet"], expected);
    let plan: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(plan, json!({"fleet": expected, "devices": {}}));

    // Device 2 alone: its clock an hour ahead, and no other fault (its own faults replace the
    // fleet's).
    let response = client
        .put(&url)
        .json(&json!({"device": two, "clockSkewMs": 3_600_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let overridden = Instant::now();
    let plan: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(plan["fleet"], expected);
    assert_eq!(
        plan["devices"],
        json!({&two: {"delayMs": 0.0, "jitterMs": 0.0, "loss": 0.0, "clockSkewMs": 3_600_000}})
    );

    // Messages already delayed by the critical preset arrive within 250 ms of the change.
    let settled = overridden + Duration::from_millis(300);
    let received = witness
        .wait_for(
            Duration::from_secs(10),
            "messages of both devices after the override",
            |r| {
                let after = |d: &str| from(r, d).iter().filter(|m| m.at > settled).count();
                after(&one) >= 5 && after(&two) >= 5
            },
        )
        .await;
    device.stop().await;

    let created_after_switch: Vec<Received> = from(&received, &one)
        .into_iter()
        .filter(|r| timestamp(r) as f64 > critical + 5.0)
        .collect();
    assert!(created_after_switch.len() >= 5);
    for r in &created_after_switch {
        let latency = wall.latency(r);
        assert!(
            latency >= 99.0,
            "device 1 under layer3-critical: {latency:.1} ms"
        );
    }
    for r in from(&received, &one).iter().filter(|m| m.at > settled) {
        let latency = wall.latency(r);
        assert!(
            (-1.0..1000.0).contains(&latency),
            "device 1's clock is right: {latency:.1} ms"
        );
    }
    for r in from(&received, &two).iter().filter(|m| m.at > settled) {
        let ahead = -wall.latency(r);
        assert!(
            (3_599_000.0..=3_600_001.0).contains(&ahead),
            "device 2's clock is an hour ahead: {ahead:.1} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_api_refuses_bad_values_naming_the_field_and_unknown_devices_with_404() {
    let prefix = unique("badfaults");
    let device = start(conf("unused", 1.0), fleet(&prefix, 2), broker()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/faults", device.api);
    for (body, field) in [
        (json!({"preset": "layer9"}), "preset"),
        (json!({"delayMs": -1}), "delayMs"),
        (json!({"jitterMs": "lots"}), "jitterMs"),
        (json!({"loss": 1.5}), "loss"),
        (json!({"clockSkewMs": 0.5}), "clockSkewMs"),
        (json!({"delayMs": 70_000}), "delayMs"),
        (json!({"latency": 5}), "latency"),
        (json!({"device": 7, "loss": 0.1}), "device"),
    ] {
        let response = client.put(&url).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field, "{error}");
        assert!(
            error["error"].as_str().unwrap().starts_with(field),
            "{error}"
        );
    }
    let response = client.put(&url).body("{nope").send().await.unwrap();
    assert_eq!(response.status(), 400);

    let response = client
        .put(&url)
        .json(&json!({"device": "somebody-else", "preset": "layer2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["field"], "device");
    assert!(
        error["error"].as_str().unwrap().contains("somebody-else"),
        "{error}"
    );
    let response = client
        .delete(format!("{url}?device=somebody-else"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Nothing changed; then a device override, removed alone, then everything cleared.
    let plan: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(plan, serde_json::to_value(FaultPlan::default()).unwrap());
    let two = format!("{prefix}-2");
    for body in [
        json!({"preset": "layer2"}),
        json!({"device": two, "preset": "none"}),
    ] {
        let response = client.put(&url).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200, "{body}");
    }
    let expected = FaultPlan {
        fleet: Preset::Layer2.faults(),
        devices: BTreeMap::from([(two.clone(), Faults::NONE)]),
    };
    assert_eq!(device.emulator.faults(), expected);
    let response = client
        .delete(format!("{url}?device={two}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(
        device.emulator.faults(),
        FaultPlan::fleet(Preset::Layer2.faults())
    );
    let response = client.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let plan: FaultPlan = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(plan, FaultPlan::default());

    let stats: Value = client
        .get(format!("{}/stats", device.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["dropped_by_faults"].is_u64(), "{stats}");
    assert!(stats["delayed_by_faults"].is_u64(), "{stats}");
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_loss_silences_one_device_and_counts_its_messages_as_dropped() {
    let prefix = unique("loss");
    let (one, two) = (format!("{prefix}-1"), format!("{prefix}-2"));
    let witness = Subscriber::start(&[state_topic(&one), state_topic(&two)]).await;
    let mut options = fleet(&prefix, 2);
    options.seed = 3;
    let device = start(conf("unused", 10.0), options, broker()).await;
    let client = reqwest::Client::new();
    let response = client
        .put(format!("{}/faults", device.api))
        .json(&json!({"device": one, "loss": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let silenced = Instant::now();
    let stats = device.emulator.stats.clone();
    let dropped_then = stats.dropped_by_faults.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "ten of device 1's messages lost",
        || {
            let stats = stats.clone();
            async move { stats.dropped_by_faults.load(Ordering::Relaxed) >= dropped_then + 10 }
        },
    )
    .await;
    device.stop().await;
    let aggregated = stats.aggregated.load(Ordering::Relaxed) as usize;
    // QoS 1 and Mosquitto: every message published reaches the subscriber.
    let received = witness
        .wait_for(Duration::from_secs(5), "every published message", |r| {
            r.len() >= aggregated
        })
        .await;
    assert_eq!(
        received.len(),
        aggregated,
        "lost messages are not published"
    );
    let from_one_after = from(&received, &one)
        .iter()
        .filter(|m| m.at > silenced + Duration::from_millis(50))
        .count();
    assert_eq!(from_one_after, 0, "device 1 is silent");
    assert!(from(&received, &two).len() >= 10, "device 2 is not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_in_flight_at_shutdown_are_still_published() {
    let id = unique("inflight");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let mut options = fleet(&id, 1);
    options.prefix = None;
    let plan = FaultPlan::fleet(Faults {
        delay_ms: 500.0,
        ..Faults::NONE
    });
    let device = start_with(conf(&id, 20.0), options, plan).await;
    let stats = device.emulator.stats.clone();
    // Stop while messages are held by the delay: some out already, at least five still waiting.
    eventually(Duration::from_secs(5), "messages held by the delay", || {
        let stats = stats.clone();
        async move {
            let out = stats.aggregated.load(Ordering::Relaxed);
            out >= 1 && stats.delayed_by_faults.load(Ordering::Relaxed) >= out + 5
        }
    })
    .await;
    let stopping = Instant::now();
    device.stop().await;
    let aggregated = stats.aggregated.load(Ordering::Relaxed) as usize;
    let delayed = stats.delayed_by_faults.load(Ordering::Relaxed) as usize;
    assert_eq!(stats.dropped_by_faults.load(Ordering::Relaxed), 0);
    assert_eq!(
        aggregated, delayed,
        "every delayed message was published, none given up"
    );
    let received = witness
        .wait_for(Duration::from_secs(5), "every published message", |r| {
            r.len() >= aggregated
        })
        .await;
    assert_eq!(received.len(), aggregated);
    let after_stop = received.iter().filter(|r| r.at > stopping).count();
    assert!(
        after_stop >= 5,
        "about 10 messages were in flight when the fleet stopped: {after_stop} arrived after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_beyond_the_stop_grace_is_counted_as_dropped_at_shutdown() {
    let id = unique("toolate");
    let witness = Subscriber::start(&[state_topic(&id)]).await;
    let plan = FaultPlan::fleet(Faults {
        delay_ms: 30_000.0,
        ..Faults::NONE
    });
    let device = start_with(conf(&id, 10.0), FleetOptions::default(), plan).await;
    let stats = device.emulator.stats.clone();
    eventually(Duration::from_secs(5), "five messages delayed", || {
        let stats = stats.clone();
        async move { stats.delayed_by_faults.load(Ordering::Relaxed) >= 5 }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), device.stop())
        .await
        .expect("the fleet does not wait out a 30 s delay");
    let delayed = stats.delayed_by_faults.load(Ordering::Relaxed);
    assert!(delayed >= 5, "{delayed} delayed");
    assert_eq!(stats.dropped_by_faults.load(Ordering::Relaxed), delayed);
    // Nothing was published, so nothing reached the broker.
    assert_eq!(stats.aggregated.load(Ordering::Relaxed), 0);
    assert!(witness.received().is_empty());
}

#[tokio::test]
async fn a_plan_naming_a_device_outside_the_fleet_is_refused() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plan = FaultPlan {
        fleet: Faults::NONE,
        devices: BTreeMap::from([("nobody".to_owned(), Faults::NONE)]),
    };
    let err = Emulator::start_with_faults(
        conf(&unique("plan"), 1.0),
        FleetOptions::default(),
        plan,
        broker(),
        http,
        CancellationToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("devices.nobody"), "{err}");
}
