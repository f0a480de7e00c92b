//! The brokers entwine ships, as configured: message size limits, and what a crash loses.
//!
//! The tests that kill a broker start their own (Mosquitto with the configuration of
//! `deploy/k8s/40-mosquitto.yaml`, NATS with JetStream and its MQTT listener) on free ports with
//! a temporary data directory, and remove both when they end, failed or not.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use entwine_platform::broker::MAX_MESSAGE_BYTES;
use entwine_testing::{free_port, unique};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// What the connector accepts: 1 MiB packets.
const CONNECTOR_INCOMING: usize = 1024 * 1024;

/// The shipped `mosquitto.conf`, from the `physical-broker` ConfigMap.
fn shipped_mosquitto_conf() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/40-mosquitto.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(document).unwrap();
        if value["kind"] == "ConfigMap" && value["metadata"]["name"] == "physical-broker" {
            return value["data"]["mosquitto.conf"].as_str().unwrap().to_owned();
        }
    }
    panic!("no physical-broker ConfigMap in {}", path.display());
}

/// A setting of the shipped Mosquitto configuration.
fn shipped_value(key: &str) -> String {
    shipped_mosquitto_conf()
        .lines()
        .find_map(|line| {
            let (k, value) = line.trim().split_once(' ')?;
            (k == key).then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("{key} is not set in the shipped mosquitto.conf"))
}

fn shipped_setting(key: &str) -> u64 {
    shipped_value(key).parse().unwrap()
}

/// A broker process of the test's own, killed and removed (with its data) on drop.
struct OwnBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    program: &'static str,
    port: u16,
}

impl OwnBroker {
    /// Mosquitto with the shipped configuration, listening on a free loopback port and saving
    /// to a temporary directory instead of the volume.
    fn mosquitto() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root runs as the `mosquitto` user, which must write here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = free_port();
        let conf: String = shipped_mosquitto_conf()
            .lines()
            .map(|line| match line.split_whitespace().next() {
                Some("listener") => format!("listener {port} 127.0.0.1"),
                Some("persistence_location") => {
                    format!("persistence_location {}/", dir.path().display())
                }
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, conf + "\n").unwrap();
        let mut broker = Self {
            child: None,
            dir,
            config,
            program: "mosquitto",
            port,
        };
        broker.spawn();
        broker
    }

    /// NATS with JetStream and its MQTT listener, on free ports, storing in a temporary
    /// directory.
    fn nats() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client}\n\
             jetstream {{ store_dir: \"{store}\" }}\nmqtt {{ listen: 127.0.0.1:{port} }}\n",
            name = unique("entwine-test"),
            client = free_port(),
            store = dir.path().join("jetstream").display(),
        );
        let config = dir.path().join("nats.conf");
        std::fs::write(&config, conf).unwrap();
        let mut broker = Self {
            child: None,
            dir,
            config,
            program: "nats-server",
            port,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        // Debian installs both in /usr/sbin, which a user's PATH may lack.
        let installed = Path::new("/usr/sbin").join(self.program);
        let program = if installed.exists() {
            installed
        } else {
            self.program.into()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        let child = Command::new(&program)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash: no chance to save anything.
    fn kill_9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts it again with the same configuration, port and data.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "killed first");
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn options(client_id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_max_packet_size(CONNECTOR_INCOMING, CONNECTOR_INCOMING);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Polls until CONNACK; `Err` with the reason when the broker does not answer.
async fn connect(
    options: MqttOptions,
) -> Result<(AsyncClient, EventLoop), rumqttc::ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok((client, eventloop));
        }
    }
}

/// Connects, retrying until the broker answers (it may still be starting or loading its data).
async fn connect_when_up(options: MqttOptions, broker: &OwnBroker) -> (AsyncClient, EventLoop) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let failed =
            match tokio::time::timeout(Duration::from_secs(5), connect(options.clone())).await {
                Ok(Ok(connected)) => return connected,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no CONNACK within 5 s".to_owned(),
            };
        assert!(
            Instant::now() < deadline,
            "{} on port {} did not answer within 30 s ({failed}); its log:\n{}",
            broker.program,
            broker.port,
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subscribes (QoS 1) and returns once the broker acknowledged it.
async fn subscribe(client: &AsyncClient, eventloop: &mut EventLoop, filter: &str) {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe request");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("SUBACK") {
            return;
        }
    }
}

/// Publishes each payload (QoS 1) and returns once the broker acknowledged all of them.
async fn publish_all(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) {
    let mut sent = 0;
    let mut acked = 0;
    for payload in payloads {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        sent += 1;
        // Keep the request queue moving while it fills.
        while let Ok(Ok(event)) =
            tokio::time::timeout(Duration::from_millis(0), eventloop.poll()).await
        {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                acked += 1;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < sent {
        assert!(
            Instant::now() < deadline,
            "{acked} of {sent} PUBACKs within 60 s"
        );
        if let Event::Incoming(Packet::PubAck(_)) =
            tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .expect("the broker answers")
                .expect("the connection holds")
        {
            acked += 1;
        }
    }
}

/// Reads publishes from `eventloop` (acknowledged by rumqttc) until one carries `last`, and
/// answers the payloads that came before it.
async fn receive_until(eventloop: &mut EventLoop, last: &[u8], within: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(polled) = tokio::time::timeout(left, eventloop.poll()).await else {
            panic!(
                "no {:?} within {within:?}; {} messages before it",
                String::from_utf8_lossy(last),
                received.len()
            )
        };
        let event = polled.expect("the subscriber's connection holds");
        if let Event::Incoming(Packet::Publish(p)) = event {
            if p.payload.as_ref() == last {
                return received;
            }
            received.push(p.payload.to_vec());
        }
    }
}

async fn disconnect(client: AsyncClient, mut eventloop: EventLoop) {
    client.disconnect().await.unwrap();
    // Until the DISCONNECT is written and the broker closes the connection.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// 300 KiB, over the limit: the broker refuses it and a normal message right after flows.
/// `same_connection`: the broker keeps the publisher connected (Mosquitto) or drops it (rumqttd).
async fn an_oversized_message_is_refused_and_the_next_one_flows(port: u16, same_connection: bool) {
    let topic = unique("size/device");
    let (sub, mut sub_loop) = connect(options(&unique("size-sub"), port)).await.unwrap();
    subscribe(&sub, &mut sub_loop, &topic).await;

    let oversized = vec![b'x'; 300 * 1024];
    assert!(oversized.len() > MAX_MESSAGE_BYTES);
    let (publisher, mut pub_loop) = connect(options(&unique("size-pub"), port)).await.unwrap();
    publisher
        .publish(&topic, QoS::AtLeastOnce, false, oversized)
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return "acknowledged",
                Ok(_) => {}
                Err(_) => return "disconnected",
            }
        }
    })
    .await
    .expect("the broker answers the oversized message");
    let normal = b"{\"timestamp\": 1}".to_vec();
    if same_connection {
        assert_eq!(refused, "acknowledged", "and dropped, not forwarded");
        publish_all(&publisher, &mut pub_loop, &topic, [normal.clone()]).await;
    } else {
        assert_eq!(refused, "disconnected");
        drop(publisher);
        let (publisher, mut pub_loop) = connect(options(&unique("size-pub"), port)).await.unwrap();
        publish_all(&publisher, &mut pub_loop, &topic, [normal.clone()]).await;
    }
    // One topic, one subscriber: had the broker forwarded the oversized message, it would
    // arrive before the normal one.
    let before = receive_until(&mut sub_loop, &normal, Duration::from_secs(10)).await;
    assert_eq!(
        before.len(),
        0,
        "the oversized message never reaches a subscriber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_a_message_over_256_kib_and_carries_on() {
    assert_eq!(MAX_MESSAGE_BYTES, 262_144);
    let address = entwine_platform::broker::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    an_oversized_message_is_refused_and_the_next_one_flows(address.port(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_refuses_a_message_over_256_kib_and_carries_on() {
    assert_eq!(
        shipped_setting("message_size_limit"),
        MAX_MESSAGE_BYTES as u64
    );
    assert!(shipped_setting("max_packet_size") as usize <= CONNECTOR_INCOMING);
    let broker = OwnBroker::mosquitto();
    let (client, eventloop) =
        connect_when_up(options(&unique("probe"), broker.port), &broker).await;
    disconnect(client, eventloop).await;
    an_oversized_message_is_refused_and_the_next_one_flows(broker.port, true).await;
}

/// A persistent QoS 1 session subscribes and goes away; `count` messages are published and
/// acknowledged by the broker; the broker is killed -9 and started again; the session comes back.
/// Answers which of the messages (their numbers) it was given.
async fn queued_messages_after_kill_9(broker: &mut OwnBroker, count: usize) -> BTreeSet<usize> {
    let topic = unique("crash/device");
    let session = unique("crash-session");
    let mut session_options = options(&session, broker.port);
    session_options.set_clean_session(false);
    let (client, mut eventloop) = connect_when_up(session_options.clone(), broker).await;
    subscribe(&client, &mut eventloop, &topic).await;
    disconnect(client, eventloop).await;

    let (publisher, mut pub_loop) = connect(options(&unique("crash-pub"), broker.port))
        .await
        .unwrap();
    let started = Instant::now();
    publish_all(
        &publisher,
        &mut pub_loop,
        &topic,
        (0..count).map(|i| format!("{{\"n\": {i}}}").into_bytes()),
    )
    .await;
    println!(
        "{}: {count} QoS 1 messages acknowledged in {:?}",
        broker.program,
        started.elapsed()
    );
    drop(publisher);
    drop(pub_loop);

    broker.kill_9();
    broker.restart();
    let (client, mut eventloop) = connect_when_up(session_options, broker).await;
    // A marker published now queues behind whatever the session kept.
    let (publisher, mut pub_loop) =
        connect_when_up(options(&unique("crash-pub"), broker.port), broker).await;
    let marker = b"marker".to_vec();
    publish_all(&publisher, &mut pub_loop, &topic, [marker.clone()]).await;
    let received = receive_until(&mut eventloop, &marker, Duration::from_secs(60)).await;
    disconnect(client, eventloop).await;
    let numbers: Vec<usize> = received
        .iter()
        .map(|p| {
            let value: serde_json::Value = serde_json::from_slice(p).unwrap();
            value["n"].as_u64().unwrap() as usize
        })
        .collect();
    let distinct: BTreeSet<usize> = numbers.iter().copied().collect();
    assert_eq!(distinct.len(), numbers.len(), "no message twice");
    assert!(distinct.iter().all(|&n| n < count));
    distinct
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_shipped_mosquitto_loses_fewer_messages_than_its_autosave_interval() {
    // The shipped configuration saves whenever `autosave_interval` changes have accumulated
    // (Mosquitto 2.0 counts one per connection of a persistent session, subscription, message
    // queued for a session, acknowledgement), so a crash loses the changes since the last save.
    // Here: the session's connection and subscription are changes 1 and 2, the n-th message
    // change n + 2; saves happen at changes 1000 and 2000 (messages 0 to 997, then to 1997), so
    // of 2,500 messages the first 1,998 survive and the last 502 are lost.
    assert_eq!(shipped_value("autosave_on_changes"), "true");
    let interval = shipped_setting("autosave_interval") as usize;
    assert_eq!(interval, 1000);
    let count = 2500;
    let mut broker = OwnBroker::mosquitto();
    let kept = queued_messages_after_kill_9(&mut broker, count).await;
    let lost = count - kept.len();
    println!(
        "mosquitto, autosave_interval {interval} on changes: {lost} of {count} lost to kill -9"
    );
    assert_eq!(kept, (0..1998).collect::<BTreeSet<_>>());
    assert!(lost < interval);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_nats_with_jetstream_keeps_every_queued_qos1_message() {
    let count = 2500;
    let mut broker = OwnBroker::nats();
    let kept = queued_messages_after_kill_9(&mut broker, count).await;
    assert_eq!(kept, (0..count).collect::<BTreeSet<_>>());
}
