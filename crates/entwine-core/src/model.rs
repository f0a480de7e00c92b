//! Device models: what a device type reports, where it publishes, and how faithfully its twin
//! is expected to mirror it (its ODTE profile).
//!
//! A model is a W3C WoT Thing Model (JSON) with entwine's extension keys (`entwine:…`):
//!
//! ```json
//! {
//!   "@context": ["https://www.w3.org/2022/wot/td/v1.1", {"entwine": "https://entwine.invalid/model#"}],
//!   "@type": "tm:ThingModel",
//!   "title": "Vibration sensor",
//!   "version": {"model": "1.0.0"},
//!   "entwine:id": "vibration-sensor",
//!   "entwine:devices": ["vib-*"],
//!   "entwine:odte": {"expected_update_rate": 10, "time_window": 5, "desired_timeliness": 0.2},
//!   "properties": {
//!     "rms": {"type": "number", "unit": "mm/s", "minimum": 0, "maximum": 50},
//!     "running": {"type": "boolean", "entwine:pointer": "/data/state/running"}
//!   },
//!   "forms": [{"op": "observeallproperties", "href": "mqtt://broker",
//!              "mqv:filter": "device/{{deviceId}}/telemetry/vibration"}]
//! }
//! ```
//!
//! - Each property is a JSON Schema (WoT's data schema): its reading is validated against it
//!   with the `jsonschema` crate, so `minimum`, `maximum`, `enum`, `maxLength`, … all hold.
//!   It is read from the payload at `entwine:pointer` (a JSON pointer; `/data/<name>` unless
//!   given) and is required unless `entwine:optional` is true.
//! - `entwine:devices` binds devices by id pattern (`*`, `?`, `[…]`). A device matched by
//!   several models takes the one whose matching pattern has the most literal characters (ties:
//!   the model id that sorts first); a device no model matches is the seed's.
//! - `entwine:odte` is the model's profile, the keys of the seed's `odte` ConfigMap;
//!   `desired_timeliness` defaults to 1 s and `threshold` to 0.9.
//! - The topic is the `mqv:filter` of the model's form (`{{deviceId}}` as its second level, where
//!   the connector reads the device id, as the seed's does); `device/{{deviceId}}/telemetry/device_state`
//!   unless given.
//!
//! The seed's device (temperature and energy in `REAL` columns, the `odte` ConfigMap's profile)
//! is built in and stays exactly as it was: [`Binding::Seed`]. A model is checked whole when it
//! is loaded ([`Model::parse`]): first against the schema of model files (`model.schema.json`),
//! then for what a schema cannot say (a profile the ODTE engine refuses, a pattern that does not
//! compile); every error names the model and the field.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::input::InputError;
use crate::odte::OdteConfig;

/// The schema every model file is validated against first (JSON Schema 2020-12).
pub const MODEL_SCHEMA: &str = include_str!("model.schema.json");

/// The seed's telemetry topic, the default of a model without a form.
pub const DEFAULT_TOPIC: &str = "device/{{deviceId}}/telemetry/device_state";

/// The placeholder of the device id in a model's topic (WoT Thing Model placeholder syntax).
pub const DEVICE_ID_PLACEHOLDER: &str = "{{deviceId}}";

/// The type of a property's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    /// Any JSON number.
    Number,
    /// A number without a fraction.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A string.
    String,
}

/// One property of a model: a reading every message carries (unless optional).
#[derive(Clone)]
pub struct Property {
    /// Its name: the key of its reading in the stored state.
    pub name: String,
    /// Its type.
    pub kind: PropertyType,
    /// Its unit, as the model gives it (`mm/s`, `kWh`).
    pub unit: Option<String>,
    /// Its lower bound, when the model gives one.
    pub minimum: Option<f64>,
    /// Its upper bound, when the model gives one.
    pub maximum: Option<f64>,
    /// The values it may take (`enum`), empty when any.
    pub choices: Vec<Value>,
    /// Whether a message may leave it out.
    pub optional: bool,
    /// Where it is in the payload (a JSON pointer).
    pub pointer: String,
    /// The payload field it is read from, dotted, for errors (`data.rms`).
    field: String,
    schema: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Property")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("pointer", &self.pointer)
            .field("optional", &self.optional)
            .finish_non_exhaustive()
    }
}

/// A device id pattern of a model.
#[derive(Debug, Clone)]
pub struct DevicePattern {
    pattern: glob::Pattern,
    literal: usize,
}

impl DevicePattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.pattern.as_str()
    }

    /// Whether `device` matches.
    pub fn matches(&self, device: &str) -> bool {
        self.pattern.matches(device)
    }
}

/// A device model, validated.
#[derive(Debug, Clone)]
pub struct Model {
    /// `entwine:id`: what states and twins record.
    pub id: String,
    /// `version.model`: recorded with every state.
    pub version: String,
    /// `title`.
    pub title: String,
    /// `entwine:eventType`: the payload's `type`, when present, must be this.
    pub event_type: Option<String>,
    /// The properties, by name.
    pub properties: Vec<Property>,
    /// The ODTE profile of its twins.
    pub profile: OdteConfig,
    /// Where it was read from (a file name), for messages.
    pub source: String,
    devices: Vec<DevicePattern>,
    topic: String,
}

/// A model that cannot be loaded: where, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model {model}: {field}: {reason}")]
pub struct ModelError {
    /// The model's file (and id, once known).
    pub model: String,
    /// The field, as a JSON pointer into the model file (`/entwine:odte/time_window`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn compiled_model_schema() -> &'static jsonschema::Validator {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(MODEL_SCHEMA).expect("model.schema.json is valid JSON");
        jsonschema::validator_for(&schema).expect("model.schema.json is a valid schema")
    })
}

/// `/data/rms` as `data.rms` (the dotted paths of [`InputError`]).
fn dotted(pointer: &str) -> String {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .join(".")
}

fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl Model {
    /// Parses and validates a model file's text; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<Self, ModelError> {
        let err = |field: &str, reason: String| ModelError {
            model: source.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let doc: Value =
            serde_json::from_str(text).map_err(|e| err("", format!("not valid JSON: {e}")))?;
        if let Some(e) = compiled_model_schema().iter_errors(&doc).next() {
            let at = e.instance_path().to_string();
            return Err(err(if at.is_empty() { "/" } else { &at }, e.to_string()));
        }
        let id = doc["entwine:id"].as_str().unwrap_or_default().to_owned();
        let named = format!("{source} ({id})");
        let err = |field: &str, reason: String| ModelError {
            model: named.clone(),
            field: field.to_owned(),
            reason,
        };
        let number = |v: &Value| v.as_f64();
        let odte = &doc["entwine:odte"];
        let profile = OdteConfig::new(
            number(&odte["expected_update_rate"]).unwrap_or_default(),
            number(&odte["time_window"]).unwrap_or_default(),
            number(&odte["desired_timeliness"]).unwrap_or(1.0),
            number(&odte["threshold"]).unwrap_or(0.9),
        )
        .and_then(|c| c.with_silence_threshold(number(&odte["silence_threshold"])))
        .and_then(|c| c.with_availability_max_gap(number(&odte["availability_max_gap"])))
        .map_err(|e| err("/entwine:odte", e.to_string()))?;

        let mut devices = Vec::new();
        for (i, raw) in doc["entwine:devices"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let raw = raw.as_str().unwrap_or_default();
            let field = format!("/entwine:devices/{i}");
            let pattern = glob::Pattern::new(raw)
                .map_err(|e| err(&field, format!("{raw:?} is not a device id pattern: {e}")))?;
            if raw.contains(['/', '+', '#']) {
                return Err(err(
                    &field,
                    format!("{raw:?} contains '/', '+' or '#', which no device id does"),
                ));
            }
            let literal = raw.chars().filter(|c| !"*?[]!".contains(*c)).count();
            devices.push(DevicePattern { pattern, literal });
        }

        let mut topic = DEFAULT_TOPIC.to_owned();
        for (i, form) in doc["forms"].as_array().into_iter().flatten().enumerate() {
            if let Some(filter) = form["mqv:filter"].as_str() {
                let field = format!("/forms/{i}/mqv:filter");
                let levels: Vec<&str> = filter.split('/').collect();
                if levels.len() < 2 || levels[1] != DEVICE_ID_PLACEHOLDER {
                    return Err(err(
                        &field,
                        format!("{filter:?} must have {DEVICE_ID_PLACEHOLDER} as its second level, where the connector reads the device id"),
                    ));
                }
                if levels.iter().enumerate().any(|(n, l)| {
                    l.is_empty() || l.contains(['+', '#']) || (n != 1 && l.contains("{{"))
                }) {
                    return Err(err(
                        &field,
                        format!("{filter:?} must be a topic without wildcards or empty levels, with one {DEVICE_ID_PLACEHOLDER}"),
                    ));
                }
                topic = filter.to_owned();
                break;
            }
        }

        let mut properties = Vec::new();
        let mut pointers: Vec<(String, String)> = Vec::new();
        for (name, spec) in doc["properties"].as_object().into_iter().flatten() {
            let field = format!("/properties/{}", pointer_escape(name));
            let kind = match spec["type"].as_str() {
                Some("number") => PropertyType::Number,
                Some("integer") => PropertyType::Integer,
                Some("boolean") => PropertyType::Boolean,
                _ => PropertyType::String,
            };
            let schema = jsonschema::validator_for(spec).map_err(|e| {
                err(
                    &field,
                    format!("not a valid JSON Schema for a reading: {e}"),
                )
            })?;
            let minimum = spec["minimum"].as_f64();
            let maximum = spec["maximum"].as_f64();
            if let (Some(lo), Some(hi)) = (minimum, maximum) {
                if lo > hi {
                    return Err(err(
                        &format!("{field}/minimum"),
                        format!("{lo} is above the maximum {hi}"),
                    ));
                }
            }
            let choices = spec["enum"].as_array().cloned().unwrap_or_default();
            for (i, choice) in choices.iter().enumerate() {
                if !schema.is_valid(choice) {
                    return Err(err(
                        &format!("{field}/enum/{i}"),
                        format!(
                            "{choice} is not a valid {} reading of this property",
                            kind_name(kind)
                        ),
                    ));
                }
            }
            let pointer = spec["entwine:pointer"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("/data/{}", pointer_escape(name)));
            if pointer == "/timestamp" || pointer.starts_with("/timestamp/") || pointer == "/type" {
                return Err(err(
                    &format!("{field}/entwine:pointer"),
                    format!("{pointer} is the message's own field, not a reading"),
                ));
            }
            if let Some((other, _)) = pointers.iter().find(|(_, p)| {
                *p == pointer
                    || pointer.starts_with(&format!("{p}/"))
                    || p.starts_with(&format!("{pointer}/"))
            }) {
                return Err(err(
                    &format!("{field}/entwine:pointer"),
                    format!("{pointer} overlaps the pointer of property {other}"),
                ));
            }
            pointers.push((name.clone(), pointer.clone()));
            properties.push(Property {
                name: name.clone(),
                kind,
                unit: spec["unit"].as_str().map(str::to_owned),
                minimum,
                maximum,
                choices,
                optional: spec["entwine:optional"].as_bool().unwrap_or(false),
                field: dotted(&pointer),
                pointer,
                schema: Arc::new(schema),
            });
        }
        Ok(Self {
            version: doc["version"]["model"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            title: doc["title"].as_str().unwrap_or_default().to_owned(),
            event_type: doc["entwine:eventType"].as_str().map(str::to_owned),
            properties,
            profile,
            source: source.to_owned(),
            devices,
            topic,
            id,
        })
    }

    /// The device id patterns that bind devices to it.
    pub fn devices(&self) -> &[DevicePattern] {
        &self.devices
    }

    /// The topic template, with [`DEVICE_ID_PLACEHOLDER`].
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic `device` publishes to.
    pub fn topic_of(&self, device: &str) -> String {
        self.topic.replace(DEVICE_ID_PLACEHOLDER, device)
    }

    /// The MQTT filter of every device of this model (the id level a `+`).
    pub fn topic_filter(&self) -> String {
        self.topic.replace(DEVICE_ID_PLACEHOLDER, "+")
    }

    /// The readings of a message of this model, each validated against its property; the error
    /// names the payload field and the property.
    pub fn readings(&self, payload: &Map<String, Value>) -> Result<Map<String, Value>, InputError> {
        let mut readings = Map::new();
        for p in &self.properties {
            let value = match at_pointer(payload, &p.pointer) {
                None | Some(Value::Null) if p.optional => continue,
                None | Some(Value::Null) => {
                    return Err(InputError::new(
                        &p.field,
                        format!("missing (property {} of model {})", p.name, self.id),
                    ))
                }
                Some(v) => v,
            };
            if let Some(e) = p.schema.iter_errors(value).next() {
                // A reading is a scalar, so the error is about the value itself (an array or
                // an object is refused by its `type`).
                return Err(InputError::new(
                    &p.field,
                    format!(
                        "{e} (property {} of model {}, {} expected)",
                        p.name,
                        self.id,
                        kind_name(p.kind)
                    ),
                ));
            }
            readings.insert(p.name.clone(), value.clone());
        }
        Ok(readings)
    }
}

fn kind_name(kind: PropertyType) -> &'static str {
    match kind {
        PropertyType::Number => "a number",
        PropertyType::Integer => "an integer",
        PropertyType::Boolean => "a boolean",
        PropertyType::String => "a string",
    }
}

/// The model a device is bound to.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// The seed's built-in device: temperature and energy, the `odte` ConfigMap's profile.
    Seed,
    /// A loaded model.
    Model(&'a Model),
}

/// Readings of a model-described device, as stored with its state: the model and its version,
/// and the value of each property by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReadings {
    /// The model's id.
    pub model: String,
    /// The model's version.
    pub model_version: String,
    /// Each property's reading, by property name.
    pub readings: Map<String, Value>,
}

/// The ODTE profile of each twin: one for all ([`OdteConfig`]) or one per model ([`ModelSet`]).
/// The store groups a batch by profile, one window query per profile.
pub trait Profiles: Sync {
    /// Every profile; the first is the default (the seed's).
    fn profiles(&self) -> &[OdteConfig];
    /// The index in [`Profiles::profiles`] of `device`'s profile.
    fn profile_index(&self, device: &str) -> usize;
    /// `device`'s profile.
    fn profile_of(&self, device: &str) -> &OdteConfig {
        &self.profiles()[self.profile_index(device)]
    }
}

/// `items` grouped by their device's profile, each group in the items' order, the groups in
/// the order their first item came: `(index in Profiles::profiles, items)`. What the store runs
/// one window query for.
pub fn by_profile<'a, T>(
    profiles: &dyn Profiles,
    items: impl IntoIterator<Item = (&'a str, T)>,
) -> Vec<(usize, Vec<T>)> {
    let mut groups: Vec<(usize, Vec<T>)> = Vec::new();
    for (device, item) in items {
        let index = profiles.profile_index(device);
        match groups.iter_mut().find(|(i, _)| *i == index) {
            Some((_, group)) => group.push(item),
            None => groups.push((index, vec![item])),
        }
    }
    groups
}

impl Profiles for OdteConfig {
    fn profiles(&self) -> &[OdteConfig] {
        std::slice::from_ref(self)
    }

    fn profile_index(&self, _device: &str) -> usize {
        0
    }
}

/// Every model loaded, with the seed's built in: which model each device is bound to.
#[derive(Debug, Clone)]
pub struct ModelSet {
    models: Vec<Arc<Model>>,
    /// The seed's profile, then each model's, in `models`' order.
    profiles: Vec<OdteConfig>,
}

impl Default for ModelSet {
    fn default() -> Self {
        Self::seed_only(OdteConfig::seed_default())
    }
}

impl ModelSet {
    /// Only the seed's device, with `seed` as its profile.
    pub fn seed_only(seed: OdteConfig) -> Self {
        Self {
            models: Vec::new(),
            profiles: vec![seed],
        }
    }

    /// The seed's device with profile `seed`, and `models`. Two models with one id, or with one
    /// identical device pattern, are refused.
    pub fn new(seed: OdteConfig, models: Vec<Model>) -> Result<Self, ModelError> {
        let mut models = models;
        models.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in models.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(ModelError {
                    model: pair[1].source.clone(),
                    field: "/entwine:id".into(),
                    reason: format!(
                        "{:?} is also the id of {}; each model needs its own id (a new version is a change of version.model in the same file)",
                        pair[1].id, pair[0].source
                    ),
                });
            }
        }
        for (i, a) in models.iter().enumerate() {
            for b in &models[i + 1..] {
                for (n, p) in b.devices.iter().enumerate() {
                    if a.devices.iter().any(|q| q.as_str() == p.as_str()) {
                        return Err(ModelError {
                            model: format!("{} ({})", b.source, b.id),
                            field: format!("/entwine:devices/{n}"),
                            reason: format!(
                                "pattern {:?} also binds devices to model {}; a device must have one model",
                                p.as_str(),
                                a.id
                            ),
                        });
                    }
                }
            }
        }
        let mut profiles = vec![seed];
        profiles.extend(models.iter().map(|m| m.profile));
        Ok(Self {
            models: models.into_iter().map(Arc::new).collect(),
            profiles,
        })
    }

    /// The loaded models, by id.
    pub fn models(&self) -> &[Arc<Model>] {
        &self.models
    }

    /// The model with `id`, or a sentence naming the models that are loaded.
    pub fn get(&self, id: &str) -> Result<&Arc<Model>, String> {
        self.models.iter().find(|m| m.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
            if ids.is_empty() {
                format!("no model {id:?} is loaded (none is: set models.dir, --models DIR)")
            } else {
                format!("no model {id:?} is loaded (loaded: {})", ids.join(", "))
            }
        })
    }

    /// The seed's profile (the `odte` ConfigMap's).
    pub fn seed_profile(&self) -> &OdteConfig {
        &self.profiles[0]
    }

    fn bound_index(&self, device: &str) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, model) in self.models.iter().enumerate() {
            for p in &model.devices {
                if p.matches(device) && best.is_none_or(|(_, literal)| p.literal > literal) {
                    best = Some((i, p.literal));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// The model `device` is bound to.
    pub fn bind(&self, device: &str) -> Binding<'_> {
        match self.bound_index(device) {
            Some(i) => Binding::Model(&self.models[i]),
            None => Binding::Seed,
        }
    }
}

impl Profiles for ModelSet {
    fn profiles(&self) -> &[OdteConfig] {
        &self.profiles
    }

    fn profile_index(&self, device: &str) -> usize {
        if self.models.is_empty() {
            return 0;
        }
        self.bound_index(device).map_or(0, |i| i + 1)
    }
}

/// The value at a JSON pointer of `payload`, without copying the payload into a [`Value`].
fn at_pointer<'v>(payload: &'v Map<String, Value>, pointer: &str) -> Option<&'v Value> {
    let rest = pointer.strip_prefix('/')?;
    let first = rest.split('/').next().unwrap_or(rest);
    let value = if first.contains('~') {
        payload.get(&first.replace("~1", "/").replace("~0", "~"))?
    } else {
        payload.get(first)?
    };
    match &rest[first.len()..] {
        "" => Some(value),
        deeper => value.pointer(deeper),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
                "running": {"type": "boolean", "entwine:pointer": "/data/state/running"},
                "mode": {"type": "string", "enum": ["idle", "run"], "entwine:optional": true}
            },
            "forms": [{"op": "observeallproperties", "href": "mqtt://broker",
                       "mqv:filter": "device/{{deviceId}}/telemetry/vibration"}]
        })
    }

    fn parse(v: &Value) -> Result<Model, ModelError> {
        Model::parse("vibration.json", &v.to_string())
    }

    #[test]
    fn a_model_parses_with_its_profile_topic_and_properties() {
        let m = parse(&vibration()).unwrap();
        assert_eq!(m.id, "vibration");
        assert_eq!(m.version, "1.0.0");
        assert_eq!(m.profile.expected_update_rate(), 10.0);
        assert_eq!(m.profile.window_ms(), 5_000);
        assert_eq!(m.profile.timeliness_ms(), 200);
        assert_eq!(m.profile.threshold(), 0.9);
        assert_eq!(m.topic_of("vib-1"), "device/vib-1/telemetry/vibration");
        assert_eq!(m.topic_filter(), "device/+/telemetry/vibration");
        let names: Vec<&str> = m.properties.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["mode", "rms", "running"]);
        assert_eq!(m.properties[1].maximum, Some(50.0));
        assert_eq!(m.properties[2].pointer, "/data/state/running");
    }

    #[test]
    fn every_bad_field_of_a_model_is_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "/entwine:odte/time_window",
                json!("5"),
                "/entwine:odte/time_window",
            ),
            (
                "/entwine:odte/expected_update_rate",
                json!(0),
                "/entwine:odte/expected_update_rate",
            ),
            (
                "/entwine:odte/desired_timeliness",
                json!(-1),
                "/entwine:odte/desired_timeliness",
            ),
            (
                "/properties/rms/type",
                json!("float"),
                "/properties/rms/type",
            ),
            (
                "/properties/rms/minimum",
                json!(60),
                "/properties/rms/minimum",
            ),
            ("/entwine:id", json!("Has Spaces"), "/entwine:id"),
            (
                "/forms/0/mqv:filter",
                json!("{{deviceId}}/telemetry"),
                "/forms/0/mqv:filter",
            ),
            ("/entwine:devices/0", json!("vib/*"), "/entwine:devices/0"),
            (
                "/properties/running/entwine:pointer",
                json!("/data/rms"),
                "/properties/running/entwine:pointer",
            ),
            (
                "/properties/mode/enum",
                json!(["idle", 3]),
                "/properties/mode/enum/1",
            ),
        ];
        for (at, value, field) in cases {
            let mut doc = vibration();
            *doc.pointer_mut(at).unwrap_or_else(|| panic!("{at}")) = value;
            let err = parse(&doc).unwrap_err();
            assert_eq!(err.field, field, "{at}: {err}");
            assert!(err.model.starts_with("vibration.json"), "{err}");
        }
        let mut doc = vibration();
        doc.as_object_mut().unwrap().remove("entwine:odte");
        let err = parse(&doc).unwrap_err();
        assert_eq!(err.field, "/", "{err}");
        assert!(err.reason.contains("entwine:odte"), "{err}");
    }

    #[test]
    fn readings_are_validated_against_each_property() {
        let m = parse(&vibration()).unwrap();
        let ok = json!({"timestamp": 1, "data": {"rms": 3.5, "state": {"running": true}}});
        let readings = m.readings(ok.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Object(readings),
            json!({"rms": 3.5, "running": true})
        );
        let cases = [
            (
                json!({"data": {"rms": 75.0, "state": {"running": true}}}),
                "data.rms",
                "maximum",
            ),
            (
                json!({"data": {"rms": "3", "state": {"running": true}}}),
                "data.rms",
                "number",
            ),
            (
                json!({"data": {"rms": 3.0}}),
                "data.state.running",
                "missing",
            ),
            (
                json!({"data": {"rms": 3.0, "state": {"running": true}, "mode": "off"}}),
                "data.mode",
                "mode",
            ),
        ];
        for (payload, field, says) in cases {
            let err = m.readings(payload.as_object().unwrap()).unwrap_err();
            assert_eq!(err.field, field, "{payload}: {err}");
            assert!(err.reason.contains(says), "{err}");
            assert!(err.reason.contains("of model vibration"), "{err}");
        }
    }

    #[test]
    fn devices_bind_to_the_most_specific_pattern_and_the_rest_to_the_seed() {
        let a = parse(&vibration()).unwrap();
        let mut b = vibration();
        b["entwine:id"] = json!("vibration-hall-7");
        b["entwine:devices"] = json!(["vib-hall7-*"]);
        b["entwine:odte"]["time_window"] = json!(10);
        let b = Model::parse("b.json", &b.to_string()).unwrap();
        let set = ModelSet::new(OdteConfig::seed_default(), vec![a, b]).unwrap();
        assert!(matches!(set.bind("iiot-device-1"), Binding::Seed));
        assert!(matches!(set.bind("vib-3"), Binding::Model(m) if m.id == "vibration"));
        assert!(matches!(set.bind("vib-hall7-1"), Binding::Model(m) if m.id == "vibration-hall-7"));
        assert_eq!(set.profile_of("iiot-device-1").window_ms(), 30_000);
        assert_eq!(set.profile_of("vib-3").window_ms(), 5_000);
        assert_eq!(set.profile_of("vib-hall7-1").window_ms(), 10_000);
    }

    #[test]
    fn two_models_with_one_id_or_one_pattern_are_refused() {
        let a = parse(&vibration()).unwrap();
        let err =
            ModelSet::new(OdteConfig::seed_default(), vec![a.clone(), a.clone()]).unwrap_err();
        assert_eq!(err.field, "/entwine:id");
        let mut b = vibration();
        b["entwine:id"] = json!("other");
        let b = Model::parse("b.json", &b.to_string()).unwrap();
        let err = ModelSet::new(OdteConfig::seed_default(), vec![a, b]).unwrap_err();
        assert_eq!(err.field, "/entwine:devices/0", "{err}");
    }
}
