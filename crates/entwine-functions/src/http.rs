//! HTTP adapters: the functions behind axum routers, with the seed's error shape
//! (`{"error": "…"}`) and truthful statuses (400 bad input, 503 store unavailable).
//!
//! A route takes a JSON object, at most [`MAX_BODY_BYTES`], and answers what the function
//! answers. The four routes of the chain also take a **batch**: a JSON array of such objects,
//! at most [`MAX_BATCH_ELEMENTS`] of them and [`MAX_BATCH_BODY_BYTES`] in all (the batch's
//! own limit; an empty array is refused), answered `200` with an array of as many elements,
//! in order: element *i* is what the single call answers for element *i*, or, when that
//! element alone is refused, `{"error": "…", "field": "…", "status": 400}` (409 for a
//! conflict, 500 for a corrupt row; [`crate::invoke::element_failure`]); the others go on. A
//! failure of the store itself (503, 500) fails the whole batch, answered as the single call
//! would be. The twin evaluator and the dead-letter handler take objects only.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use entwine_core::input::parse_object;
use entwine_core::InputError;
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

use crate::handlers::{Element, Function, FunctionError, TwinFunctions};

/// Largest request body accepted: 64 KiB. The seed device's largest configurable payload is far
/// below it; anything bigger is a mistake or an attack.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most elements of one batch (a JSON array body of the chain's routes): 256. More is refused
/// whole (400, field `body`); the connector never sends more.
pub const MAX_BATCH_ELEMENTS: usize = 256;

/// Largest batch body accepted (a JSON array, the batch's own limit): 1 MiB. An object body
/// is still limited to [`MAX_BODY_BYTES`]; the connector never sends a larger batch.
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// A function failure as an HTTP response.
#[derive(Debug)]
pub struct ApiError(FunctionError);

impl From<FunctionError> for ApiError {
    fn from(e: FunctionError) -> Self {
        Self(e)
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        Self(FunctionError::Input(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = crate::invoke::failure(&self.0);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(body)).into_response()
    }
}

/// An error and its causes, `: `-separated, for one log line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `content_type` is JSON: `application/json` or `application/…+json`.
fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    })
}

fn too_large(limit: usize) -> InputError {
    InputError::new("body", format!("larger than {limit} bytes"))
}

/// Whitespace as JSON has it.
fn is_json_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// What a body's first byte that is not whitespace says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Opens an array: a batch, held to [`MAX_BATCH_BODY_BYTES`].
    Batch,
    /// Anything else (an object, or a mistake), held to [`MAX_BODY_BYTES`].
    Single,
}

/// A body's bytes and its [`Kind`], decided as soon as its first byte that is not whitespace
/// arrives, before the rest is read (a declared `Content-Length` over the kind's limit is
/// refused without reading on; until then, whitespace is held to [`MAX_BODY_BYTES`]). With
/// `peek`, reading stops there: only the kind is answered.
async fn read_body(request: Request, peek: bool) -> Result<(Bytes, Kind), InputError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = request.into_body();
    let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut bytes = Vec::with_capacity(capacity.min(MAX_BODY_BYTES));
    let mut kind: Option<Kind> = None;
    loop {
        if kind.is_none() {
            if let Some(&first) = bytes.iter().find(|&&b| !is_json_space(b)) {
                let decided = if first == b'[' {
                    Kind::Batch
                } else {
                    Kind::Single
                };
                if peek {
                    return Ok((Bytes::new(), decided));
                }
                if declared.is_some_and(|n| n > limit(decided) as u64) {
                    return Err(too_large(limit(decided)));
                }
                kind = Some(decided);
            }
        }
        let allowed = limit(kind.unwrap_or(Kind::Single));
        if bytes.len() > allowed {
            return Err(too_large(allowed));
        }
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                // A client that went away mid-body, or the server's body deadline.
                return Err(InputError::new("body", format!("cannot be read: {e}")));
            }
        }
    }
    Ok((Bytes::from(bytes), kind.unwrap_or(Kind::Single)))
}

fn limit(kind: Kind) -> usize {
    match kind {
        Kind::Batch => MAX_BATCH_BODY_BYTES,
        Kind::Single => MAX_BODY_BYTES,
    }
}

/// A request body as [`json_body`] reads it.
#[derive(Debug)]
pub enum JsonBody {
    /// A JSON object: one call's input.
    Object(Map<String, Value>),
    /// A JSON array: a batch, each element its value, or its refusal when its text is larger
    /// than [`MAX_BODY_BYTES`] (as the same object alone would be refused) or holds a number
    /// out of range (`1e999`, naming the field, as alone). A token JSON has no place for
    /// (`NaN`, `Infinity`) makes the whole body invalid: it is refused whole, naming the
    /// element and the field (`[1].data.iot.sensor.energy`).
    Batch(Vec<Result<Value, InputError>>),
}

/// Reads a request body as a JSON object or a batch (an array): `Content-Type:
/// application/json` (or `…+json`), at most [`MAX_BODY_BYTES`] for an object and
/// [`MAX_BATCH_BODY_BYTES`] for an array, valid JSON, an object or an array. An element of an
/// array is checked as an object body is for its size and numbers; the rest is the
/// function's to check.
pub async fn json_body(request: Request) -> Result<JsonBody, InputError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    if !is_json(content_type.as_deref()) {
        return Err(InputError::new(
            "content-type",
            format!(
                "expected application/json, got {}",
                content_type.as_deref().unwrap_or("none")
            ),
        ));
    }
    let (bytes, kind) = read_body(request, false).await?;
    if kind == Kind::Single {
        return parse_object(&bytes).map(JsonBody::Object);
    }
    // Each element's own text, to hold it to what it would be held to alone.
    let elements: Vec<&serde_json::value::RawValue> = match serde_json::from_slice(&bytes) {
        Ok(elements) => elements,
        // Not JSON: the single call's reading names the field of a non-finite number.
        Err(e) => {
            return Err(parse_object(&bytes)
                .err()
                .unwrap_or_else(|| InputError::new("body", format!("not valid JSON: {e}"))))
        }
    };
    Ok(JsonBody::Batch(
        elements
            .into_iter()
            .map(|raw| {
                let text = raw.get();
                if text.len() > MAX_BODY_BYTES {
                    return Err(too_large(MAX_BODY_BYTES));
                }
                serde_json::from_str::<Value>(text).map_err(|e| {
                    // A number out of range (`1e999`), which only a full reading refuses.
                    parse_object(text.as_bytes())
                        .err()
                        .unwrap_or_else(|| InputError::new("body", format!("not valid JSON: {e}")))
                })
            })
            .collect(),
    ))
}

/// The refusal of a body that is not an object, where only an object is taken.
fn not_an_object(kind: &str) -> InputError {
    InputError::new("body", format!("expected a JSON object, got {kind}"))
}

/// A function's route: reads the body as a JSON object or, for the chain's four, a batch (the
/// twin evaluator reads none, but refuses an array), and runs the function on it through the
/// same entry points in-process callers use ([`TwinFunctions::invoke`],
/// [`TwinFunctions::invoke_elements`]), counted and timed as one call or one batch.
async fn call(
    function: Function,
    functions: Arc<TwinFunctions>,
    request: Request,
) -> Result<Response, ApiError> {
    let body = if function == Function::TwinEvaluator {
        // Its input is ignored (a timer sends what it sends), except an array: it takes no batch.
        match read_body(request, true).await {
            Ok((_, Kind::Batch)) => Err(not_an_object("an array")),
            _ => Ok(JsonBody::Object(Map::new())),
        }
    } else {
        json_body(request).await
    };
    match body {
        Ok(JsonBody::Batch(inputs)) if function.takes_batches() => {
            let elements: Vec<Element<'_>> = inputs
                .iter()
                .map(|input| input.as_ref().map_err(Clone::clone))
                .collect();
            let each = crate::invoke::observed_batch(
                function,
                elements.len(),
                functions.invoke_elements(function, &elements),
            )
            .await?;
            Ok(Json(crate::invoke::batch_answer(each)).into_response())
        }
        body => {
            let answer = crate::invoke::observed(function, async {
                let input = match body? {
                    JsonBody::Object(map) => map,
                    JsonBody::Batch(_) => return Err(not_an_object("an array").into()),
                };
                functions.invoke(function, &input).await
            })
            .await?;
            Ok(Json(answer).into_response())
        }
    }
}

/// The handler of `function`, with the methods it answers.
///
/// Every function answers POST only: for the twin evaluator that is what a Fission TimeTrigger
/// sends by default (and our spec says), so a GET or HEAD from a crawler or a probe is a 405
/// naming POST and changes nothing.
fn handler(function: Function) -> axum::routing::MethodRouter<Arc<TwinFunctions>> {
    post(
        move |State(functions): State<Arc<TwinFunctions>>, request: Request| {
            call(function, functions, request)
        },
    )
}

/// The router of one function, answering on `/` (what Fission's router sends to a function
/// behind an exact-path trigger) and on the function's own route.
pub fn function_router(function: Function, functions: Arc<TwinFunctions>) -> Router {
    with_fallbacks(
        Router::new()
            .route("/", handler(function))
            .route(function.route(), handler(function))
            .with_state(functions),
    )
}

/// All the functions on their routes, as Fission's router exposes them: the local router.
pub fn router(functions: Arc<TwinFunctions>) -> Router {
    with_fallbacks(routes(functions))
}

/// The functions' routes without the JSON fallbacks, to merge into a larger router.
pub fn routes(functions: Arc<TwinFunctions>) -> Router {
    Function::ALL
        .into_iter()
        .fold(Router::new(), |router, function| {
            router.route(function.route(), handler(function))
        })
        .with_state(functions)
}

/// Adds JSON answers for unknown paths (404) and methods: a 405 names the methods the path
/// allows, as its `Allow` header does (`{"error": "GET is not allowed on /physicalevents;
/// allowed: POST"}`), and every other error that is not JSON becomes `{"error": …}`
/// ([`entwine_http::json_errors`]).
pub fn with_fallbacks(router: Router) -> Router {
    entwine_http::json_errors(router.fallback(|request: Request<Body>| async move {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no function at {}", request.uri().path())})),
        )
    }))
}

/// `GET /metrics`: what `handle`'s recorder holds, in Prometheus' text format (requests and
/// latency per function, batch sizes, store errors, digital events), asking for a token of
/// `auth` as [`entwine_http::Interface::Metrics`] (open with `auth.metrics=false`).
pub fn metrics_router(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    auth: Arc<entwine_http::Auth>,
) -> Router {
    let metrics = Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    );
    entwine_http::protect(metrics, auth, entwine_http::Interface::Metrics)
}
