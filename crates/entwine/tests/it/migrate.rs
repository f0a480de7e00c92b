//! `entwine migrate` against real PostgreSQL and SQLite.

use std::process::Output;

use entwine_testing::TestDatabase;
use tokio::process::Command;

async fn entwine(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_entwine"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().await.unwrap()
}

async fn tables(db: &TestDatabase) -> Vec<String> {
    let mut conn = db.connect().await;
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name IN ('physicalstate', 'digitalstate')
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrate_creates_the_tables_from_the_flag_or_database_url_and_is_repeatable() {
    let db = TestDatabase::create().await;
    let out = entwine(&["migrate", "--database-url", &db.url()], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "postgres store migrated"
    );
    assert_eq!(tables(&db).await, ["digitalstate", "physicalstate"]);
    let again = entwine(&["migrate"], &[("DATABASE_URL", &db.url())]).await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_processes_all_succeed() {
    let db = TestDatabase::create().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url();
            tokio::spawn(async move { entwine(&["migrate", "--database-url", &url], &[]).await })
        })
        .collect();
    for run in runs {
        let out = run.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(tables(&db).await, ["digitalstate", "physicalstate"]);
}

#[tokio::test]
async fn migrate_upgrades_a_seed_database_keeping_its_rows() {
    let db = TestDatabase::create().await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE physicalstate (id SERIAL PRIMARY KEY, device_id VARCHAR(255),
             device_timestamp BIGINT, timestamp BIGINT, temperature REAL, energy REAL);
         CREATE TABLE digitalstate (id SERIAL PRIMARY KEY,
             physicalstate_id INTEGER REFERENCES physicalstate(id), device_id VARCHAR(255),
             timestamp BIGINT, temperature REAL, energy REAL, availability REAL,
             reliability REAL, timeliness REAL, odte REAL, lifecycle VARCHAR(255));
         INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy)
             VALUES ('iiot-device-1', 1700000000000, 1700000000100, 26.0, 2.0);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let out = entwine(&["migrate", "--database-url", &db.url()], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM physicalstate")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn migrate_creates_a_sqlite_file_and_refuses_unknown_urls_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("twins.db").display());
    let out = entwine(&["migrate", "--database-url", &url], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("twins.db").exists());

    let out = entwine(
        &["migrate", "--database-url", "mysql://localhost/twins"],
        &[],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unsupported database URL scheme \"mysql\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn migrate_against_a_server_that_is_down_fails_with_a_clear_message() {
    let port = entwine_testing::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let out = entwine(&["migrate", "--database-url", &url], &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot migrate the postgres store: store unavailable"),
        "{stderr}"
    );
}

/// Every table and index of the public schema, for comparing a database before and after.
async fn schema(db: &TestDatabase) -> Vec<String> {
    let mut conn = db.connect().await;
    sqlx::query_scalar(
        "SELECT kind || ' ' || name FROM (
             SELECT 'table' AS kind, table_name::text AS name FROM information_schema.tables
             WHERE table_schema = 'public'
             UNION ALL
             SELECT 'index', indexname::text FROM pg_indexes WHERE schemaname = 'public'
         ) AS s ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_refused_seed_upgrade_says_why_once_and_leaves_the_database_as_it_was() {
    let db = TestDatabase::create().await;
    let mut conn = db.connect().await;
    // The seed's tables, with one event stored twice (the seed did that on a redelivery).
    sqlx::raw_sql(
        "CREATE TABLE physicalstate (id SERIAL PRIMARY KEY, device_id VARCHAR(255),
             device_timestamp BIGINT, timestamp BIGINT, temperature REAL, energy REAL);
         CREATE TABLE digitalstate (id SERIAL PRIMARY KEY,
             physicalstate_id INTEGER REFERENCES physicalstate(id), device_id VARCHAR(255),
             timestamp BIGINT, temperature REAL, energy REAL, availability REAL,
             reliability REAL, timeliness REAL, odte REAL, lifecycle VARCHAR(255));
         INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy)
             VALUES ('iiot-device-1', 1700000000000, 1700000000100, 26.0, 2.0),
                    ('iiot-device-1', 1700000000000, 1700000000300, 26.0, 2.0),
                    ('iiot-device-2', 1700000000000, 1700000000100, 21.0, 1.0);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let before = schema(&db).await;
    assert_eq!(
        before,
        [
            "index digitalstate_pkey",
            "index physicalstate_pkey",
            "table digitalstate",
            "table physicalstate"
        ]
    );
    let out = entwine(&["migrate", "--database-url", &db.url()], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: cannot migrate the postgres store: stored data is inconsistent: cannot upgrade: \
         1 (device_id, device_timestamp) pairs occur more than once in physicalstate; keep one \
         row of each (README, \"Upgrading a seed database\") and migrate again; nothing was changed"
    );
    assert_eq!(
        schema(&db).await,
        before,
        "no _sqlx_migrations, no new index"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM physicalstate")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    // Once the duplicate is resolved, the same command upgrades it.
    sqlx::raw_sql("DELETE FROM physicalstate WHERE id = 2")
        .execute(&mut conn)
        .await
        .unwrap();
    let out = entwine(&["migrate", "--database-url", &db.url()], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(schema(&db)
        .await
        .contains(&"index physicalstate_device_event_key".to_owned()));
}

#[tokio::test]
async fn a_database_url_that_cannot_be_used_exits_2_naming_the_problem() {
    for (url, says) in [
        (
            "mysql://localhost/twins",
            "error: unsupported database URL scheme \"mysql\": expected postgres://, postgresql:// or sqlite://",
        ),
        (
            "postgres://localhost:notaport/twins",
            "error: invalid PostgreSQL URL (postgres://…)",
        ),
    ] {
        for command in [&["migrate"][..], &["status", "--database-url", url][..]] {
            let out = entwine(command, &[("DATABASE_URL", url)]).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command:?} {url}: {stderr}");
            assert!(stderr.starts_with(says), "{command:?} {url}: {stderr}");
        }
    }
}
