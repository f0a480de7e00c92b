//! The ODTE computation's cost against the window length: for each length *n*, one device's
//! states are written 1 ms apart under a window of *n* − 1 ms, so that every evaluation counts
//! exactly *n* states, and the twin-handler's store work (the window query and the update) is
//! timed for each new state.

use std::time::Instant;

use anyhow::Context;
use entwine_core::odte::OdteConfig;
use entwine_core::state::{DeviceId, PhysicalEvent};
use entwine_functions::handlers::{Clock, SystemClock};
use entwine_store::Store;
use indicatif::ProgressBar;

use super::report::WindowPoint;

/// Times `evaluations` evaluations for each window length in `windows` on `store`.
pub(super) async fn curve(
    store: &Store,
    windows: &[usize],
    evaluations: usize,
    show_progress: bool,
) -> anyhow::Result<Vec<WindowPoint>> {
    let evaluations = evaluations.max(1);
    let total: usize = windows.iter().map(|n| n + evaluations).sum();
    let bar = if show_progress {
        ProgressBar::new(total as u64).with_prefix("window curve")
    } else {
        ProgressBar::hidden()
    };
    let mut points: Vec<WindowPoint> = Vec::new();
    for &n in windows {
        let mut costs = point(store, n, evaluations, &bar).await?;
        costs.sort_by(f64::total_cmp);
        let mean = costs.iter().sum::<f64>() / costs.len() as f64;
        let at = |q: f64| costs[((costs.len() - 1) as f64 * q).round() as usize];
        let shortest = points.first().map_or(mean, |p| p.mean_us);
        points.push(WindowPoint {
            backend: store.backend().to_owned(),
            window_events: n,
            evaluations,
            mean_us: mean,
            p50_us: at(0.5),
            p99_us: at(0.99),
            relative_to_shortest: mean / shortest,
        });
    }
    bar.finish_and_clear();
    Ok(points)
}

/// The cost of each of `evaluations` evaluations over windows of `n` states, µs.
async fn point(
    store: &Store,
    n: usize,
    evaluations: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<f64>> {
    let window_ms = (n - 1) as f64;
    let config = OdteConfig::new(
        n as f64 / (window_ms / 1000.0),
        window_ms / 1000.0,
        1.0,
        0.9,
    )
    .context("window curve configuration")?;
    let device = DeviceId::parse(
        "device_id",
        &format!("window{}x{n}x{}", std::process::id(), super::unique()),
    )?;
    let steps = n + evaluations;
    let base = SystemClock.now_ms() - steps as i64 - 10_000;
    let mut costs = Vec::with_capacity(evaluations);
    for i in 0..steps {
        let t = base + i as i64;
        let event = PhysicalEvent {
            device_id: device.clone(),
            device_timestamp: t - 5,
            readings: entwine_core::state::Readings::seed(20.0, 1.0),
        };
        let (physical, _) = store.record_physical_event(&event, t).await?;
        let (pending, _) = store.record_shadow(&physical, t).await?;
        if i >= n {
            let started = Instant::now();
            let (digital, _) = store.evaluate_digital_state_only(&pending, &config).await?;
            costs.push(started.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(
                (digital.reliability - 1.0).abs() < 1e-6,
                "the window of {n} events held fewer states than expected"
            );
        }
        bar.inc(1);
    }
    Ok(costs)
}
