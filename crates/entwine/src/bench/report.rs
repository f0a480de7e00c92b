//! What a bench measured: the figures of each run, the machine, the processes' CPU and memory
//! (read from `/proc`), the table a person reads and the JSON a script reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::recorder::Percentiles;

/// Everything one `entwine bench` invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// The full-chain runs, in order.
    pub runs: Vec<RunReport>,
    /// The ODTE computation's cost against the window length, when asked for.
    pub window_curve: Vec<WindowPoint>,
}

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `/proc/cpuinfo`'s model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// The entwine version.
    pub entwine: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        use procfs::Current;
        let cpu_model = procfs::CpuInfo::current()
            .ok()
            .and_then(|info| info.model_name(0).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned()),
            entwine: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// One full-chain run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `embedded` or `services`.
    pub scenario: String,
    /// `fixed` or `saturation`.
    pub mode: String,
    /// Devices publishing.
    pub devices: usize,
    /// Messages per second per device (fixed mode).
    pub rate_per_device: Option<f64>,
    /// Messages per second offered in all (fixed mode).
    pub offered_per_s: Option<f64>,
    /// Messages published and not yet mirrored, at most (saturation mode).
    pub in_flight: Option<u64>,
    /// Seconds measured, after the warm-up.
    pub measured_s: f64,
    /// Seconds of warm-up, not measured.
    pub warmup_s: f64,
    /// The connector's `--max-batch`: most events in one call of a function (1: never batched).
    pub max_batch: usize,
    /// The batches the connector sent the first function while measured (the largest: over
    /// the whole run).
    pub batches: Batches,
    /// Events per second mirrored (digital state stored with its ODTE) while measured.
    pub throughput_per_s: f64,
    /// Messages the devices published over the whole run.
    pub published: u64,
    /// Of them, acknowledged by the broker.
    pub acknowledged: u64,
    /// Digital states of the bench's devices announced by the digital-event handler.
    pub mirrored: u64,
    /// The store's rows of the bench's devices after the run.
    pub stored: entwine_store::Tally,
    /// Acknowledged events that have no evaluated digital state: must be 0.
    pub lost: u64,
    /// Rows beyond one per published event (physical or digital): must be 0.
    pub duplicated: u64,
    /// Messages delivered more than once and answered from the store (idempotent
    /// redeliveries, not duplicates).
    pub redelivered: u64,
    /// From the device's timestamp to its digital state stored with its ODTE.
    pub latency: Option<Percentiles>,
    /// Each function's own time (HTTP request in, answer out).
    pub functions: BTreeMap<String, Percentiles>,
    /// The connector's whole chain of four calls, from the message's arrival.
    pub chain: Option<Percentiles>,
    /// Twins after the run.
    pub twins: usize,
    /// Of them, `entangled`.
    pub entangled: usize,
    /// CPU while measured.
    pub cpu: Cpu,
    /// Peak resident memory of the bench process over the run (platform, devices and bench), MiB.
    pub peak_rss_mib: f64,
}

/// The batches the connector sent the first function (the physical-event handler): calls, a
/// batch of one included, and the events in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Batches {
    /// Calls of the first function.
    pub count: u64,
    /// Events in them.
    pub events: u64,
    /// Events per call on average (0 without calls).
    pub mean_events: f64,
    /// Events in the largest call.
    pub largest: u64,
}

impl Batches {
    /// The batches a connector has sent so far.
    pub fn of(stats: &entwine_connector::ConnectorStats) -> Self {
        use std::sync::atomic::Ordering;
        Self::new(
            stats.batches.load(Ordering::Relaxed),
            stats.batched_events.load(Ordering::Relaxed),
            stats.largest_batch.load(Ordering::Relaxed),
        )
    }

    /// `count` calls holding `events` in all, the largest `largest` events.
    pub fn new(count: u64, events: u64, largest: u64) -> Self {
        Self {
            count,
            events,
            mean_events: if count == 0 {
                0.0
            } else {
                events as f64 / count as f64
            },
            largest,
        }
    }

    /// The calls after `earlier` (a snapshot of the same connector); the largest is
    /// `largest`'s, since a maximum cannot be taken apart.
    pub fn since(earlier: &Self, later: &Self, largest: u64) -> Self {
        Self::new(
            later.count.saturating_sub(earlier.count),
            later.events.saturating_sub(earlier.events),
            largest,
        )
    }

    /// `120 batches, mean 12.50 events, largest 64`, or `no batches`.
    pub fn summary(&self) -> String {
        if self.count == 0 {
            return "no batches".to_owned();
        }
        format!(
            "{} batch{}, mean {:.2} events, largest {}",
            self.count,
            if self.count == 1 { "" } else { "es" },
            self.mean_events,
            self.largest
        )
    }
}

/// CPU spent while measured, in CPU seconds and per mirrored event.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    /// This process: devices, broker (embedded), connector, functions, store (SQLite).
    pub entwine_s: f64,
    /// PostgreSQL's processes (services scenario).
    pub postgres_s: f64,
    /// Mosquitto (services scenario).
    pub mosquitto_s: f64,
    /// This process, per mirrored event, µs.
    pub entwine_us_per_event: f64,
    /// PostgreSQL per mirrored event, µs.
    pub postgres_us_per_event: f64,
    /// Mosquitto per mirrored event, µs.
    pub mosquitto_us_per_event: f64,
}

/// The ODTE computation's cost for one window length.
#[derive(Debug, Clone, Serialize)]
pub struct WindowPoint {
    /// The store: `sqlite` or `postgres`.
    pub backend: String,
    /// Digital states in each evaluated window.
    pub window_events: usize,
    /// Evaluations timed.
    pub evaluations: usize,
    /// Mean cost of one evaluation (the twin-handler's store work: the window query and the
    /// update), µs.
    pub mean_us: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Mean cost relative to the shortest window of the curve.
    pub relative_to_shortest: f64,
}

/// CPU ticks of processes, read from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// This process.
    pub entwine: f64,
    /// Every `postgres` process.
    pub postgres: f64,
    /// Every `mosquitto` process.
    pub mosquitto: f64,
}

impl CpuSample {
    /// CPU seconds so far of this process, and of every `postgres` and `mosquitto` process.
    pub fn now() -> Self {
        let mut sample = Self {
            entwine: procfs::process::Process::myself()
                .and_then(|me| me.stat())
                .map_or(0.0, |stat| cpu_seconds(&stat)),
            ..Self::default()
        };
        // A process may end between the listing and the reading: it is skipped.
        let processes = procfs::process::all_processes().into_iter().flatten();
        for stat in processes.flatten().filter_map(|p| p.stat().ok()) {
            let slot = match stat.comm.as_str() {
                "postgres" => &mut sample.postgres,
                "mosquitto" => &mut sample.mosquitto,
                _ => continue,
            };
            *slot += cpu_seconds(&stat);
        }
        sample
    }

    /// The CPU spent between `self` and `later`, per event too.
    pub fn until(&self, later: &Self, events: u64) -> Cpu {
        let per = |s: f64| {
            if events == 0 {
                0.0
            } else {
                s * 1e6 / events as f64
            }
        };
        let (e, p, m) = (
            later.entwine - self.entwine,
            later.postgres - self.postgres,
            later.mosquitto - self.mosquitto,
        );
        Cpu {
            entwine_s: e,
            postgres_s: p,
            mosquitto_s: m,
            entwine_us_per_event: per(e),
            postgres_us_per_event: per(p),
            mosquitto_us_per_event: per(m),
        }
    }
}

/// User + system CPU seconds of a process, from its `/proc/<pid>/stat`.
fn cpu_seconds(stat: &procfs::process::Stat) -> f64 {
    (stat.utime + stat.stime) as f64 / procfs::ticks_per_second().max(1) as f64
}

/// Starts a new peak of this process's resident memory (Linux: `clear_refs` 5 resets VmHWM).
pub fn reset_peak_rss() {
    if let Ok(me) = procfs::process::Process::myself() {
        let _ = me.clear_refs(procfs::process::ClearRefs::PeakRSS);
    }
}

/// This process's peak resident memory since the last reset, MiB.
pub fn peak_rss_mib() -> f64 {
    procfs::process::Process::myself()
        .and_then(|me| me.status())
        .ok()
        .and_then(|status| status.vmhwm)
        .map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn ms(p: Option<&Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "{:>8.2} {:>8.2} {:>8.2} {:>9.2}",
            p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        ),
        None => format!("{:>8} {:>8} {:>8} {:>9}", "–", "–", "–", "–"),
    }
}

impl Report {
    /// The human-readable tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine: {} × {}, Linux {}, entwine {}",
            m.cpus, m.cpu_model, m.kernel, m.entwine
        );
        for run in &self.runs {
            let load = match (run.rate_per_device, run.offered_per_s, run.in_flight) {
                (Some(rate), Some(offered), _) => format!(
                    "{} devices × {rate} msg/s = {offered:.0} events/s offered",
                    run.devices
                ),
                (_, _, Some(in_flight)) => format!(
                    "{} devices, saturation ({in_flight} events in flight at most)",
                    run.devices
                ),
                _ => format!("{} devices", run.devices),
            };
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{} / {}: {load}; --max-batch {}; {:.0} s measured after {:.0} s warm-up",
                run.scenario, run.mode, run.max_batch, run.measured_s, run.warmup_s
            );
            let _ = writeln!(
                out,
                "  throughput    {:.1} events/s mirrored",
                run.throughput_per_s
            );
            let _ = writeln!(
                out,
                "  events        {} published, {} acknowledged by the broker, {} mirrored; lost {}, duplicated {}, redelivered {}",
                run.published, run.acknowledged, run.mirrored, run.lost, run.duplicated, run.redelivered
            );
            let _ = writeln!(
                out,
                "  batches       {} (counted while measured, the largest over the whole run)",
                run.batches.summary()
            );
            let _ = writeln!(
                out,
                "  twins         {} of {} entangled at the end",
                run.entangled, run.twins
            );
            let _ = writeln!(
                out,
                "  latency (ms)                      p50      p90      p99       max"
            );
            let _ = writeln!(
                out,
                "    device → twin stored      {}",
                ms(run.latency.as_ref())
            );
            let _ = writeln!(
                out,
                "    connector chain           {}",
                ms(run.chain.as_ref())
            );
            for (name, p) in &run.functions {
                let _ = writeln!(out, "    {name:<25} {}", ms(Some(p)));
            }
            let c = &run.cpu;
            let _ = write!(
                out,
                "  CPU           entwine {:.2} s ({:.0} µs/event)",
                c.entwine_s, c.entwine_us_per_event
            );
            if run.scenario == "services" {
                let _ = write!(
                    out,
                    ", PostgreSQL {:.2} s ({:.0} µs/event), Mosquitto {:.2} s ({:.0} µs/event)",
                    c.postgres_s, c.postgres_us_per_event, c.mosquitto_s, c.mosquitto_us_per_event
                );
            }
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  memory        {:.1} MiB peak resident (this process)",
                run.peak_rss_mib
            );
        }
        if !self.window_curve.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "ODTE evaluation cost against the window (twin-handler store work per event)"
            );
            let _ = writeln!(
                out,
                "  backend   window events   mean µs    p50 µs    p99 µs   × shortest"
            );
            for p in &self.window_curve {
                let _ = writeln!(
                    out,
                    "  {:<9} {:>13} {:>9.1} {:>9.1} {:>9.1} {:>11.2}",
                    p.backend,
                    p.window_events,
                    p.mean_us,
                    p.p50_us,
                    p.p99_us,
                    p.relative_to_shortest
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saturation run as `entwine bench --mode saturation --devices 1000 --in-flight 500
    /// --max-batch 64 --duration 10 --warmup 3` reports it, with the given batches.
    fn saturation_run(batches: Batches) -> RunReport {
        let p = Percentiles {
            count: 1500,
            p50_ms: 1.5,
            p90_ms: 2.25,
            p99_ms: 4.0,
            max_ms: 12.5,
        };
        RunReport {
            scenario: "embedded".into(),
            mode: "saturation".into(),
            devices: 1000,
            rate_per_device: None,
            offered_per_s: None,
            in_flight: Some(500),
            measured_s: 10.0,
            warmup_s: 3.0,
            max_batch: 64,
            batches,
            throughput_per_s: 150.0,
            published: 1950,
            acknowledged: 1950,
            mirrored: 1950,
            stored: entwine_store::Tally {
                physical: 1950,
                events: 1950,
                digital: 1950,
                evaluated: 1950,
            },
            lost: 0,
            duplicated: 0,
            redelivered: 0,
            latency: Some(p),
            functions: BTreeMap::from([("twin-handler".to_owned(), p)]),
            chain: None,
            twins: 1000,
            entangled: 990,
            cpu: Cpu {
                entwine_s: 1.5,
                entwine_us_per_event: 1000.0,
                ..Cpu::default()
            },
            peak_rss_mib: 42.0,
        }
    }

    fn report_of(run: RunReport) -> Report {
        Report {
            machine: Machine {
                cpus: 2,
                cpu_model: "Test CPU".into(),
                kernel: "6.18".into(),
                entwine: "0.1.0".into(),
            },
            runs: vec![run],
            window_curve: Vec::new(),
        }
    }

    #[test]
    fn the_report_shows_max_batch_in_its_header_and_the_batches_seen() {
        let batches = Batches::new(120, 1500, 64);
        assert_eq!(batches.mean_events, 12.5);
        let table = report_of(saturation_run(batches)).table();
        assert_eq!(
            table,
            "machine: 2 × Test CPU, Linux 6.18, entwine 0.1.0\n\
             \n\
             embedded / saturation: 1000 devices, saturation (500 events in flight at most); \
             --max-batch 64; 10 s measured after 3 s warm-up\n\
             \x20 throughput    150.0 events/s mirrored\n\
             \x20 events        1950 published, 1950 acknowledged by the broker, 1950 mirrored; \
             lost 0, duplicated 0, redelivered 0\n\
             \x20 batches       120 batches, mean 12.50 events, largest 64 (counted while \
             measured, the largest over the whole run)\n\
             \x20 twins         990 of 1000 entangled at the end\n\
             \x20 latency (ms)                      p50      p90      p99       max\n\
             \x20   device → twin stored          1.50     2.25     4.00     12.50\n\
             \x20   connector chain                  –        –        –         –\n\
             \x20   twin-handler                  1.50     2.25     4.00     12.50\n\
             \x20 CPU           entwine 1.50 s (1000 µs/event)\n\
             \x20 memory        42.0 MiB peak resident (this process)\n"
        );
    }

    #[test]
    fn batches_are_counted_between_two_snapshots_and_written_to_the_json() {
        let earlier = Batches::new(10, 40, 8);
        let later = Batches::new(130, 1540, 60);
        let measured = Batches::since(&earlier, &later, 64);
        assert_eq!(measured, Batches::new(120, 1500, 64));
        assert_eq!(
            Batches::new(1, 1, 1).summary(),
            "1 batch, mean 1.00 events, largest 1"
        );
        assert_eq!(Batches::new(0, 0, 0).summary(), "no batches");
        assert_eq!(Batches::new(0, 0, 0).mean_events, 0.0);

        let json = serde_json::to_value(saturation_run(measured)).unwrap();
        assert_eq!(json["max_batch"], 64);
        assert_eq!(
            json["batches"],
            serde_json::json!({"count": 120, "events": 1500, "mean_events": 12.5, "largest": 64})
        );
    }

    #[test]
    fn batches_are_read_from_the_connectors_counters() {
        use std::sync::atomic::Ordering;
        let stats = entwine_connector::ConnectorStats::default();
        stats.batches.store(3, Ordering::Relaxed);
        stats.batched_events.store(7, Ordering::Relaxed);
        stats.largest_batch.store(4, Ordering::Relaxed);
        let batches = Batches::of(&stats);
        assert_eq!(batches, Batches::new(3, 7, 4));
        assert_eq!(batches.summary(), "3 batches, mean 2.33 events, largest 4");
    }

    #[test]
    fn cpu_seconds_reads_utime_and_stime_after_a_command_with_spaces() {
        use procfs::FromRead;
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
        // stime, then the 22 fields up to cnswap (procfs reads them all).
        let line = "42 (tokio rt (1)) S 1 42 42 0 -1 4194560 10 0 0 0 250 50 \
                    0 0 20 0 1 0 100 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0";
        let stat = procfs::process::Stat::from_read(line.as_bytes()).unwrap();
        assert_eq!(stat.comm, "tokio rt (1)");
        assert_eq!(procfs::ticks_per_second(), 100, "USER_HZ on Linux");
        assert_eq!(cpu_seconds(&stat), 3.0);
        assert!(peak_rss_mib() > 0.0, "this process has a resident set");
    }
}
