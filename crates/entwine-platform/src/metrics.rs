//! The process's Prometheus recorder, installed once and shared by every platform of the
//! process (a test process runs several) and by the function binaries: it lives in
//! `entwine_functions::telemetry`, which both use.

pub use entwine_functions::telemetry::prometheus;
