//! What the cluster runs beside the functions: each function binary's own `GET /metrics`, and
//! the twins service (`entwine_platform::service`) over the database the binaries write, with
//! live updates from the digital events they publish on the broker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use entwine_platform::service::{LiveUpdates, ServiceConfig, TwinsService};
use entwine_testing::{eventually, mqtt_address, unique, TestDatabase};
use serde_json::{json, Value};

use crate::contract::{built_binaries, mount_seed_configuration, post, start, stop};
use crate::support::*;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The value of the sample `series` (name and labels, exactly as rendered) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_binary_answers_get_metrics_with_its_calls_counted() {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    mount_seed_configuration(root.path(), &db, &unique("metrics"));
    let [(name, physical), ..] = built_binaries();
    assert_eq!(name, "physical-event-handler");
    let function = start(&physical, root.path()).await;
    let client = reqwest::Client::new();

    // Nothing called yet: the route's counter is not there.
    let text = client
        .get(format!("{}/metrics", function.url))
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 200);
    assert_eq!(
        text.headers()["content-type"],
        "text/plain; version=0.0.4",
        "Prometheus' text format"
    );
    let text = text.text().await.unwrap();
    assert_eq!(
        sample(
            &text,
            r#"entwine_function_calls_total{function="physical-event-handler",outcome="ok"}"#
        ),
        None,
        "{text}"
    );

    // Three events stored, one refused.
    let now = now_ms();
    for i in 0..3 {
        let (status, body) = post(
            &client,
            &format!("{}/", function.url),
            &seed_event("metrics-device", now - 3_000 + i * 1_000),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = post(
        &client,
        &format!("{}/", function.url),
        &json!({"device_id": "metrics-device"}),
    )
    .await;
    assert_eq!(status, 400);

    let text = client
        .get(format!("{}/metrics", function.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(
            &text,
            r#"entwine_function_calls_total{function="physical-event-handler",outcome="ok"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"entwine_function_calls_total{function="physical-event-handler",outcome="bad_input"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"entwine_function_duration_seconds_count{function="physical-event-handler"}"#
        ),
        Some(4.0),
        "every call timed: {text}"
    );
    stop(function).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_binary_asks_for_a_token_on_get_metrics_when_tokens_are_set() {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    mount_seed_configuration(root.path(), &db, &unique("metrics"));
    let token = "metrics-token-0123456789";
    crate::settings::mount(
        &root.path().join("secrets"),
        "default",
        "auth",
        &[("tokens", token)],
    );
    let [(_, physical), ..] = built_binaries();
    let function = start(&physical, root.path()).await;
    let client = reqwest::Client::new();
    let refused = client
        .get(format!("{}/metrics", function.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let answered = client
        .get(format!("{}/metrics", function.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    stop(function).await;
}

/// One seed event through the four binaries of the chain: the digital state the digital-event
/// handler echoed.
async fn chain(client: &reqwest::Client, urls: &[String; 4], event: &Value) -> Value {
    let mut body = event.clone();
    for url in urls {
        let (status, answer) = post(client, &format!("{url}/"), &body).await;
        assert_eq!(status, 200, "{url}: {answer}");
        body = answer;
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twins_service_serves_what_the_fission_binaries_wrote_and_streams_their_digital_events()
{
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    let topics = unique("twins");
    mount_seed_configuration(root.path(), &db, &topics);

    // The service first, subscribed, so that it hears every digital event of the chain.
    let (host, port) = mqtt_address();
    let mut live = LiveUpdates::new(&format!("{host}:{port}"), &unique("twins-service"));
    live.state_topic = format!("{topics}/{{device_id}}/state");
    live.lifecycle_topic = format!("{topics}/{{device_id}}/lifecycle");
    let mut config = ServiceConfig::new(&db.url());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.live = Some(live);
    let service = TwinsService::start(config).await.unwrap();
    assert!(service.has_live_updates());
    let stats = service.live_stats().clone();
    eventually(
        Duration::from_secs(10),
        "the service's subscription",
        || {
            let stats = stats.clone();
            async move { stats.subscribed.load(Ordering::Relaxed) }
        },
    )
    .await;
    let base = format!("http://{}", service.http_address());
    let client = reqwest::Client::new();
    let health: Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"store": "ok", "broker": "subscribed"}));

    let [physical, shadow, twin, digital, evaluator, _] = built_binaries().map(|(_, p)| p);
    let functions = [
        start(&physical, root.path()).await,
        start(&shadow, root.path()).await,
        start(&twin, root.path()).await,
        start(&digital, root.path()).await,
    ];
    let evaluator = start(&evaluator, root.path()).await;
    let urls = functions.each_ref().map(|f| f.url.clone());

    // Six events of one device, 30 s to 5 s old when sent: all in one 30 s window of twin
    // time, each too late for the desired 1 s. The k-th state: R = k/6, T = 0, so ODTE 0; the
    // twin is bound by the first and stays bound (its window since binding is not over).
    let now = now_ms();
    let mut digitals = Vec::new();
    for i in 0..6 {
        digitals.push(
            chain(
                &client,
                &urls,
                &seed_event("svc-device", now - 30_000 + i * 5_000),
            )
            .await,
        );
    }
    for (k, state) in digitals.iter().enumerate() {
        assert_eq!(real(&state["reliability"]), ((k + 1) as f64 / 6.0) as f32);
        assert_eq!(
            (&state["timeliness"], &state["odte"]),
            (&json!(0.0), &json!(0.0))
        );
    }
    // The service heard all six states and the one lifecycle change (new → bound).
    eventually(Duration::from_secs(10), "six states and a change", || {
        let stats = stats.clone();
        async move {
            stats.states.load(Ordering::Relaxed) == 6 && stats.changes.load(Ordering::Relaxed) == 1
        }
    })
    .await;

    // The evaluator, as its TimeTrigger calls it: every twin's figures at now. The six states
    // lie in the window: R = 6/6, T = 0, A = 1 (not measured), ODTE 0; still bound.
    let response = client
        .post(format!("{}/", evaluator.url))
        .header("X-Fission-Timer-Name", "twin-evaluator")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let twins: Value = client
        .get(format!("{base}/api/twins"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(twins["next"], Value::Null, "{twins}");
    let items = twins["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{twins}");
    let twin = &items[0];
    assert_eq!(
        (
            &twin["device_id"],
            &twin["lifecycle"],
            &twin["availability"],
            &twin["reliability"],
            &twin["timeliness"],
            &twin["odte"],
        ),
        (
            &json!("svc-device"),
            &json!("bound"),
            &json!(1.0),
            &json!(1.0),
            &json!(0.0),
            &json!(0.0)
        ),
        "{twin}"
    );
    assert_eq!(
        twin["last_physical_timestamp"],
        json!(now - 5_000),
        "{twin}"
    );
    assert_eq!(twin["digital_state_id"], digitals[5]["id"], "{twin}");
    assert_eq!(
        twin["last_digital_timestamp"], digitals[5]["timestamp"],
        "{twin}"
    );

    // Its history: the six states, newest first, exactly as the functions answered them.
    let history: Value = client
        .get(format!("{base}/api/twins/svc-device/history"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = history["items"].as_array().unwrap();
    assert_eq!(entries.len(), 6, "{history}");
    for (entry, state) in entries.iter().zip(digitals.iter().rev()) {
        for key in [
            "id",
            "timestamp",
            "reliability",
            "timeliness",
            "odte",
            "lifecycle",
        ] {
            assert_eq!(entry[key], state[key], "{key}: {entry} vs {state}");
        }
    }
    assert_eq!(entries[0]["device_timestamp"], json!(now - 5_000));
    assert_eq!(entries[5]["device_timestamp"], json!(now - 30_000));

    // The live stream: a state the digital-event handler publishes after the stream opened.
    let stream = client
        .get(format!("{base}/api/stream?device_id=svc-device"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut stream = entwine_testing::EventStream::new(stream);
    let seventh = chain(&client, &urls, &seed_event("svc-device", now - 1_000)).await;
    let streamed = stream.next("digitalstate", Duration::from_secs(10)).await;
    assert_eq!(
        streamed, seventh,
        "the stream carries the state the handler published"
    );

    // A message that is no digital state is counted and logged, and the service goes on.
    let mut options = rumqttc::MqttOptions::new(unique("garbage"), host.clone(), port);
    options.set_keep_alive(Duration::from_secs(5));
    let (mqtt, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    mqtt.publish(
        format!("{topics}/svc-device/state"),
        rumqttc::QoS::AtLeastOnce,
        false,
        b"{\"not\": \"a state\"}".to_vec(),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the invalid message counted",
        || {
            let stats = stats.clone();
            async move { stats.invalid.load(Ordering::Relaxed) == 1 }
        },
    )
    .await;
    let _ = mqtt.disconnect().await;
    pump.abort();
    assert_eq!(stats.states.load(Ordering::Relaxed), 7);

    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    // The recorder is the test process's: other tests of this process may have counted too,
    // so at least what this service received.
    assert!(
        sample(
            &metrics,
            r#"entwine_service_digital_events_invalid_total{kind="state"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let unknown: Value = client
        .get(format!("{base}/physicalevents"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        unknown,
        json!({"error": "nothing at /physicalevents"}),
        "no function routes in the service"
    );

    // Shutdown ends the open stream and drains.
    service.shutdown().await.unwrap();
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "the stream ends with the service"
    );
    for function in functions {
        stop(function).await;
    }
    stop(evaluator).await;
}
