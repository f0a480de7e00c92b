//! The four functions over HTTP, in-process, on PostgreSQL and SQLite.

use axum::http::StatusCode;
use entwine_functions::http::{router, MAX_BODY_BYTES};
use entwine_store::{Store, StoreOptions};
use entwine_testing::{scalar, store_test};
use serde_json::{json, Value};

use crate::support::*;

store_test!(
    the_four_routes_chain_with_the_seed_fields_and_values,
    |t| async move {
        let clock = TestClock::at(T0 + 35);
        let app = router(functions(&t.store, &clock));

        let (status, physical) =
            post_json(&app, "/physicalevents", &seed_event("iiot-device-1", T0)).await;
        assert_eq!(status, StatusCode::OK, "{physical}");
        assert_eq!(keys(&physical), PHYSICAL_STATE_KEYS);
        assert_eq!(physical["device_id"], "iiot-device-1");
        assert_eq!(physical["device_timestamp"], T0);
        assert_eq!(physical["timestamp"], T0 + 35);
        assert_eq!(physical["temperature"], json!(27.42));
        assert_eq!(physical["energy"], json!(3.71));

        clock.set(T0 + 60);
        let (status, pending) = post_json(&app, "/physicalstates", &physical).await;
        assert_eq!(status, StatusCode::OK, "{pending}");
        assert_eq!(keys(&pending), PENDING_KEYS);
        assert_eq!(pending["physicalstate_id"], physical["id"]);
        assert_eq!(pending["timestamp"], T0 + 60);

        let (status, digital) = post_json(&app, "/pendingdigitalstates", &pending).await;
        assert_eq!(status, StatusCode::OK, "{digital}");
        assert_eq!(keys(&digital), DIGITAL_KEYS);
        // First event of a new twin with the seed's ConfigMap: n = 1 of 6 expected, timely.
        assert_eq!(digital["availability"], json!(1.0));
        assert_eq!(real(&digital["reliability"]), (1.0f64 / 6.0) as f32);
        assert_eq!(digital["timeliness"], json!(1.0));
        assert_eq!(real(&digital["odte"]), (1.0f64 / 6.0) as f32);
        assert_eq!(digital["lifecycle"], "disentangled");

        let (status, echoed) = post_json(&app, "/digitalstates", &digital).await;
        assert_eq!(status, StatusCode::OK, "{echoed}");
        assert_eq!(echoed, digital);
    }
);

store_test!(
    a_twin_becomes_entangled_after_a_full_window_of_timely_events,
    |t| async move {
        let clock = TestClock::at(T0);
        let app = router(functions(&t.store, &clock));
        let mut last = Value::Null;
        for i in 0..6 {
            let device_ts = T0 + i * 5_000;
            clock.set(device_ts + 120);
            let (_, p) =
                post_json(&app, "/physicalevents", &seed_event("press-7", device_ts)).await;
            let (_, d) = post_json(&app, "/physicalstates", &p).await;
            let (status, digital) = post_json(&app, "/pendingdigitalstates", &d).await;
            assert_eq!(status, StatusCode::OK);
            let expected = if i < 5 { "disentangled" } else { "entangled" };
            assert_eq!(digital["lifecycle"], expected, "event {i}: {digital}");
            last = digital;
        }
        assert_eq!(last["odte"], json!(1.0));
    }
);

store_test!(
    a_redelivered_chain_answers_the_same_states_and_writes_nothing_new,
    |t| async move {
        let clock = TestClock::at(T0 + 10);
        let app = router(functions(&t.store, &clock));
        let event = seed_event("press-1", T0);
        let (_, p1) = post_json(&app, "/physicalevents", &event).await;
        let (_, d1) = post_json(&app, "/physicalstates", &p1).await;
        let (_, s1) = post_json(&app, "/pendingdigitalstates", &d1).await;
        clock.set(T0 + 9_000);
        let (_, p2) = post_json(&app, "/physicalevents", &event).await;
        let (_, d2) = post_json(&app, "/physicalstates", &p2).await;
        let (_, s2) = post_json(&app, "/pendingdigitalstates", &d2).await;
        assert_eq!((p1, d1, s1), (p2, d2, s2));
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            1
        );
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
            1
        );
    }
);

/// Sends `body` to `path` and expects a 400 naming `field`, and no row written.
async fn refused(
    t: &entwine_testing::TestStore,
    app: &axum::Router,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<axum::body::Body>,
    field: &str,
) {
    let before = scalar(&t.store, "SELECT (SELECT COUNT(*) FROM physicalstate) + (SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL) + (SELECT COUNT(*) FROM digitalstate)").await;
    let (status, answer) = send(app, path, content_type, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {field}: {answer}");
    assert_eq!(answer["field"], field, "{answer}");
    let error = answer["error"].as_str().expect("an error message");
    assert!(error.starts_with(&format!("{field}: ")), "{error}");
    let after = scalar(&t.store, "SELECT (SELECT COUNT(*) FROM physicalstate) + (SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL) + (SELECT COUNT(*) FROM digitalstate)").await;
    assert_eq!(
        before, after,
        "{path} {field}: a refused call wrote nothing"
    );
}

/// `value` with the field at `pointer` set (added when missing), as JSON text.
fn with(mut value: Value, pointer: &str, replacement: Value) -> String {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    let parent = value.pointer_mut(parent).expect("parent exists");
    parent
        .as_object_mut()
        .expect("parent is an object")
        .insert(key.to_owned(), replacement);
    value.to_string()
}

fn without(mut value: Value, key: &str) -> String {
    value.as_object_mut().unwrap().remove(key);
    value.to_string()
}

const JSON: Option<&str> = Some("application/json");

store_test!(
    every_kind_of_bad_physical_event_is_a_400_naming_the_field,
    |t| async move {
        let clock = TestClock::at(T0 + 10);
        let app = router(functions(&t.store, &clock));
        let good = seed_event("press-1", T0);
        let body = good.to_string();
        let big = with(
            good.clone(),
            "/data/payload_overhead",
            json!("a".repeat(MAX_BODY_BYTES)),
        );
        // (content type, body, field named in the 400)
        let cases: Vec<(Option<&str>, String, &str)> = vec![
            (JSON, "{\"timestamp\": ".into(), "body"),
            // Not an object (an array is a batch: see batches.rs).
            (JSON, "2".into(), "body"),
            (Some("text/plain"), body.clone(), "content-type"),
            (None, body.clone(), "content-type"),
            (JSON, without(good.clone(), "timestamp"), "timestamp"),
            (JSON, without(good.clone(), "device_id"), "device_id"),
            (JSON, without(good.clone(), "data"), "data"),
            (
                JSON,
                with(good.clone(), "/timestamp", json!("yesterday")),
                "timestamp",
            ),
            (JSON, with(good.clone(), "/data", json!([1, 2])), "data"),
            (
                JSON,
                with(good.clone(), "/data/iot.sensor.temperature", json!("27.4")),
                "data.iot.sensor.temperature",
            ),
            (
                JSON,
                with(good.clone(), "/device_id", json!(42)),
                "device_id",
            ),
            (
                JSON,
                with(good.clone(), "/type", json!("iot.sensor.energy")),
                "type",
            ),
            // Non-finite numbers, as Python's json module writes them.
            (
                JSON,
                body.replace("27.42", "NaN"),
                "data.iot.sensor.temperature",
            ),
            (
                JSON,
                body.replace("3.71", "Infinity"),
                "data.iot.sensor.energy",
            ),
            (
                JSON,
                body.replace("3.71", "1e999"),
                "data.iot.sensor.energy",
            ),
            // Timestamps: negative, in seconds (1970), in microseconds (far future).
            (
                JSON,
                with(good.clone(), "/timestamp", json!(-1)),
                "timestamp",
            ),
            (
                JSON,
                with(good.clone(), "/timestamp", json!(T0 / 1000)),
                "timestamp",
            ),
            (
                JSON,
                with(good.clone(), "/timestamp", json!(T0 * 1000)),
                "timestamp",
            ),
            // A body over 64 KiB, even when the rest is well-formed.
            (JSON, big.clone(), "body"),
        ];
        for (content_type, body, field) in cases {
            refused(&t, &app, "/physicalevents", content_type, body, field).await;
        }
        let (_, answer) = send(&app, "/physicalevents", JSON, big).await;
        assert_eq!(answer["error"], "body: larger than 65536 bytes");
        // Just under the limit is fine: the seed's payload filler is ignored.
        let filler = with(
            good.clone(),
            "/data/payload_overhead",
            json!("a".repeat(MAX_BODY_BYTES - 300)),
        );
        let (status, _) = send(&app, "/physicalevents", JSON, filler).await;
        assert_eq!(status, StatusCode::OK);
    }
);

store_test!(
    bad_states_in_the_later_functions_are_400s_naming_the_field,
    |t| async move {
        let clock = TestClock::at(T0 + 10);
        let app = router(functions(&t.store, &clock));
        let (_, physical) = post_json(&app, "/physicalevents", &seed_event("press-1", T0)).await;
        let (_, pending) = post_json(&app, "/physicalstates", &physical).await;
        let (_, digital) = post_json(&app, "/pendingdigitalstates", &pending).await;
        let unknown = pending["id"].as_i64().unwrap() + 1000;
        let unknown_physical = physical["id"].as_i64().unwrap() + 1000;
        // (route, body, field named in the 400)
        let cases = [
            (
                "/physicalstates",
                with(physical.clone(), "/id", json!(unknown_physical)),
                "id",
            ),
            (
                "/physicalstates",
                with(physical.clone(), "/id", json!("1")),
                "id",
            ),
            (
                "/physicalstates",
                with(physical.clone(), "/device_id", json!("press-2")),
                "device_id",
            ),
            (
                "/physicalstates",
                without(physical.clone(), "energy"),
                "energy",
            ),
            (
                "/physicalstates",
                with(physical.clone(), "/device_timestamp", json!(-5)),
                "device_timestamp",
            ),
            (
                "/pendingdigitalstates",
                with(pending.clone(), "/id", json!(unknown)),
                "id",
            ),
            (
                "/pendingdigitalstates",
                with(pending.clone(), "/physicalstate_id", json!(unknown)),
                "physicalstate_id",
            ),
            (
                "/pendingdigitalstates",
                with(pending.clone(), "/timestamp", json!(1.5)),
                "timestamp",
            ),
            (
                "/pendingdigitalstates",
                without(pending.clone(), "device_id"),
                "device_id",
            ),
            (
                "/digitalstates",
                with(digital.clone(), "/lifecycle", json!("lost")),
                "lifecycle",
            ),
            (
                "/digitalstates",
                with(digital.clone(), "/odte", json!(2.0)),
                "odte",
            ),
            (
                "/digitalstates",
                without(digital.clone(), "reliability"),
                "reliability",
            ),
        ];
        for (route, body, field) in cases {
            refused(&t, &app, route, JSON, body, field).await;
        }
    }
);

#[tokio::test]
async fn an_unreachable_store_is_a_503_and_the_function_keeps_serving() {
    let port = entwine_testing::free_port();
    let options = StoreOptions {
        max_connections: 1,
        acquire_timeout: std::time::Duration::from_millis(300),
    };
    let store = Store::open(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        &options,
    )
    .unwrap();
    let clock = TestClock::at(T0 + 10);
    let app = router(functions(&store, &clock));
    for _ in 0..2 {
        let (status, answer) = post_json(&app, "/physicalevents", &seed_event("press-1", T0)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(answer["error"], "store unavailable");
    }
    // Bad input is still told apart from an unavailable store.
    let (status, _) = send(&app, "/physicalevents", JSON, "nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_unmigrated_store_is_a_503_that_says_to_migrate() {
    let t = entwine_testing::TestStore::sqlite_empty();
    let clock = TestClock::at(T0 + 10);
    let app = router(functions(&t.store, &clock));
    let (status, answer) = post_json(&app, "/physicalevents", &seed_event("press-1", T0)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("entwine migrate"),
        "{answer}"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let t = entwine_testing::TestStore::sqlite().await;
    let clock = TestClock::at(T0);
    let app = router(functions(&t.store, &clock));
    let (status, answer) = post_json(&app, "/nowhere", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(answer["error"].as_str().unwrap().contains("/nowhere"));
    let response = tower::ServiceExt::oneshot(
        app,
        axum::http::Request::get("/physicalevents")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}
