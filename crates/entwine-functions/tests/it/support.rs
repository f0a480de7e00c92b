//! What the tests share: a settable clock, the seed's payloads, and a request helper.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use entwine_core::odte::OdteConfig;
use entwine_functions::handlers::{Clock, TwinFunctions};
use entwine_store::Store;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A clock the test sets.
#[derive(Debug)]
pub(crate) struct TestClock(AtomicI64);

impl TestClock {
    pub(crate) fn at(ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(ms)))
    }

    pub(crate) fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub(crate) const T0: i64 = 1_700_000_000_000;

/// The seed device's aggregated payload, as the connector forwards it (plus `device_id`).
pub(crate) fn seed_event(device: &str, timestamp: i64) -> Value {
    json!({
        "timestamp": timestamp,
        "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": 3.71, "iot.sensor.temperature": 27.42},
        "device_id": device
    })
}

pub(crate) fn functions(store: &Store, clock: &Arc<TestClock>) -> Arc<TwinFunctions> {
    Arc::new(TwinFunctions::new(
        store.clone(),
        OdteConfig::seed_default(),
        clock.clone(),
    ))
}

/// Sends one request through the router in-process; answers status and JSON body.
pub(crate) async fn send(
    router: &Router,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::post(path);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = router
        .clone()
        .oneshot(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "every answer is JSON"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

pub(crate) async fn post_json(router: &Router, path: &str, body: &Value) -> (StatusCode, Value) {
    send(router, path, Some("application/json"), body.to_string()).await
}

/// The sorted keys of a JSON object.
pub(crate) fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

pub(crate) const PHYSICAL_STATE_KEYS: [&str; 6] = [
    "device_id",
    "device_timestamp",
    "energy",
    "id",
    "temperature",
    "timestamp",
];
pub(crate) const PENDING_KEYS: [&str; 6] = [
    "device_id",
    "energy",
    "id",
    "physicalstate_id",
    "temperature",
    "timestamp",
];
pub(crate) const DIGITAL_KEYS: [&str; 11] = [
    "availability",
    "device_id",
    "energy",
    "id",
    "lifecycle",
    "odte",
    "physicalstate_id",
    "reliability",
    "temperature",
    "timeliness",
    "timestamp",
];

/// A number of an answer as the `REAL` it was stored as.
pub(crate) fn real(value: &Value) -> f32 {
    value.as_f64().expect("a number") as f32
}
