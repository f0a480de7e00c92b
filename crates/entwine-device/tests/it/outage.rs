//! The emulator through broker outages, on a private Mosquitto the test kills (SIGKILL) and
//! restarts on the same port, and with a buffer that fills while no broker is there.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use entwine_device::conf::DeviceConf;
use entwine_device::faults::FaultPlan;
use entwine_device::fleet::{state_topic, Broker, Delivery, FleetOptions, FleetStats, Unsent};
use entwine_device::Emulator;
use entwine_testing::{eventually, free_port, unique};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A Mosquitto of the test's own, persisting to a temporary directory. No limit on messages in
/// flight to a subscriber (`max_inflight_messages 0`): with the default 20, Mosquitto
/// acknowledges a device's message while still holding it back from a lagging subscriber, and
/// a SIGKILL then loses it in the broker, which is not what this test is about.
struct PrivateBroker {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user, which must write its database here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let mut broker = Self {
            port: free_port(),
            dir,
            child: None,
        };
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 0\n\
             max_inflight_messages 0\n\
             log_dest file {dir}/mosquitto.log\n",
            port = broker.port,
            dir = broker.dir.path().display()
        );
        std::fs::write(broker.conf(), conf).unwrap();
        broker.restart().await;
        broker
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("mosquitto.db")
    }

    /// Starts Mosquitto on its port and waits until it accepts connections.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(self.conf())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto is installed");
        self.child = Some(child);
        let port = self.port;
        eventually(
            Duration::from_secs(10),
            "the private Mosquitto",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// SIGSTOP: the broker reads and acknowledges nothing more; what is sent to it waits in
    /// its sockets.
    fn pause(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no clean shutdown, no last save.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of the private broker, so the test decides when the devices may
/// reconnect.
struct Gate {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    async fn open(port: u16, target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            port,
            task: Some(task),
        }
    }

    /// Cuts every connection and stops listening.
    async fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A QoS 1 subscriber on a persistent session that reconnects whenever the broker comes back,
/// recording `(device id, timestamp)` of each message (duplicates included).
struct PersistentSubscriber {
    received: Arc<Mutex<Vec<(String, i64)>>>,
    sessions_lost: Arc<Mutex<u32>>,
    subscriptions: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl PersistentSubscriber {
    async fn start(port: u16, filter: String) -> Self {
        let mut options = MqttOptions::new(unique("outage-sub"), "127.0.0.1", port);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let sessions_lost = Arc::new(Mutex::new(0));
        let subscriptions = Arc::new(Mutex::new(0));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = {
            let (received, sessions_lost) = (received.clone(), sessions_lost.clone());
            let subscriptions = subscriptions.clone();
            tokio::spawn(async move {
                let mut subscribed_tx = Some(subscribed_tx);
                let mut connections = 0;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            connections += 1;
                            if !ack.session_present {
                                if connections > 1 {
                                    *sessions_lost.lock().unwrap() += 1;
                                }
                                client
                                    .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                                    .unwrap();
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            *subscriptions.lock().unwrap() += 1;
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let device = p.topic.split('/').nth(1).unwrap().to_owned();
                            let payload: Value = serde_json::from_slice(&p.payload).unwrap();
                            let timestamp = payload["timestamp"].as_i64().unwrap();
                            received.lock().unwrap().push((device, timestamp));
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("SUBACK within 10 s")
            .unwrap();
        Self {
            received,
            sessions_lost,
            subscriptions,
            task,
        }
    }

    fn distinct(&self) -> HashSet<(String, i64)> {
        self.received.lock().unwrap().iter().cloned().collect()
    }

    fn total(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for PersistentSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Per device, the timestamps after which more than 1.5 periods (50 ms) pass before the next:
/// where messages are missing.
fn gaps(received: &HashSet<(String, i64)>) -> Vec<(String, i64, i64)> {
    let mut by_device: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
    for (device, ts) in received {
        by_device.entry(device).or_default().push(*ts);
    }
    let mut gaps = Vec::new();
    for (device, mut ts) in by_device {
        ts.sort_unstable();
        for pair in ts.windows(2) {
            if pair[1] - pair[0] > 75 {
                gaps.push((device.to_owned(), pair[0], pair[1]));
            }
        }
    }
    gaps
}

fn n(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Waits until `condition` holds on the fleet's counters.
async fn until(
    stats: &Arc<FleetStats>,
    timeout: Duration,
    what: &str,
    condition: impl Fn(&FleetStats) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !condition(stats) {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: {}",
            stats.to_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_through_broker_kills_every_message_counted_published_is_received() {
    let mut broker = PrivateBroker::start().await;
    let prefix = unique("outage");
    let subscriber =
        PersistentSubscriber::start(broker.port, "device/+/telemetry/+".to_owned()).await;
    // The subscriber's session must be on disk before the first kill.
    let subscribed = std::time::SystemTime::now();
    let db = broker.db();
    eventually(
        Duration::from_secs(5),
        "Mosquitto to save the session",
        || {
            let db = db.clone();
            async move {
                std::fs::metadata(&db)
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at > subscribed)
            }
        },
    )
    .await;

    // The devices reach the broker through a gate the test can keep closed.
    let mut gate = Gate::open(0, broker.port).await;
    let conf = DeviceConf {
        device_id: "unused".into(),
        target_mqtt_broker_address: "127.0.0.1".into(),
        target_mqtt_broker_port: gate.port,
        update_period_ms: 50,
        update_initial_delay_ms: 0,
        aggregated_telemetry_msg_sec: 20.0,
        ..DeviceConf::default()
    };
    let options = FleetOptions {
        count: 6,
        prefix: Some(prefix.clone()),
        qos: QoS::AtLeastOnce,
        devices_per_connection: 3,
        seed: 7,
        models: Vec::new(),
    };
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start_with(
        conf,
        options,
        FaultPlan::default(),
        Delivery::default(),
        Broker {
            host: "127.0.0.1".into(),
            port: gate.port,
            tls: false,
        },
        http,
        stop.clone(),
    )
    .unwrap();
    let stats = emulator.stats.clone();
    until(&stats, Duration::from_secs(10), "100 published", |s| {
        n(&s.published) >= 100
    })
    .await;

    // Outages 1 and 2: SIGKILL, the broker comes back from its saved state, where the
    // sessions are (rumqttc re-sends what was in flight). Outage 3: SIGKILL and the saved state
    // is gone, so the devices' sessions are too (the outbox sends again what rumqttc dropped);
    // the devices are kept out until the subscriber has subscribed again.
    let mut connected_at = std::time::SystemTime::now();
    let mut kills = Vec::new();
    for outage in 1..=3 {
        if outage < 3 {
            // The devices' sessions must be on disk too (Mosquitto saves every 1-2 s).
            let db = broker.db();
            eventually(
                Duration::from_secs(5),
                "Mosquitto to save the sessions",
                || {
                    let db = db.clone();
                    async move {
                        std::fs::metadata(&db)
                            .and_then(|m| m.modified())
                            .is_ok_and(|at| at > connected_at)
                    }
                },
            )
            .await;
        }
        // The subscriber has what the broker acknowledged so far, so that what the kill may
        // lose in the broker (not yet written to the subscriber) is not mistaken for a loss at
        // the device.
        let acknowledged = stats.published.load(Ordering::Relaxed);
        eventually(
            Duration::from_secs(10),
            "the subscriber to catch up",
            || {
                let caught_up = subscriber.distinct().len() as u64 >= acknowledged;
                async move { caught_up }
            },
        )
        .await;
        let connections = stats.connections.load(Ordering::Relaxed);
        let resent = stats.resent.load(Ordering::Relaxed);
        // Stopped first, so that messages are in flight (sent, not acknowledged) at the kill.
        broker.pause();
        until(&stats, Duration::from_secs(5), "messages in flight", |s| {
            n(&s.in_flight) >= 50
        })
        .await;
        broker.kill();
        kills.push(now_ms());
        let ticks_at_kill = stats.ticks.load(Ordering::Relaxed);
        // Six devices at 20 msg/s keep ticking while the broker is away: 120 due per second,
        // far beyond the old 4 per device, and all of them held.
        until(
            &stats,
            Duration::from_secs(10),
            "ticks and a backlog during the outage",
            |s| {
                n(&s.ticks) >= ticks_at_kill + 150
                    && n(&s.queued) >= 100
                    && n(&s.connection_errors) >= 2
            },
        )
        .await;
        if outage == 3 {
            let subscriptions = *subscriber.subscriptions.lock().unwrap();
            gate.close().await;
            std::fs::remove_file(broker.db()).unwrap();
            broker.restart().await;
            eventually(Duration::from_secs(10), "the subscriber back", || {
                let now = *subscriber.subscriptions.lock().unwrap();
                async move { now > subscriptions }
            })
            .await;
            gate = Gate::open(gate.port, broker.port).await;
        } else {
            broker.restart().await;
        }
        let back = Instant::now();
        until(
            &stats,
            Duration::from_secs(5),
            "both connections back",
            |s| n(&s.connections) >= connections + 2,
        )
        .await;
        let reconnected_in = back.elapsed();
        connected_at = std::time::SystemTime::now();
        assert!(
            reconnected_in < Duration::from_millis(3500),
            "outage {outage}: reconnected {reconnected_in:?} after the broker came back"
        );
        let published = stats.published.load(Ordering::Relaxed);
        until(
            &stats,
            Duration::from_secs(10),
            "the backlog delivered",
            |s| n(&s.queued) < 20 && n(&s.published) >= published + 150,
        )
        .await;
        // What was in flight at the kill was sent again: by rumqttc on the kept sessions, by
        // the outbox when the broker had lost them.
        let lost = if outage < 3 { 0 } else { 2 };
        assert_eq!(
            stats.sessions_lost.load(Ordering::Relaxed),
            lost,
            "outage {outage}: {}",
            stats.to_json()
        );
        assert!(
            stats.resent.load(Ordering::Relaxed) >= resent + 50,
            "outage {outage}: {}",
            stats.to_json()
        );
    }

    stop.cancel();
    emulator.wait().await.unwrap();
    let published = stats.published.load(Ordering::Relaxed);
    let ticks = stats.ticks.load(Ordering::Relaxed);
    assert_eq!(
        stats.queued.load(Ordering::Relaxed),
        0,
        "{}",
        stats.to_json()
    );
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    assert_eq!(stats.dropped_by_faults.load(Ordering::Relaxed), 0);
    for reason in [Unsent::BufferFull, Unsent::ConnectionLost, Unsent::Stopped] {
        assert_eq!(
            stats.unsent_for(reason),
            0,
            "{reason:?}: {}",
            stats.to_json()
        );
    }
    // Nothing vanishes between a tick and its fate: published, or counted as unsent (a timer
    // that ran more than a period late, which a loaded machine may cause).
    assert_eq!(
        ticks,
        published + stats.unsent_total(),
        "{}",
        stats.to_json()
    );

    // Every message the fleet counted as published reached the subscriber, and nothing else
    // did: the same set, once duplicates of the at-least-once re-sends are removed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (subscriber.distinct().len() as u64) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let distinct = subscriber.distinct();
    assert_eq!(
        *subscriber.sessions_lost.lock().unwrap(),
        1,
        "the broker kept the subscriber's session across the first two kills, not the third"
    );
    assert_eq!(
        distinct.len() as u64,
        published,
        "distinct messages received vs published; {} received with duplicates; {}; gaps {:?}; kills at {kills:?}",
        subscriber.total(),
        stats.to_json(),
        gaps(&distinct)
    );
    let devices: HashSet<&str> = distinct.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices.len(), 6);
    eprintln!(
        "three outages: {ticks} ticks, {published} published, {} received with duplicates, {} re-sent, {}",
        subscriber.total(),
        stats.resent.load(Ordering::Relaxed),
        stats.to_json()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_broker_the_buffer_holds_what_fits_and_counts_the_rest_as_unsent() {
    let id = unique("bound");
    // Nothing listens on this port.
    let port = free_port();
    // Payloads padded to 436 bytes; topic `device/<18 chars>/telemetry/device_state` is 48
    // bytes; 64 of bookkeeping: 548 bytes a message, so a 2,740-byte buffer holds exactly 5.
    assert_eq!(state_topic(&id).len(), 48);
    let conf = DeviceConf {
        device_id: id.clone(),
        target_mqtt_broker_address: "127.0.0.1".into(),
        target_mqtt_broker_port: port,
        update_period_ms: 20,
        update_initial_delay_ms: 0,
        aggregated_telemetry_msg_sec: 50.0,
        target_aggregated_telemetry_payload_size_byte: Some(436),
        ..DeviceConf::default()
    };
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start_with(
        conf,
        FleetOptions {
            qos: QoS::AtLeastOnce,
            ..FleetOptions::default()
        },
        FaultPlan::default(),
        Delivery {
            client_id: Some(unique("bound-client")),
            buffer_bytes: 5 * 548,
            ..Delivery::default()
        },
        Broker {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        },
        http,
        stop.clone(),
    )
    .unwrap();
    let api = format!("http://{}", emulator.http_address);
    let stats = emulator.stats.clone();
    until(&stats, Duration::from_secs(5), "50 ticks", |s| {
        n(&s.ticks) >= 50
    })
    .await;
    assert_eq!(
        stats.queued.load(Ordering::Relaxed),
        5,
        "{}",
        stats.to_json()
    );
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0, "not connected");
    let seen: Value = reqwest::get(format!("{api}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let full = seen["unsent"]["buffer_full"].as_u64().unwrap();
    let late = seen["unsent"]["timer_late"].as_u64().unwrap();
    // Between the snapshot's fields the device may tick once more.
    let ticks = seen["ticks"].as_u64().unwrap();
    assert!(
        full + late + 5 == ticks || full + late + 5 == ticks + 1,
        "ticks {ticks} = 5 queued + {full} refused + {late} late: {seen}"
    );
    assert_eq!(seen["queued"], 5, "{seen}");
    assert_eq!(seen["published"], 0, "{seen}");

    tokio::time::timeout(Duration::from_secs(5), async {
        stop.cancel();
        emulator.wait().await.unwrap();
    })
    .await
    .expect("stops within 5 s although its broker is away");
    let ticks = stats.ticks.load(Ordering::Relaxed);
    assert_eq!(stats.unsent_for(Unsent::Stopped), 5, "{}", stats.to_json());
    assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    assert_eq!(stats.published.load(Ordering::Relaxed), 0);
    assert_eq!(
        ticks,
        stats.unsent_for(Unsent::BufferFull)
            + stats.unsent_for(Unsent::Stopped)
            + stats.unsent_for(Unsent::TimerLate),
        "{}",
        stats.to_json()
    );
}

/// Connects under `client_id` on a persistent session and answers whether the broker still
/// had one; disconnects cleanly, leaving the session behind.
async fn session_present(port: u16, client_id: &str) -> bool {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let present = loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
            .await
            .expect("an answer within 5 s")
            .expect("the private broker answers")
        {
            Event::Incoming(Packet::ConnAck(ack)) => break ack.session_present,
            _ => continue,
        }
    };
    client.try_disconnect().unwrap();
    while !matches!(
        eventloop.poll().await,
        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
    ) {}
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_ends_the_fleets_persistent_sessions() {
    let broker = PrivateBroker::start().await;
    // The broker keeps a persistent session across a disconnection.
    let witness = unique("witness");
    assert!(!session_present(broker.port, &witness).await);
    assert!(session_present(broker.port, &witness).await);

    let prefix = unique("ended");
    let conf = DeviceConf {
        device_id: "unused".into(),
        target_mqtt_broker_address: "127.0.0.1".into(),
        target_mqtt_broker_port: broker.port,
        update_period_ms: 50,
        update_initial_delay_ms: 0,
        aggregated_telemetry_msg_sec: 20.0,
        ..DeviceConf::default()
    };
    let options = FleetOptions {
        count: 2,
        prefix: Some(prefix.clone()),
        qos: QoS::AtLeastOnce,
        devices_per_connection: 1,
        seed: 1,
        models: Vec::new(),
    };
    let ids: Vec<String> = (0..2)
        .map(|i| options.client_id(&conf, &Delivery::default(), i))
        .collect();
    assert_eq!(
        ids,
        [format!("{prefix}-fleet-0"), format!("{prefix}-fleet-1")]
    );
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let emulator = Emulator::start_with(
        conf,
        options,
        FaultPlan::default(),
        Delivery::default(),
        Broker {
            host: "127.0.0.1".into(),
            port: broker.port,
            tls: false,
        },
        http,
        stop.clone(),
    )
    .unwrap();
    let stats = emulator.stats.clone();
    until(&stats, Duration::from_secs(10), "20 published", |s| {
        n(&s.published) >= 20
    })
    .await;
    stop.cancel();
    emulator.wait().await.unwrap();
    assert_eq!(stats.unsent_total(), 0, "{}", stats.to_json());
    assert_eq!(stats.ticks.load(Ordering::Relaxed), n(&stats.published));
    for id in &ids {
        assert!(
            !session_present(broker.port, id).await,
            "{id}: the stopped fleet left its session on the broker"
        );
    }
}
