//! Migrations: the seed's tables exactly, repeatable, concurrent, and an in-place upgrade of a
//! database the seed system created.

use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent};
use entwine_store::{StoreError, Written};
use entwine_testing::{execute, scalar, store_test, Location, TestStore};

/// The seed's SQL, verbatim from its deployment guide.
const SEED_SQL: &str = "
CREATE TABLE physicalstate (
    id SERIAL PRIMARY KEY,
    device_id VARCHAR(255),
    device_timestamp BIGINT,
    timestamp BIGINT,
    temperature REAL,
    energy REAL
);

CREATE TABLE digitalstate (
    id SERIAL PRIMARY KEY,
    physicalstate_id INTEGER REFERENCES physicalstate(id),
    device_id VARCHAR(255),
    timestamp BIGINT,
    temperature REAL,
    energy REAL,
    availability REAL,
    reliability REAL,
    timeliness REAL,
    odte REAL,
    lifecycle VARCHAR(255)
);";

const SEED_ROWS: &str = "
INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy)
VALUES ('iiot-device-1', 1700000000000, 1700000000120, 26.5, 2.5),
       ('iiot-device-1', 1700000005000, 1700000005090, 26.7, 2.6);
INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, energy,
                          availability, reliability, timeliness, odte, lifecycle)
VALUES (1, 'iiot-device-1', 1700000000150, 26.5, 2.5, 1.0, 0.16666667, 1.0, 0.16666667, 'disentangled'),
       (2, 'iiot-device-1', 1700000005110, 26.7, 2.6, 1.0, 0.33333334, 1.0, 0.33333334, 'disentangled');";

#[tokio::test]
async fn postgres_tables_have_the_seed_names_columns_and_types() {
    let t = TestStore::postgres().await;
    let Location::PostgresSchema { schema, .. } = &t.location else {
        unreachable!()
    };
    let expected = [
        ("digitalstate", "availability", "real"),
        ("digitalstate", "device_id", "character varying(255)"),
        ("digitalstate", "energy", "real"),
        ("digitalstate", "id", "integer"),
        ("digitalstate", "lifecycle", "character varying(255)"),
        ("digitalstate", "odte", "real"),
        ("digitalstate", "physicalstate_id", "integer"),
        ("digitalstate", "reliability", "real"),
        ("digitalstate", "temperature", "real"),
        ("digitalstate", "timeliness", "real"),
        ("digitalstate", "timestamp", "bigint"),
        ("physicalstate", "device_id", "character varying(255)"),
        ("physicalstate", "device_timestamp", "bigint"),
        ("physicalstate", "energy", "real"),
        ("physicalstate", "id", "integer"),
        ("physicalstate", "temperature", "real"),
        ("physicalstate", "timestamp", "bigint"),
    ];
    let entwine_store::Store::Postgres(pool) = &t.store else {
        unreachable!()
    };
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname IN ('physicalstate', 'digitalstate')
           AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY 1, 2",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap();
    let columns: Vec<(&str, &str, &str)> = columns
        .iter()
        .map(|(t, c, y)| (t.as_str(), c.as_str(), y.as_str()))
        .collect();
    assert_eq!(columns, expected);
    // SERIAL ids and the foreign key, as the seed has them.
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() AND column_default LIKE 'nextval(%' AND column_name = 'id' AND table_name IN ('physicalstate', 'digitalstate')").await,
        2
    );
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM information_schema.table_constraints WHERE table_schema = current_schema() AND table_name = 'digitalstate' AND constraint_type = 'FOREIGN KEY'").await,
        1
    );
}

#[tokio::test]
async fn sqlite_tables_have_the_seed_names_columns_and_declared_types() {
    let t = TestStore::sqlite().await;
    let entwine_store::Store::Sqlite(pool) = &t.store else {
        unreachable!()
    };
    let columns: Vec<(String, String)> =
        sqlx::query_as("SELECT name, type FROM pragma_table_info('digitalstate') ORDER BY cid")
            .fetch_all(pool)
            .await
            .unwrap();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "physicalstate_id",
            "device_id",
            "timestamp",
            "temperature",
            "energy",
            "availability",
            "reliability",
            "timeliness",
            "odte",
            "lifecycle"
        ]
    );
    assert_eq!(columns[2].1, "VARCHAR(255)");
    assert_eq!(columns[3].1, "BIGINT");
    assert_eq!(columns[9].1, "REAL");
}

store_test!(migrating_again_changes_nothing, |t| async move {
    t.store
        .record_physical_event(
            &PhysicalEvent {
                device_id: DeviceId::parse("device_id", "d").unwrap(),
                device_timestamp: 1_700_000_000_000,
                readings: entwine_core::state::Readings::seed(1.0, 2.0),
            },
            1_700_000_000_000,
        )
        .await
        .unwrap();
    t.store.migrate().await.unwrap();
    t.reopen().migrate().await.unwrap();
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
        1
    );
});

async fn migrate_concurrently(t: &TestStore) {
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let store = t.reopen();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for task in tasks {
        task.await
            .unwrap()
            .expect("every concurrent migration succeeds");
    }
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM _sqlx_migrations").await,
        8
    );
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_a_fresh_postgres_schema_all_succeed() {
    migrate_concurrently(&TestStore::postgres_empty().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_a_fresh_sqlite_file_all_succeed() {
    migrate_concurrently(&TestStore::sqlite_empty()).await;
}

#[tokio::test]
async fn a_seed_database_is_upgraded_in_place_with_its_rows() {
    let t = TestStore::postgres_empty().await;
    execute(&t.store, SEED_SQL).await;
    execute(&t.store, SEED_ROWS).await;
    t.store.migrate().await.unwrap();
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
        2
    );
    assert_eq!(
        scalar(
            &t.store,
            "SELECT COUNT(*) FROM digitalstate WHERE lifecycle = 'disentangled'"
        )
        .await,
        2
    );

    // The seed's twins are in the twin table, as their latest evaluation left them.
    let twins = t.store.twins().await.unwrap();
    assert_eq!(twins.len(), 1, "{twins:?}");
    assert_eq!(twins[0].device_id, "iiot-device-1");
    assert_eq!(
        twins[0].lifecycle,
        entwine_core::twin::TwinLifecycle::Disentangled
    );
    assert_eq!(twins[0].digital_state_id, Some(2));

    // The seed's history counts in the next evaluation, and the seed's ids carry on.
    let config = OdteConfig::seed_default();
    let (physical, written) = t
        .store
        .record_physical_event(
            &PhysicalEvent {
                device_id: DeviceId::parse("device_id", "iiot-device-1").unwrap(),
                device_timestamp: 1_700_000_010_000,
                readings: entwine_core::state::Readings::seed(26.9, 2.7),
            },
            1_700_000_010_050,
        )
        .await
        .unwrap();
    assert_eq!((physical.id, written), (3, Written::Created));
    let (pending, _) = t
        .store
        .record_shadow(&physical, 1_700_000_010_060)
        .await
        .unwrap();
    let (digital, _) = t
        .store
        .evaluate_digital_state_only(&pending, &config)
        .await
        .unwrap();
    assert_eq!(
        digital.reliability, 0.5,
        "three states in the window: two from the seed"
    );
    // A redelivery of a seed-era event is recognised too.
    let (old, written) = t
        .store
        .record_physical_event(
            &PhysicalEvent {
                device_id: DeviceId::parse("device_id", "iiot-device-1").unwrap(),
                device_timestamp: 1_700_000_000_000,
                readings: entwine_core::state::Readings::seed(26.5, 2.5),
            },
            1_700_000_011_000,
        )
        .await
        .unwrap();
    assert_eq!((old.id, written), (1, Written::Existing));
}

#[tokio::test]
async fn a_seed_database_with_duplicate_events_is_refused_with_the_reason_and_left_intact() {
    let t = TestStore::postgres_empty().await;
    execute(&t.store, SEED_SQL).await;
    execute(&t.store, SEED_ROWS).await;
    execute(
        &t.store,
        "INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy)
         VALUES ('iiot-device-1', 1700000000000, 1700000000300, 26.5, 2.5)",
    )
    .await;
    let err = t.store.migrate().await.unwrap_err();
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(
        chain.contains("occur more than once in physicalstate"),
        "{chain}"
    );
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
        3
    );
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = 'physicalstate_device_event_key'").await,
        0
    );
}

/// An entwine database from before device models (migrations 0001-0007 applied, rows written by
/// the pipeline) takes migration 0008 in place: every row kept and read back as before, and a
/// model's device can then be recorded beside the seed's.
async fn upgrade_to_models(t: TestStore, backend: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(backend);
    let mut before = sqlx::migrate::Migrator::new(dir).await.unwrap();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version <= 7)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    match &t.store {
        entwine_store::Store::Postgres(pool) => before.run(pool).await.unwrap(),
        entwine_store::Store::Sqlite(pool) => before.run(pool).await.unwrap(),
    }
    let config = OdteConfig::seed_default();
    let mut answers = Vec::new();
    for i in 0..3 {
        let t_ms = 1_700_000_000_000 + i * 5_000;
        let (physical, _) = t
            .store
            .record_physical_event(
                &PhysicalEvent {
                    device_id: DeviceId::parse("device_id", "iiot-device-1").unwrap(),
                    device_timestamp: t_ms,
                    readings: entwine_core::state::Readings::seed(26.5 + i as f32, 2.5),
                },
                t_ms + 40,
            )
            .await
            .unwrap();
        let (pending, _) = t.store.record_shadow(&physical, t_ms + 50).await.unwrap();
        let (digital, _) = t
            .store
            .evaluate_digital_state_only(&pending, &config)
            .await
            .unwrap();
        answers.push(digital);
    }
    assert!(
        !tables(&t)
            .await
            .contains(&"physicalstate_reading".to_owned()),
        "before 0008"
    );

    t.store.migrate().await.unwrap();
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM _sqlx_migrations").await,
        8
    );
    assert_eq!(
        scalar(&t.store, "SELECT COUNT(*) FROM physicalstate").await,
        3
    );
    // Each stored state answers exactly as before the upgrade.
    for digital in &answers {
        assert_eq!(&t.store.stored_digital(digital).await.unwrap(), digital);
    }
    // A device of a model is recorded beside them.
    let model = entwine_core::model::ModelReadings {
        model: "meter".into(),
        model_version: "1.0.0".into(),
        readings: serde_json::json!({"kwh": 12.5})
            .as_object()
            .cloned()
            .unwrap(),
    };
    let (physical, written) = t
        .store
        .record_physical_event(
            &PhysicalEvent {
                device_id: DeviceId::parse("device_id", "meter-1").unwrap(),
                device_timestamp: 1_700_000_020_000,
                readings: entwine_core::state::Readings::Model(model.clone()),
            },
            1_700_000_020_040,
        )
        .await
        .unwrap();
    assert_eq!((physical.id, written), (4, Written::Created));
    assert_eq!(
        physical.readings,
        entwine_core::state::Readings::Model(model)
    );
}

async fn tables(t: &TestStore) -> Vec<String> {
    let sql = match &t.store {
        entwine_store::Store::Postgres(_) => {
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()"
        }
        entwine_store::Store::Sqlite(_) => "SELECT name FROM sqlite_master WHERE type = 'table'",
    };
    let rows: Vec<(String,)> = match &t.store {
        entwine_store::Store::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        entwine_store::Store::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
    };
    rows.into_iter().map(|(name,)| name).collect()
}

#[tokio::test]
async fn an_entwine_postgres_database_from_before_models_is_upgraded_in_place() {
    upgrade_to_models(TestStore::postgres_empty().await, "postgres").await;
}

#[tokio::test]
async fn an_entwine_sqlite_database_from_before_models_is_upgraded_in_place() {
    upgrade_to_models(TestStore::sqlite_empty(), "sqlite").await;
}
