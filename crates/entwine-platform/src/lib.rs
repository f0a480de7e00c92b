//! The entwine platform, assembled in one place.
//!
//! [`Platform::start`] starts, from a [`PlatformConfig`], in this order: the store (opened and
//! migrated, or one given), the MQTT broker (embedded rumqttd, [`broker`], or an external one),
//! the functions, the HTTP server (the function routes on Fission's paths, the twins API
//! ([`api`]) and `/metrics`), the twin evaluator, the connector (calling the functions in
//! process, or over HTTP) and the emulated devices. It returns a [`Platform`]: the addresses,
//! the store, the counters and the live feeds, and [`Platform::shutdown`], which stops
//! everything in the reverse order and drains: devices stop publishing, the connector finishes
//! the chains in progress, the HTTP server drains, the evaluator and the digital publisher stop,
//! the store closes.
//!
//! `entwine up`, `entwine bench`, `entwine experiment` and the integration tests all run the
//! platform through this one builder; nothing here prints (the CLI does).
//!
//! # Example
//! ```no_run
//! # async fn example() -> Result<(), entwine_platform::PlatformError> {
//! use entwine_platform::{Platform, PlatformConfig};
//! let platform = Platform::start(PlatformConfig::local("sqlite://entwine.db")).await?;
//! println!("twins API on http://{}/api/twins", platform.http_address());
//! let report = platform.shutdown().await?;
//! println!("{} chains completed", report.completed);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod broker;
mod in_process;
mod metrics;
pub mod service;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use entwine_connector::{AckOrder, ConnectorConfig, ConnectorStats};
use entwine_core::model::{Model, ModelSet};
use entwine_core::odte::OdteConfig;
use entwine_device::conf::DeviceConf;
use entwine_device::faults::FaultPlan;
use entwine_device::fleet::{Broker, FleetOptions, FleetStats, ModelGroup};
use entwine_device::link::Delivery;
use entwine_device::{DeviceApi, Emulator};
use entwine_functions::handlers::{
    Clock, DigitalFeed, Function, LifecycleFeed, SystemClock, TwinFunctions,
};
use entwine_functions::http::{routes, with_fallbacks};
use entwine_functions::publisher::{DigitalPublisher, PublisherSettings};
use entwine_http::Interface;
use entwine_store::{Store, StoreError, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use in_process::InProcessFunctions;
pub use metrics::prometheus;

/// Why the platform could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A setting that cannot be used; the message says which and why.
    #[error("{0}")]
    Config(String),
    /// The store could not be opened or migrated.
    #[error("the {backend} store: {source}")]
    Store {
        /// `postgres` or `sqlite` (or `store` before it is known).
        backend: &'static str,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// An address could not be listened on.
    #[error("cannot listen on {address} ({what})")]
    Listen {
        /// Which server.
        what: &'static str,
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A component failed to start or failed while running.
    #[error("{what}: {source:#}")]
    Component {
        /// Which one: `broker`, `connector`, `devices`, `HTTP server`, `digital events`,
        /// `metrics`.
        what: &'static str,
        /// Its error.
        #[source]
        source: anyhow::Error,
    },
}

impl PlatformError {
    fn component(what: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Component {
            what,
            source: source.into(),
        }
    }
}

/// Where the store comes from.
#[derive(Clone)]
pub enum StoreSource {
    /// Opened from a URL (`sqlite://PATH`, `postgres://…`) and migrated; closed at shutdown.
    Url {
        /// The URL.
        url: String,
        /// Pool options.
        options: StoreOptions,
    },
    /// A store the caller opened (and migrated); the caller closes it.
    Given(Store),
}

/// Which broker the devices publish to and the connector reads from.
#[derive(Debug, Clone)]
pub enum BrokerSource {
    /// An embedded rumqttd on this address (a free port of the same address when it is taken;
    /// port 0 for any). It stops with the process, so the connector finishes its backlog on
    /// shutdown.
    Embedded(SocketAddr),
    /// An existing broker: `host:port` or `mqtt://host:port`.
    External(String),
}

/// How the connector reaches the functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionsAccess {
    /// Called in this process ([`InProcessFunctions`]): no socket between the steps.
    InProcess,
    /// Over HTTP through the platform's own server, as on a cluster through Fission's router.
    Http,
}

/// The connector's settings within the platform.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    /// Topic filters it takes.
    pub topics: Vec<String>,
    /// Client id of its persistent session.
    pub client_id: String,
    /// Acknowledgement order; `None` picks the broker's: arrival on the embedded rumqttd (it
    /// insists), completion elsewhere.
    pub ack_order: Option<AckOrder>,
    /// Batches in progress at once (`None`: 2 on SQLite, whose one writer makes more lanes only
    /// smaller batches, and 4 on PostgreSQL; measured in BENCHMARKS.md, issue #13).
    pub lanes: Option<usize>,
    /// Most messages sent to the functions in one call, as a JSON array (`None`: the
    /// connector's default, [`ConnectorConfig::max_batch`]); 1 never batches, for functions
    /// that take only objects (such as the seed's). 0 is refused by [`Platform::start`].
    pub max_batch: Option<usize>,
    /// How it calls the functions.
    pub access: FunctionsAccess,
    /// How long `start` waits for its subscription before starting the devices anyway.
    pub subscribe_timeout: Duration,
}

impl Default for ConnectorSettings {
    fn default() -> Self {
        Self {
            topics: vec!["device/+/telemetry/device_state".to_owned()],
            client_id: "entwine-up".to_owned(),
            ack_order: None,
            lanes: None,
            max_batch: None,
            access: FunctionsAccess::InProcess,
            subscribe_timeout: Duration::from_secs(10),
        }
    }
}

/// The emulated fleet within the platform.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// How many (ids `<prefix>-1` … `<prefix>-N`).
    pub count: usize,
    /// The id prefix.
    pub prefix: String,
    /// Aggregated messages per second of each (the seed's `aggregatedTelemetryMsgSec`).
    pub rate: f64,
    /// Sensor update period, ms (the seed's `updatePeriodMs`).
    pub update_period_ms: u64,
    /// Delay before the first message, ms (the seed's `updateInitialDelayMs`).
    pub update_initial_delay_ms: u64,
    /// Where the devices' HTTP API (`/conf`, `/faults`) listens (a free port of the same
    /// address when it is taken).
    pub api_listen: SocketAddr,
    /// Devices of models beside the seed's: (model id, how many), each group's ids from its
    /// model's first pattern (`vib-*`: `vib-1` …), publishing at its model's expected rate.
    pub model_devices: Vec<(String, usize)>,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            count: 5,
            prefix: "iiot-device".to_owned(),
            rate: 0.2,
            update_period_ms: 5000,
            update_initial_delay_ms: 2000,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 5555)),
            model_devices: Vec::new(),
        }
    }
}

/// Where digital states and lifecycle changes are published on the broker.
#[derive(Debug, Clone)]
pub struct DigitalEventSettings {
    /// Topic of digital states; `{device_id}` names the device.
    pub state_topic: String,
    /// Topic of lifecycle changes; `{device_id}` names the device.
    pub lifecycle_topic: String,
}

impl Default for DigitalEventSettings {
    fn default() -> Self {
        Self {
            state_topic: entwine_functions::publisher::DEFAULT_STATE_TOPIC.to_owned(),
            lifecycle_topic: entwine_functions::publisher::DEFAULT_LIFECYCLE_TOPIC.to_owned(),
        }
    }
}

/// How often the twin evaluator runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EvaluatorPeriod {
    /// Not at all.
    Off,
    /// A sixth of the ODTE window, between 0.5 and 10 s.
    Default,
    /// Every this long.
    Every(Duration),
}

/// Everything the platform is made of. [`PlatformConfig::local`] is `entwine up`'s default.
#[derive(Clone)]
pub struct PlatformConfig {
    /// The store.
    pub store: StoreSource,
    /// The broker.
    pub broker: BrokerSource,
    /// Where the HTTP server (functions, twins API, `/metrics`) listens (a free port of the
    /// same address when it is taken; port 0 for any).
    pub listen: SocketAddr,
    /// The HTTP server's limits.
    pub http_limits: entwine_http::Limits,
    /// Who may call the HTTP server and the devices' API: bearer tokens (none: open, which only
    /// a loopback address allows; any other refuses to start).
    pub auth: entwine_http::Auth,
    /// The token the platform's connector presents to the function routes over HTTP
    /// ([`FunctionsAccess::Http`]) when `auth` protects them (`auth.token`).
    pub client_token: Option<secrecy::SecretString>,
    /// How the platform's MQTT clients (connector, devices, digital events) log in and encrypt.
    /// With the embedded broker its user name and password are the only login the broker
    /// accepts, and its TLS files verify the embedded broker's certificate.
    pub mqtt: entwine_mqtt::MqttSecurity,
    /// The embedded broker's certificate and key: it then serves MQTT over TLS only, and the
    /// platform's clients verify it with `mqtt.ca_file` (required).
    pub embedded_broker_tls: Option<entwine_mqtt::ClientCert>,
    /// The ODTE configuration: the profile of the seed's device.
    pub odte: OdteConfig,
    /// The device models beside the seed's built-in one (`entwine up --models DIR`): each
    /// device is read by the model its id binds it to, and its twin evaluated by that model's
    /// profile; the connector also takes each model's topic.
    pub models: Vec<Model>,
    /// The twin evaluator's period.
    pub evaluator: EvaluatorPeriod,
    /// The connector, if one runs in the platform.
    pub connector: Option<ConnectorSettings>,
    /// The emulated devices, if any.
    pub devices: Option<DeviceSettings>,
    /// Digital events on the broker, if published.
    pub digital_events: Option<DigitalEventSettings>,
    /// Whether to install the process's Prometheus recorder and serve `/metrics` (a process
    /// has one recorder: a bench installs its own and says `false`).
    pub metrics: bool,
    /// How many digital states and lifecycle changes the in-process feeds hold for a slow
    /// receiver before it lags.
    pub feed_capacity: usize,
    /// The functions' clock.
    pub clock: Arc<dyn Clock>,
    /// Retention of the history (`retention` settings): every `period`, states older than
    /// `keep` are deleted ([`Store::apply_retention`], which keeps what any window reads).
    /// `None` keeps everything.
    pub retention: Option<entwine_store::RetentionSettings>,
}

impl PlatformConfig {
    /// `entwine up`'s defaults on the store at `database_url`: embedded broker on
    /// 127.0.0.1:1883, HTTP on 127.0.0.1:8080, the seed's ODTE profile, five devices, the
    /// connector in process, digital events and metrics on.
    pub fn local(database_url: &str) -> Self {
        Self {
            store: StoreSource::Url {
                url: database_url.to_owned(),
                options: StoreOptions::default(),
            },
            broker: BrokerSource::Embedded(SocketAddr::from(([127, 0, 0, 1], 1883))),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http_limits: entwine_http::Limits::default(),
            auth: entwine_http::Auth::default(),
            client_token: None,
            mqtt: entwine_mqtt::MqttSecurity::none(),
            embedded_broker_tls: None,
            odte: OdteConfig::seed_default(),
            models: Vec::new(),
            evaluator: EvaluatorPeriod::Default,
            connector: Some(ConnectorSettings::default()),
            devices: Some(DeviceSettings::default()),
            digital_events: Some(DigitalEventSettings::default()),
            metrics: true,
            feed_capacity: 4096,
            clock: Arc::new(SystemClock),
            retention: None,
        }
    }

    /// The same with every listener on a free loopback port (for tests and benches running
    /// several platforms at once).
    pub fn ephemeral(database_url: &str) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = Self::local(database_url);
        config.broker = BrokerSource::Embedded(any);
        config.listen = any;
        if let Some(devices) = &mut config.devices {
            devices.api_listen = any;
        }
        config
    }

    /// The evaluator's period, or `None` when it is off.
    pub fn evaluator_period(&self) -> Option<Duration> {
        match self.evaluator {
            EvaluatorPeriod::Off => None,
            EvaluatorPeriod::Every(period) => Some(period),
            // A sixth of the shortest window of any profile, so that the quickest model's
            // silence shows within its own window.
            EvaluatorPeriod::Default => Some(Duration::from_secs_f64(
                (self
                    .models
                    .iter()
                    .map(|m| m.profile.time_window_s())
                    .fold(self.odte.time_window_s(), f64::min)
                    / 6.0)
                    .clamp(0.5, 10.0),
            )),
        }
    }
}

/// The broker the platform uses.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Whether it is the embedded one.
    pub embedded: bool,
    /// Whether connections to it use TLS.
    pub tls: bool,
}

impl BrokerHandle {
    /// As the device emulator names a broker.
    pub fn for_devices(&self) -> Broker {
        Broker {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
        }
    }

    /// `host:port` (`[v6]:port` for an IPv6 host).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address as a URL clients read back: `mqtts://host:port` over TLS, else `host:port`.
    pub fn url(&self) -> String {
        if self.tls {
            format!("mqtts://{}", self.address())
        } else {
            self.address()
        }
    }
}

/// What the platform did, counted at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownReport {
    /// Messages the devices published (and the broker acknowledged).
    pub published: u64,
    /// Chains the connector completed.
    pub completed: u64,
    /// Messages it dead-lettered.
    pub dead_lettered: u64,
}

/// A running platform: its addresses, its parts, and its shutdown.
pub struct Platform {
    store: Store,
    close_store: bool,
    broker: BrokerHandle,
    http_address: SocketAddr,
    functions: Arc<TwinFunctions>,
    feed: DigitalFeed,
    lifecycle: LifecycleFeed,
    evaluator_period: Option<Duration>,
    evaluator: Option<JoinHandle<()>>,
    http_stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    connector_stats: Arc<ConnectorStats>,
    connector_stop: CancellationToken,
    connector: Option<JoinHandle<anyhow::Result<()>>>,
    devices_stop: CancellationToken,
    devices: Option<Emulator>,
    publisher: Option<(DigitalPublisher, JoinHandle<()>)>,
}

/// Binds `wanted`; when its port is taken, a free port on the same address instead.
pub async fn bind_or_free_port(
    wanted: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, PlatformError> {
    let listen_error = |address, source| PlatformError::Listen {
        what,
        address,
        source,
    };
    match TcpListener::bind(wanted).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(%wanted, what, "address in use, choosing a free port");
            let any = SocketAddr::new(wanted.ip(), 0);
            TcpListener::bind(any)
                .await
                .map_err(|e| listen_error(any, e))
        }
        Err(e) => Err(listen_error(wanted, e)),
    }
}

impl Platform {
    /// Starts everything `config` asks for; returns once the connector is subscribed (so that
    /// nothing the devices publish is lost to a subscriber that does not exist yet) and the
    /// devices are publishing.
    pub async fn start(config: PlatformConfig) -> Result<Self, PlatformError> {
        // The loopback rule, before anything starts.
        let mut served = vec![Interface::Functions, Interface::Api];
        if config.metrics {
            served.push(Interface::Metrics);
        }
        entwine_http::check_exposure(config.listen, &config.auth, &served)
            .map_err(|e| PlatformError::Config(e.to_string()))?;
        if let Some(devices) = config.devices.as_ref().filter(|d| d.count > 0) {
            entwine_http::check_exposure(devices.api_listen, &config.auth, &[Interface::Device])
                .map_err(|e| PlatformError::Config(format!("device API: {e}")))?;
        }
        let auth = Arc::new(config.auth.clone());
        let (store, close_store) = service::open_store(&config.store).await?;
        let models = Arc::new(
            ModelSet::new(config.odte, config.models.clone())
                .map_err(|e| PlatformError::Config(e.to_string()))?,
        );
        let metrics = if config.metrics {
            // A twin's gauges are forgotten after the longest silence of any profile.
            Some(service::recorder(&models)?)
        } else {
            None
        };

        let broker = match &config.broker {
            BrokerSource::External(url) => {
                let url = entwine_core::broker::BrokerUrl::parse(url)
                    .map_err(|e| PlatformError::Config(format!("{e:#}")))?;
                BrokerHandle {
                    host: url.host,
                    port: url.port,
                    embedded: false,
                    tls: url.tls || config.mqtt.tls.is_some(),
                }
            }
            BrokerSource::Embedded(wanted) => {
                let tls = &config.embedded_broker_tls;
                let verifies = config
                    .mqtt
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.ca_file.is_some());
                if tls.is_some() && !verifies {
                    return Err(PlatformError::Config(
                        "the embedded broker serves TLS (--mqtt-tls-cert): set mqtt.ca_file (--mqtt-ca-file) to the CA that signed its certificate, so the platform's clients can verify it".into(),
                    ));
                }
                if tls.is_none() && config.mqtt.tls.is_some() {
                    return Err(PlatformError::Config(
                        "mqtt.ca_file, mqtt.cert_file are set but the embedded broker serves plain MQTT: give it a certificate (--mqtt-tls-cert, --mqtt-tls-key), or use --broker-url to a broker that serves TLS".into(),
                    ));
                }
                if !wanted.ip().is_loopback() && config.mqtt.credentials.is_none() {
                    return Err(PlatformError::Config(format!(
                        "refusing to run the embedded MQTT broker on {wanted} without credentials: set mqtt.username and mqtt.password (ENTWINE_MQTT__USERNAME, ENTWINE_MQTT__PASSWORD; the broker then accepts only that login), or listen on 127.0.0.1"
                    )));
                }
                let address = broker::start(*wanted, &config.mqtt, tls.as_ref())
                    .await
                    .map_err(|e| PlatformError::component("broker", e))?;
                BrokerHandle {
                    host: address.ip().to_string(),
                    port: address.port(),
                    embedded: true,
                    tls: tls.is_some(),
                }
            }
        };
        if let Some(connector) = &config.connector {
            if broker.embedded && connector.ack_order == Some(AckOrder::Completion) {
                return Err(PlatformError::Config(
                    "--ack-order completion needs a broker that accepts it (--broker-url to Mosquitto): the embedded one does not".into(),
                ));
            }
        }

        let listener = bind_or_free_port(config.listen, "HTTP server").await?;
        let http_address = listener
            .local_addr()
            .map_err(|source| PlatformError::Listen {
                what: "HTTP server",
                address: config.listen,
                source,
            })?;
        let (feed, _) = broadcast::channel(config.feed_capacity.max(1));
        let (lifecycle, _) = broadcast::channel(config.feed_capacity.max(1));
        let publisher = match &config.digital_events {
            None => None,
            Some(digital) => {
                let client_id = match &config.connector {
                    Some(connector) => format!("{}-digital", connector.client_id),
                    None => format!("entwine-digital-{}", std::process::id()),
                };
                let mut settings = PublisherSettings::new(&broker.url(), &client_id);
                settings.mqtt = config.mqtt.clone();
                settings.state_topic = digital.state_topic.clone();
                settings.lifecycle_topic = digital.lifecycle_topic.clone();
                Some(DigitalPublisher::start(&settings).map_err(|e| {
                    PlatformError::component("digital events", anyhow::anyhow!("{e}"))
                })?)
            }
        };
        let functions = Arc::new(
            TwinFunctions::new(store.clone(), config.odte, config.clock.clone())
                .with_models(models.clone())
                .with_feed(feed.clone())
                .with_lifecycle_feed(lifecycle.clone())
                .with_publisher(publisher.as_ref().map(|(p, _)| p.clone())),
        );
        let evaluator_period = config.evaluator_period();
        let evaluator =
            evaluator_period.map(|period| tokio::spawn(evaluate_every(functions.clone(), period)));

        let http_stop = CancellationToken::new();
        // Stopped with the HTTP server: in `shutdown` before the store closes, or when `start`
        // fails or the platform is dropped (a batch cut short is rolled back).
        if let Some(retention) = config.retention {
            tokio::spawn(retain_every(
                store.clone(),
                models.clone(),
                config.clock.clone(),
                retention,
                http_stop.child_token(),
            ));
        }
        let device_view = Arc::new(std::sync::OnceLock::new());
        let app = with_fallbacks(
            entwine_http::protect(
                routes(functions.clone()),
                auth.clone(),
                Interface::Functions,
            )
            .merge(api::router(
                store.clone(),
                models.clone(),
                feed.clone(),
                lifecycle.clone(),
                metrics,
                http_stop.clone(),
                auth.clone(),
            ))
            // The dashboard's page and assets (no data in them: no token asked).
            .merge(entwine_web::router())
            .merge(api::devices::router(
                device_view.clone(),
                models.clone(),
                auth.clone(),
            )),
        );
        let http = {
            let stop = http_stop.clone();
            let limits = config.http_limits;
            tokio::spawn(async move {
                entwine_http::serve(listener, app, limits, async move { stop.cancelled().await })
                    .await
            })
        };

        let connector_stop = CancellationToken::new();
        // Until the platform is returned, a failure below stops what already runs.
        let mut started = Started {
            stops: vec![http_stop.clone(), connector_stop.clone()],
            tasks: std::iter::once(http.abort_handle())
                .chain(evaluator.as_ref().map(JoinHandle::abort_handle))
                .collect(),
        };
        let connector_stats = Arc::new(ConnectorStats::default());
        let mut connector = match &config.connector {
            None => None,
            Some(settings) => {
                let mut topics = settings.topics.clone();
                for model in models.models() {
                    let filter = model.topic_filter();
                    if !topics.contains(&filter) {
                        topics.push(filter);
                    }
                }
                let mut connector_config =
                    ConnectorConfig::new(&broker.url(), topics, &format!("http://{http_address}"))
                        .map_err(|e| PlatformError::Config(format!("{e:#}")))?;
                connector_config.client_id = settings.client_id.clone();
                connector_config.mqtt = config.mqtt.clone();
                connector_config.broker_tls = broker.tls;
                if settings.access == FunctionsAccess::Http
                    && auth.requires_token(Interface::Functions)
                {
                    let Some(token) = &config.client_token else {
                        return Err(PlatformError::Config(
                            "the connector calls the function routes over HTTP, which ask for a token: set auth.token to one of auth.tokens (ENTWINE_AUTH__TOKEN)".into(),
                        ));
                    };
                    connector_config.router_token = Some(token.clone());
                }
                connector_config.lanes = settings.lanes.unwrap_or(match store {
                    Store::Sqlite(_) => 2,
                    Store::Postgres(_) => 4,
                });
                if let Some(max_batch) = settings.max_batch {
                    connector_config.max_batch = max_batch;
                }
                connector_config
                    .check()
                    .map_err(|e| PlatformError::Config(format!("{e:#}")))?;
                // The embedded broker stops with this process: nothing may be left in it.
                connector_config.finish_backlog = broker.embedded;
                connector_config.ack_order = settings.ack_order.unwrap_or(if broker.embedded {
                    AckOrder::Arrival
                } else {
                    AckOrder::Completion
                });
                let task = match settings.access {
                    FunctionsAccess::InProcess => tokio::spawn(entwine_connector::run_with(
                        connector_config,
                        Arc::new(InProcessFunctions::new(functions.clone())),
                        connector_stats.clone(),
                        connector_stop.clone(),
                    )),
                    FunctionsAccess::Http => tokio::spawn(entwine_connector::run(
                        connector_config,
                        connector_stats.clone(),
                        connector_stop.clone(),
                    )),
                };
                Some((task, settings.subscribe_timeout))
            }
        };
        // Devices start once the connector's subscription holds: a fresh broker keeps nothing
        // for a subscriber that does not exist yet.
        if let Some((task, timeout)) = &connector {
            let subscribed = connector_stats.wait_subscribed(task, *timeout).await;
            if !subscribed && !task.is_finished() {
                tracing::warn!(
                    ?timeout,
                    "the connector is not subscribed yet; starting the devices anyway"
                );
            }
        }
        if let Some((task, _)) = connector.take_if(|(task, _)| task.is_finished()) {
            let error = match task.await {
                Ok(Ok(())) => anyhow::anyhow!("stopped before it subscribed"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("panicked: {e}"),
            };
            return Err(PlatformError::component("connector", error));
        }
        let connector = connector.map(|(task, _)| task);

        let devices_stop = CancellationToken::new();
        let devices = match &config.devices {
            Some(settings) if settings.count > 0 || !settings.model_devices.is_empty() => {
                let conf = DeviceConf {
                    device_id: format!("{}-1", settings.prefix),
                    target_mqtt_broker_address: broker.host.clone(),
                    target_mqtt_broker_port: broker.port,
                    update_period_ms: settings.update_period_ms,
                    update_initial_delay_ms: settings.update_initial_delay_ms,
                    aggregated_telemetry_msg_sec: settings.rate,
                    ..DeviceConf::default()
                };
                conf.validate()
                    .map_err(|e| PlatformError::Config(format!("invalid device settings: {e}")))?;
                let mut groups = Vec::new();
                for (id, count) in &settings.model_devices {
                    let model = models.get(id).map_err(|e| {
                        PlatformError::Config(format!("devices of model {id:?}: {e}"))
                    })?;
                    groups.push(ModelGroup::new(model.clone(), *count));
                }
                let options = FleetOptions {
                    count: settings.count,
                    prefix: Some(settings.prefix.clone()),
                    models: groups,
                    ..FleetOptions::default()
                };
                let api = bind_or_free_port(settings.api_listen, "device API").await?;
                Some(
                    Emulator::start_serving(
                        conf,
                        options,
                        FaultPlan::default(),
                        Delivery {
                            mqtt: config.mqtt.clone(),
                            ..Delivery::default()
                        },
                        broker.for_devices(),
                        DeviceApi {
                            listener: api,
                            limits: config.http_limits,
                            auth: auth.clone(),
                        },
                        devices_stop.clone(),
                    )
                    .map_err(|e| PlatformError::component("devices", anyhow::anyhow!("{e}")))?,
                )
            }
            _ => None,
        };
        if let Some(emulator) = &devices {
            let _ = device_view.set(api::devices::DeviceView {
                api: emulator.http_address,
                device_ids: emulator.device_ids.iter().cloned().collect(),
                conf: emulator.watch_conf(),
                faults: emulator.watch_faults(),
            });
        }

        started.stops.clear();
        started.tasks.clear();
        Ok(Self {
            store,
            close_store,
            broker,
            http_address,
            functions,
            feed,
            lifecycle,
            evaluator_period,
            evaluator,
            http_stop,
            http,
            connector_stats,
            connector_stop,
            connector,
            devices_stop,
            devices,
            publisher,
        })
    }

    /// Where the HTTP server (functions, twins API, `/metrics`) listens.
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// The broker.
    pub fn broker(&self) -> &BrokerHandle {
        &self.broker
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The functions (the ones the routes and the in-process connector call).
    pub fn functions(&self) -> &Arc<TwinFunctions> {
        &self.functions
    }

    /// The connector's counters (all zero when no connector runs).
    pub fn connector_stats(&self) -> &Arc<ConnectorStats> {
        &self.connector_stats
    }

    /// Whether a connector runs in the platform.
    pub fn has_connector(&self) -> bool {
        self.connector.is_some()
    }

    /// The emulated devices' counters, if devices run.
    pub fn device_stats(&self) -> Option<&Arc<FleetStats>> {
        self.devices.as_ref().map(|d| &d.stats)
    }

    /// The emulated devices' ids (empty when none run).
    pub fn device_ids(&self) -> &[String] {
        self.devices
            .as_ref()
            .map_or(&[], |d| d.device_ids.as_slice())
    }

    /// Where the devices' HTTP API listens, if devices run.
    pub fn device_api(&self) -> Option<SocketAddr> {
        self.devices.as_ref().map(|d| d.http_address)
    }

    /// Every digital state the digital-event handler announces, from now on.
    pub fn digital_states(&self) -> broadcast::Receiver<entwine_core::state::DigitalState> {
        self.feed.subscribe()
    }

    /// Every twin lifecycle change (twin handler and evaluator), from now on.
    pub fn lifecycle_changes(&self) -> broadcast::Receiver<entwine_store::TwinChange> {
        self.lifecycle.subscribe()
    }

    /// How often the twin evaluator runs, if it does.
    pub fn evaluator_period(&self) -> Option<Duration> {
        self.evaluator_period
    }

    /// The routes served, for printing: each function's route and name.
    pub fn function_routes() -> impl Iterator<Item = (&'static str, &'static str)> {
        Function::ALL.into_iter().map(|f| (f.route(), f.name()))
    }

    /// Stops everything in order and drains: the devices stop publishing, the connector
    /// finishes the chains in progress (with the embedded broker, the whole backlog), the HTTP
    /// server drains (live streams end; connections still open after 5 s are closed), the
    /// evaluator and the digital publisher stop, the store closes (unless it was given).
    pub async fn shutdown(mut self) -> Result<ShutdownReport, PlatformError> {
        self.devices_stop.cancel();
        let mut published = 0;
        if let Some(emulator) = self.devices.take() {
            let stats = emulator.stats.clone();
            emulator
                .wait()
                .await
                .map_err(|e| PlatformError::component("devices", anyhow::anyhow!("{e}")))?;
            published = stats.aggregated.load(Ordering::Relaxed);
        }
        self.connector_stop.cancel();
        if let Some(connector) = self.connector.take() {
            match connector.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(PlatformError::component("connector", e)),
                Err(e) => {
                    return Err(PlatformError::component(
                        "connector",
                        anyhow::anyhow!("panicked: {e}"),
                    ))
                }
            }
        }
        self.http_stop.cancel();
        match tokio::time::timeout(Duration::from_secs(5), &mut self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(PlatformError::component("HTTP server", e)),
            Ok(Err(e)) => {
                return Err(PlatformError::component(
                    "HTTP server",
                    anyhow::anyhow!("panicked: {e}"),
                ))
            }
            Err(_) => {
                tracing::warn!("HTTP connections still open after 5 s: closing them");
                self.http.abort();
            }
        }
        if let Some(evaluator) = self.evaluator.take() {
            evaluator.abort();
        }
        if let Some((publisher, pump)) = self.publisher.take() {
            publisher.close().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        if self.close_store {
            self.store.close().await;
        }
        Ok(ShutdownReport {
            published,
            completed: self.connector_stats.completed.load(Ordering::Relaxed),
            dead_lettered: self.connector_stats.dead_lettered.load(Ordering::Relaxed),
        })
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // Dropped without `shutdown` (a test that failed, a panic): stop the tasks rather than
        // leave them running against a store that goes away.
        self.devices_stop.cancel();
        self.connector_stop.cancel();
        self.http_stop.cancel();
        if let Some(evaluator) = &self.evaluator {
            evaluator.abort();
        }
    }
}

/// What `Platform::start` started so far, stopped if it returns an error before the platform
/// exists (a dropped `Platform` stops itself).
struct Started {
    stops: Vec<CancellationToken>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stops.iter().for_each(CancellationToken::cancel);
        self.tasks.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Retention's timer: a run at start, then every `settings.period`, each deleting the history
/// older than `settings.keep` at the clock's now (logged with what it deleted), until `stop`.
pub(crate) async fn retain_every(
    store: Store,
    models: Arc<ModelSet>,
    clock: Arc<dyn Clock>,
    settings: entwine_store::RetentionSettings,
    stop: CancellationToken,
) {
    let guard = entwine_store::retention_guard_ms(models.as_ref());
    let keep = i64::try_from(settings.keep.as_millis()).unwrap_or(i64::MAX);
    let mut ticks = tokio::time::interval(settings.period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let run = store.apply_retention(Some(keep), clock.now_ms(), guard);
        tokio::select! {
            () = stop.cancelled() => return,
            result = run => match result {
                Ok(report) => tracing::info!(
                    cutoff_ms = report.cutoff_ms,
                    digital_states = report.digital_states,
                    physical_states = report.physical_states,
                    dead_letters = report.dead_letters,
                    duration_ms = report.duration.as_millis() as u64,
                    "retention run"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "retention failed; next try in {:?}", settings.period
                ),
            },
        }
    }
}

/// The twin evaluator's timer: every `period`, all twins re-evaluated at the current time
/// (counted and timed as the evaluator function's calls are).
async fn evaluate_every(functions: Arc<TwinFunctions>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let run = entwine_functions::invoke::observed(
            Function::TwinEvaluator,
            functions.evaluate_twins(),
        );
        if let Err(e) = run.await {
            tracing::warn!(error = %e, "the twin evaluator failed; next try in {period:?}");
        }
    }
}
