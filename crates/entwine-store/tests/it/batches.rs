//! Batches: the same inputs written many at a time answer and store exactly what they would one
//! at a time — a state's window holds only the states up to it, a twin moves through its
//! batch's evaluations in turn, and an input refused alone leaves the others written.

use entwine_core::odte::{OdteConfig, SeedLifecycle};
use entwine_core::state::{DeviceId, DigitalState, PhysicalEvent, PhysicalState};
use entwine_core::twin::TwinLifecycle;
use entwine_store::{Store, StoreError, TwinChange, Written};
use entwine_testing::{store_test, TestStore};

const T0: i64 = 1_700_000_000_000;

fn event(device: &str, device_timestamp: i64, temperature: f32) -> PhysicalEvent {
    PhysicalEvent {
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_timestamp,
        readings: entwine_core::state::Readings::seed(temperature, 1.5),
    }
}

/// 1 update/s expected over 10 s, timely within 1 s, entangled from ODTE 0.9.
fn config() -> OdteConfig {
    OdteConfig::new(1.0, 10.0, 1.0, 0.9).unwrap()
}

/// Two rounds: each round's events arrive together (one batch, or one after the other with
/// the same clock reading). Round 1 has a duplicate and a different event under a used key.
fn rounds() -> Vec<(i64, Vec<PhysicalEvent>)> {
    vec![
        (
            T0,
            vec![
                event("press-a", T0 - 500, 20.0),
                event("press-a", T0 - 2_000, 20.5),
                event("press-a", T0 - 500, 20.0),
                event("press-b", T0 - 100, 30.0),
                event("press-a", T0 - 500, 99.0),
            ],
        ),
        (
            T0 + 11_000,
            vec![
                event("press-a", T0 + 10_800, 21.0),
                event("press-a", T0 + 10_900, 21.5),
            ],
        ),
    ]
}

type Evaluated = Result<(DigitalState, Written, Option<TwinChange>), String>;

fn field(e: &StoreError) -> String {
    match e {
        StoreError::Rejected(i) | StoreError::Conflict(i) => format!("refused: {}", i.field),
        other => panic!("not an element's refusal: {other}"),
    }
}

/// Runs every round through the three writes, batched or one input at a time; answers what the
/// twin handler answered for each event that got that far.
async fn run(store: &Store, batched: bool) -> Vec<Evaluated> {
    let config = config();
    let mut answers = Vec::new();
    for (now, events) in rounds() {
        let physical: Vec<Result<(PhysicalState, Written), StoreError>> = if batched {
            store.record_physical_events(&events, now).await.unwrap()
        } else {
            let mut each = Vec::new();
            for e in &events {
                each.push(store.record_physical_event(e, now).await);
            }
            each
        };
        let physical: Vec<PhysicalState> = physical
            .into_iter()
            .filter_map(|r| r.ok().map(|(s, _)| s))
            .collect();
        let pending = if batched {
            store.record_shadows(&physical, now).await.unwrap()
        } else {
            let mut each = Vec::new();
            for p in &physical {
                each.push(store.record_shadow(p, now).await);
            }
            each
        };
        let pending: Vec<_> = pending.into_iter().map(|r| r.unwrap().0).collect();
        if batched {
            let each = store
                .evaluate_digital_states(&pending, &config)
                .await
                .unwrap();
            answers.extend(each.into_iter().map(|r| r.map_err(|e| field(&e))));
        } else {
            for p in &pending {
                let r = store.evaluate_digital_state(p, &config).await;
                answers.push(r.map_err(|e| field(&e)));
            }
        }
    }
    answers
}

/// Every row of the three tables, as text.
async fn rows(store: &Store) -> Vec<String> {
    let queries = [
        "SELECT id || ' ' || device_id || ' ' || device_timestamp || ' ' || timestamp || ' ' \
         || temperature || ' ' || energy FROM physicalstate ORDER BY id",
        "SELECT id || ' ' || physicalstate_id || ' ' || device_id || ' ' || timestamp || ' ' \
         || availability || ' ' || reliability || ' ' || timeliness || ' ' || odte || ' ' \
         || lifecycle FROM digitalstate ORDER BY id",
        "SELECT device_id || ' ' || lifecycle || ' ' || since || ' ' || bound_at || ' ' \
         || digitalstate_id || ' ' || last_update || ' ' || last_device_timestamp || ' ' \
         || evaluated_at || ' ' || odte FROM twin ORDER BY device_id",
    ];
    let mut all = Vec::new();
    for sql in queries {
        let found: Vec<String> = match store {
            Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
            Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
        };
        all.extend(found);
    }
    all
}

store_test!(
    a_batch_answers_and_stores_exactly_what_one_at_a_time_does,
    |t| async move {
        let other = match t.store {
            Store::Postgres(_) => TestStore::postgres().await,
            Store::Sqlite(_) => TestStore::sqlite().await,
        };
        let batched = run(&t.store, true).await;
        let single = run(&other.store, false).await;
        assert_eq!(batched, single);
        assert_eq!(rows(&t.store).await, rows(&other.store).await);

        // Worked out by hand. Round 1 (all stamped T0): press-a's first state is alone in its
        // window (its batch's later states are not in it): R = 1/10, T = 1. Its second: two
        // states, the second 2 s late: R = 0.2, T = 0.5. The duplicate answers the first.
        let figures: Vec<(f32, f32, f32, Written)> = batched
            .iter()
            .map(|r| {
                let (d, w, _) = r.as_ref().unwrap();
                (d.reliability, d.timeliness, d.odte, *w)
            })
            .collect();
        assert_eq!(
            figures,
            [
                (0.1, 1.0, 0.1, Written::Created),
                (0.2, 0.5, 0.1, Written::Created),
                (0.1, 1.0, 0.1, Written::Existing),
                (0.1, 1.0, 0.1, Written::Created),
                // Round 2, 11 s later: round 1 has left the window.
                (0.1, 1.0, 0.1, Written::Created),
                (0.2, 1.0, 0.2, Written::Created),
            ]
        );
        assert!(batched
            .iter()
            .all(|r| r.as_ref().unwrap().0.lifecycle == SeedLifecycle::Disentangled));
        // Each twin is bound by its first state; press-a leaves "bound" a window after it was
        // bound, once: its round-2 second state finds it disentangled already.
        let changes: Vec<Option<(Option<TwinLifecycle>, TwinLifecycle, i64)>> = batched
            .iter()
            .map(|r| r.as_ref().unwrap().2.as_ref().map(|c| (c.from, c.to, c.at)))
            .collect();
        assert_eq!(
            changes,
            [
                Some((None, TwinLifecycle::Bound, T0)),
                None,
                None,
                Some((None, TwinLifecycle::Bound, T0)),
                Some((
                    Some(TwinLifecycle::Bound),
                    TwinLifecycle::Disentangled,
                    T0 + 11_000
                )),
                None,
            ]
        );
    }
);

store_test!(
    an_input_refused_in_a_batch_is_refused_alone,
    |t| async move {
        let (_, events) = rounds().remove(0);
        let physical = t.store.record_physical_events(&events, T0).await.unwrap();
        let written: Vec<Result<Written, String>> = physical
            .iter()
            .map(|r| r.as_ref().map(|(_, w)| *w).map_err(field))
            .collect();
        assert_eq!(
            written,
            [
                Ok(Written::Created),
                Ok(Written::Created),
                Ok(Written::Existing),
                Ok(Written::Created),
                Err("refused: timestamp".into()),
            ]
        );
        let first = physical[0].as_ref().unwrap().0.clone();
        assert_eq!(physical[2].as_ref().unwrap().0, first);
        // A physical state that is not stored, and one that differs from the stored one, among
        // good ones.
        let mut unknown = first.clone();
        unknown.id += 1_000;
        let mut altered = first.clone();
        altered.readings =
            entwine_core::state::Readings::seed(25.0, altered.readings.energy().unwrap());
        let states = [
            first.clone(),
            unknown,
            altered,
            physical[3].as_ref().unwrap().0.clone(),
        ];
        let shadows = t.store.record_shadows(&states, T0).await.unwrap();
        let written: Vec<Result<Written, String>> = shadows
            .iter()
            .map(|r| r.as_ref().map(|(_, w)| *w).map_err(field))
            .collect();
        assert_eq!(
            written,
            [
                Ok(Written::Created),
                Err("refused: id".into()),
                Err("refused: temperature".into()),
                Ok(Written::Created),
            ]
        );
        assert_eq!(
            entwine_testing::scalar(&t.store, "SELECT COUNT(*) FROM digitalstate").await,
            2
        );
    }
);
