//! `entwine device`, `entwine connector` and `entwine up` as three processes, as on a cluster.

use std::process::Stdio;
use std::time::Duration;

use entwine_testing::{eventually, mqtt_address, unique};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `entwine ARGS` in `dir`; answers the child and the first stdout line containing `marker`.
async fn spawn(dir: &std::path::Path, args: &[&str], marker: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(marker) {
                return line;
            }
        }
        panic!("entwine {args:?} ended before printing {marker:?}");
    })
    .await
    .expect("started within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

async fn interrupt(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_connector_and_functions_as_separate_processes_fill_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (host, port) = mqtt_address();
    let id = unique("cli-device");
    // The seed's device_conf.yaml, pointed at the test broker and sped up.
    std::fs::write(
        dir.path().join("device_conf.yaml"),
        format!(
            "deviceId: {id}\ntargetMqttBrokerAddress: {host}\ntargetMqttBrokerPort: {port}\n\
             httpApiPort: 5555\nupdatePeriodMs: 100\nupdateInitialDelayMs: 0\n\
             aggregatedTelemetry: true\naggregatedTelemetryMsgSec: 10\n\
             singleResourceTelemetryEnabled: false\n\
             resourceMap:\n  energy: iot.sensor.energy\n  temperature: iot.sensor.temperature\n"
        ),
    )
    .unwrap();
    let broker = format!("{host}:{port}");
    let (up, line) = spawn(
        dir.path(),
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--devices",
            "0",
            "--no-connector",
            "--broker-url",
            &broker,
        ],
        "functions: ",
    )
    .await;
    let router = line.trim().trim_start_matches("functions: ").to_owned();
    let topic = format!("device/{id}/telemetry/device_state");
    let health = entwine_testing::free_port();
    let (connector, _) = spawn(
        dir.path(),
        &[
            "connector",
            "--broker-url",
            &broker,
            "--topic",
            &topic,
            "--router-url",
            &router,
            "--client-id",
            &unique("cli-connector"),
            "--health-listen",
            &format!("127.0.0.1:{health}"),
        ],
        "connector taking",
    )
    .await;
    // Devices start once the connector is subscribed (its health endpoint says 200): a fresh
    // subscription gets nothing published before it.
    eventually(
        Duration::from_secs(10),
        "the connector subscribed",
        || async {
            reqwest::get(format!("http://127.0.0.1:{health}/healthz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    let (device, line) = spawn(
        dir.path(),
        &["device", "--http-listen", "127.0.0.1:0"],
        "API on ",
    )
    .await;
    assert!(line.starts_with("1 device(s) publishing to"), "{line}");

    let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
    let store = entwine_store::Store::open(&url, &entwine_store::StoreOptions::default()).unwrap();
    let healthz = format!("http://127.0.0.1:{health}/healthz");
    let health = || async {
        let health: serde_json::Value = reqwest::get(&healthz).await.unwrap().json().await.unwrap();
        health
    };
    // A state is evaluated (step three) before its chain completes (step four, then the ack):
    // wait for both counts.
    eventually(
        Duration::from_secs(20),
        "ten evaluated digital states, their chains completed",
        || {
            let store = store.clone();
            async move {
                entwine_testing::scalar(
                    &store,
                    "SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL",
                )
                .await
                    >= 10
                    && health().await["completed"].as_u64().unwrap() >= 10
            }
        },
    )
    .await;
    let health = health().await;
    assert_eq!(health["connected"], true, "{health}");
    interrupt(device).await;
    interrupt(connector).await;
    interrupt(up).await;
}

#[tokio::test]
async fn the_connectors_health_endpoint_cuts_slow_clients_off_and_answers_errors_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, port) = mqtt_address();
    let health = entwine_testing::free_port();
    let closed = entwine_testing::free_port();
    let mut connector = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args([
            "connector",
            "--broker-url",
            &format!("{host}:{port}"),
            "--topic",
            &format!("{}/+/telemetry/device_state", unique("health")),
            "--router-url",
            &format!("127.0.0.1:{closed}"),
            "--client-id",
            &unique("health-connector"),
            "--health-listen",
            &format!("127.0.0.1:{health}"),
        ])
        .env("RUST_LOG", "warn")
        .env("ENTWINE_HTTP_HEADER_READ_TIMEOUT", "0.5")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{health}");
    eventually(
        Duration::from_secs(20),
        "the health endpoint up",
        || async { tokio::net::TcpStream::connect(&address).await.is_ok() },
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    let start = std::time::Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("closed by the header timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer");
    let lifetime = start.elapsed();
    assert!(
        lifetime >= Duration::from_millis(450) && lifetime < Duration::from_millis(2_000),
        "closed after {lifetime:?}"
    );
    let http = reqwest::Client::new();
    for (method, path, status, error) in [
        (
            "POST",
            "/healthz",
            405,
            "POST is not allowed on /healthz; allowed: GET,HEAD",
        ),
        ("GET", "/nowhere", 404, "not found"),
    ] {
        let answer = http
            .request(method.parse().unwrap(), format!("http://{address}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{method} {path}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({ "error": error }),
            "{method} {path}"
        );
    }
    let pid = connector.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), connector.wait())
        .await
        .expect("stops within 20 s of SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn the_connectors_max_batch_comes_from_the_flag_or_entwine_max_batch_and_zero_is_refused() {
    let (host, port) = mqtt_address();
    let broker = format!("{host}:{port}");
    let topic = format!("{}/+/telemetry/device_state", unique("batch"));
    let closed = format!("127.0.0.1:{}", entwine_testing::free_port());
    let connector = |extra: &[&str], env: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_entwine"));
        command
            .args(["connector", "--broker-url", &broker, "--topic", &topic])
            .args([
                "--router-url",
                &closed,
                "--client-id",
                &unique("batch-connector"),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("ENTWINE_MAX_BATCH")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(value) = env {
            command.env("ENTWINE_MAX_BATCH", value);
        }
        command
    };

    // Refused when the flags are parsed, naming the flag, whether from the flag or the variable.
    for (extra, env) in [(&["--max-batch", "0"][..], None), (&[][..], Some("0"))] {
        let out = connector(extra, env).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?} {env:?}: {stderr}");
        assert!(
            stderr.starts_with(
                "error: invalid value '0' for '--max-batch <N>': a batch holds at least 1 event"
            ),
            "{extra:?} {env:?}: {stderr}"
        );
    }

    // Taken, and printed: the flag over the variable, the variable over the default.
    for (extra, env, phrase) in [
        (&[][..], None, "up to 64 events per call)"),
        (&[][..], Some("1"), "one event per call)"),
        (
            &["--max-batch", "8"][..],
            Some("1"),
            "up to 8 events per call)",
        ),
    ] {
        let mut child = connector(extra, env).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the connector prints its settings")
            .unwrap()
            .unwrap();
        assert!(line.starts_with("connector taking "), "{line}");
        assert!(line.ends_with(phrase), "{extra:?} {env:?}: {line}");
        // It printed before installing its signal handler: stopped, not interrupted (how it
        // stops is the test above's).
        child.kill().await.unwrap();
    }
}
