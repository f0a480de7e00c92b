//! The hardened server over real loopback sockets: slow clients, slow bodies, idle keep-alive
//! connections, the connection cap, JSON errors and graceful shutdown.

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use entwine_http::{serve, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Told when a request enters `/slow` (only the shutdown test calls it).
static SLOW_ENTERED: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct Server {
    address: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn app() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/echo", post(|body: String| async move { body }))
        .route(
            "/slow",
            get(|| async {
                SLOW_ENTERED.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }),
        )
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(serve(listener, app(), limits, async move {
        token.cancelled().await
    }));
    Server {
        address,
        stop,
        task,
    }
}

/// One request on a fresh connection; the raw answer (head and body).
async fn raw(address: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8(answer).unwrap()
}

fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Opens `n` connections that each send half a request head and then nothing.
async fn slow_clients(address: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: slow\r\n")
            .await
            .unwrap();
        clients.push(stream);
    }
    clients
}

/// Reads until the server closes `stream`; how long that took.
async fn closed_after(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the server closes the connection");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_request_is_answered_at_once_while_1100_slow_clients_hold_sockets() {
    let server = start(Limits::default()).await;
    let mut slow = slow_clients(server.address, 1100).await;
    let start = Instant::now();
    let answer = reqwest::get(format!("http://{}/hello", server.address))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "hello");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "answered in {:?}",
        start.elapsed()
    );
    // The slow clients are still connected (the default header timeout is 10 s) …
    let mut buf = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(100), slow[0].read(&mut buf)).await;
    assert!(still_open.is_err(), "not closed before the header timeout");
    drop(slow);
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_beyond_the_cap_wait_and_are_cut_off_by_the_header_timeout() {
    // A cap of 8 connections and a 300 ms header timeout; 20 slow clients connect first.
    let server = start(Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 8,
        ..Limits::default()
    })
    .await;
    let mut slow = slow_clients(server.address, 20).await;
    let start = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        raw(
            server.address,
            "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
    )
    .await
    .expect("a normal request gets through");
    let waited = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(body_of(&answer), "hello");
    // 20 slow clients ahead of it, 8 served at a time: it is accepted in the third round, after
    // two header timeouts (600 ms), and answered before a third one elapses.
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_millis(1_500),
        "answered after {waited:?}"
    );
    // Every slow client was disconnected by then or is about to be.
    for stream in &mut slow {
        closed_after(stream, Duration::from_secs(2)).await;
    }
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = start(Limits {
        header_read_timeout: Duration::from_millis(400),
        ..Limits::default()
    })
    .await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(body_of(&answer), "hello");
    let idle = closed_after(&mut stream, Duration::from_secs(3)).await;
    assert!(
        idle >= Duration::from_millis(350) && idle < Duration::from_millis(1_400),
        "closed after {idle:?} idle"
    );
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408_in_json() {
    let server = start(Limits {
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let start = Instant::now();
    // 10 bytes announced, 3 sent, then nothing.
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("content-type: application/json\r\n"),
        "{answer}"
    );
    assert_eq!(
        body_of(&answer),
        r#"{"error":"body: not received within 0.3 s"}"#
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1_300),
        "{elapsed:?}"
    );
    // A body that arrives in time is served.
    let answer = raw(
        server.address,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(body_of(&answer), "hello");
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn errors_are_json_and_a_405_names_the_allowed_methods() {
    let server = start(Limits::default()).await;
    let cases = [
        (
            "GET /echo",
            "405 Method Not Allowed",
            r#"{"error":"GET is not allowed on /echo; allowed: POST"}"#,
        ),
        (
            "DELETE /hello",
            "405 Method Not Allowed",
            r#"{"error":"DELETE is not allowed on /hello; allowed: GET,HEAD"}"#,
        ),
        ("GET /nowhere", "404 Not Found", r#"{"error":"not found"}"#),
    ];
    for (request, status, body) in cases {
        let answer = raw(
            server.address,
            &format!("{request} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{request}: {answer}"
        );
        assert!(
            answer.contains("content-type: application/json\r\n"),
            "{request}: {answer}"
        );
        assert_eq!(body_of(&answer), body, "{request}");
    }
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_and_accepts_no_more() {
    let server = start(Limits::default()).await;
    let url = format!("http://{}/slow", server.address);
    let in_flight = tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await });
    // The request is in its handler (500 ms) when the server is told to stop.
    tokio::time::timeout(Duration::from_secs(5), SLOW_ENTERED.notified())
        .await
        .expect("the request reaches its handler");
    server.stop.cancel();
    assert_eq!(in_flight.await.unwrap().unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("serve returns once the last connection closed")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(server.address).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn raw_bytes_that_are_not_a_uri_are_refused_by_hyper_before_any_router() {
    // Percent-encoded bytes reach the router (and get JSON errors there); raw non-ASCII bytes in
    // the request line are not a URI: hyper answers 400 itself, with no body, and closes.
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert_eq!(body_of(&answer), "");
    let answer = raw(
        server.address,
        "GET /%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(body_of(&answer), r#"{"error":"not found"}"#);
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_keep_alive_connection_serves_one_post_after_another() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    for body in ["first", "second", "third"] {
        stream
            .write_all(
                format!(
                    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).ends_with(body) {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                .await
                .expect("answered on the same connection")
                .unwrap();
            assert!(n > 0, "closed after {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");
    }
    drop(stream);
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}
