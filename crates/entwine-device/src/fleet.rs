//! Running devices: one, as the seed does, or a fleet from one process.
//!
//! Each of the seed's devices is a task with two timers (sensor updates and aggregated
//! messages). `PUT /conf` restarts only the timer whose period changed; the other keeps its
//! phase. A fleet may also hold devices of models ([`ModelGroup`]): each a task with one timer at
//! its model's expected update rate, a sensor update and a message of its model's payload
//! ([`crate::model_sensor`]) to its model's topic each tick; `PUT /conf` leaves them alone. Devices share MQTT
//! connections, a few hundred per connection, so ten thousand devices need tens of sockets, not
//! ten thousand; each connection (see [`crate::link`]) holds a persistent session, counts a
//! message as published once the broker acknowledged it, re-sends what a dropped connection
//! left unacknowledged, and reconnects with jittered backoff from 100 ms to 2 s.
//!
//! A device never waits for its broker: each message due goes into its connection's bounded
//! outbox, or is counted as unsent (by reason, [`Unsent`]) when it cannot, so that
//! `ticks == published + dropped_by_faults + unsent + queued` at any time, and without `queued`
//! once the fleet has stopped.
//!
//! Each message first meets the device's [faults](crate::faults): it may be lost, delayed or
//! stamped by a skewed clock. A delayed message is published by a task of its own, so the
//! device's timers keep their pace; a stopping fleet waits for those tasks (see
//! [`STOP_GRACE_FOR_DELAYED`]) before it disconnects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::conf::{DeviceConf, Schedule};
use crate::error::DeviceError;
use crate::faults::{Decision, FaultPlan, Faults};
pub use crate::link::{Delivery, Unsent};
use crate::link::{Outbox, CHANNEL_CAPACITY};
use crate::model_sensor::ModelSensors;
use crate::sensor::Sensors;
use entwine_core::broker::{BrokerUrl, BrokerUrlError};
use entwine_core::model::Model;

/// How long a stopping fleet still waits for the messages its faults delayed: a message whose
/// delay ends within this time of the stop is published, one due later is counted in
/// [`FleetStats::dropped_by_faults`]. Every preset's delays are far shorter.
pub const STOP_GRACE_FOR_DELAYED: Duration = Duration::from_secs(2);

/// How often, at most, the fleet logs the messages it could not send.
pub const UNSENT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Devices of one [`Model`] in a fleet: `count` of them, named `<prefix><n>` (`n` from 1).
///
/// Each publishes its model's payload ([`ModelSensors`]) to [`Model::topic_of`] its id, at the
/// model's expected update rate (`entwine:odte`'s `expected_update_rate`, one sensor update and
/// one message per period, at least 1 ms). The fleet refuses to start when an id would not be
/// bound to the model by its `entwine:devices` patterns.
#[derive(Debug, Clone)]
pub struct ModelGroup {
    /// The model.
    pub model: Arc<Model>,
    /// Number of devices.
    pub count: usize,
    /// Prefix of their ids (default: [`ModelGroup::default_prefix`]).
    pub prefix: Option<String>,
}

impl ModelGroup {
    /// `count` devices of `model`, with the default prefix.
    pub fn new(model: Arc<Model>, count: usize) -> Self {
        Self {
            model,
            count,
            prefix: None,
        }
    }

    /// The literal part of the model's first device pattern, up to its first wildcard (`*`,
    /// `?`, `[`): `vib-` for `vib-*`; `<model id>-` for a model without patterns.
    pub fn default_prefix(model: &Model) -> String {
        match model.devices().first() {
            Some(pattern) => {
                let raw = pattern.as_str();
                raw[..raw.find(['*', '?', '[']).unwrap_or(raw.len())].to_owned()
            }
            None => format!("{}-", model.id),
        }
    }

    /// The prefix of the ids: the one given, or [`ModelGroup::default_prefix`].
    pub fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| Self::default_prefix(&self.model))
    }

    /// The ids of the group's devices, `<prefix>1` … `<prefix><count>`.
    pub fn device_ids(&self) -> Vec<String> {
        let prefix = self.prefix();
        (1..=self.count).map(|n| format!("{prefix}{n}")).collect()
    }

    /// The period of a device's updates and messages: one over the model's expected update
    /// rate, at least 1 ms.
    pub fn period(&self) -> Duration {
        period_of(&self.model)
    }
}

/// One over `model`'s expected update rate, at least 1 ms.
fn period_of(model: &Model) -> Duration {
    let rate = model.profile.expected_update_rate();
    let period = if rate.is_finite() && rate > 0.0 {
        Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)
    } else {
        Duration::from_secs(1)
    };
    period.max(Duration::from_millis(1))
}

/// How many devices, and how they publish.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Number of the seed's devices (temperature and energy, `device_conf.yaml`'s schedule).
    /// One device uses the configuration's `deviceId`; more are named `<prefix>-1` …
    /// `<prefix>-N`; none is allowed when `models` has devices.
    pub count: usize,
    /// Prefix of the seed's fleet device ids (default: the configuration's `deviceId`).
    pub prefix: Option<String>,
    /// QoS of telemetry: 0 as the seed, 1 for no loss between device and broker.
    pub qos: QoS,
    /// Devices per MQTT connection.
    pub devices_per_connection: usize,
    /// Seed of the sensors' random walks (device `i` of the fleet, seed devices first, uses
    /// `seed + i`).
    pub seed: u64,
    /// Devices of models, after the seed's (none by default). They share the connections,
    /// QoS, credentials and faults of the seed's devices; `PUT /conf` changes only the seed
    /// devices' schedule.
    pub models: Vec<ModelGroup>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            count: 1,
            prefix: None,
            qos: QoS::AtMostOnce,
            devices_per_connection: 500,
            seed: rand::random(),
            models: Vec::new(),
        }
    }
}

impl FleetOptions {
    /// The ids of the seed's devices.
    pub fn seed_device_ids(&self, conf: &DeviceConf) -> Vec<String> {
        if self.count == 1 {
            return vec![conf.device_id.clone()];
        }
        let prefix = self.prefix.as_deref().unwrap_or(&conf.device_id);
        (1..=self.count).map(|i| format!("{prefix}-{i}")).collect()
    }

    /// Every device id: the seed's devices first, then each model group's, in order.
    pub fn device_ids(&self, conf: &DeviceConf) -> Vec<String> {
        let mut ids = self.seed_device_ids(conf);
        for group in &self.models {
            ids.extend(group.device_ids());
        }
        ids
    }

    /// Every device with its model (`None`: a seed device), checked: every model device is
    /// bound to its model by the model's patterns, no seed device is bound to one of the
    /// fleet's models, and no id is used twice.
    pub fn devices(&self, conf: &DeviceConf) -> Result<Vec<FleetDevice>, DeviceError> {
        let mut devices: Vec<FleetDevice> = self
            .seed_device_ids(conf)
            .into_iter()
            .map(|id| FleetDevice { id, model: None })
            .collect();
        for group in &self.models {
            let model = &group.model;
            let patterns: Vec<&str> = model.devices().iter().map(|p| p.as_str()).collect();
            for seed in devices.iter().filter(|d| d.model.is_none()) {
                if model.devices().iter().any(|p| p.matches(&seed.id)) {
                    return Err(DeviceError::Model {
                        model: model.id.clone(),
                        reason: format!(
                            "seed device {:?} would be bound to this model by its patterns {patterns:?}, but sends the seed's payload; choose another seed prefix",
                            seed.id
                        ),
                    });
                }
            }
            for id in group.device_ids() {
                if !model.devices().iter().any(|p| p.matches(&id)) {
                    return Err(DeviceError::Model {
                        model: model.id.clone(),
                        reason: format!(
                            "device {id:?} (prefix {:?}) is not bound to this model by its patterns {patterns:?}; choose a prefix they match",
                            group.prefix()
                        ),
                    });
                }
                devices.push(FleetDevice {
                    id,
                    model: Some(model.clone()),
                });
            }
        }
        let mut seen = std::collections::HashSet::new();
        for device in &devices {
            if !seen.insert(device.id.as_str()) {
                let model = match &device.model {
                    Some(m) => m.id.clone(),
                    None => "(seed)".to_owned(),
                };
                return Err(DeviceError::Model {
                    model,
                    reason: format!(
                        "device {:?} is also another device of the fleet; give the groups distinct prefixes",
                        device.id
                    ),
                });
            }
        }
        Ok(devices)
    }

    /// The MQTT client id of connection `index` (see [`Delivery::client_id`]).
    pub fn client_id(&self, conf: &DeviceConf, delivery: &Delivery, index: usize) -> String {
        let alone = self.count == 1 && self.models.iter().all(|g| g.count == 0);
        match (&delivery.client_id, alone) {
            (Some(id), true) => id.clone(),
            (Some(id), false) => format!("{id}-{index}"),
            (None, true) => conf.device_id.clone(),
            (None, false) => format!(
                "{}-fleet-{index}",
                self.prefix.as_deref().unwrap_or(&conf.device_id)
            ),
        }
    }
}

/// A device of a fleet: its id, and its model (`None`: the seed's device).
#[derive(Debug, Clone)]
pub struct FleetDevice {
    /// The device id.
    pub id: String,
    /// Its model; `None` for a seed device.
    pub model: Option<Arc<Model>>,
}

/// Counters of a running fleet.
///
/// `ticks == published + dropped_by_faults + unsent_total() + queued` (+ the messages a fault
/// is delaying) while it runs; once it stopped `queued` is 0 and no message is being delayed.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Messages due from the devices' timers: one per aggregated tick, one per sensor on each
    /// update tick with single-resource telemetry, one per tick of a model device; ticks the
    /// timers skipped included.
    pub ticks: AtomicU64,
    /// Messages the broker has: acknowledged (PUBACK) at QoS 1, written to the socket at QoS 0.
    /// A message delayed by a fault is counted once its delay is over and it got there.
    pub published: AtomicU64,
    /// Aggregated state messages among them (a model device's messages included: each is its
    /// aggregated state).
    pub aggregated: AtomicU64,
    /// Messages due that were not published, by reason, in the order of [`Unsent::ALL`].
    pub unsent: [AtomicU64; 4],
    /// Messages the connections hold now: waiting for the broker, or sent and not yet
    /// acknowledged.
    pub queued: AtomicU64,
    /// Those among them handed to the MQTT client (at most [`crate::link::WINDOW`] per
    /// connection).
    pub in_flight: AtomicU64,
    /// Sending again of messages the broker had not acknowledged when a connection dropped.
    pub resent: AtomicU64,
    /// Reconnections on which the broker no longer had the connection's session (restarted
    /// without its saved state): rumqttc then drops what it would re-send, and the outbox sends
    /// it again itself.
    pub sessions_lost: AtomicU64,
    /// Messages not published because of fault injection: drawn as lost (`loss`), or delayed
    /// past [`STOP_GRACE_FOR_DELAYED`] when the fleet stopped.
    pub dropped_by_faults: AtomicU64,
    /// Messages given a delay by fault injection (counted when delayed; they are counted in
    /// `published` once the broker has them).
    pub delayed_by_faults: AtomicU64,
    /// Messages received on control topics.
    pub control_messages: AtomicU64,
    /// Successful (re)connections to the broker.
    pub connections: AtomicU64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: AtomicU64,
    /// Connection attempts the broker (or the TLS handshake) refused: wrong or missing
    /// credentials, a certificate it does not trust. Also counted in `connection_errors`.
    pub refused: AtomicU64,
    unsent_log: Mutex<UnsentLog>,
}

/// Unsent messages not logged yet, and when they last were.
#[derive(Debug, Default)]
struct UnsentLog {
    last: Option<std::time::Instant>,
    pending: [u64; 4],
}

impl FleetStats {
    /// Messages not published for `reason`.
    pub fn unsent_for(&self, reason: Unsent) -> u64 {
        self.unsent[reason.index()].load(Ordering::Relaxed)
    }

    /// Messages not published, all reasons.
    pub fn unsent_total(&self) -> u64 {
        Unsent::ALL.iter().map(|r| self.unsent_for(*r)).sum()
    }

    /// Counts `n` messages as unsent for `reason` (counter, metric and a log line at most every
    /// [`UNSENT_LOG_INTERVAL`]).
    pub(crate) fn count_unsent(&self, reason: Unsent, n: u64) {
        if n == 0 {
            return;
        }
        self.unsent[reason.index()].fetch_add(n, Ordering::Relaxed);
        metrics::counter!("entwine_device_unsent_total", "reason" => reason.as_str()).increment(n);
        let mut log = self.unsent_log.lock().unwrap_or_else(|e| e.into_inner());
        log.pending[reason.index()] += n;
        let due = log
            .last
            .is_none_or(|last| last.elapsed() >= UNSENT_LOG_INTERVAL);
        if due {
            let pending = std::mem::take(&mut log.pending);
            log.last = Some(std::time::Instant::now());
            drop(log);
            tracing::warn!(
                buffer_full = pending[Unsent::BufferFull.index()],
                connection_lost = pending[Unsent::ConnectionLost.index()],
                timer_late = pending[Unsent::TimerLate.index()],
                stopped = pending[Unsent::Stopped.index()],
                total = self.unsent_total(),
                "messages not sent since the last report (GET /stats: unsent)"
            );
        }
    }

    /// A snapshot as JSON, for `GET /stats`.
    pub fn to_json(&self) -> serde_json::Value {
        let unsent: serde_json::Map<String, serde_json::Value> = Unsent::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), self.unsent_for(*r).into()))
            .collect();
        serde_json::json!({
            "ticks": self.ticks.load(Ordering::Relaxed),
            "published": self.published.load(Ordering::Relaxed),
            "aggregated": self.aggregated.load(Ordering::Relaxed),
            "unsent": unsent,
            "queued": self.queued.load(Ordering::Relaxed),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "resent": self.resent.load(Ordering::Relaxed),
            "sessions_lost": self.sessions_lost.load(Ordering::Relaxed),
            "dropped_by_faults": self.dropped_by_faults.load(Ordering::Relaxed),
            "delayed_by_faults": self.delayed_by_faults.load(Ordering::Relaxed),
            "control_messages": self.control_messages.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "connection_errors": self.connection_errors.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
        })
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Over TLS (`mqtts://`; also when `mqtt.ca_file` is set).
    pub tls: bool,
}

impl Broker {
    /// Reads a broker address with [`BrokerUrl`]'s rules (`host[:port]`, `mqtt://`, `tcp://`,
    /// `mqtts://`, `[::1]:1883`; port 1883 when none is written, 8883 after `mqtts://`).
    pub fn parse(url: &str) -> Result<Self, BrokerUrlError> {
        BrokerUrl::parse(url)?.try_into()
    }
}

impl TryFrom<BrokerUrl> for Broker {
    type Error = BrokerUrlError;

    /// The address.
    fn try_from(url: BrokerUrl) -> Result<Self, Self::Error> {
        Ok(Self {
            host: url.host,
            port: url.port,
            tls: url.tls,
        })
    }
}

/// `host:port`, an IPv6 host in brackets, after `mqtts://` over TLS: what [`Broker::parse`]
/// reads back.
impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tls {
            f.write_str("mqtts://")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The topic of a device's aggregated state.
pub fn state_topic(device_id: &str) -> String {
    format!("device/{device_id}/telemetry/device_state")
}

/// The topic a device listens to for control messages.
pub fn control_topic(device_id: &str) -> String {
    format!("device/{device_id}/control")
}

/// Runs the devices until `shutdown` is cancelled; `conf` carries the configuration, whose
/// schedule changes restart the timers whose period changed; `faults` carries the fault plan,
/// which each device reads again for its next message when it changed.
pub async fn run(
    conf: watch::Receiver<DeviceConf>,
    faults: watch::Receiver<FaultPlan>,
    options: FleetOptions,
    delivery: Delivery,
    broker: Broker,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
) -> Result<(), DeviceError> {
    let base = conf.borrow().clone();
    let fleet = options.devices(&base)?;
    if fleet.is_empty() {
        return Err(DeviceError::NoDevices);
    }
    let ids: Vec<String> = fleet.iter().map(|d| d.id.clone()).collect();
    for id in &ids {
        entwine_core::state::DeviceId::parse("device id", id).map_err(DeviceError::DeviceId)?;
    }
    // Read and checked before anything starts: a TLS file that is missing, a device without a
    // password.
    let security = delivery.mqtt.prepare(broker.tls)?;
    let mut logins = Vec::with_capacity(ids.len());
    if let Some(credentials) = &delivery.device_credentials {
        for id in &ids {
            logins.push(security.with_credentials(credentials.of(id)?));
        }
    }
    // A device logged in as itself has a connection of its own.
    let per_connection = if logins.is_empty() {
        options.devices_per_connection.max(1)
    } else {
        1
    };
    let count = ids.len();
    // Each device's place in the spread of its own kind: the seed's devices over the seed's
    // schedule, each model group's over its period.
    let mut places = Vec::with_capacity(count);
    let seeds = fleet.iter().filter(|d| d.model.is_none()).count();
    places.extend((0..seeds).map(|i| i as f64 / seeds as f64));
    for group in &options.models {
        places.extend((0..group.count).map(|i| i as f64 / group.count as f64));
    }
    let connections_stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut devices = JoinSet::new();
    // Every device and every delayed message holds a sender; none is ever sent on: the
    // receiver learns that all are gone when `recv` answers `None`.
    let (in_flight, mut all_delivered) = mpsc::channel::<()>(1);
    for (group, chunk) in ids.chunks(per_connection).enumerate() {
        let client_id = options.client_id(&base, &delivery, group);
        let login = logins.get(group).unwrap_or(&security);
        let user = login.username().map(str::to_owned);
        let mqtt = crate::link::options(client_id, &broker.host, broker.port, login);
        let (client, eventloop) = AsyncClient::new(mqtt, CHANNEL_CAPACITY);
        let outbox = Arc::new(Outbox::new(
            client,
            options.qos,
            delivery.buffer_bytes,
            stats.clone(),
        ));
        let controls: Vec<String> = chunk.iter().map(|id| control_topic(id)).collect();
        connections.spawn(crate::link::drive(
            outbox.clone(),
            eventloop,
            controls,
            user,
            connections_stop.clone(),
        ));
        for (offset, id) in chunk.iter().enumerate() {
            let index = group * per_connection + offset;
            let seed = options.seed.wrapping_add(index as u64);
            let publisher = Publisher {
                outbox: outbox.clone(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                _in_flight: in_flight.clone(),
            };
            let device_faults = DeviceFaults::new(faults.clone(), id, seed);
            match &fleet[index].model {
                None => devices.spawn(device(
                    id.clone(),
                    places[index],
                    conf.clone(),
                    publisher,
                    device_faults,
                    seed,
                )),
                Some(model) => devices.spawn(model_device(
                    id.clone(),
                    places[index],
                    base.schedule().initial_delay(),
                    ModelSensors::new(model.clone(), seed),
                    publisher,
                    device_faults,
                )),
            };
        }
    }
    drop(in_flight);
    tracing::info!(
        devices = count,
        seed_devices = seeds,
        model_devices = count - seeds,
        connections = connections.len(),
        %broker,
        "devices started"
    );
    while let Some(ended) = devices.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "a device task failed");
        }
    }
    // Messages that faults delayed go out before the connections stop.
    let _ = all_delivered.recv().await;
    connections_stop.cancel();
    while let Some(result) = connections.join_next().await {
        result.map_err(|source| DeviceError::Panicked {
            task: "a connection task",
            source,
        })?;
    }
    tracing::info!(
        ticks = stats.ticks.load(Ordering::Relaxed),
        published = stats.published.load(Ordering::Relaxed),
        unsent = stats.unsent_total(),
        dropped_by_faults = stats.dropped_by_faults.load(Ordering::Relaxed),
        "devices stopped"
    );
    Ok(())
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// How a device's messages reach its connection's outbox: now, or later when a fault delays
/// them.
#[derive(Clone)]
struct Publisher {
    outbox: Arc<Outbox>,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
    /// Keeps [`run`] waiting until this device and its delayed messages are done.
    _in_flight: mpsc::Sender<()>,
}

impl Publisher {
    /// Queues the message now, or from a task of its own after `delay`. Never waits.
    fn send(&self, topic: String, payload: Vec<u8>, aggregated: bool, delay: Duration) {
        if delay.is_zero() {
            self.outbox.offer(topic, payload, aggregated);
        } else {
            self.later(topic, payload, aggregated, delay);
        }
    }

    /// Queues after `delay` from a task of its own, so the device's timers keep their pace.
    /// When the fleet stops meanwhile, the message still goes out when its delay ends within
    /// [`STOP_GRACE_FOR_DELAYED`], and is counted in `dropped_by_faults` otherwise.
    fn later(&self, topic: String, payload: Vec<u8>, aggregated: bool, delay: Duration) {
        self.stats.delayed_by_faults.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            let due = Instant::now() + delay;
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(due) => {}
                () = this.shutdown.cancelled() => {
                    if due > Instant::now() + STOP_GRACE_FOR_DELAYED {
                        this.stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep_until(due).await;
                }
            }
            this.outbox.offer(topic, payload, aggregated);
            // Whole, not field by field: `_in_flight` must live until the message is queued.
            drop(this);
        });
    }
}

/// A device's view of the fault plan, and its own random source for the decisions.
struct DeviceFaults {
    plan: watch::Receiver<FaultPlan>,
    current: Faults,
    rng: SmallRng,
}

impl DeviceFaults {
    /// The faults of device `id`. The decisions draw from a generator of their own, so the
    /// sensors' random walks are the same with and without faults.
    fn new(mut plan: watch::Receiver<FaultPlan>, id: &str, seed: u64) -> Self {
        let current = plan.borrow_and_update().for_device(id);
        Self {
            plan,
            current,
            rng: SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The device's faults now. The plan is read again only when it changed, so a message
    /// costs one atomic load while it does not.
    fn current(&mut self, id: &str) -> Faults {
        if self.plan.has_changed().unwrap_or(false) {
            self.current = self.plan.borrow_and_update().for_device(id);
        }
        self.current
    }

    /// The fate of one message under `faults`: nothing is drawn when there are none.
    fn decide(&mut self, faults: &Faults) -> Decision {
        if faults.is_none() {
            Decision::default()
        } else {
            faults.decide(&mut self.rng)
        }
    }
}

/// A device's two timers. A timer is replaced only when its own period changes, so a schedule
/// change (or `PUT /conf {}`) leaves the phase of the other alone.
struct Timers {
    schedule: Schedule,
    updates: Tick,
    messages: Tick,
    /// This device's place in the fleet's spread, in [0, 1).
    place: f64,
}

/// One timer and the instant of its last tick, to count the ticks it skipped.
struct Tick {
    interval: Interval,
    period: Duration,
    last: Option<Instant>,
}

impl Tick {
    fn new(schedule: &Schedule, place: f64, period: Duration) -> Self {
        // Spread the fleet over one message period so it does not publish in bursts.
        let spread = schedule
            .aggregated_period()
            .min(schedule.update_period())
            .mul_f64(place);
        Self::starting(Instant::now() + schedule.initial_delay() + spread, period)
    }

    /// A timer of `period` whose first tick is at `start`.
    fn starting(start: Instant, period: Duration) -> Self {
        let mut interval = interval_at(start, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self {
            interval,
            period,
            last: None,
        }
    }

    /// The ticks skipped before the one just taken at `at` (the task ran late by more than a
    /// period).
    fn skipped(&mut self, at: Instant) -> u64 {
        let skipped = match self.last {
            Some(last) if at > last => {
                let periods = (at - last).as_secs_f64() / self.period.as_secs_f64();
                (periods.round() as u64).saturating_sub(1)
            }
            _ => 0,
        };
        self.last = Some(at);
        skipped
    }
}

impl Timers {
    fn new(schedule: Schedule, place: f64) -> Self {
        Self {
            updates: Tick::new(&schedule, place, schedule.update_period()),
            messages: Tick::new(&schedule, place, schedule.aggregated_period()),
            schedule,
            place,
        }
    }

    /// Applies a new schedule: restarts (after the initial delay and the device's spread) only
    /// the timers whose period changed. A new initial delay alone restarts nothing.
    fn apply(&mut self, id: &str, next: Schedule) {
        let update_changed = next.update_period_ms != self.schedule.update_period_ms;
        let messages_changed =
            next.aggregated_telemetry_msg_sec != self.schedule.aggregated_telemetry_msg_sec;
        if update_changed {
            self.updates = Tick::new(&next, self.place, next.update_period());
        }
        if messages_changed {
            self.messages = Tick::new(&next, self.place, next.aggregated_period());
        }
        if update_changed || messages_changed {
            tracing::debug!(
                device_id = %id,
                update_changed,
                messages_changed,
                "schedule changed, timers restart"
            );
        }
        self.schedule = next;
    }
}

/// One device: its timers, its sensors, its messages.
async fn device(
    id: String,
    place: f64,
    mut conf: watch::Receiver<DeviceConf>,
    publisher: Publisher,
    mut faults: DeviceFaults,
    seed: u64,
) {
    // Only the schedule changes at run time (`DeviceConf::patched_schedule`).
    let fixed = conf.borrow_and_update().clone();
    let mut sensors = Sensors::new(&fixed, seed);
    let resources = sensors.sensors().len() as u64;
    let state_topic = state_topic(&id);
    let shutdown = publisher.shutdown.clone();
    let stats = publisher.stats.clone();
    let mut timers = Timers::new(fixed.schedule(), place);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            changed = conf.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = conf.borrow_and_update().schedule();
                timers.apply(&id, next);
            }
            at = timers.updates.interval.tick() => {
                let skipped = timers.updates.skipped(at);
                sensors.update();
                if fixed.single_resource_telemetry_enabled {
                    let late = skipped * resources;
                    stats.ticks.fetch_add(late, Ordering::Relaxed);
                    stats.count_unsent(Unsent::TimerLate, late);
                    let in_force = faults.current(&id);
                    let timestamp = now_ms().saturating_add(in_force.clock_skew_ms);
                    for (key, payload) in sensors.single_payloads(timestamp) {
                        stats.ticks.fetch_add(1, Ordering::Relaxed);
                        let fate = faults.decide(&in_force);
                        if fate.drop {
                            stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let topic = format!("device/{id}/telemetry/{key}");
                        publisher.send(topic, payload, false, fate.delay);
                    }
                }
            }
            at = timers.messages.interval.tick(), if fixed.aggregated_telemetry => {
                let skipped = timers.messages.skipped(at);
                stats.ticks.fetch_add(skipped + 1, Ordering::Relaxed);
                stats.count_unsent(Unsent::TimerLate, skipped);
                let in_force = faults.current(&id);
                let fate = faults.decide(&in_force);
                if fate.drop {
                    stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let payload = sensors.aggregated_payload(
                    now_ms().saturating_add(fate.skew_ms),
                    fixed.target_aggregated_telemetry_payload_size_byte,
                );
                publisher.send(state_topic.clone(), payload, true, fate.delay);
            }
        }
    }
}

/// One device of a model: one timer at the model's expected update rate, each tick one sensor
/// update and one message of its payload to the model's topic. It starts after the
/// configuration's initial delay and its place in its group's spread over one period;
/// `PUT /conf` does not change it.
async fn model_device(
    id: String,
    place: f64,
    initial_delay: Duration,
    mut sensors: ModelSensors,
    publisher: Publisher,
    mut faults: DeviceFaults,
) {
    let topic = sensors.model().topic_of(&id);
    let period = period_of(sensors.model());
    let shutdown = publisher.shutdown.clone();
    let stats = publisher.stats.clone();
    let mut tick = Tick::starting(
        Instant::now() + initial_delay + period.mul_f64(place),
        period,
    );
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            at = tick.interval.tick() => {
                let skipped = tick.skipped(at);
                stats.ticks.fetch_add(skipped + 1, Ordering::Relaxed);
                stats.count_unsent(Unsent::TimerLate, skipped);
                sensors.update();
                let in_force = faults.current(&id);
                let fate = faults.decide(&in_force);
                if fate.drop {
                    stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let payload = sensors.payload_bytes(now_ms().saturating_add(fate.skew_ms));
                publisher.send(topic.clone(), payload, true, fate.delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(update_period_ms: u64, msg_per_sec: f64) -> Schedule {
        Schedule {
            update_period_ms,
            update_initial_delay_ms: 1000,
            aggregated_telemetry_msg_sec: msg_per_sec,
        }
    }

    /// Milliseconds since `origin` of the next tick of `tick`.
    async fn next(tick: &mut Tick, origin: Instant) -> u128 {
        let at = tick.interval.tick().await;
        (at - origin).as_millis()
    }

    #[tokio::test(start_paused = true)]
    async fn a_schedule_change_restarts_only_the_timer_whose_period_changed() {
        let origin = Instant::now();
        // Device 1 of 4: a quarter of the shorter period (200 ms) after the 1 s delay.
        let mut timers = Timers::new(schedule(300, 5.0), 0.25);
        assert_eq!(next(&mut timers.updates, origin).await, 1050);
        assert_eq!(next(&mut timers.messages, origin).await, 1050);
        assert_eq!(next(&mut timers.updates, origin).await, 1350);
        assert_eq!(next(&mut timers.messages, origin).await, 1250);
        // The same schedule again (PUT /conf {} or GET /conf sent back): nothing moves.
        timers.apply("d", schedule(300, 5.0));
        // A new initial delay alone restarts nothing either.
        timers.apply(
            "d",
            Schedule {
                update_initial_delay_ms: 0,
                ..schedule(300, 5.0)
            },
        );
        assert_eq!(next(&mut timers.messages, origin).await, 1450);
        assert_eq!(next(&mut timers.updates, origin).await, 1650);
        // Only the message rate changes, at 1650 ms: the update timer keeps its grid, the
        // message timer restarts after the initial delay (1 s) and its place in the fleet
        // (a quarter of the new shorter period, 100 ms: 25 ms), then every 100 ms.
        timers.apply("d", schedule(300, 10.0));
        assert_eq!(next(&mut timers.updates, origin).await, 1950);
        assert_eq!(next(&mut timers.updates, origin).await, 2250);
        assert_eq!(next(&mut timers.updates, origin).await, 2550);
        assert_eq!(next(&mut timers.messages, origin).await, 2675);
        assert_eq!(next(&mut timers.messages, origin).await, 2775);
        assert_eq!(next(&mut timers.updates, origin).await, 2850);
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_a_late_task_skipped_are_counted() {
        let origin = Instant::now();
        let mut tick = Tick::new(&schedule(100, 10.0), 0.0, Duration::from_millis(100));
        let first = tick.interval.tick().await;
        assert_eq!((first - origin).as_millis(), 1000);
        assert_eq!(tick.skipped(first), 0);
        let second = tick.interval.tick().await;
        assert_eq!(tick.skipped(second), 0);
        // The task is held up for 350 ms, until 1450 ms: the tick due at 1200 fires at once
        // (`tick` answers its scheduled instant), those due at 1300 and 1400 are skipped, and
        // the next comes at 1500, which is where they are counted.
        tokio::time::advance(Duration::from_millis(350)).await;
        let late = tick.interval.tick().await;
        assert_eq!((late - origin).as_millis(), 1200);
        assert_eq!(tick.skipped(late), 0);
        let next = tick.interval.tick().await;
        assert_eq!((next - origin).as_millis(), 1500);
        assert_eq!(tick.skipped(next), 2);
    }

    fn model(patterns: serde_json::Value, rate: f64) -> Arc<Model> {
        let doc = serde_json::json!({
            "@context": ["https://www.w3.org/2022/wot/td/v1.1"],
            "@type": "tm:ThingModel",
            "title": "Vibration",
            "version": {"model": "1.0.0"},
            "entwine:id": "vibration",
            "entwine:devices": patterns,
            "entwine:odte": {"expected_update_rate": rate, "time_window": 5},
            "properties": {"rms": {"type": "number"}}
        });
        Arc::new(Model::parse("v.json", &doc.to_string()).unwrap())
    }

    #[test]
    fn a_groups_default_prefix_is_its_first_patterns_literal_start() {
        let cases = [
            (serde_json::json!(["vib-*"]), "vib-"),
            (serde_json::json!(["hall7-vib-?", "vib-*"]), "hall7-vib-"),
            (serde_json::json!(["v[0-9]-*"]), "v"),
            (serde_json::json!(["exact"]), "exact"),
        ];
        for (patterns, prefix) in cases {
            let group = ModelGroup::new(model(patterns, 10.0), 2);
            assert_eq!(group.prefix(), prefix);
            assert_eq!(
                group.device_ids(),
                [format!("{prefix}1"), format!("{prefix}2")]
            );
        }
    }

    #[test]
    fn a_groups_period_is_one_over_its_models_rate_and_at_least_a_millisecond() {
        let period = |rate| ModelGroup::new(model(serde_json::json!(["v-*"]), rate), 1).period();
        assert_eq!(period(10.0), Duration::from_millis(100));
        assert_eq!(period(0.5), Duration::from_secs(2));
        assert_eq!(period(4000.0), Duration::from_millis(1));
    }

    #[test]
    fn a_mixed_fleet_lists_the_seed_devices_first_and_checks_every_id() {
        let conf = DeviceConf::default();
        let vib = model(serde_json::json!(["vib-*"]), 10.0);
        let mut options = FleetOptions {
            count: 2,
            prefix: Some("seed".into()),
            models: vec![
                ModelGroup::new(vib.clone(), 2),
                ModelGroup {
                    prefix: Some("vib-b".into()),
                    ..ModelGroup::new(vib.clone(), 1)
                },
            ],
            ..FleetOptions::default()
        };
        let ids = options.device_ids(&conf);
        assert_eq!(ids, ["seed-1", "seed-2", "vib-1", "vib-2", "vib-b1"]);
        let devices = options.devices(&conf).unwrap();
        assert_eq!(
            devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            ids
        );
        assert!(devices[..2].iter().all(|d| d.model.is_none()));
        assert!(devices[2..].iter().all(|d| d.model.is_some()));
        // A mixed fleet names its connections as a fleet, even with one seed device.
        options.count = 1;
        let delivery = Delivery::default();
        assert_eq!(
            options.client_id(&conf, &delivery, 1),
            format!("{}-fleet-1", "seed")
        );
        assert_eq!(
            FleetOptions::default().client_id(&conf, &delivery, 0),
            conf.device_id
        );

        // Two groups sharing ids.
        options.models[1].prefix = None;
        let err = options.devices(&conf).unwrap_err();
        assert!(err.to_string().contains("\"vib-1\" is also"), "{err}");
        // An id the patterns do not bind.
        options.models[1].prefix = Some("pump-".into());
        let err = options.devices(&conf).unwrap_err();
        assert!(
            matches!(&err, DeviceError::Model { model, reason } if model == "vibration" && reason.contains("\"pump-1\"")),
            "{err}"
        );
    }

    #[test]
    fn a_broker_is_parsed_with_the_one_parser_and_displayed_back() {
        let broker = Broker::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!(
            broker,
            Broker {
                host: "::1".into(),
                port: 1884,
                tls: false,
            }
        );
        assert_eq!(broker.to_string(), "[::1]:1884");
        assert_eq!(Broker::parse(&broker.to_string()), Ok(broker));
        assert_eq!(Broker::parse("broker").unwrap().to_string(), "broker:1883");
        let tls = Broker::parse("mqtts://broker").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.to_string(), "mqtts://broker:8883");
        assert_eq!(Broker::parse(&tls.to_string()), Ok(tls));
        assert!(matches!(
            Broker::parse("broker:http"),
            Err(BrokerUrlError::Port { .. })
        ));
    }
}
