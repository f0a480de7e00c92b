//! Nothing answered as stored that is not stored as sent: a different event under a used key, a
//! state that contradicts the stored one and a forged digital state are refused, naming the
//! field, without a row; a lifecycle change is reported only when it was written; dead letters
//! are durable. Every case drives the calls production makes.

use entwine_core::deadletter::DeadLetter;
use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, DigitalState, PhysicalEvent, PhysicalState};
use entwine_core::twin::TwinLifecycle;
use entwine_store::{Store, StoreError, Written};
use entwine_testing::{scalar, store_test};

const T0: i64 = 1_700_000_000_000;

fn event(device: &str, device_timestamp: i64, temperature: f32) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: entwine_core::state::Readings::seed(temperature, 1.5),
    }
}

/// 1 update/s expected over a 10 s window, unbound after 30 s of silence.
fn config() -> OdteConfig {
    OdteConfig::new(1.0, 10.0, 1.0, 0.9)
        .unwrap()
        .with_silence_threshold(Some(30.0))
        .unwrap()
}

/// One event through the three writes as the functions make them (the twin handler's
/// `evaluate_digital_state`), mirrored 10 ms after the device measured it.
async fn chain(store: &Store, config: &OdteConfig, device: &str, shadow_ts: i64) -> DigitalState {
    let (physical, _) = store
        .record_physical_event(&event(device, shadow_ts - 10, 20.0), shadow_ts)
        .await
        .unwrap();
    let (pending, _) = store.record_shadow(&physical, shadow_ts).await.unwrap();
    let (digital, written, _) = store
        .evaluate_digital_state(&pending, config)
        .await
        .unwrap();
    assert_eq!(written, Written::Created);
    digital
}

fn refused_field(result: Result<impl std::fmt::Debug, StoreError>) -> String {
    match result {
        Err(StoreError::Rejected(e) | StoreError::Conflict(e)) => e.field,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

store_test!(
    a_different_event_under_a_used_device_timestamp_is_a_conflict_and_not_stored,
    |t| async move {
        let first = event("press-1", T0, 27.5);
        t.store.record_physical_event(&first, T0 + 5).await.unwrap();
        // The same event again: a redelivery, answered as stored.
        let (_, again) = t.store.record_physical_event(&first, T0 + 9).await.unwrap();
        assert_eq!(again, Written::Existing);
        // Another reading with the same device timestamp: refused, nothing written.
        match t
            .store
            .record_physical_event(&event("press-1", T0, 31.0), T0 + 9)
            .await
        {
            Err(StoreError::Conflict(e)) => {
                assert_eq!(e.field, "timestamp");
                assert_eq!(
                    e.reason,
                    "device press-1 already sent a different event at device timestamp \
                     1700000000000 (temperature 27.5 stored, 31 sent): device timestamps must \
                     be unique"
                );
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
            1
        );
        assert_eq!(
            scalar(
                &t.store,
                "SELECT COUNT(*) FROM physicalstate WHERE temperature > 30"
            )
            .await,
            0
        );
    }
);

store_test!(
    a_physical_or_pending_state_that_contradicts_the_stored_one_is_refused_naming_the_field,
    |t| async move {
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", T0, 20.0), T0 + 5)
            .await
            .unwrap();
        let altered = [
            (
                PhysicalState {
                    readings: entwine_core::state::Readings::seed(
                        99.0,
                        physical.readings.energy().unwrap(),
                    ),
                    ..physical.clone()
                },
                "temperature",
            ),
            (
                PhysicalState {
                    readings: entwine_core::state::Readings::seed(
                        physical.readings.temperature().unwrap(),
                        0.0,
                    ),
                    ..physical.clone()
                },
                "energy",
            ),
            (
                PhysicalState {
                    device_timestamp: T0 - 1,
                    ..physical.clone()
                },
                "device_timestamp",
            ),
            (
                PhysicalState {
                    timestamp: T0 + 6,
                    ..physical.clone()
                },
                "timestamp",
            ),
        ];
        for (state, field) in &altered {
            assert_eq!(
                refused_field(t.store.record_shadow(state, T0 + 7).await),
                *field
            );
        }
        assert_eq!(
            scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
            0
        );
        // The true state passes, and after it the altered ones are still refused.
        let (pending, _) = t.store.record_shadow(&physical, T0 + 7).await.unwrap();
        for (state, field) in &altered {
            assert_eq!(
                refused_field(t.store.record_shadow(state, T0 + 8).await),
                *field
            );
        }
        let mut forged = pending.clone();
        forged.readings =
            entwine_core::state::Readings::seed(forged.readings.temperature().unwrap(), 7.0);
        assert_eq!(
            refused_field(t.store.evaluate_digital_state(&forged, &config()).await),
            "energy"
        );
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

store_test!(
    only_a_digital_state_the_store_holds_as_stored_is_accepted,
    |t| async move {
        let config = config();
        let digital = chain(&t.store, &config, "press-1", T0).await;
        assert_eq!(t.store.stored_digital(&digital).await.unwrap(), digital);
        let forgeries: [(DigitalState, &str); 5] = [
            (
                DigitalState {
                    odte: 1.0,
                    ..digital.clone()
                },
                "odte",
            ),
            (
                DigitalState {
                    lifecycle: entwine_core::odte::SeedLifecycle::Entangled,
                    ..digital.clone()
                },
                "lifecycle",
            ),
            (
                DigitalState {
                    reliability: 1.0,
                    ..digital.clone()
                },
                "reliability",
            ),
            (
                {
                    let mut d = digital.clone();
                    d.pending.readings = entwine_core::state::Readings::seed(
                        -273.0,
                        d.pending.readings.energy().unwrap(),
                    );
                    d
                },
                "temperature",
            ),
            (
                {
                    let mut d = digital.clone();
                    d.pending.id += 1000;
                    d
                },
                "id",
            ),
        ];
        for (forged, field) in forgeries {
            assert_eq!(refused_field(t.store.stored_digital(&forged).await), field);
        }
        // A pending state not evaluated yet is not a digital state.
        let (physical, _) = t
            .store
            .record_physical_event(&event("press-1", T0 + 990, 20.0), T0 + 1000)
            .await
            .unwrap();
        let (pending, _) = t.store.record_shadow(&physical, T0 + 1000).await.unwrap();
        let unevaluated = DigitalState {
            pending,
            ..digital.clone()
        };
        assert_eq!(
            refused_field(t.store.stored_digital(&unevaluated).await),
            "odte"
        );
    }
);

store_test!(
    a_redelivered_old_state_reports_no_lifecycle_change_and_leaves_the_twin_as_it_is,
    |t| async move {
        let config = config();
        // One update a second for 15 s: bound at T0, entangled once the window is full.
        let mut states = Vec::new();
        for s in 0..=15 {
            states.push(chain(&t.store, &config, "press-1", T0 + s * 1000).await);
        }
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.lifecycle, TwinLifecycle::Entangled);
        // The chain of the state from 13 s earlier is delivered again (a connector crashed
        // before its acknowledgement): answered as stored, and no change is reported, because
        // the twin row keeps its later evaluation.
        let old = &states[2];
        let (again, written, change) = t
            .store
            .evaluate_digital_state(&old.pending, &config)
            .await
            .unwrap();
        assert_eq!(written, Written::Existing);
        assert_eq!(&again, old);
        assert_eq!(change, None);
        let after = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(after, twin);
    }
);

store_test!(
    the_evaluator_window_holds_both_of_its_bounds,
    |t| async move {
        let config = config();
        // States at T0, T0 + 1 s, …, T0 + 10 s.
        for s in 0..=10 {
            chain(&t.store, &config, "press-1", T0 + s * 1000).await;
        }
        // At T0 + 12 s the window is [T0 + 2 s, T0 + 12 s]: the states at 2, 3, …, 10 s, nine
        // of the ten expected. The one at exactly T0 + 2 s counts (an open lower bound would
        // give 0.8).
        t.store
            .reevaluate_twins(T0 + 12_000, &config)
            .await
            .unwrap();
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.reliability, 0.9f32);
        assert_eq!(twin.timeliness, 1.0f32);
        assert_eq!(twin.evaluated_at, T0 + 12_000);
        // At T0 + 20 s only the state at exactly T0 + 10 s is left: R = 1/10.
        t.store
            .reevaluate_twins(T0 + 20_000, &config)
            .await
            .unwrap();
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.reliability, 0.1f32);
    }
);

store_test!(
    an_evaluation_older_than_the_stored_one_reports_no_change,
    |t| async move {
        let config = config();
        for s in 0..=11 {
            chain(&t.store, &config, "press-1", T0 + s * 1000).await;
        }
        // The evaluator ran at T0 + 40 s (silent for 29 s: disentangled, not yet unbound).
        let changes = t
            .store
            .reevaluate_twins(T0 + 40_000, &config)
            .await
            .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to, TwinLifecycle::Disentangled);
        // A second evaluator with a clock 29 s behind would see the twin entangled again (its
        // window [1 s, 11 s] is full): the stored evaluation is later, so nothing is written
        // and nothing is reported.
        let stale = t
            .store
            .reevaluate_twins(T0 + 11_000, &config)
            .await
            .unwrap();
        assert_eq!(stale, Vec::new());
        let twin = t.store.twin("press-1").await.unwrap().unwrap();
        assert_eq!(twin.lifecycle, TwinLifecycle::Disentangled);
        assert_eq!(twin.evaluated_at, T0 + 40_000);
    }
);

store_test!(
    dead_letters_are_stored_small_counted_per_delivery_and_listed_newest_first,
    |t| async move {
        let hostile = vec![1u8; 60 * 1024];
        let letter = DeadLetter::of(
            "device/press-1/telemetry/device_state",
            Some("press-1"),
            &hostile,
            "payload",
            None,
            "payload: not valid JSON",
            T0,
        );
        let first = t.store.record_dead_letter(&letter).await.unwrap();
        assert_eq!(first.deliveries, 1);
        assert_eq!(first.payload_bytes, 61_440);
        assert_eq!(first.payload_prefix.len(), 512);
        assert!(first.truncated);
        // The same message again (a redelivery): one row, two deliveries.
        let again = t
            .store
            .record_dead_letter(&DeadLetter {
                at: T0 + 5,
                ..letter.clone()
            })
            .await
            .unwrap();
        assert_eq!((again.id, again.deliveries), (first.id, 2));
        assert_eq!((again.first_at, again.last_at), (T0, T0 + 5));
        let other = DeadLetter::of(
            "device/press-2/telemetry/device_state",
            Some("press-2"),
            b"{\"timestamp\": -5}",
            "physicalevents",
            Some(400),
            "timestamp: -5 is negative",
            T0 + 9,
        );
        let second = t.store.record_dead_letter(&other).await.unwrap();
        assert_eq!(second.status, Some(400));
        assert!(!second.truncated);
        let listed = t.store.dead_letters(10, None).await.unwrap();
        assert_eq!(
            listed.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![second.id, first.id]
        );
        assert_eq!(listed[1], again);
        let page = t.store.dead_letters(10, Some(second.id)).await.unwrap();
        assert_eq!(page, vec![again]);
        assert_eq!(t.store.dead_letter_count().await.unwrap(), (2, 3));
    }
);

/// Runs `sql` as the test database's owner.
async fn admin(db: &entwine_testing::TestDatabase, sql: &str) {
    use sqlx::Executor;
    let mut conn = db.connect().await;
    conn.execute(sql).await.unwrap();
}

#[tokio::test]
async fn operational_database_errors_are_unavailable_to_retry_not_the_messages_fault() {
    let db = entwine_testing::TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let role = format!("r_{}", &db.name[db.name.len() - 12..]);
    admin(
        &db,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'x'; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ),
    )
    .await;
    let store = Store::postgres(
        db.options().username(&role).password("x"),
        &entwine_store::StoreOptions {
            max_connections: 1,
            acquire_timeout: std::time::Duration::from_secs(5),
        },
    );
    // Drops the role's open connection, so the next call connects anew under the new rules.
    let terminate =
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'");
    let reconnect = || admin(&db, &terminate);
    let write = |t: i64| {
        let store = store.clone();
        async move {
            store
                .record_physical_event(&event("press-1", t, 20.0), t + 5)
                .await
        }
    };
    write(T0).await.unwrap();
    let reason_of = |result: Result<_, StoreError>| match result {
        Err(e @ StoreError::Unavailable(_)) => e.reason(),
        other => panic!("expected the store to be unavailable, got {other:?}"),
    };
    // A fail-over to a read-only server (25006).
    admin(
        &db,
        &format!("ALTER ROLE {role} SET default_transaction_read_only = on"),
    )
    .await;
    reconnect().await;
    assert_eq!(reason_of(write(T0 + 1000).await), "25006");
    admin(
        &db,
        &format!("ALTER ROLE {role} RESET default_transaction_read_only"),
    )
    .await;
    reconnect().await;
    write(T0 + 2000).await.unwrap();
    // A grant missing (42501).
    admin(&db, &format!("REVOKE INSERT ON physicalstate FROM {role}")).await;
    assert_eq!(reason_of(write(T0 + 3000).await), "42501");
    admin(&db, &format!("GRANT INSERT ON physicalstate TO {role}")).await;
    // Each time it passed again once the operator fixed it: three events, none lost.
    write(T0 + 4000).await.unwrap();
    assert_eq!(
        scalar(
            &db.migrated_store().await,
            "SELECT COUNT(*) FROM physicalstate"
        )
        .await,
        3
    );
    store.close().await;
    admin(
        &db,
        &format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; \
             REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}; DROP ROLE {role}"
        ),
    )
    .await;
}
