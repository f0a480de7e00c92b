//! Running a function the way the Fission Rust environment does: configuration from the files
//! Fission mounts, HTTP on `127.0.0.1:$FISSION_RUNTIME_PORT`, graceful shutdown on SIGTERM.
//!
//! # Where each setting comes from (later wins)
//! 1. Built-in defaults: the seed's `odte` ConfigMap values; PostgreSQL port 5432.
//! 2. ConfigMap files: `<config root>/<namespace>/postgres/{host,port,database,user,password}`
//!    and `<config root>/<namespace>/odte/{expected_update_rate,time_window,desired_timeliness,threshold}`.
//! 3. Secret files: `<secret root>/<namespace>/postgres/<same keys>` (credentials belong there).
//! 4. Environment: `ENTWINE_POSTGRES__HOST`, `ENTWINE_POSTGRES__PORT`, `ENTWINE_POSTGRES__DATABASE`,
//!    `ENTWINE_POSTGRES__USER`, `ENTWINE_POSTGRES__PASSWORD`, `ENTWINE_ODTE__EXPECTED_UPDATE_RATE`,
//!    `ENTWINE_ODTE__TIME_WINDOW`, `ENTWINE_ODTE__DESIRED_TIMELINESS`, `ENTWINE_ODTE__THRESHOLD`;
//!    and `DATABASE_URL`, which replaces all the PostgreSQL keys (and may name a SQLite file).
//!    Beyond the seed, optional: `odte/availability_max_gap` and `odte/silence_threshold`
//!    (seconds; see `entwine_core::twin`), and the `digital` ConfigMap's `broker_url`,
//!    `state_topic`, `lifecycle_topic` (`ENTWINE_DIGITAL__BROKER_URL` …): where the
//!    digital-event handler and the twin evaluator publish digital events (off when unset).
//!
//! The config root is `/configs` and the secret root `/secrets` (override with
//! `ENTWINE_CONFIG_ROOT`, `ENTWINE_SECRET_ROOT`). The namespace is `ENTWINE_NAMESPACE`, else the
//! one the fetcher wrote: the only directory under the config and secret roots (it is the
//! Function's namespace, which is not the pod's when the chart sets `functionNamespace`); when
//! there are several, the pod's (`/etc/podinfo/namespace`, directory overridable with
//! `ENTWINE_PODINFO_DIR`) among them, else an error; when there is none, the pod's, else
//! `default`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use entwine_core::odte::OdteConfig;
use entwine_store::PgConnectOptions;
use entwine_store::{Store, StoreOptions};
use secrecy::{ExposeSecret, SecretString};

use crate::handlers::{Clock, Function, SystemClock, TwinFunctions};
use crate::http::function_router;
use crate::publisher::{DigitalPublisher, PublisherSettings};

/// The port Fission's Rust runtime gives a function when neither variable is set.
pub const DEFAULT_PORT: u16 = 8889;

/// A snapshot of environment variables (the process's, or a test's).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    /// The process's environment.
    pub fn from_process() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// An environment made of `vars`.
    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value; an empty value counts as unset.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A configuration value that cannot be used, or a required one that is missing.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is set but wrong.
    #[error("{key} from {origin}: {reason}")]
    Invalid {
        /// The setting, as `configmap.key`.
        key: String,
        /// Where the value came from (a file path or a variable name).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required value is set nowhere.
    #[error("{key} is not set: {hint}")]
    Missing {
        /// The setting, as `configmap.key`.
        key: String,
        /// Where it can be set.
        hint: String,
    },
    /// A mounted file exists but cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where the database is.
#[derive(Clone)]
pub enum DatabaseSettings {
    /// `DATABASE_URL`, as given.
    Url(SecretString),
    /// Assembled from the `postgres` ConfigMap, Secret and environment.
    Postgres(Box<PgConnectOptions>),
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(_) => f.write_str("DatabaseSettings::Url(<redacted>)"),
            Self::Postgres(o) => write!(
                f,
                "DatabaseSettings::Postgres({}@{}:{}/{})",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("")
            ),
        }
    }
}

impl DatabaseSettings {
    /// A (lazily connecting) pool for these settings.
    pub fn open(&self, options: &StoreOptions) -> anyhow::Result<Store> {
        match self {
            Self::Url(url) => {
                Store::open(url.expose_secret(), options).context("cannot use DATABASE_URL")
            }
            Self::Postgres(connect) => Ok(Store::postgres((**connect).clone(), options)),
        }
    }
}

/// Everything a function binary needs, validated before it serves.
#[derive(Debug, Clone)]
pub struct FunctionSettings {
    /// Where to serve: `127.0.0.1:$FISSION_RUNTIME_PORT`.
    pub listen: SocketAddr,
    /// The database, for the functions that use one.
    pub database: Option<DatabaseSettings>,
    /// The ODTE configuration (used by the twin handler and the twin evaluator).
    pub odte: OdteConfig,
    /// Where digital events go (the digital-event handler and the twin evaluator), if anywhere.
    pub digital: Option<PublisherSettings>,
}

/// The files Fission mounted for this function.
#[derive(Debug)]
struct Mounts {
    config_dir: PathBuf,
    secret_dir: PathBuf,
}

impl Mounts {
    fn resolve(env: &Environment) -> Result<Self, SettingsError> {
        let config_root = PathBuf::from(env.get("ENTWINE_CONFIG_ROOT").unwrap_or("/configs"));
        let secret_root = PathBuf::from(env.get("ENTWINE_SECRET_ROOT").unwrap_or("/secrets"));
        let namespace = match env.get("ENTWINE_NAMESPACE") {
            Some(ns) => ns.to_owned(),
            None => {
                let podinfo = Path::new(env.get("ENTWINE_PODINFO_DIR").unwrap_or("/etc/podinfo"))
                    .join("namespace");
                let pod = read_optional(&podinfo)?.map(|ns| ns.trim().to_owned());
                mounted_namespace(&config_root, &secret_root, pod)?
            }
        };
        Ok(Self {
            config_dir: config_root.join(&namespace),
            secret_dir: secret_root.join(&namespace),
        })
    }
}

/// A value and where it came from.
struct Sourced {
    value: String,
    origin: String,
}

struct Lookup<'a> {
    env: &'a Environment,
    mounts: &'a Mounts,
}

impl Lookup<'_> {
    /// `section.key` from the environment, else the Secret (when `secret`), else the ConfigMap.
    fn get(
        &self,
        section: &str,
        key: &str,
        secret: bool,
    ) -> Result<Option<Sourced>, SettingsError> {
        let var = format!(
            "ENTWINE_{}__{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        );
        if let Some(value) = self.env.get(&var) {
            return Ok(Some(Sourced {
                value: value.to_owned(),
                origin: var,
            }));
        }
        let mut files = Vec::with_capacity(2);
        if secret {
            files.push(self.mounts.secret_dir.join(section).join(key));
        }
        files.push(self.mounts.config_dir.join(section).join(key));
        for path in files {
            if let Some(value) = read_optional(&path)? {
                return Ok(Some(Sourced {
                    value,
                    origin: path.display().to_string(),
                }));
            }
        }
        Ok(None)
    }

    fn number(&self, section: &str, key: &str, default: f64) -> Result<f64, SettingsError> {
        Ok(self.optional_number(section, key)?.unwrap_or(default))
    }

    fn text(&self, section: &str, key: &str) -> Result<Option<String>, SettingsError> {
        Ok(self
            .get(section, key, false)?
            .map(|s| s.value.trim().to_owned()))
    }

    fn optional_number(&self, section: &str, key: &str) -> Result<Option<f64>, SettingsError> {
        match self.get(section, key, false)? {
            None => Ok(None),
            Some(s) => {
                s.value
                    .trim()
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| SettingsError::Invalid {
                        key: format!("{section}.{key}"),
                        origin: s.origin,
                        reason: format!("{:?} is not a number", s.value),
                    })
            }
        }
    }

    fn required(&self, key: &str) -> Result<Sourced, SettingsError> {
        self.get("postgres", key, true)?
            .ok_or_else(|| SettingsError::Missing {
                key: format!("postgres.{key}"),
                hint: format!(
                    "mount the postgres ConfigMap or Secret ({}), set ENTWINE_POSTGRES__{}, or set DATABASE_URL",
                    self.mounts.config_dir.join("postgres").join(key).display(),
                    key.to_ascii_uppercase()
                ),
            })
    }
}

/// Loads and validates a function's settings.
pub fn load(function: Function, env: &Environment) -> Result<FunctionSettings, SettingsError> {
    let mounts = Mounts::resolve(env)?;
    let lookup = Lookup {
        env,
        mounts: &mounts,
    };
    let listen = listen_address(env)?;

    let seed = OdteConfig::seed_default();
    let max_gap = lookup.optional_number("odte", "availability_max_gap")?;
    let silence = lookup.optional_number("odte", "silence_threshold")?;
    let odte = OdteConfig::new(
        lookup.number("odte", "expected_update_rate", seed.expected_update_rate())?,
        lookup.number("odte", "time_window", seed.time_window_s())?,
        lookup.number("odte", "desired_timeliness", seed.desired_timeliness_s())?,
        lookup.number("odte", "threshold", seed.threshold())?,
    )
    .and_then(|c| c.with_availability_max_gap(max_gap))
    .and_then(|c| c.with_silence_threshold(silence))
    .map_err(|e| SettingsError::Invalid {
        key: "odte".into(),
        origin: format!(
            "{} or ENTWINE_ODTE__*",
            mounts.config_dir.join("odte").display()
        ),
        reason: e.to_string(),
    })?;

    let database = if !function.needs_store() {
        None
    } else if let Some(url) = env.get("DATABASE_URL") {
        Some(DatabaseSettings::Url(SecretString::from(url.to_owned())))
    } else {
        Some(DatabaseSettings::Postgres(Box::new(postgres_options(
            &lookup,
        )?)))
    };
    let digital = match lookup.text("digital", "broker_url")? {
        None => None,
        Some(broker_url) => {
            let mut settings = PublisherSettings::new(
                &broker_url,
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
            if let Some(topic) = lookup.text("digital", "state_topic")? {
                settings.state_topic = topic;
            }
            if let Some(topic) = lookup.text("digital", "lifecycle_topic")? {
                settings.lifecycle_topic = topic;
            }
            settings
                .validate()
                .map_err(|reason| SettingsError::Invalid {
                    key: "digital".into(),
                    origin: format!(
                        "{} or ENTWINE_DIGITAL__*",
                        mounts.config_dir.join("digital").display()
                    ),
                    reason,
                })?;
            Some(settings)
        }
    };
    Ok(FunctionSettings {
        listen,
        database,
        odte,
        digital,
    })
}

fn postgres_options(lookup: &Lookup<'_>) -> Result<PgConnectOptions, SettingsError> {
    let host = lookup.required("host")?;
    let database = lookup.required("database")?;
    let user = lookup.required("user")?;
    let port = match lookup.get("postgres", "port", true)? {
        None => 5432,
        Some(s) => s
            .value
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| SettingsError::Invalid {
                key: "postgres.port".into(),
                origin: s.origin,
                reason: format!("{:?} is not a port number (1-65535)", s.value),
            })?,
    };
    let password = lookup
        .get("postgres", "password", true)?
        .map(|s| SecretString::from(s.value));
    let mut options = PgConnectOptions::new_without_pgpass()
        .host(host.value.trim())
        .port(port)
        .database(database.value.trim())
        .username(user.value.trim());
    if let Some(password) = &password {
        options = options.password(password.expose_secret());
    }
    Ok(options)
}

fn listen_address(env: &Environment) -> Result<SocketAddr, SettingsError> {
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

/// A mounted file's value without its trailing line ending, or `None` when the file does not
/// exist.
fn read_optional(path: &Path) -> Result<Option<String>, SettingsError> {
    match std::fs::read_to_string(path) {
        // Only the line ending a file editor or `--from-file` leaves: spaces can belong to a
        // password. Numbers, hosts and names are trimmed where they are parsed.
        Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SettingsError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The namespace whose directory the fetcher wrote: it writes `<root>/<function's namespace>/
/// <name>/<key>`, and the function's namespace is not the pod's when Fission runs functions in
/// a namespace of their own (the chart's `functionNamespace`). One directory under the config
/// and secret roots: that one. Several: the pod's namespace if it is one of them. None: the
/// pod's namespace, else `default` (no file to read either way).
fn mounted_namespace(
    config_root: &Path,
    secret_root: &Path,
    pod: Option<String>,
) -> Result<String, SettingsError> {
    let mut mounted = subdirectories(config_root);
    mounted.extend(subdirectories(secret_root));
    mounted.sort();
    mounted.dedup();
    match mounted.as_slice() {
        [only] => Ok(only.clone()),
        [] => Ok(pod.unwrap_or_else(|| "default".into())),
        several => match pod {
            Some(pod) if several.contains(&pod) => Ok(pod),
            _ => Err(SettingsError::Invalid {
                key: "namespace".into(),
                origin: format!("{} and {}", config_root.display(), secret_root.display()),
                reason: format!(
                    "mounts of several namespaces ({}) and none is the pod's: set ENTWINE_NAMESPACE",
                    several.join(", ")
                ),
            }),
        },
    }
}

fn subdirectories(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
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
    let store = database.open(&StoreOptions::default())?;
    let functions = Arc::new(
        TwinFunctions::new(store.clone(), settings.odte, clock)
            .with_publisher(publisher.as_ref().map(|(p, _)| p.clone())),
    );
    let router = function_router(function, functions);
    let store = Some(store);
    let address = listener.local_addr().context("listener has no address")?;
    tracing::info!(function = function.name(), %address, store = store.as_ref().map(Store::backend), "serving");
    let limits = entwine_http::Limits::from_env()?;
    entwine_http::serve(listener, router, limits, shutdown)
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
