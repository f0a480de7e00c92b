//! A metrics recorder that keeps every histogram the pipeline records (function durations, the
//! chain, the entanglement latency) as an HDR histogram, for exact percentiles: Prometheus
//! buckets would only bound them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use hdrhistogram::Histogram as Hdr;
use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use serde::Serialize;

/// Latency percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

/// One histogram, in microseconds from 1 µs to 1 hour at 3 significant digits.
struct Cell(Mutex<Hdr<u64>>);

impl HistogramFn for Cell {
    fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6).round().max(1.0) as u64;
        if let Ok(mut h) = self.0.lock() {
            h.saturating_record(micros);
        }
    }
}

/// The recorder: histograms by name and labels; counters and gauges are not kept.
#[derive(Default)]
pub struct HdrRecorder {
    histograms: Mutex<HashMap<Key, Arc<Cell>>>,
}

impl HdrRecorder {
    /// The process's recorder, installed on first use.
    pub fn global() -> anyhow::Result<&'static Arc<HdrRecorder>> {
        static RECORDER: OnceLock<Arc<HdrRecorder>> = OnceLock::new();
        if let Some(recorder) = RECORDER.get() {
            return Ok(recorder);
        }
        let recorder = RECORDER.get_or_init(|| Arc::new(HdrRecorder::default()));
        metrics::set_global_recorder(recorder.clone())
            .map_err(|_| anyhow::anyhow!("another metrics recorder is installed"))?;
        Ok(recorder)
    }

    /// Forgets every value recorded so far (the end of a warm-up).
    pub fn reset(&self) {
        if let Ok(histograms) = self.histograms.lock() {
            for cell in histograms.values() {
                if let Ok(mut h) = cell.0.lock() {
                    h.reset();
                }
            }
        }
    }

    /// The percentiles of histogram `name` (with label `label = value` when given), or `None`
    /// when nothing was recorded.
    pub fn percentiles(&self, name: &str, label: Option<(&str, &str)>) -> Option<Percentiles> {
        let histograms = self.histograms.lock().ok()?;
        let cell = histograms.iter().find_map(|(key, cell)| {
            let labelled = match label {
                None => key.labels().next().is_none(),
                Some((k, v)) => key.labels().any(|l| l.key() == k && l.value() == v),
            };
            (key.name() == name && labelled).then_some(cell)
        })?;
        let h = cell.0.lock().ok()?;
        if h.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        })
    }
}

impl metrics::Recorder for HdrRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let Ok(mut histograms) = self.histograms.lock() else {
            return Histogram::noop();
        };
        if let Some(cell) = histograms.get(key) {
            return Histogram::from_arc(cell.clone());
        }
        let Ok(hdr) = Hdr::new_with_bounds(1, 3_600_000_000, 3) else {
            return Histogram::noop();
        };
        let cell = Arc::new(Cell(Mutex::new(hdr)));
        histograms.insert(key.clone(), cell.clone());
        Histogram::from_arc(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder;

    #[test]
    fn percentiles_come_from_every_recorded_value_and_reset_forgets_them() {
        let recorder = HdrRecorder::default();
        let key = Key::from_parts(
            "latency_seconds",
            vec![metrics::Label::new("function", "twin")],
        );
        let metadata = Metadata::new("t", metrics::Level::INFO, None);
        let h = recorder.register_histogram(&key, &metadata);
        for ms in 1..=100 {
            h.record(f64::from(ms) / 1000.0);
        }
        let p = recorder
            .percentiles("latency_seconds", Some(("function", "twin")))
            .unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.1, "{p:?}");
        assert!(recorder.percentiles("latency_seconds", None).is_none());
        assert!(recorder
            .percentiles("latency_seconds", Some(("function", "shadow")))
            .is_none());
        recorder.reset();
        assert!(recorder
            .percentiles("latency_seconds", Some(("function", "twin")))
            .is_none());
    }
}
