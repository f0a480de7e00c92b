//! `entwine bench` in short form: every scenario runs to completion, produces its figures and
//! loses nothing. (The figures themselves are measured in full-length runs: BENCHMARKS.md.)

use entwine_testing::{mqtt_address, postgres_url};
use serde_json::Value;
use tokio::process::Command;

/// Runs `entwine bench ARGS --json FILE` and answers the JSON it wrote and what it printed.
async fn bench(args: &[&str]) -> (Value, String) {
    bench_with(args, &[]).await
}

/// As [`bench`], with `env` set.
async fn bench_with(args: &[&str], env: &[(&str, &str)]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .arg("bench")
        .args(args)
        .args(["--no-progress", "--json", json.to_str().unwrap()])
        .env("RUST_LOG", "warn,rumqttd=off")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, printed)
}

fn services() -> Vec<String> {
    let (host, port) = mqtt_address();
    vec![
        "--scenario".into(),
        "services".into(),
        "--database-url".into(),
        postgres_url(),
        "--broker-url".into(),
        format!("{host}:{port}"),
    ]
}

/// Every published message was mirrored exactly once, with latency figures for the chain and
/// each function.
fn assert_complete_run(run: &Value) {
    let published = run["published"].as_u64().unwrap();
    assert!(published > 0, "{run}");
    assert_eq!(run["acknowledged"], published, "{run}");
    assert_eq!(run["lost"], 0, "{run}");
    assert_eq!(run["duplicated"], 0, "{run}");
    assert_eq!(run["stored"]["evaluated"], published, "{run}");
    assert_eq!(run["stored"]["physical"], published, "{run}");
    assert!(run["throughput_per_s"].as_f64().unwrap() > 0.0, "{run}");
    let latency = &run["latency"];
    assert!(latency["count"].as_u64().unwrap() > 0, "{run}");
    let (p50, p99, max) = (
        latency["p50_ms"].as_f64().unwrap(),
        latency["p99_ms"].as_f64().unwrap(),
        latency["max_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    for function in [
        "physical-event-handler",
        "shadow-handler",
        "twin-handler",
        "digital-event-handler",
    ] {
        assert!(
            run["functions"][function]["count"].as_u64().unwrap() > 0,
            "no figures for {function}: {run}"
        );
    }
    assert!(run["cpu"]["entwine_s"].as_f64().unwrap() > 0.0, "{run}");
    assert!(run["peak_rss_mib"].as_f64().unwrap() > 1.0, "{run}");
}

#[tokio::test]
async fn embedded_fixed_rate_mirrors_every_event_and_reports_the_figures() {
    let (report, printed) = bench(&[
        "--devices",
        "20",
        "--rate",
        "10",
        "--duration",
        "2",
        "--warmup",
        "1",
    ])
    .await;
    let run = &report["runs"][0];
    assert_complete_run(run);
    assert_eq!(run["scenario"], "embedded");
    assert_eq!(run["mode"], "fixed");
    assert_eq!(run["offered_per_s"], 200.0);
    let throughput = run["throughput_per_s"].as_f64().unwrap();
    assert!(
        (150.0..250.0).contains(&throughput),
        "200 events/s offered, {throughput} mirrored"
    );
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
    // The connector's default batch size, and batches of it at most.
    assert_eq!(run["max_batch"], 64, "{run}");
    let batches = &run["batches"];
    let (count, events, largest) = (
        batches["count"].as_u64().unwrap(),
        batches["events"].as_u64().unwrap(),
        batches["largest"].as_u64().unwrap(),
    );
    assert!(count > 0 && count <= events, "{batches}");
    assert!((1..=64).contains(&largest), "{batches}");
    assert_eq!(
        batches["mean_events"].as_f64().unwrap(),
        events as f64 / count as f64
    );
    for expected in [
        "--max-batch 64;",
        "embedded / fixed",
        "device → twin stored",
        "twin-handler",
        "lost 0",
    ] {
        assert!(printed.contains(expected), "no {expected:?} in {printed}");
    }
}

#[tokio::test]
async fn services_saturation_mirrors_every_event_on_postgresql_and_mosquitto() {
    let mut args = services();
    args.extend(
        [
            "--mode",
            "saturation",
            "--devices",
            "20",
            "--in-flight",
            "50",
            "--duration",
            "2",
            "--warmup",
            "1",
            "--ack-order",
            "completion",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (report, printed) = bench(&args).await;
    let run = &report["runs"][0];
    assert_complete_run(run);
    assert_eq!(run["scenario"], "services");
    assert_eq!(run["mode"], "saturation");
    assert_eq!(run["in_flight"], 50);
    assert!(
        run["cpu"]["postgres_s"].as_f64().unwrap() > 0.0,
        "PostgreSQL worked: {run}"
    );
    assert!(printed.contains("PostgreSQL"), "{printed}");
}

#[tokio::test]
async fn over_http_with_tokens_set_the_connector_presents_its_token_and_mirrors_every_event() {
    let token = "bench-token-0123456789abcdef";
    let (report, _) = bench_with(
        &[
            "--mode",
            "saturation",
            "--devices",
            "20",
            "--in-flight",
            "50",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--http-functions",
        ],
        &[
            (
                "ENTWINE_AUTH__TOKENS",
                &format!("other-token-0123456789abcdef,{token}"),
            ),
            ("ENTWINE_AUTH__TOKEN", token),
        ],
    )
    .await;
    assert_complete_run(&report["runs"][0]);
    // The tokens are in force: without one to present, the bench does not start.
    let out = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args([
            "bench",
            "--http-functions",
            "--duration",
            "1",
            "--no-progress",
        ])
        .env("ENTWINE_AUTH__TOKENS", token)
        .env_remove("ENTWINE_AUTH__TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("which ask for a token: set auth.token to one of auth.tokens"),
        "{stderr}"
    );
}

#[tokio::test]
async fn max_batch_one_sends_every_event_alone_and_the_report_says_so() {
    let (report, printed) = bench(&[
        "--mode",
        "saturation",
        "--devices",
        "20",
        "--in-flight",
        "50",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--max-batch",
        "1",
    ])
    .await;
    let run = &report["runs"][0];
    assert_complete_run(run);
    assert_eq!(run["max_batch"], 1, "{run}");
    let batches = &run["batches"];
    assert!(batches["count"].as_u64().unwrap() > 0, "{batches}");
    assert_eq!(batches["events"], batches["count"], "{batches}");
    assert_eq!(batches["mean_events"], 1.0, "{batches}");
    assert_eq!(batches["largest"], 1, "{batches}");
    assert!(
        printed.contains("; --max-batch 1; "),
        "no --max-batch in the header: {printed}"
    );
    assert!(
        printed.contains(&format!(
            "  batches       {} batches, mean 1.00 events, largest 1 (counted while measured",
            batches["count"]
        )),
        "{printed}"
    );
}

#[tokio::test]
async fn curves_give_one_run_per_device_count_and_one_point_per_window() {
    let (report, printed) = bench(&[
        "--curve",
        "devices",
        "--curve-devices",
        "5,15",
        "--rate",
        "10",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--curve",
        "window",
        "--curve-windows",
        "6,60",
        "--curve-evaluations",
        "20",
    ])
    .await;
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["devices"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [5, 15]
    );
    runs.iter().for_each(assert_complete_run);
    let points = report["window_curve"].as_array().unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["window_events"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [6, 60]
    );
    for point in points {
        assert_eq!(point["evaluations"], 20);
        assert_eq!(point["backend"], "sqlite");
        assert!(point["mean_us"].as_f64().unwrap() > 0.0, "{point}");
    }
    assert_eq!(points[0]["relative_to_shortest"], 1.0);
    assert!(printed.contains("ODTE evaluation cost"), "{printed}");
}

#[tokio::test]
async fn bad_flags_are_refused_by_name() {
    for (args, expected) in [
        (vec!["--rate", "0"], "--rate"),
        (vec!["--devices", "0"], "--devices"),
        (vec!["--max-batch", "0"], "--max-batch"),
        (vec!["--curve-windows", "1"], "--curve-windows"),
        (vec!["--ack-order", "completion"], "--ack-order completion"),
        (
            vec![
                "--scenario",
                "services",
                "--database-url",
                "mysql://x/y",
                "--duration",
                "1",
            ],
            "postgres://",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_entwine"))
            .arg("bench")
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn help_documents_every_scenario() {
    let out = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(["bench", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for scenario in [
        "--scenario embedded",
        "--scenario services",
        "--mode fixed",
        "--mode saturation",
        "--curve devices",
        "--curve window",
        "--json",
    ] {
        assert!(help.contains(scenario), "--help lacks {scenario}: {help}");
    }
}
