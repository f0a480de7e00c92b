//! Each function binary started the way the Fission Rust environment starts it: its own working
//! directory, `FISSION_RUNTIME_PORT`, ConfigMaps and Secret mounted as files under a temporary
//! root. Then the four-step chain over HTTP with the seed's payloads, against real PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use entwine_testing::{free_port, mqtt_address, unique, Subscriber, TestDatabase};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::settings::{mount, SEED_ODTE};
use crate::support::*;

pub(crate) struct Running {
    child: Child,
    pub(crate) url: String,
}

/// Starts `binary` as the runtime would: cwd = where the package was unpacked (the binary's
/// directory), port variable, mounts under `root`; waits until it accepts connections.
pub(crate) async fn start(binary: &Path, root: &Path) -> Running {
    let port = free_port();
    let unpacked = binary.parent().expect("a binary path has a directory");
    let child = Command::new(binary)
        .current_dir(unpacked)
        .env_clear()
        .env("FISSION_RUNTIME_PORT", port.to_string())
        .env("PORT", port.to_string())
        .env("ENTWINE_CONFIG_ROOT", root.join("configs"))
        .env("ENTWINE_SECRET_ROOT", root.join("secrets"))
        .env("ENTWINE_PODINFO_DIR", root.join("podinfo"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    wait_listening(binary, port).await;
    Running {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// Waits until `binary` accepts connections on `port`, at most 30 s (the runtime's limit).
pub(crate) async fn wait_listening(binary: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "{} did not listen within 30 s (the runtime's limit)",
            binary.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn stop(mut running: Running) {
    let pid = running.child.id().expect("still running") as i32;
    // SIGTERM, as Kubernetes sends it; the function drains and exits 0.
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), running.child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

pub(crate) async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The seed's configuration, and a `digital` ConfigMap that sends digital events under
/// `topic_root` on the test broker.
pub(crate) fn mount_seed_configuration(root: &Path, db: &TestDatabase, topic_root: &str) {
    let options = db.options();
    let port = options.get_port().to_string();
    let configs = root.join("configs");
    // The seed's postgres ConfigMap, with the password moved to a Secret.
    mount(
        &configs,
        "default",
        "postgres",
        &[
            ("database", db.name.as_str()),
            ("user", "postgres"),
            ("host", options.get_host()),
            ("port", port.as_str()),
        ],
    );
    mount(&configs, "default", "odte", &SEED_ODTE);
    let (host, port) = mqtt_address();
    mount(
        &configs,
        "default",
        "digital",
        &[
            ("broker_url", format!("{host}:{port}").as_str()),
            ("state_topic", &format!("{topic_root}/{{device_id}}/state")),
            (
                "lifecycle_topic",
                &format!("{topic_root}/{{device_id}}/lifecycle"),
            ),
        ],
    );
    mount(
        &root.join("secrets"),
        "default",
        "postgres",
        &[("password", "postgres")],
    );
}

/// The six binaries as cargo built them.
pub(crate) fn built_binaries() -> [(&'static str, PathBuf); 6] {
    [
        (
            "physical-event-handler",
            env!("CARGO_BIN_EXE_physical-event-handler").into(),
        ),
        (
            "shadow-handler",
            env!("CARGO_BIN_EXE_shadow-handler").into(),
        ),
        ("twin-handler", env!("CARGO_BIN_EXE_twin-handler").into()),
        (
            "digital-event-handler",
            env!("CARGO_BIN_EXE_digital-event-handler").into(),
        ),
        (
            "twin-evaluator",
            env!("CARGO_BIN_EXE_twin-evaluator").into(),
        ),
        (
            "dead-letter-handler",
            env!("CARGO_BIN_EXE_dead-letter-handler").into(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binary_serves_its_step_of_the_seed_chain_as_the_fission_runtime_starts_it() {
    let [physical, shadow, twin, digital, evaluator, letters] =
        built_binaries().map(|(_, path)| path);
    seed_chain_through([&physical, &shadow, &twin, &digital, &evaluator, &letters]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_archive_unpacked_as_fission_does_serves_the_seed_chain() {
    // The archive script, on the binaries this test run built.
    let staged = tempfile::tempdir().unwrap();
    for (name, path) in built_binaries() {
        std::fs::copy(&path, staged.path().join(name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-fission-archives");
    // The host's architecture, as Kubernetes names it (the archive is checked for it).
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no Fission archive for {other}"),
    };
    let status = std::process::Command::new(script)
        .arg("--arch")
        .arg(arch)
        .arg("--binaries")
        .arg(staged.path())
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "build-fission-archives failed");
    // Fission's fetcher unzips the deployment archive to /userfunc/deployarchive, and the Rust
    // runtime starts <deployarchive>/<functionName>.
    let userfunc = tempfile::tempdir().unwrap();
    let deployarchive = userfunc.path().join("deployarchive");
    let status = std::process::Command::new("unzip")
        .arg("-q")
        .arg(out.path().join(format!("entwine-deploy-{arch}.zip")))
        .arg("-d")
        .arg(&deployarchive)
        .status()
        .unwrap();
    assert!(status.success(), "unzip failed");
    let mut names: Vec<String> = std::fs::read_dir(&deployarchive)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "dead-letter-handler",
            "digital-event-handler",
            "physical-event-handler",
            "shadow-handler",
            "twin-evaluator",
            "twin-handler"
        ],
        "the six binaries at the archive root, named as the functions' functionName"
    );
    let [physical, shadow, twin, digital, evaluator, letters] =
        built_binaries().map(|(name, _)| deployarchive.join(name));
    seed_chain_through([&physical, &shadow, &twin, &digital, &evaluator, &letters]).await;
}

/// Starts the five binaries with the seed's ConfigMaps mounted (password in a Secret) and a
/// digital broker on a fresh database, drives six seed payloads through the chain and checks
/// every answer, the digital events a real subscriber receives, and the evaluator's answer.
async fn seed_chain_through(binaries: [&Path; 6]) {
    let [physical, shadow, twin, digital, evaluator, letters] = binaries;
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    let topics = unique("digital");
    mount_seed_configuration(root.path(), &db, &topics);
    let subscriber = Subscriber::start(&[format!("{topics}/#")]).await;

    let physical_fn = start(physical, root.path()).await;
    let shadow_fn = start(shadow, root.path()).await;
    let twin_fn = start(twin, root.path()).await;
    let digital_fn = start(digital, root.path()).await;
    let evaluator_fn = start(evaluator, root.path()).await;
    let letters_fn = start(letters, root.path()).await;
    let client = reqwest::Client::new();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut last = Value::Null;
    for i in 0..6 {
        // Fission's router hands an exact-path trigger's request to the function as `/`.
        let event = seed_event("iiot-device-1", now - 30_000 + i * 5_000);
        let (status, physical) = post(&client, &format!("{}/", physical_fn.url), &event).await;
        assert_eq!(status, 200, "{physical}");
        assert_eq!(keys(&physical), PHYSICAL_STATE_KEYS);
        let (status, pending) = post(&client, &format!("{}/", shadow_fn.url), &physical).await;
        assert_eq!(status, 200, "{pending}");
        assert_eq!(keys(&pending), PENDING_KEYS);
        let (status, digital) = post(&client, &format!("{}/", twin_fn.url), &pending).await;
        assert_eq!(status, 200, "{digital}");
        assert_eq!(keys(&digital), DIGITAL_KEYS);
        // Each event arrives (its shadow time) within 30 s of the first, so all share a window,
        // but arrives late: the device times lie 5-30 s back, beyond the desired 1 s.
        assert_eq!(
            real(&digital["reliability"]),
            ((i + 1) as f64 / 6.0) as f32,
            "{digital}"
        );
        assert_eq!(digital["timeliness"], json!(0.0));
        assert_eq!(digital["odte"], json!(0.0));
        assert_eq!(digital["lifecycle"], "disentangled");
        let (status, echoed) = post(&client, &format!("{}/", digital_fn.url), &digital).await;
        assert_eq!(status, 200);
        assert_eq!(echoed, digital);
        // A forged state (entangled, ODTE 1) is refused and never published.
        let mut forged = digital.clone();
        forged["odte"] = json!(1.0);
        forged["lifecycle"] = json!("entangled");
        let (status, error) = post(&client, &format!("{}/", digital_fn.url), &forged).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["field"], "odte", "{error}");
        last = digital;
    }
    // The route path is answered too, and a redelivery is answered with the stored state.
    let (status, again) = post(
        &client,
        &format!("{}/pendingdigitalstates", twin_fn.url),
        &{
            let mut pending = last.clone();
            for k in [
                "availability",
                "reliability",
                "timeliness",
                "odte",
                "lifecycle",
            ] {
                pending.as_object_mut().unwrap().remove(k);
            }
            pending
        },
    )
    .await;
    assert_eq!((status, &again), (200, &last));
    // Bad input through the binary: 400 with the seed's error shape.
    let (status, error) = post(
        &client,
        &format!("{}/", physical_fn.url),
        &json!({"device_id": "x"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().starts_with("timestamp: "),
        "{error}"
    );

    // Digital events: six states, and the new twin bound by its first evaluation.
    let received = subscriber
        .wait_for(
            Duration::from_secs(10),
            "six states and a lifecycle change",
            |r| {
                r.iter().filter(|m| m.topic.ends_with("/state")).count() == 6
                    && r.iter().any(|m| m.topic.ends_with("/lifecycle"))
            },
        )
        .await;
    let states: Vec<Value> = received
        .iter()
        .filter(|m| m.topic == format!("{topics}/iiot-device-1/state"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(states.len(), 6);
    assert_eq!(states[5], last, "the published state is the digital state");
    let change: Value = received
        .iter()
        .find(|m| m.topic == format!("{topics}/iiot-device-1/lifecycle"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .unwrap();
    assert_eq!(
        (&change["device_id"], &change["from"], &change["to"]),
        (&json!("iiot-device-1"), &Value::Null, &json!("bound"))
    );
    // The evaluator, as a time trigger calls it (its method, an empty body, on `/`).
    let response = client
        .post(format!("{}/", evaluator_fn.url))
        .header("X-Fission-Timer-Name", "twin-evaluator")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let evaluation: Value = response.json().await.unwrap();
    assert!(
        evaluation["evaluated_at"].as_i64().unwrap() >= now,
        "{evaluation}"
    );
    assert!(evaluation["changes"].is_array(), "{evaluation}");

    // The dead-letter handler stores what the connector refused, and counts a redelivery.
    let letter = entwine_core::deadletter::DeadLetter::of(
        "device/iiot-device-1/telemetry/device_state",
        Some("iiot-device-1"),
        b"not json",
        "payload",
        None,
        "payload: not valid JSON",
        now,
    );
    let letter = serde_json::to_value(&letter).unwrap();
    let (status, stored) = post(&client, &format!("{}/", letters_fn.url), &letter).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(
        (
            &stored["stage"],
            &stored["payload_bytes"],
            &stored["deliveries"]
        ),
        (&json!("payload"), &json!(8), &json!(1))
    );
    let (_, again) = post(&client, &format!("{}/deadletters", letters_fn.url), &letter).await;
    assert_eq!(
        (&again["id"], &again["deliveries"]),
        (&stored["id"], &json!(2))
    );

    // A batch is only a bigger body through the router: two events of another device, as one
    // JSON array per binary, each answer array the next body. Within the batch the second
    // state's window holds the first, not the other way round: R = 1/6, then 2/6.
    let batch = json!([
        seed_event("iiot-device-2", now - 10_000),
        seed_event("iiot-device-2", now - 5_000)
    ]);
    let mut body = batch;
    for (function, keys_of) in [
        (&physical_fn, &PHYSICAL_STATE_KEYS[..]),
        (&shadow_fn, &PENDING_KEYS[..]),
        (&twin_fn, &DIGITAL_KEYS[..]),
        (&digital_fn, &DIGITAL_KEYS[..]),
    ] {
        let (status, answer) = post(&client, &format!("{}/", function.url), &body).await;
        assert_eq!(status, 200, "{answer}");
        let elements = answer
            .as_array()
            .expect("a batch is answered with an array");
        assert_eq!(elements.len(), 2, "{answer}");
        for element in elements {
            assert_eq!(keys(element), keys_of, "{answer}");
        }
        body = answer;
    }
    let reliability: Vec<f32> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|d| real(&d["reliability"]))
        .collect();
    assert_eq!(reliability, [(1.0 / 6.0) as f32, (2.0 / 6.0) as f32]);

    for running in [
        physical_fn,
        shadow_fn,
        twin_fn,
        digital_fn,
        evaluator_fn,
        letters_fn,
    ] {
        stop(running).await;
    }
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        rows,
        6 + 2,
        "the six events one by one and the batch of two"
    );
}

#[tokio::test]
async fn a_binary_with_a_bad_configuration_exits_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    mount(
        &root.path().join("configs"),
        "default",
        "odte",
        &[("expected_update_rate", "0")],
    );
    let output = Command::new(env!("CARGO_BIN_EXE_twin-handler"))
        .env_clear()
        .env("ENTWINE_CONFIG_ROOT", root.path().join("configs"))
        .env("ENTWINE_PODINFO_DIR", root.path().join("podinfo"))
        .env("DATABASE_URL", "postgres://localhost/x")
        .env("FISSION_RUNTIME_PORT", free_port().to_string())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected_update_rate must be a finite number above 0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_binary_whose_database_is_down_still_starts_and_answers_503() {
    let root = tempfile::tempdir().unwrap();
    let closed = free_port();
    let configs = root.path().join("configs");
    mount(
        &configs,
        "default",
        "postgres",
        &[
            ("database", "postgres"),
            ("user", "postgres"),
            ("host", "127.0.0.1"),
            ("port", closed.to_string().as_str()),
        ],
    );
    let running = start(
        Path::new(env!("CARGO_BIN_EXE_physical-event-handler")),
        root.path(),
    )
    .await;
    let client = reqwest::Client::new();
    let (status, answer) = post(&client, &format!("{}/", running.url), &seed_event("d", T0)).await;
    assert_eq!(status, 503, "{answer}");
    stop(running).await;
}

/// With the `auth` Secret mounted (as the shipped specs mount it), each function asks for one
/// of its tokens; the twin evaluator, which Fission's TimeTrigger calls without headers and
/// which takes no input, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_auth_secret_mounted_a_function_asks_for_a_token_and_the_evaluator_does_not() {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    mount_seed_configuration(root.path(), &db, &unique("digital"));
    // A Secret file as `kubectl create secret --from-file` writes it: one token per line.
    let (alpha, beta) = (
        "alpha-token-0123456789abcdef",
        "beta-token-0123456789abcdef",
    );
    mount(
        &root.path().join("secrets"),
        "default",
        "auth",
        &[("tokens", &format!("{alpha}\n{beta}\n"))],
    );
    let [physical, _, _, _, evaluator, _] = built_binaries().map(|(_, path)| path);
    let physical_fn = start(&physical, root.path()).await;
    let evaluator_fn = start(&evaluator, root.path()).await;
    let client = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let event = seed_event("iiot-device-1", now);
    let url = format!("{}/", physical_fn.url);
    let call = |token: Option<&'static str>| {
        let mut request = client.post(&url).json(&event);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = call(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
    assert_eq!(call(Some("not-a-token-0123456789abcdef")).await.0, 401);
    for token in [alpha, beta] {
        let (status, body) = call(Some(token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(keys(&body), PHYSICAL_STATE_KEYS);
    }
    let (status, body) = post(&client, &format!("{}/", evaluator_fn.url), &json!({})).await;
    assert_eq!(status, 200, "the evaluator without a token: {body}");
    stop(physical_fn).await;
    stop(evaluator_fn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_device_models_configmap_mounted_the_chain_takes_a_models_device_and_refuses_what_it_does_not_allow(
) {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let root = tempfile::tempdir().unwrap();
    mount_seed_configuration(root.path(), &db, &unique("digital"));
    // The ConfigMap as Fission's fetcher writes it: one file per key, `<model>.json`.
    let model = json!({
        "@type": "tm:ThingModel",
        "title": "Flow meter",
        "version": {"model": "1.4.0"},
        "entwine:id": "flow",
        "entwine:devices": ["flow-*"],
        "entwine:odte": {"expected_update_rate": 2, "time_window": 2},
        "properties": {
            "litres_per_minute": {"type": "number", "minimum": 0, "maximum": 400},
            "valve_open": {"type": "boolean", "entwine:pointer": "/data/valve/open"}
        }
    });
    mount(
        &root.path().join("configs"),
        "default",
        "device-models",
        &[("flow.json", model.to_string().as_str())],
    );
    let [physical, shadow, twin, digital, _, _] = built_binaries().map(|(_, path)| path);
    let physical_fn = start(&physical, root.path()).await;
    let shadow_fn = start(&shadow, root.path()).await;
    let twin_fn = start(&twin, root.path()).await;
    let digital_fn = start(&digital, root.path()).await;
    let client = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Four updates in 2 s, as its profile expects (the seed's 0.2/s over 30 s would call this
    // twin a sixth reliable).
    let mut last = Value::Null;
    for i in 0..4 {
        let event = json!({"timestamp": now - 1_500 + i * 500, "device_id": "flow-7",
                           "data": {"litres_per_minute": 120.5 + i as f64,
                                    "valve": {"open": true}}});
        let (status, physical) = post(&client, &format!("{}/", physical_fn.url), &event).await;
        assert_eq!(status, 200, "{physical}");
        assert_eq!(physical["model"], "flow");
        assert_eq!(physical["model_version"], "1.4.0");
        assert_eq!(
            physical["readings"],
            json!({"litres_per_minute": 120.5 + i as f64, "valve_open": true})
        );
        assert!(physical.get("temperature").is_none(), "{physical}");
        let (status, pending) = post(&client, &format!("{}/", shadow_fn.url), &physical).await;
        assert_eq!(status, 200, "{pending}");
        assert_eq!(pending["readings"], physical["readings"]);
        let (status, evaluated) = post(&client, &format!("{}/", twin_fn.url), &pending).await;
        assert_eq!(status, 200, "{evaluated}");
        assert_eq!(real(&evaluated["reliability"]), (i + 1) as f32 / 4.0);
        let (status, echoed) = post(&client, &format!("{}/", digital_fn.url), &evaluated).await;
        assert_eq!(status, 200);
        assert_eq!(echoed, evaluated);
        last = evaluated;
    }
    assert_eq!(last["readings"]["valve_open"], true);
    // A reading its model does not allow: 400, naming the field and the property.
    let bad = json!({"timestamp": now, "device_id": "flow-7",
                     "data": {"litres_per_minute": 900.0, "valve": {"open": true}}});
    let (status, error) = post(&client, &format!("{}/", physical_fn.url), &bad).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(
        error["error"],
        "data.litres_per_minute: 900.0 is greater than the maximum of 400 (property litres_per_minute of model flow, a number expected)"
    );
    // The seed's device beside it is the seed's, exactly.
    let (status, seed) = post(
        &client,
        &format!("{}/", physical_fn.url),
        &seed_event("iiot-device-1", now),
    )
    .await;
    assert_eq!(status, 200, "{seed}");
    assert_eq!(keys(&seed), PHYSICAL_STATE_KEYS);
    for running in [physical_fn, shadow_fn, twin_fn, digital_fn] {
        stop(running).await;
    }
}
