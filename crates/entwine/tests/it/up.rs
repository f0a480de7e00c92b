//! `entwine up` started as a user starts it, driven over HTTP, stopped with Ctrl-C.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_four_routes_on_a_sqlite_file_and_stops_cleanly_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(["up", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.trim().strip_prefix("functions: ") {
                return url.to_owned();
            }
        }
        panic!("entwine up ended without saying where it listens");
    })
    .await
    .expect("entwine up starts within 30 s");

    let client = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut body = json!({"device_id": "iiot-device-1", "timestamp": now,
        "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": 3.2, "iot.sensor.temperature": 27.1}});
    for route in [
        "/physicalevents",
        "/physicalstates",
        "/pendingdigitalstates",
        "/digitalstates",
    ] {
        let response = client
            .post(format!("{base}{route}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{route}");
        body = response.json::<Value>().await.unwrap();
    }
    assert_eq!(body["lifecycle"], "disentangled");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "entwine stopped"), "{rest:?}");
    assert!(
        dir.path().join("entwine.db").exists(),
        "the default store is ./entwine.db"
    );
}
