//! Each function binary started the way Fission's container executor runs it: the pod's own
//! process (no supervisor, so SIGTERM reaches it), listening on the pod's interfaces at the
//! container's port, and its ConfigMaps and Secrets as environment variables only (the
//! container specs map every key to its `ENTWINE_<SECTION>__<KEY>` variable). No file is
//! mounted: the mount roots point at directories that do not exist. Then the seed's chain.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use entwine_testing::{free_port, mqtt_address, unique, Subscriber, TestDatabase};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::contract::built_binaries;
use crate::support::*;

const TOKEN: &str = "container-token-0123456789abcdef";

/// The variables a container-executor pod of the specs gets: the seed's `postgres`, `odte` and
/// `digital` ConfigMaps and the `postgres` and `auth` Secrets, each key under its name.
fn pod_environment(db: &TestDatabase, topic_root: &str) -> Vec<(String, String)> {
    let options = db.options();
    let (host, port) = mqtt_address();
    let nowhere = std::env::temp_dir().join(unique("no-mounts"));
    [
        ("ENTWINE_POSTGRES__HOST", options.get_host().to_owned()),
        ("ENTWINE_POSTGRES__PORT", options.get_port().to_string()),
        ("ENTWINE_POSTGRES__DATABASE", db.name.clone()),
        ("ENTWINE_POSTGRES__USER", "postgres".to_owned()),
        ("ENTWINE_POSTGRES__PASSWORD", "postgres".to_owned()),
        ("ENTWINE_ODTE__EXPECTED_UPDATE_RATE", "0.2".to_owned()),
        ("ENTWINE_ODTE__TIME_WINDOW", "30".to_owned()),
        ("ENTWINE_ODTE__DESIRED_TIMELINESS", "1".to_owned()),
        ("ENTWINE_ODTE__THRESHOLD", "0.9".to_owned()),
        ("ENTWINE_DIGITAL__BROKER_URL", format!("{host}:{port}")),
        (
            "ENTWINE_DIGITAL__STATE_TOPIC",
            format!("{topic_root}/{{device_id}}/state"),
        ),
        (
            "ENTWINE_DIGITAL__LIFECYCLE_TOPIC",
            format!("{topic_root}/{{device_id}}/lifecycle"),
        ),
        ("ENTWINE_AUTH__TOKENS", TOKEN.to_owned()),
        // What the kubelet sets in every pod.
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1".to_owned()),
        ("HOSTNAME", unique("pod")),
        // No mounts at all: the defaults would be /configs and /secrets.
        (
            "ENTWINE_CONFIG_ROOT",
            nowhere.join("configs").display().to_string(),
        ),
        (
            "ENTWINE_SECRET_ROOT",
            nowhere.join("secrets").display().to_string(),
        ),
        (
            "ENTWINE_PODINFO_DIR",
            nowhere.join("podinfo").display().to_string(),
        ),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

struct Pod {
    child: Child,
    url: String,
}

/// Starts `binary` as the container's command: on every interface at a free port, with `env`
/// and nothing else; waits until it accepts connections (the pod's readiness).
async fn start(binary: &Path, env: &[(String, String)]) -> Pod {
    let port = free_port();
    let child = Command::new(binary)
        .current_dir(binary.parent().unwrap())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("ENTWINE_FUNCTION_LISTEN", format!("0.0.0.0:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    crate::contract::wait_listening(binary, port).await;
    Pod {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// SIGTERM, as the kubelet sends it straight to the container's process: it drains and exits 0.
async fn stop(mut pod: Pod) {
    let pid = pod.child.id().expect("still running");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(10), pod.child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = client.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_environment_variables_only_the_binaries_serve_the_seed_chain_on_the_pods_port() {
    let db = TestDatabase::create().await;
    db.migrated_store().await.close().await;
    let topics = unique("digital");
    let env = pod_environment(&db, &topics);
    let subscriber = Subscriber::start(&[format!("{topics}/#")]).await;
    let [physical, shadow, twin, digital, evaluator, letters] =
        built_binaries().map(|(_, path)| path);
    let physical_fn = start(&physical, &env).await;
    let shadow_fn = start(&shadow, &env).await;
    let twin_fn = start(&twin, &env).await;
    let digital_fn = start(&digital, &env).await;
    let evaluator_fn = start(&evaluator, &env).await;
    let letters_fn = start(&letters, &env).await;
    let client = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    // On the pod's port the route asks for the auth Secret's token, as behind the supervisor.
    let event = seed_event("iiot-device-1", now - 30_000);
    let (status, body) = post(&client, &format!("{}/", physical_fn.url), None, &event).await;
    assert_eq!(status, 401, "{body}");

    let mut last = Value::Null;
    for i in 0..6 {
        let event = seed_event("iiot-device-1", now - 30_000 + i * 5_000);
        let (status, physical) = post(
            &client,
            &format!("{}/", physical_fn.url),
            Some(TOKEN),
            &event,
        )
        .await;
        assert_eq!(status, 200, "{physical}");
        assert_eq!(keys(&physical), PHYSICAL_STATE_KEYS);
        let (status, pending) = post(
            &client,
            &format!("{}/", shadow_fn.url),
            Some(TOKEN),
            &physical,
        )
        .await;
        assert_eq!(status, 200, "{pending}");
        assert_eq!(keys(&pending), PENDING_KEYS);
        let (status, digital) =
            post(&client, &format!("{}/", twin_fn.url), Some(TOKEN), &pending).await;
        assert_eq!(status, 200, "{digital}");
        assert_eq!(keys(&digital), DIGITAL_KEYS);
        // The ODTE settings came from ENTWINE_ODTE__*: the seed's 30 s window holds all six
        // events (reliability i+1 of the 6 expected at 0.2/s), each later than the desired 1 s.
        assert_eq!(
            real(&digital["reliability"]),
            ((i + 1) as f64 / 6.0) as f32,
            "{digital}"
        );
        assert_eq!(digital["timeliness"], json!(0.0));
        assert_eq!(digital["lifecycle"], "disentangled");
        let (status, echoed) = post(
            &client,
            &format!("{}/", digital_fn.url),
            Some(TOKEN),
            &digital,
        )
        .await;
        assert_eq!(status, 200, "{echoed}");
        assert_eq!(echoed, digital);
        last = digital;
    }
    // The twin evaluator takes no token (its TimeTrigger sends none).
    let (status, body) = post(&client, &format!("{}/", evaluator_fn.url), None, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    // The digital broker from ENTWINE_DIGITAL__*: the six states, the last one as answered.
    let received = subscriber
        .wait_for(Duration::from_secs(10), "six states", |r| {
            r.iter().filter(|m| m.topic.ends_with("/state")).count() == 6
        })
        .await;
    let states: Vec<Value> = received
        .iter()
        .filter(|m| m.topic == format!("{topics}/iiot-device-1/state"))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(states.len(), 6);
    assert_eq!(states[5], last);

    for pod in [
        physical_fn,
        shadow_fn,
        twin_fn,
        digital_fn,
        evaluator_fn,
        letters_fn,
    ] {
        stop(pod).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_listen_address_or_an_open_pod_port_without_tokens_stops_the_binary_with_the_reason()
{
    let db = TestDatabase::create().await;
    let env = pod_environment(&db, &unique("digital"));
    let [physical, ..] = built_binaries().map(|(_, path)| path);
    let run = |extra: Vec<(&'static str, &'static str)>, drop_tokens: bool| {
        let mut command = std::process::Command::new(&physical);
        command.env_clear();
        for (k, v) in &env {
            if !(drop_tokens && k == "ENTWINE_AUTH__TOKENS") {
                command.env(k, v);
            }
        }
        command.envs(extra);
        command.output().unwrap()
    };
    // The binaries log as JSON lines on stdout; the reason is the last one.
    let reason = |output: std::process::Output| {
        assert_eq!(
            output.status.code(),
            Some(2),
            "exits 2 on a bad configuration"
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let logged = reason(run(vec![("ENTWINE_FUNCTION_LISTEN", "0.0.0.0")], false));
    assert!(
        logged.contains(
            r#"listen from ENTWINE_FUNCTION_LISTEN: \"0.0.0.0\" is not a socket address (an IP address and a port, e.g. 0.0.0.0:8888)"#
        ),
        "{logged}"
    );
    // On the pod's interfaces the route would be open to the network: refused without tokens.
    let logged = reason(run(vec![("ENTWINE_FUNCTION_LISTEN", "0.0.0.0:1")], true));
    assert!(
        logged.contains(
            "auth.tokens is not set: refusing to listen on 0.0.0.0:1 without authentication"
        ),
        "{logged}"
    );
}
