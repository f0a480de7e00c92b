//! The IIoT device emulator of entwine, compatible with the seed's device: the same
//! `device_conf.yaml`, topics, payloads, sensor random walks and HTTP API (`GET`/`PUT /conf`),
//! and beyond it a fleet mode (thousands of devices from one process), QoS 1 telemetry and
//! reconnection with backoff.
//!
//! # Layout
//! - [`conf`]: `device_conf.yaml` and the run-time schedule changes of `PUT /conf`.
//! - [`sensor`]: the random walks and the payloads.
//! - [`fleet`]: device tasks and their shared MQTT connections.
//! - [`api`]: the HTTP API.
//!
//! # Example
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use entwine_device::{conf::DeviceConf, fleet::{Broker, FleetOptions}, Emulator};
//! let conf = DeviceConf::load("device_conf.yaml".as_ref())?;
//! let broker = Broker { host: conf.target_mqtt_broker_address.clone(), port: conf.target_mqtt_broker_port };
//! let http = tokio::net::TcpListener::bind(("0.0.0.0", conf.http_api_port)).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let emulator = Emulator::start(conf, FleetOptions::default(), broker, http, shutdown.clone())?;
//! emulator.wait().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod conf;
pub mod fleet;
pub mod sensor;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use conf::DeviceConf;
use fleet::{Broker, FleetOptions, FleetStats};

/// A running emulator: its devices and its HTTP API.
#[derive(Debug)]
pub struct Emulator {
    /// The fleet's counters.
    pub stats: Arc<FleetStats>,
    /// Where the HTTP API listens.
    pub http_address: SocketAddr,
    /// The device ids.
    pub device_ids: Vec<String>,
    devices: JoinHandle<anyhow::Result<()>>,
    api: JoinHandle<std::io::Result<()>>,
}

impl Emulator {
    /// Starts the devices and serves the API on `http` until `shutdown` is cancelled.
    pub fn start(
        conf: DeviceConf,
        options: FleetOptions,
        broker: Broker,
        http: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        conf.validate()
            .map_err(|e| anyhow::anyhow!("invalid device configuration: {e}"))?;
        let http_address = http.local_addr().context("API listener has no address")?;
        let device_ids = options.device_ids(&conf);
        let stats = Arc::new(FleetStats::default());
        let (tx, rx) = watch::channel(conf);
        let tx = Arc::new(tx);
        let api = api::router(tx.clone(), stats.clone(), device_ids.len());
        let api_shutdown = shutdown.clone();
        let api = tokio::spawn(async move {
            axum::serve(http, api)
                .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
                .await
        });
        let devices = tokio::spawn(fleet::run(rx, options, broker, stats.clone(), shutdown));
        Ok(Self {
            stats,
            http_address,
            device_ids,
            devices,
            api,
        })
    }

    /// Waits until the devices and the API have stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.devices.await.context("device tasks panicked")??;
        self.api
            .await
            .context("HTTP API panicked")?
            .context("HTTP API failed")?;
        Ok(())
    }
}
