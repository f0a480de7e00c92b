//! `entwine bench`: the full chain (emulated devices → MQTT → connector → the four functions →
//! store) driven on this machine, measured from the device's timestamp to the digital state
//! stored with its ODTE.
//!
//! Each run starts a platform of its own in this process (a fresh store and, for the embedded
//! scenario, a fresh broker), warms up, measures, stops the devices, waits until every
//! acknowledged message is mirrored, and counts the store's rows to prove nothing was lost or
//! duplicated. Percentiles come from HDR histograms fed by the pipeline's own metrics.

mod load;
pub mod recorder;
pub mod report;
mod window;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use entwine_device::fleet::Broker;
use entwine_functions::handlers::Function;
use entwine_platform::{
    BrokerSource, ConnectorSettings, EvaluatorPeriod, FunctionsAccess, Platform, PlatformConfig,
    StoreSource,
};
use entwine_store::{Store, StoreOptions};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::cli::OdteArgs;
use load::{LoadStats, Pace, Progress};
use recorder::HdrRecorder;
use report::{Batches, CpuSample, Machine};
pub use report::{Report, RunReport, WindowPoint};

/// Flags of `entwine bench`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Scenarios:
  --scenario embedded     SQLite file and embedded MQTT broker, all in this process (the default)
  --scenario services     PostgreSQL (--database-url: a fresh database is created next to it for
                          each run and dropped afterwards) and Mosquitto (--broker-url)
  --mode fixed            --devices × --rate messages per second (the default)
  --mode saturation       as fast as the platform absorbs: at most --in-flight messages published
                          and not yet mirrored
  --curve devices         one fixed run per --curve-devices count at --rate (default 0.2 msg/s):
                          throughput and p99 against the number of devices
  --curve window          the twin-handler's store work per event against the window length
                          (--curve-windows events in the window), on the scenario's store

Every run reports events/s mirrored, latency percentiles from the device's timestamp to the
digital state stored with its ODTE (and per function, and for the connector's chain), events
lost and duplicated (must be 0), CPU time of entwine (and of PostgreSQL and Mosquitto), peak
resident memory, and the batches the connector sent the functions (--max-batch N events per
call at most; how many calls, events per call on average, the largest). --json PATH writes
every figure.

Examples:
  entwine bench                                              # 50 devices × 0.2 msg/s, embedded
  entwine bench --scenario services --devices 1000 --rate 1  # 1,000 events/s on PostgreSQL
  entwine bench --scenario services --mode saturation --duration 60
  entwine bench --mode saturation --max-batch 1              # one event per call: no batching
  entwine bench --curve devices --curve window --json bench.json")]
pub struct BenchArgs {
    /// Where the chain runs.
    #[arg(long, value_enum, default_value = "embedded")]
    pub scenario: Scenario,
    /// How the devices publish.
    #[arg(long, value_enum, default_value = "fixed")]
    pub mode: Mode,
    /// Devices publishing.
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Messages per second per device (fixed mode).
    #[arg(long, default_value_t = 0.2)]
    pub rate: f64,
    /// Seconds measured, after the warm-up (0.1 to 604800, a week).
    #[arg(long, default_value_t = 60.0, value_parser = |raw: &str| crate::cli::seconds_within(raw, 0.1, 604_800.0))]
    pub duration: f64,
    /// Seconds of warm-up before measuring (connections, caches, the first windows; 0 to
    /// 604800).
    #[arg(long, default_value_t = 10.0, value_parser = |raw: &str| crate::cli::seconds_within(raw, 0.0, 604_800.0))]
    pub warmup: f64,
    /// Saturation mode: messages published and not yet mirrored, at most. Keep it below the
    /// broker's queue per client (Mosquitto's max_queued_messages, 1000 by default), or the
    /// broker drops messages and the bench reports them lost.
    #[arg(long, default_value_t = 500)]
    pub in_flight: u64,
    /// Scaling curves to produce instead of a single run (repeatable).
    #[arg(long, value_enum)]
    pub curve: Vec<Curve>,
    /// Device counts of the devices curve.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 300, 1000, 3000, 10000])]
    pub curve_devices: Vec<usize>,
    /// Window lengths (events in the window) of the window curve.
    #[arg(long, value_delimiter = ',', default_values_t = [6, 60, 600, 3000])]
    pub curve_windows: Vec<usize>,
    /// Evaluations timed per point of the window curve.
    #[arg(long, default_value_t = 300)]
    pub curve_evaluations: usize,
    /// Services scenario: a PostgreSQL database the bench may create databases from.
    #[arg(
        long,
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Services scenario: the MQTT broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker_url: String,
    /// The connector's lanes: batches in progress at once [default: the platform's, 2 on the
    /// embedded SQLite, 4 on PostgreSQL].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub lanes: Option<usize>,
    /// Most events the connector sends the functions in one call (one JSON array per route,
    /// one commit), 1 to 256; 1 sends each event alone [default: the connector's, 64]. The
    /// report shows the batches it saw: how many, events per batch on average, the largest.
    #[arg(long, value_name = "N", value_parser = crate::cli::max_batch)]
    pub max_batch: Option<usize>,
    /// The connector's acknowledgement order (`auto`: `arrival` on the embedded broker,
    /// `completion` on Mosquitto; `completion` only with Mosquitto).
    #[arg(long, value_enum, default_value = "auto")]
    pub ack_order: crate::physical::AckOrderArg,
    /// Have the connector call the functions over HTTP through the platform's own server (as
    /// on a cluster through Fission's router) instead of in process. With `auth.tokens` set
    /// (ENTWINE_AUTH__TOKENS), the routes ask for a token and the connector presents
    /// `auth.token`.
    #[arg(long)]
    pub http_functions: bool,
    /// The MQTT login and TLS files for `--scenario services` (`mqtt.*` of the typed
    /// configuration below them).
    #[command(flatten)]
    pub mqtt: crate::cli::MqttArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar (it goes to stderr, and only to a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    /// The ODTE configuration of the twins.
    pub odte: OdteArgs,
}

/// Where the chain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// SQLite and the embedded broker, in this process.
    Embedded,
    /// PostgreSQL and Mosquitto.
    Services,
}

/// How the devices publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Devices × rate.
    Fixed,
    /// As fast as the platform absorbs.
    Saturation,
}

/// A scaling curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Curve {
    /// Throughput and p99 against the number of devices.
    Devices,
    /// ODTE cost per event against the window length.
    Window,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Services => "services",
        }
    }
}

/// Runs the bench the flags describe, prints its tables, writes its JSON.
pub async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a number of messages per second above 0, got {}",
        args.rate
    );
    anyhow::ensure!(
        args.duration.is_finite() && args.duration > 0.0,
        "--duration must be a number of seconds above 0, got {}",
        args.duration
    );
    anyhow::ensure!(
        args.warmup.is_finite() && args.warmup >= 0.0,
        "--warmup must be a number of seconds, 0 or more, got {}",
        args.warmup
    );
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    anyhow::ensure!(
        args.curve_devices.iter().all(|&d| d > 0),
        "--curve-devices must all be at least 1"
    );
    anyhow::ensure!(
        args.curve_windows.iter().all(|&w| w >= 2),
        "--curve-windows must all be at least 2 events"
    );
    anyhow::ensure!(
        !(args.scenario == Scenario::Embedded
            && args.ack_order == crate::physical::AckOrderArg::Completion),
        "--ack-order completion needs Mosquitto (--scenario services): the embedded broker refuses it"
    );
    let odte = args.odte.config()?;
    let max_batch = args
        .max_batch
        .or_else(crate::cli::default_max_batch)
        .context("cannot tell the connector's default --max-batch")?;
    let recorder = HdrRecorder::global()?;

    let mut report = Report {
        machine: Machine::this(),
        runs: Vec::new(),
        window_curve: Vec::new(),
    };
    if args.curve.is_empty() {
        let settings = RunSettings::from_args(args, args.devices, max_batch);
        report
            .runs
            .push(run_chain(&settings, args, odte, recorder).await?);
    }
    if args.curve.contains(&Curve::Devices) {
        for &devices in &args.curve_devices {
            let settings = RunSettings::from_args(args, devices, max_batch);
            report
                .runs
                .push(run_chain(&settings, args, odte, recorder).await?);
        }
    }
    if args.curve.contains(&Curve::Window) {
        let fresh = FreshStore::create(args).await?;
        let points = window::curve(
            &fresh.store,
            &args.curve_windows,
            args.curve_evaluations,
            !args.no_progress,
        )
        .await;
        fresh.drop_it().await;
        report.window_curve = points?;
    }

    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// One run's load.
#[derive(Debug, Clone, Copy)]
struct RunSettings {
    devices: usize,
    pace: Pace,
    rate: Option<f64>,
    /// The connector's `max_batch`.
    max_batch: usize,
}

impl RunSettings {
    fn from_args(args: &BenchArgs, devices: usize, max_batch: usize) -> Self {
        match args.mode {
            Mode::Fixed => Self {
                devices,
                pace: Pace::Fixed {
                    per_second: devices as f64 * args.rate,
                },
                rate: Some(args.rate),
                max_batch,
            },
            Mode::Saturation => Self {
                devices,
                pace: Pace::Saturation {
                    in_flight: args.in_flight,
                },
                rate: None,
                max_batch,
            },
        }
    }
}

/// A store made for one run: a SQLite file in a temporary directory, or a PostgreSQL database
/// created for it and dropped afterwards.
struct FreshStore {
    store: Store,
    postgres: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl FreshStore {
    async fn create(args: &BenchArgs) -> anyhow::Result<Self> {
        let fresh = match args.scenario {
            Scenario::Embedded => {
                let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Self {
                    store: Store::open(&url, &StoreOptions::default())?,
                    postgres: None,
                    _dir: Some(dir),
                }
            }
            Scenario::Services => {
                let name = format!("entwine_bench_{}_{}", std::process::id(), unique());
                let url = database_url_with(&args.database_url, &name)?;
                admin(&args.database_url, &format!("CREATE DATABASE {name}")).await?;
                Self {
                    store: Store::open(&url, &StoreOptions::default())?,
                    postgres: Some((args.database_url.clone(), name)),
                    _dir: None,
                }
            }
        };
        fresh
            .store
            .migrate()
            .await
            .context("cannot migrate the bench's store")?;
        Ok(fresh)
    }

    async fn drop_it(self) {
        self.store.close().await;
        if let Some((admin_url, name)) = self.postgres {
            if let Err(e) = admin(
                &admin_url,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await
            {
                tracing::warn!(error = %e, database = %name, "cannot drop the bench's database");
            }
        }
    }
}

/// Runs one statement on the PostgreSQL server of `url`.
async fn admin(url: &str, statement: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", entwine_config::redact_url(url)))?;
    sqlx::query(statement)
        .execute(&mut connection)
        .await
        .with_context(|| format!("{statement} failed"))?;
    let _ = connection.close().await;
    Ok(())
}

/// `url` with its database replaced by `database`.
fn database_url_with(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed =
        reqwest::Url::parse(url).with_context(|| format!("--database-url {url:?} is no URL"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "postgres" | "postgresql"),
        "--database-url must be a postgres:// URL for the services scenario"
    );
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// One full-chain run on a platform of its own.
async fn run_chain(
    settings: &RunSettings,
    args: &BenchArgs,
    odte: entwine_core::odte::OdteConfig,
    recorder: &HdrRecorder,
) -> anyhow::Result<RunReport> {
    report::reset_peak_rss();
    let fresh = FreshStore::create(args).await?;
    let store = fresh.store.clone();
    let prefix = format!("bench{}x{}", std::process::id(), unique());
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));

    // The platform without devices (the bench's load generator publishes) and without the
    // evaluator, the digital publisher or a Prometheus recorder (the bench's own recorder
    // takes the pipeline's metrics). The connector calls the functions in process unless
    // `--http-functions`; every digital state is announced to the bench's observer.
    let mut config = PlatformConfig::ephemeral("sqlite::memory:");
    config.store = StoreSource::Given(store.clone());
    config.broker = match args.scenario {
        Scenario::Embedded => BrokerSource::Embedded(any),
        Scenario::Services => BrokerSource::External(args.broker_url.clone()),
    };
    config.odte = odte;
    config.evaluator = EvaluatorPeriod::Off;
    config.devices = None;
    config.digital_events = None;
    // Tokens (`auth.tokens`, `auth.token`: ENTWINE_AUTH__TOKENS, ENTWINE_AUTH__TOKEN) make the
    // function routes ask for one, which `--http-functions` then presents: what they cost.
    let mut flags = entwine_config::Flags::default();
    args.mqtt.flags(&mut flags)?;
    let loaded = crate::cli::load_config(None, flags)?;
    config.auth = loaded.auth()?;
    config.client_token = loaded.client_token()?;
    if args.scenario == Scenario::Services {
        config.mqtt = loaded.mqtt()?;
    }
    let mqtt = config.mqtt.clone();
    config.metrics = false;
    config.feed_capacity = 1 << 16;
    config.connector = Some(ConnectorSettings {
        client_id: format!("{prefix}-connector"),
        ack_order: args.ack_order.explicit(),
        lanes: args.lanes,
        max_batch: Some(settings.max_batch),
        access: if args.http_functions {
            FunctionsAccess::Http
        } else {
            FunctionsAccess::InProcess
        },
        ..ConnectorSettings::default()
    });
    let platform = Platform::start(config).await.map_err(|e| match e {
        entwine_platform::PlatformError::Component {
            what: "connector",
            source,
        } => anyhow::anyhow!(
            "the connector did not subscribe: is the broker at {} up? ({source:#})",
            args.broker_url
        ),
        e => e.into(),
    })?;
    anyhow::ensure!(
        platform
            .connector_stats()
            .subscribed
            .load(Ordering::Relaxed)
            > 0,
        "the connector did not subscribe within 10 s: is the broker at {} up?",
        platform.broker().address()
    );
    let broker = platform.broker().for_devices();
    let login = mqtt.prepare(broker.tls)?;
    // Nothing is published before the load below starts, so the observer misses nothing.
    let progress = Arc::new(Progress::default());
    let observer = tokio::spawn(observe(
        platform.digital_states(),
        format!("{prefix}-"),
        progress.clone(),
    ));

    let load_stats = Arc::new(LoadStats::default());
    let load_stop = CancellationToken::new();
    let load = tokio::spawn(load::run(
        broker.clone(),
        login.clone(),
        prefix.clone(),
        settings.devices,
        settings.pace,
        progress.clone(),
        load_stats.clone(),
        load_stop.clone(),
    ));

    let label = match settings.rate {
        Some(rate) => format!(
            "{} {} devices × {rate}/s",
            args.scenario.name(),
            settings.devices
        ),
        None => format!(
            "{} {} devices, saturation",
            args.scenario.name(),
            settings.devices
        ),
    };
    let bar = progress_bar(!args.no_progress, args.warmup + args.duration, &label);
    let ticker = {
        let bar = bar.clone();
        let progress = progress.clone();
        let started = tokio::time::Instant::now();
        let warmup = args.warmup;
        tokio::spawn(async move {
            let mut last = (0.0, 0);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let t = started.elapsed().as_secs_f64();
                let mirrored = progress.mirrored.load(Ordering::Relaxed);
                let rate = (mirrored - last.1) as f64 / (t - last.0).max(1e-3);
                last = (t, mirrored);
                bar.set_position((t * 10.0) as u64);
                bar.set_message(format!(
                    "{}  {mirrored} mirrored, {rate:.0}/s",
                    if t < warmup { "warm-up" } else { "measuring" }
                ));
            }
        })
    };

    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    recorder.reset();
    let batches_start = Batches::of(platform.connector_stats());
    let cpu_start = CpuSample::now();
    let mirrored_start = progress.mirrored.load(Ordering::Relaxed);
    let measure_start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let measured_s = measure_start.elapsed().as_secs_f64();
    let mirrored_measured = progress.mirrored.load(Ordering::Relaxed) - mirrored_start;
    let cpu = cpu_start.until(&CpuSample::now(), mirrored_measured);
    let batches_end = Batches::of(platform.connector_stats());
    let latency = recorder.percentiles("entwine_entanglement_latency_seconds", None);
    let chain = recorder.percentiles("entwine_chain_duration_seconds", None);
    let functions = Function::ALL
        .into_iter()
        .filter_map(|f| {
            recorder
                .percentiles(
                    "entwine_function_duration_seconds",
                    Some(("function", f.name())),
                )
                .map(|p| (f.name().to_owned(), p))
        })
        .collect();

    // Stop publishing, then wait until every acknowledged message is mirrored (or nothing
    // moves for 30 s: then some are lost, and the report says how many).
    load_stop.cancel();
    load.await.context("the bench's devices panicked")??;
    let acknowledged = load_stats.acknowledged.load(Ordering::Relaxed);
    bar.set_message("draining");
    let mut last = (
        progress.mirrored.load(Ordering::Relaxed),
        tokio::time::Instant::now(),
    );
    while progress.mirrored.load(Ordering::Relaxed) < acknowledged {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = progress.mirrored.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, tokio::time::Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            tracing::warn!(
                mirrored = now,
                acknowledged,
                "nothing mirrored for 30 s: counting what is stored"
            );
            break;
        }
    }
    ticker.abort();
    bar.finish_and_clear();

    // The largest batch of the whole run, drain included (a maximum cannot be windowed).
    let largest_batch = Batches::of(platform.connector_stats()).largest;
    platform.shutdown().await?;
    forget_session(&broker, &login, &format!("{prefix}-connector")).await;
    observer.abort();

    let stored = store.tally(&format!("{prefix}-")).await?;
    let twins = store.twins().await?;
    let ours: Vec<_> = twins
        .iter()
        .filter(|t| t.device_id.starts_with(&format!("{prefix}-")))
        .collect();
    let entangled = ours
        .iter()
        .filter(|t| t.lifecycle == entwine_core::twin::TwinLifecycle::Entangled)
        .count();
    let published = load_stats.published.load(Ordering::Relaxed);
    let mirrored = progress.mirrored.load(Ordering::Relaxed);
    let evaluated = u64::try_from(stored.evaluated).unwrap_or(0);
    let physical = u64::try_from(stored.physical).unwrap_or(0);
    let digital = u64::try_from(stored.digital).unwrap_or(0);
    let run = RunReport {
        scenario: args.scenario.name().into(),
        mode: match settings.pace {
            Pace::Fixed { .. } => "fixed".into(),
            Pace::Saturation { .. } => "saturation".into(),
        },
        devices: settings.devices,
        rate_per_device: settings.rate,
        offered_per_s: settings.rate.map(|r| r * settings.devices as f64),
        in_flight: match settings.pace {
            Pace::Saturation { in_flight } => Some(in_flight),
            Pace::Fixed { .. } => None,
        },
        measured_s,
        warmup_s: args.warmup,
        max_batch: settings.max_batch,
        batches: Batches::since(&batches_start, &batches_end, largest_batch),
        throughput_per_s: mirrored_measured as f64 / measured_s,
        published,
        acknowledged,
        mirrored,
        stored,
        lost: acknowledged.saturating_sub(evaluated),
        duplicated: physical.saturating_sub(u64::try_from(stored.events).unwrap_or(0))
            + digital.saturating_sub(physical),
        redelivered: mirrored.saturating_sub(evaluated),
        latency,
        functions,
        chain,
        twins: ours.len(),
        entangled,
        cpu,
        peak_rss_mib: report::peak_rss_mib(),
    };
    fresh.drop_it().await;
    Ok(run)
}

/// Deletes the persistent session the run's connector leaves in the broker: otherwise the
/// broker keeps queueing every later device message for a client that never returns, and each
/// bench run would slow the broker down for the next.
async fn forget_session(broker: &Broker, login: &entwine_mqtt::Prepared, client_id: &str) {
    let mut options = rumqttc::MqttOptions::new(client_id, broker.host.clone(), broker.port);
    login.apply(&mut options);
    options.set_clean_session(true);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let forgotten = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.try_disconnect();
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(forgotten, Ok(true)) {
        tracing::warn!(
            client_id,
            "cannot delete the bench connector's session in the broker"
        );
    }
}

/// A number not used before in this process (names of databases, devices, clients).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Counts the digital states of the bench's devices as the digital-event handler announces them.
async fn observe(
    mut feed: broadcast::Receiver<entwine_core::state::DigitalState>,
    prefix: String,
    progress: Arc<Progress>,
) {
    loop {
        match feed.recv().await {
            Ok(state) => {
                if state.pending.device_id.as_str().starts_with(&prefix) {
                    progress.mirrored.fetch_add(1, Ordering::Relaxed);
                    progress.changed.notify_waiters();
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Only ours are counted, but a lag cannot tell whose were missed: count them
                // all, the store's rows decide about losses at the end.
                tracing::warn!(missed, "the bench's observer lagged");
                progress.mirrored.fetch_add(missed, Ordering::Relaxed);
                progress.changed.notify_waiters();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A progress bar on stderr over `seconds`, hidden when not wanted or not on a terminal.
fn progress_bar(wanted: bool, seconds: f64, label: &str) -> ProgressBar {
    if !wanted {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new((seconds * 10.0) as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed}/{duration} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    bar
}
