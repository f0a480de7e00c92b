//! `entwine experiment`: a scripted scenario on the local platform — phases that switch faults
//! on and off, change device rates, silence devices — with every twin's ODTE sampled over time,
//! written as CSV and drawn as an SVG plot.
//!
//! The scenario is a YAML file:
//! ```yaml
//! devices: 3                  # emulated devices exp-1 … exp-3
//! rate: 1                     # messages per second per device (also the expected update rate)
//! window: 10                  # ODTE window, s
//! desired_timeliness: 0.1     # s
//! threshold: 0.9
//! availability_max_gap: 2     # optional: measure availability (s)
//! silence_threshold: 20       # optional: unbound after this much silence (s)
//! sample_every: 1             # s
//! phases:
//!   - name: baseline
//!     seconds: 30
//!   - name: layer 3, critical, on exp-1
//!     seconds: 30
//!     faults: [{device: exp-1, preset: layer3-critical}]
//!   - name: exp-2 silent
//!     seconds: 40
//!     silent: [exp-2]
//!   - name: half rate
//!     seconds: 30
//!     conf: {aggregatedTelemetryMsgSec: 0.5}
//!   - name: recovery
//!     seconds: 30
//!     clear_faults: true
//! ```
//! Faults are those of the device emulator's `PUT /faults` (a `preset`, or `delayMs`,
//! `jitterMs`, `loss`, `clockSkewMs`; `device` for one device, else fleet-wide); `silent` is a
//! 100 % loss on those devices; `conf` goes to `PUT /conf`; `clear_faults` removes every fault
//! before the phase's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};

use entwine_core::odte::OdteConfig;
use entwine_platform::{DeviceSettings, EvaluatorPeriod, Platform, PlatformConfig};

/// Flags of `entwine experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// The scenario (YAML; see `docs/experiments/`).
    pub scenario: PathBuf,
    /// Where to write `odte.csv` and `odte.svg` (created if missing).
    #[arg(long, default_value = "experiment-out")]
    pub out: PathBuf,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Devices, named `exp-1` … `exp-N`.
    pub devices: usize,
    /// Messages per second per device, and the expected update rate.
    pub rate: f64,
    /// The ODTE window, s.
    pub window: f64,
    /// Desired timeliness, s.
    #[serde(default = "defaults::desired_timeliness")]
    pub desired_timeliness: f64,
    /// The lifecycle threshold.
    #[serde(default = "defaults::threshold")]
    pub threshold: f64,
    /// Measure availability with this gap, s.
    #[serde(default)]
    pub availability_max_gap: Option<f64>,
    /// Unbound after this much silence, s.
    #[serde(default)]
    pub silence_threshold: Option<f64>,
    /// Seconds between samples.
    #[serde(default = "defaults::sample_every")]
    pub sample_every: f64,
    /// The phases, in order.
    pub phases: Vec<Phase>,
}

mod defaults {
    pub(super) fn desired_timeliness() -> f64 {
        1.0
    }
    pub(super) fn threshold() -> f64 {
        0.9
    }
    pub(super) fn sample_every() -> f64 {
        1.0
    }
}

/// One phase of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Shown in the CSV and on the plot.
    pub name: String,
    /// How long it lasts.
    pub seconds: f64,
    /// Remove every fault first.
    #[serde(default)]
    pub clear_faults: bool,
    /// Faults to switch on (bodies of `PUT /faults`).
    #[serde(default)]
    pub faults: Vec<serde_json::Map<String, Value>>,
    /// Devices that fall silent (100 % loss).
    #[serde(default)]
    pub silent: Vec<String>,
    /// A schedule change (`PUT /conf`).
    #[serde(default)]
    pub conf: Option<serde_json::Map<String, Value>>,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let scenario: Scenario = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{} is not a scenario", path.display()))?;
        anyhow::ensure!(scenario.devices > 0, "devices must be at least 1");
        anyhow::ensure!(
            scenario.rate.is_finite() && scenario.rate > 0.0,
            "rate must be above 0"
        );
        anyhow::ensure!(
            scenario.sample_every.is_finite() && scenario.sample_every >= 0.1,
            "sample_every must be at least 0.1 s"
        );
        anyhow::ensure!(!scenario.phases.is_empty(), "a scenario needs phases");
        let ids: Vec<String> = scenario.device_ids();
        for phase in &scenario.phases {
            anyhow::ensure!(
                phase.seconds.is_finite() && phase.seconds > 0.0,
                "phase {:?}: seconds must be above 0",
                phase.name
            );
            for device in &phase.silent {
                anyhow::ensure!(
                    ids.contains(device),
                    "phase {:?}: no device {device:?} (devices are {} … {})",
                    phase.name,
                    ids[0],
                    ids[ids.len() - 1]
                );
            }
        }
        Ok(scenario)
    }

    fn device_ids(&self) -> Vec<String> {
        (1..=self.devices).map(|i| format!("exp-{i}")).collect()
    }
}

/// One sample of one twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the scenario started.
    pub t: f64,
    /// The phase it was taken in.
    pub phase: String,
    /// The twin.
    pub device_id: String,
    /// Its lifecycle.
    pub lifecycle: String,
    /// ODTE, A, R, T.
    pub odte: f64,
    /// Availability.
    pub availability: f64,
    /// Reliability.
    pub reliability: f64,
    /// Timeliness.
    pub timeliness: f64,
}

/// Runs a scenario, writes `odte.csv` and `odte.svg` under `--out`.
pub async fn experiment(args: &ExperimentArgs) -> anyhow::Result<()> {
    let scenario = Scenario::load(&args.scenario)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let url = format!("sqlite://{}", dir.path().join("experiment.db").display());
    let mut config = PlatformConfig::ephemeral(&url);
    config.odte = OdteConfig::new(
        scenario.rate,
        scenario.window,
        scenario.desired_timeliness,
        scenario.threshold,
    )
    .and_then(|c| c.with_availability_max_gap(scenario.availability_max_gap))
    .and_then(|c| c.with_silence_threshold(scenario.silence_threshold))
    .with_context(|| format!("{}: invalid ODTE settings", args.scenario.display()))?;
    config.evaluator = EvaluatorPeriod::Every(Duration::from_secs_f64(
        scenario.sample_every.min(scenario.window / 6.0).max(0.1),
    ));
    config.devices = Some(DeviceSettings {
        count: scenario.devices,
        prefix: "exp".into(),
        rate: scenario.rate,
        update_period_ms: (1000.0 / scenario.rate).round().max(1.0) as u64,
        update_initial_delay_ms: 0,
        ..DeviceSettings::default()
    });
    if let Some(connector) = &mut config.connector {
        connector.client_id = format!("entwine-experiment-{}", std::process::id());
    }
    let platform = Platform::start(config).await?;
    let api = format!("http://{}", platform.http_address());
    let devices = format!(
        "http://{}",
        platform
            .device_api()
            .context("the experiment's devices did not start")?
    );
    let http = reqwest::Client::new();

    let total: f64 = scenario.phases.iter().map(|p| p.seconds).sum();
    eprintln!(
        "experiment: {} phases, {total:.0} s, {} devices",
        scenario.phases.len(),
        scenario.devices
    );
    let clock = tokio::time::Instant::now();
    let mut samples = Vec::new();
    let mut boundaries = Vec::new();
    let mut silent: Vec<String> = Vec::new();
    for phase in &scenario.phases {
        let begins = clock.elapsed().as_secs_f64();
        boundaries.push((begins, phase.name.clone()));
        eprintln!("  {begins:>6.1} s  {}", phase.name);
        if phase.clear_faults {
            send(
                &http,
                reqwest::Method::DELETE,
                &format!("{devices}/faults"),
                None,
            )
            .await?;
            silent.clear();
        }
        for faults in &phase.faults {
            send(
                &http,
                reqwest::Method::PUT,
                &format!("{devices}/faults"),
                Some(&Value::Object(faults.clone())),
            )
            .await?;
        }
        for device in &phase.silent {
            send(
                &http,
                reqwest::Method::PUT,
                &format!("{devices}/faults"),
                Some(&json!({"device": device, "loss": 1.0})),
            )
            .await?;
            silent.push(device.clone());
        }
        if let Some(conf) = &phase.conf {
            send(
                &http,
                reqwest::Method::PUT,
                &format!("{devices}/conf"),
                Some(&Value::Object(conf.clone())),
            )
            .await?;
        }
        let ends = begins + phase.seconds;
        loop {
            let t = clock.elapsed().as_secs_f64();
            if t >= ends {
                break;
            }
            samples.extend(sample(&http, &api, t, &phase.name).await?);
            let next = (t + scenario.sample_every).min(ends) - clock.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs_f64(next.max(0.0))).await;
        }
    }
    platform.shutdown().await?;

    let csv = args.out.join("odte.csv");
    std::fs::write(&csv, to_csv(&samples))
        .with_context(|| format!("cannot write {}", csv.display()))?;
    let svg = args.out.join("odte.svg");
    std::fs::write(&svg, plot(&samples, &boundaries, total, scenario.threshold))
        .with_context(|| format!("cannot write {}", svg.display()))?;
    println!(
        "{} samples written to {} and plotted in {}",
        samples.len(),
        csv.display(),
        svg.display()
    );
    Ok(())
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> anyhow::Result<()> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "{method} {url} {}: {}",
        body.map(Value::to_string).unwrap_or_default(),
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

async fn sample(
    http: &reqwest::Client,
    api: &str,
    t: f64,
    phase: &str,
) -> anyhow::Result<Vec<Sample>> {
    let twins = crate::status::all_twins(http, api)
        .await
        .context("the twins API")?;
    Ok(twins
        .iter()
        .filter_map(|twin| {
            let real = |k: &str| twin.get(k).and_then(Value::as_f64);
            Some(Sample {
                t,
                phase: phase.to_owned(),
                device_id: twin.get("device_id")?.as_str()?.to_owned(),
                lifecycle: twin.get("lifecycle")?.as_str()?.to_owned(),
                odte: real("odte")?,
                availability: real("availability")?,
                reliability: real("reliability")?,
                timeliness: real("timeliness")?,
            })
        })
        .collect())
}

/// The samples as CSV (RFC 4180, by the `csv` crate) with a header: times to the millisecond,
/// the four figures to four decimals, a field quoted when it holds a comma, a quote or a line
/// break.
pub fn to_csv(samples: &[Sample]) -> String {
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let header = [
        "t_s",
        "phase",
        "device_id",
        "lifecycle",
        "odte",
        "availability",
        "reliability",
        "timeliness",
    ];
    // Writing to memory cannot fail: the only errors of a `csv::Writer` are its writer's.
    let written: csv::Result<()> = std::iter::once(header.map(String::from))
        .chain(samples.iter().map(|s| {
            [
                format!("{:.3}", s.t),
                s.phase.clone(),
                s.device_id.clone(),
                s.lifecycle.clone(),
                format!("{:.4}", s.odte),
                format!("{:.4}", s.availability),
                format!("{:.4}", s.reliability),
                format!("{:.4}", s.timeliness),
            ]
        }))
        .try_for_each(|record| out.write_record(&record));
    let bytes = written
        .and_then(|()| out.into_inner().map_err(|e| e.into_error().into()))
        .unwrap_or_default();
    // Every field is a `String`: the bytes are UTF-8.
    String::from_utf8(bytes).unwrap_or_default()
}

/// An SVG plot: ODTE over time, one line per twin, the phases as bands, the threshold dashed.
pub fn plot(samples: &[Sample], phases: &[(f64, String)], total_s: f64, threshold: f64) -> String {
    const W: f64 = 960.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 50.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let total = total_s.max(1e-9);
    let x = |t: f64| LEFT + (t / total).clamp(0.0, 1.0) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - v.clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"22\" font-size=\"15\">ODTE of each twin over time</text>\n"
    );
    for (i, (begins, name)) in phases.iter().enumerate() {
        let ends = phases.get(i + 1).map_or(total, |p| p.0);
        let fill = if i % 2 == 0 { "#f4f4f4" } else { "#ffffff" };
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#555\">{}</text>\n",
            x(*begins),
            (x(ends) - x(*begins)).max(0.0),
            H - TOP - BOTTOM,
            x(*begins) + 3.0,
            TOP - 6.0,
            escape(name)
        ));
    }
    // Axes, grid, threshold.
    for tick in 0..=4 {
        let v = f64::from(tick) / 4.0;
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\n<text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            y(v),
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0
        ));
    }
    let step = [5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| total / s <= 12.0)
        .unwrap_or(1200.0);
    let mut t = 0.0;
    while t <= total + 1e-9 {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0}</text>\n",
            x(t),
            H - BOTTOM + 16.0
        ));
        t += step;
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds</text>\n<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">ODTE</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        H / 2.0,
        H / 2.0
    ));
    svg.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#000\" stroke-dasharray=\"6 4\"/>\n<text x=\"{2:.1}\" y=\"{3:.1}\">threshold {threshold}</text>\n",
        y(threshold),
        W - RIGHT,
        W - RIGHT + 6.0,
        y(threshold) + 4.0
    ));
    let mut by_twin: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_twin.entry(s.device_id.as_str()).or_default().push(s);
    }
    for (i, (device, points)) in by_twin.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(s.odte)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{}</text>\n",
            path.join(" "),
            W - RIGHT + 6.0,
            TOP + 30.0 + 16.0 * i as f64,
            escape(device)
        ));
    }
    svg.push_str(&format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#000\"/>\n</svg>\n",
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    ));
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, device: &str, odte: f64) -> Sample {
        Sample {
            t,
            phase: "base \"line\"".into(),
            device_id: device.into(),
            lifecycle: "entangled".into(),
            odte,
            availability: 1.0,
            reliability: odte,
            timeliness: 1.0,
        }
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_sample_with_quoted_phases() {
        let csv = to_csv(&[sample(0.5, "exp-1", 1.0), sample(1.5, "exp-2", 0.25)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "t_s,phase,device_id,lifecycle,odte,availability,reliability,timeliness"
        );
        assert_eq!(
            lines[2],
            "1.500,\"base \"\"line\"\"\",exp-2,entangled,0.2500,1.0000,0.2500,1.0000"
        );
        assert_eq!(
            lines[1],
            "0.500,\"base \"\"line\"\"\",exp-1,entangled,1.0000,1.0000,1.0000,1.0000"
        );
        assert_eq!(lines.len(), 3);
        let mut plain = sample(2.0, "exp-3", 0.5);
        plain.phase = "silence, then back".into();
        assert_eq!(
            to_csv(&[plain]).lines().nth(1),
            Some("2.000,\"silence, then back\",exp-3,entangled,0.5000,1.0000,0.5000,1.0000")
        );
    }

    #[test]
    fn the_plot_draws_one_line_per_twin_and_names_every_phase() {
        let samples = [
            sample(0.0, "exp-1", 1.0),
            sample(10.0, "exp-1", 0.5),
            sample(0.0, "exp-2", 0.0),
        ];
        let svg = plot(
            &samples,
            &[(0.0, "a & b".into()), (5.0, "<c>".into())],
            10.0,
            0.9,
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &amp; b") && svg.contains("&lt;c&gt;"));
        assert!(svg.contains("threshold 0.9"));
        // ODTE 1 at t = 0 is the plot's top-left corner; 0.5 at the end is half-way down.
        assert!(svg.contains("60.0,50.0 810.0,210.0"), "{svg}");
    }

    #[test]
    fn scenarios_are_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(&path, "devices: 2\nrate: 1\nwindow: 10\nphases:\n  - {name: a, seconds: 5, silent: [exp-3]}\n").unwrap();
        let error = Scenario::load(&path).unwrap_err().to_string();
        assert!(error.contains("no device \"exp-3\""), "{error}");
        std::fs::write(&path, "devices: 2\nrate: 1\nwindow: 10\nphasez: []\n").unwrap();
        assert!(Scenario::load(&path).is_err());
        std::fs::write(&path, "devices: 2\nrate: 1\nwindow: 10\nphases:\n  - {name: a, seconds: 5, silent: [exp-2]}\n").unwrap();
        let ok = Scenario::load(&path).unwrap();
        assert_eq!((ok.devices, ok.phases.len(), ok.sample_every), (2, 1, 1.0));
    }
}
