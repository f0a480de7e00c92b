//! Micro-benchmarks of the domain core: the ODTE engine and the parsing of the functions'
//! inputs. `cargo bench -p entwine-core`; figures in BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use entwine_core::input::parse_object;
use entwine_core::odte::{OdteConfig, WindowStats};
use entwine_core::state::{PendingDigitalState, PhysicalEvent};

const NOW: i64 = 1_700_000_000_000;

/// The ODTE arithmetic alone: what the twin handler does once the store has counted the window.
fn evaluate(c: &mut Criterion) {
    let config = OdteConfig::seed_default();
    c.bench_function("odte/evaluate", |b| {
        b.iter(|| {
            config.evaluate(black_box(WindowStats {
                states: 6,
                timely: 5,
            }))
        })
    });
}

/// The in-memory reference window count, against the window length (6 → 3,000 states).
fn window(c: &mut Criterion) {
    let mut group = c.benchmark_group("odte/window_of_states");
    for states in [6usize, 60, 600, 3000] {
        // One state per 10 ms, all inside a window sized to hold them.
        let config = OdteConfig::new(100.0, states as f64 / 100.0, 1.0, 0.9).expect("valid");
        let history: Vec<(i64, i64)> = (0..states as i64)
            .map(|i| (NOW - i * 10, NOW - i * 10 - 40))
            .collect();
        group.throughput(Throughput::Elements(states as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(states),
            &history,
            |b, history| {
                b.iter(|| {
                    let stats = WindowStats::of(&config, NOW, history.iter().copied());
                    config.evaluate(black_box(stats))
                })
            },
        );
    }
    group.finish();
}

/// Parsing the two inputs on the hot path: a device payload and a pending digital state.
fn parsing(c: &mut Criterion) {
    let payload = br#"{"timestamp":1699999999960,"type":"iot.sensor.state.aggregated","data":{"iot.sensor.energy":3.71,"iot.sensor.temperature":27.42},"device_id":"iiot-device-1"}"#;
    let pending = br#"{"id":42,"physicalstate_id":42,"device_id":"iiot-device-1","timestamp":1700000000000,"temperature":27.42,"energy":3.71}"#;
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("physical_event", |b| {
        b.iter(|| {
            let map = parse_object(black_box(payload)).expect("valid JSON");
            PhysicalEvent::from_json(&map, NOW, &entwine_core::model::ModelSet::default())
                .expect("valid event")
        })
    });
    group.throughput(Throughput::Bytes(pending.len() as u64));
    group.bench_function("pending_digital_state", |b| {
        b.iter(|| {
            let map = parse_object(black_box(pending)).expect("valid JSON");
            PendingDigitalState::from_json(&map, NOW).expect("valid state")
        })
    });
    group.finish();
}

criterion_group!(benches, evaluate, window, parsing);
criterion_main!(benches);
