//! The bench's devices: the emulator's sensors and payloads, published at a chosen pace over a
//! few shared MQTT connections (QoS 1, so the broker acknowledges every message it took).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use entwine_device::conf::DeviceConf;
use entwine_device::fleet::{state_topic, Broker};
use entwine_device::sensor::Sensors;
use entwine_functions::handlers::{Clock, SystemClock};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How fast the devices publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Pace {
    /// `per_second` messages per second in all, spread evenly over the devices (round robin).
    Fixed {
        /// Messages per second, all devices together.
        per_second: f64,
    },
    /// As fast as the platform absorbs them: at most `in_flight` messages published and not
    /// yet mirrored by their twin at any time.
    Saturation {
        /// Messages out and not yet mirrored.
        in_flight: u64,
    },
}

/// What the devices did.
#[derive(Debug, Default)]
pub(super) struct LoadStats {
    /// Messages handed to the MQTT clients.
    pub(super) published: AtomicU64,
    /// Messages the broker acknowledged (PUBACK).
    pub(super) acknowledged: AtomicU64,
}

/// Messages mirrored so far, counted by the bench's observer; wakes the saturation pace.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Digital states of the bench's devices announced by the digital-event handler.
    pub(super) mirrored: AtomicU64,
    /// Notified on every one of them.
    pub(super) changed: Notify,
}

/// MQTT connections the devices share: enough to keep the broker busy on two cores.
const CONNECTIONS: usize = 4;

/// Publishes for `devices` devices named `<prefix>-1…` at `pace` until `stop`, then waits (at
/// most 10 s) for the broker to acknowledge what was published, and disconnects.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    broker: Broker,
    login: entwine_mqtt::Prepared,
    prefix: String,
    devices: usize,
    pace: Pace,
    progress: Arc<Progress>,
    stats: Arc<LoadStats>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(devices > 0, "a bench needs at least one device");
    let mut clients = Vec::new();
    let mut pumps = Vec::new();
    for c in 0..CONNECTIONS.min(devices) {
        let mut options = MqttOptions::new(
            format!("{prefix}-load-{c}"),
            broker.host.clone(),
            broker.port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        login.apply(&mut options);
        let (client, eventloop) = AsyncClient::new(options, 10_000);
        pumps.push(tokio::spawn(pump(eventloop, stats.clone())));
        clients.push(client);
    }
    let conf = DeviceConf::default();
    let mut sensors: Vec<Sensors> = (0..devices)
        .map(|d| Sensors::new(&conf, d as u64))
        .collect();
    let topics: Vec<String> = (1..=devices)
        .map(|d| state_topic(&format!("{prefix}-{d}")))
        .collect();
    let mut last_ts = vec![0_i64; devices];

    let start = Instant::now();
    let mut sent: u64 = 0;
    'publishing: while !stop.is_cancelled() {
        let due = match pace {
            Pace::Fixed { per_second } => {
                let due = (start.elapsed().as_secs_f64() * per_second) as u64;
                if due <= sent {
                    // Sleep to the next message, at most 50 ms so that `stop` is seen.
                    let next = (sent + 1) as f64 / per_second;
                    let wait = (next - start.elapsed().as_secs_f64()).clamp(0.0, 0.05);
                    tokio::select! {
                        () = stop.cancelled() => break 'publishing,
                        () = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                    }
                    continue;
                }
                due
            }
            Pace::Saturation { in_flight } => {
                let changed = progress.changed.notified();
                let allowed = progress.mirrored.load(Ordering::Relaxed) + in_flight;
                if allowed <= sent {
                    tokio::select! {
                        () = stop.cancelled() => break 'publishing,
                        () = changed => {}
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
                allowed
            }
        };
        while sent < due {
            let d = (sent % devices as u64) as usize;
            // Each device's timestamps strictly increase: (device, timestamp) is an event's key.
            let ts = SystemClock.now_ms().max(last_ts[d] + 1);
            last_ts[d] = ts;
            sensors[d].update();
            let payload = sensors[d].aggregated_payload(ts, None);
            let client = &clients[d % clients.len()];
            tokio::select! {
                () = stop.cancelled() => break 'publishing,
                sent_ok = client.publish(topics[d].clone(), QoS::AtLeastOnce, false, payload) => {
                    sent_ok.map_err(|e| anyhow::anyhow!("cannot publish: {e}"))?;
                }
            }
            sent += 1;
            stats.published.store(sent, Ordering::Relaxed);
        }
    }

    // Everything published must be in the broker before the bench counts what was mirrored.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while stats.acknowledged.load(Ordering::Relaxed) < sent {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if settled.is_err() {
        tracing::warn!(
            published = sent,
            acknowledged = stats.acknowledged.load(Ordering::Relaxed),
            "the broker did not acknowledge every message within 10 s"
        );
    }
    for client in &clients {
        let _ = client.disconnect().await;
    }
    for pump in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
    }
    Ok(())
}

/// Turns one connection's event loop, never cancelled mid-poll (it is not cancel-safe), counting
/// acknowledgements; ends when the DISCONNECT is written or the connection fails.
async fn pump(mut eventloop: EventLoop, stats: Arc<LoadStats>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "bench devices lost the broker");
                return;
            }
        }
    }
}
