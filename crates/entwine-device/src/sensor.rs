//! The seed device's sensors (random walks) and the payloads it publishes.

use entwine_core::state::{AGGREGATED_STATE_TYPE, ENERGY_KEY, TEMPERATURE_KEY};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::conf::DeviceConf;

/// What a sensor measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorKind {
    /// `iot.sensor.temperature`: starts in [25, 30), walks by ±(0.1 + 1.0·u).
    Temperature,
    /// `iot.sensor.energy`: starts in (1, 5], walks by ±(0.1 + 0.5·u).
    Energy,
}

impl SensorKind {
    /// The kind of a `resourceMap` type (validated by the configuration).
    pub fn from_type(kind: &str) -> Option<Self> {
        match kind {
            TEMPERATURE_KEY => Some(Self::Temperature),
            ENERGY_KEY => Some(Self::Energy),
            _ => None,
        }
    }

    /// The sensor type string.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Temperature => TEMPERATURE_KEY,
            Self::Energy => ENERGY_KEY,
        }
    }

    fn initial(self, rng: &mut impl Rng) -> f64 {
        let u: f64 = rng.random();
        match self {
            Self::Temperature => 25.0 + 5.0 * u,
            Self::Energy => 5.0 - 4.0 * u,
        }
    }

    fn step(self, rng: &mut impl Rng) -> f64 {
        let u: f64 = rng.random();
        let magnitude = match self {
            Self::Temperature => 0.1 + 1.0 * u,
            Self::Energy => 0.1 + 0.5 * u,
        };
        if rng.random_bool(0.5) {
            magnitude
        } else {
            -magnitude
        }
    }
}

/// One sensor: its resource key (topic level), kind and current reading.
#[derive(Debug, Clone)]
pub struct Sensor {
    /// The `resourceMap` key.
    pub key: String,
    /// What it measures.
    pub kind: SensorKind,
    /// Current reading.
    pub value: f64,
}

/// A device's sensors and their random source.
#[derive(Debug)]
pub struct Sensors {
    sensors: Vec<Sensor>,
    rng: SmallRng,
}

impl Sensors {
    /// The sensors of `conf`'s resource map, started at random values drawn from `seed`.
    pub fn new(conf: &DeviceConf, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let sensors = conf
            .resource_map
            .iter()
            .filter_map(|(key, kind)| {
                let kind = SensorKind::from_type(kind)?;
                Some(Sensor {
                    key: key.clone(),
                    kind,
                    value: kind.initial(&mut rng),
                })
            })
            .collect();
        Self { sensors, rng }
    }

    /// The sensors.
    pub fn sensors(&self) -> &[Sensor] {
        &self.sensors
    }

    /// One random-walk step of every sensor.
    pub fn update(&mut self) {
        for sensor in &mut self.sensors {
            sensor.value += sensor.kind.step(&mut self.rng);
        }
    }

    /// The aggregated state payload at `timestamp_ms`, padded with a `payload_overhead` filler of
    /// letters to `target_size` bytes when that is larger than the payload.
    pub fn aggregated_payload(&self, timestamp_ms: i64, target_size: Option<u64>) -> Vec<u8> {
        let mut data = Map::new();
        for sensor in &self.sensors {
            data.insert(sensor.kind.type_name().to_owned(), json!(sensor.value));
        }
        let mut payload = json!({
            "timestamp": timestamp_ms,
            "type": AGGREGATED_STATE_TYPE,
            "data": Value::Object(data),
        });
        let bare = payload.to_string();
        const FILLER_FRAME: usize = r#","payload_overhead":"""#.len();
        if let Some(target) = target_size.and_then(|t| usize::try_from(t).ok()) {
            if target > bare.len() + FILLER_FRAME {
                let filler = "a".repeat(target - bare.len() - FILLER_FRAME);
                payload["data"]["payload_overhead"] = Value::String(filler);
            }
        }
        payload.to_string().into_bytes()
    }

    /// The single-resource payloads `(resource key, payload)` at `timestamp_ms`.
    pub fn single_payloads(&self, timestamp_ms: i64) -> Vec<(String, Vec<u8>)> {
        self.sensors
            .iter()
            .map(|s| {
                let payload = json!({
                    "timestamp": timestamp_ms,
                    "type": s.kind.type_name(),
                    "data": s.value,
                });
                (s.key.clone(), payload.to_string().into_bytes())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(payload: &[u8], key: &str) -> f64 {
        let v: Value = serde_json::from_slice(payload).unwrap();
        v["data"][key].as_f64().unwrap()
    }

    proptest! {
        #[test]
        fn sensors_start_in_the_seed_ranges_and_walk_by_the_seed_steps(seed in any::<u64>()) {
            let mut sensors = Sensors::new(&DeviceConf::default(), seed);
            let first = sensors.aggregated_payload(0, None);
            let (t0, e0) = (reading(&first, TEMPERATURE_KEY), reading(&first, ENERGY_KEY));
            prop_assert!((25.0..30.0).contains(&t0), "temperature {t0}");
            prop_assert!(e0 > 1.0 && e0 <= 5.0, "energy {e0}");
            sensors.update();
            let next = sensors.aggregated_payload(1, None);
            let dt = (reading(&next, TEMPERATURE_KEY) - t0).abs();
            let de = (reading(&next, ENERGY_KEY) - e0).abs();
            prop_assert!((0.1 - 1e-9..1.1 + 1e-9).contains(&dt), "temperature step {dt}");
            prop_assert!((0.1 - 1e-9..0.6 + 1e-9).contains(&de), "energy step {de}");
        }
    }

    #[test]
    fn the_aggregated_payload_is_the_seeds_and_parses_as_a_physical_event() {
        let sensors = Sensors::new(&DeviceConf::default(), 7);
        let payload = sensors.aggregated_payload(1_700_000_000_000, None);
        let mut v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["type"], AGGREGATED_STATE_TYPE);
        assert_eq!(v["timestamp"], 1_700_000_000_000i64);
        v["device_id"] = json!("iiot-device-1");
        let event = entwine_core::state::PhysicalEvent::from_json(
            v.as_object().unwrap(),
            1_700_000_000_000,
            &entwine_core::model::ModelSet::default(),
        )
        .unwrap();
        assert_eq!(event.device_id.as_str(), "iiot-device-1");
    }

    #[test]
    fn a_target_size_pads_the_payload_to_exactly_that_size() {
        let sensors = Sensors::new(&DeviceConf::default(), 7);
        for target in [300u64, 1024, 4096] {
            let payload = sensors.aggregated_payload(1_700_000_000_000, Some(target));
            assert_eq!(payload.len() as u64, target);
            let v: Value = serde_json::from_slice(&payload).unwrap();
            assert!(v["data"]["payload_overhead"]
                .as_str()
                .unwrap()
                .chars()
                .all(|c| c == 'a'));
        }
        // A target below the bare payload adds nothing.
        let small = sensors.aggregated_payload(1_700_000_000_000, Some(10));
        assert_eq!(small, sensors.aggregated_payload(1_700_000_000_000, None));
    }

    #[test]
    fn single_resource_payloads_carry_one_reading_each() {
        let sensors = Sensors::new(&DeviceConf::default(), 7);
        let singles = sensors.single_payloads(5);
        let keys: Vec<&str> = singles.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["energy", "temperature"]);
        let v: Value = serde_json::from_slice(&singles[0].1).unwrap();
        assert_eq!(v["type"], ENERGY_KEY);
        assert!(v["data"].is_f64());
    }
}
