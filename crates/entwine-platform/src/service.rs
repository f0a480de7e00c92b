//! The twins service: the twins API, the live stream (SSE), the web dashboard and `/metrics`
//! over a store written by others (the Fission functions on a cluster), without the function
//! routes, a connector, devices or an evaluator. `entwine serve` runs it; on Kubernetes it is
//! the Deployment of `deploy/k8s/70-twins.yaml`.
//!
//! Live updates come from the digital events the functions publish on the broker
//! ([`entwine_functions::publisher`]): the service subscribes (QoS 1) to the state and lifecycle
//! topics, `{device_id}` replaced by `+`, and sends each message, parsed back into a
//! [`DigitalState`] or a [`TwinChange`], into the in-process feeds the API streams from. A
//! message that does not parse (or whose topic names another device than its payload) is
//! logged and counted (`entwine_service_digital_events_invalid_total{kind}`), never served.
//! Without a broker the service serves the store alone, without live updates. The MQTT client
//! reconnects by itself after waits of entwine's retry policy and subscribes again.
//!
//! [`TwinsService::start`] opens (and migrates) the store, subscribes, and serves; its
//! [`TwinsService::shutdown`] drains in order: it stops accepting connections and ends the live
//! streams, waits for the requests in progress (5 s at most), disconnects from the broker and
//! closes the store.
//!
//! `GET /healthz` (open, for the kubelet's probes) answers 200 when the store answers a ping,
//! 503 otherwise, with whether the broker subscription holds:
//! `{"store": "ok", "broker": "subscribed" | "connecting" | "off"}`. A broker outage does not make
//! the service unready: it still serves the store.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use entwine_core::model::{Model, ModelSet};
use entwine_core::odte::OdteConfig;
use entwine_core::state::DigitalState;
use entwine_functions::handlers::{DigitalFeed, LifecycleFeed};
use entwine_functions::publisher::{
    PublisherSettings, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN,
};
use entwine_http::Interface;
use entwine_store::{Store, TwinChange};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use serde_json::json;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{api, bind_or_free_port, PlatformError, StoreSource};

/// Where the service takes live updates from: the broker the functions publish digital events
/// to, and their topics (the `digital` section the functions read).
#[derive(Debug, Clone)]
pub struct LiveUpdates {
    /// The broker, `host:port`, `mqtt://host:port` or `mqtts://host:port`.
    pub broker_url: String,
    /// The digital states' topic, with `{device_id}` (the functions' `digital.state_topic`).
    pub state_topic: String,
    /// The lifecycle changes' topic, with `{device_id}` (`digital.lifecycle_topic`).
    pub lifecycle_topic: String,
    /// The MQTT client id (unique per replica: a broker disconnects the older of two clients
    /// with the same id).
    pub client_id: String,
    /// How the client logs in and encrypts (`mqtt.*`).
    pub mqtt: entwine_mqtt::MqttSecurity,
}

impl LiveUpdates {
    /// Updates from `broker_url` on the functions' default topics.
    pub fn new(broker_url: &str, client_id: &str) -> Self {
        Self {
            broker_url: broker_url.to_owned(),
            state_topic: entwine_functions::publisher::DEFAULT_STATE_TOPIC.to_owned(),
            lifecycle_topic: entwine_functions::publisher::DEFAULT_LIFECYCLE_TOPIC.to_owned(),
            client_id: client_id.to_owned(),
            mqtt: entwine_mqtt::MqttSecurity::none(),
        }
    }

    /// The topic filters subscribed to: each topic with `{device_id}` replaced by `+`.
    pub fn filters(&self) -> [String; 2] {
        [
            self.state_topic.replace("{device_id}", "+"),
            self.lifecycle_topic.replace("{device_id}", "+"),
        ]
    }
}

/// Everything the twins service is made of.
#[derive(Clone)]
pub struct ServiceConfig {
    /// The store (on a cluster, PostgreSQL), opened and migrated from a URL, or given.
    pub store: StoreSource,
    /// Where the HTTP server listens (a free port of the same address when it is taken; port 0
    /// for any). Beyond loopback `auth` must hold tokens, or the service refuses to start.
    pub listen: SocketAddr,
    /// The HTTP server's limits.
    pub http_limits: entwine_http::Limits,
    /// Who may call the API, the stream and `/metrics`.
    pub auth: entwine_http::Auth,
    /// The seed device's ODTE profile (the twins API names each twin's model).
    pub odte: OdteConfig,
    /// The device models beside the seed's.
    pub models: Vec<Model>,
    /// The broker the live updates come from; none: the store alone, no live updates.
    pub live: Option<LiveUpdates>,
    /// Whether to install the process's Prometheus recorder and serve `/metrics`.
    pub metrics: bool,
    /// How many digital states and lifecycle changes the feeds hold for a slow receiver
    /// before it lags (and skips what it missed).
    pub feed_capacity: usize,
    /// Retention of the history (`retention` settings), run by the service on a cluster (the
    /// functions keep none): every `period`, the states older than `keep` that no window reads
    /// are deleted. None keeps everything.
    pub retention: Option<entwine_store::RetentionSettings>,
}

impl ServiceConfig {
    /// The service over the store at `database_url` on 127.0.0.1:8080, without live updates,
    /// the seed's profile, metrics on.
    pub fn new(database_url: &str) -> Self {
        Self {
            store: StoreSource::Url {
                url: database_url.to_owned(),
                options: entwine_store::StoreOptions::default(),
            },
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http_limits: entwine_http::Limits::default(),
            auth: entwine_http::Auth::default(),
            odte: OdteConfig::seed_default(),
            models: Vec::new(),
            live: None,
            metrics: true,
            feed_capacity: 4096,
            retention: None,
        }
    }
}

/// What the service received from the broker, counted.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Whether the subscription holds (connected, and the broker granted both filters).
    pub subscribed: AtomicBool,
    /// Digital states received and sent into the feed.
    pub states: AtomicU64,
    /// Lifecycle changes received and sent into the feed.
    pub changes: AtomicU64,
    /// Messages refused (not a digital state or a lifecycle change, or on another device's
    /// topic).
    pub invalid: AtomicU64,
}

/// A running twins service.
pub struct TwinsService {
    store: Store,
    close_store: bool,
    http_address: SocketAddr,
    feed: DigitalFeed,
    lifecycle: LifecycleFeed,
    http_stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    live: Option<(AsyncClient, JoinHandle<()>)>,
    live_stats: Arc<LiveStats>,
}

/// Opens the store a [`StoreSource`] names: from a URL, opened and migrated (closed by its
/// owner: the answer's `true`), or the one given (`false`).
pub(crate) async fn open_store(source: &StoreSource) -> Result<(Store, bool), PlatformError> {
    match source {
        StoreSource::Url { url, options } => {
            let store = Store::open(url, options).map_err(|source| PlatformError::Store {
                backend: "store",
                source,
            })?;
            store
                .migrate()
                .await
                .map_err(|source| PlatformError::Store {
                    backend: store.backend(),
                    source,
                })?;
            Ok((store, true))
        }
        StoreSource::Given(store) => Ok((store.clone(), false)),
    }
}

/// The process's Prometheus recorder, for `models`' silence thresholds.
pub(crate) fn recorder(
    models: &ModelSet,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, PlatformError> {
    entwine_functions::telemetry::prometheus_for(models)
        .map_err(|e| PlatformError::component("metrics", e))
}

impl TwinsService {
    /// Starts the service: checks the listener against `auth` (the loopback rule), opens the
    /// store, subscribes to the live updates (in the background: a broker that is not there yet
    /// is retried) and serves.
    pub async fn start(config: ServiceConfig) -> Result<Self, PlatformError> {
        let mut served = vec![Interface::Api];
        if config.metrics {
            served.push(Interface::Metrics);
        }
        entwine_http::check_exposure(config.listen, &config.auth, &served)
            .map_err(|e| PlatformError::Config(e.to_string()))?;
        if let Some(live) = &config.live {
            check_topics(live)?;
        }
        let auth = Arc::new(config.auth.clone());
        let models = Arc::new(
            ModelSet::new(config.odte, config.models.clone())
                .map_err(|e| PlatformError::Config(e.to_string()))?,
        );
        let metrics = if config.metrics {
            Some(recorder(&models)?)
        } else {
            None
        };
        let (store, close_store) = open_store(&config.store).await?;
        let listener = match bind_or_free_port(config.listen, "HTTP server").await {
            Ok(listener) => listener,
            Err(e) => {
                if close_store {
                    store.close().await;
                }
                return Err(e);
            }
        };
        let http_address = listener
            .local_addr()
            .map_err(|source| PlatformError::Listen {
                what: "HTTP server",
                address: config.listen,
                source,
            })?;
        let (feed, _) = broadcast::channel(config.feed_capacity.max(1));
        let (lifecycle, _) = broadcast::channel(config.feed_capacity.max(1));
        let live_stats = Arc::new(LiveStats::default());
        let live = match &config.live {
            None => {
                tracing::info!("no broker configured: serving the store without live updates");
                None
            }
            Some(live) => {
                match subscribe(live, feed.clone(), lifecycle.clone(), live_stats.clone()) {
                    Ok(subscribed) => Some(subscribed),
                    Err(e) => {
                        if close_store {
                            store.close().await;
                        }
                        return Err(e);
                    }
                }
            }
        };

        let http_stop = CancellationToken::new();
        // Stopped with the HTTP server, before the store closes (a batch cut short rolls back).
        if let Some(retention) = config.retention {
            tokio::spawn(crate::retain_every(
                store.clone(),
                models.clone(),
                Arc::new(entwine_functions::handlers::SystemClock),
                retention,
                http_stop.child_token(),
            ));
        }
        let app = app(AppParts {
            store: store.clone(),
            models,
            feed: feed.clone(),
            lifecycle: lifecycle.clone(),
            metrics,
            closing: http_stop.clone(),
            auth,
            live: live.as_ref().map(|_| live_stats.clone()),
        });
        let http = {
            let stop = http_stop.clone();
            let limits = config.http_limits;
            tokio::spawn(async move {
                entwine_http::serve(listener, app, limits, async move { stop.cancelled().await })
                    .await
            })
        };
        Ok(Self {
            store,
            close_store,
            http_address,
            feed,
            lifecycle,
            http_stop,
            http,
            live,
            live_stats,
        })
    }

    /// Where the HTTP server listens.
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// The store it serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether live updates come from a broker.
    pub fn has_live_updates(&self) -> bool {
        self.live.is_some()
    }

    /// What it received from the broker, counted.
    pub fn live_stats(&self) -> &Arc<LiveStats> {
        &self.live_stats
    }

    /// Every digital state received from the broker, from now on.
    pub fn digital_states(&self) -> broadcast::Receiver<DigitalState> {
        self.feed.subscribe()
    }

    /// Every lifecycle change received from the broker, from now on.
    pub fn lifecycle_changes(&self) -> broadcast::Receiver<TwinChange> {
        self.lifecycle.subscribe()
    }

    /// Stops in order and drains: stops accepting connections and ends the live streams, waits
    /// for the requests in progress (connections still open after 5 s are closed), disconnects
    /// from the broker, closes the store (unless it was given).
    pub async fn shutdown(mut self) -> Result<(), PlatformError> {
        self.http_stop.cancel();
        let served = match tokio::time::timeout(Duration::from_secs(5), &mut self.http).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(PlatformError::component("HTTP server", e)),
            Ok(Err(e)) => Err(PlatformError::component(
                "HTTP server",
                anyhow::anyhow!("panicked: {e}"),
            )),
            Err(_) => {
                tracing::warn!("HTTP connections still open after 5 s: closing them");
                self.http.abort();
                Ok(())
            }
        };
        if let Some((client, pump)) = self.live.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
            let abort = pump.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), pump)
                .await
                .is_err()
            {
                // Still reconnecting to a broker that is away: nothing left to send.
                abort.abort();
            }
        }
        if self.close_store {
            self.store.close().await;
        }
        served
    }
}

impl Drop for TwinsService {
    fn drop(&mut self) {
        // Dropped without `shutdown` (a failed test, a panic): stop serving and subscribing.
        self.http_stop.cancel();
        if let Some((_, pump)) = &self.live {
            pump.abort();
        }
    }
}

/// What the HTTP app is assembled from.
struct AppParts {
    store: Store,
    models: Arc<ModelSet>,
    feed: DigitalFeed,
    lifecycle: LifecycleFeed,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    closing: CancellationToken,
    auth: Arc<entwine_http::Auth>,
    live: Option<Arc<LiveStats>>,
}

/// The twins API, the stream and `/metrics` ([`api::router`]), the dashboard, and `/healthz`;
/// every other path a JSON 404.
fn app(parts: AppParts) -> Router {
    let health = Router::new()
        .route("/healthz", get(healthz))
        .with_state(Health {
            store: parts.store.clone(),
            live: parts.live,
        });
    let api = api::router(
        parts.store,
        parts.models,
        parts.feed,
        parts.lifecycle,
        parts.metrics,
        parts.closing,
        parts.auth,
    );
    let app = api.merge(entwine_web::router()).merge(health);
    entwine_http::json_errors(app.fallback(|request: Request| async move {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("nothing at {}", request.uri().path())})),
        )
    }))
}

#[derive(Clone)]
struct Health {
    store: Store,
    live: Option<Arc<LiveStats>>,
}

async fn healthz(State(health): State<Health>) -> Response {
    let broker = match &health.live {
        None => "off",
        Some(stats) if stats.subscribed.load(Ordering::Relaxed) => "subscribed",
        Some(_) => "connecting",
    };
    match health.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"store": "ok", "broker": broker})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: the store does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"store": e.to_string(), "broker": broker})),
            )
                .into_response()
        }
    }
}

/// The topics must be the functions' (each with `{device_id}`, no wildcard: the publisher's own
/// check) and tell a state from a change.
fn check_topics(live: &LiveUpdates) -> Result<(), PlatformError> {
    let mut settings = PublisherSettings::new(&live.broker_url, &live.client_id);
    settings.state_topic = live.state_topic.clone();
    settings.lifecycle_topic = live.lifecycle_topic.clone();
    let url = settings
        .validate()
        .map_err(|e| PlatformError::Config(format!("digital.{e}")))?;
    // The login and TLS files, before anything starts.
    live.mqtt
        .prepare(url.tls)
        .map_err(|e| PlatformError::Config(format!("mqtt: {e}")))?;
    if live.state_topic == live.lifecycle_topic {
        return Err(PlatformError::Config(format!(
            "digital.lifecycle_topic: {:?} is also the state topic; the two must differ",
            live.lifecycle_topic
        )));
    }
    Ok(())
}

/// Which feed a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    State,
    Lifecycle,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Lifecycle => "lifecycle",
        }
    }
}

/// The device id `topic` names under `pattern` (a topic with `{device_id}`), if it matches.
fn device_of<'t>(pattern: &str, topic: &'t str) -> Option<&'t str> {
    let (prefix, suffix) = pattern.split_once("{device_id}")?;
    let device = topic.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!device.is_empty() && !device.contains('/')).then_some(device)
}

/// A message parsed into what it announces, or why it is refused.
#[derive(Debug, PartialEq)]
enum Parsed {
    State(Box<DigitalState>),
    Change(TwinChange),
}

fn parse(live: &LiveUpdates, topic: &str, payload: &[u8], now_ms: i64) -> Result<Parsed, String> {
    let (kind, device) = match (
        device_of(&live.state_topic, topic),
        device_of(&live.lifecycle_topic, topic),
    ) {
        (Some(device), _) => (Kind::State, device),
        (None, Some(device)) => (Kind::Lifecycle, device),
        (None, None) => return Err("a topic of neither filter".into()),
    };
    let (parsed, named) = match kind {
        Kind::State => {
            let map = entwine_core::input::parse_object(payload).map_err(|e| e.to_string())?;
            let state = DigitalState::from_json(&map, now_ms).map_err(|e| e.to_string())?;
            let named = state.pending.device_id.as_str().to_owned();
            (Parsed::State(Box::new(state)), named)
        }
        Kind::Lifecycle => {
            let change: TwinChange = serde_json::from_slice(payload)
                .map_err(|e| format!("not a lifecycle change: {e}"))?;
            let named = change.device_id.clone();
            (Parsed::Change(change), named)
        }
    };
    if named != device {
        return Err(format!(
            "device_id: {named:?}, but the topic names {device:?}"
        ));
    }
    Ok(parsed)
}

/// Connects (in the background) and subscribes; the task turns the MQTT event loop, sends what
/// it receives into the feeds, and subscribes again after each reconnection.
fn subscribe(
    live: &LiveUpdates,
    feed: DigitalFeed,
    lifecycle: LifecycleFeed,
    stats: Arc<LiveStats>,
) -> Result<(AsyncClient, JoinHandle<()>), PlatformError> {
    let url = entwine_core::broker::BrokerUrl::parse(&live.broker_url)
        .map_err(|e| PlatformError::Config(format!("digital.broker_url: {e}")))?;
    let security = live
        .mqtt
        .prepare(url.tls)
        .map_err(|e| PlatformError::Config(format!("mqtt: {e}")))?;
    let user = security.username().map(str::to_owned);
    let mut options = MqttOptions::new(&live.client_id, url.host.clone(), url.port);
    options.set_keep_alive(Duration::from_secs(30));
    // Live only: what was published while the service was away is in the store.
    options.set_clean_session(true);
    // A digital state is far below this; a larger message is refused by the client.
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    security.apply(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let filters = live.filters();
    let live = live.clone();
    let subscriber = client.clone();
    let broker = url.host;
    let pump = tokio::spawn(async move {
        let delays = || entwine_core::retry::delays(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
        let mut backoff = delays();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = delays();
                    tracing::info!(%broker, filters = ?filters, "live updates: connected, subscribing");
                    let requests = filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(e) = subscriber.try_subscribe_many(requests) {
                        tracing::error!(error = %e, "live updates: cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(filters = ?filters, "live updates: the broker refused the subscription (its ACL must let this login read the digital topics)");
                    } else {
                        tracing::info!(filters = ?filters, "live updates: subscribed");
                    }
                    stats.subscribed.store(!refused, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    receive(
                        &live,
                        &publish.topic,
                        &publish.payload,
                        &feed,
                        &lifecycle,
                        &stats,
                    );
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    stats.subscribed.store(false, Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    stats.subscribed.store(false, Ordering::Relaxed);
                    // The policy has no last attempt; the fallback is never reached.
                    let wait = backoff.next().unwrap_or(RECONNECT_BACKOFF_MAX);
                    match entwine_mqtt::refusal(&e, user.as_deref()) {
                        Some(reason) => {
                            tracing::error!(error = %e, retry_in = ?wait, "live updates: {reason}");
                        }
                        None => {
                            tracing::warn!(error = %e, retry_in = ?wait, "live updates: broker connection lost, reconnecting");
                        }
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    Ok((client, pump))
}

/// One message from the broker into its feed, or counted and logged as invalid.
fn receive(
    live: &LiveUpdates,
    topic: &str,
    payload: &[u8],
    feed: &DigitalFeed,
    lifecycle: &LifecycleFeed,
    stats: &LiveStats,
) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match parse(live, topic, payload, now_ms) {
        Ok(Parsed::State(state)) => {
            stats.states.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("entwine_service_digital_events_total", "kind" => Kind::State.label())
                .increment(1);
            // No receiver (no stream open) is not an error.
            let _ = feed.send(*state);
        }
        Ok(Parsed::Change(change)) => {
            stats.changes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("entwine_service_digital_events_total", "kind" => Kind::Lifecycle.label())
                .increment(1);
            let _ = lifecycle.send(change);
        }
        Err(reason) => {
            stats.invalid.fetch_add(1, Ordering::Relaxed);
            let kind = if device_of(&live.lifecycle_topic, topic).is_some()
                && device_of(&live.state_topic, topic).is_none()
            {
                Kind::Lifecycle
            } else {
                Kind::State
            };
            metrics::counter!("entwine_service_digital_events_invalid_total", "kind" => kind.label())
                .increment(1);
            tracing::warn!(%topic, bytes = payload.len(), %reason, "live updates: message refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> LiveUpdates {
        let mut live = LiveUpdates::new("127.0.0.1:1883", "t");
        live.state_topic = "t1/{device_id}/state".into();
        live.lifecycle_topic = "t1/{device_id}/lifecycle".into();
        live
    }

    #[test]
    fn topics_become_filters_and_name_the_device() {
        assert_eq!(live().filters(), ["t1/+/state", "t1/+/lifecycle"]);
        assert_eq!(
            device_of("t1/{device_id}/state", "t1/dev-1/state"),
            Some("dev-1")
        );
        assert_eq!(device_of("t1/{device_id}/state", "t1/a/b/state"), None);
        assert_eq!(device_of("t1/{device_id}/state", "t1//state"), None);
        assert_eq!(
            device_of("t1/{device_id}/state", "t1/dev-1/lifecycle"),
            None
        );
    }

    #[test]
    fn a_change_parses_and_a_bad_message_is_refused_naming_why() {
        let now = 1_700_000_000_000;
        let change = json!({"device_id": "dev-1", "from": "bound", "to": "entangled", "at": now, "odte": 1.0, "availability": 1.0, "reliability": 1.0, "timeliness": 1.0});
        let parsed = parse(
            &live(),
            "t1/dev-1/lifecycle",
            change.to_string().as_bytes(),
            now,
        );
        let Ok(Parsed::Change(change)) = parsed else {
            panic!("a change: {parsed:?}");
        };
        assert_eq!(change.device_id, "dev-1");
        assert_eq!(change.at, now);
        let elsewhere = parse(
            &live(),
            "t1/dev-2/lifecycle",
            json!({"device_id": "dev-1", "from": "bound", "to": "entangled", "at": now, "odte": 1.0, "availability": 1.0, "reliability": 1.0, "timeliness": 1.0})
                .to_string()
                .as_bytes(),
            now,
        );
        assert_eq!(
            elsewhere,
            Err("device_id: \"dev-1\", but the topic names \"dev-2\"".into())
        );
        let text = parse(&live(), "t1/dev-1/state", b"not json", now).unwrap_err();
        assert!(text.starts_with("body"), "{text}");
        let missing = parse(&live(), "t1/dev-1/state", br#"{"device_id": "dev-1"}"#, now);
        assert!(missing.is_err(), "{missing:?}");
    }

    #[test]
    fn the_same_topic_for_both_is_refused() {
        let mut same = live();
        same.lifecycle_topic = same.state_topic.clone();
        assert_eq!(
            check_topics(&same).unwrap_err().to_string(),
            "digital.lifecycle_topic: \"t1/{device_id}/state\" is also the state topic; the two must differ"
        );
        let mut wild = live();
        wild.state_topic = "t1/+/{device_id}".into();
        assert_eq!(
            check_topics(&wild).unwrap_err().to_string(),
            "digital.state_topic \"t1/+/{device_id}\" must not contain MQTT wildcards"
        );
    }
}
