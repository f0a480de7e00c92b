//! The twins API of the local platform:
//!
//! - `GET /api/twins?lifecycle=&model=&q=&sort=&order=&offset=&limit=&after=`: the twins as
//!   they stand (lifecycle, ODTE and its factors, last physical and digital timestamps, model),
//!   kept by lifecycle, by model (`seed` for the seed's devices) and by a case-insensitive part
//!   of the device id (`q`), sorted by `device_id` (byte order, the default), `odte`,
//!   `lifecycle`, `since`, `evaluated_at` or `last_digital_timestamp` (ties by device id),
//!   `order` `asc` (default) or `desc`; `limit` per page (default 100, at most 1000) from
//!   `offset`, or after the device id `after`; `total` counts the twins the filters keep, and
//!   `next` names the following page, `null` on the last one (see [`fleet`]);
//! - `GET /api/fleet`: twins by lifecycle and by model, the distribution of their ODTE, and
//!   the dead letters stored ([`fleet::FleetSummary`]);
//! - `GET /api/twins/{id}`: one twin (404 when the device has no evaluated state);
//! - `GET /api/twins/{id}/history?since=&limit=`: its evaluated states, newest first, `limit`
//!   per page (default 100, at most 1000); `next` names the following page (a `before` /
//!   `before_id` cursor);
//! - `GET /api/twins/{id}/series?from=&to=&step=`: its states in `[from, to)` (ms; default the
//!   last hour) in buckets of `step` ms (default: the smallest of 1 s … 1 day giving at most 600
//!   buckets; at most 10,000): per non-empty bucket `t`, `count`, `odte` `{avg, min, max}`, mean
//!   `availability`, `reliability`, `timeliness`, the latest state's `lifecycle`, and `readings`
//!   by name `{avg, min, max}`; 404 like the twin's (see `series`);
//! - `GET /api/stream[?device_id=][&events=digitalstate,lifecycle]`: a live stream
//!   (Server-Sent Events) of digital states (event `digitalstate`) and of lifecycle changes
//!   (event `lifecycle`, a [`TwinChange`], also when the evaluator finds a device silent), both
//!   unless `events` names one;
//! - `GET /api/devices/{id}`: an emulated device's configuration and faults, where the platform
//!   runs the devices ([`devices`]);
//! - `GET /metrics`: Prometheus text format.
//!
//! Errors are `{"error": "…"}`: 400 for a bad query parameter (named) or a twin id that is not
//! UTF-8 or holds a NUL character, 404 for an unknown twin, 503 when the store is unavailable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use entwine_core::model::{Binding, ModelSet};
use entwine_functions::handlers::DigitalFeed;
use entwine_functions::http::error_chain;
use entwine_http::{protect, protect_stream, Auth, Interface};
use entwine_store::{HistoryCursor, Store, StoreError, TwinChange};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

pub mod devices;
pub mod fleet;
mod series;

/// Longest page of history or of twins.
pub const MAX_PAGE: u32 = 1000;
/// Page size (history, twins) when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;

#[derive(Clone)]
struct Api {
    store: Store,
    models: Arc<ModelSet>,
    feed: DigitalFeed,
    lifecycle: broadcast::Sender<TwinChange>,
    closing: CancellationToken,
}

/// The API over `store`, streaming what the digital-event handler announces on `feed` and the
/// lifecycle changes announced on `lifecycle` until `closing` is cancelled (a live stream would
/// otherwise hold a graceful shutdown forever), and rendering `metrics` when a recorder is
/// installed.
///
/// Every route asks for a token of `auth` (none configured: open, on loopback only): the twins
/// API and the stream as [`Interface::Api`] (the stream also takes `?access_token=`, for a
/// browser's `EventSource`), `/metrics` as [`Interface::Metrics`].
pub fn router(
    store: Store,
    models: Arc<ModelSet>,
    feed: DigitalFeed,
    lifecycle: broadcast::Sender<TwinChange>,
    metrics: Option<PrometheusHandle>,
    closing: CancellationToken,
    auth: Arc<Auth>,
) -> Router {
    let state = Api {
        store,
        models,
        feed,
        lifecycle,
        closing,
    };
    let api = Router::new()
        .route("/api/twins", get(fleet::twins))
        .route("/api/fleet", get(fleet::fleet))
        .route("/api/twins/{id}", get(twin))
        .route("/api/twins/{id}/history", get(history))
        .route("/api/twins/{id}/series", get(series::series))
        .route("/api/deadletters", get(dead_letters))
        .with_state(state.clone());
    let stream = Router::new()
        .route("/api/stream", get(stream))
        .with_state(state.clone());
    // The function binaries' `/metrics` route; without a recorder, a 404 that says so.
    let metrics = match metrics {
        Some(handle) => entwine_functions::http::metrics_router(handle, auth.clone()),
        None => Router::new().route(
            "/metrics",
            get(|| async {
                (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "no metrics recorder in this process"})),
                )
            }),
        ),
    };
    protect(api, auth.clone(), Interface::Api)
        .merge(protect_stream(stream, auth, Interface::Api))
        .merge(metrics)
}

impl Api {
    /// The model `device` is bound to, none for the seed's device.
    fn model_of(&self, device: &str) -> Option<String> {
        match self.models.bind(device) {
            Binding::Seed => None,
            Binding::Model(m) => Some(m.id.clone()),
        }
    }
}

enum ApiError {
    BadParameter(String, String),
    NotFound(String),
    Store(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::BadParameter(name, reason) => {
                (StatusCode::BAD_REQUEST, format!("{name}: {reason}"))
            }
            Self::NotFound(message) => (StatusCode::NOT_FOUND, message),
            Self::Store(e) if e.is_transient() || matches!(e, StoreError::NotMigrated(_)) => {
                tracing::warn!(error = %error_chain(&e), "store unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Self::Store(e) => {
                tracing::error!(error = %error_chain(&e), "twins API failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

/// Query parameters, checked against the names a route accepts.
struct Params(HashMap<String, String>);

impl Params {
    fn new(raw: HashMap<String, String>, accepted: &[&str]) -> Result<Self, ApiError> {
        if let Some(unknown) = raw.keys().find(|k| !accepted.contains(&k.as_str())) {
            return Err(ApiError::BadParameter(
                unknown.clone(),
                format!("unknown parameter (accepted: {})", accepted.join(", ")),
            ));
        }
        Ok(Self(raw))
    }

    fn integer(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ApiError> {
        let Some(raw) = self.0.get(name) else {
            return Ok(None);
        };
        let value: i64 = raw.parse().map_err(|_| {
            ApiError::BadParameter(name.into(), format!("{raw:?} is not an integer"))
        })?;
        if !range.contains(&value) {
            return Err(ApiError::BadParameter(
                name.into(),
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ));
        }
        Ok(Some(value))
    }
}

/// The `{id}` of a twin's path: UTF-8 without NUL (which no device id holds, and PostgreSQL
/// refuses in a query).
fn twin_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadParameter("id".into(), e.body_text()))?;
    if id.contains('\0') {
        return Err(ApiError::BadParameter(
            "id".into(),
            "contains a NUL character".into(),
        ));
    }
    Ok(id)
}

async fn twin(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = twin_id(path)?;
    match api.store.twin(&id).await? {
        Some(mut twin) => {
            twin.model = api.model_of(&twin.device_id);
            Ok(Json(twin).into_response())
        }
        None => Err(ApiError::NotFound(format!("no twin {id:?}"))),
    }
}

async fn history(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = twin_id(path)?;
    let params = Params::new(raw, &["since", "before", "before_id", "limit"])?;
    let since = params.integer("since", 0..=i64::MAX)?.unwrap_or(0);
    let cursor = HistoryCursor {
        timestamp: params.integer("before", 0..=i64::MAX)?.unwrap_or(i64::MAX),
        id: params
            .integer("before_id", 0..=i64::from(i32::MAX))?
            .map_or(i32::MAX, |id| id as i32),
    };
    let limit = params
        .integer("limit", 1..=i64::from(MAX_PAGE))?
        .map_or(DEFAULT_PAGE, |l| l as u32);
    if api.store.twin(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no twin {id:?}")));
    }
    let items = api.store.history(&id, since, cursor, limit).await?;
    let next = match items.last() {
        Some(oldest) if items.len() == limit as usize => Some(format!(
            "/api/twins/{}/history?since={since}&before={}&before_id={}&limit={limit}",
            encode_path_segment(&id),
            oldest.timestamp,
            oldest.id
        )),
        _ => None,
    };
    Ok(Json(HistoryPage {
        device_id: id,
        items,
        next,
    })
    .into_response())
}

/// A page of dead letters, newest first.
#[derive(serde::Serialize)]
struct DeadLettersPage {
    /// Distinct dead letters stored, and the refusals they add up to.
    total: i64,
    deliveries: i64,
    items: Vec<entwine_store::StoredDeadLetter>,
    next: Option<String>,
}

/// `GET /api/deadletters?before=&limit=`: the messages the pipeline refused, newest first.
async fn dead_letters(
    State(api): State<Api>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let params = Params::new(raw, &["before", "limit"])?;
    let before = params.integer("before", 1..=i64::MAX)?;
    let limit = params
        .integer("limit", 1..=i64::from(MAX_PAGE))?
        .map_or(DEFAULT_PAGE, |l| l as u32);
    let items = api.store.dead_letters(limit, before).await?;
    let (total, deliveries) = api.store.dead_letter_count().await?;
    let next = match items.last() {
        Some(oldest) if items.len() == limit as usize => Some(format!(
            "/api/deadletters?before={}&limit={limit}",
            oldest.id
        )),
        _ => None,
    };
    Ok(Json(DeadLettersPage {
        total,
        deliveries,
        items,
        next,
    })
    .into_response())
}

/// `segment` percent-encoded for a URL path: everything but RFC 3986's unreserved characters.
fn encode_path_segment(segment: &str) -> String {
    const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(segment, NOT_UNRESERVED).to_string()
}

/// A page of history; serialized directly so readings keep their `REAL` precision.
#[derive(serde::Serialize)]
struct HistoryPage {
    device_id: String,
    items: Vec<entwine_store::HistoryEntry>,
    next: Option<String>,
}

/// The kinds of event the live stream carries.
#[derive(Debug, Clone, Copy)]
struct StreamEvents {
    digital_states: bool,
    lifecycle_changes: bool,
}

impl StreamEvents {
    fn parse(raw: Option<&String>) -> Result<Self, ApiError> {
        let Some(raw) = raw else {
            return Ok(Self {
                digital_states: true,
                lifecycle_changes: true,
            });
        };
        let mut events = Self {
            digital_states: false,
            lifecycle_changes: false,
        };
        for name in raw.split(',') {
            match name.trim() {
                "digitalstate" => events.digital_states = true,
                "lifecycle" => events.lifecycle_changes = true,
                other => {
                    return Err(ApiError::BadParameter(
                        "events".into(),
                        format!("{other:?} is not digitalstate or lifecycle"),
                    ))
                }
            }
        }
        Ok(events)
    }
}

async fn stream(
    State(api): State<Api>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // `access_token` was read by `protect_stream` (a browser's EventSource sends no header).
    let params = Params::new(raw, &["device_id", "events", "access_token"])?;
    let events = StreamEvents::parse(params.0.get("events"))?;
    let device = params.0.get("device_id").cloned();
    let wanted = {
        let device = device.clone();
        move |id: &str| device.as_deref().is_none_or(|d| d == id)
    };
    // Subscribed before answering, so that nothing announced after the answer is missed; a
    // lagging client skips what it missed rather than stalling the pipeline.
    let states = events.digital_states.then(|| api.feed.subscribe());
    let changes = events.lifecycle_changes.then(|| api.lifecycle.subscribe());
    let states =
        futures_util::StreamExt::flat_map(futures_util::stream::iter(states), BroadcastStream::new)
            .filter_map({
                let wanted = wanted.clone();
                move |state| {
                    let state = state.ok()?;
                    if !wanted(state.pending.device_id.as_str()) {
                        return None;
                    }
                    let data = serde_json::to_string(&state).ok()?;
                    Some(Ok(Event::default().event("digitalstate").data(data)))
                }
            });
    let changes = futures_util::StreamExt::flat_map(
        futures_util::stream::iter(changes),
        BroadcastStream::new,
    )
    .filter_map(move |change| {
        let change = change.ok()?;
        if !wanted(&change.device_id) {
            return None;
        }
        let data = serde_json::to_string(&change).ok()?;
        Some(Ok(Event::default().event("lifecycle").data(data)))
    });
    let closing = api.closing.clone().cancelled_owned();
    let events = futures_util::StreamExt::take_until(states.merge(changes), closing);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
