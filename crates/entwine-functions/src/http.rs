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

use crate::handlers::{Function, FunctionError, TwinFunctions};

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
            FunctionError::Store(StoreError::Conflict(e)) => (
                StatusCode::CONFLICT,
                json!({"error": e.to_string(), "field": e.field}),
            ),
            FunctionError::Store(e @ (StoreError::Unavailable(_) | StoreError::NotMigrated(_))) => {
                // The operator's (or time's) to fix; the caller retries until it passes.
                let reason = e.reason();
                tracing::warn!(error = %error_chain(e), %reason, "store unavailable: answering 503, retry later");
                metrics::counter!("entwine_store_unavailable_total", "reason" => reason)
                    .increment(1);
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
        Err(ApiError(FunctionError::Store(StoreError::Conflict(_)))) => "conflict",
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

async fn digital(
    State(functions): State<Arc<TwinFunctions>>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::DigitalEvent, async {
        let input = json_object(request).await?;
        Ok(Json(functions.digital_event(&input).await?).into_response())
    })
    .await
}

async fn dead_letter(
    State(functions): State<Arc<TwinFunctions>>,
    request: Request,
) -> Result<Response, ApiError> {
    observed(Function::DeadLetter, async {
        let input = json_object(request).await?;
        Ok(Json(functions.dead_letter(&input).await?).into_response())
    })
    .await
}

/// The handler of `function`, with the methods it answers.
fn handler(function: Function) -> axum::routing::MethodRouter<Arc<TwinFunctions>> {
    match function {
        Function::PhysicalEvent => post(physical_event),
        Function::Shadow => post(shadow),
        Function::Twin => post(twin),
        Function::DigitalEvent => post(digital),
        // Only POST evaluates (what a Fission TimeTrigger sends by default, and our spec
        // says): a GET or HEAD is a 405 naming POST, so a crawler or a probe changes nothing.
        Function::TwinEvaluator => post(evaluate),
        Function::DeadLetter => post(dead_letter),
    }
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
