//! `entwine up`'s platform as a newcomer runs it: the flags parsed as the binary parses them,
//! the platform started in this process on free ports ([`entwine_platform::Platform`], whose
//! handles give the addresses), watched through its API, stopped as Ctrl-C stops it. One test
//! runs the binary itself, with Ctrl-C.

use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use entwine_platform::{Platform, ShutdownReport};
use entwine_testing::{eventually, free_port, mqtt_address, unique, TestDatabase};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::broadcast;

const DEVICES: usize = 3;

struct Up {
    platform: Platform,
    api: String,
    /// The devices' API (`/conf`, `/faults`), when there are devices.
    devices: Option<String>,
    /// The platform's broker, `host:port`.
    mqtt: String,
    /// The device ids' prefix (unique per test: the metrics recorder is the process's).
    prefix: String,
    /// Lifecycle changes as `entwine up` prints them.
    changes: tokio::task::JoinHandle<Vec<String>>,
}

/// What a stopped platform did and printed.
struct Stopped {
    report: ShutdownReport,
    printed: Vec<String>,
}

/// The flags of `entwine up` with fast devices (5 msg/s) and a 2 s window expecting 5
/// updates/s, on free ports, with `extra` after them.
fn up_flags(dir: &std::path::Path, prefix: &str, extra: &[&str]) -> Vec<String> {
    let database = format!("sqlite://{}", dir.join("entwine.db").display());
    let devices = DEVICES.to_string();
    let defaults = [
        ("--database-url", database.as_str()),
        ("--listen", "127.0.0.1:0"),
        ("--mqtt-listen", "127.0.0.1:0"),
        ("--device-api", "127.0.0.1:0"),
        ("--device-rate", "5"),
        ("--update-period-ms", "200"),
        ("--update-initial-delay-ms", "0"),
        ("--expected-update-rate", "5"),
        ("--time-window", "2"),
        ("--devices", devices.as_str()),
        ("--device-prefix", prefix),
    ];
    let mut args = vec!["entwine".to_owned(), "up".to_owned()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Starts `entwine up`'s platform (see [`up_flags`]).
async fn start_up(dir: &std::path::Path, extra: &[&str]) -> Up {
    start_up_with(dir, extra, |_| {}).await
}

/// As [`start_up`], with the platform's configuration changed by `adjust` before it starts.
async fn start_up_with(
    dir: &std::path::Path,
    extra: &[&str],
    adjust: impl FnOnce(&mut entwine_platform::PlatformConfig),
) -> Up {
    let prefix = extra
        .iter()
        .position(|a| *a == "--device-prefix")
        .map_or_else(|| unique("up"), |i| extra[i + 1].to_owned());
    let cli = entwine::cli::Cli::try_parse_from(up_flags(dir, &prefix, extra)).unwrap();
    let entwine::cli::Command::Up(args) = cli.command else {
        unreachable!("the flags start with `up`")
    };
    let mut config = entwine::local::platform_config(&args).unwrap();
    adjust(&mut config);
    let platform = tokio::time::timeout(Duration::from_secs(30), Platform::start(config))
        .await
        .expect("the platform starts within 30 s")
        .unwrap();
    let changes = tokio::spawn(collect_changes(platform.lifecycle_changes()));
    Up {
        api: format!("http://{}", platform.http_address()),
        devices: platform.device_api().map(|a| format!("http://{a}")),
        mqtt: platform.broker().address(),
        prefix,
        changes,
        platform,
    }
}

/// Every lifecycle change, as `entwine up` prints it, until the platform stops.
async fn collect_changes(
    mut changes: broadcast::Receiver<entwine_store::TwinChange>,
) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        match changes.recv().await {
            Ok(change) => lines.push(entwine::local::lifecycle_line(&change)),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return lines,
        }
    }
}

impl Up {
    /// The id of device `i` (1-based).
    fn device(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    async fn twins(&self) -> Vec<Value> {
        // Fewer twins than a page: the first page holds them all.
        let answer: Value = reqwest::get(format!("{}/api/twins", self.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["next"], Value::Null, "one page");
        answer["items"].as_array().unwrap().clone()
    }

    async fn wait_until_all_entangled(&self) {
        eventually(Duration::from_secs(60), "every twin entangled", || async {
            let twins = self.twins().await;
            twins.len() == DEVICES && twins.iter().all(|t| t["lifecycle"] == "entangled")
        })
        .await;
    }

    /// Stops the platform as Ctrl-C does; answers its report and the lifecycle changes.
    async fn interrupt(self) -> Stopped {
        let report = tokio::time::timeout(Duration::from_secs(20), self.platform.shutdown())
            .await
            .expect("stops within 20 s")
            .unwrap();
        let printed = self.changes.await.unwrap();
        Stopped { report, printed }
    }
}

/// History, live stream and metrics of a running platform.
async fn check_api(up: &Up) {
    let twins = up.twins().await;
    let id = twins[0]["device_id"].as_str().unwrap().to_owned();
    for key in [
        "odte",
        "availability",
        "reliability",
        "timeliness",
        "last_physical_timestamp",
        "last_digital_timestamp",
    ] {
        assert!(
            twins[0].get(key).is_some(),
            "twin lacks {key}: {}",
            twins[0]
        );
    }
    let page: Value = reqwest::get(format!("{}/api/twins/{id}/history?limit=4", up.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let stamps: Vec<i64> = items
        .iter()
        .map(|i| i["timestamp"].as_i64().unwrap())
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {stamps:?}"
    );
    let next: Value = reqwest::get(format!("{}{}", up.api, page["next"].as_str().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(next["items"][0]["timestamp"].as_i64().unwrap() < stamps[3]);

    // The live stream: a digital state of the chosen device arrives as an SSE event.
    let mut stream = reqwest::get(format!("{}/api/stream?device_id={id}", up.api))
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !text.contains("\n\n") || !text.contains("data:") {
            let chunk = stream
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("a digital state within 10 s");
    assert!(text.contains("event: digitalstate"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let state: Value = serde_json::from_str(data).unwrap();
    assert_eq!(state["device_id"], id.as_str());
    assert!(state["odte"].is_number() && state["lifecycle"].is_string());

    let metrics = reqwest::get(format!("{}/metrics", up.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for twin in up.twins().await {
        let line = format!(
            "entwine_twin_odte{{device_id=\"{}\"}}",
            twin["device_id"].as_str().unwrap()
        );
        assert!(metrics.contains(&line), "missing {line}");
    }
    for name in [
        "entwine_function_calls_total{function=\"twin-handler\",outcome=\"ok\"}",
        "entwine_function_duration_seconds_bucket{function=\"physical-event-handler\"",
        "entwine_chain_duration_seconds_bucket",
        "entwine_entanglement_latency_seconds_count",
        "entwine_connector_received_total",
        "entwine_connector_completed_total",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics");
    }
}

async fn one_digital_state_per_physical_state(store: &entwine_store::Store) -> i64 {
    let physical = entwine_testing::scalar(store, "SELECT COUNT(*) FROM physicalstate").await;
    let evaluated = entwine_testing::scalar(
        store,
        "SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL",
    )
    .await;
    let digital = entwine_testing::scalar(store, "SELECT COUNT(*) FROM digitalstate").await;
    assert!(physical > 0);
    assert_eq!(
        (digital, evaluated),
        (physical, physical),
        "one evaluated digital state per physical state"
    );
    physical
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_whole_platform_on_sqlite_and_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(dir.path(), &[]).await;
    up.wait_until_all_entangled().await;
    check_api(&up).await;
    let prefix = up.prefix.clone();
    let stopped = up.interrupt().await;
    assert!(
        stopped
            .printed
            .iter()
            .any(|l| l.starts_with(&format!("twin {prefix}-1: bound → entangled (ODTE"))),
        "lifecycle changes: {:?}",
        stopped.printed
    );

    let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
    let store = entwine_store::Store::open(&url, &entwine_store::StoreOptions::default()).unwrap();
    let first_run = one_digital_state_per_physical_state(&store).await;
    store.close().await;

    // Same file, second run, this time the binary as a newcomer runs it (README), with
    // Ctrl-C: the history continues, and what it printed says so.
    let port = free_port();
    let flags = up_flags(
        dir.path(),
        &prefix,
        &["--listen", &format!("127.0.0.1:{port}")],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(&flags[1..])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let output = {
        let printed = printed.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                printed.lock().unwrap().push(line);
            }
        })
    };
    let api = format!("http://127.0.0.1:{port}");
    // The twins come back from their silence between the runs: each change is printed.
    eventually(
        Duration::from_secs(30),
        "a lifecycle change printed",
        || async {
            printed
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with(&format!("twin {prefix}-1: ")))
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "new states after the restart",
        || async {
            let Ok(answer) =
                reqwest::get(format!("{api}/api/twins/{prefix}-1/history?limit=1000")).await
            else {
                return false;
            };
            let page: Value = answer.json().await.unwrap();
            page["items"].as_array().unwrap().len() as i64 > first_run / DEVICES as i64 + 3
        },
    )
    .await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops within 20 s of SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit code");
    output.await.unwrap();
    let printed = printed.lock().unwrap().clone();
    assert_eq!(printed.first().map(String::as_str), Some("entwine is up"));
    assert!(
        printed
            .iter()
            .any(|l| l.trim() == format!("functions:  {api}")),
        "{printed:?}"
    );
    assert!(
        printed.iter().any(|l| l.starts_with("devices published ")),
        "{printed:?}"
    );
    // Nothing configured: open, on loopback only, and said so.
    assert!(
        printed.iter().any(|l| l.trim()
            == "auth:       none on loopback (set auth.tokens to ask for bearer tokens; docs/SECURITY.md); MQTT without a login"),
        "{printed:?}"
    );
    assert_eq!(printed.last().map(String::as_str), Some("entwine stopped"));
    let store = entwine_store::Store::open(&url, &entwine_store::StoreOptions::default()).unwrap();
    assert!(one_digital_state_per_physical_state(&store).await > first_run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_on_postgresql_and_mosquitto_when_given_them() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (host, port) = mqtt_address();
    let prefix = unique("up");
    let topics: Vec<String> = (1..=DEVICES)
        .map(|i| format!("device/{prefix}-{i}/telemetry/device_state"))
        .collect();
    let (broker, database, client_id) =
        (format!("{host}:{port}"), db.url(), unique("up-connector"));
    let mut extra = vec![
        "--database-url",
        &database,
        "--broker-url",
        &broker,
        "--device-prefix",
        &prefix,
        "--connector-client-id",
        &client_id,
        "--topic",
    ];
    extra.extend(topics.iter().map(String::as_str));
    let up = start_up(dir.path(), &extra).await;
    up.wait_until_all_entangled().await;
    check_api(&up).await;
    up.interrupt().await;
    assert!(
        !dir.path().join("entwine.db").exists(),
        "no SQLite file when PostgreSQL is given"
    );
    one_digital_state_per_physical_state(&db.migrated_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_on_the_embedded_broker_every_message_is_stored_and_ctrl_c_ends_live_streams() {
    // A hundred devices at 5 msg/s: lanes finish out of arrival order all the time, which the
    // embedded broker does not tolerate in acknowledgements; and a live-stream client stays
    // connected through Ctrl-C.
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(dir.path(), &["--devices", "100"]).await;
    let mut stream = reqwest::get(format!("{}/api/stream", up.api))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        stream.chunk().await.unwrap().is_some(),
        "the stream delivers"
    );
    let report = up.interrupt().await.report;
    let published = i64::try_from(report.published).unwrap();
    assert!(published > 1000, "{report:?}");
    assert_eq!(
        (report.completed, report.dead_lettered),
        (report.published, 0),
        "every published message went through"
    );
    let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
    let store = entwine_store::Store::open(&url, &entwine_store::StoreOptions::default()).unwrap();
    assert_eq!(
        one_digital_state_per_physical_state(&store).await,
        published
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silenced_device_disentangles_unbinds_and_entangles_again_when_it_returns() {
    // A 2 s window, unbound after 4 s of silence, the evaluator every 0.25 s.
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
        dir.path(),
        &["--silence-threshold", "4", "--evaluator-period", "0.25"],
    )
    .await;
    up.wait_until_all_entangled().await;
    let devices = up.devices.clone().expect("the devices' API runs");
    let http = reqwest::Client::new();
    let (d1, d2) = (up.device(1), up.device(2));
    let lifecycle = |id: &str| {
        let url = format!("{}/api/twins/{id}", up.api);
        async move {
            let twin: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            twin["lifecycle"].as_str().unwrap().to_owned()
        }
    };
    // Device 2 falls silent: every one of its messages lost at the device.
    let silenced = http
        .put(format!("{devices}/faults"))
        .json(&serde_json::json!({"device": up.device(2), "loss": 1.0}))
        .send()
        .await
        .unwrap();
    assert!(silenced.status().is_success(), "{silenced:?}");
    let silent_since = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "the silent twin disentangled",
        || async { lifecycle(&d2).await == "disentangled" },
    )
    .await;
    assert!(
        silent_since.elapsed() <= Duration::from_millis(2_000 + 1_500),
        "disentangled within one 2 s window (and the evaluator's period, and this test's polling)"
    );
    eventually(
        Duration::from_secs(10),
        "the silent twin unbound",
        || async { lifecycle(&d2).await == "unbound" },
    )
    .await;
    // Its last message may have left up to 0.2 s before the fault was switched on.
    assert!(
        silent_since.elapsed() >= Duration::from_millis(3_500),
        "not before the 4 s threshold"
    );
    assert_eq!(lifecycle(&d1).await, "entangled", "the others carry on");
    // It returns.
    let cleared = http
        .delete(format!("{devices}/faults"))
        .send()
        .await
        .unwrap();
    assert!(cleared.status().is_success(), "{cleared:?}");
    eventually(
        Duration::from_secs(15),
        "the twin entangled again",
        || async { lifecycle(&d2).await == "entangled" },
    )
    .await;
    let silent = up.device(2);
    let printed = up.interrupt().await.printed;
    for change in [
        "entangled → disentangled",
        "disentangled → unbound",
        "unbound → bound",
        "bound → entangled",
    ] {
        let change = format!("twin {silent}: {change}");
        assert!(
            printed.iter().any(|l| l.starts_with(&change)),
            "no {change:?} in {printed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_twins_series_leave_metrics_after_the_silence_threshold_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
        dir.path(),
        &["--silence-threshold", "4", "--evaluator-period", "0.25"],
    )
    .await;
    up.wait_until_all_entangled().await;
    let metrics = || async {
        reqwest::get(format!("{}/metrics", up.api))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let odte = |id: &str| format!("entwine_twin_odte{{device_id=\"{id}\"}} ");
    let entangled = |id: &str| format!("entwine_twin_entangled{{device_id=\"{id}\"}} ");
    let text = metrics().await;
    for i in 1..=DEVICES {
        let id = up.device(i);
        assert!(text.contains(&odte(&id)), "{id} in {text}");
        assert!(text.contains(&entangled(&id)), "{id} in {text}");
    }
    let devices = up.devices.clone().expect("the devices' API runs");
    let http = reqwest::Client::new();
    let silenced = http
        .put(format!("{devices}/faults"))
        .json(&serde_json::json!({"device": up.device(2), "loss": 1.0}))
        .send()
        .await
        .unwrap();
    assert!(silenced.status().is_success(), "{silenced:?}");
    let silent_since = std::time::Instant::now();
    // The evaluator disentangles it within one window, and /metrics says so …
    eventually(
        Duration::from_secs(10),
        "the silent twin shown not entangled in /metrics",
        || async {
            metrics()
                .await
                .contains(&format!("{}0\n", entangled(&up.device(2))))
        },
    )
    .await;
    // … then, the silence threshold after its last gauge update, its series go.
    eventually(
        Duration::from_secs(15),
        "the silent twin's series gone from /metrics",
        || async {
            let text = metrics().await;
            !text.contains(&odte(&up.device(2))) && !text.contains(&entangled(&up.device(2)))
        },
    )
    .await;
    // Its last state may have left up to 0.2 s before the fault was switched on.
    assert!(
        silent_since.elapsed() >= Duration::from_millis(3_500),
        "not before the 4 s threshold: {:?}",
        silent_since.elapsed()
    );
    let text = metrics().await;
    for id in [up.device(1), up.device(3)] {
        assert!(
            text.contains(&format!("{}1\n", entangled(&id))),
            "{id} still entangled in {text}"
        );
    }
    let cleared = http
        .delete(format!("{devices}/faults"))
        .send()
        .await
        .unwrap();
    assert!(cleared.status().is_success(), "{cleared:?}");
    eventually(
        Duration::from_secs(15),
        "the returning twin's series back",
        || async { metrics().await.contains(&odte(&up.device(2))) },
    )
    .await;
    up.interrupt().await;
}

#[tokio::test]
async fn out_of_range_periods_and_durations_are_refused_when_the_flags_are_parsed() {
    for (args, says) in [
        (
            &["up", "--evaluator-period", "1e-10"][..],
            "error: invalid value '1e-10' for '--evaluator-period <EVALUATOR_PERIOD>': 1e-10 is outside 0.01..=3600 seconds",
        ),
        (
            &["up", "--evaluator-period", "soon"][..],
            "error: invalid value 'soon' for '--evaluator-period <EVALUATOR_PERIOD>': \"soon\" is not a number of seconds",
        ),
        (
            &["bench", "--duration", "1e300"][..],
            "error: invalid value '1e300' for '--duration <DURATION>': 1e300 is outside 0.1..=604800 seconds",
        ),
        (
            &["bench", "--warmup=-1"][..],
            "error: invalid value '-1' for '--warmup <WARMUP>': -1 is outside 0..=604800 seconds",
        ),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new(env!("CARGO_BIN_EXE_entwine")).args(args).output(),
        )
        .await
        .expect("refused at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().next(), Some(says), "{args:?}");
    }
}

/// Publishes raw payloads to the platform's broker at QoS 1; answers once the broker
/// acknowledged each one it accepted, or closed the connection.
async fn publish_raw(broker: &str, messages: Vec<(String, Vec<u8>)>) {
    let (host, port) = broker.rsplit_once(':').unwrap();
    let mut options = rumqttc::MqttOptions::new(unique("hostile"), host, port.parse().unwrap());
    options.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    let count = messages.len();
    for (topic, payload) in messages {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut acked = 0;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == count {
                        return;
                    }
                }
                Ok(_) => {}
                // The broker refuses an oversized packet by closing the connection.
                Err(_) => return,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_dead_lettered_and_listed_while_every_device_stays_mirrored() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(dir.path(), &[]).await;
    up.wait_until_all_entangled().await;
    let topic = |device: &str| format!("device/{device}/telemetry/device_state");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let event = |t: i64, temperature: f64| {
        serde_json::json!({"timestamp": t, "type": "iot.sensor.state.aggregated",
            "data": {"iot.sensor.energy": 1.0, "iot.sensor.temperature": temperature}})
        .to_string()
        .into_bytes()
    };
    publish_raw(
        &up.mqtt,
        vec![
            // 60 KiB of 0x01: once the message that stopped ingestion for good.
            (topic("hostile-1"), vec![1u8; 60 * 1024]),
            // Two different events with one device timestamp: the second is refused.
            (topic("hostile-2"), event(now, 20.0)),
            (topic("hostile-2"), event(now, 25.0)),
            // Over the functions' limit, under the broker's.
            (topic("hostile-3"), vec![b' '; 100 * 1024]),
        ],
    )
    .await;
    // Over the broker's 256 KiB limit: refused at the door.
    publish_raw(&up.mqtt, vec![(topic("hostile-4"), vec![b'x'; 300 * 1024])]).await;

    let letters: Value = {
        let url = format!("{}/api/deadletters", up.api);
        eventually(Duration::from_secs(20), "three dead letters", || async {
            let page: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            page["total"] == 3
        })
        .await;
        reqwest::get(&url).await.unwrap().json().await.unwrap()
    };
    let items = letters["items"].as_array().unwrap();
    let by_device = |d: &str| {
        items
            .iter()
            .find(|l| l["device_id"] == d)
            .unwrap_or_else(|| panic!("no letter for {d}: {letters}"))
    };
    let binary = by_device("hostile-1");
    assert_eq!(
        (
            &binary["stage"],
            &binary["payload_bytes"],
            &binary["truncated"]
        ),
        (
            &Value::from("payload"),
            &Value::from(61_440),
            &Value::Bool(true)
        )
    );
    let conflict = by_device("hostile-2");
    assert_eq!(conflict["stage"], "physicalevents", "{conflict}");
    assert_eq!(conflict["status"], 409, "{conflict}");
    assert!(
        conflict["error"]
            .as_str()
            .unwrap()
            .starts_with("timestamp: device hostile-2 already sent a different event"),
        "{conflict}"
    );
    assert_eq!(by_device("hostile-3")["payload_bytes"], 100 * 1024);
    // The first event of hostile-2 was stored, once, with its own reading.
    let twin: Value = reqwest::get(format!("{}/api/twins/hostile-2/history", up.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let history = twin["items"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{twin}");
    assert_eq!(history[0]["temperature"], 20.0);
    // Ingestion never stalled: the emulated devices are still mirrored, every one of them.
    let before: Vec<i64> = up
        .twins()
        .await
        .iter()
        .filter(|t| {
            t["device_id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}-", up.prefix))
        })
        .map(|t| t["last_digital_timestamp"].as_i64().unwrap())
        .collect();
    assert_eq!(before.len(), DEVICES);
    eventually(
        Duration::from_secs(20),
        "the devices mirrored again",
        || async {
            let twins = up.twins().await;
            let devices: Vec<&Value> = twins
                .iter()
                .filter(|t| {
                    t["device_id"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{}-", up.prefix))
                })
                .collect();
            devices.iter().zip(&before).all(|(t, b)| {
                t["lifecycle"] == "entangled" && t["last_digital_timestamp"].as_i64().unwrap() > *b
            })
        },
    )
    .await;
    let report = up.interrupt().await.report;
    // Every emulated device message, and the first event of hostile-2, went through.
    assert_eq!(
        (report.completed, report.dead_lettered),
        (report.published + 1, 3),
        "{report:?}"
    );
}

/// Half a request head on a fresh connection; how long until the server closes it.
async fn slow_client_lifetime(address: &str) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let start = std::time::Instant::now();
    stream
        .write_all(b"GET /api/twins HTTP/1.1\r\nHost: slow\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{address} did not close a slow client within 5 s"));
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ups_servers_cut_slow_clients_off_serve_the_others_and_answer_errors_in_json() {
    let dir = tempfile::tempdir().unwrap();
    // As ENTWINE_HTTP_HEADER_READ_TIMEOUT=0.5 would set it (read by `entwine_http::Limits`).
    let up = start_up_with(dir.path(), &["--devices", "1"], |config| {
        config.http_limits.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let api = up.api.trim_start_matches("http://").to_owned();
    let devices = up.devices.clone().expect("the devices' API runs");
    // The server of the functions and the twins API cuts a slow client off. (The devices' API
    // is the same `entwine_http::serve`, with its limits from the environment: tested in
    // entwine-http.)
    let lifetime = slow_client_lifetime(&api).await;
    assert!(
        lifetime >= Duration::from_millis(450) && lifetime < Duration::from_millis(2_000),
        "{api}: closed after {lifetime:?}"
    );
    // 300 slow clients hold sockets; a normal request is answered at once.
    let mut slow = Vec::new();
    for _ in 0..300 {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&api).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    let started = std::time::Instant::now();
    let twins = reqwest::get(format!("{}/api/twins", up.api)).await.unwrap();
    assert_eq!(twins.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "answered in {:?}",
        started.elapsed()
    );
    drop(slow);
    // Errors in JSON: 405 naming the methods, GET /twinevaluations evaluates nothing.
    for (path, allowed) in [
        ("/physicalevents", "POST"),
        ("/twinevaluations", "POST"),
        ("/api/twins", "GET,HEAD"),
    ] {
        let method = if allowed == "POST" { "GET" } else { "DELETE" };
        let answer = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{}{path}", up.api))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 405, "{method} {path}");
        assert_eq!(answer.headers()["allow"], allowed, "{method} {path}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "error": format!("{method} is not allowed on {path}; allowed: {allowed}")
            })
        );
    }
    for (url, status, error) in [
        (
            format!("{}/api/twins/%00", up.api),
            400,
            "id: contains a NUL character",
        ),
        (
            format!("{}/nowhere", up.api),
            404,
            "no function at /nowhere",
        ),
    ] {
        let answer = reqwest::get(&url).await.unwrap();
        assert_eq!(answer.status(), status, "{url}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body, serde_json::json!({ "error": error }), "{url}");
    }
    // The devices' API words its own 404 (its owner's); it is JSON either way.
    let answer = reqwest::get(format!("{devices}/nowhere")).await.unwrap();
    assert_eq!(answer.status(), 404);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    up.interrupt().await;
}

#[tokio::test]
async fn a_listener_beyond_loopback_without_tokens_is_a_usage_error_exit_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
    for command in ["up", "serve"] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(env!("CARGO_BIN_EXE_entwine"))
                .args([command, "--listen", "0.0.0.0:0", "--database-url", &url])
                .env("RUST_LOG", "warn")
                .env_remove("ENTWINE_AUTH__TOKENS")
                .output(),
        )
        .await
        .expect("refused at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ")
                && last.contains(
                    "refusing to listen on 0.0.0.0:0 without authentication: set auth.tokens"
                ),
            "{command}: {stderr}"
        );
    }
}
