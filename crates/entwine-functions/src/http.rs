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

/// A function's route: reads the body as a JSON object (the twin evaluator reads none) and
/// runs the function on it, through the same entry point in-process callers use
/// ([`TwinFunctions::invoke`]), counted and timed as one call.
async fn call(
    function: Function,
    functions: Arc<TwinFunctions>,
    request: Request,
) -> Result<Response, ApiError> {
    let answer = crate::invoke::observed(function, async {
        let input = if function == Function::TwinEvaluator {
            Map::new()
        } else {
            json_object(request).await?
        };
        functions.invoke(function, &input).await
    })
    .await?;
    Ok(Json(answer).into_response())
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
