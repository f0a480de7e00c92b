//! Flags and dispatch.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use entwine_core::odte::OdteConfig;
use entwine_store::{Store, StoreOptions};

/// Digital twins of industrial IoT devices, built from serverless functions, that measure how
/// faithfully each twin mirrors its device (ODTE = availability × reliability × timeliness).
#[derive(Debug, Parser)]
#[command(name = "entwine", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole platform on this machine: store, MQTT broker, the four functions behind a
    /// local router, the twins API, emulated devices and the connector.
    Up(UpArgs),
    /// Print a table of the twins, from a running platform's API or from the store.
    Status(crate::status::StatusArgs),
    /// Create or upgrade the store's tables (safe to repeat and to run concurrently; upgrades a
    /// database created with the seed system's SQL in place).
    Migrate(DatabaseArgs),
    /// Emulate an IIoT device (or a fleet of them) configured by the seed's `device_conf.yaml`.
    Device(crate::physical::DeviceArgs),
    /// Chain the four function routes for each device message taken from the broker.
    Connector(crate::physical::ConnectorArgs),
    /// Measure the full chain on this machine: events/s, latency percentiles from the device to
    /// its twin, losses, CPU and memory; scaling curves; a table and a JSON file.
    Bench(crate::bench::BenchArgs),
    /// Run a scripted scenario (faults on and off, rate changes, silent devices) on the local
    /// platform and write every twin's ODTE over time as CSV and an SVG plot.
    Experiment(crate::experiment::ExperimentArgs),
}

/// Where the store is.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// The store: `sqlite://PATH` (created when missing) or `postgres://user:pass@host:port/db`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://entwine.db")]
    pub database_url: String,
}

/// Flags of `entwine up`. Every address whose port is taken is replaced by a free port, printed.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    /// The store.
    pub database: DatabaseArgs,
    /// Where the functions, the twins API and /metrics listen.
    #[arg(long, env = "ENTWINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// An existing MQTT broker (`host:port`); without it an embedded broker is started.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// Where the embedded broker listens.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Number of emulated devices (0 for none).
    #[arg(long, default_value_t = 5)]
    pub devices: usize,
    /// Device ids are `<prefix>-1` … `<prefix>-N`.
    #[arg(long, default_value = "iiot-device")]
    pub device_prefix: String,
    /// Aggregated messages per second of each device (the seed's aggregatedTelemetryMsgSec).
    #[arg(long, default_value_t = 0.2)]
    pub device_rate: f64,
    /// Sensor update period of each device, ms (the seed's updatePeriodMs).
    #[arg(long, default_value_t = 5000)]
    pub update_period_ms: u64,
    /// Delay before a device's first message, ms (the seed's updateInitialDelayMs).
    #[arg(long, default_value_t = 2000)]
    pub update_initial_delay_ms: u64,
    /// Where the devices' HTTP API (GET/PUT /conf) listens.
    #[arg(long, default_value = "127.0.0.1:5555")]
    pub device_api: SocketAddr,
    /// Topic filters the connector takes (default `device/+/telemetry/device_state`); narrow
    /// them when sharing a broker with other platforms.
    #[arg(long, num_args = 1..)]
    pub topic: Vec<String>,
    /// Client id of the connector's persistent MQTT session.
    #[arg(long, default_value = "entwine-up")]
    pub connector_client_id: String,
    /// The connector's acknowledgement order (see `entwine connector --help`); the embedded
    /// broker requires `arrival`, which `auto` picks for it.
    #[arg(long, value_enum, default_value = "auto")]
    pub ack_order: crate::physical::AckOrderArg,
    /// Run no connector (when connectors run as processes of their own: `entwine connector`).
    #[arg(long)]
    pub no_connector: bool,
    /// Publish no digital events (by default each digital state and each lifecycle change go
    /// to the platform's broker).
    #[arg(long)]
    pub no_digital_events: bool,
    /// Topic of digital states; `{device_id}` names the device.
    #[arg(long, default_value = entwine_functions::publisher::DEFAULT_STATE_TOPIC)]
    pub digital_state_topic: String,
    /// Topic of lifecycle changes; `{device_id}` names the device.
    #[arg(long, default_value = entwine_functions::publisher::DEFAULT_LIFECYCLE_TOPIC)]
    pub digital_lifecycle_topic: String,
    /// How often the twin evaluator re-evaluates every twin, seconds, 0.01 to 3600 (default: a
    /// sixth of the window, between 0.5 and 10 s).
    #[arg(long, value_parser = evaluator_period)]
    pub evaluator_period: Option<f64>,
    #[command(flatten)]
    /// The ODTE configuration.
    pub odte: OdteArgs,
}

/// The ODTE configuration, with the seed's `odte` ConfigMap as defaults.
#[derive(Debug, Args)]
pub struct OdteArgs {
    /// Updates per second a device is expected to send.
    #[arg(
        long,
        env = "ENTWINE_ODTE__EXPECTED_UPDATE_RATE",
        default_value_t = 0.2
    )]
    pub expected_update_rate: f64,
    /// Length of the ODTE window, in seconds.
    #[arg(long, env = "ENTWINE_ODTE__TIME_WINDOW", default_value_t = 30.0)]
    pub time_window: f64,
    /// How soon (seconds) after the device measured its twin must mirror it.
    #[arg(long, env = "ENTWINE_ODTE__DESIRED_TIMELINESS", default_value_t = 1.0)]
    pub desired_timeliness: f64,
    /// ODTE at or above which a twin is `entangled`.
    #[arg(long, env = "ENTWINE_ODTE__THRESHOLD", default_value_t = 0.9)]
    pub threshold: f64,
    /// Measure availability: time in gaps between twin updates longer than this many seconds is
    /// unavailable (without it availability is the seed's constant 1).
    #[arg(long, env = "ENTWINE_ODTE__AVAILABILITY_MAX_GAP")]
    pub availability_max_gap: Option<f64>,
    /// Seconds without an update after which a twin is unbound (default: twice the window).
    #[arg(long, env = "ENTWINE_ODTE__SILENCE_THRESHOLD")]
    pub silence_threshold: Option<f64>,
}

impl OdteArgs {
    /// The validated configuration.
    pub fn config(&self) -> anyhow::Result<OdteConfig> {
        OdteConfig::new(
            self.expected_update_rate,
            self.time_window,
            self.desired_timeliness,
            self.threshold,
        )
        .and_then(|c| c.with_availability_max_gap(self.availability_max_gap))
        .and_then(|c| c.with_silence_threshold(self.silence_threshold))
        .context("invalid ODTE configuration")
    }
}

/// A number of seconds within `min..=max`, for a flag's value parser: refused when the flags
/// are parsed (exit code 2, naming the flag), before anything starts.
pub fn seconds_within(raw: &str, min: f64, max: f64) -> Result<f64, String> {
    let value: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds"))?;
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{raw} is outside {min}..={max} seconds"))
    }
}

/// `--evaluator-period`: 0.01 s to an hour. Shorter would be a busy loop (and under 1 ns
/// tokio's timer refuses it); longer, twins would wait hours to be noticed silent.
pub fn evaluator_period(raw: &str) -> Result<f64, String> {
    seconds_within(raw, 0.01, 3600.0)
}

/// Runs a parsed command line until it is done (or, for `up`, until SIGINT/SIGTERM).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(args) => migrate(&args).await,
        Command::Up(args) => {
            crate::local::up(&args, entwine_functions::fission::shutdown_signal()).await
        }
        Command::Status(args) => crate::status::status(&args).await,
        Command::Device(args) => crate::physical::device(args).await,
        Command::Connector(args) => crate::physical::connector(args).await,
        Command::Bench(args) => crate::bench::bench(&args).await,
        Command::Experiment(args) => crate::experiment::experiment(&args).await,
    }
}

/// Opens the store named by `args` and applies the migrations.
pub async fn open_migrated(args: &DatabaseArgs) -> anyhow::Result<Store> {
    let store = Store::open(&args.database_url, &StoreOptions::default())?;
    store
        .migrate()
        .await
        .with_context(|| format!("cannot migrate the {} store", store.backend()))?;
    Ok(store)
}

async fn migrate(args: &DatabaseArgs) -> anyhow::Result<()> {
    let store = open_migrated(args).await?;
    println!("{} store migrated", store.backend());
    store.close().await;
    Ok(())
}
