//! Flags and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use entwine_config::{Environment, Flags, Loaded, Sources, DEFAULT_DATABASE_URL};
use entwine_core::odte::OdteConfig;
use entwine_store::{Store, StoreOptions};
use secrecy::ExposeSecret;

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
// Parsed once per process: boxing `up`'s flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole platform on this machine: store, MQTT broker, the four functions behind a
    /// local router, the twins API, emulated devices and the connector.
    Up(UpArgs),
    /// Print a table of the twins, from a running platform's API or from the store.
    Status(crate::status::StatusArgs),
    /// Serve the twins API, the live stream, the dashboard and /metrics from a store the
    /// functions write (the twins service of a cluster), live updates from their digital events
    /// on the broker; no functions, connector or devices.
    Serve(crate::serve::ServeArgs),
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
    /// Print the effective configuration (YAML or TOML), each value with its source (default,
    /// file, Fission mount, variable, flag), passwords redacted; exit 2 when it is invalid.
    Config(crate::config_cmd::ConfigArgs),
    /// Run a scripted scenario (faults on and off, rate changes, silent devices) on the local
    /// platform and write every twin's ODTE over time as CSV and an SVG plot.
    Experiment(crate::experiment::ExperimentArgs),
}

/// Where the store is and its pool. Each flag overrides the typed configuration
/// (`entwine_config`: defaults < `--config` file or Fission ConfigMap mounts < Secret mounts <
/// `ENTWINE_*`/`DATABASE_URL` < flags); none has a default of its own.
#[derive(Debug, Clone, Default, Args)]
pub struct DatabaseArgs {
    /// The store: `sqlite://PATH` (created when missing) or `postgres://user:pass@host:port/db`
    /// [default: `database.url` (`DATABASE_URL`), else the `postgres` keys
    /// (`ENTWINE_POSTGRES__HOST`, …), else sqlite://entwine.db].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Most connections of the store's pool [default: `database.max_connections`, 8].
    #[arg(long, value_name = "N")]
    pub database_max_connections: Option<u32>,
    /// Seconds a call waits for a pooled connection [default: `database.acquire_timeout`, 5].
    #[arg(long, value_name = "SECONDS")]
    pub database_acquire_timeout: Option<f64>,
    /// A configuration file, YAML (`.yaml`, `.yml`) or TOML (`.toml`) [default: `ENTWINE_CONFIG`].
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DatabaseArgs {
    /// Arguments that name the store by URL, as `--database-url URL` would.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            database_url: Some(url.into()),
            ..Self::default()
        }
    }

    pub(crate) fn flags(&self, flags: &mut Flags) {
        flags
            .set("database.url", "--database-url", self.database_url.clone())
            .set(
                "database.max_connections",
                "--database-max-connections",
                self.database_max_connections,
            )
            .set(
                "database.acquire_timeout",
                "--database-acquire-timeout",
                self.database_acquire_timeout,
            );
    }

    /// The typed configuration with these flags (and `odte`'s) on top.
    pub fn load(&self, odte: Option<&OdteArgs>) -> anyhow::Result<Loaded> {
        let mut flags = Flags::default();
        self.flags(&mut flags);
        if let Some(odte) = odte {
            odte.flags(&mut flags);
        }
        load_config(self.config.clone(), flags)
    }

    /// Where the store is, as a URL: `--database-url`, else the typed configuration's
    /// `database.url`, else a URL of its `postgres` keys, else `sqlite://entwine.db`.
    pub fn url(&self) -> anyhow::Result<String> {
        let url = self.load(None)?.database_url(Some(DEFAULT_DATABASE_URL))?;
        Ok(url.expose_secret().to_owned())
    }

    /// The store's pool options (`--database-max-connections`, `database.max_connections`, …).
    pub fn store_options(&self) -> anyhow::Result<StoreOptions> {
        Ok(self.load(None)?.store_options()?)
    }

    /// Where the store is, for printing (no password).
    pub fn redacted_url(&self) -> String {
        match self
            .load(None)
            .and_then(|l| Ok(l.database(Some(DEFAULT_DATABASE_URL))?))
        {
            Ok(target) => target.redacted(),
            Err(_) => self
                .database_url
                .as_deref()
                .map_or_else(|| "?".into(), entwine_config::redact_url),
        }
    }
}

/// How an MQTT client logs in and encrypts: flags over the typed configuration's `mqtt`
/// section (`ENTWINE_MQTT__*`, the Secret files `mqtt/username`, `mqtt/password`, a `--config`
/// file). No password flag: a command line is visible to every user of the machine.
#[derive(Debug, Clone, Default, Args)]
pub struct MqttArgs {
    /// MQTT user name [default: `mqtt.username`].
    #[arg(long, value_name = "NAME")]
    pub mqtt_username: Option<String>,
    /// A file holding the MQTT password (one trailing line break is dropped)
    /// [default: `mqtt.password`].
    #[arg(long, value_name = "FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// PEM CA certificates to verify the broker by; turns TLS on (`mqtts://` turns it on
    /// with the system's roots) [default: `mqtt.ca_file`].
    #[arg(long, value_name = "FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `--mqtt-key-file` [default: `mqtt.cert_file`].
    #[arg(long, value_name = "FILE")]
    pub mqtt_cert_file: Option<PathBuf>,
    /// PEM private key of `--mqtt-cert-file` [default: `mqtt.key_file`].
    #[arg(long, value_name = "FILE")]
    pub mqtt_key_file: Option<PathBuf>,
}

/// Where device models come from, and which to emulate.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// A directory of device model files, one `*.json` WoT Thing Model each (docs/MODELS.md)
    /// [default: `models.dir`; on Fission the `device-models` ConfigMap].
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
}

impl ModelArgs {
    /// Puts the flag given into `flags`.
    pub fn flags(&self, flags: &mut Flags) {
        flags.set(
            "models.dir",
            "--models",
            self.models.as_ref().map(|p| p.display().to_string()),
        );
    }
}

/// `MODEL=COUNT` of `--fleet`: how many devices of a model to emulate.
pub fn fleet_group(raw: &str) -> Result<(String, usize), String> {
    let (model, count) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?} is not MODEL=COUNT (e.g. vibration-sensor=3)"))?;
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("{count:?} in {raw:?} is not a number of devices"))?;
    if model.trim().is_empty() {
        return Err(format!("{raw:?} names no model"));
    }
    Ok((model.trim().to_owned(), count))
}

impl MqttArgs {
    /// Puts the flags given into `flags`.
    pub fn flags(&self, flags: &mut Flags) -> anyhow::Result<()> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let password = match &self.mqtt_password_file {
            Some(file) => {
                let text = std::fs::read_to_string(file).with_context(|| {
                    format!("--mqtt-password-file {}: cannot read it", file.display())
                })?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                Some(text.strip_suffix('\r').unwrap_or(text).to_owned())
            }
            None => None,
        };
        flags
            .set(
                "mqtt.username",
                "--mqtt-username",
                self.mqtt_username.clone(),
            )
            .set("mqtt.password", "--mqtt-password-file", password)
            .set("mqtt.ca_file", "--mqtt-ca-file", path(&self.mqtt_ca_file))
            .set(
                "mqtt.cert_file",
                "--mqtt-cert-file",
                path(&self.mqtt_cert_file),
            )
            .set(
                "mqtt.key_file",
                "--mqtt-key-file",
                path(&self.mqtt_key_file),
            );
        Ok(())
    }
}

impl UpArgs {
    /// The typed configuration with the store, ODTE and MQTT flags on top.
    pub(crate) fn load(&self) -> anyhow::Result<Loaded> {
        let mut flags = Flags::default();
        self.database.flags(&mut flags);
        self.odte.flags(&mut flags);
        self.mqtt.flags(&mut flags)?;
        self.models.flags(&mut flags);
        load_config(self.database.config.clone(), flags)
    }
}

/// The configuration file of this run: `--config` of the subcommand (see [`run`]).
static CONFIG_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The typed configuration: `file` (else `--config` of this run, else `ENTWINE_CONFIG`), the
/// Fission mounts when present, the environment, then `flags`.
pub(crate) fn load_config(file: Option<PathBuf>, flags: Flags) -> anyhow::Result<Loaded> {
    let env = Environment::from_process();
    let sources = Sources {
        env: &env,
        file: file.or_else(|| CONFIG_FILE.get().cloned()),
        mounts: true,
        flags,
    };
    Ok(entwine_config::load(&sources)?)
}

/// Flags of `entwine up`. Every address whose port is taken is replaced by a free port, printed.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    /// The store.
    pub database: DatabaseArgs,
    /// The MQTT login and TLS files (of the platform's clients; the embedded broker then
    /// accepts only that login).
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Where the functions, the twins API and /metrics listen.
    #[arg(long, env = "ENTWINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// An existing MQTT broker (`host:port`); without it an embedded broker is started.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// Where the embedded broker listens. Beyond loopback it needs `mqtt.username` and
    /// `mqtt.password`, the only login it then accepts.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// PEM certificate of the embedded broker: it then serves MQTT over TLS only, and the
    /// platform's clients verify it with `--mqtt-ca-file` (with `--mqtt-tls-key`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "mqtt_tls_key",
        conflicts_with = "broker_url"
    )]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// PEM private key of `--mqtt-tls-cert`.
    #[arg(long, value_name = "FILE", requires = "mqtt_tls_cert")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// Device models beside the seed's (`--models DIR`).
    #[command(flatten)]
    pub models: ModelArgs,
    /// Emulated devices of a model, `MODEL=COUNT` (repeatable), ids from the model's first
    /// pattern (`vib-*`: `vib-1` …), each at its model's expected rate.
    #[arg(long, value_name = "MODEL=COUNT", value_parser = fleet_group)]
    pub fleet: Vec<(String, usize)>,
    /// Number of emulated devices of the seed's model (0 for none).
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
    /// Have the connector call the functions over HTTP through this process's server, as on a
    /// cluster, instead of in process (slower: for comparing, or checking the HTTP routes).
    #[arg(long)]
    pub http_functions: bool,
    /// Most events the connector sends the functions in one call (a batch: one JSON array per
    /// route, one commit), 1 to 256; 1 sends each event alone [default: the connector's, 64].
    #[arg(long, env = "ENTWINE_MAX_BATCH", value_name = "N", value_parser = max_batch)]
    pub max_batch: Option<usize>,
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

/// The ODTE configuration. Each flag overrides the typed configuration's `odte` section
/// (`ENTWINE_ODTE__*`, a `--config` file, the `odte` ConfigMap), whose defaults are the seed's.
#[derive(Debug, Clone, Default, Args)]
pub struct OdteArgs {
    /// Updates per second a device is expected to send [default: `odte.expected_update_rate`, 0.2].
    #[arg(long)]
    pub expected_update_rate: Option<f64>,
    /// Length of the ODTE window, in seconds [default: `odte.time_window`, 30].
    #[arg(long)]
    pub time_window: Option<f64>,
    /// How soon (seconds) after the device measured its twin must mirror it
    /// [default: `odte.desired_timeliness`, 1].
    #[arg(long)]
    pub desired_timeliness: Option<f64>,
    /// ODTE at or above which a twin is `entangled` [default: `odte.threshold`, 0.9].
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Measure availability: time in gaps between twin updates longer than this many seconds is
    /// unavailable (without it availability is the seed's constant 1).
    #[arg(long)]
    pub availability_max_gap: Option<f64>,
    /// Seconds without an update after which a twin is unbound (default: twice the window).
    #[arg(long)]
    pub silence_threshold: Option<f64>,
}

impl OdteArgs {
    /// Arguments that set every seed key, as the four flags would.
    pub fn with_values(
        expected_update_rate: f64,
        time_window: f64,
        desired_timeliness: f64,
        threshold: f64,
    ) -> Self {
        Self {
            expected_update_rate: Some(expected_update_rate),
            time_window: Some(time_window),
            desired_timeliness: Some(desired_timeliness),
            threshold: Some(threshold),
            ..Self::default()
        }
    }

    fn flags(&self, flags: &mut Flags) {
        flags
            .set(
                "odte.expected_update_rate",
                "--expected-update-rate",
                self.expected_update_rate,
            )
            .set("odte.time_window", "--time-window", self.time_window)
            .set(
                "odte.desired_timeliness",
                "--desired-timeliness",
                self.desired_timeliness,
            )
            .set("odte.threshold", "--threshold", self.threshold)
            .set(
                "odte.availability_max_gap",
                "--availability-max-gap",
                self.availability_max_gap,
            )
            .set(
                "odte.silence_threshold",
                "--silence-threshold",
                self.silence_threshold,
            );
    }

    /// The validated configuration: these flags over the typed configuration.
    pub fn config(&self) -> anyhow::Result<OdteConfig> {
        let mut flags = Flags::default();
        self.flags(&mut flags);
        let loaded = load_config(None, flags)?;
        loaded
            .odte()
            .map_err(anyhow::Error::from)
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

/// `--max-batch`: a whole number of events from 1 (one event per call, as functions that take
/// only objects, such as the seed's, need) to the functions' limit per call
/// ([`entwine_connector::MAX_BATCH`], 256).
pub fn max_batch(raw: &str) -> Result<usize, String> {
    let value: usize = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a whole number of events"))?;
    if value == 0 {
        return Err(
            "a batch holds at least 1 event (1: one event per call, for functions that take \
             only objects, such as the seed's)"
                .to_owned(),
        );
    }
    let most = entwine_connector::MAX_BATCH;
    if value > most {
        return Err(format!(
            "a batch holds at most {most} events, the functions' limit per call"
        ));
    }
    Ok(value)
}

/// The connector's own `max_batch` (what a `None` in
/// [`entwine_platform::ConnectorSettings::max_batch`] means), for printing.
pub fn default_max_batch() -> Option<usize> {
    entwine_connector::ConnectorConfig::new(
        "127.0.0.1:1883",
        vec!["device/+/telemetry/device_state".to_owned()],
        "127.0.0.1:8080",
    )
    .ok()
    .map(|config| config.max_batch)
}

/// Runs a parsed command line until it is done (or, for `up`, until SIGINT/SIGTERM).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    remember_config_file(&cli.command);
    match cli.command {
        Command::Config(args) => crate::config_cmd::config(&args),
        Command::Migrate(args) => migrate(&args).await,
        Command::Up(args) => {
            crate::local::up(&args, entwine_functions::fission::shutdown_signal()).await
        }
        Command::Status(args) => crate::status::status(&args).await,
        Command::Serve(args) => {
            crate::serve::serve(&args, entwine_functions::fission::shutdown_signal()).await
        }
        Command::Device(args) => crate::physical::device(args).await,
        Command::Connector(args) => crate::physical::connector(args).await,
        Command::Bench(args) => crate::bench::bench(&args).await,
        Command::Experiment(args) => crate::experiment::experiment(&args).await,
    }
}

/// `--config` of the subcommand, for [`OdteArgs::config`] too (it cannot see `DatabaseArgs`).
fn remember_config_file(command: &Command) {
    let file = match command {
        Command::Up(args) => args.database.config.as_ref(),
        Command::Migrate(args) => args.config.as_ref(),
        Command::Config(args) => args.database.config.as_ref(),
        Command::Status(args) => args.config.as_ref(),
        Command::Serve(args) => args.database.config.as_ref(),
        Command::Device(args) => args.settings.as_ref(),
        Command::Connector(args) => args.config.as_ref(),
        Command::Bench(_) | Command::Experiment(_) => None,
    };
    if let Some(file) = file {
        let _ = CONFIG_FILE.set(file.clone());
    }
}

/// Opens the store named by `args` (over the typed configuration: `database.url`, else the
/// `postgres` keys, else `sqlite://entwine.db`; the pool of `database.max_connections`) and
/// applies the migrations.
pub async fn open_migrated(args: &DatabaseArgs) -> anyhow::Result<Store> {
    let loaded = args.load(None)?;
    let options = loaded.store_options()?;
    let store = loaded
        .database(Some(DEFAULT_DATABASE_URL))?
        .open(&options)?;
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    /// `entwine ARGS` parsed, or clap's error message.
    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("entwine").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    /// The `--max-batch` of a parsed command line.
    fn max_batch(args: &[&str]) -> Option<usize> {
        match parse(args).unwrap().command {
            Command::Up(up) => up.max_batch,
            Command::Bench(bench) => bench.max_batch,
            Command::Connector(connector) => connector.max_batch,
            other => panic!("no --max-batch on {other:?}"),
        }
    }

    #[test]
    fn max_batch_is_taken_by_up_bench_and_connector() {
        for command in ["up", "bench", "connector"] {
            assert_eq!(
                max_batch(&[command, "--max-batch", "1"]),
                Some(1),
                "{command}"
            );
            assert_eq!(
                max_batch(&[command, "--max-batch", "256"]),
                Some(256),
                "{command}"
            );
            assert_eq!(
                max_batch(&[command, "--max-batch", " 8 "]),
                Some(8),
                "{command}"
            );
        }
        // Without the flag (and, for `up` and `connector`, without ENTWINE_MAX_BATCH, which
        // the test environment does not set) the connector's default applies.
        assert_eq!(std::env::var_os("ENTWINE_MAX_BATCH"), None);
        for command in ["up", "bench", "connector"] {
            assert_eq!(max_batch(&[command]), None, "{command}");
        }
    }

    #[test]
    fn max_batch_zero_over_256_or_not_a_number_is_refused_naming_the_flag() {
        for command in ["up", "bench", "connector"] {
            let error = parse(&[command, "--max-batch", "0"]).unwrap_err();
            assert_eq!(
                error.lines().next().unwrap(),
                "error: invalid value '0' for '--max-batch <N>': a batch holds at least 1 event \
                 (1: one event per call, for functions that take only objects, such as the seed's)",
                "{command}"
            );
            let error = parse(&[command, "--max-batch", "257"]).unwrap_err();
            assert_eq!(
                error.lines().next().unwrap(),
                "error: invalid value '257' for '--max-batch <N>': a batch holds at most 256 \
                 events, the functions' limit per call",
                "{command}"
            );
            for bad in ["-1", "2.5", "many"] {
                let error = parse(&[command, &format!("--max-batch={bad}")]).unwrap_err();
                assert!(
                    error.starts_with(&format!(
                        "error: invalid value '{bad}' for '--max-batch <N>': \"{bad}\" is not a whole number of events"
                    )),
                    "{command} --max-batch {bad:?}: {error}"
                );
            }
        }
    }

    #[test]
    fn max_batch_of_up_and_connector_comes_from_entwine_max_batch_too() {
        let cli = Cli::command();
        for (command, env) in [
            ("up", Some("ENTWINE_MAX_BATCH")),
            ("connector", Some("ENTWINE_MAX_BATCH")),
            ("bench", None),
        ] {
            let argument = cli
                .find_subcommand(command)
                .unwrap()
                .get_arguments()
                .find(|a| a.get_id() == "max_batch")
                .unwrap();
            assert_eq!(
                argument.get_env().and_then(|e| e.to_str()),
                env,
                "{command}"
            );
        }
    }

    #[test]
    fn the_connector_subcommand_passes_max_batch_to_its_configuration() {
        let config = |args: &[&str]| match parse(args).unwrap().command {
            Command::Connector(connector) => connector.config().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(config(&["connector", "--max-batch", "1"]).max_batch, 1);
        assert_eq!(config(&["connector", "--max-batch", "16"]).max_batch, 16);
        assert_eq!(
            config(&["connector"]).max_batch,
            64,
            "the connector's default"
        );
        assert_eq!(super::default_max_batch(), Some(64));
    }

    #[test]
    fn up_passes_max_batch_to_the_platforms_connector_and_prints_it() {
        for (flags, expected) in [
            (&["up", "--max-batch", "1"][..], Some(1)),
            (&["up", "--max-batch", "32"][..], Some(32)),
            (&["up"][..], None),
        ] {
            let Command::Up(args) = parse(flags).unwrap().command else {
                unreachable!("the flags start with `up`")
            };
            let config = crate::local::platform_config(&args).unwrap();
            assert_eq!(config.connector.unwrap().max_batch, expected, "{flags:?}");
        }
        assert_eq!(crate::local::batch_phrase(Some(1)), "one event per call");
        assert_eq!(
            crate::local::batch_phrase(Some(64)),
            "up to 64 events per call"
        );
    }
}
