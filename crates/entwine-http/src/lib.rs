//! The one HTTP server of every entwine process: the Fission function binaries, `entwine up`,
//! the connector's health endpoint and the device emulator's API all serve through [`serve`].
//!
//! What it adds to a plain `axum::serve`:
//!
//! - a **header read timeout** ([`Limits::header_read_timeout`], 10 s): a client that has not
//!   sent a whole request head by then is disconnected. hyper starts that clock whenever a
//!   connection waits for a request head, so it is also the **keep-alive idle timeout**: a
//!   connection idle that long between requests is closed;
//! - a **request-body timeout** ([`Limits::body_timeout`], 30 s): the whole body must arrive
//!   within that time of the request head, else the request is answered
//!   `408 {"error": "body: not received within 30 s"}` and the connection closed (a deadline for
//!   the whole body, not between frames, so a body trickled one byte at a time is cut off too);
//! - a **cap on concurrent connections** ([`Limits::max_connections`], 2048, and never more than
//!   the process's open-file limit allows, less a reserve): connections beyond it wait in the
//!   listener's accept backlog until one closes (the header timeout frees a slot a slow client
//!   holds within 10 s), so the process never runs out of file descriptors;
//! - **JSON errors** ([`json_errors`]): an error response that is not JSON (axum's rejections,
//!   the empty 405 of a route that exists for other methods, a 413) becomes
//!   `{"error": "…"}`, and a 405 names the methods allowed (its `Allow` header too);
//! - **graceful shutdown**: once `shutdown` completes no connection is accepted, idle ones are
//!   closed, requests in flight finish, and [`serve`] returns when the last connection closed.
//!
//! Each limit is settable: the `http` section of `entwine_config` (file, Fission mounts,
//! `ENTWINE_HTTP__HEADER_READ_TIMEOUT`, `ENTWINE_HTTP__BODY_TIMEOUT` in seconds, fractions
//! allowed, and `ENTWINE_HTTP__MAX_CONNECTIONS`), checked by [`Limits::new`];
//! [`Limits::from_env`] reads the environment alone (also the older one-underscore names).
//!
//! Built on hyper's HTTP/1 connection builder (its `header_read_timeout` is what axum 0.8's
//! `serve` does not expose) and hyper-util's graceful shutdown, the crates axum itself uses.

pub mod auth;
pub use auth::{
    check_exposed, check_exposure, protect, protect_stream, Auth, ExposureError, Interface, Tokens,
    TokensError,
};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Default of [`Limits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Limits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// File descriptors kept for everything but HTTP connections (store pool, MQTT, files) when the
/// connection cap is derived from the open-file limit.
const RESERVED_FDS: usize = 128;
/// Longest error body turned into an `{"error"}` message.
const MAX_ERROR_TEXT: usize = 1024;

/// The server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest wait for a whole request head, and for the next request on an idle keep-alive
    /// connection.
    pub header_read_timeout: Duration,
    /// Longest time for a request body to arrive after its head.
    pub body_timeout: Duration,
    /// Most connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A limit set to a value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct LimitsError {
    /// The environment variable.
    pub variable: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Limits {
    /// Limits from values in seconds and a connection count, each checked: a timeout within
    /// 0.001..=86400 seconds, a connection cap within 1..=1000000. An error names the field
    /// (`header_read_timeout`, `body_timeout` or `max_connections`) and what is wrong with it.
    /// `entwine_config` builds the limits of every process with it.
    pub fn new(
        header_read_timeout_s: f64,
        body_timeout_s: f64,
        max_connections: usize,
    ) -> Result<Self, (&'static str, String)> {
        Ok(Self {
            header_read_timeout: timeout(header_read_timeout_s)
                .map_err(|reason| ("header_read_timeout", reason))?,
            body_timeout: timeout(body_timeout_s).map_err(|reason| ("body_timeout", reason))?,
            max_connections: connections(max_connections)
                .map_err(|reason| ("max_connections", reason))?,
        })
    }

    /// The defaults, overridden by `ENTWINE_HTTP__HEADER_READ_TIMEOUT`,
    /// `ENTWINE_HTTP__BODY_TIMEOUT` (seconds) and `ENTWINE_HTTP__MAX_CONNECTIONS`, or their
    /// older names with one underscore (`ENTWINE_HTTP_HEADER_READ_TIMEOUT`, …), which the
    /// double-underscore names override. The environment layer only: `entwine_config` adds the
    /// configuration file and the Fission mounts below it.
    pub fn from_env() -> Result<Self, LimitsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`Limits::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, LimitsError> {
        let mut limits = Self::default();
        let find = |names: [&'static str; 2]| {
            names.into_iter().find_map(|variable| {
                lookup(variable)
                    .filter(|v| !v.is_empty())
                    .map(|raw| (variable, raw))
            })
        };
        let seconds = |names: [&'static str; 2]| -> Result<Option<Duration>, LimitsError> {
            let Some((variable, raw)) = find(names) else {
                return Ok(None);
            };
            let error = |reason: String| LimitsError { variable, reason };
            let value: f64 = raw
                .trim()
                .parse()
                .map_err(|_| error(format!("{raw:?} is not a number of seconds")))?;
            // The error quotes the value as written (`1e300`, not its 301 digits).
            timeout(value)
                .map(Some)
                .map_err(|_| error(format!("{} is outside 0.001..=86400 seconds", raw.trim())))
        };
        if let Some(d) = seconds([
            "ENTWINE_HTTP__HEADER_READ_TIMEOUT",
            "ENTWINE_HTTP_HEADER_READ_TIMEOUT",
        ])? {
            limits.header_read_timeout = d;
        }
        if let Some(d) = seconds(["ENTWINE_HTTP__BODY_TIMEOUT", "ENTWINE_HTTP_BODY_TIMEOUT"])? {
            limits.body_timeout = d;
        }
        if let Some((variable, raw)) = find([
            "ENTWINE_HTTP__MAX_CONNECTIONS",
            "ENTWINE_HTTP_MAX_CONNECTIONS",
        ]) {
            let value: usize = raw.trim().parse().map_err(|_| LimitsError {
                variable,
                reason: format!("{raw:?} is not a whole number"),
            })?;
            limits.max_connections =
                connections(value).map_err(|reason| LimitsError { variable, reason })?;
        }
        Ok(limits)
    }

    /// The connection cap in force: [`Limits::max_connections`], lowered so that the open-file
    /// limit (`/proc/self/limits`) keeps room for the process's other files.
    pub fn effective_max_connections(&self) -> usize {
        match open_file_limit() {
            Some(limit) => self
                .max_connections
                .min(limit.saturating_sub(RESERVED_FDS).max(16)),
            None => self.max_connections,
        }
    }
}

/// A timeout of `value` seconds, within 0.001..=86400.
fn timeout(value: f64) -> Result<Duration, String> {
    if value.is_finite() && (0.001..=86_400.0).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        let shown = if value.abs() >= 1e9 {
            format!("{value:e}")
        } else {
            value.to_string()
        };
        Err(format!("{shown} is outside 0.001..=86400 seconds"))
    }
}

/// A connection cap within 1..=1000000.
fn connections(value: usize) -> Result<usize, String> {
    if (1..=1_000_000).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is outside 1..=1000000"))
    }
}

/// The soft limit on open files, on Linux.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then lets the
/// requests in flight finish and returns once every connection has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = limits.effective_max_connections();
    let slots = Arc::new(Semaphore::new(cap));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let body_timeout = limits.body_timeout;
    tracing::debug!(
        address = ?listener.local_addr().ok(),
        max_connections = cap,
        header_read_timeout_s = limits.header_read_timeout.as_secs_f64(),
        body_timeout_s = body_timeout.as_secs_f64(),
        "serving HTTP"
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full: Option<std::time::Instant> = None;
    loop {
        if slots.available_permits() == 0
            && warned_full.is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                max_connections = cap,
                "HTTP connection cap reached: new connections wait in the accept backlog"
            );
            warned_full = Some(std::time::Instant::now());
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, or memory: wait for connections to close.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying in 100 ms");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(handle(router, request, body_timeout).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended on an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors of one connection that say nothing about the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// One request: its body under the deadline, the router's answer, errors as JSON.
async fn handle(
    router: Router,
    request: hyper::Request<Incoming>,
    body_timeout: Duration,
) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        if http_body::Body::is_end_stream(&body) {
            Body::new(body)
        } else {
            Body::new(DeadlineBody {
                inner: body,
                deadline: Box::pin(tokio::time::sleep(body_timeout)),
                timeout: body_timeout,
                expired: expired.clone(),
            })
        }
    });
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if expired.load(Ordering::Relaxed) {
        let mut response = error_response(
            StatusCode::REQUEST_TIMEOUT,
            &format!("body: not received within {} s", body_timeout.as_secs_f64()),
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    to_json_error(response, &method, &path).await
}

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> Response {
    let mut response = Response::new(Body::from(
        serde_json::json!({ "error": message }).to_string(),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `router` with every error answer as JSON: what [`serve`] does to each response, for a
/// router called directly (tests, `oneshot`). A 405 names the allowed methods.
pub fn json_errors(router: Router) -> Router {
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let router = router.clone();
        async move {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let response = router.oneshot(request).await?;
            Ok::<_, Infallible>(to_json_error(response, &method, &path).await)
        }
    }))
}

/// An error response that is not JSON, as `{"error": "…"}`: a 405 names the methods of its
/// `Allow` header; other errors keep their text (at most 1 KiB) or the status's reason.
async fn to_json_error(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .filter(|a| !a.is_empty())
            .unwrap_or("none");
        format!("{method} is not allowed on {path}; allowed: {allowed}")
    } else {
        let text = match axum::body::to_bytes(body, MAX_ERROR_TEXT).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
            Err(_) => String::new(),
        };
        if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        } else {
            text
        }
    };
    let json = error_response(status, &message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, json.into_body())
}

/// A request body that must end before its deadline.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    expired: Arc<AtomicBool>,
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("body not received within {} s", .0.as_secs_f64())]
struct BodyTimeout(Duration);

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimeout(this.timeout).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_environment_and_bad_values_name_the_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(Limits::from_lookup(env(&[])).unwrap(), Limits::default());
        assert_eq!(
            Limits::from_lookup(env(&[
                ("ENTWINE_HTTP_HEADER_READ_TIMEOUT", "2.5"),
                ("ENTWINE_HTTP_BODY_TIMEOUT", "7"),
                ("ENTWINE_HTTP_MAX_CONNECTIONS", "64"),
            ]))
            .unwrap(),
            Limits {
                header_read_timeout: Duration::from_millis(2500),
                body_timeout: Duration::from_secs(7),
                max_connections: 64,
            }
        );
        for (pairs, message) in [
            (
                &[("ENTWINE_HTTP_HEADER_READ_TIMEOUT", "soon")][..],
                "ENTWINE_HTTP_HEADER_READ_TIMEOUT: \"soon\" is not a number of seconds",
            ),
            (
                &[("ENTWINE_HTTP_BODY_TIMEOUT", "1e300")][..],
                "ENTWINE_HTTP_BODY_TIMEOUT: 1e300 is outside 0.001..=86400 seconds",
            ),
            (
                &[("ENTWINE_HTTP_MAX_CONNECTIONS", "0")][..],
                "ENTWINE_HTTP_MAX_CONNECTIONS: 0 is outside 1..=1000000",
            ),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = pairs;
            assert_eq!(
                Limits::from_lookup(env(pairs)).unwrap_err().to_string(),
                message
            );
        }
    }
}
