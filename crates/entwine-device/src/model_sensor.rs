//! The sensors of a device described by a [`Model`] (issue #14), and the payloads it publishes.
//!
//! Each property has a reading that changes on every update, drawn from one seeded generator
//! (`rand`'s small RNG), so a device's readings are the same for the same seed:
//!
//! - a property with `enum` values (`choices`, of any type) takes one of them, and another one
//!   with probability [`CHANGE_PROBABILITY`] per update;
//! - a number walks within [`minimum`, `maximum`] by a random fraction, up to [`MAX_STEP`], of
//!   that range per update, reflected at the bounds; a missing bound defaults to the range
//!   [0, 100] (or 100 beyond the bound that is given); an integer is that walk rounded (to a
//!   whole number within the bounds);
//! - a boolean flips with probability [`CHANGE_PROBABILITY`] per update;
//! - a string without `enum` is `<name>-<n>`, `n` drawn again with probability
//!   [`CHANGE_PROBABILITY`] per update.
//!
//! The payload ([`ModelSensors::payload`]) is `{"timestamp": <epoch ms>, "type": <the model's
//! eventType, only when it declares one>, …}` with each reading at its property's JSON pointer
//! (nested objects created as needed); optional properties are always sent. It is what
//! [`Model::readings`] accepts, as long as a property's schema says no more than `type`,
//! `minimum`, `maximum` and `enum` (a `maxLength`, `pattern`, `multipleOf` or an exclusive bound
//! is not known to the generator).

use std::sync::Arc;

use entwine_core::model::{Model, Property, PropertyType};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

/// The largest step of a number's random walk, as a fraction of its range.
pub const MAX_STEP: f64 = 0.05;

/// The probability, per update, that a boolean flips, or that an enumerated or free string
/// reading changes.
pub const CHANGE_PROBABILITY: f64 = 0.05;

/// The range of a bound the model does not give.
const DEFAULT_SPAN: f64 = 100.0;

/// The current reading of one property.
#[derive(Debug, Clone)]
enum Reading {
    /// A random walk in [lo, hi]; `integer` rounds what is sent.
    Walk {
        lo: f64,
        hi: f64,
        value: f64,
        integer: bool,
    },
    /// A boolean.
    Flag(bool),
    /// One of the property's `enum` values, by index.
    Choice(usize),
    /// `<name>-<n>`.
    Text(u32),
}

/// The bounds a number walks within: the model's, [0, 100] for those it does not give.
fn bounds(p: &Property) -> (f64, f64) {
    let (lo, hi) = match (p.minimum, p.maximum) {
        (Some(lo), Some(hi)) => (lo, hi),
        (Some(lo), None) => (
            lo,
            if lo < DEFAULT_SPAN {
                DEFAULT_SPAN
            } else {
                lo + DEFAULT_SPAN
            },
        ),
        (None, Some(hi)) => (if hi > 0.0 { 0.0 } else { hi - DEFAULT_SPAN }, hi),
        (None, None) => (0.0, DEFAULT_SPAN),
    };
    if p.kind == PropertyType::Integer {
        // The whole numbers within the bounds (when there are any), within i64's range.
        let (ilo, ihi) = (
            lo.ceil().max(i64::MIN as f64),
            hi.floor().min(i64::MAX as f64),
        );
        if ilo <= ihi {
            return (ilo, ihi);
        }
    }
    (lo, hi)
}

/// `a·(1 − u) + b·u`, finite for any finite `a` and `b`.
fn between(a: f64, b: f64, u: f64) -> f64 {
    (a * (1.0 - u) + b * u).clamp(a, b)
}

/// A JSON pointer's reference tokens, unescaped (`~1` is `/`, `~0` is `~`).
fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Puts `value` at `path` in `map`, creating the objects on the way. A path through a value
/// that is not an object is left alone: not reachable with a model that parsed, whose pointers
/// do not overlap and none of which is within `timestamp` or `type`.
fn place(map: &mut Map<String, Value>, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            if let Value::Object(inner) = map
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Map::new()))
            {
                place(inner, rest, value);
            }
        }
    }
}

/// A model device's sensors: one reading per property, and their random source.
#[derive(Debug, Clone)]
pub struct ModelSensors {
    model: Arc<Model>,
    readings: Vec<Reading>,
    /// Each property's pointer, split once.
    places: Vec<Vec<String>>,
    rng: SmallRng,
}

impl ModelSensors {
    /// The sensors of `model`'s properties, started at random readings drawn from `seed`.
    pub fn new(model: Arc<Model>, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let readings = model
            .properties
            .iter()
            .map(|p| {
                if !p.choices.is_empty() {
                    return Reading::Choice(rng.random_range(0..p.choices.len()));
                }
                match p.kind {
                    PropertyType::Number | PropertyType::Integer => {
                        let (lo, hi) = bounds(p);
                        Reading::Walk {
                            lo,
                            hi,
                            value: between(lo, hi, rng.random()),
                            integer: p.kind == PropertyType::Integer,
                        }
                    }
                    PropertyType::Boolean => Reading::Flag(rng.random()),
                    PropertyType::String => Reading::Text(rng.random_range(1..=9)),
                }
            })
            .collect();
        let places = model
            .properties
            .iter()
            .map(|p| tokens(&p.pointer))
            .collect();
        Self {
            model,
            readings,
            places,
            rng,
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// One update of every reading.
    pub fn update(&mut self) {
        let rng = &mut self.rng;
        for (reading, p) in self.readings.iter_mut().zip(&self.model.properties) {
            match reading {
                Reading::Walk { lo, hi, value, .. } => {
                    let span = *hi - *lo;
                    let span = if span.is_finite() { span } else { f64::MAX };
                    let magnitude = rng.random::<f64>() * MAX_STEP * span;
                    let mut next = if rng.random_bool(0.5) {
                        *value + magnitude
                    } else {
                        *value - magnitude
                    };
                    if next > *hi {
                        next = *hi - (next - *hi);
                    } else if next < *lo {
                        next = *lo + (*lo - next);
                    }
                    *value = if next.is_finite() {
                        next.clamp(*lo, *hi)
                    } else {
                        *value
                    };
                }
                Reading::Flag(on) => {
                    if rng.random_bool(CHANGE_PROBABILITY) {
                        *on = !*on;
                    }
                }
                Reading::Choice(index) => {
                    if rng.random_bool(CHANGE_PROBABILITY) {
                        *index = rng.random_range(0..p.choices.len());
                    }
                }
                Reading::Text(n) => {
                    if rng.random_bool(CHANGE_PROBABILITY) {
                        *n = rng.random_range(1..=9);
                    }
                }
            }
        }
    }

    /// The reading of property `p` (at index `i`).
    fn value(&self, i: usize, p: &Property) -> Value {
        match &self.readings[i] {
            Reading::Walk {
                value,
                integer: true,
                ..
            } => Value::from(value.round() as i64),
            Reading::Walk { value, .. } => Value::from(*value),
            Reading::Flag(on) => Value::Bool(*on),
            Reading::Choice(index) => p.choices[*index].clone(),
            Reading::Text(n) => Value::String(format!("{}-{n}", p.name)),
        }
    }

    /// The current readings, by property name.
    pub fn readings(&self) -> Map<String, Value> {
        self.model
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), self.value(i, p)))
            .collect()
    }

    /// The payload at `timestamp_ms`: the timestamp, the model's event type when it declares
    /// one, and every reading at its pointer.
    pub fn payload(&self, timestamp_ms: i64) -> Map<String, Value> {
        let mut root = Map::new();
        root.insert("timestamp".into(), Value::from(timestamp_ms));
        if let Some(kind) = &self.model.event_type {
            root.insert("type".into(), Value::String(kind.clone()));
        }
        for (i, p) in self.model.properties.iter().enumerate() {
            place(&mut root, &self.places[i], self.value(i, p));
        }
        root
    }

    /// [`ModelSensors::payload`] as JSON text.
    pub fn payload_bytes(&self, timestamp_ms: i64) -> Vec<u8> {
        Value::Object(self.payload(timestamp_ms))
            .to_string()
            .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A model with every property type, bounds given and not, enums of strings and numbers,
    /// nested and escaped pointers, an optional property.
    fn every_type() -> Arc<Model> {
        let doc = json!({
            "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
            "@type": "tm:ThingModel",
            "title": "Every type",
            "version": {"model": "2.1.0"},
            "entwine:id": "every-type",
            "entwine:eventType": "every_state",
            "entwine:devices": ["all-*"],
            "entwine:odte": {"expected_update_rate": 2, "time_window": 5},
            "properties": {
                "rms": {"type": "number", "minimum": -2.5, "maximum": 3.5},
                "free": {"type": "number"},
                "high": {"type": "number", "minimum": 1000},
                "low": {"type": "number", "maximum": -50},
                "count": {"type": "integer", "minimum": 0, "maximum": 3},
                "odd": {"type": "integer", "minimum": 0.5, "maximum": 7.5},
                "level": {"type": "integer", "enum": [1, 5, 10]},
                "ratio": {"type": "number", "enum": [0.25, 0.5]},
                "running": {"type": "boolean", "entwine:pointer": "/data/state/running"},
                "mode": {"type": "string", "enum": ["idle", "run", "fault"]},
                "label": {"type": "string", "entwine:optional": true,
                          "entwine:pointer": "/meta/a~1b/label"}
            }
        });
        Arc::new(Model::parse("every.json", &doc.to_string()).unwrap())
    }

    fn walk_bounds(sensors: &ModelSensors, name: &str) -> (f64, f64) {
        let p = sensors
            .model()
            .properties
            .iter()
            .find(|p| p.name == name)
            .unwrap();
        bounds(p)
    }

    #[test]
    fn every_payload_passes_the_models_readings_over_many_updates() {
        let model = every_type();
        let mut sensors = ModelSensors::new(model.clone(), 11);
        for n in 0..5_000 {
            let payload = sensors.payload(1_700_000_000_000 + n);
            let readings = model
                .readings(&payload)
                .unwrap_or_else(|e| panic!("update {n}: {e}: {}", Value::Object(payload.clone())));
            assert_eq!(readings, sensors.readings(), "update {n}");
            assert_eq!(payload["type"], "every_state");
            assert_eq!(payload["timestamp"], 1_700_000_000_000 + n);
            sensors.update();
        }
    }

    #[test]
    fn readings_sit_at_their_pointers_and_the_type_only_when_declared() {
        let sensors = ModelSensors::new(every_type(), 3);
        let payload = Value::Object(sensors.payload(5));
        assert!(payload.pointer("/data/state/running").unwrap().is_boolean());
        assert!(payload.pointer("/data/rms").unwrap().is_f64());
        let label = payload
            .pointer("/meta/a~1b/label")
            .unwrap()
            .as_str()
            .unwrap();
        assert!(label.starts_with("label-"), "{label}");
        assert_eq!(payload["meta"]["a/b"]["label"], json!(label));

        let doc = json!({
            "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
            "@type": "tm:ThingModel",
            "title": "Untyped",
            "version": {"model": "1.0.0"},
            "entwine:id": "untyped",
            "entwine:devices": ["u-*"],
            "entwine:odte": {"expected_update_rate": 1, "time_window": 5},
            "properties": {"x": {"type": "number"}}
        });
        let model = Arc::new(Model::parse("u.json", &doc.to_string()).unwrap());
        let payload = ModelSensors::new(model, 1).payload(9);
        assert_eq!(payload.keys().collect::<Vec<_>>(), ["data", "timestamp"]);
    }

    #[test]
    fn values_stay_in_range_integers_are_whole_and_enums_are_kept_to() {
        let mut sensors = ModelSensors::new(every_type(), 99);
        let ranges: Vec<(&str, (f64, f64))> = ["rms", "free", "high", "low", "count", "odd"]
            .into_iter()
            .map(|n| (n, walk_bounds(&sensors, n)))
            .collect();
        assert_eq!(ranges[1].1, (0.0, 100.0));
        assert_eq!(ranges[2].1, (1000.0, 1100.0));
        assert_eq!(ranges[3].1, (-150.0, -50.0));
        assert_eq!(ranges[5].1, (1.0, 7.0));
        let mut seen_modes = std::collections::BTreeSet::new();
        let mut seen_counts = std::collections::BTreeSet::new();
        let mut flips = 0;
        let mut last_running = None;
        for _ in 0..10_000 {
            sensors.update();
            let r = sensors.readings();
            for (name, (lo, hi)) in &ranges {
                let v = r[*name].as_f64().unwrap();
                assert!(
                    (*lo..=*hi).contains(&v),
                    "{name} = {v} outside [{lo}, {hi}]"
                );
            }
            for name in ["count", "odd", "level"] {
                assert!(r[name].is_i64(), "{name} = {} is not an integer", r[name]);
            }
            assert!([1, 5, 10].contains(&r["level"].as_i64().unwrap()));
            assert!([0.25, 0.5].contains(&r["ratio"].as_f64().unwrap()));
            let mode = r["mode"].as_str().unwrap().to_owned();
            assert!(["idle", "run", "fault"].contains(&mode.as_str()), "{mode}");
            seen_modes.insert(mode);
            seen_counts.insert(r["count"].as_i64().unwrap());
            let running = r["running"].as_bool().unwrap();
            if last_running.is_some_and(|l| l != running) {
                flips += 1;
            }
            last_running = Some(running);
        }
        assert_eq!(
            seen_modes.len(),
            3,
            "every enum value comes up: {seen_modes:?}"
        );
        assert_eq!(
            seen_counts.len(),
            4,
            "the walk covers 0..=3: {seen_counts:?}"
        );
        // 5 % per update: about 500 flips in 10,000 updates.
        assert!((300..700).contains(&flips), "{flips} flips");
    }

    #[test]
    fn the_walk_steps_by_at_most_five_percent_of_the_range() {
        let mut sensors = ModelSensors::new(every_type(), 5);
        let (lo, hi) = walk_bounds(&sensors, "rms");
        let mut last = sensors.readings()["rms"].as_f64().unwrap();
        for _ in 0..2_000 {
            sensors.update();
            let v = sensors.readings()["rms"].as_f64().unwrap();
            assert!(
                (v - last).abs() <= MAX_STEP * (hi - lo) + 1e-9,
                "{last} → {v}"
            );
            last = v;
        }
    }

    proptest! {
        #[test]
        fn the_same_seed_gives_the_same_readings_and_another_seed_others(seed in any::<u64>()) {
            let model = every_type();
            let mut a = ModelSensors::new(model.clone(), seed);
            let mut b = ModelSensors::new(model.clone(), seed);
            let mut c = ModelSensors::new(model, seed.wrapping_add(1));
            let mut differ = false;
            for n in 0..50 {
                prop_assert_eq!(a.payload_bytes(n), b.payload_bytes(n));
                differ |= a.readings() != c.readings();
                a.update();
                b.update();
                c.update();
            }
            prop_assert!(differ);
        }
    }
}
