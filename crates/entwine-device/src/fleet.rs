//! Running devices: one, as the seed does, or a fleet from one process.
//!
//! Each device is a task with two timers (sensor updates and aggregated messages) that restart
//! when `PUT /conf` changes the schedule. Devices share MQTT connections, a few hundred per
//! connection, so ten thousand devices need tens of sockets, not ten thousand; each connection
//! subscribes to its devices' control topics and reconnects with exponential backoff when the
//! broker goes away.
//!
//! Each message first meets the device's [faults](crate::faults): it may be lost, delayed or
//! stamped by a skewed clock. A delayed message is published by a task of its own, so the
//! device's timers keep their pace; a stopping fleet waits for those tasks (see
//! [`STOP_GRACE_FOR_DELAYED`]) before it disconnects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::conf::DeviceConf;
use crate::faults::{Decision, FaultPlan, Faults};
use crate::sensor::Sensors;

/// How long a stopping fleet still waits for the messages its faults delayed: a message whose
/// delay ends within this time of the stop is published, one due later is counted in
/// [`FleetStats::dropped_by_faults`]. Every preset's delays are far shorter.
pub const STOP_GRACE_FOR_DELAYED: Duration = Duration::from_secs(2);

/// How many devices, and how they publish.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Number of devices. One device uses the configuration's `deviceId`; more are named
    /// `<prefix>-1` … `<prefix>-N`.
    pub count: usize,
    /// Prefix of fleet device ids (default: the configuration's `deviceId`).
    pub prefix: Option<String>,
    /// QoS of telemetry: 0 as the seed, 1 for no loss between device and broker.
    pub qos: QoS,
    /// Devices per MQTT connection.
    pub devices_per_connection: usize,
    /// Seed of the sensors' random walks (device `i` uses `seed + i`).
    pub seed: u64,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            count: 1,
            prefix: None,
            qos: QoS::AtMostOnce,
            devices_per_connection: 500,
            seed: rand::random(),
        }
    }
}

impl FleetOptions {
    /// The device ids.
    pub fn device_ids(&self, conf: &DeviceConf) -> Vec<String> {
        if self.count == 1 {
            return vec![conf.device_id.clone()];
        }
        let prefix = self.prefix.as_deref().unwrap_or(&conf.device_id);
        (1..=self.count).map(|i| format!("{prefix}-{i}")).collect()
    }
}

/// Counters of a running fleet.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Messages handed to the MQTT client (aggregated and single-resource). A message delayed by
    /// a fault is counted when its delay is over and it is handed over; a lost one never.
    pub published: AtomicU64,
    /// Aggregated state messages among them.
    pub aggregated: AtomicU64,
    /// Messages the client refused (its connection task ended), or that a stopping fleet could
    /// not queue any more.
    pub publish_failures: AtomicU64,
    /// Messages not published because of fault injection: drawn as lost (`loss`), or delayed
    /// past [`STOP_GRACE_FOR_DELAYED`] when the fleet stopped.
    pub dropped_by_faults: AtomicU64,
    /// Messages given a delay by fault injection (counted when delayed; they are counted in
    /// `published` once handed over).
    pub delayed_by_faults: AtomicU64,
    /// Messages received on control topics.
    pub control_messages: AtomicU64,
    /// Successful (re)connections to the broker.
    pub connections: AtomicU64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: AtomicU64,
}

impl FleetStats {
    /// A snapshot as JSON, for `GET /stats`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "published": self.published.load(Ordering::Relaxed),
            "aggregated": self.aggregated.load(Ordering::Relaxed),
            "publish_failures": self.publish_failures.load(Ordering::Relaxed),
            "dropped_by_faults": self.dropped_by_faults.load(Ordering::Relaxed),
            "delayed_by_faults": self.delayed_by_faults.load(Ordering::Relaxed),
            "control_messages": self.control_messages.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "connection_errors": self.connection_errors.load(Ordering::Relaxed),
        })
    }
}

/// Where the broker is.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// The topic of a device's aggregated state.
pub fn state_topic(device_id: &str) -> String {
    format!("device/{device_id}/telemetry/device_state")
}

/// The topic a device listens to for control messages.
pub fn control_topic(device_id: &str) -> String {
    format!("device/{device_id}/control")
}

/// Runs the devices until `shutdown` is cancelled; `conf` carries the configuration, and its
/// schedule changes restart every device's timers; `faults` carries the fault plan, which each
/// device reads again for its next message when it changed.
pub async fn run(
    conf: watch::Receiver<DeviceConf>,
    faults: watch::Receiver<FaultPlan>,
    options: FleetOptions,
    broker: Broker,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let base = conf.borrow().clone();
    let ids = options.device_ids(&base);
    anyhow::ensure!(!ids.is_empty(), "a fleet needs at least one device");
    for id in &ids {
        entwine_core::state::DeviceId::parse("device id", id)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let per_connection = options.devices_per_connection.max(1);
    let count = ids.len();
    let connections_stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut devices = JoinSet::new();
    // Every device and every delayed message holds a sender; none is ever sent on: the
    // receiver learns that all are gone when `recv` answers `None`.
    let (in_flight, mut all_delivered) = mpsc::channel::<()>(1);
    let run_id: u16 = rand::random();
    for (group, chunk) in ids.chunks(per_connection).enumerate() {
        let client_id = if count == 1 {
            base.device_id.clone()
        } else {
            format!(
                "{}-fleet-{group}-{run_id:04x}",
                options.prefix.as_deref().unwrap_or(&base.device_id)
            )
        };
        let mut mqtt = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        mqtt.set_keep_alive(Duration::from_secs(30));
        mqtt.set_clean_session(true);
        mqtt.set_max_packet_size(128 * 1024, 128 * 1024);
        let (client, eventloop) = AsyncClient::new(mqtt, (chunk.len() * 4).max(64));
        let controls: Vec<String> = chunk.iter().map(|id| control_topic(id)).collect();
        connections.spawn(connection(
            client.clone(),
            eventloop,
            controls,
            stats.clone(),
            connections_stop.clone(),
        ));
        for (offset, id) in chunk.iter().enumerate() {
            let index = group * per_connection + offset;
            let seed = options.seed.wrapping_add(index as u64);
            let publisher = Publisher {
                client: client.clone(),
                qos: options.qos,
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                _in_flight: in_flight.clone(),
            };
            devices.spawn(device(
                id.clone(),
                index,
                count,
                conf.clone(),
                publisher,
                DeviceFaults::new(faults.clone(), id, seed),
                seed,
            ));
        }
    }
    drop(in_flight);
    tracing::info!(
        devices = count,
        connections = connections.len(),
        broker = %format!("{}:{}", broker.host, broker.port),
        "devices started"
    );
    while let Some(ended) = devices.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "a device task failed");
        }
    }
    // Messages that faults delayed go out before the connections queue their DISCONNECT.
    let _ = all_delivered.recv().await;
    connections_stop.cancel();
    while let Some(result) = connections.join_next().await {
        result.context("a connection task panicked")?;
    }
    tracing::info!(
        published = stats.published.load(Ordering::Relaxed),
        dropped_by_faults = stats.dropped_by_faults.load(Ordering::Relaxed),
        "devices stopped"
    );
    Ok(())
}

/// Polls one MQTT connection: subscribes its devices' control topics on every (re)connection,
/// logs control messages, and backs off exponentially (up to 30 s) while the broker is away.
async fn connection(
    client: AsyncClient,
    mut eventloop: EventLoop,
    controls: Vec<String>,
    stats: Arc<FleetStats>,
    stop: CancellationToken,
) {
    // `EventLoop::poll` is not cancel-safe: a publish taken from the client's queue is lost
    // when a poll is dropped halfway through writing it. So stopping does not interrupt the
    // loop: it queues a DISCONNECT behind what the devices published, and the loop ends when
    // that is written — or 2 s later, when the broker is gone and nothing can be written.
    let disconnect = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = client.disconnect().await;
        })
    };
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    tokio::pin!(grace);
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            () = &mut grace => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let filters: Vec<SubscribeFilter> = controls
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtMostOnce))
                    .collect();
                // Off the event loop: the queue may hold what the devices published while the
                // broker was away, and only this loop empties it.
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe_many(filters).await {
                        tracing::warn!(error = %e, "cannot subscribe to control topics");
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                stats.control_messages.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    topic = %publish.topic,
                    payload = %String::from_utf8_lossy(&publish.payload),
                    "control message"
                );
            }
            Ok(_) => {}
            Err(_) if stop.is_cancelled() => break,
            Err(e) => {
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "broker connection lost");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    disconnect.abort();
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// How a device's messages reach its MQTT connection: now, or later when a fault delays them.
#[derive(Clone)]
struct Publisher {
    client: AsyncClient,
    qos: QoS,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
    /// Keeps [`run`] waiting until this device and its delayed messages are done.
    _in_flight: mpsc::Sender<()>,
}

impl Publisher {
    /// Publishes now, or spawns its publication after `delay`. `false` when the fleet stopped
    /// first (the device then ends).
    async fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
        aggregated: bool,
        delay: Duration,
    ) -> bool {
        if delay.is_zero() {
            self.now(topic, payload, aggregated).await
        } else {
            self.later(topic, payload, aggregated, delay);
            true
        }
    }

    /// Publishing waits while the client's queue is full (the broker is away): that wait must
    /// still give way to shutdown.
    async fn now(&self, topic: String, payload: Vec<u8>, aggregated: bool) -> bool {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => false,
            sent = self.client.publish(topic, self.qos, false, payload) => {
                self.count(sent.is_ok(), aggregated);
                true
            }
        }
    }

    /// Publishes after `delay` from a task of its own, so the device's timers keep their pace.
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
            // While the fleet runs, wait for room in the client's queue as `now` does; once it
            // stops, take the room there is, or count a failure: never a silent loss.
            let sent = if this.shutdown.is_cancelled() {
                this.client
                    .try_publish(topic, this.qos, false, payload)
                    .is_ok()
            } else {
                tokio::select! {
                    biased;
                    () = this.shutdown.cancelled() => false,
                    sent = this.client.publish(topic, this.qos, false, payload) => sent.is_ok(),
                }
            };
            this.count(sent, aggregated);
        });
    }

    fn count(&self, sent: bool, aggregated: bool) {
        if sent {
            self.stats.published.fetch_add(1, Ordering::Relaxed);
            if aggregated {
                self.stats.aggregated.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
        }
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

/// One device: its timers, its sensors, its messages.
async fn device(
    id: String,
    index: usize,
    count: usize,
    mut conf: watch::Receiver<DeviceConf>,
    publisher: Publisher,
    mut faults: DeviceFaults,
    seed: u64,
) {
    let mut sensors = Sensors::new(&conf.borrow(), seed);
    let state_topic = state_topic(&id);
    let shutdown = publisher.shutdown.clone();
    let stats = publisher.stats.clone();
    loop {
        let current = conf.borrow_and_update().clone();
        let schedule = current.schedule();
        // Spread the fleet over one message period so it does not publish in bursts.
        let spread = schedule
            .aggregated_period()
            .min(schedule.update_period())
            .mul_f64(index as f64 / count as f64);
        let start = Instant::now() + schedule.initial_delay() + spread;
        let mut updates = interval_at(start, schedule.update_period());
        updates.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut messages = interval_at(start, schedule.aggregated_period());
        messages.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                changed = conf.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tracing::debug!(device_id = %id, "schedule changed, timers restart");
                    break;
                }
                _ = updates.tick() => {
                    sensors.update();
                    if current.single_resource_telemetry_enabled {
                        let in_force = faults.current(&id);
                        let timestamp = now_ms().saturating_add(in_force.clock_skew_ms);
                        for (key, payload) in sensors.single_payloads(timestamp) {
                            let fate = faults.decide(&in_force);
                            if fate.drop {
                                stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let topic = format!("device/{id}/telemetry/{key}");
                            if !publisher.send(topic, payload, false, fate.delay).await {
                                return;
                            }
                        }
                    }
                }
                _ = messages.tick(), if current.aggregated_telemetry => {
                    let in_force = faults.current(&id);
                    let fate = faults.decide(&in_force);
                    if fate.drop {
                        stats.dropped_by_faults.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let payload = sensors.aggregated_payload(
                        now_ms().saturating_add(fate.skew_ms),
                        current.target_aggregated_telemetry_payload_size_byte,
                    );
                    if !publisher.send(state_topic.clone(), payload, true, fate.delay).await {
                        return;
                    }
                }
            }
        }
    }
}
