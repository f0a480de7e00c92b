//! The brokers entwine ships, as configured: message size limits, what a crash loses, and who
//! may connect, publish and read.
//!
//! The tests start their own brokers (Mosquitto with the configuration of
//! `deploy/k8s/40-mosquitto.yaml`, NATS with JetStream and its MQTT listener) on free ports with
//! a temporary data directory, and remove both when they end, failed or not. The shipped
//! Mosquitto refuses anonymous clients and applies the ACL of its ConfigMap: the test's
//! Mosquitto reads the same ACL and a password file the test writes with `mosquitto_passwd`
//! (users `entwine-connector`, `entwine-functions` and the devices `dev-a`, `dev-b`). Its TLS
//! listener (8883, the cluster's certificates from a Secret) listens on a second free port with
//! a CA and a certificate the test makes with `openssl`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use entwine_platform::broker::MAX_MESSAGE_BYTES;
use entwine_testing::{free_port, unique};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};

/// What the connector accepts: 1 MiB packets.
const CONNECTOR_INCOMING: usize = 1024 * 1024;

/// The connector's user in the shipped ACL: reads every device's telemetry.
const CONNECTOR: &str = "entwine-connector";
/// The Fission functions' user in the shipped ACL: writes digital events.
const FUNCTIONS: &str = "entwine-functions";
/// Two devices (username = device id).
const DEVICE_A: &str = "dev-a";
const DEVICE_B: &str = "dev-b";

/// The password the test's Mosquitto knows for `user`.
fn password(user: &str) -> String {
    format!("{user}-test-password")
}

/// A key of the `physical-broker` ConfigMap.
fn shipped_broker_file(key: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/40-mosquitto.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(document).unwrap();
        if value["kind"] == "ConfigMap" && value["metadata"]["name"] == "physical-broker" {
            return value["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in the physical-broker ConfigMap"))
                .to_owned();
        }
    }
    panic!("no physical-broker ConfigMap in {}", path.display());
}

/// The shipped `mosquitto.conf`, from the `physical-broker` ConfigMap.
fn shipped_mosquitto_conf() -> String {
    shipped_broker_file("mosquitto.conf")
}

/// A mosquitto_passwd file of `users`, each with [`password`].
fn write_password_file(path: &Path, users: &[&str]) {
    for (i, user) in users.iter().enumerate() {
        let mut command = Command::new("/usr/bin/mosquitto_passwd");
        command.arg("-b");
        if i == 0 {
            command.arg("-c");
        }
        let status = command
            .arg(path)
            .arg(user)
            .arg(password(user))
            .stdin(Stdio::null())
            .status()
            .expect("mosquitto_passwd (Debian package mosquitto)");
        assert!(status.success(), "mosquitto_passwd for {user}: {status}");
    }
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

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA of its own and a certificate it issued for 127.0.0.1 and localhost, in `dir`:
/// `<name>-ca.crt`, `<name>.crt`, `<name>.key`. Answers the CA certificate's path.
fn issue_certificate(dir: &Path, name: &str) -> std::path::PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let subject = format!("/CN={name} test CA");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-days", "2", "-subj", &subject, "-keyout", &ca_key, "-out", &ca,
    ]);
    openssl(dir, &args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr]);
    openssl(dir, &args);
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &cert,
        ],
    );
    dir.join(ca)
}

/// A broker process of the test's own, killed and removed (with its data) on drop.
struct OwnBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    program: &'static str,
    port: u16,
    /// Whether clients must log in ([`password`]).
    authenticated: bool,
    /// The TLS listener's port and the CA that issued its certificate (Mosquitto only).
    tls: Option<(u16, std::path::PathBuf)>,
}

impl OwnBroker {
    /// Mosquitto with the shipped configuration, listening on a free loopback port and saving
    /// to a temporary directory instead of the volume; its password file and ACL are files of
    /// that directory (the test's users, the shipped ACL); the TLS listener on a second free
    /// port, with a certificate of the test's own CA.
    fn mosquitto() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root runs as the `mosquitto` user, which must write here.
        let mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap()
        };
        mode(dir.path(), 0o777);
        let passwd = dir.path().join("passwd");
        write_password_file(&passwd, &[CONNECTOR, FUNCTIONS, DEVICE_A, DEVICE_B]);
        let acl = dir.path().join("acl");
        std::fs::write(&acl, shipped_broker_file("acl")).unwrap();
        let ca = issue_certificate(dir.path(), "broker");
        let (cert, key) = (dir.path().join("broker.crt"), dir.path().join("broker.key"));
        for file in [&passwd, &acl, &ca, &cert, &key] {
            mode(file, 0o644);
        }
        let port = free_port();
        let tls_port = free_port();
        let conf: String = shipped_mosquitto_conf()
            .lines()
            .map(|line| {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("listener") => match words.next() {
                        Some("1883") => format!("listener {port} 127.0.0.1"),
                        Some("8883") => format!("listener {tls_port} 127.0.0.1"),
                        other => panic!("a listener the test does not know: {other:?}"),
                    },
                    Some("certfile") => format!("certfile {}", cert.display()),
                    Some("keyfile") => format!("keyfile {}", key.display()),
                    Some("cafile") => format!("cafile {}", ca.display()),
                    Some("password_file") => format!("password_file {}", passwd.display()),
                    Some("acl_file") => format!("acl_file {}", acl.display()),
                    Some("persistence_location") => {
                        format!("persistence_location {}/", dir.path().display())
                    }
                    _ => line.to_owned(),
                }
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
            authenticated: true,
            tls: Some((tls_port, ca)),
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
            authenticated: false,
            tls: None,
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

    /// Client options that log in as `user` where the broker wants a login.
    fn options_as(&self, user: &str, client_id: &str) -> MqttOptions {
        options_as(user, client_id, self.port, self.authenticated)
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

/// [`options`] logging in as `user` (with [`password`]) when `authenticated`.
fn options_as(user: &str, client_id: &str, port: u16, authenticated: bool) -> MqttOptions {
    let mut options = options(client_id, port);
    if authenticated {
        options.set_credentials(user, password(user));
    }
    options
}

/// The telemetry topic of `device`, which only it may publish on.
fn telemetry(device: &str) -> String {
    format!("device/{device}/telemetry/device_state")
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
/// `authenticated`: the clients log in (a device publishes, the connector subscribes).
async fn an_oversized_message_is_refused_and_the_next_one_flows(
    port: u16,
    same_connection: bool,
    authenticated: bool,
) {
    let topic = telemetry(DEVICE_A);
    let login = |user, prefix| options_as(user, &unique(prefix), port, authenticated);
    let (sub, mut sub_loop) = connect(login(CONNECTOR, "size-sub")).await.unwrap();
    subscribe(&sub, &mut sub_loop, &topic).await;

    let oversized = vec![b'x'; 300 * 1024];
    assert!(oversized.len() > MAX_MESSAGE_BYTES);
    let (publisher, mut pub_loop) = connect(login(DEVICE_A, "size-pub")).await.unwrap();
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
        let (publisher, mut pub_loop) = connect(login(DEVICE_A, "size-pub")).await.unwrap();
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
    let address = entwine_platform::broker::start(
        "127.0.0.1:0".parse().unwrap(),
        &entwine_mqtt::MqttSecurity::none(),
        None,
    )
    .await
    .unwrap();
    an_oversized_message_is_refused_and_the_next_one_flows(address.port(), false, false).await;
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
        connect_when_up(broker.options_as(CONNECTOR, &unique("probe")), &broker).await;
    disconnect(client, eventloop).await;
    an_oversized_message_is_refused_and_the_next_one_flows(broker.port, true, true).await;
}

/// A persistent QoS 1 session subscribes and goes away; `count` messages are published and
/// acknowledged by the broker; the broker is killed -9 and started again; the session comes back.
/// Answers which of the messages (their numbers) it was given.
async fn queued_messages_after_kill_9(broker: &mut OwnBroker, count: usize) -> BTreeSet<usize> {
    let topic = telemetry(DEVICE_A);
    let session = unique("crash-session");
    let mut session_options = broker.options_as(CONNECTOR, &session);
    session_options.set_clean_session(false);
    let (client, mut eventloop) = connect_when_up(session_options.clone(), broker).await;
    subscribe(&client, &mut eventloop, &topic).await;
    disconnect(client, eventloop).await;

    let (publisher, mut pub_loop) = connect(broker.options_as(DEVICE_A, &unique("crash-pub")))
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
        connect_when_up(broker.options_as(DEVICE_A, &unique("crash-pub")), broker).await;
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

/// Answers whether a publish arrives on `eventloop` within `within`.
async fn anything_within(eventloop: &mut EventLoop, within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Err(_) => return None,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p.payload.to_vec()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the connection holds: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_acl_keeps_a_device_to_its_own_topics() {
    let broker = OwnBroker::mosquitto();
    // The connector's own subscription (its share group), as the connector user.
    let (connector, mut connector_loop) = connect_when_up(
        broker.options_as(CONNECTOR, &unique("acl-connector")),
        &broker,
    )
    .await;
    subscribe(
        &connector,
        &mut connector_loop,
        "$share/entwine/device/+/telemetry/device_state",
    )
    .await;
    // Another device trying to read everything (Mosquitto acknowledges the subscription and
    // delivers nothing the ACL does not let it read).
    let (snoop, mut snoop_loop) = connect(broker.options_as(DEVICE_B, &unique("acl-snoop")))
        .await
        .unwrap();
    subscribe(&snoop, &mut snoop_loop, "#").await;

    let (device, mut device_loop) = connect(broker.options_as(DEVICE_A, &unique("acl-dev-a")))
        .await
        .unwrap();
    // MQTT 3.1.1 has no way to refuse a publish: Mosquitto acknowledges it and drops it.
    let spoofed = b"{\"spoofed\": \"dev-b\"}".to_vec();
    publish_all(&device, &mut device_loop, &telemetry(DEVICE_B), [spoofed]).await;
    let own = b"{\"own\": \"dev-a\"}".to_vec();
    publish_all(
        &device,
        &mut device_loop,
        &telemetry(DEVICE_A),
        [own.clone()],
    )
    .await;

    // Same publisher, QoS 1, in order: had the spoofed message been delivered, it came first.
    let before = receive_until(&mut connector_loop, &own, Duration::from_secs(10)).await;
    assert_eq!(
        before.len(),
        0,
        "dev-a's message on dev-b's topic never reaches the connector"
    );
    assert_eq!(
        anything_within(&mut snoop_loop, Duration::from_millis(500)).await,
        None,
        "a device subscribed to # reads nothing"
    );
    disconnect(device, device_loop).await;
    disconnect(snoop, snoop_loop).await;
    disconnect(connector, connector_loop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_refuses_anonymous_and_wrong_password_clients() {
    let broker = OwnBroker::mosquitto();
    let (client, eventloop) =
        connect_when_up(broker.options_as(CONNECTOR, &unique("auth-ok")), &broker).await;
    disconnect(client, eventloop).await;

    let refused =
        |result: Result<(AsyncClient, EventLoop), ConnectionError>, what: &str| match result {
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            )) => {}
            Err(e) => panic!("{what}: refused for another reason: {e:?}"),
            Ok(_) => panic!("{what}: accepted"),
        };
    let within = Duration::from_secs(10);
    let anonymous = options(&unique("auth-anonymous"), broker.port);
    refused(
        tokio::time::timeout(within, connect(anonymous))
            .await
            .unwrap(),
        "anonymous",
    );
    let mut wrong = options(&unique("auth-wrong"), broker.port);
    wrong.set_credentials(DEVICE_A, "not-the-password");
    refused(
        tokio::time::timeout(within, connect(wrong)).await.unwrap(),
        "wrong password",
    );
    // A device presenting another user's password.
    let mut other = options(&unique("auth-other"), broker.port);
    other.set_credentials(DEVICE_A, password(CONNECTOR));
    refused(
        tokio::time::timeout(within, connect(other)).await.unwrap(),
        "another user's password",
    );
    let mut unknown = options(&unique("auth-unknown"), broker.port);
    unknown.set_credentials("nobody", password("nobody"));
    refused(
        tokio::time::timeout(within, connect(unknown))
            .await
            .unwrap(),
        "unknown user",
    );
}

/// Options for the TLS listener of `broker`, as `user`, verifying it with `ca_file`.
fn tls_options(broker: &OwnBroker, user: &str, password: String, ca_file: &Path) -> MqttOptions {
    let (tls_port, _) = broker.tls.as_ref().expect("a TLS listener");
    let mut options = options(&unique("tls"), *tls_port);
    let security = entwine_mqtt::MqttSecurity {
        credentials: Some(entwine_mqtt::Credentials {
            username: user.to_owned(),
            password: password.into(),
        }),
        tls: Some(entwine_mqtt::TlsFiles {
            ca_file: Some(ca_file.to_owned()),
            client: None,
        }),
    };
    security
        .prepare(false)
        .expect("TLS files")
        .apply(&mut options);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_tls_listener_takes_the_same_logins_and_acl() {
    let broker = OwnBroker::mosquitto();
    let ca = broker.tls.as_ref().unwrap().1.clone();
    // The connector on the plain listener, a device over TLS (verifying the broker by its CA).
    let (connector, mut connector_loop) = connect_when_up(
        broker.options_as(CONNECTOR, &unique("tls-connector")),
        &broker,
    )
    .await;
    subscribe(&connector, &mut connector_loop, "device/+/telemetry/#").await;
    let (device, mut device_loop) = connect_when_up(
        tls_options(&broker, DEVICE_A, password(DEVICE_A), &ca),
        &broker,
    )
    .await;
    let spoofed = b"{\"spoofed\": \"dev-b\"}".to_vec();
    publish_all(&device, &mut device_loop, &telemetry(DEVICE_B), [spoofed]).await;
    let own = b"{\"over\": \"tls\"}".to_vec();
    publish_all(
        &device,
        &mut device_loop,
        &telemetry(DEVICE_A),
        [own.clone()],
    )
    .await;
    let before = receive_until(&mut connector_loop, &own, Duration::from_secs(10)).await;
    assert_eq!(before.len(), 0, "the ACL holds over TLS too");
    disconnect(device, device_loop).await;
    disconnect(connector, connector_loop).await;

    let within = Duration::from_secs(10);
    // A wrong password over TLS: refused by the broker, after the handshake.
    let wrong = tls_options(&broker, DEVICE_A, "not-the-password".into(), &ca);
    match tokio::time::timeout(within, connect(wrong)).await.unwrap() {
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        )) => {}
        Err(e) => panic!("wrong password over TLS: refused for another reason: {e:?}"),
        Ok(_) => panic!("wrong password over TLS: accepted"),
    }
    // A client that trusts another CA does not accept the broker's certificate.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = issue_certificate(other_dir.path(), "other");
    let untrusting = tls_options(&broker, DEVICE_A, password(DEVICE_A), &other_ca);
    match tokio::time::timeout(within, connect(untrusting))
        .await
        .unwrap()
    {
        Err(ConnectionError::Tls(_)) => {}
        Err(e) => panic!("untrusted certificate: another error: {e:?}"),
        Ok(_) => panic!("a broker certificate of an unknown CA was accepted"),
    }
}
