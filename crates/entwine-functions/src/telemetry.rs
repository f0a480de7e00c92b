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
