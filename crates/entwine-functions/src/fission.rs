//! Running a function the way the Fission Rust environment does: configuration from the files
//! Fission mounts, HTTP on `127.0.0.1:$FISSION_RUNTIME_PORT`, graceful shutdown on SIGTERM.
//! Beside its route the server answers `GET /metrics` (the process's Prometheus recorder:
//! calls and latency per function, [`crate::invoke::observed`]), asking for a token as
//! [`Interface::Metrics`]; the supervisor proxies it on the pod's port 8888.
//!
//! # Where each setting comes from (later wins)
//! The layers of [`entwine_config`], without flags:
//! 1. Built-in defaults: the seed's `odte` ConfigMap values; PostgreSQL port 5432; a pool of 8
//!    connections; the HTTP limits of `entwine_http`.
//! 2. A configuration file, when `ENTWINE_CONFIG` names one (YAML or TOML).
//! 3. ConfigMap files: `<config root>/<namespace>/postgres/{host,port,database,user,password,sslmode}`,
//!    `<config root>/<namespace>/odte/{expected_update_rate,time_window,desired_timeliness,threshold}`,
//!    and likewise every key of the `database`, `http` and `digital` sections.
//! 4. Secret files: `<secret root>/<namespace>/<same sections and keys>` (credentials belong there).
//! 5. Environment: `ENTWINE_<SECTION>__<KEY>` (`ENTWINE_POSTGRES__HOST`, `ENTWINE_ODTE__THRESHOLD`,
//!    `ENTWINE_DATABASE__MAX_CONNECTIONS`, `ENTWINE_DIGITAL__BROKER_URL`, …); and `DATABASE_URL`
//!    (`database.url`), which replaces all the PostgreSQL keys (and may name a SQLite file).
//!    Beyond the seed, optional: `odte/availability_max_gap` and `odte/silence_threshold`
//!    (seconds; see `entwine_core::twin`), and the `digital` ConfigMap's `broker_url`,
//!    `state_topic`, `lifecycle_topic`: where the digital-event handler and the twin evaluator
//!    publish digital events (off when unset).
//!
//! # Fission's container executor
//! There the binary is the pod's own process (no supervisor, SIGTERM reaches it) and the
//! Function's ConfigMaps and Secrets arrive as environment variables, not files: the container
//! specs (`deploy/fission/specs-container`) map each key to its `ENTWINE_<SECTION>__<KEY>`
//! variable (layer 5 above) and set [`LISTEN_VAR`] to the container's port on every interface.
//!
//! The config root is `/configs` and the secret root `/secrets` (override with
//! `ENTWINE_CONFIG_ROOT`, `ENTWINE_SECRET_ROOT`). The namespace is `ENTWINE_NAMESPACE`, else the
//! one the fetcher wrote: the only directory under the config and secret roots (it is the
//! Function's namespace, which is not the pod's when the chart sets `functionNamespace`); when
//! there are several, the pod's (`/etc/podinfo/namespace`, directory overridable with
//! `ENTWINE_PODINFO_DIR`) among them, else an error; when there is none, the pod's, else
//! `default`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use entwine_core::model::ModelSet;
use entwine_core::odte::OdteConfig;
use entwine_store::{Store, StoreOptions};

pub use entwine_config::DatabaseTarget as DatabaseSettings;
pub use entwine_config::{Environment, SettingsError};

use crate::handlers::{Clock, Function, SystemClock, TwinFunctions};
use crate::http::{function_router, metrics_router};
use crate::publisher::{DigitalPublisher, PublisherSettings};
use entwine_http::Interface;

/// The port Fission's Rust runtime gives a function when neither variable is set.
pub const DEFAULT_PORT: u16 = 8889;

/// The variable naming the whole listen address (`0.0.0.0:8888`), for Fission's container
/// executor, where no supervisor stands between the pod's port and the function; it wins over
/// `FISSION_RUNTIME_PORT` and `PORT`. A non-loopback address asks for `auth.tokens` as any
/// exposed listener does.
pub const LISTEN_VAR: &str = "ENTWINE_FUNCTION_LISTEN";

/// Everything a function binary needs, validated before it serves.
#[derive(Debug, Clone)]
pub struct FunctionSettings {
    /// Where to serve: `127.0.0.1:$FISSION_RUNTIME_PORT`.
    pub listen: SocketAddr,
    /// The database, for the functions that use one.
    pub database: Option<DatabaseSettings>,
    /// The store's pool (`database.max_connections`, `database.acquire_timeout`).
    pub store: StoreOptions,
    /// The ODTE configuration (used by the twin handler and the twin evaluator).
    pub odte: OdteConfig,
    /// The device models (`models.dir`, or the mounted `device-models` ConfigMap), with the
    /// seed's device under `odte`.
    pub models: Arc<ModelSet>,
    /// Where digital events go (the digital-event handler and the twin evaluator), if anywhere.
    pub digital: Option<PublisherSettings>,
    /// The HTTP server's limits (the `http` section).
    pub http: entwine_http::Limits,
    /// The tokens the function's route asks for (the `auth` section; the twin evaluator's
    /// asks for none: Fission's TimeTrigger calls it without headers, and it takes no input).
    pub auth: entwine_http::Auth,
}

/// The interfaces a function's server offers, as far as tokens are concerned: its route
/// (none for the twin evaluator's) and `GET /metrics`.
fn interfaces(function: Function) -> &'static [Interface] {
    match function {
        Function::TwinEvaluator => &[Interface::Metrics],
        _ => &[Interface::Functions, Interface::Metrics],
    }
}

/// Loads and validates a function's settings.
pub fn load(function: Function, env: &Environment) -> Result<FunctionSettings, SettingsError> {
    let listen = listen_address(env)?;
    let loaded = entwine_config::load(&entwine_config::Sources::new(env))?;
    let odte = loaded.odte()?;
    let models = Arc::new(loaded.models()?);
    let database = if function.needs_store() {
        Some(loaded.database(None)?)
    } else {
        None
    };
    let store = loaded.store_options()?;
    let http = loaded.http_limits()?;
    let auth = loaded.auth()?;
    let exposure = entwine_http::check_exposure(listen, &auth, interfaces(function));
    exposure.map_err(|e| SettingsError::Missing {
        key: "auth.tokens".into(),
        hint: e.to_string(),
    })?;
    // In a pod the function listens on loopback, but Fission's router reaches it from the
    // network through the runtime's supervisor: the same rule as for any exposed listener.
    // Its `/metrics` too (the cluster's Prometheus scrapes it through the supervisor).
    let unprotected: Vec<&str> = interfaces(function)
        .iter()
        .filter(|&&i| auth.protects(i) && auth.tokens.is_empty())
        .map(|&i| match i {
            Interface::Metrics => "auth.metrics=false",
            _ => "auth.functions=false",
        })
        .collect();
    if env.get("KUBERNETES_SERVICE_HOST").is_some() && !unprotected.is_empty() {
        return Err(SettingsError::Missing {
            key: "auth.tokens".into(),
            hint: format!(
                "{} runs in a Kubernetes pod, where Fission's router reaches it from the \
                 network: mount the auth Secret (secrets: [{{name: auth}}] in the function's \
                 spec; scripts/install-fission makes it), or set {} to leave it open on purpose",
                function.name(),
                unprotected.join(" and ")
            ),
        });
    }
    let section = &loaded.config.digital;
    let digital = match section.broker_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(broker_url) => {
            let mut settings = PublisherSettings::new(
                broker_url,
                // Unique per replica: in a container every process is pid 1, and a broker
                // disconnects the older of two clients with the same id.
                &format!(
                    "entwine-{}-{}",
                    function.name(),
                    env.get("HOSTNAME").map_or_else(
                        || format!("{}-{:08x}", std::process::id(), rand_suffix()),
                        str::to_owned
                    )
                ),
            );
            if let Some(topic) = &section.state_topic {
                settings.state_topic = topic.clone();
            }
            settings.mqtt = loaded.mqtt()?;
            if let Some(topic) = &section.lifecycle_topic {
                settings.lifecycle_topic = topic.clone();
            }
            settings.validate().map_err(|reason| {
                let reason = reason.to_string();
                // The reason starts with the key it is about.
                let key = ["state_topic", "lifecycle_topic"]
                    .into_iter()
                    .find(|k| reason.starts_with(k))
                    .unwrap_or("broker_url");
                let key = format!("digital.{key}");
                SettingsError::Invalid {
                    origin: loaded.origin(&key),
                    key,
                    reason,
                }
            })?;
            Some(settings)
        }
    };
    Ok(FunctionSettings {
        listen,
        database,
        store,
        odte,
        models,
        digital,
        http,
        auth,
    })
}

fn listen_address(env: &Environment) -> Result<SocketAddr, SettingsError> {
    // Fission's container executor runs the binary without the supervisor: its Service sends
    // to the pod's port directly, so the function listens on the pod's interfaces there.
    if let Some(raw) = env.get(LISTEN_VAR) {
        return raw
            .trim()
            .parse::<SocketAddr>()
            .map_err(|_| SettingsError::Invalid {
                key: "listen".into(),
                origin: LISTEN_VAR.into(),
                reason: format!(
                    "{raw:?} is not a socket address (an IP address and a port, e.g. 0.0.0.0:8888)"
                ),
            });
    }
    let (var, raw) = match env
        .get("FISSION_RUNTIME_PORT")
        .map(|v| ("FISSION_RUNTIME_PORT", v))
        .or_else(|| env.get("PORT").map(|v| ("PORT", v)))
    {
        Some(found) => found,
        None => return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))),
    };
    let port = raw
        .trim()
        .parse::<u16>()
        .map_err(|_| SettingsError::Invalid {
            key: "port".into(),
            origin: var.into(),
            reason: format!("{raw:?} is not a port number (0-65535)"),
        })?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// Serves `function` with `settings` until `shutdown` completes, then drains in-flight requests
/// and closes the store.
pub async fn run(
    function: Function,
    settings: FunctionSettings,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    serve(function, settings, clock, listener, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind port 0).
pub async fn serve(
    function: Function,
    settings: FunctionSettings,
    clock: Arc<dyn Clock>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // States come from the digital-event handler, lifecycle changes from the twin handler and
    // the evaluator; the others have nothing to say.
    let publishes = matches!(
        function,
        Function::DigitalEvent | Function::Twin | Function::TwinEvaluator
    );
    let publisher = match (&settings.digital, publishes) {
        (Some(digital), true) => Some(
            DigitalPublisher::start(digital).map_err(|e| anyhow::anyhow!("digital broker: {e}"))?,
        ),
        _ => None,
    };
    let database = settings
        .database
        .as_ref()
        .context("every function needs the store: no database configured")?;
    let store = database
        .open(&settings.store)
        .context("cannot use the database URL")?;
    let functions = Arc::new(
        TwinFunctions::new(store.clone(), settings.odte, clock)
            .with_models(settings.models.clone())
            .with_publisher(publisher.as_ref().map(|(p, _)| p.clone())),
    );
    let auth = Arc::new(settings.auth.clone());
    let router = match function {
        Function::TwinEvaluator => function_router(function, functions),
        _ => entwine_http::protect(
            function_router(function, functions),
            auth.clone(),
            Interface::Functions,
        ),
    };
    // The requests and latencies the functions record (`crate::invoke::observed`), for the
    // cluster's Prometheus: Fission's supervisor proxies every path but its own to the function.
    let router = router.merge(metrics_router(
        crate::telemetry::prometheus_for(settings.models.as_ref()).context("metrics")?,
        auth,
    ));
    let store = Some(store);
    let address = listener.local_addr().context("listener has no address")?;
    tracing::info!(function = function.name(), %address, store = store.as_ref().map(Store::backend), "serving");
    for model in settings.models.models() {
        tracing::info!(
            function = function.name(),
            model = %model.id,
            version = %model.version,
            source = %model.source,
            "device model loaded"
        );
    }
    entwine_http::serve(listener, router, settings.http, shutdown)
        .await
        .context("HTTP server failed")?;
    if let Some(store) = store {
        store.close().await;
    }
    if let Some((publisher, pump)) = publisher {
        publisher.close().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), pump).await;
    }
    tracing::info!(function = function.name(), "stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM (what Kubernetes sends before it kills a pod).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// The `main` of a function binary: tracing (JSON lines, `RUST_LOG`), settings from the
/// environment and mounts, serve until SIGTERM. Returns the process exit code.
pub fn main(function: Function) -> std::process::ExitCode {
    crate::telemetry::init(crate::telemetry::Format::Json, "info");
    let settings = match load(function, &Environment::from_process()) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!(error = %crate::http::error_chain(&e), "invalid configuration");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(
        function,
        settings,
        Arc::new(SystemClock),
        shutdown_signal(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A bad DATABASE_URL or HTTP limit is configuration too: exit 2, as `load` does.
        Err(e) if is_configuration_error(&e) => {
            tracing::error!(error = format!("{e:#}"), "invalid configuration");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "function stopped on an error");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether `error` comes from a setting that cannot be used (exit code 2), not from a failure.
pub fn is_configuration_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<entwine_http::LimitsError>()
            || cause.is::<SettingsError>()
            || matches!(
                cause.downcast_ref::<entwine_store::StoreError>(),
                Some(entwine_store::StoreError::Url(_))
            )
    })
}

/// A number that differs between processes started at the same moment.
fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() as u32
}
