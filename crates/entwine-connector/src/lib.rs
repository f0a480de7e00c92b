//! entwine's MQTT connector: takes device telemetry from the broker and chains the four
//! function routes for each message, as the seed's connector does, without its failure modes.
//!
//! - **Order per device, concurrency across devices**: a message goes to one of `lanes` workers
//!   chosen by its device id, so one device's events are processed in the order they arrived
//!   (a batch holds a lane's messages in arrival order, and the functions take it in order)
//!   while up to `lanes` devices are processed at once.
//! - **No loss**: the subscription is QoS 1 on a persistent session, and a message is
//!   acknowledged to the broker only once its chain has completed (or it was dead-lettered).
//!   Messages published while the connector is down wait in the broker; a message in progress
//!   when it stops is delivered again, and the idempotent functions answer it without a second
//!   row.
//! - **Batches without waiting** (issue #13, group commit): a lane awaits one message, then
//!   takes whatever else is queued for it already, up to `max_batch` messages (64) and
//!   `max_batch_bytes` (under the functions' 1 MiB), and sends them through each route as one
//!   JSON array, answered by an array of as many elements, in order (one commit per route in
//!   the store). No timer: at low load a message goes alone, as the single JSON object of an
//!   unbatched call; under load batches grow by themselves. Route k takes the messages that
//!   route k − 1 answered; an element answered with an error object is dead-lettered alone and
//!   the others go on. A whole call that fails is retried whole, by the rules below; a batch
//!   refused whole (a 4xx, such as from functions that take only objects, or a 500 that
//!   persists) is sent again one message at a time, so nothing is dead-lettered for having
//!   been batched. `max_batch = 1` never sends an array (for the seed's functions). Each
//!   message is acknowledged once its own chain ended. Counted in `batches`,
//!   `batched_events`, `largest_batch` and `entwine_connector_batch_size`.
//! - **Retries**: a 5xx, a timeout or a connection error is retried with exponential backoff.
//! - **Dead letters**: a 4xx (the message is bad, retrying cannot help), a topic without a device
//!   id or a payload that is not a JSON object goes to the dead-letter topic with the reason,
//!   is counted and logged, and the connector carries on.
//! - **Shared subscriptions**: `$share/<group>/…` filters let several connectors split a stream.
//! - **Graceful shutdown**: stops taking messages, finishes the chains in progress, flushes
//!   acknowledgements, disconnects. A member of a shared subscription first leaves the share
//!   group and finishes every message it received, so nothing waits in a session that may never
//!   reconnect (a replaced Kubernetes pod).
//!
//! # Example
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use entwine_connector::{ConnectorConfig, ConnectorStats};
//! let config = ConnectorConfig::new("127.0.0.1:1883", vec!["device/+/telemetry/device_state".into()], "127.0.0.1:8080")?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! entwine_connector::run(config, std::sync::Arc::new(ConnectorStats::default()), shutdown).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod acks;
mod chain;
pub mod functions;

pub use functions::{CallFailure, CallFuture, Functions, HttpFunctions};

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use entwine_core::state::DeviceId;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeFilter,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The routes chained for each message, in order.
pub const ROUTES: [&str; 4] = [
    "/physicalevents",
    "/physicalstates",
    "/pendingdigitalstates",
    "/digitalstates",
];

/// The dead-letter handler's route.
pub const DEAD_LETTER_ROUTE: &str = "/deadletters";

/// Most elements of one batch the functions take (`entwine_functions::http::MAX_BATCH_ELEMENTS`):
/// the upper bound of [`ConnectorConfig::max_batch`].
pub const MAX_BATCH: usize = 256;

/// Most bytes of one batch's body the functions take
/// (`entwine_functions::http::MAX_BATCH_BODY_BYTES`): the upper bound of
/// [`ConnectorConfig::max_batch_bytes`].
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The default [`ConnectorConfig::max_batch_bytes`]: the functions' limit less 64 KiB, a margin
/// for a server that counts its body limit differently.
pub const DEFAULT_MAX_BATCH_BYTES: usize = MAX_BATCH_BYTES - 64 * 1024;

/// Everything the connector needs.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Broker host.
    pub broker_host: String,
    /// Broker port.
    pub broker_port: u16,
    /// The broker address asked for TLS (`mqtts://`).
    pub broker_tls: bool,
    /// How the connector logs in to the broker and encrypts (`mqtt.*`; TLS also when
    /// `broker_tls`).
    pub mqtt: entwine_mqtt::MqttSecurity,
    /// MQTT topic filters (wildcards and `$share/<group>/…` allowed).
    pub topics: Vec<String>,
    /// Base URL of the functions' router, e.g. `http://router.fission`.
    pub router_url: String,
    /// The bearer token presented to the functions (`auth.token`), when they require one.
    pub router_token: Option<secrecy::SecretString>,
    /// MQTT client id; the persistent session is keyed by it.
    pub client_id: String,
    /// Subscription QoS (1 unless told otherwise: 0 gives up the no-loss guarantee).
    pub qos: QoS,
    /// Batches in progress at once (8 by default): a device is hashed to one lane, which runs its
    /// batches one after the other, so a device's events stay in order while lanes run side by
    /// side. With batching, a few lanes carry the load (each takes whatever queued behind its
    /// previous batch); more lanes mean smaller batches, and beyond the store's connections they
    /// only wait for one (BENCHMARKS.md, issue #13). A lane retrying a failed call holds up the
    /// devices hashed to it, one `lanes`-th of them.
    pub lanes: usize,
    /// Where rejected messages are announced (MQTT, QoS 1, best effort).
    pub dead_letter_topic: String,
    /// Whether dead letters are stored durably by the dead-letter handler ([`DEAD_LETTER_ROUTE`]);
    /// a refused message is then acknowledged only once its letter is stored. `false`:
    /// announced on the topic only (for functions that have no dead-letter handler, such as the
    /// seed's).
    pub store_dead_letters: bool,
    /// Largest payload sent to the functions (their body limit, 64 KiB): a larger one is
    /// dead-lettered without a call.
    pub max_payload_bytes: usize,
    /// Largest MQTT packet accepted from the broker (16 MiB). Keep it above the broker's own
    /// limit: a larger packet breaks the connection, and the broker delivers it again on every
    /// reconnection (logged as an error that says so). The brokers we ship refuse messages over
    /// 256 KiB. Memory: at most this times the 8 events buffered, plus `max_in_flight_bytes`.
    pub max_incoming_packet_bytes: usize,
    /// Messages taken from the broker and not finished yet, at most: past it the connector
    /// stops reading from the broker (TCP backpressure) until lanes finish some.
    pub max_in_flight: usize,
    /// Payload bytes taken from the broker and not finished yet, at most (same effect).
    pub max_in_flight_bytes: usize,
    /// Most messages sent to the functions in one call, as a JSON array (default 64, at most
    /// [`MAX_BATCH`]): a lane takes what is already queued for it, up to this many, and never
    /// waits for more. 1 never batches: every call carries one JSON object, for functions that
    /// take only objects (such as the seed's). 0 is refused ([`ConnectorConfig::check`]).
    pub max_batch: usize,
    /// Most bytes of one call's JSON array, as serialized (default [`DEFAULT_MAX_BATCH_BYTES`],
    /// at most [`MAX_BATCH_BYTES`]): a longer batch is split. A message alone is always sent
    /// as an object, whatever its size (`max_payload_bytes` bounds it).
    pub max_batch_bytes: usize,
    /// Timeout of one HTTP call.
    pub request_timeout: Duration,
    /// First retry delay: waits are drawn from the upper half of a bound doubling from this to
    /// `retry_max` (`entwine_core::retry`, the policy every retry loop of entwine uses).
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long shutdown waits for chains in progress.
    pub drain_timeout: Duration,
    /// Finish the whole backlog on shutdown, because the broker will not keep it (an embedded
    /// broker that stops with the process).
    pub finish_backlog: bool,
    /// In which order finished messages are acknowledged.
    pub ack_order: AckOrder,
}

/// In which order the connector acknowledges the messages it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckOrder {
    /// In the order they arrived, as MQTT 3.1.1 (§4.6) requires: a message is acknowledged once
    /// every earlier one is finished. Works with every broker (rumqttd insists on it), but one
    /// slow message holds the broker's in-flight window for all the others.
    #[default]
    Arrival,
    /// As soon as each is finished. Mosquitto accepts this, and the in-flight window then never
    /// waits for a slow message; no loss either way (a message is acknowledged only when done).
    Completion,
}

impl ConnectorConfig {
    /// A configuration from the seed's flags: `--broker-url host:port`, `--topic`,
    /// `--router-url host[:port]` (a scheme is optional on both), with defaults for the rest.
    pub fn new(broker_url: &str, topics: Vec<String>, router_url: &str) -> anyhow::Result<Self> {
        let broker = entwine_core::broker::BrokerUrl::parse(broker_url)?;
        anyhow::ensure!(!topics.is_empty(), "at least one --topic is needed");
        for topic in &topics {
            anyhow::ensure!(
                !topic.is_empty() && rumqttc::valid_filter(topic),
                "invalid MQTT topic filter {topic:?}"
            );
        }
        let router_url = normalize_router_url(router_url)?;
        Ok(Self {
            broker_host: broker.host,
            broker_port: broker.port,
            broker_tls: broker.tls,
            mqtt: entwine_mqtt::MqttSecurity::none(),
            topics,
            router_url,
            router_token: None,
            client_id: default_client_id(),
            qos: QoS::AtLeastOnce,
            lanes: 8,
            dead_letter_topic: "entwine/deadletter".into(),
            store_dead_letters: true,
            max_payload_bytes: 64 * 1024,
            max_incoming_packet_bytes: 16 * 1024 * 1024,
            max_in_flight: 1024,
            max_in_flight_bytes: 32 * 1024 * 1024,
            max_batch: 64,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            request_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            finish_backlog: false,
            ack_order: AckOrder::Arrival,
        })
    }
}

impl ConnectorConfig {
    /// Checks the settings a caller may have changed after [`ConnectorConfig::new`]: the batch
    /// limits (`max_batch` from 1 to [`MAX_BATCH`], `max_batch_bytes` from 1 to
    /// [`MAX_BATCH_BYTES`]). [`run_with`] refuses to start with settings that fail it.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_batch >= 1,
            "max_batch must be at least 1 (1: one message per call, for functions that take only \
             objects, such as the seed's)"
        );
        anyhow::ensure!(
            self.max_batch <= MAX_BATCH,
            "max_batch is {}, over the functions' limit of {MAX_BATCH} elements per call",
            self.max_batch
        );
        anyhow::ensure!(
            self.max_batch_bytes >= 1,
            "max_batch_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.max_batch_bytes <= MAX_BATCH_BYTES,
            "max_batch_bytes is {}, over the functions' limit of {MAX_BATCH_BYTES} bytes per call",
            self.max_batch_bytes
        );
        Ok(())
    }

    /// Whether the connector is one member of a shared subscription (`$share/<group>/…`).
    pub fn is_shared(&self) -> bool {
        self.topics.iter().any(|t| t.starts_with("$share/"))
    }

    /// Whether shutdown takes and finishes everything the broker holds for this session rather
    /// than leaving it for the next one: for a shared member (its session may never come back)
    /// and when the broker does not outlive the connector (`finish_backlog`, an embedded broker).
    pub fn drains_session(&self) -> bool {
        self.finish_backlog || self.is_shared()
    }
}

fn default_client_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("entwine-connector-{host}")
}

/// Parses `host:port`, `mqtt://host:port`, `tcp://host:port`, `mqtts://host:port` or
/// `[::1]:1883` (port defaults to 1883, 8883 for `mqtts://`) with
/// [`entwine_core::broker::BrokerUrl`]'s rules.
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16)> {
    let url = entwine_core::broker::BrokerUrl::parse(url)?;
    Ok((url.host, url.port))
}

/// `router.fission` → `http://router.fission`; a URL with a scheme is kept (minus a trailing `/`).
pub fn normalize_router_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    anyhow::ensure!(!url.is_empty(), "the router URL is empty");
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    reqwest::Url::parse(&full).with_context(|| format!("invalid router URL {url:?}"))?;
    Ok(full)
}

/// Counters of a running connector.
#[derive(Debug, Default)]
pub struct ConnectorStats {
    /// Messages received from the broker.
    pub received: AtomicU64,
    /// Messages whose four-step chain completed.
    pub completed: AtomicU64,
    /// Messages dead-lettered: stored by the dead-letter handler and announced on the topic.
    pub dead_lettered: AtomicU64,
    /// Times the connector stopped reading from the broker because its in-flight limits were
    /// reached (backpressure).
    pub paused: AtomicU64,
    /// HTTP calls retried.
    pub retries: AtomicU64,
    /// Calls of the first function (`/physicalevents`) for distinct batches, a batch of one (a
    /// single object) included; retries of a call and the one-by-one calls of a batch refused
    /// whole are not counted again.
    pub batches: AtomicU64,
    /// Messages in those calls: `batched_events / batches` is the mean batch size.
    pub batched_events: AtomicU64,
    /// The largest batch sent so far (at most [`ConnectorConfig::max_batch`]).
    pub largest_batch: AtomicU64,
    /// Batches refused whole (functions that take only objects answer 4xx to an array) and
    /// sent again one message at a time.
    pub batch_fallbacks: AtomicU64,
    /// Broker connection errors.
    pub mqtt_errors: AtomicU64,
    /// Subscriptions the broker acknowledged (one per connection).
    pub subscribed: AtomicU64,
    /// Whether the connector is connected and subscribed right now.
    pub connected: AtomicBool,
    /// Why the broker refused the connector, until a connection succeeds: wrong or missing
    /// credentials, a TLS failure, a subscription its ACL does not allow.
    pub refused: std::sync::Mutex<Option<String>>,
}

impl ConnectorStats {
    /// Waits until the broker acknowledged the connector's subscription, `task` (the
    /// connector's) ended, or `timeout` passed; answers whether it is subscribed. Publishers
    /// start after it: a fresh broker keeps nothing for a subscriber that does not exist yet.
    pub async fn wait_subscribed<T>(
        &self,
        task: &tokio::task::JoinHandle<T>,
        timeout: Duration,
    ) -> bool {
        let _ = tokio::time::timeout(timeout, async {
            while self.subscribed.load(Ordering::Relaxed) == 0 && !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        self.subscribed.load(Ordering::Relaxed) > 0
    }

    /// Why the broker refuses the connector now, if it does.
    pub fn refusal(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_refusal(&self, reason: Option<String>) {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// A snapshot as JSON, for a health endpoint.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "refused": self.refusal(),
            "received": self.received.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "dead_lettered": self.dead_lettered.load(Ordering::Relaxed),
            "paused": self.paused.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "batches": self.batches.load(Ordering::Relaxed),
            "batched_events": self.batched_events.load(Ordering::Relaxed),
            "largest_batch": self.largest_batch.load(Ordering::Relaxed),
            "batch_fallbacks": self.batch_fallbacks.load(Ordering::Relaxed),
            "mqtt_errors": self.mqtt_errors.load(Ordering::Relaxed),
        })
    }
}

/// The device id of a telemetry topic: its second level (`device/<id>/telemetry/…`).
pub fn device_id_of(topic: &str) -> Result<DeviceId, String> {
    let id = topic
        .split('/')
        .nth(1)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| format!("topic {topic:?} has no device id (expected device/<id>/…)"))?;
    DeviceId::parse("device_id", id).map_err(|e| format!("topic {topic:?}: {e}"))
}

/// What the event loop hands out and hears back.
struct Dispatcher {
    lanes: Vec<mpsc::UnboundedSender<chain::Delivery>>,
    finished: mpsc::UnboundedSender<u64>,
    acks: acks::Acks,
    client: AsyncClient,
    config: Arc<ConnectorConfig>,
    stats: Arc<ConnectorStats>,
    letters: chain::DeadLetters,
    /// Cancelled when retries must give up (shutdown).
    abandon: CancellationToken,
    /// Messages handed out and not finished, with their payload sizes: what bounds memory.
    in_flight: HashMap<u64, usize>,
    in_flight_bytes: usize,
    /// Whether the event loop stopped reading from the broker, for the log and the count.
    paused: bool,
}

impl Dispatcher {
    /// Whether another message may be taken from the broker. When not, the event loop stops
    /// reading: the broker's socket fills and TCP holds the broker back, so memory stays
    /// bounded whatever the backlog.
    fn has_room(&mut self) -> bool {
        let room = self.in_flight.len() < self.config.max_in_flight.max(1)
            && self.in_flight_bytes < self.config.max_in_flight_bytes.max(1);
        if room == self.paused {
            self.paused = !room;
            if self.paused {
                self.stats.paused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_paused_total").increment(1);
                tracing::debug!(
                    in_flight = self.in_flight.len(),
                    bytes = self.in_flight_bytes,
                    "in-flight limit reached: reading from the broker paused"
                );
            }
        }
        room
    }

    /// Sends a message to its device's lane, or dead-letters it when its topic names no device.
    fn dispatch(&mut self, publish: Publish) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("entwine_connector_received_total").increment(1);
        let seq = self.acks.admit(&publish);
        self.in_flight.insert(seq, publish.payload.len());
        self.in_flight_bytes += publish.payload.len();
        match device_id_of(&publish.topic) {
            Ok(device) => {
                let mut hasher = DefaultHasher::new();
                device.hash(&mut hasher);
                let lane = (hasher.finish() % self.lanes.len() as u64) as usize;
                let delivery = chain::Delivery {
                    publish,
                    seq,
                    received_at: std::time::Instant::now(),
                };
                if self.lanes[lane].send(delivery).is_err() {
                    tracing::error!(
                        "a connector lane has stopped; the message stays unacknowledged"
                    );
                }
            }
            Err(reason) => {
                let letters = self.letters.clone();
                let finished = self.finished.clone();
                let abandon = self.abandon.clone();
                // Off the event loop: storing the letter may take retries.
                tokio::spawn(async move {
                    if letters
                        .send(&publish, "topic", None, &reason, &abandon)
                        .await
                        .is_ok()
                    {
                        let _ = finished.send(seq);
                    }
                });
            }
        }
    }

    fn finish(&mut self, seq: u64) {
        if let Some(bytes) = self.in_flight.remove(&seq) {
            self.in_flight_bytes -= bytes;
        }
        self.acks
            .finish(seq, |publish| self.client.try_ack(publish).is_ok());
    }
}

/// Runs the connector until `shutdown` is cancelled, then drains and disconnects; the functions
/// are called over HTTP at `config.router_url`.
pub async fn run(
    config: ConnectorConfig,
    stats: Arc<ConnectorStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut functions =
        HttpFunctions::new(&config.router_url, config.request_timeout, config.lanes)
            .context("cannot build the HTTP client")?;
    if let Some(token) = &config.router_token {
        functions = functions.with_token(token)?;
    }
    run_with(config, Arc::new(functions), stats, shutdown).await
}

/// Runs the connector until `shutdown` is cancelled, then drains and disconnects, calling
/// `functions` for each step of each chain (`config.router_url` is not used).
pub async fn run_with(
    config: ConnectorConfig,
    functions: Arc<dyn Functions>,
    stats: Arc<ConnectorStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.check()?;
    // The TLS files are read and checked here, once: a missing CA file is an error at start.
    let security = config.mqtt.prepare(config.broker_tls)?;
    let mut mqtt = MqttOptions::new(&config.client_id, &config.broker_host, config.broker_port);
    security.apply(&mut mqtt);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(false);
    mqtt.set_manual_acks(true);
    // Above the broker's limit (the brokers we ship refuse messages over 256 KiB): a larger
    // packet breaks the connection on every redelivery. What arrives over the functions' limit
    // is dead-lettered here. Outgoing: dead letters and acknowledgements, all small.
    mqtt.set_max_packet_size(config.max_incoming_packet_bytes, 256 * 1024);
    let (client, eventloop) = AsyncClient::new(mqtt, 1024);
    // The event loop turns in a task of its own: `EventLoop::poll` is not cancel-safe (a
    // request taken from the client's queue is lost when a poll is dropped halfway through
    // writing it), so it must never lose a `select!` race against a timer or a channel.
    let pump_stop = CancellationToken::new();
    // Bounded: when the event loop stops reading (backpressure), the pump stops polling and
    // the broker's socket fills.
    let (events_tx, mut events) = mpsc::channel(8);
    let pump = tokio::spawn(pump(
        eventloop,
        events_tx,
        pump_stop.clone(),
        config.retry_initial,
        config.retry_max,
        PumpReport {
            user: security.username().map(str::to_owned),
            stats: stats.clone(),
        },
    ));
    let config = Arc::new(config);

    // Retries give up at shutdown, unless the connector empties its session first (see below).
    let abandon = if config.drains_session() {
        CancellationToken::new()
    } else {
        shutdown.clone()
    };
    let lanes = config.lanes.max(1);
    let (finished, mut finished_rx) = mpsc::unbounded_channel::<u64>();
    let mut dispatcher = Dispatcher {
        lanes: Vec::with_capacity(lanes),
        finished: finished.clone(),
        acks: acks::Acks::new(config.ack_order),
        client: client.clone(),
        config: config.clone(),
        stats: stats.clone(),
        letters: chain::DeadLetters {
            client: client.clone(),
            functions: functions.clone(),
            config: config.clone(),
            stats: stats.clone(),
        },
        abandon: abandon.clone(),
        in_flight: HashMap::new(),
        in_flight_bytes: 0,
        paused: false,
    };
    let mut workers = JoinSet::new();
    for _ in 0..lanes {
        // Unbounded channels, bounded by the dispatcher: it takes no more from the broker once
        // `max_in_flight` messages or `max_in_flight_bytes` are unfinished, and the event loop
        // never waits on a lane (it also carries keep-alives and acknowledgements).
        let (tx, rx) = mpsc::unbounded_channel::<chain::Delivery>();
        dispatcher.lanes.push(tx);
        workers.spawn(chain::lane(
            rx,
            finished.clone(),
            client.clone(),
            functions.clone(),
            config.clone(),
            stats.clone(),
            shutdown.clone(),
            abandon.clone(),
        ));
    }
    drop(finished);
    tracing::info!(
        broker = %format!("{}:{}", config.broker_host, config.broker_port),
        topics = ?config.topics,
        functions = %functions.describe(),
        client_id = %config.client_id,
        lanes,
        max_batch = config.max_batch,
        "connector started"
    );

    loop {
        let room = dispatcher.has_room();
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(seq) = finished_rx.recv() => {
                dispatcher.finish(seq);
                continue;
            }
            event = events.recv(), if room => match event {
                Some(event) => event,
                None => anyhow::bail!("the MQTT event loop stopped unexpectedly"),
            },
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                let filters = config
                    .topics
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), config.qos));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => dispatcher.dispatch(publish),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                stats.subscribed.fetch_add(1, Ordering::Relaxed);
                stats.connected.store(true, Ordering::Relaxed);
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    let reason = format!(
                        "the broker refused the subscription to {:?} (not allowed by its ACL for \
                         this user?)",
                        config.topics
                    );
                    tracing::error!("{reason}");
                    stats.set_refusal(Some(reason));
                }
            }
            Ok(_) => {}
            Err(_) => {
                // The pump logs the error and waits before reconnecting.
                dispatcher.acks.reset();
                stats.connected.store(false, Ordering::Relaxed);
                stats.mqtt_errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_mqtt_errors_total").increment(1);
            }
        }
    }

    tracing::info!("connector stopping: finishing chains in progress");
    stats.connected.store(false, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    if config.drains_session() {
        if config.is_shared() {
            // Leave the share group before draining: Mosquitto keeps routing a share of the
            // stream to a disconnected persistent member (the session of a pod that will never
            // come back, on Kubernetes), where it would wait unseen. Without the subscription
            // the other members take it all.
            for topic in &config.topics {
                if let Err(e) = client.try_unsubscribe(topic.clone()) {
                    tracing::warn!(error = %e, %topic, "cannot leave the share group");
                }
            }
        }
        empty_session(&mut events, &mut dispatcher, &mut finished_rx, deadline).await;
        abandon.cancel();
    }
    dispatcher.lanes.clear();
    drain(
        &mut events,
        &mut workers,
        &mut dispatcher,
        &mut finished_rx,
        deadline,
    )
    .await;
    // The DISCONNECT queues behind the last acknowledgements; the pump ends once it is written
    // (bounded, so that a broker that went away cannot hold the shutdown).
    pump_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    let pump_abort = pump.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), async {
        while events.recv().await.is_some() {}
    })
    .await
    .is_err()
    {
        pump_abort.abort();
    }
    tracing::info!(
        received = stats.received.load(Ordering::Relaxed),
        completed = stats.completed.load(Ordering::Relaxed),
        dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
        unacknowledged = dispatcher.acks.outstanding(),
        "connector stopped"
    );
    Ok(())
}

/// What the event loop reports, in order.
type Events = mpsc::Receiver<Result<Event, ConnectionError>>;

/// Turns the MQTT event loop and forwards every event, reconnecting with exponential backoff
/// (`initial` doubling up to `max`) while the broker is away. Ends once the DISCONNECT is
/// written, or when `stop` is cancelled while the broker is away.
/// Where the pump reports the broker refusing the connector.
struct PumpReport {
    user: Option<String>,
    stats: Arc<ConnectorStats>,
}

async fn pump(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Result<Event, ConnectionError>>,
    stop: CancellationToken,
    initial: Duration,
    max: Duration,
    report: PumpReport,
) {
    // The shared policy (`entwine_core::retry`), restarted on every successful connection.
    let mut waits = entwine_core::retry::delays(initial, max);
    let mut backoff = waits.next().unwrap_or(initial);
    loop {
        let event = eventloop.poll().await;
        let wait = match &event {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                report.stats.set_refusal(None);
                waits = entwine_core::retry::delays(initial, max);
                backoff = waits.next().unwrap_or(initial);
                None
            }
            Ok(_) => None,
            Err(rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
            ))) => {
                // The broker will deliver it again after every reconnection: say what to do.
                metrics::counter!("entwine_connector_oversized_total").increment(1);
                tracing::error!(
                    size,
                    retry_in = ?backoff,
                    "the broker delivered a packet of {size} bytes, over the connector's incoming \
                     limit (--max-incoming-bytes): the connection drops and the broker will send \
                     it again; set the broker's message size limit below the connector's \
                     (Mosquitto: message_size_limit) or raise --max-incoming-bytes"
                );
                Some(backoff)
            }
            Err(e) => match entwine_mqtt::refusal(e, report.user.as_deref()) {
                Some(reason) => {
                    // Retried (the password may be fixed or rotated), but said as an error, and
                    // shown by the health endpoint until a connection succeeds.
                    metrics::counter!("entwine_connector_refused_total").increment(1);
                    tracing::error!(error = %e, retry_in = ?backoff, "{reason}");
                    report.stats.set_refusal(Some(reason));
                    Some(backoff)
                }
                None => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "broker connection lost");
                    Some(backoff)
                }
            },
        };
        if events.send(event).await.is_err() {
            return;
        }
        if let Some(wait) = wait {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            backoff = waits.next().unwrap_or(max);
        }
    }
}

/// Takes and processes everything the broker still holds for this session, until nothing is
/// outstanding and nothing arrived for a while, or `deadline` passes.
async fn empty_session(
    events: &mut Events,
    dispatcher: &mut Dispatcher,
    finished: &mut mpsc::UnboundedReceiver<u64>,
    deadline: tokio::time::Instant,
) {
    const QUIET: Duration = Duration::from_millis(500);
    let mut last_arrival = tokio::time::Instant::now();
    loop {
        let room = dispatcher.has_room();
        tokio::select! {
            Some(seq) = finished.recv() => dispatcher.finish(seq),
            Some(event) = events.recv(), if room => match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    last_arrival = tokio::time::Instant::now();
                    dispatcher.dispatch(publish);
                }
                Ok(_) => {}
                Err(_) => dispatcher.acks.reset(),
            },
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                dispatcher.acks.flush(|publish| dispatcher.client.try_ack(publish).is_ok());
                if dispatcher.acks.outstanding() == 0 && last_arrival.elapsed() >= QUIET {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    outstanding = dispatcher.acks.outstanding(),
                    "drain timed out; what is left waits in this session"
                );
                return;
            }
        }
    }
}

/// Keeps the event loop turning (acknowledgements must go out) until every lane has finished
/// its message in progress, or `deadline` passes. Messages arriving meanwhile are left
/// unacknowledged: the broker delivers them again to the next session.
async fn drain(
    events: &mut Events,
    workers: &mut JoinSet<()>,
    dispatcher: &mut Dispatcher,
    finished: &mut mpsc::UnboundedReceiver<u64>,
    deadline: tokio::time::Instant,
) {
    loop {
        tokio::select! {
            joined = workers.join_next() => {
                if joined.is_none() {
                    break;
                }
            }
            Some(seq) = finished.recv() => dispatcher.finish(seq),
            Some(event) = events.recv() => {
                if event.is_err() {
                    dispatcher.acks.reset();
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(lanes = workers.len(), "drain timed out; their messages will be delivered again");
                workers.abort_all();
                break;
            }
        }
    }
    while let Ok(seq) = finished.try_recv() {
        dispatcher.finish(seq);
    }
    // Let the last acknowledgements out before the DISCONNECT that follows them.
    dispatcher
        .acks
        .flush(|publish| dispatcher.client.try_ack(publish).is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_take_the_seeds_form_and_schemes() {
        assert_eq!(
            parse_broker_url("physical-broker:1883").unwrap(),
            ("physical-broker".into(), 1883)
        );
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(parse_broker_url("broker").unwrap(), ("broker".into(), 1883));
        assert!(parse_broker_url("broker:http").is_err());
        assert!(parse_broker_url("http://broker:1883").is_err());
    }

    #[test]
    fn router_urls_get_a_scheme_when_they_lack_one() {
        assert_eq!(
            normalize_router_url("router.fission").unwrap(),
            "http://router.fission"
        );
        assert_eq!(
            normalize_router_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(normalize_router_url("").is_err());
    }

    #[test]
    fn the_device_id_is_the_second_topic_level() {
        assert_eq!(
            device_id_of("device/press-1/telemetry/device_state")
                .unwrap()
                .as_str(),
            "press-1"
        );
        assert!(device_id_of("device").is_err());
        assert!(device_id_of("device//telemetry").is_err());
    }

    #[test]
    fn batch_limits_default_to_64_and_under_the_functions_limits_and_zero_is_refused() {
        let mut config = ConnectorConfig::new("b:1883", vec!["device/+/x".into()], "r").unwrap();
        assert_eq!(config.max_batch, 64);
        assert_eq!(config.max_batch_bytes, 960 * 1024);
        config.check().unwrap();
        config.max_batch = 0;
        assert_eq!(
            config.check().unwrap_err().to_string(),
            "max_batch must be at least 1 (1: one message per call, for functions that take only \
             objects, such as the seed's)"
        );
        config.max_batch = 257;
        assert_eq!(
            config.check().unwrap_err().to_string(),
            "max_batch is 257, over the functions' limit of 256 elements per call"
        );
        config.max_batch = 256;
        config.check().unwrap();
        config.max_batch_bytes = 0;
        assert!(config.check().is_err());
        config.max_batch_bytes = MAX_BATCH_BYTES + 1;
        assert_eq!(
            config.check().unwrap_err().to_string(),
            "max_batch_bytes is 1048577, over the functions' limit of 1048576 bytes per call"
        );
        config.max_batch = 1;
        config.max_batch_bytes = MAX_BATCH_BYTES;
        config.check().unwrap();
    }

    #[test]
    fn bad_topic_filters_are_refused() {
        assert!(ConnectorConfig::new("b:1883", vec!["device/#/x".into()], "r").is_err());
        assert!(ConnectorConfig::new("b:1883", vec![], "r").is_err());
        assert!(ConnectorConfig::new(
            "b:1883",
            vec!["$share/g/device/+/telemetry/device_state".into()],
            "r"
        )
        .is_ok());
    }
}
