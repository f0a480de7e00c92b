//! Batches through the four routes: a JSON array answered element by element, in order, with
//! exactly what one call per element answers and stores; the batch's limits; the routes that
//! take objects only; a failure of the store failing the whole batch.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use entwine_core::odte::OdteConfig;
use entwine_core::state::DigitalState;
use entwine_functions::handlers::TwinFunctions;
use entwine_functions::http::{router, MAX_BATCH_BODY_BYTES, MAX_BATCH_ELEMENTS, MAX_BODY_BYTES};
use entwine_store::{Store, TwinChange};
use entwine_testing::{execute, scalar, store_test, TestStore};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::support::*;

const ROUTES: [&str; 4] = [
    "/physicalevents",
    "/physicalstates",
    "/pendingdigitalstates",
    "/digitalstates",
];

const JSON: Option<&str> = Some("application/json");

/// The time of route `route` (0 to 3) of batch `batch`: batches 5 s apart, each route 100 ms
/// after the previous one. One event at a time, each event's call to a route reads the time
/// its batch's call to that route reads.
fn now(batch: usize, route: usize) -> i64 {
    T0 + 5_000 * batch as i64 + 500 + 100 * route as i64
}

/// A device's event measured at `T0 + at`.
fn event(device: &str, at: i64, temperature: f64, energy: f64) -> Value {
    json!({
        "timestamp": T0 + at,
        "type": "iot.sensor.state.aggregated",
        "data": {"iot.sensor.energy": energy, "iot.sensor.temperature": temperature},
        "device_id": device
    })
}

/// The sequence, in batches: three devices, late events, duplicates (in one batch and across
/// batches), refusals in the middle (a bad field, a conflict, an element that is no object).
fn batches() -> Vec<Vec<Value>> {
    let bad = json!({
        "timestamp": T0 + 300,
        "data": {"iot.sensor.energy": 1.5, "iot.sensor.temperature": "21.0"},
        "device_id": "d3"
    });
    vec![
        vec![
            event("d1", 0, 20.5, 1.25),   // 0
            event("d2", 100, 30.0, 2.5),  // 1
            event("d1", 200, 20.75, 1.5), // 2: a later state of d1 in the same batch
            event("d1", 0, 20.5, 1.25),   // 3: 0 again, in the same batch
            bad,                          // 4: refused alone
            event("d3", 300, 21.0, 1.5),  // 5
        ],
        vec![
            event("d1", 5_000, 21.0, 1.75), // 6
            event("d2", 100, 30.0, 2.5),    // 7: 1 again, a batch later
            event("d3", 300, 22.0, 1.5),    // 8: d3's key of 5, other readings: a conflict
            event("d1", 1_000, 20.25, 1.0), // 9: late (older than 6), and not timely
            event("d2", 5_200, 30.5, 2.75), // 10
        ],
        vec![
            event("d1", 10_000, 21.5, 2.0),  // 11
            event("d3", 10_100, 22.5, 1.75), // 12
            event("d1", 10_000, 21.5, 2.0),  // 13: 11 again, two elements later
            json!(42),                       // 14: not an object
            event("d2", 10_200, 31.0, 3.0),  // 15
        ],
    ]
}

/// What one run answered and announced.
#[derive(Debug, PartialEq)]
struct Run {
    /// `[batch][route]`: the answer of each element that reached the route, in order, as an
    /// element of a batch's answer (an error with its `status`).
    answers: Vec<[Vec<Value>; 4]>,
    /// The digital feed and the lifecycle feed, in order.
    digital: Vec<DigitalState>,
    lifecycle: Vec<TwinChange>,
}

/// The app of a fresh set of functions on `store`, with its clock and both feeds.
fn app(
    store: &Store,
) -> (
    Router,
    Arc<TestClock>,
    broadcast::Receiver<DigitalState>,
    broadcast::Receiver<TwinChange>,
) {
    let clock = TestClock::at(T0);
    let (digital, digital_rx) = broadcast::channel(1024);
    let (lifecycle, lifecycle_rx) = broadcast::channel(1024);
    let functions = TwinFunctions::new(store.clone(), OdteConfig::seed_default(), clock.clone())
        .with_feed(digital)
        .with_lifecycle_feed(lifecycle);
    (router(Arc::new(functions)), clock, digital_rx, lifecycle_rx)
}

fn drain<T: Clone>(rx: &mut broadcast::Receiver<T>) -> Vec<T> {
    let mut items = Vec::new();
    while let Ok(item) = rx.try_recv() {
        items.push(item);
    }
    items
}

/// A single call's answer as the element of a batch's answer would be.
fn as_element(status: StatusCode, mut answer: Value) -> Value {
    if status != StatusCode::OK {
        answer
            .as_object_mut()
            .expect("an error object")
            .insert("status".to_owned(), json!(status.as_u16()));
    }
    answer
}

fn is_error(answer: &Value) -> bool {
    answer.get("error").is_some()
}

/// Each event through all four routes before the next, as a connector's lane does.
async fn one_at_a_time(store: &Store) -> Run {
    let (app, clock, mut digital, mut lifecycle) = app(store);
    let mut answers = Vec::new();
    for (k, batch) in batches().into_iter().enumerate() {
        let mut routes: [Vec<Value>; 4] = Default::default();
        for event in batch {
            let mut body = event;
            for (r, route) in ROUTES.into_iter().enumerate() {
                clock.set(now(k, r));
                let (status, answer) = post_json(&app, route, &body).await;
                let element = as_element(status, answer);
                routes[r].push(element.clone());
                if status != StatusCode::OK {
                    break;
                }
                body = element;
            }
        }
        answers.push(routes);
    }
    Run {
        answers,
        digital: drain(&mut digital),
        lifecycle: drain(&mut lifecycle),
    }
}

/// Each batch through route 1, then its answers that are not errors through route 2, and so
/// on, as a batching connector does.
async fn in_batches(store: &Store) -> Run {
    let (app, clock, mut digital, mut lifecycle) = app(store);
    let mut answers = Vec::new();
    for (k, batch) in batches().into_iter().enumerate() {
        let mut routes: [Vec<Value>; 4] = Default::default();
        let mut inputs = batch;
        for (r, route) in ROUTES.into_iter().enumerate() {
            clock.set(now(k, r));
            let (status, answer) = post_json(&app, route, &Value::Array(inputs.clone())).await;
            assert_eq!(status, StatusCode::OK, "batch {k} on {route}: {answer}");
            let elements = answer.as_array().expect("an array").clone();
            assert_eq!(elements.len(), inputs.len(), "batch {k} on {route}");
            routes[r] = elements.clone();
            inputs = elements.into_iter().filter(|a| !is_error(a)).collect();
        }
        answers.push(routes);
    }
    Run {
        answers,
        digital: drain(&mut digital),
        lifecycle: drain(&mut lifecycle),
    }
}

/// Every row of `table`, all columns, as JSON text, in `order`.
async fn rows(store: &Store, table: &str, order: &str) -> Vec<String> {
    match store {
        Store::Postgres(pool) => sqlx::query_scalar::<_, String>(&format!(
            "SELECT row_to_json(t)::text FROM {table} t ORDER BY {order}"
        ))
        .fetch_all(pool)
        .await
        .unwrap(),
        Store::Sqlite(pool) => {
            let columns: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
            ))
            .fetch_all(pool)
            .await
            .unwrap();
            assert!(!columns.is_empty(), "{table} has columns");
            let pairs: Vec<String> = columns.iter().map(|c| format!("'{c}', \"{c}\"")).collect();
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT json_object({}) FROM {table} ORDER BY {order}",
                pairs.join(", ")
            ))
            .fetch_all(pool)
            .await
            .unwrap()
        }
    }
}

/// The figures (reliability, timeliness, ODTE) of a digital state.
fn figures(digital: &Value) -> (f32, f32, f32) {
    assert_eq!(digital["availability"], json!(1.0), "{digital}");
    (
        real(&digital["reliability"]),
        real(&digital["timeliness"]),
        real(&digital["odte"]),
    )
}

/// `(r, t, r·t)` as stored: the seed's 6 expected states per 30 s window, availability 1.
fn expected(reliability: f64, timeliness: f64, odte: f64) -> (f32, f32, f32) {
    (reliability as f32, timeliness as f32, odte as f32)
}

async fn a_batched_run_answers_and_stores_what_one_event_at_a_time_does(
    single: TestStore,
    batched: TestStore,
) {
    let one = one_at_a_time(&single.store).await;
    let many = in_batches(&batched.store).await;

    // The figures, worked out by hand. Every state of the sequence is in every later state's
    // 30 s window; a state is timely when mirrored within 1 s of its measurement (the shadow
    // handler stamps batch k at T0 + 5 000 k + 600). Each state counts only the states of its
    // device up to it, not the later ones of its own batch.
    let twin = |k: usize| -> Vec<(&str, (f32, f32, f32))> {
        many.answers[k][2]
            .iter()
            .map(|d| (d["device_id"].as_str().unwrap(), figures(d)))
            .collect()
    };
    assert_eq!(
        twin(0),
        [
            ("d1", expected(1.0 / 6.0, 1.0, 1.0 / 6.0)), // 0: d1 n = 1 (not 2)
            ("d2", expected(1.0 / 6.0, 1.0, 1.0 / 6.0)), // 1
            ("d1", expected(2.0 / 6.0, 1.0, 2.0 / 6.0)), // 2: n = 2
            ("d1", expected(1.0 / 6.0, 1.0, 1.0 / 6.0)), // 3: 0's, as stored
            ("d3", expected(1.0 / 6.0, 1.0, 1.0 / 6.0)), // 5
        ]
    );
    assert_eq!(
        twin(1),
        [
            ("d1", expected(3.0 / 6.0, 1.0, 3.0 / 6.0)), // 6: n = 3 (not 4)
            ("d2", expected(1.0 / 6.0, 1.0, 1.0 / 6.0)), // 7: 1's, as stored
            ("d1", expected(4.0 / 6.0, 3.0 / 4.0, 0.5)), // 9: n = 4, 3 timely (9 is 4.6 s late)
            ("d2", expected(2.0 / 6.0, 1.0, 2.0 / 6.0)), // 10: n = 2
        ]
    );
    assert_eq!(
        twin(2),
        [
            ("d1", expected(5.0 / 6.0, 4.0 / 5.0, 2.0 / 3.0)), // 11: n = 5, 4 timely
            ("d3", expected(2.0 / 6.0, 1.0, 2.0 / 6.0)),       // 12: n = 2
            ("d1", expected(5.0 / 6.0, 4.0 / 5.0, 2.0 / 3.0)), // 13: 11's, as stored
            ("d2", expected(3.0 / 6.0, 1.0, 3.0 / 6.0)),       // 15: n = 3
        ]
    );
    for k in 0..3 {
        for d in &many.answers[k][2] {
            assert_eq!(d["lifecycle"], "disentangled", "{d}");
        }
        // The digital-event handler echoes exactly what the twin handler answered.
        assert_eq!(many.answers[k][3], many.answers[k][2], "batch {k}");
    }
    // The refusals, each alone, in its place.
    assert_eq!(
        many.answers[0][0][4],
        json!({
            "error": "data.iot.sensor.temperature: expected a number, got a string",
            "field": "data.iot.sensor.temperature",
            "status": 400
        })
    );
    let conflict = &many.answers[1][0][2];
    assert_eq!(conflict["status"], 409, "{conflict}");
    assert_eq!(conflict["field"], "timestamp", "{conflict}");
    assert_eq!(
        many.answers[2][0][3],
        json!({
            "error": "body: expected a JSON object, got a number",
            "field": "body",
            "status": 400
        })
    );
    // Redeliveries answer the first answer, in a batch or across batches.
    assert_eq!(many.answers[0][0][3], many.answers[0][0][0]);
    assert_eq!(many.answers[1][0][1], many.answers[0][0][1]);
    assert_eq!(many.answers[2][0][2], many.answers[2][0][0]);
    // Every twin bound by its first state, announced once each, in the batch's order.
    let bound: Vec<(&str, Option<&str>, &str)> = many
        .lifecycle
        .iter()
        .map(|c| {
            (
                c.device_id.as_str(),
                c.from.map(|l| l.as_str()),
                c.to.as_str(),
            )
        })
        .collect();
    assert_eq!(
        bound,
        [
            ("d1", None, "bound"),
            ("d2", None, "bound"),
            ("d3", None, "bound")
        ]
    );
    assert_eq!(
        many.digital.len(),
        13,
        "every digital state accepted, announced"
    );

    // The same answers, element by element, and the same announcements, in the same order.
    for k in 0..3 {
        for (r, route) in ROUTES.into_iter().enumerate() {
            assert_eq!(many.answers[k][r], one.answers[k][r], "batch {k}, {route}");
        }
    }
    assert_eq!(many, one);

    // The same rows, all columns.
    for (table, order) in [
        ("physicalstate", "id"),
        ("digitalstate", "id"),
        ("digitalstate_window", "digitalstate_id"),
        ("twin", "device_id"),
    ] {
        let stored = rows(&batched.store, table, order).await;
        assert_eq!(stored, rows(&single.store, table, order).await, "{table}");
        let expected = match table {
            "twin" => 3,
            _ => 10, // 16 elements: 2 refused, 4 repeated
        };
        assert_eq!(stored.len(), expected, "{table}: {stored:#?}");
    }
    assert_eq!(
        scalar(
            &batched.store,
            "SELECT COUNT(*) FROM digitalstate WHERE odte IS NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_run_is_one_event_at_a_time_on_postgres() {
    a_batched_run_answers_and_stores_what_one_event_at_a_time_does(
        TestStore::postgres().await,
        TestStore::postgres().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_run_is_one_event_at_a_time_on_sqlite() {
    a_batched_run_answers_and_stores_what_one_event_at_a_time_does(
        TestStore::sqlite().await,
        TestStore::sqlite().await,
    )
    .await;
}

store_test!(
    a_batch_is_answered_200_with_answers_and_errors_in_order,
    |t| async move {
        let clock = TestClock::at(T0 + 40);
        let app = router(functions(&t.store, &clock));
        let batch = json!([
            seed_event("press-1", T0),
            {"timestamp": T0, "data": {"iot.sensor.energy": 3.71}, "device_id": "press-2"},
            "press-3",
            {"timestamp": T0, "data": {"iot.sensor.energy": 9.5, "iot.sensor.temperature": 27.42},
             "device_id": "press-1"},
            seed_event("press-4", T0 + 10),
        ]);
        let (status, answer) = post_json(&app, "/physicalevents", &batch).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let answers = answer.as_array().expect("an array");
        assert_eq!(answers.len(), 5);
        assert_eq!(keys(&answers[0]), PHYSICAL_STATE_KEYS);
        assert_eq!(answers[0]["device_id"], "press-1");
        assert_eq!(answers[0]["device_timestamp"], T0);
        assert_eq!(answers[0]["timestamp"], T0 + 40);
        assert_eq!(answers[0]["temperature"], json!(27.42));
        assert_eq!(answers[0]["energy"], json!(3.71));
        assert_eq!(
            answers[1],
            json!({
                "error": "data.iot.sensor.temperature: missing",
                "field": "data.iot.sensor.temperature",
                "status": 400
            })
        );
        assert_eq!(
            answers[2],
            json!({
                "error": "body: expected a JSON object, got a string",
                "field": "body",
                "status": 400
            })
        );
        // A different event under press-1's key: the single call's 409, with its status.
        let (status, single) = post_json(&app, "/physicalevents", &batch[3]).await;
        assert_eq!(status, StatusCode::CONFLICT, "{single}");
        assert_eq!(answers[3], as_element(status, single));
        assert_eq!(answers[3]["field"], "timestamp");
        assert_eq!(answers[4]["device_id"], "press-4");
        assert_ne!(answers[4]["id"], answers[0]["id"]);
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            2
        );

        // The next route takes the answers; an unknown id is refused alone.
        let mut unknown = answers[4].clone();
        unknown["id"] = json!(answers[4]["id"].as_i64().unwrap() + 100);
        clock.set(T0 + 60);
        let next = json!([answers[0], unknown, answers[4]]);
        let (status, pending) = post_json(&app, "/physicalstates", &next).await;
        assert_eq!(status, StatusCode::OK, "{pending}");
        let pending = pending.as_array().unwrap();
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[0]["physicalstate_id"], answers[0]["id"]);
        assert_eq!(pending[0]["timestamp"], T0 + 60);
        assert_eq!(pending[1]["status"], 400, "{}", pending[1]);
        assert_eq!(pending[1]["field"], "id", "{}", pending[1]);
        assert_eq!(pending[2]["physicalstate_id"], answers[4]["id"]);
    }
);

store_test!(
    the_digital_event_handler_announces_a_batch_in_its_order_and_never_a_forged_state,
    |t| async move {
        let clock = TestClock::at(T0 + 40);
        let (feed, mut announced) = broadcast::channel(16);
        let functions =
            TwinFunctions::new(t.store.clone(), OdteConfig::seed_default(), clock.clone())
                .with_feed(feed);
        let app = router(Arc::new(functions));
        let events = json!([seed_event("press-1", T0), seed_event("press-2", T0 + 5)]);
        let (_, physical) = post_json(&app, "/physicalevents", &events).await;
        let (_, pending) = post_json(&app, "/physicalstates", &physical).await;
        let (_, digital) = post_json(&app, "/pendingdigitalstates", &pending).await;
        let mut forged = digital[0].clone();
        forged["odte"] = json!(1.0);
        let batch = json!([digital[1], forged, digital[0]]);
        let (status, echoed) = post_json(&app, "/digitalstates", &batch).await;
        assert_eq!(status, StatusCode::OK, "{echoed}");
        assert_eq!(echoed[0], digital[1]);
        assert_eq!(echoed[1]["field"], "odte", "{}", echoed[1]);
        assert_eq!(echoed[1]["status"], 400, "{}", echoed[1]);
        assert_eq!(echoed[2], digital[0]);
        let ids: Vec<i32> = drain(&mut announced).iter().map(|d| d.pending.id).collect();
        let id = |v: &Value| v["id"].as_i64().unwrap() as i32;
        assert_eq!(ids, [id(&digital[1]), id(&digital[0])]);
    }
);

store_test!(
    a_corrupt_row_is_an_internal_error_of_its_element_alone,
    |t| async move {
        let clock = TestClock::at(T0 + 40);
        let app = router(functions(&t.store, &clock));
        let events = json!([seed_event("press-1", T0), seed_event("press-2", T0)]);
        let (_, physical) = post_json(&app, "/physicalevents", &events).await;
        let (_, pending) = post_json(&app, "/physicalstates", &physical).await;
        let (_, first) = post_json(&app, "/pendingdigitalstates", &pending[0]).await;
        assert_eq!(first["device_id"], "press-1");
        execute(
            &t.store,
            "UPDATE twin SET lifecycle = 'haunted' WHERE device_id = 'press-1'",
        )
        .await;
        let (status, answer) = post_json(&app, "/pendingdigitalstates", &pending).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer[0], json!({"error": "internal error", "status": 500}));
        assert_eq!(answer[1]["device_id"], "press-2");
        assert_eq!(real(&answer[1]["reliability"]), (1.0f64 / 6.0) as f32);
    }
);

/// A batch of `n` copies of the seed's event, each with `filler` bytes of ignored payload.
fn batch_of(n: usize, filler: usize) -> String {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            let mut event = seed_event("press-1", T0 + i as i64);
            event["data"]["payload_overhead"] = json!("a".repeat(filler));
            event
        })
        .collect();
    Value::Array(events).to_string()
}

store_test!(
    a_batch_has_its_own_limits_and_is_refused_whole_past_them,
    |t| async move {
        let clock = TestClock::at(T0 + MAX_BATCH_ELEMENTS as i64 + 40);
        let app = router(functions(&t.store, &clock));
        let refused = |answer: &Value, error: &str| {
            assert_eq!(answer, &json!({"error": error, "field": "body"}));
        };
        let (status, answer) = send(&app, "/physicalevents", JSON, "[]").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refused(&answer, "body: empty batch: expected 1 to 256 elements");

        let (status, answer) = send(
            &app,
            "/physicalevents",
            JSON,
            batch_of(MAX_BATCH_ELEMENTS + 1, 0),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refused(
            &answer,
            "body: a batch of 257 elements, more than the limit of 256",
        );

        let (status, answer) = send(
            &app,
            "/physicalevents",
            JSON,
            batch_of(1, MAX_BATCH_BODY_BYTES),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refused(&answer, "body: larger than 1048576 bytes");
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            0,
            "a refused batch writes nothing"
        );

        // At the limits: 256 elements, of 3 KiB each, 768 KiB in all, over an object's 64 KiB.
        let (status, answer) = send(
            &app,
            "/physicalevents",
            JSON,
            batch_of(MAX_BATCH_ELEMENTS, 3 * 1024),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let answers = answer.as_array().unwrap();
        assert_eq!(answers.len(), MAX_BATCH_ELEMENTS);
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(keys(answer), PHYSICAL_STATE_KEYS, "{answer}");
            assert_eq!(answer["device_timestamp"], T0 + i as i64, "{answer}");
        }
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            256
        );
        // An element is held to what it would be alone: over 64 KiB, it is refused, alone.
        let mut big = seed_event("press-2", T0);
        big["data"]["payload_overhead"] = json!("a".repeat(MAX_BODY_BYTES));
        let mut fits = seed_event("press-2", T0 + 1);
        fits["data"]["payload_overhead"] = json!("a".repeat(MAX_BODY_BYTES - 300));
        let (status, single) = post_json(&app, "/physicalevents", &big).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, answer) = post_json(
            &app,
            "/physicalevents",
            &json!([seed_event("press-2", T0 + 2), big, fits]),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer[0]["device_timestamp"], T0 + 2);
        assert_eq!(
            answer[1],
            json!({"error": "body: larger than 65536 bytes", "field": "body", "status": 400})
        );
        assert_eq!(answer[1], as_element(StatusCode::BAD_REQUEST, single));
        assert_eq!(answer[2]["device_timestamp"], T0 + 1);
        // A number out of range is refused in its element, naming its field, as alone.
        let body = format!(
            "[{}, {}]",
            seed_event("press-3", T0),
            seed_event("press-3", T0 + 1)
                .to_string()
                .replace("3.71", "1e999")
        );
        let (status, answer) = send(&app, "/physicalevents", JSON, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer[0]["device_id"], "press-3");
        assert_eq!(
            answer[1],
            json!({
                "error": "data.iot.sensor.energy: must be a finite number, got 1e999",
                "field": "data.iot.sensor.energy",
                "status": 400
            })
        );
        // NaN is not JSON: the body is refused whole, naming the element and its field.
        let body = format!(
            "[{}, {}]",
            seed_event("press-3", T0 + 2),
            seed_event("press-3", T0 + 3)
                .to_string()
                .replace("3.71", "NaN")
        );
        let (status, answer) = send(&app, "/physicalevents", JSON, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            answer,
            json!({
                "error": "[1].data.iot.sensor.energy: must be a finite number, got NaN",
                "field": "[1].data.iot.sensor.energy"
            })
        );
        // An object is still held to 64 KiB, with leading whitespace or without.
        let object = format!("  \n{}", seed_event("press-1", T0)).replace(
            "\"data\":{",
            &format!("\"data\":{{\"x\":\"{}\",", "a".repeat(64 * 1024)),
        );
        let (status, answer) = send(&app, "/physicalevents", JSON, object).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refused(&answer, "body: larger than 65536 bytes");
        // A batch is JSON like an object: not JSON, or a wrong content type, is refused whole.
        let (status, answer) = send(&app, "/physicalevents", JSON, "[{\"timestamp\": 1,").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(answer["field"], "body");
        let (status, answer) = send(&app, "/physicalevents", Some("text/plain"), "[]").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(answer["field"], "content-type");
    }
);

store_test!(
    the_evaluator_and_the_dead_letter_handler_take_no_batch,
    |t| async move {
        let clock = TestClock::at(T0 + 40);
        let app = router(functions(&t.store, &clock));
        let letter = json!({
            "topic": "device/press-1/telemetry/device_state",
            "stage": "physicalevents",
            "status": 400,
            "error": "timestamp: missing",
            "payload": "{}"
        });
        let (status, answer) = post_json(&app, "/deadletters", &json!([letter])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(
            answer,
            json!({"error": "body: expected a JSON object, got an array", "field": "body"})
        );
        let (status, answer) = send(&app, "/twinevaluations", JSON, " [{}]").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(
            answer,
            json!({"error": "body: expected a JSON object, got an array", "field": "body"})
        );
        assert_eq!(scalar(&t.store, "SELECT COUNT(*) FROM deadletter").await, 0);
        // The evaluator still ignores any other body, as a timer sends it.
        for body in ["", "{}", "tick"] {
            let (status, answer) = send(&app, "/twinevaluations", None, body).await;
            assert_eq!(status, StatusCode::OK, "{body:?}: {answer}");
            assert_eq!(answer["evaluated_at"], T0 + 40);
        }
    }
);

#[tokio::test]
async fn a_failure_of_the_store_fails_the_whole_batch_as_the_single_call() {
    let t = TestStore::sqlite_empty();
    let clock = TestClock::at(T0 + 10);
    let app = router(functions(&t.store, &clock));
    let event = seed_event("press-1", T0);
    let (status, single) = post_json(&app, "/physicalevents", &event).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{single}");
    let (status, batch) = post_json(&app, "/physicalevents", &json!([event, 7])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{batch}");
    assert_eq!(batch, single);
}
