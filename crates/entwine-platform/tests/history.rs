//! History through the platform: the retention task deletes old states at start (and every
//! period), and `GET /api/twins/{id}/series` answers the buckets, its defaults and its errors.

use std::sync::Arc;
use std::time::Duration;

use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent, Readings};
use entwine_functions::handlers::Clock;
use entwine_platform::{Platform, PlatformConfig, StoreSource};
use entwine_store::{RetentionSettings, Store};
use entwine_testing::{eventually, scalar, TestStore};
use serde_json::{json, Value};

const T0: i64 = 1_700_000_000_000;
const NOW: i64 = T0 + 3_600_000;

struct Fixed;

impl Clock for Fixed {
    fn now_ms(&self) -> i64 {
        NOW
    }
}

/// A state a minute for an hour (T0 … T0 + 60 min), evaluated by the seed's profile.
async fn history(store: &Store) {
    let config = OdteConfig::seed_default();
    for k in 0..=60 {
        let at = T0 + k * 60_000;
        let event = PhysicalEvent {
            device_id: DeviceId::parse("device_id", "iiot-1").unwrap(),
            device_timestamp: at - 10,
            readings: Readings::seed(20.0, 1.0),
        };
        let (physical, _) = store.record_physical_event(&event, at).await.unwrap();
        let (pending, _) = store.record_shadow(&physical, at).await.unwrap();
        store
            .evaluate_digital_state(&pending, &config)
            .await
            .unwrap();
    }
}

async fn get(url: &str) -> (u16, Value) {
    let answer = reqwest::get(url).await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_at_start_and_the_series_route_answers_buckets_defaults_and_errors() {
    let t = TestStore::postgres().await;
    history(&t.store).await;
    let twins_state = t
        .store
        .twin("iiot-1")
        .await
        .unwrap()
        .unwrap()
        .digital_state_id
        .unwrap();

    let mut config = PlatformConfig::ephemeral("sqlite://unused.db");
    config.store = StoreSource::Given(t.store.clone());
    config.connector = None;
    config.devices = None;
    config.digital_events = None;
    config.metrics = false;
    config.clock = Arc::new(Fixed);
    config.retention = Some(RetentionSettings {
        keep: Duration::from_secs(1800),
        period: Duration::from_secs(3600),
    });
    let platform = Platform::start(config).await.unwrap();

    // Keep 30 min at T0 + 60 min: the states before T0 + 29 min go, except the twin's own.
    let store = t.store.clone();
    let oldest = format!(
        "SELECT MIN(timestamp) FROM digitalstate WHERE device_id = 'iiot-1' AND id <> {twins_state}"
    );
    eventually(Duration::from_secs(30), "retention at start", || {
        let store = store.clone();
        let oldest = oldest.clone();
        async move { scalar(&store, &oldest).await == T0 + 29 * 60_000 }
    })
    .await;
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
        33
    );

    let base = format!("http://{}/api/twins", platform.http_address());
    // 30 min … 60 min in 10 min buckets: 10, 10, 10 states and the last one.
    let (status, body) = get(&format!(
        "{base}/iiot-1/series?from={}&to={}&step=600000",
        T0 + 1_800_000,
        NOW + 1
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["device_id"], "iiot-1");
    assert_eq!(
        (&body["from"], &body["to"], &body["step"]),
        (&json!(T0 + 1_800_000), &json!(NOW + 1), &json!(600_000))
    );
    let buckets = body["buckets"].as_array().unwrap();
    let shape: Vec<(i64, i64)> = buckets
        .iter()
        .map(|b| (b["t"].as_i64().unwrap(), b["count"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        shape,
        [
            (T0 + 1_800_000, 10),
            (T0 + 2_400_000, 10),
            (T0 + 3_000_000, 10),
            (T0 + 3_600_000, 1)
        ]
    );
    let first = &buckets[0];
    let mut keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "availability",
            "count",
            "lifecycle",
            "odte",
            "readings",
            "reliability",
            "t",
            "timeliness"
        ]
    );
    assert_eq!(
        first["readings"],
        json!({"energy": {"avg": 1.0, "min": 1.0, "max": 1.0},
               "temperature": {"avg": 20.0, "min": 20.0, "max": 20.0}})
    );
    // The seed's profile wants 6 states in 30 s; one a minute is 1 of 6: disentangled.
    assert_eq!(first["lifecycle"], "disentangled");
    for figure in ["avg", "min", "max"] {
        assert!(first["odte"][figure].is_f64(), "{first}");
    }

    // Defaults: the last hour of the wall clock (none of this history), 10 s buckets.
    let (status, body) = get(&format!("{base}/iiot-1/series")).await;
    assert_eq!(status, 200);
    assert_eq!(body["step"], 10_000);
    assert_eq!(
        body["to"].as_i64().unwrap() - body["from"].as_i64().unwrap(),
        3_600_000
    );
    assert_eq!(body["buckets"], json!([]));
    // A day from `from`: 5 min buckets.
    let (_, body) = get(&format!(
        "{base}/iiot-1/series?from={T0}&to={}",
        T0 + 86_400_000
    ))
    .await;
    assert_eq!(body["step"], 300_000);

    for (query, status, error) in [
        ("from=abc", 400, "from: \"abc\" is not an integer"),
        ("from=10&to=10", 400, "from: 10 is not before to (10)"),
        ("from=0&to=10&step=0", 400, "step: 0 is not above 0 ms"),
        (
            "from=0&to=20000&step=1",
            400,
            "step: 1 ms makes 20000 buckets from 0 to 20000, more than 10000",
        ),
        (
            "since=1",
            400,
            "since: unknown parameter (accepted: from, to, step)",
        ),
    ] {
        let (got, body) = get(&format!("{base}/iiot-1/series?{query}")).await;
        assert_eq!(
            (got, &body),
            (status, &json!({ "error": error })),
            "{query}"
        );
    }
    let (status, body) = get(&format!("{base}/nobody/series")).await;
    assert_eq!(
        (status, body),
        (404, json!({"error": "no twin \"nobody\""}))
    );

    platform.shutdown().await.unwrap();
}
