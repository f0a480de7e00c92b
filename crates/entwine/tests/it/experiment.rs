//! `entwine experiment` on a short scenario: phases run in order, faults reach the devices, and
//! the CSV and the plot show what happened.

use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_scenario_writes_odte_over_time_as_csv_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        "devices: 2\nrate: 5\nwindow: 2\nsilence_threshold: 60\nsample_every: 0.25\nphases:\n  \
         - {name: warm-up, seconds: 3.5}\n  \
         - {name: exp-2 silent, seconds: 3, silent: [exp-2]}\n  \
         - {name: recovery, seconds: 1, clear_faults: true}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args([
            "experiment",
            scenario.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn,rumqttd=off")
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = std::fs::read_to_string(out.join("odte.csv")).unwrap();
    // Read as CSV (a phase name may hold a comma, and is then quoted).
    let rows: Vec<Vec<String>> = csv::Reader::from_reader(csv.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    assert!(rows.len() > 20, "{csv}");
    let odte = |device: &str, phase: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r[2] == device && r[1] == phase)
            .map(|r| r[4].parse().unwrap())
            .collect()
    };
    // At the end of each phase: both entangled after the warm-up; the silent one fell, the
    // other did not.
    let last = |v: Vec<f64>| *v.last().unwrap();
    assert!(last(odte("exp-1", "warm-up")) >= 0.9, "{csv}");
    assert!(last(odte("exp-2", "warm-up")) >= 0.9, "{csv}");
    assert!(last(odte("exp-2", "exp-2 silent")) < 0.5, "{csv}");
    assert!(last(odte("exp-1", "exp-2 silent")) >= 0.9, "{csv}");
    assert!(
        rows.iter()
            .any(|r| r[2] == "exp-2" && r[3] == "disentangled"),
        "{csv}"
    );
    let svg = std::fs::read_to_string(out.join("odte.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2, "one line per twin");
    for phase in ["warm-up", "exp-2 silent", "recovery"] {
        assert!(svg.contains(phase), "the plot names {phase}");
    }
}

#[tokio::test]
async fn a_scenario_naming_an_unknown_device_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        "devices: 2\nrate: 1\nwindow: 10\nphases:\n  - {name: a, seconds: 1, silent: [exp-9]}\n",
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(["experiment", scenario.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("no device \"exp-9\""), "{stderr}");
    assert!(
        !dir.path().join("experiment-out").exists(),
        "nothing written"
    );
}
