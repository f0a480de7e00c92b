//! The device's HTTP API, as the seed's: `GET /conf`, `PUT /conf` (204, or 400 naming the bad
//! key), plus `GET /stats` with the fleet's counters.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use entwine_core::input::{parse_object, InputError};
use serde_json::json;
use tokio::sync::watch;

use crate::conf::DeviceConf;
use crate::fleet::FleetStats;

#[derive(Clone)]
struct Api {
    conf: Arc<watch::Sender<DeviceConf>>,
    stats: Arc<FleetStats>,
    devices: usize,
}

/// The API over the configuration channel the devices watch.
pub fn router(
    conf: Arc<watch::Sender<DeviceConf>>,
    stats: Arc<FleetStats>,
    devices: usize,
) -> Router {
    Router::new()
        .route("/conf", get(get_conf).put(put_conf))
        .route("/stats", get(get_stats))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(Api {
            conf,
            stats,
            devices,
        })
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
            tracing::info!(
                update_period_ms = conf.update_period_ms,
                update_initial_delay_ms = conf.update_initial_delay_ms,
                aggregated_telemetry_msg_sec = conf.aggregated_telemetry_msg_sec,
                "configuration changed, timers restart"
            );
            api.conf.send_replace(conf);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string(), "field": e.field})),
        )
            .into_response(),
    }
}

async fn get_stats(State(api): State<Api>) -> Json<serde_json::Value> {
    let mut stats = api.stats.to_json();
    stats["devices"] = json!(api.devices);
    Json(stats)
}
