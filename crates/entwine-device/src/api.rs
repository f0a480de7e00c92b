//! The device's HTTP API, as the seed's: `GET /conf`, `PUT /conf` (204, or 400 naming the bad
//! key), plus `GET /stats` with the fleet's counters ([`FleetStats::to_json`]: `ticks`,
//! `published` (acknowledged by the broker), `unsent` by reason, `queued`, `in_flight`, `resent`,
//! `sessions_lost`, …) and fault injection:
//!
//! - `GET /faults`: the plan, `{"fleet": {…}, "devices": {"<id>": {…}}}`, each entry
//!   `{"delayMs", "jitterMs", "loss", "clockSkewMs"}`.
//! - `PUT /faults`: `{"preset": "layer2-critical"}`, or explicit fields (`delayMs`, `jitterMs`,
//!   `loss`, `clockSkewMs`; those not given are 0), or a preset with fields overriding its values;
//!   with `"device": "<id>"` for that device only, fleet-wide otherwise (devices with faults of
//!   their own keep them). Answers 200 with the new plan; 400 `{"error", "field"}` for a bad
//!   value, 404 for a device not in the fleet.
//! - `DELETE /faults`: no faults anywhere (204); `DELETE /faults?device=<id>`: that device
//!   follows the fleet's faults again.
//!
//! Changes apply from each device's next message.
//!
//! `PUT /conf` changes only what changed: a timer whose period is the same keeps its phase, and a
//! body that changes nothing (`{}`, or what `GET /conf` gave) is answered 204 and disturbs no
//! device. It changes the seed's devices only: a device of a model ([`crate::fleet::ModelGroup`])
//! keeps its model's rate. `/faults` and `/stats` cover every device. Every error is JSON, `{"error": "..."}` naming what was wrong: a bad value (400, with
//! `field`), a body over 64 KiB (413), an unknown path (404), a method a path does not take (405).

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use entwine_core::input::{parse_object, Fields, InputError};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::conf::DeviceConf;
use crate::faults::{FaultPlan, Faults};
use crate::fleet::FleetStats;

#[derive(Clone)]
struct Api {
    conf: Arc<watch::Sender<DeviceConf>>,
    faults: Arc<watch::Sender<FaultPlan>>,
    stats: Arc<FleetStats>,
    devices: Arc<HashSet<String>>,
}

/// The API over the configuration and fault-plan channels the devices watch, for the fleet of
/// `device_ids`.
pub fn router(
    conf: Arc<watch::Sender<DeviceConf>>,
    faults: Arc<watch::Sender<FaultPlan>>,
    stats: Arc<FleetStats>,
    device_ids: &[String],
) -> Router {
    Router::new()
        .route("/conf", get(get_conf).put(put_conf))
        .route(
            "/faults",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
        .route("/stats", get(get_stats))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(json_errors))
        .with_state(Api {
            conf,
            faults,
            stats,
            devices: Arc::new(device_ids.iter().cloned().collect()),
        })
}

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Turns every error answer that is not JSON already (axum's own: 404, 413, a bad query) into
/// `{"error": "..."}`, naming what was wrong; a 405 is left to `entwine_http::serve`, which
/// names the allowed methods.
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    // A 405's `Allow` header is only set outside this router: `entwine_http::serve` names
    // the allowed methods from it.
    if !(status.is_client_error() || status.is_server_error())
        || is_json
        || status == StatusCode::METHOD_NOT_ALLOWED
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("body: larger than the {MAX_BODY_BYTES}-byte limit of {method} {path}")
        }
        StatusCode::NOT_FOUND => {
            format!("path: no {path}; the device API serves /conf, /faults and /stats")
        }
        _ if !text.is_empty() => text,
        _ => format!(
            "{method} {path}: {}",
            status.canonical_reason().unwrap_or("error")
        ),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(json!({ "error": error }).to_string()))
}

fn bad_request(e: &InputError) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": e.to_string(), "field": e.field})),
    )
        .into_response()
}

fn unknown_device(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "error": format!("device: {id:?} is not a device of this fleet"),
            "field": "device",
        })),
    )
        .into_response()
}

async fn get_conf(State(api): State<Api>) -> Json<DeviceConf> {
    Json(api.conf.borrow().clone())
}

async fn put_conf(State(api): State<Api>, body: Bytes) -> Response {
    let patched = parse_object(&body).and_then(|map| {
        let current = api.conf.borrow().clone();
        let schedule = current.patched_schedule(&map)?;
        Ok::<_, InputError>(current.with_schedule(schedule))
    });
    match patched {
        Ok(conf) => {
            // Devices hear of it only when something changed: each restarts only the timer
            // whose period changed.
            api.conf.send_if_modified(|current| {
                if current.schedule() == conf.schedule() {
                    return false;
                }
                tracing::info!(
                    update_period_ms = conf.update_period_ms,
                    update_initial_delay_ms = conf.update_initial_delay_ms,
                    aggregated_telemetry_msg_sec = conf.aggregated_telemetry_msg_sec,
                    "schedule changed"
                );
                *current = conf;
                true
            });
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(&e),
    }
}

async fn get_faults(State(api): State<Api>) -> Json<FaultPlan> {
    Json(api.faults.borrow().clone())
}

async fn put_faults(State(api): State<Api>, body: Bytes) -> Response {
    let parsed = parse_object(&body).and_then(|map| {
        let fields = Fields::new(&map);
        let device = match fields.optional("device") {
            Some(_) => Some(fields.string("device")?.to_owned()),
            None => None,
        };
        Ok::<_, InputError>((device, Faults::from_json(&map, &["device"])?))
    });
    let (device, faults) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return bad_request(&e),
    };
    if let Some(id) = &device {
        if !api.devices.contains(id) {
            return unknown_device(id);
        }
    }
    tracing::info!(
        device = device.as_deref().unwrap_or("(fleet)"),
        delay_ms = faults.delay_ms,
        jitter_ms = faults.jitter_ms,
        loss = faults.loss,
        clock_skew_ms = faults.clock_skew_ms,
        "faults changed"
    );
    api.faults.send_modify(|plan| match device {
        Some(id) => {
            plan.devices.insert(id, faults);
        }
        None => plan.fleet = faults,
    });
    Json(api.faults.borrow().clone()).into_response()
}

/// The query of `DELETE /faults`.
#[derive(Debug, Deserialize)]
struct Target {
    device: Option<String>,
}

async fn delete_faults(State(api): State<Api>, Query(target): Query<Target>) -> Response {
    match target.device {
        Some(id) if !api.devices.contains(&id) => return unknown_device(&id),
        Some(id) => {
            tracing::info!(device = %id, "device faults removed: it follows the fleet's");
            api.faults.send_modify(|plan| {
                plan.devices.remove(&id);
            });
        }
        None => {
            tracing::info!("faults cleared");
            api.faults.send_replace(FaultPlan::default());
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn get_stats(State(api): State<Api>) -> Json<serde_json::Value> {
    let mut stats = api.stats.to_json();
    stats["devices"] = json!(api.devices.len());
    Json(stats)
}
