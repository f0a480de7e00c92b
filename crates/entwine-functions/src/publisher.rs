//! Digital events: each digital state (by the digital-event handler), and each change of a
//! twin's lifecycle (by the twin handler and the twin evaluator), published to the digital broker so that applications can subscribe (`digitaltwin/<device_id>/state` and
//! `digitaltwin/<device_id>/lifecycle` by default, QoS 1). Off when no broker is configured.
//!
//! Publishing never holds a function up: messages go to the MQTT client's queue and its event
//! loop sends them (reconnecting with backoff while the broker is away); when the queue is full
//! the message is counted (`entwine_digital_events_dropped_total`) and logged, not waited for.

use std::time::Duration;

use entwine_core::state::DigitalState;
use entwine_store::TwinChange;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use serde::Serialize;
use tokio::task::JoinHandle;

/// The default topic of digital states.
pub const DEFAULT_STATE_TOPIC: &str = "digitaltwin/{device_id}/state";
/// The default topic of lifecycle changes.
pub const DEFAULT_LIFECYCLE_TOPIC: &str = "digitaltwin/{device_id}/lifecycle";

/// Where digital events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherSettings {
    /// The digital broker, `host:port` or `mqtt://host:port`.
    pub broker_url: String,
    /// Topic of digital states; `{device_id}` is replaced by the device's id.
    pub state_topic: String,
    /// Topic of lifecycle changes; `{device_id}` is replaced by the device's id.
    pub lifecycle_topic: String,
    /// The MQTT client id (unique per process).
    pub client_id: String,
}

impl PublisherSettings {
    /// Settings for `broker_url` with the default topics.
    pub fn new(broker_url: &str, client_id: &str) -> Self {
        Self {
            broker_url: broker_url.to_owned(),
            state_topic: DEFAULT_STATE_TOPIC.to_owned(),
            lifecycle_topic: DEFAULT_LIFECYCLE_TOPIC.to_owned(),
            client_id: client_id.to_owned(),
        }
    }

    /// Checks the broker address and that each topic names the device and has no wildcard.
    pub fn validate(&self) -> Result<(String, u16), String> {
        for (key, topic) in [
            ("state_topic", &self.state_topic),
            ("lifecycle_topic", &self.lifecycle_topic),
        ] {
            if !topic.contains("{device_id}") {
                return Err(format!("{key} {topic:?} must contain {{device_id}}"));
            }
            if topic.contains(['+', '#']) || topic.is_empty() {
                return Err(format!("{key} {topic:?} must not contain MQTT wildcards"));
            }
        }
        let url = self
            .broker_url
            .strip_prefix("mqtt://")
            .unwrap_or(&self.broker_url);
        let (host, port) = match url.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>().map_err(|_| {
                    format!("broker_url {:?}: {port:?} is not a port", self.broker_url)
                })?,
            ),
            None => (url, 1883),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("broker_url {:?} is not host:port", self.broker_url));
        }
        Ok((host.to_owned(), port))
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
    pub fn start(settings: &PublisherSettings) -> Result<(Self, JoinHandle<()>), String> {
        let (host, port) = settings.validate()?;
        let mut options = MqttOptions::new(&settings.client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 10_000);
        // Never cancelled mid-poll (rumqttc's poll is not cancel-safe): it ends on DISCONNECT.
        let pump = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "digital broker connection lost");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
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
        assert_eq!(ok.validate(), Ok(("broker".into(), 1884)));
        assert_eq!(
            PublisherSettings::new("broker", "x").validate(),
            Ok(("broker".into(), 1883))
        );
        let mut bad = PublisherSettings::new("broker:1883", "x");
        bad.state_topic = "digitaltwin/state".into();
        assert!(bad.validate().unwrap_err().contains("state_topic"));
        let mut wild = PublisherSettings::new("broker:1883", "x");
        wild.lifecycle_topic = "twins/+/{device_id}".into();
        assert!(wild.validate().unwrap_err().contains("lifecycle_topic"));
        assert!(PublisherSettings::new("broker:http", "x")
            .validate()
            .unwrap_err()
            .contains("port"));
        assert!(PublisherSettings::new("http://broker:1883", "x")
            .validate()
            .is_err());
    }
}
