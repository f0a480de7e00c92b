//! The three writes of the pipeline: idempotent, checked against their input, and computing the
//! same window as the core's reference.

use entwine_core::odte::{OdteConfig, SeedLifecycle, WindowStats};
use entwine_core::state::{DeviceId, PendingDigitalState, PhysicalEvent, PhysicalState};
use entwine_core::twin::TwinLifecycle;
use entwine_store::{HistoryCursor, Store, StoreError, StoreOptions, Written};
use entwine_testing::{scalar, store_test};

fn event(device: &str, device_timestamp: i64) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: entwine_core::state::Readings::seed(27.3, 3.1),
    }
}

/// Runs one event through physical → shadow → twin with chosen clock readings.
async fn chain(
    store: &Store,
    config: &OdteConfig,
    device: &str,
    device_ts: i64,
    shadow_ts: i64,
) -> entwine_core::state::DigitalState {
    let (physical, _) = store
        .record_physical_event(&event(device, device_ts), shadow_ts)
        .await
        .unwrap();
    let (pending, _) = store.record_shadow(&physical, shadow_ts).await.unwrap();
    // As the twin handler does.
    let (digital, written, _) = store
        .evaluate_digital_state(&pending, config)
        .await
        .unwrap();
    assert_eq!(written, Written::Created);
    digital
}

store_test!(
    a_redelivered_event_answers_the_stored_state_and_adds_no_row,
    |t| async move {
        let e = event("press-1", 1_700_000_000_000);
        let (first, w1) = t
            .store
            .record_physical_event(&e, 1_700_000_000_050)
            .await
            .unwrap();
        let (again, w2) = t
            .store
            .record_physical_event(&e, 1_700_000_000_900)
            .await
            .unwrap();
        assert_eq!((w1, w2), (Written::Created, Written::Existing));
        assert_eq!(
            first, again,
            "the redelivery is answered with the first state, first timestamp"
        );
        assert_eq!(first.timestamp, 1_700_000_000_050);
        assert_eq!(first.readings.temperature(), Some(27.3f32));
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            1
        );
        // Same timestamp, other device: a different event.
        let (other, w3) = t
            .store
            .record_physical_event(&event("press-2", 1_700_000_000_000), 1_700_000_000_100)
            .await
            .unwrap();
        assert_eq!(w3, Written::Created);
        assert_ne!(other.id, first.id);
    }
);

store_test!(
    a_repeated_shadow_call_answers_the_same_pending_state,
    |t| async move {
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
            .await
            .unwrap();
        let (first, w1) = t
            .store
            .record_shadow(&physical, 1_700_000_000_020)
            .await
            .unwrap();
        let (again, w2) = t
            .store
            .record_shadow(&physical, 1_700_000_000_500)
            .await
            .unwrap();
        assert_eq!((w1, w2), (Written::Created, Written::Existing));
        assert_eq!(first, again);
        assert_eq!(first.physicalstate_id, physical.id);
        assert_eq!(first.timestamp, 1_700_000_000_020);
        assert_eq!(first.readings, physical.readings);
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
            1
        );
    }
);

store_test!(
    a_shadow_of_an_unknown_or_foreign_physical_state_is_rejected_without_a_row,
    |t| async move {
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
            .await
            .unwrap();
        let unknown = PhysicalState {
            id: physical.id + 100,
            ..physical.clone()
        };
        match t.store.record_shadow(&unknown, 1_700_000_000_020).await {
            Err(StoreError::Rejected(e)) => {
                assert_eq!(e.field, "id");
                assert!(e.reason.contains("no physical state"), "{e}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let foreign = PhysicalState {
            device_id: DeviceId::parse("device_id", "press-9").unwrap(),
            ..physical.clone()
        };
        match t.store.record_shadow(&foreign, 1_700_000_000_020).await {
            Err(StoreError::Rejected(e)) => assert_eq!(e.field, "device_id", "{e}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
            0
        );
        // And once the shadow exists, a foreign claim on it is still rejected.
        t.store
            .record_shadow(&physical, 1_700_000_000_030)
            .await
            .unwrap();
        assert!(matches!(
            t.store.record_shadow(&foreign, 1_700_000_000_040).await,
            Err(StoreError::Rejected(_))
        ));
    }
);

store_test!(
    the_twin_window_counts_exactly_what_the_reference_counts,
    |t| async move {
        // The seed's ConfigMap, and a device whose delays vary around the 1 s desired timeliness,
        // with a gap that empties most of the window.
        let config = OdteConfig::seed_default();
        let delays = [
            100, 200, 1500, 50, 1000, 10, 20, 100, 300, 200, 2500, 0, 999, 1001, 40,
        ];
        let mut device_ts = 1_700_000_000_000i64;
        let mut history = Vec::new();
        for (i, delay) in delays.iter().enumerate() {
            device_ts += if i == 10 { 26_000 } else { 5_000 };
            let shadow_ts = device_ts + delay;
            // Another device's events never count in this twin's window.
            chain(&t.store, &config, "noise", device_ts, shadow_ts).await;
            let digital = chain(&t.store, &config, "press-1", device_ts, shadow_ts).await;
            history.push((shadow_ts, device_ts));
            let expected =
                config.evaluate(WindowStats::of(&config, shadow_ts, history.iter().copied()));
            assert_eq!(
                digital.reliability, expected.reliability as f32,
                "event {i}"
            );
            assert_eq!(digital.timeliness, expected.timeliness as f32, "event {i}");
            assert_eq!(digital.odte, expected.odte as f32, "event {i}");
            assert_eq!(digital.lifecycle, expected.lifecycle, "event {i}");
        }
    }
);

store_test!(
    the_golden_sequence_gives_the_hand_worked_values_through_the_store,
    |t| async move {
        // Rows 3 and 10 of the golden table in entwine-core's odte tests, through the store.
        let config = OdteConfig::seed_default();
        let base = 1_700_000_000_000i64;
        let events = [
            (0, 100),
            (5000, 5200),
            (10000, 11500),
            (15000, 15050),
            (20000, 21000),
            (25000, 25010),
            (30000, 30020),
            (35000, 35100),
            (40000, 40300),
            (45000, 45200),
        ];
        let mut answers = Vec::new();
        for (device, shadow) in events {
            answers.push(chain(&t.store, &config, "golden", base + device, base + shadow).await);
        }
        // Row 3: n = 3, timely 2 → R = 1/2, T = 2/3, ODTE = 1/3.
        assert_eq!(answers[2].reliability, 0.5);
        assert_eq!(answers[2].timeliness, (2.0f64 / 3.0) as f32);
        assert_eq!(answers[2].odte, (1.0f64 / 3.0) as f32);
        // Row 9: window [10300, 40300] holds #3-#9, 6 of 7 timely.
        assert_eq!(answers[8].odte, (6.0f64 / 7.0) as f32);
        assert_eq!(answers[8].lifecycle, SeedLifecycle::Disentangled);
        // Row 10: #5-#10, all timely: entangled.
        assert_eq!(answers[9].odte, 1.0);
        assert_eq!(answers[9].lifecycle, SeedLifecycle::Entangled);
        assert!(answers.iter().all(|a| a.availability == 1.0));
    }
);

store_test!(
    a_repeated_twin_call_answers_the_stored_evaluation_and_counts_once,
    |t| async move {
        let config = OdteConfig::seed_default();
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
            .await
            .unwrap();
        let (pending, _) = t
            .store
            .record_shadow(&physical, 1_700_000_000_020)
            .await
            .unwrap();
        let (first, w1) = t
            .store
            .evaluate_digital_state_only(&pending, &config)
            .await
            .unwrap();
        let (again, w2) = t
            .store
            .evaluate_digital_state_only(&pending, &config)
            .await
            .unwrap();
        assert_eq!((w1, w2), (Written::Created, Written::Existing));
        assert_eq!(first, again);
        // Redeliver the whole chain: the next event's window still holds two states, not three.
        let (p2, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_001_000)
            .await
            .unwrap();
        let (d2, _) = t.store.record_shadow(&p2, 1_700_000_001_000).await.unwrap();
        assert_eq!(d2, pending);
        let (physical2, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_005_000), 1_700_000_005_010)
            .await
            .unwrap();
        let (pending2, _) = t
            .store
            .record_shadow(&physical2, 1_700_000_005_020)
            .await
            .unwrap();
        let (second, _) = t
            .store
            .evaluate_digital_state_only(&pending2, &config)
            .await
            .unwrap();
        assert_eq!(second.reliability, (2.0f64 / 6.0) as f32);
    }
);

store_test!(
    concurrent_deliveries_of_one_event_leave_one_row_each,
    |t| async move {
        let config = OdteConfig::seed_default();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = t.store.clone();
            tasks.push(tokio::spawn(async move {
                let (p, _) = store
                    .record_physical_event(
                        &event("press-1", 1_700_000_000_000),
                        1_700_000_000_010 + i,
                    )
                    .await
                    .unwrap();
                let (d, _) = store
                    .record_shadow(&p, 1_700_000_000_020 + i)
                    .await
                    .unwrap();
                store
                    .evaluate_digital_state_only(&d, &config)
                    .await
                    .unwrap()
                    .0
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
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

store_test!(
    a_twin_call_that_contradicts_the_stored_state_is_rejected,
    |t| async move {
        let config = OdteConfig::seed_default();
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
            .await
            .unwrap();
        let (pending, _) = t
            .store
            .record_shadow(&physical, 1_700_000_000_020)
            .await
            .unwrap();
        let cases = [
            (
                "id",
                PendingDigitalState {
                    id: pending.id + 7,
                    ..pending.clone()
                },
            ),
            (
                "device_id",
                PendingDigitalState {
                    device_id: DeviceId::parse("d", "press-2").unwrap(),
                    ..pending.clone()
                },
            ),
            (
                "physicalstate_id",
                PendingDigitalState {
                    physicalstate_id: pending.physicalstate_id + 1,
                    ..pending.clone()
                },
            ),
            (
                "timestamp",
                PendingDigitalState {
                    timestamp: pending.timestamp + 1,
                    ..pending.clone()
                },
            ),
        ];
        for (field, input) in cases {
            match t.store.evaluate_digital_state_only(&input, &config).await {
                Err(StoreError::Rejected(e)) => assert_eq!(e.field, field, "{e}"),
                other => panic!("{field}: expected a rejection, got {other:?}"),
            }
        }
        assert_eq!(
            scalar(
                &t.store,
                "SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL"
            )
            .await,
            0
        );
    }
);

#[tokio::test]
async fn a_postgres_store_that_is_down_is_unavailable() {
    // A port nothing listens on: bind one, then free it.
    let port = entwine_testing::free_port();
    let options = StoreOptions {
        max_connections: 1,
        acquire_timeout: std::time::Duration::from_millis(500),
    };
    let store = Store::open(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        &options,
    )
    .unwrap();
    let err = store
        .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(
        store.migrate().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_sqlite_store_that_cannot_be_opened_is_unavailable() {
    let options = StoreOptions {
        max_connections: 1,
        acquire_timeout: std::time::Duration::from_millis(500),
    };
    let store = Store::open("sqlite:///nonexistent-dir/entwine.db", &options).unwrap();
    let err = store.ping().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn an_unmigrated_store_says_to_migrate() {
    let t = entwine_testing::TestStore::postgres_empty().await;
    let err = t
        .store
        .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotMigrated(_)), "{err:?}");
    let t = entwine_testing::TestStore::sqlite_empty();
    let err = t
        .store
        .record_physical_event(&event("press-1", 1_700_000_000_000), 1_700_000_000_010)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotMigrated(_)), "{err:?}");
}

#[test]
fn unknown_url_schemes_are_refused_by_name() {
    let err = Store::open("mysql://localhost/db", &StoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("\"mysql\""), "{err}");
}

store_test!(
    twins_report_their_latest_evaluation_and_history_newest_first,
    |t| async move {
        let config = OdteConfig::seed_default();
        let base = 1_700_000_000_000i64;
        for i in 0..7 {
            chain(
                &t.store,
                &config,
                "press-a",
                base + i * 5_000,
                base + i * 5_000 + 100,
            )
            .await;
        }
        chain(&t.store, &config, "press-b", base, base + 3_000).await;
        // A pending state (not evaluated yet) is not the twin's latest evaluation.
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-a", base + 40_000), base + 40_050)
            .await
            .unwrap();
        t.store
            .record_shadow(&physical, base + 40_060)
            .await
            .unwrap();

        let twins = t.store.twins().await.unwrap();
        let ids: Vec<&str> = twins.iter().map(|t| t.device_id.as_str()).collect();
        assert_eq!(ids, ["press-a", "press-b"]);
        let a = &twins[0];
        assert_eq!(a.lifecycle, TwinLifecycle::Entangled);
        assert_eq!(a.last_physical_timestamp, Some(base + 30_000));
        assert_eq!(a.last_digital_timestamp, Some(base + 30_100));
        let b = t.store.twin("press-b").await.unwrap().unwrap();
        assert_eq!(b.timeliness, 0.0, "3 s late");
        assert_eq!(
            b.lifecycle,
            TwinLifecycle::Bound,
            "one update: bound for a window"
        );
        assert!(t.store.twin("press-z").await.unwrap().is_none());

        let page = t
            .store
            .history("press-a", 0, HistoryCursor::START, 3)
            .await
            .unwrap();
        let stamps: Vec<i64> = page.iter().map(|h| h.timestamp).collect();
        assert_eq!(stamps, [base + 30_100, base + 25_100, base + 20_100]);
        let next = t
            .store
            .history(
                "press-a",
                0,
                HistoryCursor {
                    timestamp: page[2].timestamp,
                    id: page[2].id,
                },
                3,
            )
            .await
            .unwrap();
        assert_eq!(next[0].timestamp, base + 15_100);
        let since = t
            .store
            .history("press-a", base + 20_000, HistoryCursor::START, 100)
            .await
            .unwrap();
        assert_eq!(since.len(), 3);
        assert!(t
            .store
            .history("press-z", 0, HistoryCursor::START, 10)
            .await
            .unwrap()
            .is_empty());
    }
);

store_test!(
    a_tally_counts_only_the_devices_of_its_prefix,
    |t| async move {
        let config = OdteConfig::seed_default();
        for (device, ts) in [
            ("bench_a-1", 1),
            ("bench_a-2", 2),
            ("bench_ab-1", 3),
            ("other-1", 4),
        ] {
            chain(
                &t.store,
                &config,
                device,
                1_700_000_000_000 + ts,
                1_700_000_000_100 + ts,
            )
            .await;
        }
        // A physical state whose twin was not made yet, and a redelivery that adds nothing.
        t.store
            .record_physical_event(&event("bench_a-3", 1_700_000_000_005), 1_700_000_000_105)
            .await
            .unwrap();
        t.store
            .record_physical_event(&event("bench_a-1", 1_700_000_000_001), 1_700_000_000_200)
            .await
            .unwrap();
        let tally = t.store.tally("bench_a-").await.unwrap();
        assert_eq!(
            tally,
            entwine_store::Tally {
                physical: 3,
                events: 3,
                digital: 2,
                evaluated: 2
            },
            "`_` is no wildcard: bench_ab-1 and other-1 are not counted"
        );
        assert_eq!(t.store.tally("nobody").await.unwrap(), Default::default());
    }
);
