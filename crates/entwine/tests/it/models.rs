//! A mixed fleet through the whole chain of `entwine up --models DIR`: the seed's device, a
//! 10 Hz vibration sensor and an energy meter reporting once a minute, each twin entangled by
//! its own model's profile, a silent meter noticed within its own window, and a payload that
//! does not match its model refused, naming the property.
//!
//! Time is the test's: the functions read a clock the test moves (a minute of the meter takes
//! no time), and the test publishes each device's message over MQTT at its moment, payloads
//! made by the emulator's own generator ([`ModelSensors`]), then waits until the chain has
//! mirrored them before moving the clock on.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use entwine_core::model::Model;
use entwine_device::model_sensor::ModelSensors;
use entwine_platform::Platform;
use entwine_testing::{eventually, unique};
use serde_json::{json, Value};

/// The functions' clock, moved by the test.
struct TestClock(AtomicI64);

impl entwine_functions::handlers::Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn vibration() -> Value {
    json!({
        "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
        "@type": "tm:ThingModel",
        "title": "Vibration sensor",
        "version": {"model": "1.0.0"},
        "entwine:id": "vibration",
        "entwine:devices": ["vib-*"],
        "entwine:odte": {"expected_update_rate": 10, "time_window": 5, "desired_timeliness": 0.2},
        "properties": {
            "rms": {"type": "number", "unit": "mm/s", "minimum": 0, "maximum": 50},
            "running": {"type": "boolean", "entwine:pointer": "/data/state/running"}
        },
        "forms": [{"op": "observeallproperties", "href": "mqtt://broker",
                   "mqv:filter": "device/{{deviceId}}/telemetry/vibration"}]
    })
}

fn meter() -> Value {
    json!({
        "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
        "@type": "tm:ThingModel",
        "title": "Energy meter",
        "version": {"model": "3.2.0"},
        "entwine:id": "meter",
        "entwine:devices": ["meter-*"],
        "entwine:odte": {"expected_update_rate": 0.016666666666666666, "time_window": 300,
                         "desired_timeliness": 5, "silence_threshold": 180},
        "properties": {
            "energy_kwh": {"type": "number", "unit": "kWh", "minimum": 0, "maximum": 100000},
            "pulses": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "phase": {"type": "string", "enum": ["L1", "L2", "L3"]}
        },
        "forms": [{"op": "observeallproperties", "href": "mqtt://broker",
                   "mqv:filter": "device/{{deviceId}}/telemetry/energy"}]
    })
}

struct Chain {
    platform: Platform,
    api: String,
    clock: Arc<TestClock>,
    mqtt: rumqttc::AsyncClient,
    states: tokio::sync::broadcast::Receiver<entwine_core::state::DigitalState>,
}

impl Chain {
    /// Publishes `messages` (topic, payload) at the clock's time `t`, and waits until each has
    /// come out of the chain as a digital state.
    async fn at(&mut self, t: i64, messages: Vec<(String, Vec<u8>)>) {
        self.clock.0.store(t, Ordering::SeqCst);
        let count = messages.len();
        for (topic, payload) in messages {
            self.mqtt
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        for _ in 0..count {
            tokio::time::timeout(Duration::from_secs(20), self.states.recv())
                .await
                .expect("each message is mirrored within 20 s")
                .unwrap();
        }
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn twin(&self, id: &str) -> Value {
        self.get(&format!("/api/twins/{id}")).await
    }
}

fn seed_payload(t: i64) -> Vec<u8> {
    json!({"timestamp": t, "type": "iot.sensor.state.aggregated",
           "data": {"iot.sensor.energy": 2.5, "iot.sensor.temperature": 26.0}})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_entangles_each_twin_by_its_own_model_and_refuses_what_its_model_does_not_allow(
) {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::write(models.join("vibration.json"), vibration().to_string()).unwrap();
    std::fs::write(models.join("meter.json"), meter().to_string()).unwrap();
    let database = format!("sqlite://{}", dir.path().join("entwine.db").display());
    let flags = [
        "entwine",
        "up",
        "--database-url",
        &database,
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--devices",
        "0",
        "--models",
        models.to_str().unwrap(),
    ];
    let cli = entwine::cli::Cli::try_parse_from(flags).unwrap();
    let entwine::cli::Command::Up(args) = cli.command else {
        unreachable!("the flags start with `up`")
    };
    let mut config = entwine::local::platform_config(&args).unwrap();
    assert_eq!(
        config
            .models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["meter", "vibration"]
    );
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = Arc::new(TestClock(AtomicI64::new(t0)));
    config.clock = clock.clone();
    // This process's metrics recorder is another test's.
    config.metrics = false;
    let platform = Platform::start(config).await.unwrap();
    let states = platform.digital_states();
    let (host, port) = platform
        .broker()
        .address()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse().unwrap()))
        .unwrap();
    let (mqtt, mut eventloop) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new(unique("fleet"), host, port), 100);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let mut chain = Chain {
        api: format!("http://{}", platform.http_address()),
        platform,
        clock,
        mqtt,
        states,
    };

    let parse = |v: Value| Arc::new(Model::parse("test", &v.to_string()).unwrap());
    let mut vib = ModelSensors::new(parse(vibration()), 7);
    let mut meter1 = ModelSensors::new(parse(meter()), 8);
    // Each device measured 50 ms before the chain mirrors it: timely by every profile.
    let vib_message = |s: &mut ModelSensors, t: i64| {
        s.update();
        (
            "device/vib-1/telemetry/vibration".to_owned(),
            s.payload_bytes(t - 50),
        )
    };
    let meter_message = |s: &mut ModelSensors, t: i64| {
        s.update();
        (
            "device/meter-1/telemetry/energy".to_owned(),
            s.payload_bytes(t - 50),
        )
    };
    let seed_message = |t: i64| {
        (
            "device/plant-1/telemetry/device_state".to_owned(),
            seed_payload(t - 50),
        )
    };

    // 5 s of the vibration sensor at 10 Hz (and the seed's device every 5 s): its 5 s window
    // is full after 50 updates, and it entangles.
    for k in 0..=50 {
        let t = t0 + k * 100;
        let mut messages = vec![vib_message(&mut vib, t)];
        if k % 50 == 0 {
            messages.push(seed_message(t));
        }
        chain.at(t, messages).await;
    }
    let twin = chain.twin("vib-1").await;
    assert_eq!(twin["lifecycle"], "entangled", "{twin}");
    assert_eq!(twin["odte"], 1.0);
    assert_eq!(twin["model"], "vibration");

    // Then the seed's device every 5 s and the meter once a minute, from 10 s to 310 s. The
    // meter's 5 updates in 300 s make it reliable; the seed's profile (6 in 30 s) never would.
    let mut t = t0 + 10_000;
    while t <= t0 + 370_000 {
        let mut messages = vec![seed_message(t)];
        // The meter's sixth update, due at 370 s, never comes.
        if (t - t0 - 10_000) % 60_000 == 0 && t <= t0 + 310_000 {
            messages.push(meter_message(&mut meter1, t));
        }
        chain.at(t, messages).await;
        if t == t0 + 30_000 {
            // The vibration sensor's 10 s silence threshold passed: unbound by its own profile.
            eventually(Duration::from_secs(20), "vib-1 unbound", || async {
                chain.twin("vib-1").await["lifecycle"] == "unbound"
            })
            .await;
        }
        if t == t0 + 250_000 {
            // Bound for 240 s, less than its window: not yet judged.
            let twin = chain.twin("meter-1").await;
            assert_eq!(twin["lifecycle"], "bound", "{twin}");
        }
        if t == t0 + 310_000 {
            let meter = chain.twin("meter-1").await;
            assert_eq!(meter["lifecycle"], "entangled", "{meter}");
            assert_eq!(meter["reliability"], 1.0);
            assert_eq!(meter["model"], "meter");
            let seed = chain.twin("plant-1").await;
            assert_eq!(seed["lifecycle"], "entangled", "{seed}");
            assert!(seed.get("model").is_none(), "{seed}");
        }
        t += 5_000;
    }
    // Its window [70 s, 370 s] still holds 5 updates at 370 s.
    assert_eq!(chain.twin("meter-1").await["lifecycle"], "entangled");

    // At 371 s its window [71 s, 371 s] holds 4 of the 5 expected: disentangled 61 s after
    // its last update, within its own window, while the seed's device goes on.
    chain
        .at(t0 + 371_000, vec![seed_message(t0 + 371_000)])
        .await;
    eventually(Duration::from_secs(20), "meter-1 disentangled", || async {
        chain.twin("meter-1").await["lifecycle"] == "disentangled"
    })
    .await;
    let meter = chain.twin("meter-1").await;
    assert_eq!(meter["reliability"], 0.8, "{meter}");
    assert_eq!(chain.twin("plant-1").await["lifecycle"], "entangled");

    // The meter's readings are kept as its model says, in the history.
    let history = chain.get("/api/twins/meter-1/history?limit=1").await;
    let latest = &history["items"][0];
    assert_eq!(latest["model"], "meter", "{latest}");
    assert_eq!(latest["model_version"], "3.2.0");
    let readings = latest["readings"].as_object().unwrap();
    assert_eq!(
        readings.keys().collect::<Vec<_>>(),
        ["energy_kwh", "phase", "pulses"]
    );
    assert!(readings["pulses"].is_u64(), "{latest}");
    assert!(latest.get("temperature").is_none());

    // A meter payload whose pulses are not an integer: refused, naming the property.
    chain.clock.0.store(t0 + 372_000, Ordering::SeqCst);
    let bad = json!({"timestamp": t0 + 371_950,
                     "data": {"energy_kwh": 12.5, "pulses": "many", "phase": "L2"}});
    chain
        .mqtt
        .publish(
            "device/meter-2/telemetry/energy",
            rumqttc::QoS::AtLeastOnce,
            false,
            bad.to_string().into_bytes(),
        )
        .await
        .unwrap();
    let letter_of = |letters: Value| {
        letters["items"]
            .as_array()
            .and_then(|items| items.iter().find(|l| l["device_id"] == "meter-2").cloned())
    };
    eventually(
        Duration::from_secs(20),
        "a dead letter for meter-2",
        || async { letter_of(chain.get("/api/deadletters").await).is_some() },
    )
    .await;
    let letter = letter_of(chain.get("/api/deadletters").await).unwrap();
    assert_eq!(letter["stage"], "physicalevents", "{letter}");
    assert_eq!(letter["status"], 400);
    assert_eq!(
        letter["error"],
        "data.pulses: \"many\" is not of type \"integer\" (property pulses of model meter, an integer expected)"
    );
    assert!(chain.twin("meter-2").await.get("error").is_some());

    chain.platform.shutdown().await.unwrap();
}
