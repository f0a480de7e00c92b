//! The IIoT device emulator of entwine, compatible with the seed's device: the same
//! `device_conf.yaml`, topics, payloads, sensor random walks and HTTP API (`GET`/`PUT /conf`),
//! and beyond it a fleet mode (thousands of devices from one process), QoS 1 telemetry delivered
//! at least once (persistent sessions, counted when acknowledged, re-sent after a drop), bounded
//! buffering while the broker is away, reconnection with backoff, and fault injection (delay,
//! jitter, loss, clock skew; `GET`/`PUT`/`DELETE /faults`).
//!
//! # Layout
//! - [`conf`]: `device_conf.yaml` and the run-time schedule changes of `PUT /conf`.
//! - [`sensor`]: the seed device's random walks and payloads.
//! - [`model_sensor`]: the readings and payloads of a device described by a model
//!   ([`entwine_core::model::Model`], issue #14): random walks within the bounds, enum values,
//!   flipping booleans, each reading at its JSON pointer.
//! - [`fleet`]: device tasks, their timers and their counters; a fleet mixes the seed's devices
//!   with groups of model devices ([`fleet::ModelGroup`]), each at its model's update rate.
//! - [`link`]: the shared MQTT connections: persistent sessions, bounded outboxes, published
//!   meaning acknowledged by the broker, reconnection.
//! - [`faults`]: fault injection: delay with jitter, loss and clock skew, fleet-wide or per
//!   device, and the Purdue-level presets (`layer0-1`, `layer2-deteriorated`, `layer3-critical`, …).
//! - [`api`]: the HTTP API.
//! - [`error`]: [`DeviceError`], what a caller can match on when the emulator fails.
//!
//! # Example
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use entwine_device::{conf::DeviceConf, fleet::{Broker, FleetOptions}, Emulator};
//! let conf = DeviceConf::load("device_conf.yaml".as_ref())?;
//! let broker = conf.broker()?;
//! let http = tokio::net::TcpListener::bind(("0.0.0.0", conf.http_api_port)).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let emulator = Emulator::start(conf, FleetOptions::default(), broker, http, shutdown.clone())?;
//! emulator.wait().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod conf;
pub mod error;
pub mod faults;
pub mod fleet;
pub mod link;
pub mod model_sensor;
pub mod sensor;

use std::net::SocketAddr;
use std::sync::Arc;

use entwine_core::input::InputError;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use conf::DeviceConf;
pub use error::DeviceError;
use faults::FaultPlan;
use fleet::{Broker, FleetOptions, FleetStats};
use link::Delivery;

/// A running emulator: its devices and its HTTP API.
#[derive(Debug)]
pub struct Emulator {
    /// The fleet's counters.
    pub stats: Arc<FleetStats>,
    /// Where the HTTP API listens.
    pub http_address: SocketAddr,
    /// The device ids: the seed's devices first, then each model group's.
    pub device_ids: Vec<String>,
    conf: Arc<watch::Sender<DeviceConf>>,
    faults: Arc<watch::Sender<FaultPlan>>,
    devices: JoinHandle<Result<(), DeviceError>>,
    api: JoinHandle<std::io::Result<()>>,
}

/// How the devices' HTTP API is served.
#[derive(Debug)]
pub struct DeviceApi {
    /// Where (bound by the caller; port 0 in tests).
    pub listener: tokio::net::TcpListener,
    /// The server's limits (the typed configuration's `http` section).
    pub limits: entwine_http::Limits,
    /// The tokens `GET`/`PUT /conf`, `/faults` and `/stats` ask for (none: open, loopback only).
    pub auth: Arc<entwine_http::Auth>,
}

impl Emulator {
    /// Starts the devices, without faults, and serves the API on `http` until `shutdown` is
    /// cancelled.
    pub fn start(
        conf: DeviceConf,
        options: FleetOptions,
        broker: Broker,
        http: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, DeviceError> {
        Self::start_with_faults(conf, options, FaultPlan::default(), broker, http, shutdown)
    }

    /// As [`Emulator::start`], with `faults` in force from the first message.
    pub fn start_with_faults(
        conf: DeviceConf,
        options: FleetOptions,
        faults: FaultPlan,
        broker: Broker,
        http: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, DeviceError> {
        Self::start_with(
            conf,
            options,
            faults,
            Delivery::default(),
            broker,
            http,
            shutdown,
        )
    }

    /// As [`Emulator::start_with_faults`], with the connections' client ids and buffer size
    /// given by `delivery`.
    pub fn start_with(
        conf: DeviceConf,
        options: FleetOptions,
        faults: FaultPlan,
        delivery: Delivery,
        broker: Broker,
        http: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, DeviceError> {
        let api = DeviceApi {
            listener: http,
            limits: entwine_http::Limits::default(),
            auth: Arc::new(entwine_http::Auth::default()),
        };
        Self::start_serving(conf, options, faults, delivery, broker, api, shutdown)
    }

    /// As [`Emulator::start_with`], the API served with `api`'s limits and tokens. A listener
    /// on an address other than loopback without tokens is refused
    /// ([`entwine_http::check_exposure`]).
    pub fn start_serving(
        conf: DeviceConf,
        options: FleetOptions,
        faults: FaultPlan,
        delivery: Delivery,
        broker: Broker,
        api: DeviceApi,
        shutdown: CancellationToken,
    ) -> Result<Self, DeviceError> {
        let DeviceApi {
            listener: http,
            limits,
            auth,
        } = api;
        conf.validate().map_err(DeviceError::Conf)?;
        let http_address = http.local_addr().map_err(DeviceError::Listener)?;
        entwine_http::check_exposure(http_address, &auth, &[entwine_http::Interface::Device])
            .map_err(DeviceError::Exposed)?;
        let device_ids: Vec<String> = options.devices(&conf)?.into_iter().map(|d| d.id).collect();
        check_plan(&faults, &device_ids).map_err(DeviceError::Faults)?;
        let stats = Arc::new(FleetStats::default());
        let (tx, rx) = watch::channel(conf);
        let tx = Arc::new(tx);
        let (faults_tx, faults_rx) = watch::channel(faults);
        let faults = Arc::new(faults_tx);
        let api = entwine_http::protect(
            api::router(tx.clone(), faults.clone(), stats.clone(), &device_ids),
            auth,
            entwine_http::Interface::Device,
        );
        let api_shutdown = shutdown.clone();
        let api = tokio::spawn(async move {
            entwine_http::serve(
                http,
                api,
                limits,
                async move { api_shutdown.cancelled().await },
            )
            .await
        });
        let conf = tx;
        let devices = tokio::spawn(fleet::run(
            rx,
            faults_rx,
            options,
            delivery,
            broker,
            stats.clone(),
            shutdown,
        ));
        Ok(Self {
            stats,
            http_address,
            device_ids,
            conf,
            faults,
            devices,
            api,
        })
    }

    /// The seed devices' configuration in force, as `GET /conf` answers it, and its changes
    /// (`PUT /conf`).
    pub fn watch_conf(&self) -> watch::Receiver<DeviceConf> {
        self.conf.subscribe()
    }

    /// The fault plan in force, as `GET /faults` answers it, and its changes.
    pub fn watch_faults(&self) -> watch::Receiver<FaultPlan> {
        self.faults.subscribe()
    }

    /// The fault plan in force.
    pub fn faults(&self) -> FaultPlan {
        self.faults.borrow().clone()
    }

    /// Replaces the fault plan, as `PUT /faults` does; it applies from each device's next
    /// message. Refused, naming the field, when a value is out of range or a device is not in
    /// the fleet.
    pub fn set_faults(&self, plan: FaultPlan) -> Result<(), InputError> {
        check_plan(&plan, &self.device_ids)?;
        self.faults.send_replace(plan);
        Ok(())
    }

    /// Waits until the devices and the API have stopped.
    pub async fn wait(self) -> Result<(), DeviceError> {
        self.devices
            .await
            .map_err(|source| DeviceError::Panicked {
                task: "device tasks",
                source,
            })??;
        self.api
            .await
            .map_err(|source| DeviceError::Panicked {
                task: "HTTP API",
                source,
            })?
            .map_err(DeviceError::Api)?;
        Ok(())
    }
}

/// Checks a plan's values and that each device it names is one of the fleet's.
fn check_plan(plan: &FaultPlan, device_ids: &[String]) -> Result<(), InputError> {
    plan.validate()?;
    if plan.devices.is_empty() {
        return Ok(());
    }
    let known: std::collections::HashSet<&str> = device_ids.iter().map(String::as_str).collect();
    match plan.devices.keys().find(|id| !known.contains(id.as_str())) {
        Some(id) => Err(InputError::new(
            format!("devices.{id}"),
            "not a device of this fleet",
        )),
        None => Ok(()),
    }
}
