//! The process's Prometheus recorder, installed once and shared by every platform of the
//! process (a test process runs several).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The recorder's handle, installing it on the first call: latency buckets from 0.5 ms to
/// 10 s, batch-size buckets from 1 to 256 events (`entwine_connector_batch_size`,
/// `entwine_function_batch_size`), and a gauge not set for `idle` disappears from `/metrics` (the twin handler sets a
/// twin's `entwine_twin_odte` and `entwine_twin_entangled` on each of its states, so the series
/// of a twin silent longer than the silence threshold, or removed, go away and the number of
/// series stays bounded by the twins that are alive). Later calls answer the same handle; their
/// `idle` is not applied (the first platform's silence threshold holds for the process).
///
/// Fails when another recorder was installed in the process (a bench's own).
pub fn prometheus(idle: Duration) -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    const BUCKETS: [f64; 14] = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ];
    const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &BATCH_BUCKETS)?
        .idle_timeout(MetricKindMask::GAUGE, Some(idle))
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}
