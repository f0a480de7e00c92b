//! The layers on real files: defaults < configuration file < ConfigMap mounts < Secret mounts
//! < environment < flags, each value's source, errors that name it, redaction, the pool.

use std::path::Path;

use entwine_config::{
    load, DatabaseTarget, Environment, Flags, RenderFormat, SettingsError, Sources,
};
use secrecy::ExposeSecret;

/// Writes a mounted ConfigMap or Secret: one file per key, as Fission's fetcher does.
fn mount(root: &Path, name: &str, pairs: &[(&str, &str)]) {
    let dir = root.join("default").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (key, value) in pairs {
        std::fs::write(dir.join(key), value).unwrap();
    }
}

/// The mount roots under `root`, and `extra`.
fn env(root: &Path, extra: &[(&str, &str)]) -> Environment {
    let mut vars = vec![
        (
            "ENTWINE_CONFIG_ROOT".to_owned(),
            root.join("configs").display().to_string(),
        ),
        (
            "ENTWINE_SECRET_ROOT".to_owned(),
            root.join("secrets").display().to_string(),
        ),
        (
            "ENTWINE_PODINFO_DIR".to_owned(),
            root.join("podinfo").display().to_string(),
        ),
    ];
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Environment::from_vars(vars)
}

const FILE: &str = "\
odte:
  expected_update_rate: 0.5
  time_window: 10
  desired_timeliness: 2
  threshold: 0.1
database:
  max_connections: 3
  acquire_timeout: 1.5
postgres:
  host: from-file
  database: twins
  user: file-user
";

#[test]
fn each_layer_overrides_the_one_below_it_key_by_key() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("entwine.yaml");
    std::fs::write(&file, FILE).unwrap();
    let configs = root.path().join("configs");
    let secrets = root.path().join("secrets");
    mount(
        &configs,
        "odte",
        &[
            ("time_window", "20\n"),
            ("desired_timeliness", "3"),
            ("threshold", "0.2"),
        ],
    );
    mount(&configs, "postgres", &[("host", "from-configmap\n")]);
    mount(
        &secrets,
        "odte",
        &[("time_window", "40"), ("threshold", "0.3")],
    );
    mount(&secrets, "postgres", &[("password", " pass word \n")]);
    let env = env(
        root.path(),
        &[
            ("ENTWINE_CONFIG", file.to_str().unwrap()),
            ("ENTWINE_ODTE__THRESHOLD", "0.4"),
            ("ENTWINE_DATABASE__MAX_CONNECTIONS", "5"),
        ],
    );

    let mut flags = Flags::default();
    flags.set("odte.threshold", "--threshold", Some(0.7));
    let mut sources = Sources::new(&env);
    sources.flags = flags;
    let loaded = load(&sources).unwrap();
    let odte = loaded.odte().unwrap();
    assert_eq!(odte.threshold(), 0.7, "the flag wins");
    assert_eq!(odte.time_window_s(), 40.0, "the Secret beats the ConfigMap");
    assert_eq!(
        odte.desired_timeliness_s(),
        3.0,
        "the ConfigMap beats the file"
    );
    assert_eq!(
        odte.expected_update_rate(),
        0.5,
        "the file beats the default"
    );
    assert_eq!(loaded.store_options().unwrap().max_connections, 5);
    assert_eq!(
        loaded.store_options().unwrap().acquire_timeout,
        std::time::Duration::from_millis(1500)
    );
    assert_eq!(
        loaded.config.postgres.password.as_ref().unwrap().0,
        " pass word ",
        "a password keeps its spaces, loses its line ending"
    );
    assert_eq!(
        loaded.config.postgres.host.as_deref(),
        Some("from-configmap")
    );
    let mounted = |dir: &Path, key: &str| dir.join("default").join(key).display().to_string();
    assert_eq!(loaded.origin("odte.threshold"), "--threshold");
    assert_eq!(
        loaded.origin("odte.time_window"),
        mounted(&secrets, "odte/time_window")
    );
    assert_eq!(
        loaded.origin("odte.desired_timeliness"),
        mounted(&configs, "odte/desired_timeliness")
    );
    assert_eq!(
        loaded.origin("odte.expected_update_rate"),
        file.display().to_string()
    );
    assert_eq!(
        loaded.origin("database.max_connections"),
        "ENTWINE_DATABASE__MAX_CONNECTIONS"
    );
    assert_eq!(loaded.origin("http.body_timeout"), "default");

    // Without the flag the environment's value is in force, then the Secret's, and so on.
    let loaded = load(&Sources::new(&env)).unwrap();
    assert_eq!(loaded.odte().unwrap().threshold(), 0.4);
    assert_eq!(loaded.origin("odte.threshold"), "ENTWINE_ODTE__THRESHOLD");
    std::fs::remove_file(secrets.join("default/odte/threshold")).unwrap();
    let no_env = self::env(root.path(), &[("ENTWINE_CONFIG", file.to_str().unwrap())]);
    let loaded = load(&Sources::new(&no_env)).unwrap();
    assert_eq!(loaded.odte().unwrap().threshold(), 0.2, "the ConfigMap's");
    std::fs::remove_file(configs.join("default/odte/threshold")).unwrap();
    let loaded = load(&Sources::new(&no_env)).unwrap();
    assert_eq!(loaded.odte().unwrap().threshold(), 0.1, "the file's");
    let bare = self::env(root.path(), &[]);
    std::fs::remove_dir_all(&configs).unwrap();
    std::fs::remove_dir_all(&secrets).unwrap();
    let loaded = load(&Sources::new(&bare)).unwrap();
    assert_eq!(
        loaded.odte().unwrap(),
        entwine_core::odte::OdteConfig::seed_default()
    );
    assert_eq!(loaded.store_options().unwrap().max_connections, 8);
}

#[test]
fn a_flag_file_beats_entwine_config_and_toml_works_too() {
    let root = tempfile::tempdir().unwrap();
    let yaml = root.path().join("a.yaml");
    std::fs::write(&yaml, "odte:\n  threshold: 0.6\n").unwrap();
    let toml = root.path().join("b.toml");
    std::fs::write(
        &toml,
        "[odte]\nthreshold = 0.65\ntime_window = \"45\"\n[http]\nmax_connections = 99\n",
    )
    .unwrap();
    let env = env(root.path(), &[("ENTWINE_CONFIG", yaml.to_str().unwrap())]);
    let mut sources = Sources::new(&env);
    sources.file = Some(toml.clone());
    let loaded = load(&sources).unwrap();
    assert_eq!(loaded.odte().unwrap().threshold(), 0.65);
    assert_eq!(
        loaded.odte().unwrap().time_window_s(),
        45.0,
        "a quoted number"
    );
    assert_eq!(loaded.http_limits().unwrap().max_connections, 99);
    assert_eq!(loaded.origin("odte.threshold"), toml.display().to_string());
}

#[test]
fn errors_name_the_key_and_the_source_of_the_bad_value() {
    let root = tempfile::tempdir().unwrap();
    let text = |sources: &Sources<'_>| match load(sources).and_then(|l| {
        l.odte()?;
        l.store_options()?;
        l.http_limits()?;
        l.database(None).map(drop)
    }) {
        Ok(()) => panic!("loaded"),
        Err(e) => e.to_string(),
    };

    let file = root.path().join("bad.yaml");
    std::fs::write(&file, "odte:\n  threshold: high\n").unwrap();
    let env_file = env(root.path(), &[("ENTWINE_CONFIG", file.to_str().unwrap())]);
    assert_eq!(
        text(&Sources::new(&env_file)),
        format!(
            "odte.threshold from {}: \"high\" is not a number",
            file.display()
        )
    );
    std::fs::write(&file, "odte:\n  treshold: 0.5\n").unwrap();
    let message = text(&Sources::new(&env_file));
    assert!(
        message.starts_with(&format!(
            "odte.treshold from {}: unknown key",
            file.display()
        )),
        "{message}"
    );
    std::fs::write(&file, "odte: [\n").unwrap();
    let message = text(&Sources::new(&env_file));
    assert!(
        message.starts_with(&format!("configuration file {}: ", file.display())),
        "{message}"
    );
    let missing = env(
        root.path(),
        &[("ENTWINE_CONFIG", "/nonexistent/entwine.toml")],
    );
    assert_eq!(
        text(&Sources::new(&missing)),
        "cannot read /nonexistent/entwine.toml"
    );

    let bad_env = env(
        root.path(),
        &[("ENTWINE_DATABASE__MAX_CONNECTIONS", "many")],
    );
    assert_eq!(
        text(&Sources::new(&bad_env)),
        "database.max_connections from ENTWINE_DATABASE__MAX_CONNECTIONS: \"many\" is not a number"
    );
    let zero = env(root.path(), &[("ENTWINE_DATABASE__MAX_CONNECTIONS", "0")]);
    assert_eq!(
        text(&Sources::new(&zero)),
        "database.max_connections from ENTWINE_DATABASE__MAX_CONNECTIONS: 0 is outside 1..=10000"
    );
    let port = env(root.path(), &[("ENTWINE_POSTGRES__PORT", "70000")]);
    assert_eq!(
        text(&Sources::new(&port)),
        "postgres.port from ENTWINE_POSTGRES__PORT: 70000 is not a port number (1-65535)"
    );
    let old_http = env(root.path(), &[("ENTWINE_HTTP_BODY_TIMEOUT", "0")]);
    assert_eq!(
        text(&Sources::new(&old_http)),
        "http.body_timeout from ENTWINE_HTTP_BODY_TIMEOUT: 0 is outside 0.001..=86400 seconds"
    );

    let quiet = env(root.path(), &[]);
    let mut sources = Sources::new(&quiet);
    sources
        .flags
        .set("odte.threshold", "--threshold", Some(1.5));
    assert_eq!(
        text(&sources),
        "odte.threshold from --threshold: threshold must be a number in [0, 1], got 1.5"
    );
    match load(&Sources::new(&quiet)).unwrap().database(None) {
        Err(SettingsError::Missing { key, hint }) => {
            assert_eq!(key, "postgres.host");
            assert!(
                hint.contains("ENTWINE_POSTGRES__HOST") && hint.contains("DATABASE_URL"),
                "{hint}"
            );
        }
        other => panic!("expected postgres.host missing, got {other:?}"),
    }
}

#[test]
fn database_url_replaces_the_postgres_keys_which_otherwise_make_a_url() {
    let root = tempfile::tempdir().unwrap();
    let parts = env(
        root.path(),
        &[
            ("ENTWINE_POSTGRES__HOST", "db.internal"),
            ("ENTWINE_POSTGRES__PORT", "6543"),
            ("ENTWINE_POSTGRES__DATABASE", "twins"),
            ("ENTWINE_POSTGRES__USER", "entwine"),
            ("ENTWINE_POSTGRES__PASSWORD", "p@ss:w/rd"),
            ("ENTWINE_POSTGRES__SSLMODE", "require"),
        ],
    );
    let loaded = load(&Sources::new(&parts)).unwrap();
    match loaded.database(Some("sqlite://fallback.db")).unwrap() {
        DatabaseTarget::Postgres(o) => {
            assert_eq!(o.get_host(), "db.internal");
            assert_eq!(o.get_port(), 6543);
            assert_eq!(o.get_database(), Some("twins"));
            assert_eq!(o.get_username(), "entwine");
        }
        other => panic!("expected the parts, got {other:?}"),
    }
    let url = loaded.database_url(None).unwrap();
    assert_eq!(
        url.expose_secret(),
        "postgres://entwine:p%40ss%3Aw%2Frd@db.internal:6543/twins?sslmode=require"
    );
    // The URL says the same as the parts.
    let from_url: entwine_store::PgConnectOptions = url.expose_secret().parse().unwrap();
    assert_eq!(from_url.get_host(), "db.internal");
    assert_eq!(from_url.get_username(), "entwine");

    let mut vars = vec![("DATABASE_URL", "postgres://u:secret@elsewhere/db")];
    vars.push(("ENTWINE_DATABASE__URL", "sqlite://ignored.db"));
    vars.push(("ENTWINE_POSTGRES__HOST", "db.internal"));
    let both = env(root.path(), &vars);
    let loaded = load(&Sources::new(&both)).unwrap();
    assert_eq!(loaded.origin("database.url"), "DATABASE_URL");
    assert_eq!(
        loaded.database(None).unwrap().redacted(),
        "postgres://u:***@elsewhere/db"
    );
    let none = env(root.path(), &[]);
    let loaded = load(&Sources::new(&none)).unwrap();
    assert_eq!(
        loaded
            .database(Some("sqlite://fallback.db"))
            .unwrap()
            .redacted(),
        "sqlite://fallback.db"
    );
}

#[test]
fn the_rendered_configuration_hides_passwords_and_names_sources() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("secrets"),
        "postgres",
        &[("password", "hunter2-secret")],
    );
    let env = env(
        root.path(),
        &[
            ("ENTWINE_POSTGRES__HOST", "db"),
            ("ENTWINE_ODTE__THRESHOLD", "0.75"),
            ("DATABASE_URL", "postgres://u:url-secret@db/twins"),
        ],
    );
    let loaded = load(&Sources::new(&env)).unwrap();
    let yaml = loaded.render(RenderFormat::Yaml, None);
    let toml = loaded.render(RenderFormat::Toml, None);
    for text in [&yaml, &toml] {
        assert!(
            !text.contains("hunter2-secret") && !text.contains("url-secret"),
            "{text}"
        );
    }
    assert!(
        yaml.contains("  url: postgres://u:***@db/twins  # DATABASE_URL\n"),
        "{yaml}"
    );
    assert!(yaml.contains("  password: '***'  # "), "{yaml}");
    assert!(
        yaml.contains("  threshold: 0.75  # ENTWINE_ODTE__THRESHOLD\n"),
        "{yaml}"
    );
    assert!(yaml.contains("  max_connections: 8  # default\n"), "{yaml}");
    assert!(toml.contains("[odte]\n"), "{toml}");
    assert!(
        toml.contains("threshold = 0.75  # ENTWINE_ODTE__THRESHOLD\n"),
        "{toml}"
    );
    // What is printed reads back (comments and all) as a configuration file.
    let file = root.path().join("printed.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let again = Environment::from_vars([("ENTWINE_CONFIG", file.to_str().unwrap())]);
    let mut sources = Sources::new(&again);
    sources.mounts = false;
    let reread = load(&sources).unwrap();
    assert_eq!(reread.odte().unwrap().threshold(), 0.75);
    let file = root.path().join("printed.toml");
    std::fs::write(&file, &toml).unwrap();
    let again = Environment::from_vars([("ENTWINE_CONFIG", file.to_str().unwrap())]);
    let mut sources = Sources::new(&again);
    sources.mounts = false;
    assert_eq!(load(&sources).unwrap().odte().unwrap().threshold(), 0.75);
}

#[tokio::test]
async fn the_pool_size_reaches_the_pool() {
    let root = tempfile::tempdir().unwrap();
    let db = root.path().join("pool.db");
    let env = env(
        root.path(),
        &[
            ("DATABASE_URL", &format!("sqlite://{}", db.display())),
            ("ENTWINE_DATABASE__MAX_CONNECTIONS", "3"),
        ],
    );
    let loaded = load(&Sources::new(&env)).unwrap();
    let store = loaded
        .database(None)
        .unwrap()
        .open(&loaded.store_options().unwrap())
        .unwrap();
    match &store {
        entwine_store::Store::Sqlite(pool) => {
            assert_eq!(pool.options().get_max_connections(), 3)
        }
        other => panic!("expected SQLite, got {}", other.backend()),
    }
    store.close().await;
}

fn model(id: &str, pattern: &str, window: &str) -> String {
    format!(
        r#"{{"@type": "tm:ThingModel", "title": "{id}", "version": {{"model": "1.0.0"}},
            "entwine:id": "{id}", "entwine:devices": ["{pattern}"],
            "entwine:odte": {{"expected_update_rate": 1, "time_window": {window}}},
            "properties": {{"level": {{"type": "number"}}}}}}"#
    )
}

#[test]
fn device_models_come_from_models_dir_or_the_mounted_configmap_and_errors_name_file_and_field() {
    let root = tempfile::tempdir().unwrap();
    // No models anywhere: the seed's device alone.
    let loaded = load(&Sources::new(&env(root.path(), &[]))).unwrap();
    assert!(loaded.models().unwrap().models().is_empty());

    // The ConfigMap as a Kubernetes volume holds it: `..data/` and a link per key.
    let configmap = root.path().join("configs/default/device-models");
    let data = configmap.join("..2026_12_03_10_00_00.1");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tank.json"), model("tank", "tank-*", "60")).unwrap();
    std::os::unix::fs::symlink("..2026_12_03_10_00_00.1", configmap.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tank.json", configmap.join("tank.json")).unwrap();
    let loaded = load(&Sources::new(&env(root.path(), &[]))).unwrap();
    let models = loaded.models().unwrap();
    let ids: Vec<&str> = models.models().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["tank"]);
    assert_eq!(models.models()[0].profile.window_ms(), 60_000);

    // models.dir wins over the mount; every *.json file is a model, others are ignored.
    let dir = root.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("pump.json"), model("pump", "pump-*", "10")).unwrap();
    std::fs::write(dir.join("README.md"), "not a model").unwrap();
    let dir_text = dir.display().to_string();
    let with_dir = env(root.path(), &[("ENTWINE_MODELS__DIR", dir_text.as_str())]);
    let models = load(&Sources::new(&with_dir)).unwrap().models().unwrap();
    let ids: Vec<&str> = models.models().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["pump"]);

    // A bad file: the setting, its source, the file and the field.
    std::fs::write(dir.join("valve.json"), model("valve", "valve-*", "\"ten\"")).unwrap();
    let err = load(&Sources::new(&with_dir))
        .unwrap()
        .models()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("models.dir from ENTWINE_MODELS__DIR: model ")
            && text.contains(
                "valve.json: /entwine:odte/time_window: \"ten\" is not of type \"number\""
            ),
        "{text}"
    );
    // Two models binding one pattern.
    std::fs::write(dir.join("valve.json"), model("valve", "pump-*", "10")).unwrap();
    let err = load(&Sources::new(&with_dir))
        .unwrap()
        .models()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("pattern \"pump-*\" also binds devices to model"),
        "{err}"
    );
    // A directory that is not there.
    let missing = env(
        root.path(),
        &[("ENTWINE_MODELS__DIR", "/nonexistent/models")],
    );
    let err = load(&Sources::new(&missing)).unwrap().models().unwrap_err();
    assert!(
        err.to_string().starts_with(
            "models.dir from ENTWINE_MODELS__DIR: cannot read directory /nonexistent/models"
        ),
        "{err}"
    );
}
