//! The typed configuration through the `entwine` binary: `entwine config`, the layers
//! (file < environment < flag), errors naming the source, `ENTWINE_POSTGRES__*` for
//! `entwine migrate`, the pool size.

use std::process::Output;

use entwine::cli::{open_migrated, DatabaseArgs};
use entwine_testing::TestDatabase;
use tokio::process::Command;

/// `entwine ARGS` in a clean environment (only `PATH`, `HOME` and `env`), mount roots that
/// do not exist.
async fn entwine(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_entwine"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("ENTWINE_CONFIG_ROOT", "/nonexistent/configs")
        .env("ENTWINE_SECRET_ROOT", "/nonexistent/secrets")
        .env("ENTWINE_PODINFO_DIR", "/nonexistent/podinfo");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().await.unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn config_prints_each_value_from_its_layer_with_passwords_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entwine.yaml");
    std::fs::write(
        &file,
        "odte:\n  threshold: 0.5\n  time_window: 12\n  desired_timeliness: 2\n\
         database:\n  url: postgres://entwine:file-secret@db.internal/twins\n  max_connections: 3\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    let env = [
        ("ENTWINE_ODTE__THRESHOLD", "0.6"),
        ("ENTWINE_ODTE__TIME_WINDOW", "24"),
        ("ENTWINE_POSTGRES__PASSWORD", "env-secret"),
    ];

    let out = entwine(
        &["config", "--config", file_arg, "--threshold", "0.7"],
        &env,
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for line in [
        "  threshold: 0.7  # --threshold\n".to_owned(),
        "  time_window: 24.0  # ENTWINE_ODTE__TIME_WINDOW\n".to_owned(),
        format!("  desired_timeliness: 2.0  # {file_arg}\n"),
        "  expected_update_rate: 0.2  # default\n".to_owned(),
        format!("  max_connections: 3  # {file_arg}\n"),
        format!("  url: postgres://entwine:***@db.internal/twins  # {file_arg}\n"),
        "  password: '***'  # ENTWINE_POSTGRES__PASSWORD\n".to_owned(),
    ] {
        assert!(stdout.contains(&line), "{line:?} not in\n{stdout}");
    }
    assert!(
        !stdout.contains("file-secret") && !stdout.contains("env-secret"),
        "{stdout}"
    );

    // The same through ENTWINE_CONFIG, as TOML, without the flag: the environment's value.
    let mut with_file = env.to_vec();
    with_file.push(("ENTWINE_CONFIG", file_arg));
    let out = entwine(&["config", "--format", "toml"], &with_file).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("threshold = 0.6  # ENTWINE_ODTE__THRESHOLD\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("secret\""), "{stdout}");
    // And without the environment, the file's.
    let out = entwine(&["config"], &[("ENTWINE_CONFIG", file_arg)]).await;
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains(&format!("  threshold: 0.5  # {file_arg}\n")),
        "{stdout}"
    );
    // With nothing at all, the defaults and the local SQLite store.
    let out = entwine(&["config"], &[]).await;
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("  url: sqlite://entwine.db  # default\n")
            && stdout.contains("  threshold: 0.9  # default\n"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_bad_value_exits_2_naming_its_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[odte]\ntime_window = \"half a minute\"\n").unwrap();
    let file_arg = file.to_str().unwrap();
    for (args, env, says) in [
        (
            vec!["config", "--config", file_arg],
            vec![],
            format!("error: odte.time_window from {file_arg}: \"half a minute\" is not a number"),
        ),
        (
            vec!["config"],
            vec![("ENTWINE_DATABASE__MAX_CONNECTIONS", "0")],
            "error: database.max_connections from ENTWINE_DATABASE__MAX_CONNECTIONS: 0 is outside 1..=10000"
                .to_owned(),
        ),
        (
            vec!["config", "--time-window=-5"],
            vec![],
            "error: odte.time_window from --time-window: time_window must be a finite number of seconds above 0, got -5"
                .to_owned(),
        ),
        (
            vec!["config"],
            vec![("ENTWINE_AUTH__TOKENS", "short")],
            "error: auth.tokens from ENTWINE_AUTH__TOKENS: token 1 is 5 characters long; each token needs at least 16"
                .to_owned(),
        ),
        (
            vec!["config"],
            vec![("ENTWINE_MQTT__PASSWORD", "secret")],
            "error: mqtt.username is not set: mqtt.password is set (from ENTWINE_MQTT__PASSWORD) but no user name"
                .to_owned(),
        ),
        (
            vec!["config"],
            vec![("ENTWINE_MQTT__CERT_FILE", "/client.pem")],
            "error: mqtt.cert_file from ENTWINE_MQTT__CERT_FILE: mutual TLS needs both mqtt.cert_file and mqtt.key_file"
                .to_owned(),
        ),
        (
            vec!["migrate"],
            vec![("ENTWINE_POSTGRES__PORT", "fifty")],
            "error: postgres.port from ENTWINE_POSTGRES__PORT: \"fifty\" is not a port number (1-65535)"
                .to_owned(),
        ),
    ] {
        let out = entwine(&args, &env).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.starts_with(&says), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn migrate_takes_postgres_from_the_entwine_postgres_variables() {
    let db = TestDatabase::create().await;
    let url = reqwest::Url::parse(&db.url()).unwrap();
    let port = url.port().unwrap_or(5432).to_string();
    let mut env = vec![
        ("ENTWINE_POSTGRES__HOST", url.host_str().unwrap().to_owned()),
        ("ENTWINE_POSTGRES__PORT", port),
        ("ENTWINE_POSTGRES__DATABASE", db.name.clone()),
        ("ENTWINE_POSTGRES__USER", url.username().to_owned()),
    ];
    if let Some(password) = url.password() {
        env.push(("ENTWINE_POSTGRES__PASSWORD", password.to_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = entwine(&["migrate"], &env).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "postgres store migrated");
}

#[tokio::test]
async fn the_pool_size_flag_reaches_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let args = DatabaseArgs {
        database_max_connections: Some(3),
        ..DatabaseArgs::with_url(format!("sqlite://{}", dir.path().join("p.db").display()))
    };
    let store = open_migrated(&args).await.unwrap();
    match &store {
        entwine_store::Store::Sqlite(pool) => {
            assert_eq!(pool.options().get_max_connections(), 3)
        }
        other => panic!("expected SQLite, got {}", other.backend()),
    }
    store.close().await;
}
