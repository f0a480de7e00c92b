//! How the connector reaches the functions: one interface, two ways.
//!
//! - [`HttpFunctions`]: a POST to `<router>/<route>` with the state as JSON, as Fission's router
//!   (or the seed's functions) expects. What the connector uses on a cluster.
//! - In process: `entwine up` and `entwine bench` hand the connector an implementation that
//!   calls the functions' handlers directly (`entwine_platform`), with no socket and no JSON text
//!   between the steps; the functions run the same code either way.
//!
//! Whatever the way, a call ends in one of the outcomes of [`CallFailure`], which the chain maps
//! to retry or dead-letter exactly as it does for HTTP statuses.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

/// The future of one call: the answer's JSON on success.
pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, CallFailure>> + Send + 'a>>;

/// Why a call did not answer a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The function answered with a status that is not a success, and its error text.
    Status {
        /// The HTTP status (or the status the function would have answered over HTTP).
        status: u16,
        /// The function's `error`, or the body when it has none.
        error: String,
    },
    /// The function answered success with a body that is not JSON.
    NotJson {
        /// The (successful) status.
        status: u16,
        /// What was wrong with the body.
        error: String,
    },
    /// The function could not be reached: connection refused, timeout.
    Unreachable(String),
}

/// The functions the connector calls: each step of a chain is one call on a route
/// (`/physicalevents`, …, `/deadletters`), with the previous answer as its body.
pub trait Functions: Send + Sync + 'static {
    /// Calls the function on `route` with `body`.
    fn call<'a>(&'a self, route: &'static str, body: &'a Value) -> CallFuture<'a>;

    /// Where the functions are, for logs (`http://router.fission`, `in process`).
    fn describe(&self) -> String;
}

/// The functions behind an HTTP router (Fission's, or any server with the same routes).
#[derive(Debug, Clone)]
pub struct HttpFunctions {
    client: reqwest::Client,
    router_url: String,
    /// `Bearer <auth.token>`, marked sensitive (never logged by reqwest or hyper).
    authorization: Option<reqwest::header::HeaderValue>,
}

impl HttpFunctions {
    /// A client of the router at `router_url` (normalized, see
    /// [`crate::normalize_router_url`]), with `timeout` per call and up to `idle` connections
    /// kept open.
    pub fn new(router_url: &str, timeout: Duration, idle: usize) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(idle)
            .build()?;
        Ok(Self {
            client,
            router_url: router_url.to_owned(),
            authorization: None,
        })
    }

    /// Presents `token` on every call (`Authorization: Bearer …`), as the functions require
    /// when `auth.tokens` is set on their side.
    pub fn with_token(mut self, token: &secrecy::SecretString) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret as _;
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| anyhow::anyhow!("auth.token holds a character a header cannot"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }
}

impl Functions for HttpFunctions {
    fn call<'a>(&'a self, route: &'static str, body: &'a Value) -> CallFuture<'a> {
        Box::pin(async move {
            let url = format!("{}{route}", self.router_url);
            let mut request = self.client.post(&url).json(body);
            if let Some(value) = &self.authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value.clone());
            }
            let response = request
                .send()
                .await
                .map_err(|e| CallFailure::Unreachable(format!("{url}: {e}")))?;
            let status = response.status().as_u16();
            if response.status().is_success() {
                return response
                    .json::<Value>()
                    .await
                    .map_err(|e| CallFailure::NotJson {
                        status,
                        error: format!("answered {status} with a body that is not JSON: {e}"),
                    });
            }
            let text = response.text().await.unwrap_or_default();
            let error = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            Err(CallFailure::Status { status, error })
        })
    }

    fn describe(&self) -> String {
        self.router_url.clone()
    }
}
