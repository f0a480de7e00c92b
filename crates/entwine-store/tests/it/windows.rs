//! Every window query against the core's reference, boundary by boundary: the figures the twin
//! handler reads (`Store::state_window`) and those the twin evaluator reads
//! (`Store::twin_windows`) must equal `WindowFigures::reference` over the same states, on both
//! backends. The states sit exactly at the window's start, 1 ms inside and outside it, exactly
//! at the evaluated instant and 1 ms after it, timely exactly at the limit and 1 ms over it, and
//! the last update before the window is one ms outside it; so turning any bound of the SQL
//! (`>=` into `>`, `<=` into `<`, `<` into `<=`) fails a test here.

use entwine_core::evaluation::{RecordedState, UpdateTimes, WindowFigures};
use entwine_core::odte::{OdteConfig, SeedLifecycle, WindowStats};
use entwine_core::state::{DeviceId, DigitalState, PendingDigitalState, PhysicalEvent};
use entwine_core::twin::{TwinLifecycle, TwinPosition};
use entwine_store::Store;
use entwine_testing::{execute, store_test};

const T0: i64 = 1_700_000_000_000;

/// 1 update/s expected over a 10 s window, timely within 1 s, threshold 0.9, unbound after
/// 30 s of silence, gaps beyond 2 s unavailable.
fn measured() -> OdteConfig {
    seed_like().with_availability_max_gap(Some(2.0)).unwrap()
}

/// The same without `availability_max_gap`: the seed's availability of 1, no update times read.
fn seed_like() -> OdteConfig {
    OdteConfig::new(1.0, 10.0, 1.0, 0.9)
        .unwrap()
        .with_silence_threshold(Some(30.0))
        .unwrap()
}

fn state(offset: i64, device_offset: Option<i64>) -> RecordedState {
    RecordedState {
        timestamp: T0 + offset,
        device_timestamp: device_offset.map(|d| T0 + d),
    }
}

/// press-1's states around the window `[T0 + 40 000, T0 + 50 000]` of `T0 + 50 000`.
fn press_1() -> Vec<RecordedState> {
    vec![
        state(39_000, Some(38_990)), // before the window, not the last update before it
        state(39_999, Some(39_990)), // 1 ms outside: the last update before the window
        state(40_000, Some(39_000)), // exactly at the start; elapsed exactly 1 000: timely
        state(40_001, Some(40_000)), // 1 ms inside
        state(45_000, Some(43_999)), // elapsed 1 001: 1 ms over the limit, late
        state(45_500, None),         // no physical state: an update, not counted
        state(50_000, Some(49_990)), // exactly at the evaluated instant
        state(50_001, Some(50_000)), // 1 ms after it
    ]
}

/// Another device, interleaved, that no figure of press-1 may count.
fn press_2() -> Vec<RecordedState> {
    vec![state(35_000, Some(34_000)), state(44_000, Some(42_000))]
}

/// Stores one state as the pipeline does (physical event, shadow), or, without a device
/// timestamp, as a seed row without a physical state. Answers the pending digital state.
async fn record(store: &Store, device: &str, s: RecordedState) -> Option<PendingDigitalState> {
    let Some(device_timestamp) = s.device_timestamp else {
        execute(
            store,
            &format!(
                "INSERT INTO digitalstate (device_id, timestamp, temperature, energy) \
                 VALUES ('{device}', {}, 20, 1)",
                s.timestamp
            ),
        )
        .await;
        return None;
    };
    if s.timestamp % 2 == 1 {
        // Every state at an odd instant is written as the seed's own functions write it, with
        // plain INSERTs: an upgraded database's rows, or the seed's functions run against ours,
        // count in the window exactly like entwine's.
        execute(
            store,
            &format!(
                "INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, \
                                            energy) VALUES ('{device}', {device_timestamp}, {t}, 20, 1)",
                t = s.timestamp
            ),
        )
        .await;
        execute(
            store,
            &format!(
                "INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, \
                                           energy) \
                 SELECT id, device_id, {t}, temperature, energy FROM physicalstate \
                 WHERE device_id = '{device}' AND device_timestamp = {device_timestamp}",
                t = s.timestamp
            ),
        )
        .await;
        let id = entwine_testing::scalar(
            store,
            &format!(
                "SELECT CAST(MAX(id) AS BIGINT) FROM digitalstate WHERE device_id = '{device}'"
            ),
        )
        .await;
        return Some(PendingDigitalState {
            id: i32::try_from(id).unwrap(),
            physicalstate_id: i32::try_from(
                entwine_testing::scalar(
                    store,
                    &format!(
                        "SELECT CAST(physicalstate_id AS BIGINT) FROM digitalstate WHERE id = {id}"
                    ),
                )
                .await,
            )
            .unwrap(),
            device_id: DeviceId::parse("device_id", device).unwrap(),
            timestamp: s.timestamp,
            readings: entwine_core::state::Readings::seed(20.0, 1.0),
        });
    }
    let event = PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: entwine_core::state::Readings::seed(20.0, 1.0),
    };
    let (physical, _) = store
        .record_physical_event(&event, s.timestamp)
        .await
        .unwrap();
    let (pending, _) = store.record_shadow(&physical, s.timestamp).await.unwrap();
    Some(pending)
}

/// Both devices' states, and a twin row for each (bound at T0), as the evaluator finds them.
async fn scenario(store: &Store) -> Vec<(i32, RecordedState)> {
    let mut ids = Vec::new();
    for (device, states) in [("press-1", press_1()), ("press-2", press_2())] {
        for s in states {
            if let Some(pending) = record(store, device, s).await {
                if device == "press-1" {
                    ids.push((pending.id, s));
                }
            }
        }
    }
    execute(
        store,
        &format!(
            "INSERT INTO twin (device_id, lifecycle, since, bound_at, evaluated_at, \
                               availability, reliability, timeliness, odte) \
             VALUES ('press-1', 'bound', {T0}, {T0}, {T0}, 0, 0, 0, 0), \
                    ('press-2', 'bound', {T0}, {T0}, {T0}, 0, 0, 0, 0)"
        ),
    )
    .await;
    ids
}

#[test]
fn the_reference_gives_the_hand_worked_figures_of_the_scenario() {
    // At T0 + 50 000: states 40 000, 40 001, 45 000 and 50 000 have a physical state (4); of
    // them 40 000 (elapsed 1 000), 40 001 (1) and 50 000 (10) are timely (3), 45 000 (1 001)
    // is not. Updates: 39 999 before, then 40 000, 40 001, 45 000, 45 500, 50 000.
    assert_eq!(
        WindowFigures::reference(&measured(), T0 + 50_000, &press_1()),
        WindowFigures {
            stats: WindowStats {
                states: 4,
                timely: 3
            },
            updates: Some(UpdateTimes {
                before_window: Some(T0 + 39_999),
                in_window: vec![
                    T0 + 40_000,
                    T0 + 40_001,
                    T0 + 45_000,
                    T0 + 45_500,
                    T0 + 50_000
                ],
            }),
        }
    );
    // One ms later the window [40 001, 50 001] has lost 40 000, which is now the last update
    // before it, and gained 50 001 (elapsed 1: timely).
    assert_eq!(
        WindowFigures::reference(&measured(), T0 + 50_001, &press_1()),
        WindowFigures {
            stats: WindowStats {
                states: 4,
                timely: 3
            },
            updates: Some(UpdateTimes {
                before_window: Some(T0 + 40_000),
                in_window: vec![
                    T0 + 40_001,
                    T0 + 45_000,
                    T0 + 45_500,
                    T0 + 50_000,
                    T0 + 50_001
                ],
            }),
        }
    );
    assert_eq!(
        WindowFigures::reference(&measured(), T0 + 50_000, &press_2()),
        WindowFigures {
            stats: WindowStats {
                states: 1,
                timely: 0
            },
            updates: Some(UpdateTimes {
                before_window: Some(T0 + 35_000),
                in_window: vec![T0 + 44_000],
            }),
        }
    );
}

/// The instants around every state's time and its window's start, where a bound can slip.
fn instants() -> Vec<i64> {
    let mut at: Vec<i64> = press_1()
        .iter()
        .chain(press_2().iter())
        .flat_map(|s| {
            let t = s.timestamp;
            [t - 1, t, t + 1, t + 9_999, t + 10_000, t + 10_001]
        })
        .collect();
    at.sort_unstable();
    at.dedup();
    at
}

store_test!(
    the_twin_handler_reads_the_reference_figures_of_each_state_window,
    |t| async move {
        let ids = scenario(&t.store).await;
        for config in [measured(), seed_like()] {
            for (id, s) in &ids {
                let figures = t.store.state_window(*id, &config).await.unwrap();
                assert_eq!(
                    figures,
                    Some(WindowFigures::reference(&config, s.timestamp, &press_1())),
                    "state at T0 + {}",
                    s.timestamp - T0
                );
            }
        }
        // The hand-worked case, from the state exactly at T0 + 50 000.
        let (at_t, _) = ids
            .iter()
            .find(|(_, s)| s.timestamp == T0 + 50_000)
            .unwrap();
        let figures = t
            .store
            .state_window(*at_t, &measured())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            figures.stats,
            WindowStats {
                states: 4,
                timely: 3
            }
        );
        assert_eq!(figures.updates.unwrap().before_window, Some(T0 + 39_999));
        assert_eq!(t.store.state_window(-1, &measured()).await.unwrap(), None);
    }
);

store_test!(
    the_twin_evaluator_reads_the_reference_figures_of_every_twin_window,
    |t| async move {
        scenario(&t.store).await;
        for config in [measured(), seed_like()] {
            for now in instants() {
                let windows = t.store.twin_windows(now, &config).await.unwrap();
                let devices: Vec<&str> = windows.iter().map(|w| w.device_id.as_str()).collect();
                assert_eq!(devices, ["press-1", "press-2"]);
                for (window, states) in windows.iter().zip([press_1(), press_2()]) {
                    assert_eq!(
                        window.figures,
                        WindowFigures::reference(&config, now, &states),
                        "{} at T0 + {}",
                        window.device_id,
                        now - T0
                    );
                }
            }
        }
        let windows = t
            .store
            .twin_windows(T0 + 50_000, &measured())
            .await
            .unwrap();
        assert_eq!(
            windows[0].position,
            TwinPosition {
                lifecycle: TwinLifecycle::Bound,
                since_ms: T0,
                bound_ms: Some(T0)
            }
        );
        assert_eq!(windows[0].last_update, Some(T0 + 50_001));
        assert_eq!(windows[1].last_update, Some(T0 + 44_000));
        assert_eq!(
            windows[0].figures.stats,
            WindowStats {
                states: 4,
                timely: 3
            }
        );
    }
);

/// One event of `device` through the twin handler, mirrored 10 ms after the measurement.
async fn event(store: &Store, config: &OdteConfig, device: &str, shadow_ts: i64) -> DigitalState {
    let s = state(shadow_ts - T0, Some(shadow_ts - T0 - 10));
    let pending = record(store, device, s).await.unwrap();
    let (digital, _, _) = store
        .evaluate_digital_state(&pending, config)
        .await
        .unwrap();
    digital
}

store_test!(
    the_evaluator_counts_the_gap_before_a_twin_rebound_inside_its_window,
    |t| async move {
        // The evaluator used to infer the last update before its window from the twin's
        // `bound_at`; a twin bound again inside the window (after a silence) has its last
        // earlier update before `bound_at`, which that missed: the gap up to the new binding
        // was counted from the window's start plus the forgiven 2 s, not from the old update.
        let config = measured();
        for s in 0..=5 {
            event(&t.store, &config, "press-1", T0 + s * 1_000).await;
        }
        // Silent beyond 30 s: unbound.
        let changes = t
            .store
            .reevaluate_twins(T0 + 40_000, &config)
            .await
            .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to, TwinLifecycle::Unbound);
        // Back at 50, 51 and 53 s. At 53 s the handler's window [43 000, 53 000] counts the
        // gap from 5 000: lost 43 000 → 50 000, A = 1 − 7 000/10 000 = 0.3.
        for s in [50, 51, 53] {
            let digital = event(&t.store, &config, "press-1", T0 + s * 1_000).await;
            if s == 53 {
                assert_eq!(digital.availability, (1.0f64 - 0.7) as f32);
            }
        }
        // The evaluator at 59 999: window [49 999, 59 999]. Lost: 49 999 → 50 000 (the gap
        // from 5 000, beyond 7 000), 1 ms; 55 000 → 59 999 (silent since 53 000), 4 999 ms.
        // A = 1 − 5 000/10 000 = 0.5 (it answered 0.5001: the first millisecond was missed).
        t.store
            .reevaluate_twins(T0 + 59_999, &config)
            .await
            .unwrap();
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.availability, 0.5);
        assert_eq!(twin.lifecycle, TwinLifecycle::Bound, "bound 9 999 ms ago");
        // At 55 000: window [45 000, 55 000], lost 45 000 → 50 000: A = 0.5 (it answered 0.7,
        // the whole forgiven 2 s); R = 3/10, T = 1, ODTE = 0.15.
        t.store
            .reevaluate_twins(T0 + 55_000, &config)
            .await
            .unwrap();
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(
            twin.evaluated_at,
            T0 + 59_999,
            "an earlier evaluation is not written"
        );
        let windows = t.store.twin_windows(T0 + 55_000, &config).await.unwrap();
        assert_eq!(
            windows[0].figures.updates,
            Some(UpdateTimes {
                before_window: Some(T0 + 5_000),
                in_window: vec![T0 + 50_000, T0 + 51_000, T0 + 53_000],
            })
        );
        t.store
            .reevaluate_twins(T0 + 60_000, &config)
            .await
            .unwrap();
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        // Window [50 000, 60 000]: lost 55 000 → 60 000, A = 0.5; R = 0.3; bound a window ago.
        assert_eq!((twin.availability, twin.reliability), (0.5, 0.3));
        assert_eq!(twin.odte, 0.15);
        assert_eq!(twin.lifecycle, TwinLifecycle::Disentangled);
    }
);

store_test!(
    the_twin_lifecycle_follows_the_digital_state_verdict_exactly_at_the_threshold,
    |t| async move {
        // Events at 0..=9, 11, 12 and 14 s (no 10 s, no 13 s), all timely. At 14 s the window
        // [4 000, 14 000] holds 4..9, 11, 12, 14: 9 states, R = 0.9 = ODTE, which reaches the
        // threshold 0.9 in f64: the digital state is entangled. Its REAL 0.9 reads back as
        // 0.899999976…, below it; the twin handler used that and disentangled the twin.
        let config = seed_like();
        let mut last = None;
        for s in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14] {
            last = Some(event(&t.store, &config, "press-1", T0 + s * 1_000).await);
        }
        let last = last.unwrap();
        assert_eq!(last.pending.timestamp, T0 + 14_000);
        assert_eq!((last.reliability, last.odte), (0.9, 0.9));
        assert_eq!(last.lifecycle, SeedLifecycle::Entangled);
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.lifecycle, TwinLifecycle::Entangled);
        // The evaluator at the same instant agrees: no change.
        let changes = t
            .store
            .reevaluate_twins(T0 + 14_000, &config)
            .await
            .unwrap();
        assert_eq!(changes, []);
    }
);
