//! The twin table: lifecycle (bound, entangled, disentangled on silence, unbound, back),
//! availability as defined in `entwine_core::twin`, and the seed's values when it is not.
//! Time is chosen by the test: every shadow and evaluation timestamp is explicit.

use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent};
use entwine_core::twin::TwinLifecycle;
use entwine_store::{Store, TwinChange};
use entwine_testing::store_test;

const T0: i64 = 1_700_000_000_000;

/// One event of `device`, measured `latency_ms` before the twin mirrors it at `shadow_ts`;
/// answers the digital state's availability and the twin's lifecycle change.
async fn event(
    store: &Store,
    config: &OdteConfig,
    device: &str,
    shadow_ts: i64,
    latency_ms: i64,
) -> (f32, f32, Option<TwinChange>) {
    let event = PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp: shadow_ts - latency_ms,
        readings: entwine_core::state::Readings::seed(20.0, 1.0),
    };
    let (physical, _) = store
        .record_physical_event(&event, shadow_ts)
        .await
        .unwrap();
    let (pending, _) = store.record_shadow(&physical, shadow_ts).await.unwrap();
    // As the twin handler does, in one call.
    let (digital, _, change) = store
        .evaluate_digital_state(&pending, config)
        .await
        .unwrap();
    (digital.availability, digital.reliability, change)
}

async fn lifecycle(store: &Store, device: &str) -> TwinLifecycle {
    store.twin(device).await.unwrap().unwrap().lifecycle
}

/// 1 update/s expected over a 10 s window, unbound after 30 s of silence.
fn config() -> OdteConfig {
    OdteConfig::new(1.0, 10.0, 1.0, 0.9)
        .unwrap()
        .with_silence_threshold(Some(30.0))
        .unwrap()
}

store_test!(
    a_silent_twin_disentangles_within_a_window_unbinds_after_the_threshold_and_returns,
    |t| async move {
        let config = config();
        let store = &t.store;
        // Updates every second for 20 s: bound for the first window, then entangled.
        let (_, _, first) = event(store, &config, "press-1", T0, 10).await;
        let first = first.expect("a new twin is a change");
        assert_eq!((first.from, first.to), (None, TwinLifecycle::Bound));
        for s in 1..=20 {
            event(store, &config, "press-1", T0 + s * 1000, 10).await;
            let expected = if s < 10 {
                TwinLifecycle::Bound
            } else {
                TwinLifecycle::Entangled
            };
            assert_eq!(lifecycle(store, "press-1").await, expected, "after {s} s");
        }
        let last = T0 + 20_000;
        // The device falls silent; the evaluator runs every second.
        let mut disentangled_at = None;
        let mut unbound_at = None;
        for s in 1..=40 {
            let now = last + s * 1000;
            let changes = store.reevaluate_twins(now, &config).await.unwrap();
            for c in changes {
                match c.to {
                    TwinLifecycle::Disentangled => disentangled_at.get_or_insert(s),
                    TwinLifecycle::Unbound => unbound_at.get_or_insert(s),
                    other => panic!("unexpected change to {other:?} after {s} s of silence"),
                };
            }
        }
        let disentangled_at = disentangled_at.expect("disentangled while silent");
        assert!(
            disentangled_at <= 10,
            "disentangled after {disentangled_at} s, not within the 10 s window"
        );
        assert_eq!(
            unbound_at,
            Some(31),
            "unbound once silent for more than the 30 s threshold"
        );
        let twin = store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.reliability, 0.0, "nothing in the window");
        assert_eq!(twin.last_digital_timestamp, Some(last));
        // The device returns: bound again, entangled a window later.
        let back = last + 60_000;
        let (_, _, change) = event(store, &config, "press-1", back, 10).await;
        let change = change.unwrap();
        assert_eq!(
            (change.from, change.to),
            (Some(TwinLifecycle::Unbound), TwinLifecycle::Bound)
        );
        for s in 1..=10 {
            event(store, &config, "press-1", back + s * 1000, 10).await;
        }
        assert_eq!(lifecycle(store, "press-1").await, TwinLifecycle::Entangled);
        // Another twin, never silent, was never touched by all this.
        assert!(store.twin("press-2").await.unwrap().is_none());
    }
);

store_test!(
    availability_follows_its_definition_through_a_scripted_gap,
    |t| async move {
        // A window of 10 s, gaps beyond 2 s unavailable.
        let measured = config().with_availability_max_gap(Some(2.0)).unwrap();
        let seed_like = config();
        for (device, config) in [("measured", &measured), ("seed-like", &seed_like)] {
            // Updates every second for 15 s.
            for s in 0..=15 {
                let (a, _, _) = event(&t.store, config, device, T0 + s * 1000, 10).await;
                // Before its first update the twin counts as updated at the window's start:
                // the first 10 − s seconds of the window are one gap, 2 s of it forgiven.
                let expected = if device == "measured" && s < 8 {
                    (2 + s) as f32 / 10.0
                } else {
                    1.0
                };
                assert!((a - expected).abs() < 1e-6, "{device} after {s} s: {a}");
            }
        }
        // Silence from 15 s; the evaluator at 20 s: 17 → 20 is lost, 3 s of 10.
        let changes = t
            .store
            .reevaluate_twins(T0 + 20_000, &measured)
            .await
            .unwrap();
        drop(changes);
        let twin = t.store.twin("measured").await.unwrap().unwrap();
        assert!((twin.availability - 0.7).abs() < 1e-6, "{twin:?}");
        // The device returns at 21 s: its state's availability counts the 4 s gap past 2 s.
        let (a, _, _) = event(&t.store, &measured, "measured", T0 + 21_000, 10).await;
        assert!((a - 0.6).abs() < 1e-6, "{a}");
        // Without the key, the same script keeps the seed's availability of 1.
        t.store
            .reevaluate_twins(T0 + 20_000, &seed_like)
            .await
            .unwrap();
        let twin = t.store.twin("seed-like").await.unwrap().unwrap();
        assert_eq!(twin.availability, 1.0);
        let (a, _, _) = event(&t.store, &seed_like, "seed-like", T0 + 21_000, 10).await;
        assert_eq!(a, 1.0);
    }
);

store_test!(
    loss_lowers_reliability_and_lateness_lowers_timeliness,
    |t| async move {
        let config = config();
        // 15 % of the expected updates lost: 3 of each 20 seconds skipped. The evaluator runs
        // half-way between updates, so each window holds 10 update slots.
        let mut reliabilities = Vec::new();
        for s in 0..200 {
            if !matches!(s % 20, 3 | 9 | 16) {
                event(&t.store, &config, "lossy", T0 + s * 1000, 10).await;
            }
            if s >= 10 {
                t.store
                    .reevaluate_twins(T0 + s * 1000 + 500, &config)
                    .await
                    .unwrap();
                let twin = t.store.twin("lossy").await.unwrap().unwrap();
                assert_eq!(twin.timeliness, 1.0, "loss alone keeps timeliness");
                reliabilities.push(twin.reliability);
            }
        }
        let mean = reliabilities.iter().sum::<f32>() / reliabilities.len() as f32;
        assert!(
            (mean - 0.85).abs() <= 0.02,
            "15 % loss: mean reliability {mean}, expected 0.85 ± 0.02"
        );
        // Mirrored 1.5 s after the measurement, beyond the desired 1 s: timeliness falls.
        for s in 0..20 {
            event(&t.store, &config, "late", T0 + s * 1000, 1500).await;
        }
        let late = t.store.twin("late").await.unwrap().unwrap();
        assert_eq!((late.timeliness, late.odte), (0.0, 0.0));
        assert_eq!(late.lifecycle, TwinLifecycle::Disentangled);
    }
);

store_test!(
    the_evaluator_writes_more_twins_than_fit_in_one_statement,
    |t| async move {
        let config = config();
        // 1,200 twins: three upsert statements of at most 500 rows each.
        for d in 0..1_200 {
            event(&t.store, &config, &format!("many-{d}"), T0 + d, 10).await;
        }
        let later = T0 + 1_200 + 31_000;
        let changes = t.store.reevaluate_twins(later, &config).await.unwrap();
        assert_eq!(changes.len(), 1_200, "every twin fell silent");
        assert!(changes.iter().all(|c| c.to == TwinLifecycle::Unbound));
        let twins = t.store.twins().await.unwrap();
        assert_eq!(twins.len(), 1_200);
        assert!(twins
            .iter()
            .all(|tw| tw.lifecycle == TwinLifecycle::Unbound && tw.evaluated_at == later));
        let last = twins.iter().find(|tw| tw.device_id == "many-1199").unwrap();
        assert_eq!(last.last_digital_timestamp, Some(T0 + 1_199));
        assert_eq!(last.last_physical_timestamp, Some(T0 + 1_199 - 10));
    }
);
