//! Running devices: one, as the seed does, or a fleet from one process.
//!
//! Each device is a task with two timers (sensor updates and aggregated messages) that restart
//! when `PUT /conf` changes the schedule. Devices share MQTT connections, a few hundred per
//! connection, so ten thousand devices need tens of sockets, not ten thousand; each connection
//! subscribes to its devices' control topics and reconnects with exponential backoff when the
//! broker goes away.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::conf::DeviceConf;
use crate::sensor::Sensors;

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
    /// Messages handed to the MQTT client (aggregated and single-resource).
    pub published: AtomicU64,
    /// Aggregated state messages among them.
    pub aggregated: AtomicU64,
    /// Messages the client refused (its connection task ended).
    pub publish_failures: AtomicU64,
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
/// schedule changes restart every device's timers.
pub async fn run(
    conf: watch::Receiver<DeviceConf>,
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
            devices.spawn(device(
                id.clone(),
                index,
                count,
                conf.clone(),
                client.clone(),
                options.qos,
                options.seed.wrapping_add(index as u64),
                stats.clone(),
                shutdown.clone(),
            ));
        }
    }
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
    connections_stop.cancel();
    while let Some(result) = connections.join_next().await {
        result.context("a connection task panicked")?;
    }
    tracing::info!(
        published = stats.published.load(Ordering::Relaxed),
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

/// One device: its timers, its sensors, its messages.
#[allow(clippy::too_many_arguments)]
async fn device(
    id: String,
    index: usize,
    count: usize,
    mut conf: watch::Receiver<DeviceConf>,
    client: AsyncClient,
    qos: QoS,
    seed: u64,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
) {
    let mut sensors = Sensors::new(&conf.borrow(), seed);
    let state_topic = state_topic(&id);
    // Publishing waits while the client's queue is full (the broker is away): that wait must
    // still give way to shutdown.
    let publish = |topic: String, payload: Vec<u8>| {
        let client = client.clone();
        let stats = stats.clone();
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => false,
                sent = client.publish(topic, qos, false, payload) => {
                    match sent {
                        Ok(()) => stats.published.fetch_add(1, Ordering::Relaxed),
                        Err(_) => stats.publish_failures.fetch_add(1, Ordering::Relaxed),
                    };
                    true
                }
            }
        }
    };
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
                        for (key, payload) in sensors.single_payloads(now_ms()) {
                            if !publish(format!("device/{id}/telemetry/{key}"), payload).await {
                                return;
                            }
                        }
                    }
                }
                _ = messages.tick(), if current.aggregated_telemetry => {
                    let payload = sensors.aggregated_payload(
                        now_ms(),
                        current.target_aggregated_telemetry_payload_size_byte,
                    );
                    if !publish(state_topic.clone(), payload).await {
                        return;
                    }
                    stats.aggregated.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
