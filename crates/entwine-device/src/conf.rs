//! The seed device's configuration file, `device_conf.yaml` (camelCase keys), and its run-time
//! changes through `PUT /conf`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use entwine_core::broker::{BrokerUrl, BrokerUrlError};
use entwine_core::input::{Fields, InputError};
use entwine_core::state::{DeviceId, ENERGY_KEY, TEMPERATURE_KEY};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fleet::Broker;

/// Largest filler target: the functions refuse bodies over 64 KiB, and the connector adds a few
/// bytes (`device_id`) to the payload.
pub const MAX_PAYLOAD_SIZE_BYTES: u64 = 60 * 1024;
/// Fastest aggregated rate a device may be set to, messages per second.
pub const MAX_MSG_PER_SEC: f64 = 1000.0;
/// Longest period or delay accepted, in ms (one day).
pub const MAX_PERIOD_MS: u64 = 24 * 3600 * 1000;

/// `device_conf.yaml`, as the seed's device reads it. Defaults are those of the seed's example
/// deployment (`iiot-device-1`, 5 s sensor period, 2 s initial delay, 0.2 aggregated msg/s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceConf {
    /// The device id: the second level of its topics.
    #[serde(default = "defaults::device_id")]
    pub device_id: String,
    /// Broker host.
    #[serde(default = "defaults::broker_address")]
    pub target_mqtt_broker_address: String,
    /// Broker port.
    #[serde(default = "defaults::broker_port")]
    pub target_mqtt_broker_port: u16,
    /// Port of the device's HTTP API (`GET`/`PUT /conf`).
    #[serde(default = "defaults::http_api_port")]
    pub http_api_port: u16,
    /// Sensor update period, ms.
    #[serde(default = "defaults::update_period_ms")]
    pub update_period_ms: u64,
    /// Delay before the first update and the first message, ms.
    #[serde(default = "defaults::update_initial_delay_ms")]
    pub update_initial_delay_ms: u64,
    /// Whether the aggregated state is published.
    #[serde(default = "defaults::yes")]
    pub aggregated_telemetry: bool,
    /// Aggregated messages per second (period = 1000 / rate ms).
    #[serde(default = "defaults::aggregated_msg_sec")]
    pub aggregated_telemetry_msg_sec: f64,
    /// Whether each sensor also publishes its own reading on every update.
    #[serde(default)]
    pub single_resource_telemetry_enabled: bool,
    /// When set, aggregated payloads are padded with a `payload_overhead` filler to this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_aggregated_telemetry_payload_size_byte: Option<u64>,
    /// Resource key (topic level) → sensor type.
    #[serde(default = "defaults::resource_map")]
    pub resource_map: BTreeMap<String, String>,
}

mod defaults {
    use std::collections::BTreeMap;

    pub(super) fn device_id() -> String {
        "iiot-device-1".into()
    }
    pub(super) fn broker_address() -> String {
        "127.0.0.1".into()
    }
    pub(super) fn broker_port() -> u16 {
        1883
    }
    pub(super) fn http_api_port() -> u16 {
        5555
    }
    pub(super) fn update_period_ms() -> u64 {
        5000
    }
    pub(super) fn update_initial_delay_ms() -> u64 {
        2000
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn aggregated_msg_sec() -> f64 {
        0.2
    }
    pub(super) fn resource_map() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("energy".into(), entwine_core::state::ENERGY_KEY.into()),
            (
                "temperature".into(),
                entwine_core::state::TEMPERATURE_KEY.into(),
            ),
        ])
    }
}

impl Default for DeviceConf {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("every key has a default"))
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for this configuration (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// serde's message, which names the key and the line.
        message: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(InputError),
}

impl DeviceConf {
    /// Reads and validates a `device_conf.yaml`.
    pub fn load(path: &Path) -> Result<Self, ConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfError> {
        let conf: Self = serde_yaml_ng::from_str(text).map_err(|e| ConfError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        conf.validate().map_err(ConfError::Invalid)?;
        Ok(conf)
    }

    /// Checks every value, naming the key of the first bad one.
    pub fn validate(&self) -> Result<(), InputError> {
        DeviceId::parse("deviceId", &self.device_id)?;
        if self.target_mqtt_broker_address.trim().is_empty() {
            return Err(InputError::new(
                "targetMqttBrokerAddress",
                "must not be empty",
            ));
        }
        if let Err(e) = self.broker() {
            return Err(InputError::new("targetMqttBrokerAddress", e.to_string()));
        }
        check_period("updatePeriodMs", self.update_period_ms, 1)?;
        check_period("updateInitialDelayMs", self.update_initial_delay_ms, 0)?;
        check_rate(
            "aggregatedTelemetryMsgSec",
            self.aggregated_telemetry_msg_sec,
        )?;
        if let Some(size) = self.target_aggregated_telemetry_payload_size_byte {
            if size > MAX_PAYLOAD_SIZE_BYTES {
                return Err(InputError::new(
                    "targetAggregatedTelemetryPayloadSizeByte",
                    format!("{size} is above {MAX_PAYLOAD_SIZE_BYTES} (the functions refuse bodies over 64 KiB)"),
                ));
            }
        }
        if self.resource_map.is_empty() {
            return Err(InputError::new(
                "resourceMap",
                "must name at least one sensor",
            ));
        }
        for (key, kind) in &self.resource_map {
            if key.is_empty() || key.contains(['/', '+', '#']) {
                return Err(InputError::new(
                    format!("resourceMap.{key}"),
                    "a resource key must be one MQTT topic level (no '/', '+', '#')",
                ));
            }
            if kind != ENERGY_KEY && kind != TEMPERATURE_KEY {
                return Err(InputError::new(
                    format!("resourceMap.{key}"),
                    format!("unknown sensor type {kind:?}, expected {ENERGY_KEY:?} or {TEMPERATURE_KEY:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The broker of `targetMqttBrokerAddress` and `targetMqttBrokerPort`, read with
    /// [`BrokerUrl`]'s rules: the address is a host (or `mqtt://host`, `[::1]`), and a port
    /// written in it (`host:1884`) wins over `targetMqttBrokerPort`.
    pub fn broker(&self) -> Result<Broker, BrokerUrlError> {
        BrokerUrl::parse_with_default_port(
            &self.target_mqtt_broker_address,
            Some(self.target_mqtt_broker_port),
        )?
        .try_into()
    }

    /// The part that `PUT /conf` may change while the device runs.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            update_period_ms: self.update_period_ms,
            update_initial_delay_ms: self.update_initial_delay_ms,
            aggregated_telemetry_msg_sec: self.aggregated_telemetry_msg_sec,
        }
    }

    /// This configuration with `schedule` in place of its own.
    pub fn with_schedule(&self, schedule: Schedule) -> Self {
        Self {
            update_period_ms: schedule.update_period_ms,
            update_initial_delay_ms: schedule.update_initial_delay_ms,
            aggregated_telemetry_msg_sec: schedule.aggregated_telemetry_msg_sec,
            ..self.clone()
        }
    }

    /// Applies a `PUT /conf` body: any of `updatePeriodMs`, `updateInitialDelayMs`,
    /// `aggregatedTelemetryMsgSec`. Other keys of the configuration may be present (a client may
    /// send back what `GET /conf` gave) but must keep their current value; unknown keys are
    /// refused. Nothing changes unless every value is valid.
    pub fn patched_schedule(&self, body: &Map<String, Value>) -> Result<Schedule, InputError> {
        let current = serde_json::to_value(self)
            .map_err(|e| InputError::new("body", format!("cannot compare: {e}")))?;
        let fields = Fields::new(body);
        let mut schedule = self.schedule();
        for (key, value) in body {
            match key.as_str() {
                "updatePeriodMs" => {
                    schedule.update_period_ms = non_negative(&fields, key)?;
                    check_period(key, schedule.update_period_ms, 1)?;
                }
                "updateInitialDelayMs" => {
                    schedule.update_initial_delay_ms = non_negative(&fields, key)?;
                    check_period(key, schedule.update_initial_delay_ms, 0)?;
                }
                "aggregatedTelemetryMsgSec" => {
                    schedule.aggregated_telemetry_msg_sec = fields.number(key)?;
                    check_rate(key, schedule.aggregated_telemetry_msg_sec)?;
                }
                other => match current.get(other) {
                    None => {
                        return Err(InputError::new(
                            other,
                            "unknown key; PUT /conf changes updatePeriodMs, updateInitialDelayMs and aggregatedTelemetryMsgSec",
                        ))
                    }
                    Some(now) if now != value => {
                        return Err(InputError::new(other, "cannot be changed while the device runs"))
                    }
                    Some(_) => {}
                },
            }
        }
        Ok(schedule)
    }
}

fn non_negative(fields: &Fields<'_>, key: &str) -> Result<u64, InputError> {
    let raw = fields.integer(key)?;
    u64::try_from(raw).map_err(|_| InputError::new(key, format!("{raw} is negative")))
}

fn check_period(key: &str, ms: u64, min: u64) -> Result<(), InputError> {
    if ms < min || ms > MAX_PERIOD_MS {
        return Err(InputError::new(
            key,
            format!("{ms} is outside {min}..={MAX_PERIOD_MS} ms"),
        ));
    }
    Ok(())
}

/// Slowest aggregated rate: one message per [`MAX_PERIOD_MS`].
pub const MIN_MSG_PER_SEC: f64 = 1000.0 / MAX_PERIOD_MS as f64;

fn check_rate(key: &str, rate: f64) -> Result<(), InputError> {
    if !(rate.is_finite() && (MIN_MSG_PER_SEC..=MAX_MSG_PER_SEC).contains(&rate)) {
        return Err(InputError::new(
            key,
            format!(
                "{rate} is not a rate between one message a day ({MIN_MSG_PER_SEC:.8}) and {MAX_MSG_PER_SEC} messages per second"
            ),
        ));
    }
    Ok(())
}

/// The timers of a device, changeable at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Sensor update period, ms.
    pub update_period_ms: u64,
    /// Delay before the first update and message, ms.
    pub update_initial_delay_ms: u64,
    /// Aggregated messages per second.
    pub aggregated_telemetry_msg_sec: f64,
}

impl Schedule {
    /// The sensor update period.
    pub fn update_period(&self) -> Duration {
        Duration::from_millis(self.update_period_ms)
    }

    /// The aggregated telemetry period: 1000 / rate ms.
    pub fn aggregated_period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.aggregated_telemetry_msg_sec)
    }

    /// The initial delay.
    pub fn initial_delay(&self) -> Duration {
        Duration::from_millis(self.update_initial_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SEED_CONF: &str = "
deviceId: iiot-device-1
targetMqttBrokerAddress: physical-broker.default.svc.cluster.local
targetMqttBrokerPort: 1883
httpApiPort: 5555
updatePeriodMs: 5000
updateInitialDelayMs: 2000
aggregatedTelemetry: true
aggregatedTelemetryMsgSec: 0.2
singleResourceTelemetryEnabled: false
resourceMap:
  energy: iot.sensor.energy
  temperature: iot.sensor.temperature
";

    #[test]
    fn the_seed_configuration_file_parses_as_it_is() {
        let conf = DeviceConf::parse(SEED_CONF, "device_conf.yaml").unwrap();
        assert_eq!(conf.device_id, "iiot-device-1");
        assert_eq!(
            conf.target_mqtt_broker_address,
            "physical-broker.default.svc.cluster.local"
        );
        assert_eq!(conf.schedule().aggregated_period(), Duration::from_secs(5));
        assert_eq!(conf.resource_map.len(), 2);
        assert_eq!(
            conf,
            DeviceConf {
                target_mqtt_broker_address: "physical-broker.default.svc.cluster.local".into(),
                ..DeviceConf::default()
            }
        );
    }

    #[test]
    fn the_broker_is_read_with_the_one_parser_and_a_port_in_the_address_wins() {
        let with = |address: &str, port: u16| DeviceConf {
            target_mqtt_broker_address: address.into(),
            target_mqtt_broker_port: port,
            ..DeviceConf::default()
        };
        let broker = |host: &str, port: u16| Broker {
            host: host.into(),
            port,
            tls: false,
        };
        assert_eq!(with("broker", 1884).broker(), Ok(broker("broker", 1884)));
        assert_eq!(
            with("mqtt://broker", 1884).broker(),
            Ok(broker("broker", 1884))
        );
        assert_eq!(
            with("broker:1885", 1884).broker(),
            Ok(broker("broker", 1885))
        );
        assert_eq!(with("[::1]", 1883).broker(), Ok(broker("::1", 1883)));
        assert_eq!(
            with("mqtts://broker", 8883).broker(),
            Ok(Broker {
                host: "broker".into(),
                port: 8883,
                tls: true,
            })
        );
        let err = DeviceConf::parse("targetMqttBrokerAddress: http://broker", "c.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "targetMqttBrokerAddress: broker URL \"http://broker\": unsupported scheme \"http\": expected mqtt://, tcp:// or mqtts://"
        );
    }

    #[test]
    fn a_misspelt_key_or_bad_value_is_named() {
        let err = DeviceConf::parse("updatePeriodMS: 10", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("updatePeriodMS"), "{err}");
        let err = DeviceConf::parse("updatePeriodMs: 0", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("updatePeriodMs: "), "{err}");
        let err = DeviceConf::parse("aggregatedTelemetryMsgSec: -1", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("aggregatedTelemetryMsgSec: "), "{err}");
        let err = DeviceConf::parse("resourceMap: {humidity: iot.sensor.humidity}", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("resourceMap.humidity: unknown sensor type"),
            "{err}"
        );
        let err = DeviceConf::parse("deviceId: a/b", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("deviceId: "), "{err}");
    }

    #[test]
    fn put_conf_changes_the_schedule_and_refuses_what_it_cannot_change() {
        let conf = DeviceConf::default();
        let patch = |v: Value| conf.patched_schedule(v.as_object().unwrap());
        let s = patch(json!({"aggregatedTelemetryMsgSec": 2.0, "updatePeriodMs": 100})).unwrap();
        assert_eq!(s.aggregated_period(), Duration::from_millis(500));
        assert_eq!(s.update_period_ms, 100);
        assert_eq!(s.update_initial_delay_ms, 2000);
        // What GET /conf returned, sent back with one change, is accepted.
        let mut full = serde_json::to_value(&conf).unwrap();
        full["updateInitialDelayMs"] = json!(0);
        assert_eq!(patch(full).unwrap().update_initial_delay_ms, 0);
        for (body, field) in [
            (json!({"updatePeriodMs": 0}), "updatePeriodMs"),
            (json!({"updatePeriodMs": "fast"}), "updatePeriodMs"),
            (json!({"updatePeriodMs": -5}), "updatePeriodMs"),
            (json!({"updateInitialDelayMs": 1.5}), "updateInitialDelayMs"),
            (
                json!({"aggregatedTelemetryMsgSec": 0}),
                "aggregatedTelemetryMsgSec",
            ),
            (
                json!({"aggregatedTelemetryMsgSec": 1e-20}),
                "aggregatedTelemetryMsgSec",
            ),
            (
                json!({"aggregatedTelemetryMsgSec": 5000}),
                "aggregatedTelemetryMsgSec",
            ),
            (json!({"deviceId": "other"}), "deviceId"),
            (json!({"colour": "red"}), "colour"),
        ] {
            assert_eq!(patch(body.clone()).unwrap_err().field, field, "{body}");
        }
    }
}
