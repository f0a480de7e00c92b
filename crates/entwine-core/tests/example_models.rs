//! The example device models of `examples/models` (documented in `docs/MODELS.md`) load, bind
//! the devices they say, have the profiles and topics they say, and accept and refuse payloads
//! as their properties say.

use std::path::PathBuf;

use entwine_core::model::{Binding, Model, ModelSet, Profiles, PropertyType};
use entwine_core::odte::OdteConfig;
use serde_json::{json, Map, Value};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models")
}

/// Every `*.json` file of `examples/models`, parsed, by file name.
fn load() -> Vec<Model> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .expect("examples/models exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(path).expect("a readable model file");
            Model::parse(&name, &text).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn set() -> ModelSet {
    ModelSet::new(OdteConfig::seed_default(), load()).unwrap_or_else(|e| panic!("{e}"))
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn names(model: &Model) -> Vec<&str> {
    model.properties.iter().map(|p| p.name.as_str()).collect()
}

fn property<'a>(model: &'a Model, name: &str) -> &'a entwine_core::model::Property {
    model
        .properties
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{} has no property {name}", model.id))
}

/// `payload` is refused by `model`, the error naming `field`, the property and the model, and
/// saying `says`.
fn refused(model: &Model, payload: Value, field: &str, property: &str, says: &str) {
    let err = model.readings(&object(payload.clone())).unwrap_err();
    assert_eq!(err.field, field, "{payload}: {err}");
    assert!(err.reason.contains(says), "{payload}: {err}");
    assert!(
        err.reason
            .contains(&format!("property {property} of model {}", model.id)),
        "{payload}: {err}"
    );
}

#[test]
fn the_three_examples_load_and_each_device_finds_its_model() {
    let set = set();
    let ids: Vec<&str> = set.models().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["energy-meter", "packaging-plc", "vibration-sensor"]);
    for (device, model) in [
        ("vib-1", Some("vibration-sensor")),
        ("vib-pump-07", Some("vibration-sensor")),
        ("meter-1", Some("energy-meter")),
        ("plc-line3", Some("packaging-plc")),
        ("iiot-device-1-1", None),
        ("vibe-1", None),
    ] {
        match (set.bind(device), model) {
            (Binding::Seed, None) => {}
            (Binding::Model(m), Some(id)) => assert_eq!(m.id, id, "{device}"),
            (Binding::Seed, Some(id)) => panic!("{device} is the seed's, expected {id}"),
            (Binding::Model(m), None) => panic!("{device} is bound to {}, expected the seed", m.id),
        }
    }
    // Each twin is evaluated with its own model's profile, the seed's with the odte ConfigMap's.
    assert_eq!(set.profile_of("iiot-device-1-1").window_ms(), 30_000);
    assert_eq!(set.profile_of("vib-1").window_ms(), 5_000);
    assert_eq!(set.profile_of("meter-1").window_ms(), 300_000);
    assert_eq!(set.profile_of("plc-1").window_ms(), 30_000);
    for model in set.models() {
        assert_eq!(model.version, "1.0.0", "{}", model.id);
        assert!(!model.title.is_empty(), "{}", model.id);
        assert_eq!(model.source, format!("{}.json", model.id));
    }
}

#[test]
fn vibration_sensor() {
    let set = set();
    let m = set.get("vibration-sensor").unwrap();
    assert_eq!(m.title, "Vibration sensor");
    assert_eq!(m.event_type.as_deref(), Some("vibration"));
    let patterns: Vec<&str> = m.devices().iter().map(|p| p.as_str()).collect();
    assert_eq!(patterns, ["vib-*"]);
    assert_eq!(m.profile.expected_update_rate(), 10.0);
    assert_eq!(m.profile.window_ms(), 5_000);
    assert_eq!(m.profile.timeliness_ms(), 200);
    assert_eq!(m.profile.threshold(), 0.9);
    assert_eq!(m.profile.silence_ms(), 10_000);
    assert_eq!(m.profile.availability_max_gap_ms(), None);
    assert_eq!(m.topic_of("x"), "device/x/telemetry/vibration");
    assert_eq!(m.topic_filter(), "device/+/telemetry/vibration");
    assert_eq!(
        names(m),
        ["crest_factor", "peak", "rms", "running", "temperature"]
    );
    let rms = property(m, "rms");
    assert_eq!(rms.kind, PropertyType::Number);
    assert_eq!(rms.unit.as_deref(), Some("mm/s"));
    assert_eq!((rms.minimum, rms.maximum), (Some(0.0), Some(50.0)));
    assert_eq!(rms.pointer, "/data/rms");
    assert_eq!(property(m, "temperature").unit.as_deref(), Some("°C"));
    assert_eq!(property(m, "peak").unit.as_deref(), Some("g"));
    assert_eq!(property(m, "running").kind, PropertyType::Boolean);
    assert_eq!(property(m, "running").pointer, "/data/state/running");
    assert!(property(m, "crest_factor").optional);

    let payload = json!({
        "timestamp": 1_764_756_000_000_i64,
        "type": "vibration",
        "data": {"rms": 2.8, "peak": 1.15, "temperature": 41.5, "state": {"running": true}}
    });
    let readings = m.readings(&object(payload)).unwrap();
    assert_eq!(
        Value::Object(readings),
        json!({"rms": 2.8, "peak": 1.15, "temperature": 41.5, "running": true})
    );
    let with_crest = json!({
        "timestamp": 1_764_756_000_100_i64,
        "data": {"rms": 0.4, "peak": 0.2, "crest_factor": 3.2, "temperature": 22.0,
                 "state": {"running": false}}
    });
    assert_eq!(
        m.readings(&object(with_crest)).unwrap()["crest_factor"],
        json!(3.2)
    );

    refused(
        m,
        json!({"timestamp": 1, "data": {"rms": 75.2, "peak": 1.0, "temperature": 40.0,
                                        "state": {"running": true}}}),
        "data.rms",
        "rms",
        "75.2 is greater than the maximum of 50",
    );
    refused(
        m,
        json!({"timestamp": 1, "data": {"rms": 2.0, "peak": 1.0, "temperature": 40.0,
                                        "state": {"running": "yes"}}}),
        "data.state.running",
        "running",
        "a boolean expected",
    );
    refused(
        m,
        json!({"timestamp": 1, "data": {"rms": 2.0, "peak": 1.0, "state": {"running": true}}}),
        "data.temperature",
        "temperature",
        "missing",
    );
}

#[test]
fn energy_meter() {
    let set = set();
    let m = set.get("energy-meter").unwrap();
    assert_eq!(m.title, "Three-phase energy meter");
    assert_eq!(m.event_type, None);
    let patterns: Vec<&str> = m.devices().iter().map(|p| p.as_str()).collect();
    assert_eq!(patterns, ["meter-*"]);
    assert!((m.profile.expected_update_rate() - 1.0 / 60.0).abs() < 1e-12);
    assert_eq!(m.profile.window_ms(), 300_000);
    assert_eq!(m.profile.timeliness_ms(), 5_000);
    assert_eq!(m.profile.threshold(), 0.8);
    assert_eq!(m.profile.silence_ms(), 180_000);
    assert_eq!(m.topic_of("x"), "device/x/telemetry/energy");
    assert_eq!(
        names(m),
        [
            "active_energy",
            "active_power",
            "current",
            "frequency",
            "power_factor",
            "power_failures",
            "sequence",
            "voltage"
        ]
    );
    assert_eq!(property(m, "active_energy").unit.as_deref(), Some("kWh"));
    assert_eq!(
        property(m, "active_energy").pointer,
        "/data/energy/active_import"
    );
    assert_eq!(property(m, "active_power").unit.as_deref(), Some("kW"));
    assert_eq!(property(m, "voltage").unit.as_deref(), Some("V"));
    assert_eq!(property(m, "voltage").pointer, "/data/voltage");
    assert_eq!(property(m, "sequence").kind, PropertyType::Integer);
    assert_eq!(property(m, "sequence").maximum, Some(4_294_967_295.0));
    assert_eq!(property(m, "power_failures").kind, PropertyType::Integer);

    let payload = json!({
        "timestamp": 1_764_756_000_000_i64,
        "data": {
            "energy": {"active_import": 18_234.7},
            "power": {"active": 12.48},
            "voltage": 231.4,
            "current": 18.2,
            "power_factor": 0.97,
            "frequency": 50.01,
            "counters": {"sequence": 4_093_211, "power_failures": 3}
        }
    });
    let readings = m.readings(&object(payload.clone())).unwrap();
    assert_eq!(readings.len(), 8);
    assert_eq!(readings["active_energy"], json!(18_234.7));
    assert_eq!(readings["sequence"], json!(4_093_211));

    let mut fractional = payload.clone();
    fractional["data"]["counters"]["sequence"] = json!(12.5);
    refused(
        m,
        fractional,
        "data.counters.sequence",
        "sequence",
        "an integer expected",
    );
    let mut power_factor = payload.clone();
    power_factor["data"]["power_factor"] = json!(1.2);
    refused(
        m,
        power_factor,
        "data.power_factor",
        "power_factor",
        "greater than the maximum of 1",
    );
    let mut negative = payload;
    negative["data"]["energy"]["active_import"] = json!(-1);
    refused(
        m,
        negative,
        "data.energy.active_import",
        "active_energy",
        "less than the minimum of 0",
    );
}

#[test]
fn packaging_plc() {
    let set = set();
    let m = set.get("packaging-plc").unwrap();
    assert_eq!(m.title, "Packaging line PLC");
    let patterns: Vec<&str> = m.devices().iter().map(|p| p.as_str()).collect();
    assert_eq!(patterns, ["plc-*"]);
    assert_eq!(m.profile.expected_update_rate(), 1.0);
    assert_eq!(m.profile.window_ms(), 30_000);
    assert_eq!(m.profile.timeliness_ms(), 500);
    assert_eq!(m.profile.threshold(), 0.9);
    assert_eq!(m.profile.silence_ms(), 15_000);
    assert_eq!(m.topic_of("x"), "device/x/telemetry/line");
    assert_eq!(
        names(m),
        [
            "air_pressure",
            "alarm_code",
            "alarm_text",
            "estop",
            "film_tension",
            "good_count",
            "guards_closed",
            "line_speed",
            "line_speed_setpoint",
            "mode",
            "recipe",
            "reject_count",
            "sealer_temperature",
            "state"
        ]
    );
    let kinds = |kind| {
        let mut of: Vec<&str> = m
            .properties
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.name.as_str())
            .collect();
        of.sort_unstable();
        of
    };
    assert_eq!(
        kinds(PropertyType::Integer),
        ["alarm_code", "good_count", "reject_count"]
    );
    assert_eq!(kinds(PropertyType::Boolean), ["estop", "guards_closed"]);
    assert_eq!(
        kinds(PropertyType::String),
        ["alarm_text", "mode", "recipe", "state"]
    );
    assert_eq!(property(m, "line_speed").pointer, "/data/line/speed");
    assert_eq!(property(m, "estop").pointer, "/data/safety/estop");
    assert_eq!(
        property(m, "mode").choices,
        [json!("production"), json!("maintenance"), json!("manual")]
    );
    assert!(property(m, "alarm_code").optional && property(m, "alarm_text").optional);

    let payload = json!({
        "timestamp": 1_764_756_000_000_i64,
        "data": {
            "packml": {"state": "execute", "mode": "production"},
            "recipe": "FW-250G-PP30",
            "line": {"speed": 182.5, "setpoint": 185.0},
            "counters": {"good": 48_211, "reject": 37},
            "sealer": {"temperature": 168.2},
            "film": {"tension": 42.0},
            "pneumatics": {"pressure": 6.1},
            "safety": {"estop": false, "guards_closed": true}
        }
    });
    let readings = m.readings(&object(payload.clone())).unwrap();
    assert_eq!(readings.len(), 12, "the two optional alarm tags are absent");
    assert_eq!(readings["state"], json!("execute"));
    assert_eq!(readings["line_speed"], json!(182.5));
    assert_eq!(readings["estop"], json!(false));

    let mut alarm = payload.clone();
    alarm["data"]["packml"]["state"] = json!("held");
    alarm["data"]["alarm"] = json!({"code": 4102, "text": "Film splice required"});
    let readings = m.readings(&object(alarm)).unwrap();
    assert_eq!(
        (&readings["alarm_code"], &readings["alarm_text"]),
        (&json!(4102), &json!("Film splice required"))
    );

    let mut mode = payload.clone();
    mode["data"]["packml"]["mode"] = json!("auto");
    refused(m, mode, "data.packml.mode", "mode", "a string expected");
    let mut estop = payload.clone();
    estop["data"]["safety"]["estop"] = json!(0);
    refused(m, estop, "data.safety.estop", "estop", "a boolean expected");
    let mut count = payload.clone();
    count["data"]["counters"]["good"] = json!("48211");
    refused(
        m,
        count,
        "data.counters.good",
        "good_count",
        "an integer expected",
    );
    let mut missing = payload;
    missing["data"]["line"]
        .as_object_mut()
        .unwrap()
        .remove("speed");
    refused(m, missing, "data.line.speed", "line_speed", "missing");
}
