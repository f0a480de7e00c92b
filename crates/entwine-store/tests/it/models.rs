//! Readings of any device model: stored beside the seed's tables (the seed's columns `NULL`),
//! answered exactly as stored through every step, kept in the history, refused when they
//! contradict what is stored; and each twin evaluated by its own model's profile, by the twin
//! handler and by the evaluator, in one batch with the seed's devices.

use entwine_core::model::{Model, ModelReadings, ModelSet};
use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent, Readings};
use entwine_store::{HistoryCursor, StoreError, Written};
use entwine_testing::{scalar, store_test};
use serde_json::{json, Map, Value};

const T0: i64 = 1_700_000_000_000;

/// A 1 Hz model over a 4 s window: 4 states make a reliable twin (the seed's: 6 in 30 s).
fn models() -> ModelSet {
    let model = Model::parse(
        "press.json",
        &json!({
            "@type": "tm:ThingModel",
            "title": "Press",
            "version": {"model": "2.1.0"},
            "entwine:id": "press",
            "entwine:devices": ["press-*"],
            "entwine:odte": {"expected_update_rate": 1, "time_window": 4},
            "properties": {
                "force": {"type": "number", "unit": "kN", "minimum": 0, "maximum": 500},
                "strokes": {"type": "integer", "minimum": 0},
                "running": {"type": "boolean"},
                "mode": {"type": "string", "enum": ["auto", "manual"]}
            }
        })
        .to_string(),
    )
    .unwrap();
    ModelSet::new(OdteConfig::seed_default(), vec![model]).unwrap()
}

fn readings(force: f64, strokes: u64) -> Map<String, Value> {
    json!({"force": force, "strokes": strokes, "running": true, "mode": "auto"})
        .as_object()
        .cloned()
        .unwrap()
}

fn press(device: &str, device_timestamp: i64, force: f64, strokes: u64) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: Readings::Model(ModelReadings {
            model: "press".into(),
            model_version: "2.1.0".into(),
            readings: readings(force, strokes),
        }),
    }
}

fn seed(device: &str, device_timestamp: i64) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: Readings::seed(27.5, 3.25),
    }
}

store_test!(
    model_readings_go_through_every_step_as_stored_and_each_twin_by_its_own_profile,
    |t| async move {
        let models = models();
        // Three events of each device, a second apart, mirrored 10 ms after measuring, in one
        // batch per step as the connector sends them.
        let events: Vec<PhysicalEvent> = (0..3)
            .flat_map(|i| {
                let at = T0 + i * 1000;
                [
                    seed("iiot-1", at - 10),
                    press("press-1", at - 10, 101.5 + i as f64, 7 + i as u64),
                ]
            })
            .collect();
        let mut pending = Vec::new();
        for pair in events.chunks(2) {
            let now = pair[0].device_timestamp + 10;
            let physical: Vec<_> = t
                .store
                .record_physical_events(pair, now)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.unwrap().0)
                .collect();
            assert_eq!(physical[1].readings, pair[1].readings);
            assert_eq!(physical[0].readings, Readings::seed(27.5, 3.25));
            for r in t.store.record_shadows(&physical, now).await.unwrap() {
                pending.push(r.unwrap().0);
            }
        }
        assert_eq!(pending[5].readings, events[5].readings);
        let evaluated: Vec<_> = t
            .store
            .evaluate_digital_states(&pending, &models)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().0)
            .collect();
        // The seed's device: 1, 2, 3 of 6 expected; the press: 1, 2, 3 of 4.
        let reliability: Vec<f32> = evaluated.iter().map(|d| d.reliability).collect();
        assert_eq!(
            reliability,
            [1.0 / 6.0, 0.25, 2.0 / 6.0, 0.5, 0.5, 0.75].map(|r: f64| r as f32)
        );
        assert_eq!(evaluated[5].odte, 0.75);
        assert_eq!(evaluated[5].pending.readings, events[5].readings);

        // The seed's tables hold the press's states with their readings NULL; the readings
        // table holds them, once per physical state.
        assert_eq!(
            scalar(
                &t.store,
                "SELECT COUNT(*) FROM physicalstate WHERE temperature IS NULL AND energy IS NULL"
            )
            .await,
            3
        );
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate_reading").await,
            3
        );

        // The digital-event handler's check: exactly the stored state passes, a forged reading
        // is refused naming it.
        let stored = t.store.stored_digital(&evaluated[5]).await.unwrap();
        assert_eq!(stored, evaluated[5]);
        let mut forged = evaluated[5].clone();
        if let Readings::Model(m) = &mut forged.pending.readings {
            m.readings.insert("force".into(), json!(99.0));
        }
        match t.store.stored_digital(&forged).await {
            Err(StoreError::Rejected(e)) => {
                assert_eq!(e.field, "readings.force");
                assert_eq!(
                    e.reason,
                    format!(
                        "digital state {} has readings.force 103.5, not 99.0",
                        forged.pending.id
                    )
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }

        // A redelivered event is answered as stored; another event under its key is refused.
        let (again, written) = t
            .store
            .record_physical_event(&events[1], T0 + 50)
            .await
            .unwrap();
        assert_eq!(written, Written::Existing);
        assert_eq!(again.readings, events[1].readings);
        match t
            .store
            .record_physical_event(&press("press-1", T0 - 10, 101.5, 8), T0 + 60)
            .await
        {
            Err(StoreError::Conflict(e)) => assert_eq!(
                e.reason,
                "device press-1 already sent a different event at device timestamp 1699999999990 \
                 (the stored event has readings.strokes 7, not 8): device timestamps must be unique"
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
        // A physical state whose readings are not the stored ones gets no copy.
        let mut altered = t
            .store
            .record_physical_event(&events[3], T0 + 70)
            .await
            .unwrap()
            .0;
        if let Readings::Model(m) = &mut altered.readings {
            m.model_version = "2.0.0".into();
        }
        match t.store.record_shadow(&altered, T0 + 80).await {
            Err(StoreError::Rejected(e)) => assert_eq!(e.field, "model_version"),
            other => panic!("expected a refusal, got {other:?}"),
        }

        // The history keeps the readings, newest first.
        let history = t
            .store
            .history("press-1", 0, HistoryCursor::START, 10)
            .await
            .unwrap();
        let forces: Vec<Value> = history
            .iter()
            .map(|h| match &h.readings {
                Readings::Model(m) => m.readings["force"].clone(),
                Readings::Seed { .. } => Value::Null,
            })
            .collect();
        assert_eq!(forces, [json!(103.5), json!(102.5), json!(101.5)]);
        let entry = serde_json::to_value(&history[0]).unwrap();
        assert_eq!(entry["model"], "press");
        assert_eq!(entry["model_version"], "2.1.0");
        assert_eq!(entry["readings"], json!(readings(103.5, 9)));
        assert!(entry.get("temperature").is_none());

        // The evaluator, 5.5 s after the first state: the press's window [1.5 s, 5.5 s] holds
        // one state of 4 expected; the seed's 30 s window all three of 6.
        t.store.reevaluate_twins(T0 + 5_500, &models).await.unwrap();
        let press = t.store.twin("press-1").await.unwrap().unwrap();
        let seed = t.store.twin("iiot-1").await.unwrap().unwrap();
        assert_eq!(press.reliability, 0.25);
        assert_eq!(seed.reliability, 0.5);
        assert_eq!(press.evaluated_at, T0 + 5_500);
    }
);
