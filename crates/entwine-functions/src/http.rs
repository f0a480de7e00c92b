//! HTTP adapters: the functions behind axum routers, with the seed's error shape
//! (`{"error": "…"}`) and truthful statuses (400 bad input, 503 store unavailable).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use entwine_core::input::parse_object;
use entwine_core::InputError;
use entwine_store::StoreError;
use serde_json::{json, Map, Value};

use crate::handlers::{digital_event, Clock, DigitalFeed, Function, FunctionError, TwinFunctions};
use crate::publisher::DigitalPublisher;

/// Largest request body accepted: 64 KiB. The seed device's largest configurable payload is far
/// below it; anything bigger is a mistake or an attack.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
        let (status, body) = match &self.0 {
            FunctionError::Input(e) | FunctionError::Store(StoreError::Rejected(e)) => (
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string(), "field": e.field}),
            ),
            FunctionError::Store(e @ (StoreError::Unavailable(_) | StoreError::NotMigrated(_))) => {
                tracing::warn!(error = %error_chain(e), "store unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": e.to_string()}),
                )
            }
            FunctionError::Store(e) => {
                tracing::error!(error = %error_chain(e), "function failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal error"}),
                )
            }
        };
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

/// Reads a request body as a JSON object: `Content-Type: application/json` (or `…+json`), at
/// most [`MAX_BODY_BYTES`], valid JSON, an object.
pub async fn json_object(request: Request) -> Result<Map<String, Value>, InputError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    let is_json = content_type.as_deref().is_some_and(|ct| {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if !is_json {
        return Err(InputError::new(
            "content-type",
            format!(
                "expected application/json, got {}",
                content_type.as_deref().unwrap_or("none")
            ),
        ));
    }
    let too_large = || InputError::new("body", format!("larger than {MAX_BODY_BYTES} bytes"));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            // The limit, or a client that went away mid-body.
            let limited = std::error::Error::source(&e)
                .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
            if limited {
                too_large()
            } else {
                InputError::new("body", format!("cannot be read: {e}"))
            }
        })?;
    parse_object(&bytes)
}

/// Records a call's duration and outcome (`entwine_function_duration_seconds`,
/// `entwine_function_calls_total`), by function.
async fn observed(
    function: Function,
    call: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let start = std::time::Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ApiError(FunctionError::Input(_) | FunctionError::Store(StoreError::Rejected(_)))) => {
            "bad_input"
        }
        Err(ApiError(FunctionError::Store(
            StoreError::Unavailable(_) | StoreError::NotMigrated(_),
        ))) => "unavailable",
        Err(_) => "internal",
    };
    metrics::histogram!("entwine_function_duration_seconds", "function" => function.name())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("entwine_function_calls_total", "function" => function.name(), "outcome" => outcome)
        .increment(1);
    result
}

async fn physical_event(
    State(functions): State<Arc<TwinFunctions>>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::PhysicalEvent, async {
        let input = json_object(request).await?;
        Ok(Json(functions.physical_event(&input).await?).into_response())
    })
    .await
}

async fn shadow(
    State(functions): State<Arc<TwinFunctions>>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::Shadow, async {
        let input = json_object(request).await?;
        Ok(Json(functions.shadow(&input).await?).into_response())
    })
    .await
}

async fn twin(
    State(functions): State<Arc<TwinFunctions>>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::Twin, async {
        let input = json_object(request).await?;
        Ok(Json(functions.twin(&input).await?).into_response())
    })
    .await
}

async fn evaluate(State(functions): State<Arc<TwinFunctions>>) -> Result<Response, ApiError> {
    observed(Function::TwinEvaluator, async {
        Ok(Json(functions.evaluate_twins().await?).into_response())
    })
    .await
}

/// What the digital-event handler needs: a clock, and where to announce states.
#[derive(Clone)]
pub struct DigitalEvents {
    /// The clock timestamps are checked against.
    pub clock: Arc<dyn Clock>,
    /// The in-process feed, if any.
    pub feed: Option<DigitalFeed>,
    /// The digital broker's publisher, if one is configured.
    pub publisher: Option<DigitalPublisher>,
}

impl DigitalEvents {
    /// What the digital-event handler of `functions` needs.
    pub fn of(functions: &TwinFunctions) -> Self {
        Self {
            clock: functions.clock().clone(),
            feed: functions.feed().cloned(),
            publisher: functions.publisher().cloned(),
        }
    }
}

async fn digital(
    State(events): State<DigitalEvents>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::DigitalEvent, async {
        let input = json_object(request).await?;
        let state = digital_event(
            &input,
            events.clock.as_ref(),
            events.feed.as_ref(),
            events.publisher.as_ref(),
        )?;
        Ok(Json(state).into_response())
    })
    .await
}

/// The router of one store-backed function, answering POST on `/` (what Fission's router sends
/// to a function behind an exact-path trigger) and on the function's own route.
/// [`Function::DigitalEvent`] gets [`digital_event_router`], which does not touch the store.
pub fn function_router(function: Function, functions: Arc<TwinFunctions>) -> Router {
    if function == Function::DigitalEvent {
        return digital_event_router(DigitalEvents::of(&functions));
    }
    let handler = match function {
        Function::PhysicalEvent => post(physical_event),
        Function::Shadow => post(shadow),
        // Only POST evaluates (what a Fission TimeTrigger sends by default, and our spec
        // says): a GET or HEAD is a 405 naming POST, so a crawler or a probe changes nothing.
        Function::TwinEvaluator => post(evaluate),
        Function::Twin | Function::DigitalEvent => post(twin),
    };
    with_fallbacks(
        Router::new()
            .route("/", handler.clone())
            .route(function.route(), handler)
            .with_state(functions),
    )
}

/// The digital-event handler's router: `/` and `/digitalstates`. It needs no store.
pub fn digital_event_router(events: DigitalEvents) -> Router {
    with_fallbacks(
        Router::new()
            .route("/", post(digital))
            .route(Function::DigitalEvent.route(), post(digital))
            .with_state(events),
    )
}

/// All five functions on their routes, as Fission's router exposes them: the local router.
pub fn router(functions: Arc<TwinFunctions>) -> Router {
    with_fallbacks(routes(functions))
}

/// The five routes without the JSON fallbacks, to merge into a larger router.
pub fn routes(functions: Arc<TwinFunctions>) -> Router {
    let events = DigitalEvents::of(&functions);
    Router::new()
        .route(Function::PhysicalEvent.route(), post(physical_event))
        .route(Function::Shadow.route(), post(shadow))
        .route(Function::Twin.route(), post(twin))
        .route(Function::TwinEvaluator.route(), post(evaluate))
        .with_state(functions)
        .route(
            Function::DigitalEvent.route(),
            post(digital).with_state(events),
        )
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
