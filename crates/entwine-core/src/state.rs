//! The states a twin goes through, with the seed system's JSON field names.
//!
//! ```text
//! PhysicalEvent ──physical-event-handler──▶ PhysicalState ──shadow-handler──▶ PendingDigitalState
//!               ──twin-handler──▶ DigitalState ──digital-event-handler──▶ (logged, echoed)
//! ```
//!
//! Readings are `f32` because the seed stores them in `REAL` columns: an answer built from a
//! stored row and an answer built from the input are then the same number, so a redelivered
//! event is answered exactly as the first delivery was.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::input::{Fields, InputError};
use crate::model::{Binding, ModelReadings, ModelSet};
use crate::odte::{Entanglement, SeedLifecycle};

/// The event type of the seed device's aggregated telemetry.
pub const AGGREGATED_STATE_TYPE: &str = "iot.sensor.state.aggregated";
/// Key of the energy reading in an aggregated payload's `data`.
pub const ENERGY_KEY: &str = "iot.sensor.energy";
/// Key of the temperature reading in an aggregated payload's `data`.
pub const TEMPERATURE_KEY: &str = "iot.sensor.temperature";

/// Timestamps more than this far before now are refused: ten years of milliseconds. It catches
/// devices that send seconds instead of milliseconds (those land in 1970).
pub const MAX_TIMESTAMP_AGE_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// Timestamps more than this far after now are refused: one day of milliseconds, generous for
/// clock skew, and it catches microseconds sent as milliseconds.
pub const MAX_TIMESTAMP_LEAD_MS: i64 = 24 * 3600 * 1000;

/// Longest device id, the width of the seed's `VARCHAR(255)` column.
pub const MAX_DEVICE_ID_CHARS: usize = 255;

/// A device id: non-empty, at most 255 characters, no control characters, and usable as one
/// MQTT topic level (no `/`, `+` or `#`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates a device id; `field` names it in the error.
    pub fn parse(field: &str, raw: &str) -> Result<Self, InputError> {
        let err = |reason: &str| InputError::new(field, reason);
        if raw.is_empty() {
            return Err(err("must not be empty"));
        }
        if raw.chars().count() > MAX_DEVICE_ID_CHARS {
            return Err(err("longer than 255 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(err("must not contain control characters"));
        }
        if raw.contains(['/', '+', '#']) {
            return Err(err("must not contain '/', '+' or '#'"));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A row id: a positive `SERIAL` (32-bit) value.
fn row_id(fields: &Fields<'_>, key: &str) -> Result<i32, InputError> {
    let raw = fields.integer(key)?;
    match i32::try_from(raw) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(InputError::new(
            fields.path(key),
            format!("{raw} is not a valid id (expected 1..=2147483647)"),
        )),
    }
}

/// A timestamp in milliseconds since the Unix epoch, not negative and not absurdly far from
/// `now_ms`.
pub fn timestamp_near(fields: &Fields<'_>, key: &str, now_ms: i64) -> Result<i64, InputError> {
    let t = fields.integer(key)?;
    let err = |reason: String| InputError::new(fields.path(key), reason);
    if t < 0 {
        return Err(err(format!("{t} is negative")));
    }
    if t < now_ms.saturating_sub(MAX_TIMESTAMP_AGE_MS) {
        return Err(err(format!(
            "{t} is more than ten years before now ({now_ms}); expected milliseconds since the Unix epoch"
        )));
    }
    if t > now_ms.saturating_add(MAX_TIMESTAMP_LEAD_MS) {
        return Err(err(format!(
            "{t} is more than a day after now ({now_ms}); expected milliseconds since the Unix epoch"
        )));
    }
    Ok(t)
}

/// A sensor reading that fits the seed's `REAL` column.
fn reading(fields: &Fields<'_>, key: &str) -> Result<f32, InputError> {
    let value = fields.number(key)?;
    if value.abs() > f64::from(f32::MAX) {
        return Err(InputError::new(
            fields.path(key),
            format!("{value} is out of range for a REAL column"),
        ));
    }
    // Rounds to the nearest f32, as PostgreSQL does when it stores a REAL.
    Ok(value as f32)
}

/// A probability-like figure (availability, reliability, timeliness, ODTE): a number in [0, 1].
fn unit_interval(fields: &Fields<'_>, key: &str) -> Result<f32, InputError> {
    let value = fields.number(key)?;
    if !(0.0..=1.0).contains(&value) {
        return Err(InputError::new(
            fields.path(key),
            format!("{value} is outside [0, 1]"),
        ));
    }
    Ok(value as f32)
}

fn device_id(fields: &Fields<'_>, key: &str) -> Result<DeviceId, InputError> {
    DeviceId::parse(&fields.path(key), fields.string(key)?)
}

/// What a state carries of its device's measurement: the seed device's two readings (the
/// seed's `REAL` columns, `f32`), or the readings of a model-described device (its model,
/// version and each property's value, stored as JSON beside the seed's tables).
///
/// In JSON, flattened into the state: `"temperature", "energy"` for the seed's device,
/// `"model", "model_version", "readings": {…}` for a model's.
#[derive(Debug, Clone, PartialEq)]
pub enum Readings {
    /// The seed's device.
    Seed {
        /// `data["iot.sensor.temperature"]`.
        temperature: f32,
        /// `data["iot.sensor.energy"]`.
        energy: f32,
    },
    /// A device of a loaded model.
    Model(ModelReadings),
}

impl Readings {
    /// The seed device's readings.
    pub fn seed(temperature: f32, energy: f32) -> Self {
        Self::Seed {
            temperature,
            energy,
        }
    }

    /// The seed's temperature, or `None` for a model's readings.
    pub fn temperature(&self) -> Option<f32> {
        match self {
            Self::Seed { temperature, .. } => Some(*temperature),
            Self::Model(_) => None,
        }
    }

    /// The seed's energy, or `None` for a model's readings.
    pub fn energy(&self) -> Option<f32> {
        match self {
            Self::Seed { energy, .. } => Some(*energy),
            Self::Model(_) => None,
        }
    }

    /// A model's readings, or `None` for the seed's.
    pub fn model(&self) -> Option<&ModelReadings> {
        match self {
            Self::Seed { .. } => None,
            Self::Model(m) => Some(m),
        }
    }

    /// Reads a state's readings: `readings` (with `model`, `model_version`) when present, the
    /// seed's `temperature` and `energy` otherwise.
    fn of_state(f: &Fields<'_>) -> Result<Self, InputError> {
        let Some(raw) = f.optional("readings") else {
            return Ok(Self::seed(
                reading(f, "temperature")?,
                reading(f, "energy")?,
            ));
        };
        let Value::Object(readings) = raw else {
            return Err(InputError::new(
                "readings",
                format!("expected an object, got {}", crate::input::kind(raw)),
            ));
        };
        Ok(Self::Model(ModelReadings {
            model: f.string("model")?.to_owned(),
            model_version: f.string("model_version")?.to_owned(),
            readings: readings.clone(),
        }))
    }
}

impl Serialize for Readings {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(match self {
            Self::Seed { .. } => 2,
            Self::Model(_) => 3,
        }))?;
        match self {
            Self::Seed {
                temperature,
                energy,
            } => {
                map.serialize_entry("temperature", temperature)?;
                map.serialize_entry("energy", energy)?;
            }
            Self::Model(m) => {
                map.serialize_entry("model", &m.model)?;
                map.serialize_entry("model_version", &m.model_version)?;
                map.serialize_entry("readings", &m.readings)?;
            }
        }
        map.end()
    }
}

/// What a device reported: the input of the physical-event handler (the device payload plus the
/// `device_id` the connector took from the topic).
#[derive(Debug, Clone, PartialEq)]
pub struct PhysicalEvent {
    /// The device that sent it.
    pub device_id: DeviceId,
    /// The payload's `timestamp`: when the device measured, in ms.
    pub device_timestamp: i64,
    /// What it measured.
    pub readings: Readings,
}

impl PhysicalEvent {
    /// Parses a device's message plus its `device_id`, by the model the device is bound to in
    /// `models`. For the seed's device: `{"timestamp", "type", "data": {"iot.sensor.energy",
    /// "iot.sensor.temperature"}, "device_id"}`; `type` may be absent; when present it must be
    /// the aggregated state type. For a model's: `timestamp`, `type` (when present, the model's
    /// `entwine:eventType` if it declares one), and each property where the model says, validated
    /// against it. Other keys (such as `data.payload_overhead`) are ignored.
    pub fn from_json(
        map: &Map<String, Value>,
        now_ms: i64,
        models: &ModelSet,
    ) -> Result<Self, InputError> {
        let f = Fields::new(map);
        let device_id = device_id(&f, "device_id")?;
        let model = match models.bind(device_id.as_str()) {
            Binding::Seed => None,
            Binding::Model(model) => Some(model),
        };
        let expected = match model {
            None => Some(AGGREGATED_STATE_TYPE),
            Some(m) => m.event_type.as_deref(),
        };
        if let (Some(t), Some(expected)) = (f.optional("type"), expected) {
            if t.as_str() != Some(expected) {
                return Err(InputError::new(
                    "type",
                    format!("unsupported event type {t}, expected \"{expected}\""),
                ));
            }
        }
        let device_timestamp = timestamp_near(&f, "timestamp", now_ms)?;
        let readings = match model {
            None => {
                let data = f.object("data", "data")?;
                Readings::seed(
                    reading(&data, TEMPERATURE_KEY)?,
                    reading(&data, ENERGY_KEY)?,
                )
            }
            Some(m) => Readings::Model(ModelReadings {
                model: m.id.clone(),
                model_version: m.version.clone(),
                readings: m.readings(map)?,
            }),
        };
        Ok(Self {
            device_id,
            device_timestamp,
            readings,
        })
    }
}

/// A stored physical event: the output of the physical-event handler and the input of the
/// shadow handler. Row of table `physicalstate`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhysicalState {
    /// `physicalstate.id`.
    pub id: i32,
    /// The device.
    pub device_id: DeviceId,
    /// When the device measured (ms).
    pub device_timestamp: i64,
    /// When the physical-event handler received it (ms).
    pub timestamp: i64,
    /// What the device measured.
    #[serde(flatten)]
    pub readings: Readings,
}

impl PhysicalState {
    /// Parses a physical state as the physical-event handler answers it.
    pub fn from_json(map: &Map<String, Value>, now_ms: i64) -> Result<Self, InputError> {
        let f = Fields::new(map);
        Ok(Self {
            id: row_id(&f, "id")?,
            device_id: device_id(&f, "device_id")?,
            device_timestamp: timestamp_near(&f, "device_timestamp", now_ms)?,
            timestamp: timestamp_near(&f, "timestamp", now_ms)?,
            readings: Readings::of_state(&f)?,
        })
    }
}

/// The twin's copy of a physical state, not yet evaluated: the output of the shadow handler and
/// the input of the twin handler. Row of table `digitalstate` before its ODTE is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingDigitalState {
    /// `digitalstate.id`.
    pub id: i32,
    /// The physical state it mirrors.
    pub physicalstate_id: i32,
    /// The device.
    pub device_id: DeviceId,
    /// When the shadow handler made it (ms): the twin's time `t` for the ODTE window.
    pub timestamp: i64,
    /// What the device measured, as its physical state holds it.
    #[serde(flatten)]
    pub readings: Readings,
}

impl PendingDigitalState {
    /// Parses a pending digital state as the shadow handler answers it.
    pub fn from_json(map: &Map<String, Value>, now_ms: i64) -> Result<Self, InputError> {
        let f = Fields::new(map);
        Ok(Self {
            id: row_id(&f, "id")?,
            physicalstate_id: row_id(&f, "physicalstate_id")?,
            device_id: device_id(&f, "device_id")?,
            timestamp: timestamp_near(&f, "timestamp", now_ms)?,
            readings: Readings::of_state(&f)?,
        })
    }
}

/// An evaluated digital state: the output of the twin handler and the input of the
/// digital-event handler. Row of table `digitalstate` with its ODTE set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigitalState {
    /// The state that was evaluated.
    #[serde(flatten)]
    pub pending: PendingDigitalState,
    /// A, as stored (`REAL`).
    pub availability: f32,
    /// R, as stored (`REAL`).
    pub reliability: f32,
    /// T, as stored (`REAL`).
    pub timeliness: f32,
    /// A·R·T, as stored (`REAL`).
    pub odte: f32,
    /// `entangled` when ODTE ≥ threshold.
    pub lifecycle: SeedLifecycle,
}

impl DigitalState {
    /// A pending state with its evaluation, rounded to the stored precision.
    pub fn new(pending: PendingDigitalState, e: &Entanglement) -> Self {
        Self {
            pending,
            availability: e.availability as f32,
            reliability: e.reliability as f32,
            timeliness: e.timeliness as f32,
            odte: e.odte as f32,
            lifecycle: e.lifecycle,
        }
    }

    /// Parses a digital state as the twin handler answers it.
    pub fn from_json(map: &Map<String, Value>, now_ms: i64) -> Result<Self, InputError> {
        let pending = PendingDigitalState::from_json(map, now_ms)?;
        let f = Fields::new(map);
        let lifecycle_raw = f.string("lifecycle")?;
        let lifecycle = SeedLifecycle::parse(lifecycle_raw).ok_or_else(|| {
            InputError::new(
                "lifecycle",
                format!("unknown lifecycle {lifecycle_raw:?}, expected \"entangled\" or \"disentangled\""),
            )
        })?;
        Ok(Self {
            pending,
            availability: unit_interval(&f, "availability")?,
            reliability: unit_interval(&f, "reliability")?,
            timeliness: unit_interval(&f, "timeliness")?,
            odte: unit_interval(&f, "odte")?,
            lifecycle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000_000;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("test value is an object")
    }

    fn seed_event() -> Value {
        json!({
            "timestamp": NOW - 40,
            "type": "iot.sensor.state.aggregated",
            "data": {"iot.sensor.energy": 3.25, "iot.sensor.temperature": 27.3,
                     "payload_overhead": "aaaa"},
            "device_id": "iiot-device-1"
        })
    }

    #[test]
    fn a_seed_device_payload_parses_into_a_physical_event() {
        let e = PhysicalEvent::from_json(&map(seed_event()), NOW, &ModelSet::default()).unwrap();
        assert_eq!(e.device_id.as_str(), "iiot-device-1");
        assert_eq!(e.device_timestamp, NOW - 40);
        assert_eq!(e.readings, Readings::seed(27.3, 3.25));
    }

    #[test]
    fn each_bad_field_of_a_physical_event_is_named() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"device_id": ""}), "device_id"),
            (json!({"device_id": "a/b"}), "device_id"),
            (json!({"device_id": "x".repeat(256)}), "device_id"),
            (json!({"timestamp": "soon"}), "timestamp"),
            (json!({"timestamp": -5}), "timestamp"),
            (json!({"timestamp": 1_700_000_000}), "timestamp"),
            (json!({"timestamp": NOW * 1000}), "timestamp"),
            (json!({"type": "iot.sensor.energy"}), "type"),
            (json!({"data": 7}), "data"),
            (
                json!({"data": {"iot.sensor.energy": "high", "iot.sensor.temperature": 1.0}}),
                "data.iot.sensor.energy",
            ),
            (
                json!({"data": {"iot.sensor.energy": 1.0}}),
                "data.iot.sensor.temperature",
            ),
            (
                json!({"data": {"iot.sensor.energy": 1e300, "iot.sensor.temperature": 1.0}}),
                "data.iot.sensor.energy",
            ),
        ];
        for (patch, field) in cases {
            let mut event = seed_event();
            for (k, v) in patch.as_object().unwrap() {
                event[k] = v.clone();
            }
            let err = PhysicalEvent::from_json(&map(event.clone()), NOW, &ModelSet::default())
                .unwrap_err();
            assert_eq!(err.field, field, "for {event}: {err}");
        }
    }

    #[test]
    fn a_missing_device_id_is_named() {
        let mut event = seed_event();
        event.as_object_mut().unwrap().remove("device_id");
        let err = PhysicalEvent::from_json(&map(event), NOW, &ModelSet::default()).unwrap_err();
        assert_eq!(err.to_string(), "device_id: missing");
    }

    #[test]
    fn a_digital_state_round_trips_through_its_json() {
        let pending = PendingDigitalState {
            id: 9,
            physicalstate_id: 4,
            device_id: DeviceId::parse("device_id", "d").unwrap(),
            timestamp: NOW,
            readings: Readings::seed(26.1, 2.0),
        };
        let state = DigitalState {
            pending,
            availability: 1.0,
            reliability: 0.5,
            timeliness: 1.0,
            odte: 0.5,
            lifecycle: SeedLifecycle::Disentangled,
        };
        // On the wire (serde_json's writer), an f32 prints at its own shortest precision.
        let wire = serde_json::to_string(&state).unwrap();
        let json: Value = serde_json::from_str(&wire).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "id",
            "physicalstate_id",
            "device_id",
            "timestamp",
            "temperature",
            "energy",
            "availability",
            "reliability",
            "timeliness",
            "odte",
            "lifecycle",
        ];
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(sorted, expected);
        assert_eq!(json["temperature"], json!(26.1));
        assert_eq!(
            DigitalState::from_json(json.as_object().unwrap(), NOW).unwrap(),
            state
        );
    }

    #[test]
    fn a_digital_state_with_an_unknown_lifecycle_is_refused() {
        let mut v = json!({"id": 1, "physicalstate_id": 1, "device_id": "d", "timestamp": NOW,
            "temperature": 1.0, "energy": 1.0, "availability": 1.0, "reliability": 1.0,
            "timeliness": 1.0, "odte": 1.0, "lifecycle": "entangled"});
        assert!(DigitalState::from_json(&map(v.clone()), NOW).is_ok());
        v["lifecycle"] = json!("zombie");
        assert_eq!(
            DigitalState::from_json(&map(v.clone()), NOW)
                .unwrap_err()
                .field,
            "lifecycle"
        );
        v["lifecycle"] = json!("entangled");
        v["odte"] = json!(1.5);
        assert_eq!(
            DigitalState::from_json(&map(v), NOW).unwrap_err().field,
            "odte"
        );
    }

    #[test]
    fn a_model_devices_state_carries_model_version_and_readings_in_place_of_the_seeds() {
        let v = json!({"id": 3, "device_id": "vib-1", "device_timestamp": NOW, "timestamp": NOW,
            "model": "vibration", "model_version": "1.0.0",
            "readings": {"rms": 2.5, "running": true}});
        let state = PhysicalState::from_json(&map(v.clone()), NOW).unwrap();
        assert_eq!(
            state.readings.model().map(|m| m.readings.len()),
            Some(2),
            "{state:?}"
        );
        assert_eq!(state.readings.temperature(), None);
        // Serialized exactly as it came.
        assert_eq!(serde_json::to_value(&state).unwrap(), v);
        let mut bad = v.clone();
        bad["readings"] = json!(5);
        let err = PhysicalState::from_json(&map(bad), NOW).unwrap_err();
        assert_eq!(
            err.to_string(),
            "readings: expected an object, got a number"
        );
        let mut bad = v;
        bad.as_object_mut().unwrap().remove("model_version");
        let err = PhysicalState::from_json(&map(bad), NOW).unwrap_err();
        assert_eq!(err.to_string(), "model_version: missing");
    }

    #[test]
    fn ids_must_be_positive_32_bit_integers() {
        let base = json!({"id": 1, "device_id": "d", "device_timestamp": NOW, "timestamp": NOW,
            "temperature": 1.0, "energy": 1.0});
        for bad in [json!(0), json!(-3), json!(4_000_000_000i64), json!(1.5)] {
            let mut v = base.clone();
            v["id"] = bad.clone();
            let err = PhysicalState::from_json(&map(v), NOW).unwrap_err();
            assert_eq!(err.field, "id", "{bad}");
        }
    }
}
