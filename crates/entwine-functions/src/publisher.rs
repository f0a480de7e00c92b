//! Digital events: each digital state (by the digital-event handler), and each change of a
//! twin's lifecycle (by the twin handler and the twin evaluator), published to the digital broker so that applications can subscribe (`digitaltwin/<device_id>/state` and
//! `digitaltwin/<device_id>/lifecycle` by default, QoS 1). Off when no broker is configured.
//!
//! Publishing never holds a function up: messages go to the MQTT client's queue and its event
//! loop sends them (reconnecting while the broker is away after waits of entwine's retry policy,
//! [`entwine_core::retry::policy`], from [`RECONNECT_BACKOFF_MIN`] doubling to
//! [`RECONNECT_BACKOFF_MAX`], jittered); when the queue is full
//! the message is counted (`entwine_digital_events_dropped_total`) and logged, not waited for.

use std::time::Duration;

use entwine_core::broker::{BrokerUrl, BrokerUrlError};
use entwine_core::retry;
use entwine_core::state::DigitalState;
use entwine_store::TwinChange;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use serde::Serialize;
use tokio::task::JoinHandle;

/// The default topic of digital states.
pub const DEFAULT_STATE_TOPIC: &str = "digitaltwin/{device_id}/state";
/// The default topic of lifecycle changes.
pub const DEFAULT_LIFECYCLE_TOPIC: &str = "digitaltwin/{device_id}/lifecycle";
/// Longest wait before the first reconnection to the digital broker.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two reconnections to the digital broker (jitter included).
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why digital events cannot be published with these settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublisherError {
    /// A topic that does not name the device.
    #[error("{key} {topic:?} must contain {{device_id}}")]
    TopicWithoutDevice {
        /// `state_topic` or `lifecycle_topic`.
        key: &'static str,
        /// The topic as given.
        topic: String,
    },
    /// A topic with an MQTT wildcard (`+`, `#`), which cannot be published to.
    #[error("{key} {topic:?} must not contain MQTT wildcards")]
    TopicWildcard {
        /// `state_topic` or `lifecycle_topic`.
        key: &'static str,
        /// The topic as given.
        topic: String,
    },
    /// The broker address cannot be used.
    #[error("broker_url: {0}")]
    BrokerUrl(#[from] BrokerUrlError),
    /// The MQTT security settings cannot be used (a TLS file).
    #[error("mqtt: {0}")]
    Mqtt(String),
}

/// Where digital events go.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// The digital broker, `host:port` or `mqtt://host:port` ([`BrokerUrl`]'s rules).
    pub broker_url: String,
    /// Topic of digital states; `{device_id}` is replaced by the device's id.
    pub state_topic: String,
    /// Topic of lifecycle changes; `{device_id}` is replaced by the device's id.
    pub lifecycle_topic: String,
    /// The MQTT client id (unique per process).
    pub client_id: String,
    /// How the publisher logs in and encrypts (`mqtt.*`).
    pub mqtt: entwine_mqtt::MqttSecurity,
}

impl PublisherSettings {
    /// Settings for `broker_url` with the default topics.
    pub fn new(broker_url: &str, client_id: &str) -> Self {
        Self {
            broker_url: broker_url.to_owned(),
            state_topic: DEFAULT_STATE_TOPIC.to_owned(),
            lifecycle_topic: DEFAULT_LIFECYCLE_TOPIC.to_owned(),
            client_id: client_id.to_owned(),
            mqtt: entwine_mqtt::MqttSecurity::none(),
        }
    }

    /// Checks the broker address and that each topic names the device and has no wildcard;
    /// answers the broker's address.
    pub fn validate(&self) -> Result<BrokerUrl, PublisherError> {
        for (key, topic) in [
            ("state_topic", &self.state_topic),
            ("lifecycle_topic", &self.lifecycle_topic),
        ] {
            if !topic.contains("{device_id}") {
                return Err(PublisherError::TopicWithoutDevice {
                    key,
                    topic: topic.clone(),
                });
            }
            if topic.contains(['+', '#']) {
                return Err(PublisherError::TopicWildcard {
                    key,
                    topic: topic.clone(),
                });
            }
        }
        Ok(BrokerUrl::parse(&self.broker_url)?)
    }
}

/// Publishes digital events; cheap to clone.
#[derive(Debug, Clone)]
pub struct DigitalPublisher {
    client: AsyncClient,
    state_topic: String,
    lifecycle_topic: String,
}

impl DigitalPublisher {
    /// Connects (in the background) to the digital broker. The task turns the MQTT event loop
    /// until [`DigitalPublisher::close`].
    pub fn start(settings: &PublisherSettings) -> Result<(Self, JoinHandle<()>), PublisherError> {
        let url = settings.validate()?;
        let security = settings
            .mqtt
            .prepare(url.tls)
            .map_err(|e| PublisherError::Mqtt(e.to_string()))?;
        let user = security.username().map(str::to_owned);
        let mut options = MqttOptions::new(&settings.client_id, url.host, url.port);
        options.set_keep_alive(Duration::from_secs(30));
        security.apply(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 10_000);
        // Never cancelled mid-poll (rumqttc's poll is not cancel-safe): it ends on DISCONNECT.
        let pump = tokio::spawn(async move {
            let delays = || retry::delays(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
            let mut backoff = delays();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => backoff = delays(),
                    Err(e) => {
                        // The policy has no last attempt; the fallback is never reached.
                        let wait = backoff.next().unwrap_or(RECONNECT_BACKOFF_MAX);
                        match entwine_mqtt::refusal(&e, user.as_deref()) {
                            Some(reason) => {
                                tracing::error!(error = %e, retry_in = ?wait, "digital broker: {reason}");
                            }
                            None => {
                                tracing::warn!(error = %e, retry_in = ?wait, "digital broker connection lost");
                            }
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        Ok((
            Self {
                client,
                state_topic: settings.state_topic.clone(),
                lifecycle_topic: settings.lifecycle_topic.clone(),
            },
            pump,
        ))
    }

    /// Publishes a digital state.
    pub fn state(&self, state: &DigitalState) {
        let topic = self
            .state_topic
            .replace("{device_id}", state.pending.device_id.as_str());
        self.send(topic, state, "state");
    }

    /// Publishes a lifecycle change.
    pub fn change(&self, change: &TwinChange) {
        let topic = self
            .lifecycle_topic
            .replace("{device_id}", &change.device_id);
        self.send(topic, change, "lifecycle");
    }

    fn send(&self, topic: String, body: &impl Serialize, kind: &'static str) {
        let payload = match serde_json::to_vec(body) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::error!(error = %e, %topic, "cannot encode a digital event");
                return;
            }
        };
        match self
            .client
            .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                metrics::counter!("entwine_digital_events_total", "kind" => kind).increment(1);
            }
            Err(e) => {
                metrics::counter!("entwine_digital_events_dropped_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(error = %e, %topic, "digital event dropped: the publisher's queue is full");
            }
        }
    }

    /// Sends what is queued, then disconnects (the pump task ends).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_must_name_the_device_and_brokers_be_addresses() {
        let ok = PublisherSettings::new("mqtt://broker:1884", "x");
        let at = |url: &str| {
            let url = PublisherSettings::new(url, "x").validate().unwrap();
            (url.host, url.port, url.tls)
        };
        assert_eq!(ok.validate().unwrap().port, 1884);
        assert_eq!(at("broker"), ("broker".into(), 1883, false));
        assert_eq!(at("tcp://[::1]:1884"), ("::1".into(), 1884, false));
        assert_eq!(at("mqtts://broker"), ("broker".into(), 8883, true));
        let mut bad = PublisherSettings::new("broker:1883", "x");
        bad.state_topic = "digitaltwin/state".into();
        assert_eq!(
            bad.validate(),
            Err(PublisherError::TopicWithoutDevice {
                key: "state_topic",
                topic: "digitaltwin/state".into()
            })
        );
        let mut wild = PublisherSettings::new("broker:1883", "x");
        wild.lifecycle_topic = "twins/+/{device_id}".into();
        assert_eq!(
            wild.validate().unwrap_err().to_string(),
            "lifecycle_topic \"twins/+/{device_id}\" must not contain MQTT wildcards"
        );
        assert_eq!(
            PublisherSettings::new("broker:http", "x").validate(),
            Err(PublisherError::BrokerUrl(BrokerUrlError::Port {
                url: "broker:http".into(),
                port: "http".into()
            }))
        );
        assert!(matches!(
            PublisherSettings::new("http://broker:1883", "x").validate(),
            Err(PublisherError::BrokerUrl(BrokerUrlError::Scheme { .. }))
        ));
    }
}
