//! Outages of the services under the chain, mid-stream: PostgreSQL crashing, its password
//! rotated, Mosquitto restarted. Each test that breaks a service starts its own instance of it
//! on a free loopback port (a PostgreSQL cluster, a Mosquitto process) and removes it when it
//! ends, failed or not; the shared services are only used where nothing breaks them.
//!
//! The devices are plain QoS 1 publishers that send one message at a time and wait for its
//! PUBACK, sending it again on a new connection when the broker went away before answering: so
//! the test knows exactly which messages the broker acknowledged, and every one of them must be
//! stored exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use entwine_functions::handlers::{SystemClock, TwinFunctions};
use entwine_store::{Store, StoreError, StoreOptions};
use entwine_testing::{eventually, free_port, mqtt_address, unique, PgCluster};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Devices per test, messages per device, and the pace of each device.
const DEVICES: usize = 4;
const MESSAGES_PER_DEVICE: usize = 60;
const PERIOD: Duration = Duration::from_millis(100);

/// How long everything may take to be stored once the outage is over.
const CATCH_UP: Duration = Duration::from_secs(90);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The functions over HTTP on any store (the support's `serve_functions_on` takes a
/// `TestStore`, on the shared PostgreSQL).
pub(crate) struct StoreFunctions {
    pub(crate) url: String,
    stop: CancellationToken,
}

pub(crate) async fn serve_functions_on_store(store: Store) -> StoreFunctions {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let functions = Arc::new(TwinFunctions::new(
        store,
        fast_odte(),
        Arc::new(SystemClock),
    ));
    let router = entwine_functions::http::router(functions);
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .unwrap();
    });
    StoreFunctions { url, stop }
}

impl Drop for StoreFunctions {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn telemetry_topic(root: &str, device: &str) -> String {
    format!("{root}/{device}/telemetry/device_state")
}

/// Publishes one message and waits for its PUBACK on this connection; `false` when the
/// connection failed first (or gave no PUBACK within 5 s).
async fn publish_once(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    payload: &str,
) -> bool {
    if client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
        .await
        .is_err()
    {
        return false;
    }
    let acked = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked)
        .await
        .unwrap_or(false)
}

/// One device: `count` telemetry messages to the broker at `port`, one every `period`. Each is
/// QoS 1 and the next is sent only once the broker acknowledged it; when the connection drops
/// first, the same message is sent again on a new connection (the broker may then hold it
/// twice: the functions must absorb that) until it is acknowledged. Answers the
/// `(device id, device timestamp)` of every message, all acknowledged by the broker.
async fn device(port: u16, root: String, device: String, count: usize) -> Vec<(String, i64)> {
    let topic = telemetry_topic(&root, &device);
    let mut acknowledged = Vec::with_capacity(count);
    let mut connection: Option<(AsyncClient, EventLoop)> = None;
    let mut ticker = tokio::time::interval(PERIOD);
    let mut last = 0;
    for i in 0..count {
        ticker.tick().await;
        let timestamp = now_ms().max(last + 1);
        last = timestamp;
        let payload = json!({
            "timestamp": timestamp,
            "type": "iot.sensor.state.aggregated",
            "data": {"iot.sensor.energy": 3.0 + i as f64, "iot.sensor.temperature": 26.5},
        })
        .to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (client, eventloop) = connection.get_or_insert_with(|| {
                let options = MqttOptions::new(unique(&device), "127.0.0.1", port);
                AsyncClient::new(options, 10)
            });
            if publish_once(client, eventloop, &topic, &payload).await {
                break;
            }
            // A new connection (clean session) for the same message: nothing else in flight.
            connection = None;
            assert!(
                Instant::now() < deadline,
                "{device}: message {i} not acknowledged by the broker within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acknowledged.push((device.clone(), timestamp));
    }
    acknowledged
}

/// Starts `DEVICES` devices under `root` publishing to the broker at `port`.
fn start_devices(port: u16, root: &str) -> Vec<JoinHandle<Vec<(String, i64)>>> {
    (1..=DEVICES)
        .map(|i| {
            tokio::spawn(device(
                port,
                root.to_owned(),
                format!("{root}-press-{i}"),
                MESSAGES_PER_DEVICE,
            ))
        })
        .collect()
}

/// Waits for every device to have sent all its messages; answers them.
async fn acknowledged(devices: Vec<JoinHandle<Vec<(String, i64)>>>) -> BTreeSet<(String, i64)> {
    let mut all = BTreeSet::new();
    for device in devices {
        all.extend(device.await.expect("a device task panicked"));
    }
    assert_eq!(all.len(), DEVICES * MESSAGES_PER_DEVICE);
    all
}

async fn wait_until_evaluated(store: &Store, at_least: usize, within: Duration, what: &str) {
    eventually(within, what, || {
        let store = store.clone();
        async move { physical_count(&store).await as usize >= at_least }
    })
    .await;
}

/// Waits until the connector's `retries` counter exceeds `before` by `more`.
async fn wait_for_retries(connector: &Connector, before: u64, more: u64, what: &str) {
    let stats = connector.stats.clone();
    eventually(Duration::from_secs(15), what, || {
        let stats = stats.clone();
        async move { stats.retries.load(Ordering::Relaxed) >= before + more }
    })
    .await;
}

/// Every acknowledged message stored once and evaluated, nothing else stored, and nothing
/// dead-lettered (the connector's counter and the dead-letter table).
async fn assert_all_stored_once_and_nothing_dead_lettered(
    store: &Store,
    connector: &Connector,
    published: &BTreeSet<(String, i64)>,
) {
    wait_until_evaluated(
        store,
        published.len(),
        CATCH_UP,
        "every acknowledged message stored and evaluated",
    )
    .await;
    assert_exactly_once(store, published).await;
    assert_eq!(
        entwine_testing::scalar(store, "SELECT COUNT(*) FROM physicalstate").await,
        published.len() as i64
    );
    assert_eq!(
        entwine_testing::scalar(
            store,
            "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, device_timestamp FROM physicalstate) d"
        )
        .await,
        published.len() as i64
    );
    assert_eq!(connector.stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(store.dead_letter_count().await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashing_mid_stream_loses_and_duplicates_nothing() {
    let cluster = PgCluster::start().await;
    let store = Store::postgres(cluster.options(), &StoreOptions::default());
    store.migrate().await.unwrap();
    let functions = serve_functions_on_store(store.clone()).await;
    let root = unique("pgcrash");
    let connector = start_connector(connector_config(
        &functions.url,
        vec![format!("{root}/+/telemetry/device_state")],
        &unique("connector"),
    ))
    .await;
    let devices = start_devices(mqtt_address().1, &root);
    wait_until_evaluated(
        &store,
        20,
        Duration::from_secs(30),
        "the stream flowing before the crash",
    )
    .await;

    let before = connector.stats.retries.load(Ordering::Relaxed);
    let stored_at_crash = physical_count(&store).await as usize;
    cluster.crash().await;
    // Calls fail (503: connection refused, then the pool's acquire timeout) and are retried.
    wait_for_retries(
        &connector,
        before,
        3,
        "calls retried while PostgreSQL is down",
    )
    .await;
    // The outage lasts for three more retries (each after a longer backoff).
    wait_for_retries(
        &connector,
        before,
        6,
        "calls retried for a while with PostgreSQL down",
    )
    .await;
    cluster.restart_after_crash().await;

    let published = acknowledged(devices).await;
    assert!(
        stored_at_crash < published.len(),
        "PostgreSQL crashed mid-stream: {stored_at_crash} of {} stored before",
        published.len()
    );
    assert_all_stored_once_and_nothing_dead_lettered(&store, &connector, &published).await;
    connector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_rotation_mid_stream_makes_messages_wait_not_dead_letter() {
    let cluster = PgCluster::start().await;
    cluster
        .execute("CREATE ROLE entwine_fn LOGIN PASSWORD 'before-rotation'")
        .await;
    cluster
        .execute("CREATE DATABASE entwine OWNER entwine_fn")
        .await;
    // The functions' store connects over TCP (scram-sha-256) as their own role; the test reads
    // and administers as the superuser, whose password does not change.
    let credentials = cluster
        .options()
        .username("entwine_fn")
        .password("before-rotation")
        .database("entwine");
    let store = Store::postgres(credentials.clone(), &StoreOptions::default());
    store.migrate().await.unwrap();
    let admin = Store::postgres(
        cluster.options().database("entwine"),
        &StoreOptions::default(),
    );
    let functions = serve_functions_on_store(store.clone()).await;
    let root = unique("rotation");
    let connector = start_connector(connector_config(
        &functions.url,
        vec![format!("{root}/+/telemetry/device_state")],
        &unique("connector"),
    ))
    .await;
    let devices = start_devices(mqtt_address().1, &root);
    wait_until_evaluated(
        &admin,
        20,
        Duration::from_secs(30),
        "the stream flowing before the rotation",
    )
    .await;

    // The password changes and the role's sessions are ended: every new connection of the
    // functions is refused with 28P01. Terminate until none is left (one may have been opening
    // while the first pass ran).
    entwine_testing::execute(&admin, "ALTER ROLE entwine_fn PASSWORD 'after-rotation'").await;
    let sessions = "SELECT COUNT(*) FROM pg_stat_activity WHERE usename = 'entwine_fn'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while entwine_testing::scalar(&admin, sessions).await > 0 {
        entwine_testing::execute(
            &admin,
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
             WHERE usename = 'entwine_fn'",
        )
        .await;
        assert!(Instant::now() < deadline, "the role's sessions did not end");
    }
    let before = connector.stats.retries.load(Ordering::Relaxed);
    let stored_before = physical_count(&admin).await;

    // The store says why: unavailable (the operator's to fix), SQLSTATE 28P01.
    let error = Store::postgres(credentials.clone(), &StoreOptions::default())
        .ping()
        .await
        .expect_err("the old password is refused");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert_eq!(error.reason(), "28P01");
    // The functions answer 503 (retry later), not 4xx or 500 (which would dead-letter).
    let probe = reqwest::Client::new()
        .post(format!("{}/physicalevents", functions.url))
        .json(&json!({
            "device_id": format!("{root}-probe"),
            "timestamp": now_ms(),
            "type": "iot.sensor.state.aggregated",
            "data": {"iot.sensor.energy": 1.0, "iot.sensor.temperature": 20.0},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = probe.json().await.unwrap();
    assert_eq!(body["error"], "store unavailable");
    // The connector's calls get the same answer and are retried.
    wait_for_retries(
        &connector,
        before,
        3,
        "calls retried while the password is wrong",
    )
    .await;
    wait_for_retries(
        &connector,
        before,
        6,
        "calls retried for a while with the wrong password",
    )
    .await;
    assert_eq!(
        physical_count(&admin).await,
        stored_before,
        "nothing is written while the functions' password is wrong"
    );
    assert_eq!(connector.stats.dead_lettered.load(Ordering::Relaxed), 0);

    // The store's options hold the old password: setting it back ends the outage.
    entwine_testing::execute(&admin, "ALTER ROLE entwine_fn PASSWORD 'before-rotation'").await;
    let published = acknowledged(devices).await;
    assert_all_stored_once_and_nothing_dead_lettered(&admin, &connector, &published).await;
    connector.stop().await;
    store.close().await;
    admin.close().await;
}

/// A Mosquitto process of the test's own with the shipped configuration
/// (`deploy/k8s/40-mosquitto.yaml`: persistence, autosave every 1,000 changes), on a free
/// loopback port, saving to a directory of its own; killed and removed on drop.
struct OwnMosquitto {
    child: Option<tokio::process::Child>,
    dir: PathBuf,
    port: u16,
}

/// The shipped `mosquitto.conf`: the `physical-broker` ConfigMap's block.
fn shipped_mosquitto_conf() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/40-mosquitto.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .skip_while(|line| line.trim() != "mosquitto.conf: |")
        .skip(1)
        .take_while(|line| line.starts_with("    "))
        .map(|line| line.trim().to_owned())
        .collect();
    for key in ["persistence true", "autosave_on_changes true"] {
        assert!(
            lines.iter().any(|l| l == key),
            "{key} in {}",
            path.display()
        );
    }
    lines
}

impl OwnMosquitto {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("entwine-mosquitto"));
        std::fs::create_dir(&dir).unwrap();
        // Mosquitto started as root runs as the `mosquitto` user, which must write here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let port = free_port();
        // Its persistence as shipped; its logins, ACL and TLS listener (files of the pod's
        // Secrets) left out: these tests are about what a restart keeps, and
        // crates/entwine/tests/it/brokers.rs runs the shipped ACL.
        let mut listeners = 0;
        let conf: Vec<String> = shipped_mosquitto_conf()
            .into_iter()
            .filter_map(|line| match line.split_whitespace().next() {
                Some("listener") => {
                    listeners += 1;
                    (listeners == 1).then(|| format!("listener {port} 127.0.0.1"))
                }
                Some("persistence_location") => {
                    Some(format!("persistence_location {}/", dir.display()))
                }
                Some("allow_anonymous") => Some("allow_anonymous true".into()),
                Some("password_file" | "acl_file" | "certfile" | "keyfile" | "cafile")
                | Some("tls_version" | "require_certificate") => None,
                _ => Some(line),
            })
            .collect();
        std::fs::write(dir.join("mosquitto.conf"), conf.join("\n") + "\n").unwrap();
        let mut broker = Self {
            child: None,
            dir,
            port,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let installed = Path::new("/usr/sbin/mosquitto");
        let program = if installed.exists() {
            installed
        } else {
            Path::new("mosquitto")
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .unwrap();
        let child = tokio::process::Command::new(program)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.child = Some(child);
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "Mosquitto not listening on {port} within 15 s; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A clean restart: SIGTERM (Mosquitto saves its state and exits), `down` with nothing
    /// listening, then the same configuration, port and data again.
    async fn restart_cleanly(&mut self, down: Duration) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().expect("not reaped yet");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("Mosquitto exits within 15 s of SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit}; its log:\n{}", self.log());
        assert!(
            self.dir.join("mosquitto.db").exists(),
            "Mosquitto saved its state on SIGTERM; its log:\n{}",
            self.log()
        );
        tokio::time::sleep(down).await;
        self.spawn().await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_stream_loses_no_acknowledged_message_and_duplicates_none() {
    let mut broker = OwnMosquitto::start().await;
    let functions = serve_functions(fast_odte()).await;
    let store = functions.store.store.clone();
    let root = unique("brokerrestart");
    let mut config = connector_config(
        &functions.url,
        vec![format!("{root}/+/telemetry/device_state")],
        &unique("connector"),
    );
    config.broker_host = "127.0.0.1".into();
    config.broker_port = broker.port;
    let connector = start_connector(config).await;
    let devices = start_devices(broker.port, &root);
    wait_until_evaluated(
        &store,
        20,
        Duration::from_secs(30),
        "the stream flowing before the restart",
    )
    .await;

    let errors_before = connector.stats.mqtt_errors.load(Ordering::Relaxed);
    let stored_at_restart = physical_count(&store).await as usize;
    broker.restart_cleanly(Duration::from_secs(2)).await;
    // The connector lost the broker and came back to its session.
    let stats = connector.stats.clone();
    eventually(Duration::from_secs(15), "the connector reconnected", || {
        let stats = stats.clone();
        async move {
            stats.mqtt_errors.load(Ordering::Relaxed) > errors_before
                && stats.connected.load(Ordering::Relaxed)
        }
    })
    .await;

    let published = acknowledged(devices).await;
    assert!(
        stored_at_restart < published.len(),
        "the broker restarted mid-stream: {stored_at_restart} of {} stored before",
        published.len()
    );
    assert_all_stored_once_and_nothing_dead_lettered(&store, &connector, &published).await;
    connector.stop().await;
}
