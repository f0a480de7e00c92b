//! The errors of the emulator, one variant per thing a caller may act on.

use entwine_core::broker::BrokerUrlError;
use entwine_core::input::InputError;

/// Why the emulator could not start, or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device configuration has a value out of range (the field is named).
    #[error("invalid device configuration: {0}")]
    Conf(InputError),
    /// The fault plan has a value out of range, or names a device outside the fleet.
    #[error("invalid faults: {0}")]
    Faults(InputError),
    /// A fleet of no device.
    #[error("a fleet needs at least one device")]
    NoDevices,
    /// A device id that cannot be one (it must be one MQTT topic level).
    #[error("{0}")]
    DeviceId(InputError),
    /// A group of model devices that cannot run as given: an id its model's patterns would not
    /// bind to it, an id two devices of the fleet would share, a seed device a model would bind.
    #[error("model {model}: {reason}")]
    Model {
        /// The model's id.
        model: String,
        /// What is wrong, naming the device id.
        reason: String,
    },
    /// The broker address cannot be used.
    #[error(transparent)]
    Broker(#[from] BrokerUrlError),
    /// The MQTT security settings cannot be used (a TLS file, a device without credentials).
    #[error("MQTT: {0}")]
    Mqtt(#[from] entwine_mqtt::MqttSecurityError),
    /// The API's listener has no local address.
    #[error("the device API listener has no address")]
    Listener(#[source] std::io::Error),
    /// The API would listen beyond loopback without tokens.
    #[error("device API: {0}")]
    Exposed(#[source] entwine_http::ExposureError),
    /// The HTTP API stopped on an error (its socket).
    #[error("the device HTTP API failed")]
    Api(#[source] std::io::Error),
    /// A task of the emulator panicked.
    #[error("{task} panicked")]
    Panicked {
        /// Which: `device tasks`, `a connection task`, `HTTP API`.
        task: &'static str,
        /// The panic.
        #[source]
        source: tokio::task::JoinError,
    },
}
