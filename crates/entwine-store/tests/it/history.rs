//! History: a twin's states in time buckets (`Store::series`), and retention
//! (`Store::apply_retention`) deleting old states without changing any window's figures.

use std::collections::BTreeMap;

use entwine_core::model::{ModelReadings, Profiles};
use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent, Readings};
use entwine_store::{retention_guard_ms, Aggregate, Store, StoreError, RETENTION_MARGIN_MS};
use entwine_testing::{execute, scalar, store_test};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

fn event(device: &str, device_timestamp: i64, readings: Readings) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings,
    }
}

/// A state of `device` mirrored at `at` (10 ms after it was measured), not evaluated; answers
/// the digital state's id.
async fn shadow(store: &Store, device: &str, at: i64, readings: Readings) -> i32 {
    shadow_late(store, device, at, 10, readings).await
}

/// The same, measured `latency_ms` before it is mirrored.
async fn shadow_late(
    store: &Store,
    device: &str,
    at: i64,
    latency_ms: i64,
    readings: Readings,
) -> i32 {
    let (physical, _) = store
        .record_physical_event(&event(device, at - latency_ms, readings), at)
        .await
        .unwrap();
    store.record_shadow(&physical, at).await.unwrap().0.id
}

/// A state mirrored at `at` and evaluated by the twin handler; answers its id.
async fn evaluated(store: &Store, config: &OdteConfig, device: &str, at: i64) -> i32 {
    let (physical, _) = store
        .record_physical_event(&event(device, at - 10, Readings::seed(20.0, 1.0)), at)
        .await
        .unwrap();
    let (pending, _) = store.record_shadow(&physical, at).await.unwrap();
    store
        .evaluate_digital_state(&pending, config)
        .await
        .unwrap()
        .0
        .pending
        .id
}

/// Sets a state's figures by hand, so the aggregates can be worked out exactly.
async fn figures(store: &Store, id: i32, a: f32, r: f32, t: f32, odte: f32, lifecycle: &str) {
    execute(
        store,
        &format!(
            "UPDATE digitalstate SET availability = {a}, reliability = {r}, timeliness = {t}, \
             odte = {odte}, lifecycle = '{lifecycle}' WHERE id = {id}"
        ),
    )
    .await;
}

fn agg(avg: f64, min: f64, max: f64) -> Aggregate {
    Aggregate { avg, min, max }
}

store_test!(
    a_series_groups_the_states_of_the_range_into_buckets_aggregated_in_the_database,
    |t| async move {
        let store = &t.store;
        // Bucket 0 [T0, T0 + 1 s): three evaluated states, the latest disentangled.
        let a = shadow(store, "iiot-1", T0, Readings::seed(20.0, 1.0)).await;
        let b = shadow(store, "iiot-1", T0 + 400, Readings::seed(22.0, 2.0)).await;
        let c = shadow(store, "iiot-1", T0 + 999, Readings::seed(24.0, 3.0)).await;
        figures(store, a, 1.0, 0.5, 1.0, 0.5, "entangled").await;
        figures(store, b, 1.0, 1.0, 1.0, 1.0, "entangled").await;
        figures(store, c, 1.0, 0.75, 0.25, 0.75, "disentangled").await;
        // Bucket 1: one state not evaluated yet. Bucket 2: none.
        shadow(store, "iiot-1", T0 + 1000, Readings::seed(30.0, 5.0)).await;
        // Bucket 3: two states at the same instant; the later id decides the lifecycle.
        let d = shadow(store, "iiot-1", T0 + 3500, Readings::seed(10.0, 0.5)).await;
        let e = shadow_late(store, "iiot-1", T0 + 3500, 20, Readings::seed(12.0, 1.5)).await;
        figures(store, d, 0.5, 0.25, 1.0, 0.25, "disentangled").await;
        figures(store, e, 1.0, 0.75, 1.0, 0.75, "entangled").await;
        // Outside the range [T0, T0 + 4 s), or another device's.
        shadow(store, "iiot-1", T0 - 1, Readings::seed(99.0, 99.0)).await;
        shadow(store, "iiot-1", T0 + 4000, Readings::seed(99.0, 99.0)).await;
        shadow(store, "iiot-2", T0 + 500, Readings::seed(99.0, 99.0)).await;

        let series = store.series("iiot-1", T0, T0 + 4000, 1000).await.unwrap();
        assert_eq!(
            (
                series.device_id.as_str(),
                series.from,
                series.to,
                series.step
            ),
            ("iiot-1", T0, T0 + 4000, 1000)
        );
        let starts: Vec<i64> = series.buckets.iter().map(|b| b.t).collect();
        assert_eq!(starts, [T0, T0 + 1000, T0 + 3000], "empty bucket 2 omitted");

        let first = &series.buckets[0];
        assert_eq!(first.count, 3);
        assert_eq!(first.odte, Some(agg(0.75, 0.5, 1.0)));
        assert_eq!(first.availability, Some(1.0));
        assert_eq!(first.reliability, Some(0.75));
        assert_eq!(first.timeliness, Some(0.75));
        assert_eq!(first.lifecycle.as_deref(), Some("disentangled"));
        assert_eq!(
            first.readings,
            BTreeMap::from([
                ("energy".to_owned(), agg(2.0, 1.0, 3.0)),
                ("temperature".to_owned(), agg(22.0, 20.0, 24.0)),
            ])
        );

        let pending = &series.buckets[1];
        assert_eq!(pending.count, 1);
        assert_eq!(
            (
                pending.odte,
                pending.availability,
                pending.lifecycle.as_deref()
            ),
            (None, None, None),
            "a state without figures is skipped by the aggregates"
        );
        assert_eq!(
            pending.readings["temperature"],
            agg(30.0, 30.0, 30.0),
            "its readings still count"
        );

        let last = &series.buckets[2];
        assert_eq!(last.count, 2);
        assert_eq!(last.odte, Some(agg(0.5, 0.25, 0.75)));
        assert_eq!(last.availability, Some(0.75));
        assert_eq!(last.lifecycle.as_deref(), Some("entangled"));
        assert_eq!(last.readings["energy"], agg(1.0, 0.5, 1.5));

        // One bucket over the whole range.
        let whole = store.series("iiot-1", T0, T0 + 4000, 10_000).await.unwrap();
        assert_eq!(whole.buckets.len(), 1);
        assert_eq!(whole.buckets[0].count, 6);
        assert_eq!(whole.buckets[0].odte, Some(agg(0.65, 0.25, 1.0)));
        assert_eq!(whole.buckets[0].lifecycle.as_deref(), Some("entangled"));

        // A device without states: no buckets.
        let none = store.series("nobody", T0, T0 + 4000, 1000).await.unwrap();
        assert!(none.buckets.is_empty());

        // Bad ranges name the parameter.
        for (from, to, step, field) in [
            (T0, T0, 1000, "from"),
            (T0 + 1, T0, 1000, "from"),
            (T0, T0 + 1, 0, "step"),
            (T0, T0 + 1, -5, "step"),
        ] {
            match store.series("iiot-1", from, to, step).await {
                Err(StoreError::Rejected(e)) => assert_eq!(e.field, field),
                other => panic!("{from} {to} {step}: {other:?}"),
            }
        }
    }
);

store_test!(
    a_model_devices_series_aggregates_its_numeric_readings,
    |t| async move {
        let store = &t.store;
        let press = |force: f64, strokes: u64| {
            Readings::Model(ModelReadings {
                model: "press".into(),
                model_version: "2.1.0".into(),
                readings: json!({"force": force, "strokes": strokes, "running": true,
                                 "mode": "auto"})
                .as_object()
                .cloned()
                .unwrap(),
            })
        };
        shadow(store, "press-1", T0 + 100, press(100.5, 7)).await;
        shadow(store, "press-1", T0 + 900, press(102.5, 9)).await;
        shadow(store, "press-1", T0 + 60_000, press(90.0, 10)).await;
        let series = store
            .series("press-1", T0, T0 + 120_000, 60_000)
            .await
            .unwrap();
        assert_eq!(series.buckets.len(), 2);
        assert_eq!(series.buckets[0].count, 2);
        assert_eq!(
            series.buckets[0].readings,
            BTreeMap::from([
                ("force".to_owned(), agg(101.5, 100.5, 102.5)),
                ("strokes".to_owned(), agg(8.0, 7.0, 9.0)),
            ]),
            "booleans and strings are skipped"
        );
        assert_eq!(series.buckets[1].t, T0 + 60_000);
        assert_eq!(series.buckets[1].readings["strokes"], agg(10.0, 10.0, 10.0));
    }
);

/// 1 update/s expected over a 10 s window.
fn config() -> OdteConfig {
    OdteConfig::new(1.0, 10.0, 1.0, 0.9).unwrap()
}

async fn count(store: &Store, sql: &str) -> i64 {
    scalar(store, sql).await
}

store_test!(
    retention_deletes_exactly_the_old_history_and_keeps_what_windows_read,
    |t| async move {
        let store = &t.store;
        let config = config();
        let guard = retention_guard_ms(&config);
        assert_eq!(guard, 10_000 + RETENTION_MARGIN_MS);
        // iiot-1: a state a minute for an hour, T0 … T0 + 60 min (61 states).
        let mut ids = Vec::new();
        for k in 0..=60 {
            ids.push(evaluated(store, &config, "iiot-1", T0 + k * 60_000).await);
        }
        // A state a minute never fills a 10 s window: the twin's row, written on lifecycle
        // changes only, names one of its first states, which retention keeps.
        let bound = store.twin("iiot-1").await.unwrap().unwrap();
        let twins_state = bound.digital_state_id.unwrap();
        let k = ids.iter().position(|id| *id == twins_state).unwrap();
        assert!(k < 29, "the twin's row names state {k}");
        // A physical state of iiot-1 whose chain stopped before the shadow.
        store
            .record_physical_event(
                &event("iiot-1", T0 + 90, Readings::seed(1.0, 1.0)),
                T0 + 100,
            )
            .await
            .unwrap();
        // iiot-2 fell silent long ago: three states in its first two seconds.
        for k in 0..3 {
            evaluated(store, &config, "iiot-2", T0 + k * 1000).await;
        }
        let silent = store.twin("iiot-2").await.unwrap().unwrap();
        // Two dead letters, one old, one recent.
        execute(
            store,
            &format!(
                "INSERT INTO deadletter (topic, stage, error, payload_bytes, payload_sha256, \
                 payload_prefix, truncated, first_at, last_at) VALUES \
                 ('device/a/telemetry/device_state', 'physical', 'bad', 1, '{}', 'x', false, {T0}, {T0}), \
                 ('device/b/telemetry/device_state', 'physical', 'bad', 1, '{}', 'x', false, {T0}, {})",
                "a".repeat(64),
                "b".repeat(64),
                T0 + 3_600_000
            ),
        )
        .await;

        // Keep 30 min at T0 + 60 min: cutoff T0 + 30 min (the guard is shorter).
        let now = T0 + 3_600_000;
        let report = store
            .apply_retention(Some(1_800_000), now, guard)
            .await
            .unwrap();
        assert_eq!(report.cutoff_ms, Some(T0 + 1_800_000));
        // iiot-1: states 0…29 are before the cutoff; 29 is the last before it and k the
        // twin's, both kept: 28 deleted. iiot-2: all three before it, 0 the twin's and 2 the
        // last: 1. Physical: the same 29 and the one without a digital state.
        assert_eq!(
            (
                report.digital_states,
                report.physical_states,
                report.dead_letters
            ),
            (29, 30, 1)
        );
        let remaining = |device: &str| {
            format!("SELECT COUNT(*) FROM digitalstate WHERE device_id = '{device}'")
        };
        assert_eq!(count(store, &remaining("iiot-1")).await, 33);
        assert_eq!(count(store, &remaining("iiot-2")).await, 2);
        assert_eq!(
            count(
                store,
                &format!(
                    "SELECT MIN(timestamp) FROM digitalstate WHERE device_id = 'iiot-1' \
                     AND id <> {twins_state}"
                )
            )
            .await,
            T0 + 29 * 60_000
        );
        assert_eq!(
            count(
                store,
                "SELECT COUNT(*) FROM physicalstate WHERE device_id = 'iiot-1'"
            )
            .await,
            33
        );
        assert_eq!(
            count(store, "SELECT COUNT(*) FROM digitalstate_window").await,
            35
        );
        assert_eq!(
            count(
                store,
                "SELECT COUNT(*) FROM deadletter WHERE last_at = 1700003600000"
            )
            .await,
            1
        );
        assert_eq!(count(store, "SELECT COUNT(*) FROM deadletter").await, 1);
        // The silent twin keeps its state and its physical state, and its device's last one.
        assert_eq!(
            count(
                store,
                "SELECT MAX(timestamp) FROM digitalstate WHERE device_id = 'iiot-2'"
            )
            .await,
            T0 + 2000
        );
        let id = silent.digital_state_id.unwrap();
        assert_eq!(
            count(
                store,
                &format!(
                    "SELECT COUNT(*) FROM digitalstate d JOIN physicalstate p \
                     ON p.id = d.physicalstate_id WHERE d.id = {id}"
                )
            )
            .await,
            1
        );
        assert_eq!(store.twin("iiot-2").await.unwrap().unwrap(), silent);
        // Again: nothing left to delete.
        let again = store
            .apply_retention(Some(1_800_000), now, guard)
            .await
            .unwrap();
        assert_eq!(
            (
                again.digital_states,
                again.physical_states,
                again.dead_letters
            ),
            (0, 0, 0)
        );
    }
);

store_test!(
    retention_shorter_than_the_window_changes_no_figure,
    |t| async move {
        let store = &t.store;
        // Availability measured: gaps beyond 2 s are lost time.
        let config = config().with_availability_max_gap(Some(2.0)).unwrap();
        let guard = retention_guard_ms(&config);
        assert_eq!(guard, 12_000 + RETENTION_MARGIN_MS);
        // A state every 5 s for 15 min: T0 … T0 + 900 s (181 states).
        let mut latest = 0;
        for k in 0..=180 {
            latest = evaluated(store, &config, "iiot-1", T0 + k * 5000).await;
        }
        let now = T0 + 900_000;
        let handler_before = store.state_window(latest, &config).await.unwrap().unwrap();
        let evaluator_before = store.twin_windows(now, &config).await.unwrap();
        let later_before = store.twin_windows(now + 7_000, &config).await.unwrap();
        // Keep 1 s: the guard holds the cutoff at now − 612 s = T0 + 288 s; the last state
        // before it (T0 + 285 s) is kept, and so is the twin's (the first, which bound it; a
        // state every 5 s never entangles): the 56 others before it (T0 + 5 s … 280 s) go.
        let report = store.apply_retention(Some(1000), now, guard).await.unwrap();
        assert_eq!(report.cutoff_ms, Some(now - guard));
        assert_eq!((report.digital_states, report.physical_states), (56, 56));
        assert_eq!(
            store.state_window(latest, &config).await.unwrap().unwrap(),
            handler_before
        );
        assert_eq!(
            store.twin_windows(now, &config).await.unwrap(),
            evaluator_before
        );
        assert_eq!(
            store.twin_windows(now + 7_000, &config).await.unwrap(),
            later_before,
            "a window starting after its last update before it"
        );
        assert_eq!(
            count(
                store,
                "SELECT COUNT(*) FROM digitalstate WHERE timestamp >= 1700000890000"
            )
            .await,
            3,
            "the window's states are all there"
        );
    }
);

store_test!(retention_unset_deletes_nothing, |t| async move {
    let store = &t.store;
    let config = config();
    for k in 0..5 {
        evaluated(store, &config, "iiot-1", T0 + k * 1000).await;
    }
    let far = T0 + 365 * 86_400_000;
    let report = store
        .apply_retention(None, far, retention_guard_ms(&config))
        .await
        .unwrap();
    assert_eq!(report.cutoff_ms, None);
    assert_eq!(
        (
            report.digital_states,
            report.physical_states,
            report.dead_letters
        ),
        (0, 0, 0)
    );
    assert_eq!(count(store, "SELECT COUNT(*) FROM digitalstate").await, 5);
    assert_eq!(count(store, "SELECT COUNT(*) FROM physicalstate").await, 5);
    // The profiles of a model set: the longest window and gap of all.
    let profiles: &dyn Profiles = &config;
    assert_eq!(retention_guard_ms(profiles), 10_000 + RETENTION_MARGIN_MS);
});
