//! The twins service on both stores: what it serves without a broker, its tokens and the
//! loopback rule, and live updates taken from the broker (Mosquitto) into its stream and its
//! lifecycle feed. The service over states written by the Fission binaries is tested in
//! `entwine-functions/tests/it/service.rs`, where the binaries are built.

use std::sync::atomic::Ordering;
use std::time::Duration;

use entwine_platform::service::{LiveUpdates, ServiceConfig, TwinsService};
use entwine_platform::{PlatformError, StoreSource};
use entwine_testing::{eventually, mqtt_address, store_test, unique, TestStore};
use serde_json::{json, Value};

fn config(t: &TestStore) -> ServiceConfig {
    let mut config = ServiceConfig::new("unused://");
    config.store = StoreSource::Given(t.store.clone());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

store_test!(
    without_a_broker_it_serves_the_store_and_asks_for_tokens_when_set,
    |t| async move {
        let token = "service-token-0123456789";
        let mut config = config(&t);
        config.auth.tokens = entwine_http::Tokens::parse(&token.to_owned().into()).unwrap();
        let service = TwinsService::start(config).await.unwrap();
        assert!(!service.has_live_updates());
        let base = format!("http://{}", service.http_address());
        assert_eq!(
            get(&format!("{base}/healthz"), None).await,
            (200, json!({"store": "ok", "broker": "off"})),
            "the probes send no token"
        );
        let (status, _) = get(&format!("{base}/api/twins"), None).await;
        assert_eq!(status, 401);
        let (status, twins) = get(&format!("{base}/api/twins"), Some(token)).await;
        assert_eq!(status, 200, "{twins}");
        assert_eq!(twins["items"], json!([]), "{twins}");
        let (status, _) = get(&format!("{base}/api/twins/nobody"), Some(token)).await;
        assert_eq!(status, 404);
        service.shutdown().await.unwrap();
        // A store that was given stays open.
        t.store.ping().await.unwrap();
    }
);

store_test!(
    beyond_loopback_it_refuses_to_start_without_tokens,
    |t| async move {
        let mut config = config(&t);
        config.listen = "0.0.0.0:0".parse().unwrap();
        let refused = TwinsService::start(config).await.err().expect("refused");
        assert!(matches!(refused, PlatformError::Config(_)), "{refused}");
        assert_eq!(
        refused.to_string(),
        "refusing to listen on 0.0.0.0:0 without authentication: set auth.tokens (ENTWINE_AUTH__TOKENS or the Secret file auth/tokens), or listen on 127.0.0.1"
    );
    }
);

store_test!(
    live_updates_from_the_broker_reach_the_stream_and_the_lifecycle_feed,
    |t| async move {
        let topics = unique("service");
        let (host, port) = mqtt_address();
        let mut live = LiveUpdates::new(&format!("{host}:{port}"), &unique("service"));
        live.state_topic = format!("{topics}/{{device_id}}/state");
        live.lifecycle_topic = format!("{topics}/{{device_id}}/lifecycle");
        let mut config = config(&t);
        config.live = Some(live);
        let service = TwinsService::start(config).await.unwrap();
        let stats = service.live_stats().clone();
        eventually(Duration::from_secs(10), "the subscription", || {
            let stats = stats.clone();
            async move { stats.subscribed.load(Ordering::Relaxed) }
        })
        .await;
        let base = format!("http://{}", service.http_address());
        let mut changes = service.lifecycle_changes();
        let stream = reqwest::Client::new()
            .get(format!("{base}/api/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        let mut stream = entwine_testing::EventStream::new(stream);

        let mut options = rumqttc::MqttOptions::new(unique("publisher"), host, port);
        options.set_keep_alive(Duration::from_secs(5));
        let (mqtt, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let now = now_ms();
        let state = json!({
            "id": 7, "physicalstate_id": 7, "device_id": "live-1", "timestamp": now,
            "temperature": 27.42, "energy": 3.71,
            "availability": 1.0, "reliability": 0.5, "timeliness": 1.0, "odte": 0.5,
            "lifecycle": "disentangled"
        });
        let change = json!({
            "device_id": "live-1", "from": "bound", "to": "disentangled", "at": now,
            "odte": 0.5, "availability": 1.0, "reliability": 0.5, "timeliness": 1.0
        });
        let publish = |topic: String, body: Vec<u8>| {
            let mqtt = mqtt.clone();
            async move {
                mqtt.publish(topic, rumqttc::QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
        };
        // Refused: not JSON; a state under another device's topic; then the two good ones.
        publish(format!("{topics}/live-1/state"), b"{oops".to_vec()).await;
        publish(
            format!("{topics}/live-2/state"),
            state.to_string().into_bytes(),
        )
        .await;
        publish(
            format!("{topics}/live-1/state"),
            state.to_string().into_bytes(),
        )
        .await;
        publish(
            format!("{topics}/live-1/lifecycle"),
            change.to_string().into_bytes(),
        )
        .await;

        let received = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("a change within 10 s")
            .unwrap();
        assert_eq!(serde_json::to_value(&received).unwrap(), change);
        let streamed = stream.next("digitalstate", Duration::from_secs(10)).await;
        assert_eq!(streamed, state);
        assert_eq!(
            (
                stats.states.load(Ordering::Relaxed),
                stats.changes.load(Ordering::Relaxed),
                stats.invalid.load(Ordering::Relaxed)
            ),
            (1, 1, 2)
        );
        let _ = mqtt.disconnect().await;
        pump.abort();
        // Shutdown ends the open stream.
        service.shutdown().await.unwrap();
        assert!(
            stream.ends_within(Duration::from_secs(10)).await,
            "the stream ends with the service"
        );
    }
);
