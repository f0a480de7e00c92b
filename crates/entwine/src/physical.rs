//! `entwine device` and `entwine connector`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use entwine_connector::{ConnectorConfig, ConnectorStats};
use entwine_device::conf::DeviceConf;
use entwine_device::faults::{FaultPlan, Preset};
use entwine_device::fleet::{Broker, FleetOptions};
use entwine_device::Emulator;
use tokio_util::sync::CancellationToken;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Qos {
    /// At most once (the seed's).
    #[value(name = "0")]
    AtMostOnce,
    /// At least once: nothing lost between client and broker.
    #[value(name = "1")]
    AtLeastOnce,
}

impl From<Qos> for rumqttc::QoS {
    fn from(q: Qos) -> Self {
        match q {
            Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }
}

/// `--ack-order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckOrderArg {
    /// `arrival` for the embedded broker (rumqttd insists on it), `completion` for any other.
    Auto,
    /// In arrival order (MQTT 3.1.1 §4.6).
    Arrival,
    /// As each message completes.
    Completion,
}

impl AckOrderArg {
    /// The order to use with the embedded broker (`embedded`) or another one.
    pub fn resolve(self, embedded: bool) -> entwine_connector::AckOrder {
        match self {
            Self::Auto if embedded => entwine_connector::AckOrder::Arrival,
            Self::Auto | Self::Completion => entwine_connector::AckOrder::Completion,
            Self::Arrival => entwine_connector::AckOrder::Arrival,
        }
    }

    /// The order asked for, or `None` for `auto` (the platform picks the broker's).
    pub fn explicit(self) -> Option<entwine_connector::AckOrder> {
        match self {
            Self::Auto => None,
            Self::Arrival => Some(entwine_connector::AckOrder::Arrival),
            Self::Completion => Some(entwine_connector::AckOrder::Completion),
        }
    }
}

/// Flags of `entwine device`.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// The seed's device configuration file. When the default file is absent, the seed's
    /// example configuration is used.
    #[arg(long, short, default_value = "device_conf.yaml")]
    pub config: PathBuf,
    /// Number of devices; more than one are named `<prefix>-1` … `<prefix>-N`.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Prefix of fleet device ids (default: the configuration's deviceId).
    #[arg(long)]
    pub prefix: Option<String>,
    /// QoS of telemetry.
    #[arg(long, value_enum, default_value = "0")]
    pub qos: Qos,
    /// Broker `host:port`, overriding targetMqttBrokerAddress/Port of the file.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// Where the HTTP API listens (default: 127.0.0.1 on the file's httpApiPort). Any address
    /// beyond loopback needs `auth.tokens` (`ENTWINE_AUTH__TOKENS`, the Secret file
    /// `auth/tokens`): `PUT /conf` and `/faults` reconfigure the devices.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Devices sharing one MQTT connection.
    #[arg(long, default_value_t = 500)]
    pub devices_per_connection: usize,
    /// Fleet-wide faults from the start, by Purdue level: layer0-1, layer2, layer3, each also
    /// with -deteriorated or -critical (e.g. layer2-critical), or none. Changeable at run time
    /// with PUT /faults.
    #[arg(long, value_name = "PRESET")]
    pub faults: Option<Preset>,
    /// MQTT client id of the device's persistent session; a fleet's connection i uses
    /// `<id>-<i>` (default: the device id, or `<prefix>-fleet-<i>`). Two fleets with the same
    /// prefix on one broker need different ids.
    #[arg(long)]
    pub client_id: Option<String>,
    /// MiB of messages each MQTT connection holds while the broker is away or has not
    /// acknowledged them; beyond, a message is counted as unsent (GET /stats).
    #[arg(long, default_value_t = 16)]
    pub buffer_mib: usize,
    /// entwine's typed configuration file, YAML or TOML (`--config` of the other subcommands;
    /// here `--config` is the seed's device file) [default: `ENTWINE_CONFIG`]: the device API's
    /// HTTP limits (`http.*`) and tokens (`auth.tokens`), the MQTT login (`mqtt.*`).
    #[arg(long, value_name = "FILE")]
    pub settings: Option<PathBuf>,
    /// The MQTT login and TLS files.
    #[command(flatten)]
    pub mqtt: crate::cli::MqttArgs,
    /// A file of `device-id:password` lines: each device logs in to the broker as its own id,
    /// on a connection of its own, so the broker's ACL can hold it to its own topics
    /// [default: `mqtt.credentials_file`].
    #[arg(long, value_name = "FILE")]
    pub mqtt_credentials_file: Option<PathBuf>,
    /// Device models (`--models DIR`) for `--fleet`.
    #[command(flatten)]
    pub models: crate::cli::ModelArgs,
    /// Devices of a model beside the seed's `--count`, `MODEL=COUNT` (repeatable), ids from
    /// the model's first pattern (`vib-*`: `vib-1` …), each at its model's expected rate.
    #[arg(long, value_name = "MODEL=COUNT", value_parser = crate::cli::fleet_group)]
    pub fleet: Vec<(String, usize)>,
}

/// Runs `entwine device` until SIGINT/SIGTERM.
pub async fn device(args: DeviceArgs) -> anyhow::Result<()> {
    let conf = if args.config.exists()
        || args.config.as_path() != std::path::Path::new("device_conf.yaml")
    {
        DeviceConf::load(&args.config)?
    } else {
        tracing::info!("no ./device_conf.yaml: using the seed's example configuration");
        DeviceConf::default()
    };
    let broker = match &args.broker_url {
        Some(url) => Broker::parse(url)?,
        None => conf.broker()?,
    };
    let mut flags = entwine_config::Flags::default();
    args.mqtt.flags(&mut flags)?;
    flags.set(
        "mqtt.credentials_file",
        "--mqtt-credentials-file",
        args.mqtt_credentials_file
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    args.models.flags(&mut flags);
    let settings = crate::cli::load_config(args.settings.clone(), flags)?;
    let models = settings.models()?;
    let mut groups = Vec::new();
    for (id, count) in &args.fleet {
        let model = models
            .get(id)
            .map_err(|e| anyhow::anyhow!("--fleet {id}={count}: {e}"))?;
        groups.push(entwine_device::fleet::ModelGroup::new(
            model.clone(),
            *count,
        ));
    }
    let limits = settings.http_limits()?;
    let auth = Arc::new(settings.auth()?);
    let mqtt = settings.mqtt()?;
    let device_credentials = settings.mqtt_device_credentials()?;
    let listen = args
        .http_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], conf.http_api_port)));
    // Before binding: a refused address is refused without touching the network.
    entwine_http::check_exposure(listen, &auth, &[entwine_http::Interface::Device])
        .map_err(|e| anyhow::anyhow!("device API (--http-listen): {e}"))?;
    let http = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for the device API (--http-listen)"))?;
    let options = FleetOptions {
        count: args.count,
        prefix: args.prefix,
        qos: args.qos.into(),
        devices_per_connection: args.devices_per_connection,
        models: groups,
        ..FleetOptions::default()
    };
    let faults = FaultPlan::fleet(args.faults.unwrap_or(Preset::None).faults());
    let shutdown = CancellationToken::new();
    let delivery = entwine_device::link::Delivery {
        client_id: args.client_id,
        buffer_bytes: args.buffer_mib.max(1).saturating_mul(1024 * 1024),
        mqtt,
        device_credentials,
    };
    let emulator = Emulator::start_serving(
        conf,
        options,
        faults,
        delivery,
        broker.clone(),
        entwine_device::DeviceApi {
            listener: http,
            limits,
            auth,
        },
        shutdown.clone(),
    )?;
    println!(
        "{} device(s) publishing to {}:{}; API on http://{} (GET/PUT /conf, GET/PUT/DELETE /faults, GET /stats)",
        emulator.device_ids.len(),
        broker.host,
        broker.port,
        emulator.http_address
    );
    if let Some(preset) = args.faults {
        println!("faults: {preset} fleet-wide");
    }
    let stats = emulator.stats.clone();
    tokio::spawn(async move {
        entwine_functions::fission::shutdown_signal().await;
        shutdown.cancel();
    });
    emulator.wait().await?;
    let lost = stats.dropped_by_faults.load(Ordering::Relaxed);
    let unsent = stats.unsent_total();
    println!(
        "devices stopped after {} messages published{}{}",
        stats.published.load(Ordering::Relaxed),
        if lost > 0 {
            format!(" ({lost} more lost to injected faults)")
        } else {
            String::new()
        },
        if unsent > 0 {
            format!("; {unsent} could not be sent (GET /stats: unsent, by reason)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Flags of `entwine connector` (the first three are the seed connector's).
#[derive(Debug, Args)]
pub struct ConnectorArgs {
    /// Broker `host:port` (or `mqtt://host:port`).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker_url: String,
    /// MQTT topic filters to take device messages from.
    #[arg(long, num_args = 1.., default_values_t = [String::from("device/+/telemetry/device_state")])]
    pub topic: Vec<String>,
    /// The functions' router, `host[:port]` or a URL.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub router_url: String,
    /// MQTT client id, which names the persistent session (default: `entwine-connector-<hostname>`).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Subscription QoS; 0 gives up the no-loss guarantee.
    #[arg(long, value_enum, default_value = "1")]
    pub qos: Qos,
    /// Join the shared subscription `$share/<GROUP>/<topic>`, so several connectors split the stream.
    #[arg(long)]
    pub share_group: Option<String>,
    /// Where rejected messages go, with the reason.
    #[arg(long, default_value = "entwine/deadletter")]
    pub dead_letter_topic: String,
    /// Batches in progress at once: each device is hashed to a lane, which keeps its events in
    /// order. A few lanes carry the load, each taking whatever queued behind its previous batch;
    /// more lanes only make smaller batches.
    #[arg(long, default_value_t = 8)]
    pub lanes: usize,
    /// Acknowledge messages as each completes (`auto`, `completion`: one slow message never
    /// holds the broker's in-flight window, so a backlog drains at full speed; Mosquitto, NATS
    /// and most brokers accept it) or in arrival order (`arrival`, as MQTT 3.1.1 §4.6 asks;
    /// for brokers that insist, such as rumqttd).
    #[arg(long, value_enum, default_value = "auto")]
    pub ack_order: AckOrderArg,
    /// Announce dead letters on the topic only, without storing them through the dead-letter
    /// handler (`POST /deadletters`): for functions that have none, such as the seed's.
    #[arg(long)]
    pub no_dead_letter_store: bool,
    /// Messages taken from the broker and not finished, at most (then the connector stops
    /// reading and TCP holds the broker back: memory stays bounded under any backlog).
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Most events sent to the functions in one call (one JSON array per route, one commit in
    /// the store), 1 to 256; 1 sends each event alone, as functions that take only objects (the
    /// seed's) need [default: 64].
    #[arg(long, env = "ENTWINE_MAX_BATCH", value_name = "N", value_parser = crate::cli::max_batch)]
    pub max_batch: Option<usize>,
    /// Largest MQTT packet taken from the broker, in bytes. Keep the broker's own message size
    /// limit below it (ours: 256 KiB): a larger packet drops the connection, and the broker
    /// sends it again after every reconnection.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_incoming_bytes: usize,
    /// Serve `GET /healthz` here (200 while connected and subscribed, 503 otherwise, with the
    /// connector's counters), for Kubernetes probes.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// A configuration file, YAML or TOML [default: `ENTWINE_CONFIG`]: the health endpoint's
    /// HTTP limits (`http.*`), the token presented to the functions (`auth.token`), the MQTT
    /// login (`mqtt.*`).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The MQTT login and TLS files.
    #[command(flatten)]
    pub mqtt: crate::cli::MqttArgs,
    /// Device models (`--models DIR`): the connector also takes each model's topic.
    #[command(flatten)]
    pub models: crate::cli::ModelArgs,
}

impl ConnectorArgs {
    /// The connector configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<ConnectorConfig> {
        let topics = match &self.share_group {
            Some(group) => self
                .topic
                .iter()
                .map(|t| format!("$share/{group}/{t}"))
                .collect(),
            None => self.topic.clone(),
        };
        let mut config = ConnectorConfig::new(&self.broker_url, topics, &self.router_url)?;
        if let Some(id) = &self.client_id {
            config.client_id = id.clone();
        }
        config.qos = self.qos.into();
        config.dead_letter_topic = self.dead_letter_topic.clone();
        config.lanes = self.lanes.max(1);
        config.ack_order = self.ack_order.resolve(false);
        if self.no_dead_letter_store {
            config.store_dead_letters = false;
        }
        anyhow::ensure!(self.max_in_flight > 0, "--max-in-flight must be at least 1");
        config.max_in_flight = self.max_in_flight;
        if let Some(max_batch) = self.max_batch {
            config.max_batch = max_batch;
        }
        let body_limit = entwine_functions::http::MAX_BODY_BYTES;
        anyhow::ensure!(
            self.max_incoming_bytes > body_limit,
            "--max-incoming-bytes must be above the functions' body limit ({body_limit} bytes)"
        );
        config.max_incoming_packet_bytes = self.max_incoming_bytes;
        Ok(config)
    }
}

/// Runs `entwine connector` until SIGINT/SIGTERM.
pub async fn connector(args: ConnectorArgs) -> anyhow::Result<()> {
    let mut config = args.config()?;
    let mut flags = entwine_config::Flags::default();
    args.mqtt.flags(&mut flags)?;
    args.models.flags(&mut flags);
    let settings = crate::cli::load_config(None, flags)?;
    // Each model's topic beside the flags' (in the same share group).
    for model in settings.models()?.models() {
        let filter = match &args.share_group {
            Some(group) => format!("$share/{group}/{}", model.topic_filter()),
            None => model.topic_filter(),
        };
        if !config.topics.contains(&filter) {
            config.topics.push(filter);
        }
    }
    let limits = settings.http_limits()?;
    config.mqtt = settings.mqtt()?;
    config.router_token = settings.client_token()?;
    println!(
        "connector taking {} from {}:{} to {} (client id {}, dead letters to {}, {})",
        config.topics.join(" "),
        config.broker_host,
        config.broker_port,
        config.router_url,
        config.client_id,
        config.dead_letter_topic,
        crate::local::batch_phrase(Some(config.max_batch))
    );
    let stats = Arc::new(ConnectorStats::default());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        entwine_functions::fission::shutdown_signal().await;
        token.cancel();
    });
    if let Some(address) = args.health_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (--health-listen)"))?;
        let app = axum::Router::new().route(
            "/healthz",
            axum::routing::get({
                let stats = stats.clone();
                move || async move {
                    let status = if stats.connected.load(Ordering::Relaxed) {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, axum::Json(stats.to_json()))
                }
            }),
        );
        let token = shutdown.clone();
        tokio::spawn(async move {
            let served =
                entwine_http::serve(
                    listener,
                    app,
                    limits,
                    async move { token.cancelled().await },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
    }
    entwine_connector::run(config, stats.clone(), shutdown).await?;
    println!(
        "connector stopped: {} received, {} completed, {} dead-lettered; {}",
        stats.received.load(Ordering::Relaxed),
        stats.completed.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed),
        crate::bench::report::Batches::of(&stats).summary()
    );
    Ok(())
}
