//! The function binaries' HTTP server as a hostile client meets it: slow clients, methods the
//! routes do not take, odd paths, a bad `DATABASE_URL`. Real binaries, real PostgreSQL.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use entwine_testing::{free_port, TestDatabase};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::*;

/// `binary` on a free port with `DATABASE_URL` and `env`; waits until it accepts connections.
async fn start(binary: &Path, database_url: &str, env: &[(&str, &str)]) -> (Child, u16) {
    let port = free_port();
    let child = Command::new(binary)
        .env_clear()
        .env("FISSION_RUNTIME_PORT", port.to_string())
        .env("DATABASE_URL", database_url)
        .env("ENTWINE_PODINFO_DIR", "/nonexistent")
        .env("ENTWINE_CONFIG_ROOT", "/nonexistent")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "listening within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, port)
}

/// One request on its own connection; status line, headers (lowercase names) and body.
async fn raw(port: u16, request: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

#[tokio::test]
async fn a_function_binary_cuts_slow_clients_off_and_answers_the_others_at_once() {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let (_child, port) = start(
        Path::new(env!("CARGO_BIN_EXE_physical-event-handler")),
        &db.url(),
        &[("ENTWINE_HTTP_HEADER_READ_TIMEOUT", "0.5")],
    )
    .await;
    // 200 clients send half a request head and then nothing.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let started = Instant::now();
    let event = seed_event("press-1", now_ms());
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/"))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let state: Value = answer.json().await.unwrap();
    assert_eq!(state["device_id"], "press-1");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered in {:?}, before any slow client timed out",
        started.elapsed()
    );
    // Each slow client is disconnected 0.5 s after it connected.
    for stream in &mut slow {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .expect("disconnected by the header timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "no answer, only a close");
    }
}

#[tokio::test]
async fn the_twin_evaluator_evaluates_on_post_only_and_every_error_is_json() {
    let db = TestDatabase::create().await;
    let store = db.migrated_store().await;
    // A twin bound an hour ago, silent since: an evaluation now unbinds it.
    let hour_ago = now_ms() - 3_600_000;
    let clock = TestClock::at(hour_ago + 100);
    let app = entwine_functions::http::router(functions(&store, &clock));
    let (status, physical) =
        post_json(&app, "/physicalevents", &seed_event("press-1", hour_ago)).await;
    assert_eq!(status, 200, "{physical}");
    let (status, pending) = post_json(&app, "/physicalstates", &physical).await;
    assert_eq!(status, 200, "{pending}");
    let (status, digital) = post_json(&app, "/pendingdigitalstates", &pending).await;
    assert_eq!(status, 200, "{digital}");
    let lifecycle = || async {
        let twin = store.twin("press-1").await.unwrap().unwrap();
        serde_json::to_value(twin.lifecycle).unwrap()
    };
    assert_eq!(lifecycle().await, json!("bound"));

    let (_child, port) = start(
        Path::new(env!("CARGO_BIN_EXE_twin-evaluator")),
        &db.url(),
        &[],
    )
    .await;
    for (method, path) in [
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/twinevaluations"),
        ("HEAD", "/twinevaluations"),
    ] {
        let (status, headers, body) = raw(
            port,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{method} {path}");
        assert!(
            headers.contains("allow: POST"),
            "{method} {path}: {headers}"
        );
        assert!(
            headers.contains("content-type: application/json"),
            "{method} {path}: {headers}"
        );
        let expected = if method == "HEAD" {
            String::new()
        } else {
            format!(r#"{{"error":"{method} is not allowed on {path}; allowed: POST"}}"#)
        };
        assert_eq!(body, expected, "{method} {path}");
    }
    assert_eq!(lifecycle().await, json!("bound"), "nothing was evaluated");

    // Paths that are not UTF-8 or hold a NUL, and unknown paths: 404 in JSON, never a 500.
    for path in ["/%FF%FE", "/%00", "/twinevaluations/%00"] {
        let (status, _, body) = raw(
            port,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"error": format!("no function at {path}")})
        );
    }

    // The time trigger's POST evaluates.
    let evaluation: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let changes = evaluation["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{evaluation}");
    assert_eq!(
        (
            &changes[0]["device_id"],
            &changes[0]["from"],
            &changes[0]["to"]
        ),
        (&json!("press-1"), &json!("bound"), &json!("unbound"))
    );
    assert_eq!(lifecycle().await, json!("unbound"));
    store.close().await;
}

#[tokio::test]
async fn a_bad_database_url_or_http_limit_stops_a_binary_with_exit_code_2() {
    for (database_url, extra, says) in [
        (
            "mysql://localhost/twins",
            None,
            "unsupported database URL scheme \\\"mysql\\\"",
        ),
        (
            "postgres://localhost:notaport/twins",
            None,
            "invalid PostgreSQL URL",
        ),
        (
            "postgres://localhost/twins",
            Some(("ENTWINE_HTTP_MAX_CONNECTIONS", "0")),
            "ENTWINE_HTTP_MAX_CONNECTIONS: 0 is outside 1..=1000000",
        ),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_twin-handler"));
        command
            .env_clear()
            .env("ENTWINE_PODINFO_DIR", "/nonexistent")
            .env("ENTWINE_CONFIG_ROOT", "/nonexistent")
            .env("DATABASE_URL", database_url)
            .env("FISSION_RUNTIME_PORT", free_port().to_string());
        if let Some((k, v)) = extra {
            command.env(k, v);
        }
        let output = tokio::time::timeout(Duration::from_secs(20), command.output())
            .await
            .expect("exits at once")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{database_url}: {stderr}");
        assert!(stderr.contains(says), "{database_url}: {stderr}");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
