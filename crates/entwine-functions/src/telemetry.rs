//! Tracing setup, shared by the function binaries and the CLI.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line: what a cluster's log collector wants.
    Json,
    /// Human-readable lines, for a terminal.
    Pretty,
}

/// Installs the global subscriber: filter from `RUST_LOG`, else `default` (e.g. `info`), lines
/// to stderr. A second call (tests) leaves the first subscriber in place.
pub fn init(format: Format, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        Format::Json => builder.json().try_init(),
        Format::Pretty => builder.try_init(),
    };
}

/// The process's Prometheus recorder, installed once and shared by everything in the process
/// (a test process runs several platforms; a function binary installs it before it serves).
static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// [`prometheus`] with a twin's gauges forgotten after the longest silence threshold of
/// `profiles` (the seed's and every model's): what the platform, the twins service and the
/// function binaries install.
pub fn prometheus_for(
    profiles: &dyn entwine_core::model::Profiles,
) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    let silence = profiles
        .profiles()
        .iter()
        .map(entwine_core::odte::OdteConfig::silence_ms)
        .max()
        .unwrap_or(0);
    prometheus(std::time::Duration::from_millis(
        u64::try_from(silence).unwrap_or(0),
    ))
}

/// The recorder's handle, installing it on the first call: latency buckets from 0.5 ms to
/// 10 s, batch-size buckets from 1 to 256 events (`entwine_connector_batch_size`,
/// `entwine_function_batch_size`), and a gauge not set for `idle` disappears from `/metrics`
/// (the twin handler sets a twin's `entwine_twin_odte` and `entwine_twin_entangled` on each of
/// its states, so the series of a twin silent longer than the silence threshold, or removed, go
/// away and the number of series stays bounded by the twins that are alive). Later calls answer
/// the same handle; their `idle` is not applied (the first caller's threshold holds for the
/// process).
///
/// Fails when another recorder was installed in the process (a bench's own).
pub fn prometheus(
    idle: std::time::Duration,
) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    const BUCKETS: [f64; 14] = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ];
    const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &BATCH_BUCKETS)?
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(idle))
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    Ok(PROMETHEUS.get_or_init(|| handle).clone())
}
