//! Fleets mixing the seed's devices with devices of models (issue #14), on the real broker.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use entwine_core::model::Model;
use entwine_core::state::{AGGREGATED_STATE_TYPE, TEMPERATURE_KEY};
use entwine_device::faults::{FaultPlan, Faults};
use entwine_device::fleet::{state_topic, FleetOptions, ModelGroup};
use entwine_device::{DeviceError, Emulator};
use entwine_testing::{eventually, unique, Received, Subscriber};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::{broker, conf};

/// A 10 Hz vibration sensor bound to `<tag>-vib-*`, publishing to its own topic.
fn vibration(tag: &str) -> Arc<Model> {
    let doc = json!({
        "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
        "@type": "tm:ThingModel",
        "title": "Vibration sensor",
        "version": {"model": "1.0.0"},
        "entwine:id": "vibration",
        "entwine:devices": [format!("{tag}-vib-*")],
        "entwine:odte": {"expected_update_rate": 10, "time_window": 5, "desired_timeliness": 0.2},
        "properties": {
            "rms": {"type": "number", "unit": "mm/s", "minimum": 0, "maximum": 50},
            "running": {"type": "boolean", "entwine:pointer": "/data/state/running"}
        },
        "forms": [{"op": "observeallproperties", "href": "mqtt://broker",
                   "mqv:filter": "device/{{deviceId}}/telemetry/vibration"}]
    });
    Arc::new(Model::parse("vibration.json", &doc.to_string()).unwrap())
}

/// A 4 Hz machine with integer, boolean and string (enumerated and free) properties, an event
/// type, and the default topic (the seed's state topic).
fn machine(tag: &str) -> Arc<Model> {
    let doc = json!({
        "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
        "@type": "tm:ThingModel",
        "title": "Machine",
        "version": {"model": "3.2.0"},
        "entwine:id": "machine",
        "entwine:eventType": "machine_state",
        "entwine:devices": [format!("{tag}-m?-*"), format!("{tag}-machine-*")],
        "entwine:odte": {"expected_update_rate": 4, "time_window": 5},
        "properties": {
            "cycles": {"type": "integer", "minimum": 0, "maximum": 1000},
            "alarm": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["idle", "run", "maintenance"]},
            "operator": {"type": "string", "entwine:optional": true,
                         "entwine:pointer": "/data/shift/operator"}
        }
    });
    Arc::new(Model::parse("machine.json", &doc.to_string()).unwrap())
}

fn device_of(r: &Received) -> &str {
    r.topic.split('/').nth(1).unwrap_or_default()
}

fn payload(r: &Received) -> Map<String, Value> {
    match serde_json::from_slice(&r.payload) {
        Ok(Value::Object(map)) => map,
        other => panic!("{}: not a JSON object: {other:?}", r.topic),
    }
}

/// The mean interval between `n` messages of `device` on the wire, after the first `skip` (which
/// may have waited for the connection).
fn mean_interval(received: &[Received], device: &str, skip: usize, n: usize) -> Duration {
    let at: Vec<Instant> = received
        .iter()
        .filter(|r| device_of(r) == device)
        .skip(skip)
        .take(n)
        .map(|r| r.at)
        .collect();
    assert_eq!(at.len(), n, "{device}: {} messages", at.len());
    (at[n - 1] - at[0]) / (n as u32 - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_publishes_each_models_payload_to_its_topic_at_its_rate() {
    let tag = unique("mix");
    let (vib, mach) = (vibration(&tag), machine(&tag));
    let options = FleetOptions {
        count: 2,
        prefix: Some(format!("{tag}-seed")),
        qos: rumqttc::QoS::AtLeastOnce,
        devices_per_connection: 3,
        seed: 17,
        models: vec![
            ModelGroup::new(vib.clone(), 3),
            ModelGroup {
                model: mach.clone(),
                count: 2,
                prefix: Some(format!("{tag}-machine-")),
            },
        ],
    };
    let seeds = [format!("{tag}-seed-1"), format!("{tag}-seed-2")];
    let vibs: Vec<String> = (1..=3).map(|n| format!("{tag}-vib-{n}")).collect();
    let machines = [format!("{tag}-machine-1"), format!("{tag}-machine-2")];
    let every: Vec<String> = seeds
        .iter()
        .chain(&vibs)
        .chain(&machines)
        .cloned()
        .collect();
    let filters: Vec<String> = every.iter().map(|id| format!("device/{id}/#")).collect();
    let witness = Subscriber::start(&filters).await;

    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start(conf("unused", 2.0), options, broker(), http, stop.clone())
        .expect("a mixed fleet starts");
    assert_eq!(
        emulator.device_ids, every,
        "seed devices first, then each group"
    );

    // 26 messages of each 10 Hz device: 2.5 s at 10 Hz; the others meanwhile send 5 and 10.
    let (skip, n) = (5, 21);
    let received = witness
        .wait_for(
            Duration::from_secs(10),
            "26 messages of each vibration sensor",
            |r| {
                vibs.iter()
                    .all(|v| r.iter().filter(|m| device_of(m) == v).count() >= skip + n)
                    && every.iter().all(|d| r.iter().any(|m| device_of(m) == d))
            },
        )
        .await;
    stop.cancel();
    let stats = emulator.stats.clone();
    emulator.wait().await.unwrap();

    for r in &received {
        let device = device_of(r);
        let p = payload(r);
        assert!(p["timestamp"].is_i64(), "{}: {p:?}", r.topic);
        if seeds.iter().any(|s| s == device) {
            assert_eq!(r.topic, state_topic(device));
            assert_eq!(p["type"], AGGREGATED_STATE_TYPE);
            assert!(p["data"][TEMPERATURE_KEY].is_f64(), "{p:?}");
        } else if vibs.iter().any(|v| v == device) {
            assert_eq!(r.topic, format!("device/{device}/telemetry/vibration"));
            assert!(!p.contains_key("type"), "no eventType, no type: {p:?}");
            vib.readings(&p)
                .unwrap_or_else(|e| panic!("{}: {e}: {p:?}", r.topic));
        } else {
            assert!(machines.iter().any(|m| m == device), "{}", r.topic);
            assert_eq!(r.topic, mach.topic_of(device));
            assert_eq!(p["type"], "machine_state");
            let readings = mach
                .readings(&p)
                .unwrap_or_else(|e| panic!("{}: {e}: {p:?}", r.topic));
            assert!(readings["cycles"].is_i64(), "{readings:?}");
            assert!(
                readings["operator"].is_string(),
                "optional, sent: {readings:?}"
            );
        }
    }

    // 10 Hz on the wire: one message every 100 ms, measured from the arrivals.
    for v in &vibs {
        let every = mean_interval(&received, v, skip, n);
        assert!(
            (Duration::from_millis(80)..=Duration::from_millis(125)).contains(&every),
            "{v}: one message every {every:?}, 100 ms expected"
        );
    }
    // The others at their own rates, far slower: the 10 Hz devices had 26 messages meanwhile.
    for (devices, most) in [(&seeds[..], 9), (&machines[..], 16)] {
        for d in devices {
            let count = received.iter().filter(|r| device_of(r) == d).count();
            assert!((1..=most).contains(&count), "{d}: {count} messages");
        }
    }

    // Every message due is accounted for once the fleet has stopped.
    let ticks = stats.ticks.load(Ordering::Relaxed);
    let published = stats.published.load(Ordering::Relaxed);
    let dropped = stats.dropped_by_faults.load(Ordering::Relaxed);
    assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    assert_eq!(
        ticks,
        published + dropped + stats.unsent_total(),
        "{}",
        stats.to_json()
    );
    assert_eq!(stats.aggregated.load(Ordering::Relaxed), published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_apply_to_model_devices_by_id() {
    let tag = unique("mfault");
    let vib = vibration(&tag);
    let (lost, kept) = (format!("{tag}-vib-1"), format!("{tag}-vib-2"));
    let witness = Subscriber::start(&[vib.topic_of(&lost), vib.topic_of(&kept)]).await;
    let options = FleetOptions {
        count: 0,
        qos: rumqttc::QoS::AtLeastOnce,
        seed: 3,
        models: vec![ModelGroup::new(vib, 2)],
        ..FleetOptions::default()
    };
    let plan = FaultPlan {
        fleet: Faults::NONE,
        devices: BTreeMap::from([(
            lost.clone(),
            Faults {
                loss: 1.0,
                ..Faults::NONE
            },
        )]),
    };
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start_with_faults(
        conf("unused", 1.0),
        options,
        plan,
        broker(),
        http,
        stop.clone(),
    )
    .unwrap();
    witness
        .wait_for(
            Duration::from_secs(5),
            "10 messages of the kept device",
            |r| r.iter().filter(|m| device_of(m) == kept).count() >= 10,
        )
        .await;
    let stats = emulator.stats.clone();
    eventually(Duration::from_secs(5), "drops counted", || {
        let stats = stats.clone();
        async move { stats.dropped_by_faults.load(Ordering::Relaxed) >= 5 }
    })
    .await;
    stop.cancel();
    emulator.wait().await.unwrap();
    assert!(
        witness.received().iter().all(|m| device_of(m) != lost),
        "a device losing every message sent one"
    );
    let ticks = stats.ticks.load(Ordering::Relaxed);
    let published = stats.published.load(Ordering::Relaxed);
    let dropped = stats.dropped_by_faults.load(Ordering::Relaxed);
    assert_eq!(
        ticks,
        published + dropped + stats.unsent_total(),
        "{}",
        stats.to_json()
    );
}

#[tokio::test]
async fn a_group_whose_ids_its_model_would_not_bind_is_refused_naming_the_model() {
    let tag = unique("refused");
    let start = |options: FleetOptions| async move {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Emulator::start(
            conf("unused", 1.0),
            options,
            broker(),
            http,
            CancellationToken::new(),
        )
    };
    let group = ModelGroup {
        model: vibration(&tag),
        count: 2,
        prefix: Some(format!("{tag}-pump-")),
    };
    let options = FleetOptions {
        models: vec![group],
        ..FleetOptions::default()
    };
    let err = start(options).await.unwrap_err();
    match &err {
        DeviceError::Model { model, reason } => {
            assert_eq!(model, "vibration");
            assert!(reason.contains(&format!("{tag}-pump-1")), "{reason}");
            assert!(reason.contains(&format!("{tag}-vib-*")), "{reason}");
        }
        other => panic!("not a model error: {other}"),
    }
    assert!(err.to_string().starts_with("model vibration: "), "{err}");

    // Seed devices that the model would bind are refused too: they send the seed's payload.
    let options = FleetOptions {
        count: 2,
        prefix: Some(format!("{tag}-vib")),
        models: vec![ModelGroup::new(vibration(&tag), 1)],
        ..FleetOptions::default()
    };
    let err = start(options).await.unwrap_err();
    assert!(
        matches!(&err, DeviceError::Model { model, reason } if model == "vibration" && reason.contains("seed device")),
        "{err}"
    );
}
