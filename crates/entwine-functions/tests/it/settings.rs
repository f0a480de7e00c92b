//! Settings from Fission's mounts, the Secret and the environment.

use std::path::Path;

use entwine_functions::fission::{load, DatabaseSettings, Environment, SettingsError};
use entwine_functions::handlers::Function;

/// Writes a mounted ConfigMap or Secret: one file per key, as Fission's fetcher does.
pub(crate) fn mount(root: &Path, namespace: &str, name: &str, pairs: &[(&str, &str)]) {
    let dir = root.join(namespace).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (key, value) in pairs {
        std::fs::write(dir.join(key), value).unwrap();
    }
}

pub(crate) const SEED_POSTGRES: [(&str, &str); 5] = [
    ("database", "twins"),
    ("user", "entwine"),
    ("password", "from-configmap"),
    ("host", "postgres"),
    ("port", "5432"),
];

pub(crate) const SEED_ODTE: [(&str, &str); 4] = [
    ("expected_update_rate", "0.2"),
    ("time_window", "30"),
    ("desired_timeliness", "1"),
    ("threshold", "0.9"),
];

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

fn postgres(
    settings: &entwine_functions::fission::FunctionSettings,
) -> &entwine_store::PgConnectOptions {
    match settings.database.as_ref().expect("a database") {
        DatabaseSettings::Postgres(options) => options,
        DatabaseSettings::Url(_) => panic!("expected options from the mounts"),
    }
}

#[test]
fn the_seed_configmaps_as_they_are_configure_the_twin_handler() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("configs"),
        "fission-function",
        "postgres",
        &SEED_POSTGRES,
    );
    mount(
        &root.path().join("configs"),
        "fission-function",
        "odte",
        &[
            ("expected_update_rate", "0.5\n"),
            ("time_window", "60"),
            ("desired_timeliness", "2"),
            ("threshold", "0.8"),
        ],
    );
    let settings = load(
        Function::Twin,
        &env(root.path(), &[("FISSION_RUNTIME_PORT", "8891")]),
    )
    .unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:8891");
    assert_eq!(settings.odte.expected_update_rate(), 0.5);
    assert_eq!(settings.odte.time_window_s(), 60.0);
    assert_eq!(settings.odte.desired_timeliness_s(), 2.0);
    assert_eq!(settings.odte.threshold(), 0.8);
    let pg = postgres(&settings);
    assert_eq!(pg.get_host(), "postgres");
    assert_eq!(pg.get_port(), 5432);
    assert_eq!(pg.get_database(), Some("twins"));
    assert_eq!(pg.get_username(), "entwine");
    // The password never shows in debug output.
    assert!(!format!("{settings:?}").contains("from-configmap"));
}

#[test]
fn the_secret_overrides_the_configmap_and_the_environment_overrides_both() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("configs"),
        "twins",
        "postgres",
        &SEED_POSTGRES,
    );
    mount(&root.path().join("configs"), "twins", "odte", &SEED_ODTE);
    mount(
        &root.path().join("secrets"),
        "twins",
        "postgres",
        &[("user", "secret-user"), ("password", "s3cret")],
    );
    std::fs::create_dir_all(root.path().join("podinfo")).unwrap();
    std::fs::write(root.path().join("podinfo/namespace"), "twins").unwrap();
    let settings = load(
        Function::PhysicalEvent,
        &env(
            root.path(),
            &[
                ("ENTWINE_POSTGRES__HOST", "db.internal"),
                ("ENTWINE_ODTE__THRESHOLD", "0.75"),
                ("PORT", "9000"),
            ],
        ),
    )
    .unwrap();
    let pg = postgres(&settings);
    assert_eq!(pg.get_username(), "secret-user");
    assert_eq!(pg.get_host(), "db.internal");
    assert_eq!(settings.odte.threshold(), 0.75);
    assert_eq!(
        settings.listen.port(),
        9000,
        "PORT is used when FISSION_RUNTIME_PORT is not set"
    );
}

#[test]
fn database_url_replaces_the_postgres_keys_and_odte_defaults_to_the_seeds() {
    let root = tempfile::tempdir().unwrap();
    let settings = load(
        Function::Shadow,
        &env(root.path(), &[("DATABASE_URL", "sqlite:///tmp/x.db")]),
    )
    .unwrap();
    assert!(matches!(settings.database, Some(DatabaseSettings::Url(_))));
    assert_eq!(
        settings.odte,
        entwine_core::odte::OdteConfig::seed_default()
    );
    assert_eq!(
        settings.listen.port(),
        entwine_functions::fission::DEFAULT_PORT
    );
}

#[test]
fn the_digital_event_handler_needs_the_database_to_check_what_it_announces() {
    let root = tempfile::tempdir().unwrap();
    match load(Function::DigitalEvent, &env(root.path(), &[])) {
        Err(e) => assert!(
            e.to_string().contains("postgres.host"),
            "the error names the missing key: {e}"
        ),
        Ok(settings) => panic!("loaded without a database: {settings:?}"),
    }
    let settings = load(
        Function::DigitalEvent,
        &env(root.path(), &[("DATABASE_URL", "postgres://u@db/twins")]),
    )
    .unwrap();
    assert!(matches!(settings.database, Some(DatabaseSettings::Url(_))));
    assert!(
        settings.digital.is_none(),
        "no broker_url: no digital events"
    );
}

#[test]
fn the_digital_configmap_and_the_new_odte_keys_are_read_and_checked() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("configs"),
        "default",
        "digital",
        &[
            ("broker_url", "physical-broker:1883\n"),
            ("state_topic", "twins/{device_id}/state"),
        ],
    );
    mount(
        &root.path().join("configs"),
        "default",
        "odte",
        &[("availability_max_gap", "2"), ("silence_threshold", "90")],
    );
    let on_pod = |pod: &str| {
        load(
            Function::DigitalEvent,
            &env(
                root.path(),
                &[("HOSTNAME", pod), ("DATABASE_URL", "postgres://u@db/twins")],
            ),
        )
        .unwrap()
    };
    let settings = on_pod("digital-event-handler-7d9f-abcde");
    let digital = settings.digital.expect("broker_url is set");
    assert_eq!(digital.broker_url, "physical-broker:1883");
    assert_eq!(digital.state_topic, "twins/{device_id}/state");
    assert_eq!(digital.lifecycle_topic, "digitaltwin/{device_id}/lifecycle");
    // Replicas must not share an MQTT client id (the broker would drop one of them).
    assert_eq!(
        digital.client_id,
        "entwine-digital-event-handler-digital-event-handler-7d9f-abcde"
    );
    assert_ne!(
        on_pod("pod-a").digital.unwrap().client_id,
        on_pod("pod-b").digital.unwrap().client_id
    );
    assert_eq!(settings.odte.availability_max_gap_ms(), Some(2_000));
    assert_eq!(settings.odte.silence_ms(), 90_000);

    let wildcard = env(
        root.path(),
        &[
            ("ENTWINE_DIGITAL__LIFECYCLE_TOPIC", "twins/+/{device_id}"),
            ("DATABASE_URL", "postgres://u@db/twins"),
        ],
    );
    let err = load(Function::DigitalEvent, &wildcard)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lifecycle_topic") && err.contains("wildcards"),
        "{err}"
    );
    let bad_gap = env(root.path(), &[("ENTWINE_ODTE__AVAILABILITY_MAX_GAP", "-1")]);
    let err = load(Function::Twin, &bad_gap).unwrap_err().to_string();
    assert!(err.contains("availability_max_gap"), "{err}");
}

#[test]
fn missing_and_invalid_values_are_named_with_where_they_came_from() {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    match load(Function::PhysicalEvent, &env(root.path(), &[])) {
        Err(SettingsError::Missing { key, hint }) => {
            assert_eq!(key, "postgres.host");
            assert!(hint.contains("DATABASE_URL"), "{hint}");
        }
        other => panic!("expected a missing key, got {other:?}"),
    }
    mount(&configs, "default", "postgres", &SEED_POSTGRES);
    mount(&configs, "default", "odte", &[("time_window", "0")]);
    let err = load(Function::Twin, &env(root.path(), &[])).unwrap_err();
    assert!(
        err.to_string()
            .contains("time_window must be a finite number of seconds above 0"),
        "{err}"
    );
    mount(&configs, "default", "odte", &[("time_window", "thirty")]);
    let err = load(Function::Twin, &env(root.path(), &[])).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("odte.time_window from ")
            && text.contains("default/odte/time_window")
            && text.contains("\"thirty\" is not a number"),
        "{text}"
    );
    mount(&configs, "default", "odte", &[("time_window", "30")]);
    mount(&configs, "default", "postgres", &[("port", "fifty")]);
    let err = load(Function::Twin, &env(root.path(), &[])).unwrap_err();
    assert!(err.to_string().starts_with("postgres.port from "), "{err}");
    let err = load(
        Function::DigitalEvent,
        &env(root.path(), &[("FISSION_RUNTIME_PORT", "99999")]),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("port from FISSION_RUNTIME_PORT"),
        "{err}"
    );
}

/// The Fission chart's `functionNamespace`: the Function and its ConfigMaps and Secret live in
/// `default`, its pods run in `fission-function`, and the fetcher writes
/// `/configs/default/…` and `/secrets/default/…`.
#[test]
fn with_the_charts_function_namespace_the_mounts_the_fetcher_wrote_are_read() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("configs"),
        "default",
        "postgres",
        &SEED_POSTGRES,
    );
    mount(
        &root.path().join("configs"),
        "default",
        "odte",
        &[("threshold", "0.7")],
    );
    mount(
        &root.path().join("secrets"),
        "default",
        "postgres",
        &[("password", "from-secret")],
    );
    std::fs::create_dir_all(root.path().join("podinfo")).unwrap();
    std::fs::write(root.path().join("podinfo/namespace"), "fission-function\n").unwrap();
    let settings = load(Function::Twin, &env(root.path(), &[])).unwrap();
    assert_eq!(settings.odte.threshold(), 0.7);
    let pg = postgres(&settings);
    assert_eq!(pg.get_host(), "postgres");
    assert_eq!(pg.get_database(), Some("twins"));
    assert_eq!(pg.get_username(), "entwine");

    // ENTWINE_NAMESPACE still comes first: a namespace with no mounts has no postgres.host.
    match load(
        Function::Twin,
        &env(root.path(), &[("ENTWINE_NAMESPACE", "fission-function")]),
    ) {
        Err(SettingsError::Missing { key, .. }) => assert_eq!(key, "postgres.host"),
        other => panic!("expected postgres.host missing, got {other:?}"),
    }
}

#[test]
fn mounts_of_several_namespaces_are_told_apart_by_the_pods_namespace_or_refused() {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    mount(&configs, "default", "odte", &[("threshold", "0.7")]);
    mount(&configs, "twins", "odte", &[("threshold", "0.6")]);
    mount(&configs, "twins", "postgres", &SEED_POSTGRES);
    mount(&configs, "default", "postgres", &SEED_POSTGRES);
    std::fs::create_dir_all(root.path().join("podinfo")).unwrap();
    std::fs::write(root.path().join("podinfo/namespace"), "twins").unwrap();
    let settings = load(Function::Twin, &env(root.path(), &[])).unwrap();
    assert_eq!(
        settings.odte.threshold(),
        0.6,
        "the pod's namespace breaks the tie"
    );

    std::fs::write(root.path().join("podinfo/namespace"), "fission-function").unwrap();
    let err = load(Function::Twin, &env(root.path(), &[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("several namespaces (default, twins)") && err.contains("ENTWINE_NAMESPACE"),
        "{err}"
    );
    let settings = load(
        Function::Twin,
        &env(root.path(), &[("ENTWINE_NAMESPACE", "default")]),
    )
    .unwrap();
    assert_eq!(settings.odte.threshold(), 0.7);
}

/// The typed configuration's layers for a function: a file (`ENTWINE_CONFIG`) < the ConfigMap
/// < the Secret < the environment, key by key, with the pool size and the HTTP limits.
#[test]
fn a_file_then_the_configmap_then_the_secret_then_the_environment_each_win_key_by_key() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("entwine.toml");
    std::fs::write(
        &file,
        "[odte]\nexpected_update_rate = 0.4\ntime_window = 10\ndesired_timeliness = 4\nthreshold = 0.1\n\
         [database]\nmax_connections = 2\n[http]\nbody_timeout = 3\n[postgres]\nhost = \"from-file\"\n",
    )
    .unwrap();
    let configs = root.path().join("configs");
    let secrets = root.path().join("secrets");
    mount(&configs, "default", "postgres", &SEED_POSTGRES);
    mount(
        &configs,
        "default",
        "odte",
        &[
            ("time_window", "20"),
            ("desired_timeliness", "3"),
            ("threshold", "0.2"),
        ],
    );
    mount(
        &configs,
        "default",
        "database",
        &[("max_connections", "12\n")],
    );
    mount(
        &secrets,
        "default",
        "odte",
        &[("time_window", "40"), ("threshold", "0.3")],
    );
    let settings = load(
        Function::Twin,
        &env(
            root.path(),
            &[
                ("ENTWINE_CONFIG", file.to_str().unwrap()),
                ("ENTWINE_ODTE__THRESHOLD", "0.45"),
                ("ENTWINE_HTTP__MAX_CONNECTIONS", "77"),
            ],
        ),
    )
    .unwrap();
    assert_eq!(settings.odte.expected_update_rate(), 0.4, "the file's");
    assert_eq!(settings.odte.desired_timeliness_s(), 3.0, "the ConfigMap's");
    assert_eq!(settings.odte.time_window_s(), 40.0, "the Secret's");
    assert_eq!(settings.odte.threshold(), 0.45, "the environment's");
    assert_eq!(settings.store.max_connections, 12, "the ConfigMap's");
    assert_eq!(
        settings.http.body_timeout,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(settings.http.max_connections, 77);
    assert_eq!(
        postgres(&settings).get_host(),
        "postgres",
        "the ConfigMap's"
    );

    // A bad value in the file is named with the file (once no layer above sets the key).
    std::fs::remove_dir_all(configs.join("default/database")).unwrap();
    std::fs::write(&file, "[database]\nmax_connections = \"lots\"\n").unwrap();
    let err = load(
        Function::Twin,
        &env(root.path(), &[("ENTWINE_CONFIG", file.to_str().unwrap())]),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "database.max_connections from {}: \"lots\" is not a number",
            file.display()
        )
    );
}

/// A function binary refuses a bad mounted value with exit code 2, naming the key and the file.
#[test]
fn a_binary_with_a_bad_mounted_value_exits_2_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    mount(&configs, "default", "postgres", &SEED_POSTGRES);
    mount(&configs, "default", "database", &[("max_connections", "0")]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_twin-handler"))
        .env_clear()
        .env("ENTWINE_CONFIG_ROOT", &configs)
        .env("ENTWINE_SECRET_ROOT", root.path().join("secrets"))
        .env("ENTWINE_PODINFO_DIR", root.path().join("podinfo"))
        .env("FISSION_RUNTIME_PORT", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    let path = configs.join("default/database/max_connections");
    assert!(
        format!("{stdout}{stderr}").contains(&format!(
            "database.max_connections from {}: 0 is outside 1..=10000",
            path.display()
        )),
        "{stdout}{stderr}"
    );
}

/// In a pod the router reaches a function from the network through the runtime's supervisor,
/// although the function listens on loopback: without the `auth` Secret it refuses to start,
/// unless function authentication is turned off on purpose. The evaluator's route needs no
/// token, but its `/metrics`, as every function's, does.
#[test]
fn in_a_kubernetes_pod_a_function_without_the_auth_secret_refuses_to_start() {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    mount(&configs, "default", "postgres", &SEED_POSTGRES);
    mount(&configs, "default", "odte", &SEED_ODTE);
    let pod = [("KUBERNETES_SERVICE_HOST", "10.96.0.1")];
    match load(Function::PhysicalEvent, &env(root.path(), &pod)) {
        Err(SettingsError::Missing { key, hint }) => {
            assert_eq!(key, "auth.tokens");
            assert_eq!(
                hint,
                "physical-event-handler runs in a Kubernetes pod, where Fission's router reaches \
                 it from the network: mount the auth Secret (secrets: [{name: auth}] in the \
                 function's spec; scripts/install-fission makes it), or set auth.functions=false \
                 and auth.metrics=false to leave it open on purpose"
            );
        }
        other => panic!("expected a missing token, got {other:?}"),
    }
    match load(Function::TwinEvaluator, &env(root.path(), &pod)) {
        Err(SettingsError::Missing { hint, .. }) => assert!(
            hint.ends_with("or set auth.metrics=false to leave it open on purpose"),
            "{hint}"
        ),
        other => panic!("expected a missing token, got {other:?}"),
    }
    assert!(load(Function::PhysicalEvent, &env(root.path(), &[])).is_ok());
    let open = [
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("ENTWINE_AUTH__FUNCTIONS", "false"),
        ("ENTWINE_AUTH__METRICS", "false"),
    ];
    assert!(load(Function::PhysicalEvent, &env(root.path(), &open)).is_ok());
    assert!(load(Function::TwinEvaluator, &env(root.path(), &open)).is_ok());
    mount(
        &root.path().join("secrets"),
        "default",
        "auth",
        &[("tokens", "alpha-token-0123456789abcdef\n")],
    );
    let settings = load(Function::PhysicalEvent, &env(root.path(), &pod)).unwrap();
    assert!(settings
        .auth
        .requires_token(entwine_http::Interface::Functions));
}
