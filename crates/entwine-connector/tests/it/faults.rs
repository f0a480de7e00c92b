//! Bad messages on the wire, and functions that are not there yet.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::response::IntoResponse;
use entwine_testing::{eventually, mqtt_address, unique, Subscriber, TestStore};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};

use crate::support::*;

/// A plain MQTT client for publishing test messages; its event loop runs in the background.
async fn publisher() -> AsyncClient {
    let (host, port) = mqtt_address();
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(unique("test-pub"), host, port), 100);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_message_is_dead_lettered_with_its_reason_and_the_pipeline_carries_on() {
    let functions = serve_functions(fast_odte()).await;
    let root = unique("wire");
    let config = connector_config(
        &functions.url,
        vec![format!("{root}/#")],
        &unique("connector"),
    );
    let dead_letters = Subscriber::start(std::slice::from_ref(&config.dead_letter_topic)).await;
    let connector = start_connector(config).await;
    let client = publisher().await;
    let topic = format!("{root}/press-1/telemetry/device_state");
    let t = now_ms();
    let bad: Vec<(String, Vec<u8>, &str, &str)> = vec![
        (topic.clone(), b"not json at all".to_vec(), "payload", "payload: not valid JSON"),
        (topic.clone(), json!({"type": "iot.sensor.state.aggregated", "data": {"iot.sensor.energy": 1.0, "iot.sensor.temperature": 2.0}}).to_string().into_bytes(), "physicalevents", "timestamp: missing"),
        (topic.clone(), json!({"timestamp": t, "type": "iot.sensor.state.aggregated"}).to_string().into_bytes(), "physicalevents", "data: missing"),
        (topic.clone(), json!({"timestamp": t, "data": {"iot.sensor.energy": "high", "iot.sensor.temperature": 2.0}}).to_string().into_bytes(), "physicalevents", "data.iot.sensor.energy: expected a number, got a string"),
        (root.clone(), json!({"timestamp": t, "data": {}}).to_string().into_bytes(), "topic", "has no device id"),
    ];
    for (topic, payload, _, _) in &bad {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let good = json!({"timestamp": t + 1, "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": 3.0, "iot.sensor.temperature": 26.0}});
    client
        .publish(topic.clone(), QoS::AtLeastOnce, false, good.to_string())
        .await
        .unwrap();

    let letters = dead_letters
        .wait_for(Duration::from_secs(10), "five dead letters", |r| {
            r.len() >= bad.len()
        })
        .await;
    let letters: Vec<Value> = letters
        .iter()
        .map(|l| serde_json::from_slice(&l.payload).unwrap())
        .collect();
    for (topic, payload, stage, reason) in &bad {
        let letter = letters
            .iter()
            .find(|l| l["payload"] == *String::from_utf8_lossy(payload))
            .unwrap_or_else(|| panic!("no dead letter for {}", String::from_utf8_lossy(payload)));
        assert_eq!(&letter["topic"], topic);
        assert_eq!(&letter["stage"], stage, "{letter}");
        assert!(
            letter["error"].as_str().unwrap().contains(reason),
            "{letter}"
        );
    }
    let store = functions.store.store.clone();
    eventually(
        Duration::from_secs(10),
        "the good message after the bad ones",
        || {
            let store = store.clone();
            async move { physical_count(&store).await == 1 }
        },
    )
    .await;
    assert_eq!(connector.stats.dead_lettered.load(Ordering::Relaxed), 5);
    assert_eq!(connector.stats.completed.load(Ordering::Relaxed), 1);
    connector.stop().await;
    // Nothing of the bad messages reached the tables.
    assert_eq!(
        entwine_testing::scalar(&functions.store.store, "SELECT COUNT(*) FROM physicalstate").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_retried_until_the_functions_come_up() {
    // A port where nothing listens yet: every call is refused.
    let port = entwine_testing::free_port();
    let root = unique("retry");
    let config = connector_config(
        &format!("127.0.0.1:{port}"),
        vec![format!("{root}/#")],
        &unique("connector"),
    );
    let connector = start_connector(config).await;
    let client = publisher().await;
    let payload = json!({"timestamp": now_ms(), "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": 3.0, "iot.sensor.temperature": 26.0}});
    client
        .publish(
            format!("{root}/press-1/telemetry/device_state"),
            QoS::AtLeastOnce,
            false,
            payload.to_string(),
        )
        .await
        .unwrap();
    let stats = connector.stats.clone();
    eventually(Duration::from_secs(10), "retries", || {
        let stats = stats.clone();
        async move { stats.retries.load(Ordering::Relaxed) >= 3 }
    })
    .await;
    assert_eq!(connector.stats.completed.load(Ordering::Relaxed), 0);

    // Now the functions come up on that port, on a store whose tables do not exist yet: a 503,
    // retried too, until the operator migrates.
    let store = TestStore::postgres_empty().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let functions = serve_functions_on(listener, store, fast_odte());
    let before = connector.stats.retries.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "retries answered 503", || {
        let stats = stats.clone();
        async move { stats.retries.load(Ordering::Relaxed) >= before + 2 }
    })
    .await;
    functions.store.store.migrate().await.unwrap();
    eventually(Duration::from_secs(10), "the chain to complete", || {
        let stats = stats.clone();
        async move { stats.completed.load(Ordering::Relaxed) == 1 }
    })
    .await;
    assert_eq!(physical_count(&functions.store.store).await, 1);
    assert_eq!(connector.stats.dead_lettered.load(Ordering::Relaxed), 0);
    connector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_function_keeps_failing_is_dead_lettered_and_the_lane_moves_on() {
    // A physical-event route that answers 500 to one device, as a function does on a row it
    // cannot handle; the real functions serve everything else behind it.
    let functions = serve_functions(fast_odte()).await;
    let upstream = functions.url.clone();
    let proxy = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let upstream = upstream.clone();
        async move {
            let path = request.uri().path().to_owned();
            let body = axum::body::to_bytes(request.into_body(), 1 << 20)
                .await
                .unwrap();
            if path == "/physicalevents" && String::from_utf8_lossy(&body).contains("\"cursed\"") {
                return (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "{\"error\":\"internal error\"}",
                )
                    .into_response();
            }
            let answer = reqwest::Client::new()
                .post(format!("{upstream}{path}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = axum::http::StatusCode::from_u16(answer.status().as_u16()).unwrap();
            (
                status,
                [("content-type", "application/json")],
                answer.bytes().await.unwrap(),
            )
                .into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, proxy).await.unwrap() });

    let root = unique("poison");
    let mut config = connector_config(&proxy_url, vec![format!("{root}/#")], &unique("connector"));
    config.lanes = 1; // the poisoned message and the good one share the lane
    let dead_letters = Subscriber::start(std::slice::from_ref(&config.dead_letter_topic)).await;
    let connector = start_connector(config).await;
    let client = publisher().await;
    let event = |device: &str, t: i64| {
        json!({"timestamp": t, "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": 3.0, "iot.sensor.temperature": 26.0}, "device_id": device})
    };
    let t = now_ms();
    client
        .publish(
            format!("{root}/cursed/telemetry/device_state"),
            QoS::AtLeastOnce,
            false,
            event("cursed", t).to_string(),
        )
        .await
        .unwrap();
    client
        .publish(
            format!("{root}/fine/telemetry/device_state"),
            QoS::AtLeastOnce,
            false,
            event("fine", t).to_string(),
        )
        .await
        .unwrap();

    let letters = dead_letters
        .wait_for(Duration::from_secs(20), "the poisoned message", |r| {
            !r.is_empty()
        })
        .await;
    let letter: Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(letter["stage"], "physicalevents");
    assert_eq!(letter["status"], 500);
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 5 attempts"),
        "{letter}"
    );
    let store = functions.store.store.clone();
    eventually(Duration::from_secs(10), "the message behind it", || {
        let store = store.clone();
        async move { physical_count(&store).await == 1 }
    })
    .await;
    connector.stop().await;
}
