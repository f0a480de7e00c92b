//! `GET /api/devices/{id}`: an emulated device's configuration and faults, for the dashboard's
//! twin page, where the platform runs the devices (`entwine up`).
//!
//! Answered in process from what the devices watch (the same values as the devices' own
//! `GET /conf` and `GET /faults`), so the page needs no second origin and no second token:
//!
//! ```json
//! {"device_id": "iiot-device-1", "model": null, "api": "http://127.0.0.1:9090",
//!  "conf": {"deviceId": "iiot-device", …}, "faults": {"delayMs": 0, …}, "own_faults": false}
//! ```
//!
//! `conf` is the seed devices' `device_conf.yaml` (null for a device of a model, which keeps its
//! model's rate); `faults` the ones the device follows, its own (`own_faults`) or the fleet's.
//! 404 for a device the platform does not emulate, and for every device where it emulates none.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use entwine_core::model::{Binding, ModelSet};
use entwine_device::conf::DeviceConf;
use entwine_device::faults::FaultPlan;
use entwine_http::{protect, Auth, Interface};
use serde_json::json;
use tokio::sync::watch;

use super::{twin_id, ApiError};

/// The emulated devices as the API sees them.
#[derive(Debug)]
pub struct DeviceView {
    /// Where the devices' own API listens.
    pub api: SocketAddr,
    /// The devices.
    pub device_ids: HashSet<String>,
    /// The seed devices' configuration.
    pub conf: watch::Receiver<DeviceConf>,
    /// The fault plan.
    pub faults: watch::Receiver<FaultPlan>,
}

#[derive(Clone)]
struct Devices {
    view: Arc<OnceLock<DeviceView>>,
    models: Arc<ModelSet>,
}

/// The route over `view`, set once the devices run (until then, and if never, every device is
/// a 404), protected as the twins API.
pub fn router(view: Arc<OnceLock<DeviceView>>, models: Arc<ModelSet>, auth: Arc<Auth>) -> Router {
    protect(
        Router::new()
            .route("/api/devices/{id}", get(device))
            .with_state(Devices { view, models }),
        auth,
        Interface::Api,
    )
}

async fn device(
    State(devices): State<Devices>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = twin_id(path)?;
    let Some(view) = devices.view.get() else {
        return Err(ApiError::NotFound(
            "no emulated devices in this process".into(),
        ));
    };
    if !view.device_ids.contains(&id) {
        return Err(ApiError::NotFound(format!("no emulated device {id:?}")));
    }
    let model = match devices.models.bind(&id) {
        Binding::Seed => None,
        Binding::Model(m) => Some(m.id.clone()),
    };
    let conf = match model {
        None => serde_json::to_value(&*view.conf.borrow()).unwrap_or_default(),
        Some(_) => serde_json::Value::Null,
    };
    let plan = view.faults.borrow();
    Ok(Json(json!({
        "device_id": id,
        "model": model,
        "api": format!("http://{}", view.api),
        "conf": conf,
        "faults": plan.for_device(&id),
        "own_faults": plan.devices.contains_key(&id),
    }))
    .into_response())
}
