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
    let mut options = MqttOptions::new(unique("test-pub"), host, port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
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
        // The hostile ones: 60 KiB of 0x01 (escaped whole, 368 KB: over the connector's
        // outgoing limit, which once made it reconnect for ever), and a JSON object of 12 + 100 KiB
        // + 2 bytes,
        // over the functions' 64 KiB limit, which never reaches them.
        (topic.clone(), vec![1u8; 60 * 1024], "payload", "payload: not valid JSON"),
        (topic.clone(), format!("{{\"filler\": \"{}\"}}", "x".repeat(100 * 1024)).into_bytes(), "payload", "payload: 102414 bytes, over the functions' limit of 65536 bytes"),
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
        .wait_for(Duration::from_secs(10), "seven dead letters", |r| {
            r.len() >= bad.len()
        })
        .await;
    let letters: Vec<Value> = letters
        .iter()
        .map(|l| serde_json::from_slice(&l.payload).unwrap())
        .collect();
    for (topic, payload, stage, reason) in &bad {
        let digest = entwine_core::deadletter::DeadLetter::of("", None, payload, "", None, "", 0)
            .payload_sha256;
        let letter = letters
            .iter()
            .find(|l| l["payload_sha256"] == *digest)
            .unwrap_or_else(|| panic!("no dead letter for {}", String::from_utf8_lossy(payload)));
        // Small whatever the payload: its size, digest and a 512-byte prefix.
        assert!(
            serde_json::to_string(letter).unwrap().len() < 4096,
            "{letter}"
        );
        assert_eq!(letter["payload_bytes"], payload.len(), "{letter}");
        assert_eq!(letter["truncated"], payload.len() > 512, "{letter}");
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
            let stats = connector.stats.clone();
            // Stored at the first step, counted once its chain of four completed.
            async move {
                physical_count(&store).await == 1 && stats.completed.load(Ordering::Relaxed) == 1
            }
        },
    )
    .await;
    assert_eq!(connector.stats.dead_lettered.load(Ordering::Relaxed), 7);
    assert_eq!(connector.stats.mqtt_errors.load(Ordering::Relaxed), 0);
    connector.stop().await;
    // Every letter is stored, durable and listed, one row per message.
    let stored = functions.store.store.dead_letters(100, None).await.unwrap();
    assert_eq!(stored.len(), 7);
    let stages: std::collections::BTreeMap<&str, usize> =
        stored.iter().fold(Default::default(), |mut m, l| {
            *m.entry(l.stage.as_str()).or_default() += 1;
            m
        });
    assert_eq!(
        stages,
        [("payload", 3), ("physicalevents", 3), ("topic", 1)]
            .into_iter()
            .collect()
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chain_holds_the_broker_back_instead_of_buffering_and_loses_nothing() {
    // The functions are away: every call is refused and retried, so nothing finishes. The
    // connector may take at most 4 messages from the broker; the other 196 wait there.
    let port = entwine_testing::free_port();
    let root = unique("backpressure");
    let mut config = connector_config(
        &format!("127.0.0.1:{port}"),
        vec![format!("{root}/#")],
        &unique("connector"),
    );
    config.max_in_flight = 4;
    config.retry_max = Duration::from_millis(200);
    let connector = start_connector(config).await;
    let client = publisher().await;
    let t = now_ms();
    for i in 0..200 {
        let payload = json!({"timestamp": t + i, "type": "iot.sensor.state.aggregated",
            "data": {"iot.sensor.energy": 3.0, "iot.sensor.temperature": 26.0}});
        client
            .publish(
                format!("{root}/press-{}/telemetry/device_state", i % 10),
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .unwrap();
    }
    let stats = connector.stats.clone();
    eventually(
        Duration::from_secs(10),
        "four messages taken and paused",
        || {
            let stats = stats.clone();
            async move {
                stats.received.load(Ordering::Relaxed) == 4
                    && stats.paused.load(Ordering::Relaxed) >= 1
            }
        },
    )
    .await;
    // Retries go on (time passes, the broker has the rest ready): still exactly four taken.
    let before = stats.retries.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "twenty more retries", || {
        let stats = stats.clone();
        async move { stats.retries.load(Ordering::Relaxed) >= before + 20 }
    })
    .await;
    assert_eq!(stats.received.load(Ordering::Relaxed), 4);

    // The functions come up: every message is stored exactly once.
    let store = TestStore::postgres().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let functions = serve_functions_on(listener, store, fast_odte());
    eventually(
        Duration::from_secs(30),
        "the 200 chains to complete",
        || {
            let stats = stats.clone();
            async move { stats.completed.load(Ordering::Relaxed) == 200 }
        },
    )
    .await;
    assert_eq!(physical_count(&functions.store.store).await, 200);
    assert_eq!(
        entwine_testing::scalar(
            &functions.store.store,
            "SELECT COUNT(DISTINCT device_timestamp) FROM physicalstate"
        )
        .await,
        200
    );
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    connector.stop().await;
}
