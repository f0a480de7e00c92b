//! entwine's one typed configuration, assembled in layers by [figment](https://docs.rs/figment).
//!
//! # Layers (later wins)
//! 1. **Defaults**: the seed's `odte` ConfigMap, the store's pool (8 connections, 5 s acquire
//!    timeout), the HTTP server's limits, PostgreSQL port 5432.
//! 2. **A configuration file**: `--config FILE` (the CLI), else `ENTWINE_CONFIG`; YAML
//!    (`.yaml`/`.yml`) or TOML (`.toml`), with the sections below as top-level tables.
//! 3. **Fission ConfigMap mounts**: `<config root>/<namespace>/<section>/<key>`, one file per
//!    key, as Fission's fetcher writes them (`/configs/default/odte/threshold`).
//! 4. **Secret mounts**: `<secret root>/<namespace>/<section>/<key>` (the password belongs here).
//! 5. **Environment**: `ENTWINE_<SECTION>__<KEY>` (`ENTWINE_POSTGRES__HOST`,
//!    `ENTWINE_ODTE__THRESHOLD`, `ENTWINE_DATABASE__MAX_CONNECTIONS`, …); `DATABASE_URL` for
//!    `database.url`; the older `ENTWINE_HTTP_HEADER_READ_TIMEOUT`, `ENTWINE_HTTP_BODY_TIMEOUT`,
//!    `ENTWINE_HTTP_MAX_CONNECTIONS` below their double-underscore names. An empty variable
//!    counts as unset.
//! 6. **Flags**: whatever the caller puts in [`Flags`] (the CLI's `--threshold`, …).
//!
//! # Sections
//! - `database`: `url` (`postgres://…` or `sqlite://PATH`; when set at any layer it replaces
//!   the `postgres` keys), `max_connections`, `acquire_timeout` (seconds).
//! - `postgres`: `host`, `port`, `database`, `user`, `password`, `sslmode` (the `postgres`
//!   ConfigMap and Secret of the Fission functions).
//! - `odte`: `expected_update_rate`, `time_window`, `desired_timeliness`, `threshold`,
//!   `availability_max_gap`, `silence_threshold` ([`OdteConfig`] is built only here:
//!   [`Loaded::odte`]).
//! - `http`: `header_read_timeout`, `body_timeout` (seconds), `max_connections`
//!   ([`entwine_http::Limits`]).
//! - `digital`: `broker_url`, `state_topic`, `lifecycle_topic` (digital events of the functions).
//! - `models`: `dir`, the directory of device model files ([`Loaded::models`]; on Fission the
//!   ConfigMap `device-models` when unset).
//! - `retention`: `keep_days` (days of history kept, fractions allowed: `0.5` is 12 h; unset, the
//!   default, keeps everything), `period` (seconds between retention runs, default 3600)
//!   ([`Loaded::retention`]).
//!
//! The mount roots are `/configs` and `/secrets` (`ENTWINE_CONFIG_ROOT`, `ENTWINE_SECRET_ROOT`);
//! the namespace is `ENTWINE_NAMESPACE`, else the one the fetcher wrote: the only directory
//! under the roots; with several, the pod's (`/etc/podinfo/namespace`, directory
//! `ENTWINE_PODINFO_DIR`) among them, else an error; with none, the pod's, else `default`.
//!
//! Every error names the key and where its value came from: a file path, a variable, a flag.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use entwine_core::model::{Model, ModelSet};
use entwine_core::odte::{OdteConfig, OdteConfigError};
use entwine_http::Limits;
use entwine_store::{PgConnectOptions, RetentionSettings, Store, StoreError, StoreOptions};
use figment::providers::{Format as _, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The store `entwine` uses when neither `database.url` nor `postgres.host` is set anywhere.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://entwine.db";

/// Every key of every section, in the order they are printed (and the only files read from the
/// Fission mounts).
pub const KEYS: &[(&str, &[&str])] = &[
    ("database", &["url", "max_connections", "acquire_timeout"]),
    (
        "postgres",
        &[
            "host",
            "port",
            "database",
            "user",
            "password",
            "sslmode",
            "sslrootcert",
        ],
    ),
    (
        "odte",
        &[
            "expected_update_rate",
            "time_window",
            "desired_timeliness",
            "threshold",
            "availability_max_gap",
            "silence_threshold",
        ],
    ),
    (
        "http",
        &["header_read_timeout", "body_timeout", "max_connections"],
    ),
    ("digital", &["broker_url", "state_topic", "lifecycle_topic"]),
    ("auth", &["tokens", "token", "functions", "metrics"]),
    (
        "mqtt",
        &[
            "username",
            "password",
            "ca_file",
            "cert_file",
            "key_file",
            "credentials_file",
        ],
    ),
    ("models", &["dir"]),
    ("retention", &["keep_days", "period"]),
];

/// Keys whose values are secrets: kept exactly as written (no trimming) and printed as `***`.
const SECRET_KEYS: &[&str] = &["password", "tokens", "token"];

/// Variables read beside `ENTWINE_<SECTION>__<KEY>`, each below it: (variable, key).
const OTHER_VARIABLES: &[(&str, &str)] = &[
    (
        "ENTWINE_HTTP_HEADER_READ_TIMEOUT",
        "http.header_read_timeout",
    ),
    ("ENTWINE_HTTP_BODY_TIMEOUT", "http.body_timeout"),
    ("ENTWINE_HTTP_MAX_CONNECTIONS", "http.max_connections"),
    // After `ENTWINE_DATABASE__URL` (read with its section): the conventional name wins.
    ("DATABASE_URL", "database.url"),
];

/// A snapshot of environment variables (the process's, or a test's).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    /// The process's environment (variables that are not UTF-8 are left out).
    pub fn from_process() -> Self {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
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
        /// The setting, as `section.key`.
        key: String,
        /// Where the value came from (a file path, a variable or a flag).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required value is set nowhere.
    #[error("{key} is not set: {hint}")]
    Missing {
        /// The setting, as `section.key`.
        key: String,
        /// Where it can be set.
        hint: String,
    },
    /// A file exists but cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A configuration file that is not YAML or TOML, or not well-formed.
    #[error("configuration file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A text value that is never shown by `Debug` (passwords, URLs that may hold one).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The whole configuration, every value resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The store.
    pub database: DatabaseSection,
    /// PostgreSQL by parts, when `database.url` is not set.
    pub postgres: PostgresSection,
    /// The ODTE engine.
    pub odte: OdteSection,
    /// The HTTP server's limits.
    pub http: HttpSection,
    /// Digital events of the Fission functions.
    pub digital: DigitalSection,
    /// Bearer tokens of every HTTP interface.
    pub auth: AuthSection,
    /// How the MQTT clients log in and encrypt.
    pub mqtt: MqttSection,
    /// Where device models are read from.
    pub models: ModelsSection,
    /// How much history is kept.
    pub retention: RetentionSection,
}

/// `retention`: how long states are kept ([`entwine_store::Store::apply_retention`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSection {
    /// Days of history kept (fractions allowed); unset keeps everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_days: Option<f64>,
    /// Seconds between two retention runs.
    pub period: f64,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            keep_days: None,
            period: 3600.0,
        }
    }
}

/// `models`: the device models ([`entwine_core::model`]), one `*.json` file each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsSection {
    /// The directory of model files. Unset: on Fission, the mounted ConfigMap `device-models`
    /// (`<config root>/<namespace>/device-models/`) when it is there; else only the seed's
    /// built-in device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// The ConfigMap of device models on Fission (one key per model file).
pub const MODELS_CONFIGMAP: &str = "device-models";

/// `mqtt`: the credentials and TLS files of every MQTT client of the process (connector,
/// devices, digital publisher, benchmarks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// The user name (the Secret file `mqtt/username`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Its password (the Secret file `mqtt/password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// PEM CA certificates to verify the broker by; turns TLS on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate chain, for mutual TLS (with `key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// For device fleets: a file of `device-id:password` lines; each device then logs in as
    /// its own id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
}

/// `auth`: the bearer tokens every HTTP server of the process accepts, and the one it presents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// The accepted tokens, separated by commas, spaces or line breaks (several during a
    /// rotation); a Secret file `auth/tokens` with one per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Secret>,
    /// The token this process presents as a client (the connector to the functions,
    /// `entwine status` to the twins API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Whether the function routes require a token (false: open on purpose, for the seed's
    /// connector, which sends none).
    pub functions: bool,
    /// Whether `/metrics` requires a token (false: open on purpose, for a scraper without one).
    pub metrics: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            tokens: None,
            token: None,
            functions: true,
            metrics: true,
        }
    }
}

/// `database`: the store and its pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// `postgres://…`, `postgresql://…` or `sqlite://PATH`; replaces the `postgres` keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// Seconds a call waits for a connection before the store counts as unavailable.
    pub acquire_timeout: f64,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        let store = StoreOptions::default();
        Self {
            url: None,
            max_connections: store.max_connections,
            acquire_timeout: store.acquire_timeout.as_secs_f64(),
        }
    }
}

/// `postgres`: the database by parts (the Fission `postgres` ConfigMap and Secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    /// Host name or address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port.
    pub port: u16,
    /// Database name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// User name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password (keep it in the Secret or the environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// libpq's `sslmode`: disable, allow, prefer, require, verify-ca, verify-full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// PEM certificates to verify the server by (`verify-ca`, `verify-full`), as libpq's
    /// `sslrootcert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<String>,
}

impl Default for PostgresSection {
    fn default() -> Self {
        Self {
            host: None,
            port: 5432,
            database: None,
            user: None,
            password: None,
            sslmode: None,
            sslrootcert: None,
        }
    }
}

/// `odte`: the fields of [`OdteConfig`], in seconds where they are durations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OdteSection {
    /// Updates per second a device is expected to send.
    pub expected_update_rate: f64,
    /// Length of the window, seconds.
    pub time_window: f64,
    /// How soon after the device measured its twin must mirror it, seconds.
    pub desired_timeliness: f64,
    /// ODTE at or above which a twin is entangled.
    pub threshold: f64,
    /// Gaps longer than this many seconds count as unavailable (off when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_max_gap: Option<f64>,
    /// Seconds of silence after which a twin is unbound (default: twice the window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silence_threshold: Option<f64>,
}

impl Default for OdteSection {
    fn default() -> Self {
        let seed = OdteConfig::seed_default();
        Self {
            expected_update_rate: seed.expected_update_rate(),
            time_window: seed.time_window_s(),
            desired_timeliness: seed.desired_timeliness_s(),
            threshold: seed.threshold(),
            availability_max_gap: None,
            silence_threshold: None,
        }
    }
}

/// `http`: the limits of [`entwine_http::serve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Seconds for a request head (and an idle keep-alive connection).
    pub header_read_timeout: f64,
    /// Seconds for a request body.
    pub body_timeout: f64,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            header_read_timeout: limits.header_read_timeout.as_secs_f64(),
            body_timeout: limits.body_timeout.as_secs_f64(),
            max_connections: limits.max_connections,
        }
    }
}

/// `digital`: where the Fission functions publish digital events (off without `broker_url`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DigitalSection {
    /// `host:port` or `mqtt://host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_url: Option<String>,
    /// Topic of digital states (`{device_id}` names the device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_topic: Option<String>,
    /// Topic of lifecycle changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle_topic: Option<String>,
}

/// The top layer: values set on the command line, each with the flag that set it.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    values: Dict,
    origins: BTreeMap<String, String>,
}

impl Flags {
    /// Sets `key` (`section.key`) from `flag` when `value` is given.
    pub fn set<T: Serialize>(&mut self, key: &str, flag: &str, value: Option<T>) -> &mut Self {
        if let Some(value) = value {
            let value = Value::serialize(value).expect("a flag's value is a plain value");
            insert(&mut self.values, key, value);
            self.origins.insert(key.to_owned(), flag.to_owned());
        }
        self
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    /// The environment (also where `ENTWINE_CONFIG` and the mount roots come from).
    pub env: &'a Environment,
    /// A configuration file named on the command line; else `ENTWINE_CONFIG`'s.
    pub file: Option<PathBuf>,
    /// Whether to read the Fission ConfigMap and Secret mounts.
    pub mounts: bool,
    /// The command line's values.
    pub flags: Flags,
}

impl<'a> Sources<'a> {
    /// Defaults, `ENTWINE_CONFIG`, the mounts and `env`, no flags.
    pub fn new(env: &'a Environment) -> Self {
        Self {
            env,
            file: None,
            mounts: true,
            flags: Flags::default(),
        }
    }
}

/// The files Fission mounted for a function.
#[derive(Debug, Clone)]
pub struct Mounts {
    /// `<config root>/<namespace>`.
    pub config_dir: PathBuf,
    /// `<secret root>/<namespace>`.
    pub secret_dir: PathBuf,
}

impl Mounts {
    /// The mount directories `env` designates (see the crate's documentation).
    pub fn resolve(env: &Environment) -> Result<Self, SettingsError> {
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

/// A layer of values, each with where it came from, as a figment provider.
struct Layer {
    name: &'static str,
    values: Dict,
    origins: Arc<BTreeMap<String, String>>,
    /// The file every value came from (a configuration file).
    file: Option<PathBuf>,
}

impl Layer {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            values: Dict::new(),
            origins: Arc::default(),
            file: None,
        }
    }

    fn set(&mut self, key: &str, value: String, origin: String) {
        insert(&mut self.values, key, typed(key, value));
        Arc::make_mut(&mut self.origins).insert(key.to_owned(), origin);
    }
}

/// Keys whose values are text; every other key's text is read as a number here, as an
/// integer when it is one, else as an `f64` (figment's own string-to-number reading makes
/// `0.7` an `f32`, which is `0.699999988` as an `f64`).
const TEXT_KEYS: &[&str] = &[
    "url",
    "host",
    "database",
    "user",
    "password",
    "sslmode",
    "sslrootcert",
    "username",
    "ca_file",
    "cert_file",
    "key_file",
    "credentials_file",
    "broker_url",
    "state_topic",
    "lifecycle_topic",
    "tokens",
    "token",
    "dir",
];

fn typed(key: &str, raw: String) -> Value {
    let last = key.rsplit('.').next().unwrap_or(key);
    if TEXT_KEYS.contains(&last) {
        return Value::from(raw);
    }
    let text = raw.trim();
    if text.eq_ignore_ascii_case("true") {
        return Value::from(true);
    }
    if text.eq_ignore_ascii_case("false") {
        return Value::from(false);
    }
    if let Ok(n) = text.parse::<u64>() {
        Value::from(n)
    } else if let Ok(n) = text.parse::<i64>() {
        Value::from(n)
    } else if let Ok(n) = text.parse::<f64>() {
        Value::from(n)
    } else {
        Value::from(raw)
    }
}

/// [`typed`] applied to the text values of a file's sections (`threshold: "0.7"`).
fn typed_sections(mut dict: Dict) -> Dict {
    for (section, value) in dict.iter_mut() {
        if let Value::Dict(_, keys) = value {
            for (key, value) in keys.iter_mut() {
                if let Value::String(_, text) = value {
                    *value = typed(&format!("{section}.{key}"), text.clone());
                }
            }
        }
    }
    dict
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let origins = Arc::clone(&self.origins);
        let name = self.name;
        let metadata = match &self.file {
            Some(path) => Metadata::named(name).source(Source::File(path.clone())),
            None => Metadata::named(name),
        };
        metadata.interpolater(move |_: &Profile, keys: &[&str]| {
            let key = keys.join(".");
            origins
                .get(&key)
                .cloned()
                .unwrap_or_else(|| format!("{name} ({key})"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((section, rest)) => {
            let entry = dict
                .entry(section.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// YAML through serde_yaml_ng (figment's own YAML support uses the unmaintained serde_yaml).
struct Yaml;

impl figment::providers::Format for Yaml {
    type Error = serde_yaml_ng::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_yaml_ng::from_str(string)
    }
}

/// The configuration and where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The values.
    pub config: Config,
    figment: Figment,
    mounts: Option<Mounts>,
    file: Option<PathBuf>,
}

/// Reads every layer of `sources` into a [`Config`].
pub fn load(sources: &Sources<'_>) -> Result<Loaded, SettingsError> {
    let env = sources.env;
    let mut figment = Figment::new();
    let file = sources
        .file
        .clone()
        .or_else(|| env.get("ENTWINE_CONFIG").map(PathBuf::from));
    if let Some(path) = &file {
        figment = figment.merge(file_layer(path)?);
    }
    let mounts = if sources.mounts {
        let mounts = Mounts::resolve(env)?;
        figment = figment
            .merge(mount_layer("Fission ConfigMap", &mounts.config_dir)?)
            .merge(mount_layer("Fission Secret", &mounts.secret_dir)?);
        Some(mounts)
    } else {
        None
    };
    figment = figment.merge(env_layer(env));
    figment = figment.merge(Layer {
        name: "command line",
        values: sources.flags.values.clone(),
        origins: Arc::new(sources.flags.origins.clone()),
        file: None,
    });
    let config: Config = figment
        .extract()
        .map_err(|e| from_figment(e, file.as_deref()))?;
    Ok(Loaded {
        config,
        figment,
        mounts,
        file,
    })
}

/// A configuration file: YAML or TOML by its extension.
fn file_layer(path: &Path) -> Result<Layer, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let parsed: Result<Dict, String> = match extension.to_ascii_lowercase().as_str() {
        "toml" => Toml::from_str(&text).map_err(|e| e.to_string()),
        "yaml" | "yml" if text.trim().is_empty() => Ok(Dict::new()),
        "yaml" | "yml" => Yaml::from_str(&text).map_err(|e| e.to_string()),
        _ => Err("expected a .yaml, .yml or .toml file".into()),
    };
    let values = parsed.map_err(|reason| SettingsError::File {
        path: path.to_owned(),
        reason,
    })?;
    Ok(Layer {
        name: "configuration file",
        values: typed_sections(values),
        origins: Arc::default(),
        file: Some(path.to_owned()),
    })
}

/// The mounted files of one ConfigMap or Secret root: `<dir>/<section>/<key>` for every known
/// key. Values lose their trailing line ending; all but passwords also their spaces.
fn mount_layer(name: &'static str, dir: &Path) -> Result<Layer, SettingsError> {
    let mut layer = Layer::new(name);
    for (section, keys) in KEYS {
        for key in *keys {
            let path = dir.join(section).join(key);
            if let Some(value) = read_optional(&path)? {
                let value = if SECRET_KEYS.contains(key) {
                    value
                } else {
                    value.trim().to_owned()
                };
                layer.set(
                    &format!("{section}.{key}"),
                    value,
                    path.display().to_string(),
                );
            }
        }
    }
    Ok(layer)
}

/// `ENTWINE_<SECTION>__<KEY>` for every section (any key: an unknown one is refused by name),
/// then [`OTHER_VARIABLES`].
fn env_layer(env: &Environment) -> Layer {
    let mut layer = Layer::new("environment");
    for (section, _) in KEYS {
        let prefix = format!("ENTWINE_{}__", section.to_ascii_uppercase());
        let mut found: Vec<(&str, &str)> = env
            .vars
            .iter()
            .filter(|(k, v)| k.starts_with(&prefix) && k.len() > prefix.len() && !v.is_empty())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        found.sort();
        for (variable, value) in found {
            let key = variable[prefix.len()..].to_ascii_lowercase();
            let value = if SECRET_KEYS.contains(&key.as_str()) {
                value.to_owned()
            } else {
                value.trim().to_owned()
            };
            layer.set(&format!("{section}.{key}"), value, variable.to_owned());
        }
    }
    for (variable, key) in OTHER_VARIABLES {
        let Some(value) = env.get(variable) else {
            continue;
        };
        let shadowed =
            key != &"database.url" && layer.origins.get(*key).is_some_and(|o| o.contains("__"));
        if !shadowed {
            layer.set(key, value.trim().to_owned(), (*variable).to_owned());
        }
    }
    layer
}

/// A figment error as a [`SettingsError`] naming the key and the value's source.
fn from_figment(error: figment::Error, file: Option<&Path>) -> SettingsError {
    let error = error
        .into_iter()
        .next()
        .expect("an error has a first error");
    let mut path = error.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &error.kind {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = path.join(".");
    let origin = match &error.metadata {
        Some(metadata) => origin(metadata, &path),
        None => file.map_or_else(|| "configuration".to_owned(), |p| p.display().to_string()),
    };
    use figment::error::{Actual, Kind};
    let last = path.last().map(String::as_str).unwrap_or("");
    let is_number = |expected: &str| {
        [
            "f64", "f32", "u16", "u32", "u64", "usize", "i64", "integer", "number",
        ]
        .iter()
        .any(|t| expected.contains(t))
    };
    let reason = match &error.kind {
        Kind::InvalidType(Actual::Str(s), _) | Kind::InvalidValue(Actual::Str(s), _)
            if last == "port" =>
        {
            format!("{s:?} is not a port number (1-65535)")
        }
        Kind::InvalidValue(Actual::Unsigned(n), _) if last == "port" => {
            format!("{n} is not a port number (1-65535)")
        }
        Kind::InvalidValue(Actual::Signed(n), _) if last == "port" => {
            format!("{n} is not a port number (1-65535)")
        }
        Kind::InvalidType(Actual::Float(f), expected) if is_number(expected) => {
            format!("{f} is not a whole number")
        }
        Kind::InvalidType(Actual::Str(s), expected) if is_number(expected) => {
            format!("{s:?} is not a number")
        }
        Kind::UnknownField(_, expected) => {
            format!("unknown key (expected one of: {})", expected.join(", "))
        }
        Kind::Message(message) if path.is_empty() => {
            return SettingsError::File {
                path: error
                    .metadata
                    .as_ref()
                    .and_then(|m| match &m.source {
                        Some(Source::File(p)) => Some(p.clone()),
                        _ => None,
                    })
                    .or_else(|| file.map(Path::to_owned))
                    .unwrap_or_default(),
                reason: message.clone(),
            }
        }
        other => other.to_string(),
    };
    SettingsError::Invalid {
        key: if key.is_empty() {
            "configuration".into()
        } else {
            key
        },
        origin,
        reason,
    }
}

/// Where a value from `metadata` came from: the file's path, else the variable, mounted file or
/// flag the layer recorded.
fn origin<K: AsRef<str>>(metadata: &Metadata, keys: &[K]) -> String {
    match &metadata.source {
        Some(Source::File(path)) => path.display().to_string(),
        _ => metadata.interpolate(&Profile::Default, keys),
    }
}

/// Where the store is.
#[derive(Clone)]
pub enum DatabaseTarget {
    /// A URL, as given (`database.url`, `DATABASE_URL`, `--database-url`).
    Url(SecretString),
    /// Assembled from the `postgres` keys.
    Postgres(Box<PgConnectOptions>),
}

impl fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

impl DatabaseTarget {
    /// A (lazily connecting) pool for this target.
    pub fn open(&self, options: &StoreOptions) -> Result<Store, StoreError> {
        match self {
            Self::Url(url) => Store::open(url.expose_secret(), options),
            Self::Postgres(connect) => Ok(Store::postgres((**connect).clone(), options)),
        }
    }

    /// The target for printing: the URL without its password, or `postgres://user@host:port/db`.
    pub fn redacted(&self) -> String {
        match self {
            Self::Url(url) => redact_url(url.expose_secret()),
            Self::Postgres(o) => format!(
                "postgres://{}@{}:{}/{}",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("")
            ),
        }
    }
}

impl Loaded {
    /// Where the value of `key` (`section.key`) came from: a file path, a variable, a flag, or
    /// `default`.
    pub fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(metadata) => {
                let keys: Vec<&str> = key.split('.').collect();
                origin(metadata, &keys)
            }
            None => "default".into(),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            key: key.to_owned(),
            origin: self.origin(key),
            reason: reason.into(),
        }
    }

    /// Retention, validated: `None` when `retention.keep_days` is unset (everything kept).
    /// `keep_days` must be a number of days above 0 (at most 100 years), `period` a number of
    /// seconds above 0 (at most a year).
    pub fn retention(&self) -> Result<Option<RetentionSettings>, SettingsError> {
        let r = &self.config.retention;
        if !(r.period.is_finite() && r.period > 0.0 && r.period <= 366.0 * 86_400.0) {
            return Err(self.invalid(
                "retention.period",
                format!(
                    "must be a number of seconds above 0 and at most a year, got {}",
                    r.period
                ),
            ));
        }
        let Some(days) = r.keep_days else {
            return Ok(None);
        };
        if !(days.is_finite() && days > 0.0 && days <= 36_600.0) {
            return Err(self.invalid(
                "retention.keep_days",
                format!("must be a number of days above 0 and at most 36600, got {days}"),
            ));
        }
        Ok(Some(RetentionSettings {
            keep: Duration::from_secs_f64(days * 86_400.0),
            period: Duration::from_secs_f64(r.period),
        }))
    }

    /// The ODTE configuration, validated: the one place an [`OdteConfig`] is built from
    /// settings.
    pub fn odte(&self) -> Result<OdteConfig, SettingsError> {
        let o = &self.config.odte;
        OdteConfig::new(
            o.expected_update_rate,
            o.time_window,
            o.desired_timeliness,
            o.threshold,
        )
        .and_then(|c| c.with_availability_max_gap(o.availability_max_gap))
        .and_then(|c| c.with_silence_threshold(o.silence_threshold))
        .map_err(|e| {
            let key = match e {
                OdteConfigError::UpdateRate(_) => "expected_update_rate",
                OdteConfigError::TimeWindow(_) => "time_window",
                OdteConfigError::DesiredTimeliness(_) => "desired_timeliness",
                OdteConfigError::Threshold(_) => "threshold",
                OdteConfigError::AvailabilityMaxGap(_) => "availability_max_gap",
                OdteConfigError::SilenceThreshold(_) => "silence_threshold",
                #[allow(unreachable_patterns)]
                _ => "",
            };
            if key.is_empty() {
                SettingsError::Invalid {
                    key: "odte".into(),
                    origin: "the odte section".into(),
                    reason: e.to_string(),
                }
            } else {
                self.invalid(&format!("odte.{key}"), e.to_string())
            }
        })
    }

    /// The device models, with the seed's built in under [`Loaded::odte`]'s profile: every
    /// `*.json` file of `models.dir` (or of the mounted `device-models` ConfigMap), in name
    /// order, each validated whole; an error names the file, the field and `models.dir`'s
    /// source. Files whose names start with `.` (a ConfigMap volume's `..data`) are skipped;
    /// symbolic links are followed.
    pub fn models(&self) -> Result<ModelSet, SettingsError> {
        let seed = self.odte()?;
        let (dir, required) = match (&self.config.models.dir, &self.mounts) {
            (Some(dir), _) => (PathBuf::from(dir), true),
            (None, Some(mounts)) => (mounts.config_dir.join(MODELS_CONFIGMAP), false),
            (None, None) => return Ok(ModelSet::seed_only(seed)),
        };
        if !required && !dir.is_dir() {
            return Ok(ModelSet::seed_only(seed));
        }
        let origin = if required {
            self.origin("models.dir")
        } else {
            format!("the {MODELS_CONFIGMAP} ConfigMap")
        };
        let invalid = |reason: String| SettingsError::Invalid {
            key: "models.dir".into(),
            origin: origin.clone(),
            reason,
        };
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| invalid(format!("cannot read directory {}: {e}", dir.display())))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| invalid(format!("cannot read {}: {e}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && name.ends_with(".json") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut models = Vec::with_capacity(files.len());
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
            models.push(
                Model::parse(&path.display().to_string(), &text)
                    .map_err(|e| invalid(e.to_string()))?,
            );
        }
        ModelSet::new(seed, models).map_err(|e| invalid(e.to_string()))
    }

    /// The store's pool options.
    pub fn store_options(&self) -> Result<StoreOptions, SettingsError> {
        let d = &self.config.database;
        if !(1..=10_000).contains(&d.max_connections) {
            return Err(self.invalid(
                "database.max_connections",
                format!("{} is outside 1..=10000", d.max_connections),
            ));
        }
        if !(d.acquire_timeout.is_finite() && (0.001..=3600.0).contains(&d.acquire_timeout)) {
            return Err(self.invalid(
                "database.acquire_timeout",
                format!("{} is outside 0.001..=3600 seconds", d.acquire_timeout),
            ));
        }
        Ok(StoreOptions {
            max_connections: d.max_connections,
            acquire_timeout: Duration::from_secs_f64(d.acquire_timeout),
        })
    }

    /// The HTTP server's limits.
    pub fn http_limits(&self) -> Result<Limits, SettingsError> {
        let h = &self.config.http;
        Limits::new(h.header_read_timeout, h.body_timeout, h.max_connections)
            .map_err(|(key, reason)| self.invalid(&format!("http.{key}"), reason))
    }

    /// Where the store is: `database.url` when set; else the `postgres` keys (host, database
    /// and user required) when `postgres.host` is set or there is no `fallback_url`; else
    /// `fallback_url`. A URL is checked by [`DatabaseTarget::open`].
    pub fn database(&self, fallback_url: Option<&str>) -> Result<DatabaseTarget, SettingsError> {
        if let Some(url) = &self.config.database.url {
            // Checked when the store is opened (`StoreError::Url`).
            let url = url.0.trim();
            return Ok(DatabaseTarget::Url(SecretString::from(url.to_owned())));
        }
        let pg = &self.config.postgres;
        match (fallback_url, &pg.host) {
            (Some(url), None) => Ok(DatabaseTarget::Url(SecretString::from(url.to_owned()))),
            _ => self
                .postgres_options()
                .map(|o| DatabaseTarget::Postgres(Box::new(o))),
        }
    }

    /// Where the store is, as one URL (for code that takes a URL): `database.url`, else a
    /// `postgres://` URL assembled from the `postgres` keys (each part percent-encoded), else
    /// `fallback_url`; as [`Loaded::database`] decides.
    pub fn database_url(&self, fallback_url: Option<&str>) -> Result<SecretString, SettingsError> {
        match self.database(fallback_url)? {
            DatabaseTarget::Url(url) => Ok(url),
            DatabaseTarget::Postgres(_) => {
                let pg = &self.config.postgres;
                let part = |v: &Option<String>| encode(v.as_deref().unwrap_or("").trim());
                let mut url = format!("postgres://{}", part(&pg.user));
                if let Some(password) = &pg.password {
                    url.push(':');
                    url.push_str(&encode(&password.0));
                }
                let host = pg.host.as_deref().unwrap_or("").trim();
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    encode(host)
                };
                url.push_str(&format!("@{host}:{}/{}", pg.port, part(&pg.database)));
                let mut query = Vec::new();
                if let Some(mode) = &pg.sslmode {
                    query.push(format!("sslmode={}", encode(mode.trim())));
                }
                if let Some(root) = &pg.sslrootcert {
                    query.push(format!("sslrootcert={}", encode(root.trim())));
                }
                if !query.is_empty() {
                    url.push('?');
                    url.push_str(&query.join("&"));
                }
                Ok(SecretString::from(url))
            }
        }
    }

    fn required(&self, key: &str, value: &Option<String>) -> Result<String, SettingsError> {
        match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => Ok(v.to_owned()),
            None => {
                let mounted = self.mounts.as_ref().map_or_else(String::new, |m| {
                    format!(
                        "mount the postgres ConfigMap or Secret ({}), ",
                        m.config_dir.join("postgres").join(key).display()
                    )
                });
                let file = self.file.as_ref().map_or_else(String::new, |f| {
                    format!("set postgres.{key} in {}, ", f.display())
                });
                Err(SettingsError::Missing {
                    key: format!("postgres.{key}"),
                    hint: format!(
                        "{file}{mounted}set ENTWINE_POSTGRES__{}, or set DATABASE_URL",
                        key.to_ascii_uppercase()
                    ),
                })
            }
        }
    }

    fn postgres_options(&self) -> Result<PgConnectOptions, SettingsError> {
        let pg = &self.config.postgres;
        let host = self.required("host", &pg.host)?;
        let database = self.required("database", &pg.database)?;
        let user = self.required("user", &pg.user)?;
        if pg.port == 0 {
            return Err(self.invalid("postgres.port", "0 is not a port number (1-65535)"));
        }
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&host)
            .port(pg.port)
            .database(&database)
            .username(&user);
        if let Some(password) = &pg.password {
            options = options.password(&password.0);
        }
        if let Some(mode) = &pg.sslmode {
            let mode = sqlx::postgres::PgSslMode::from_str(mode.trim())
                .map_err(|e| self.invalid("postgres.sslmode", e.to_string()))?;
            options = options.ssl_mode(mode);
        }
        if let Some(root) = &pg.sslrootcert {
            let root = root.trim();
            if !Path::new(root).is_file() {
                return Err(self.invalid(
                    "postgres.sslrootcert",
                    format!("{root}: no such file (a PEM file of the CA certificates)"),
                ));
            }
            options = options.ssl_root_cert(root);
        }
        Ok(options)
    }

    /// The HTTP servers' authentication policy (`auth.*`): no tokens means open on loopback
    /// only ([`entwine_http::check_exposure`] refuses any other address).
    pub fn auth(&self) -> Result<entwine_http::Auth, SettingsError> {
        let section = &self.config.auth;
        let tokens = match &section.tokens {
            Some(text) => entwine_http::Tokens::parse(&SecretString::from(text.0.clone()))
                .map_err(|e| self.invalid("auth.tokens", e.to_string()))?,
            None => entwine_http::Tokens::default(),
        };
        Ok(entwine_http::Auth {
            tokens,
            functions: section.functions,
            metrics: section.metrics,
        })
    }

    /// The token this process presents (`auth.token`), checked as the servers would.
    pub fn client_token(&self) -> Result<Option<SecretString>, SettingsError> {
        let Some(token) = &self.config.auth.token else {
            return Ok(None);
        };
        let token = token.0.trim();
        if token.chars().count() < entwine_http::auth::MIN_TOKEN_LEN {
            return Err(self.invalid(
                "auth.token",
                format!(
                    "{} characters long; a token needs at least {}",
                    token.chars().count(),
                    entwine_http::auth::MIN_TOKEN_LEN
                ),
            ));
        }
        Ok(Some(SecretString::from(token.to_owned())))
    }

    /// How the MQTT clients log in and encrypt (`mqtt.*`); the files are read when the
    /// client prepares them ([`entwine_mqtt::MqttSecurity::prepare`]).
    pub fn mqtt(&self) -> Result<entwine_mqtt::MqttSecurity, SettingsError> {
        let section = &self.config.mqtt;
        let path = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let credentials = match (&section.username, &section.password) {
            (Some(user), password) if !user.trim().is_empty() => Some(entwine_mqtt::Credentials {
                username: user.trim().to_owned(),
                password: SecretString::from(
                    password.as_ref().map_or_else(String::new, |p| p.0.clone()),
                ),
            }),
            (_, Some(_)) => {
                return Err(SettingsError::Missing {
                    key: "mqtt.username".into(),
                    hint: format!(
                        "mqtt.password is set (from {}) but no user name: set mqtt.username \
                         (ENTWINE_MQTT__USERNAME or the Secret file mqtt/username)",
                        self.origin("mqtt.password")
                    ),
                })
            }
            _ => None,
        };
        let tls = entwine_mqtt::TlsFiles::from_settings(
            path(&section.ca_file),
            path(&section.cert_file),
            path(&section.key_file),
        )
        .map_err(|e| {
            let key = if section.cert_file.is_some() {
                "mqtt.cert_file"
            } else {
                "mqtt.key_file"
            };
            self.invalid(key, e.to_string())
        })?;
        Ok(entwine_mqtt::MqttSecurity { credentials, tls })
    }

    /// The devices' own credentials (`mqtt.credentials_file`), read now.
    pub fn mqtt_device_credentials(
        &self,
    ) -> Result<Option<entwine_mqtt::DeviceCredentials>, SettingsError> {
        let Some(file) = self
            .config
            .mqtt
            .credentials_file
            .as_deref()
            .map(str::trim)
            .filter(|f| !f.is_empty())
        else {
            return Ok(None);
        };
        entwine_mqtt::DeviceCredentials::read(Path::new(file))
            .map(Some)
            .map_err(|e| self.invalid("mqtt.credentials_file", e.to_string()))
    }

    /// The configuration as YAML or TOML, passwords (also inside URLs) shown as `***`, each
    /// value followed by a comment naming its source. `fallback_url` is shown as
    /// `database.url` when neither it nor `postgres.host` is set (as [`Loaded::database`]
    /// would use it).
    pub fn render(&self, format: RenderFormat, fallback_url: Option<&str>) -> String {
        let mut config = self.config.clone();
        let mut url_is_fallback = false;
        if config.database.url.is_none() && config.postgres.host.is_none() {
            if let Some(url) = fallback_url {
                config.database.url = Some(Secret(url.to_owned()));
                url_is_fallback = true;
            }
        }
        let value = Value::serialize(&config).expect("the configuration serializes");
        let Value::Dict(_, sections) = value else {
            unreachable!("a struct serializes to a dict")
        };
        let mut out = String::new();
        for (section, keys) in KEYS {
            let Some(Value::Dict(_, values)) = sections.get(*section) else {
                continue;
            };
            if values.is_empty() {
                continue;
            }
            match format {
                RenderFormat::Yaml => out.push_str(&format!("{section}:\n")),
                RenderFormat::Toml => {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(&format!("[{section}]\n"));
                }
            }
            for key in *keys {
                let Some(value) = values.get(*key) else {
                    continue;
                };
                let dotted = format!("{section}.{key}");
                let source = if url_is_fallback && dotted == "database.url" {
                    "default".to_owned()
                } else {
                    self.origin(&dotted)
                };
                let text = scalar(value, format, key);
                match format {
                    RenderFormat::Yaml => out.push_str(&format!("  {key}: {text}  # {source}\n")),
                    RenderFormat::Toml => out.push_str(&format!("{key} = {text}  # {source}\n")),
                }
            }
        }
        out
    }
}

/// How [`Loaded::render`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderFormat {
    /// YAML.
    Yaml,
    /// TOML.
    Toml,
}

fn scalar(value: &Value, format: RenderFormat, key: &str) -> String {
    let text = match value {
        Value::String(..) if SECRET_KEYS.contains(&key) => "***".to_owned(),
        Value::String(_, s) if key == "url" => redact_url(s),
        Value::String(_, s) => s.clone(),
        Value::Num(_, n) => {
            return match n.to_f64() {
                Some(f) if n.to_u128().is_none() && n.to_i128().is_none() => {
                    let shown = f.to_string();
                    if shown.contains(['.', 'e', 'N', 'i']) {
                        shown
                    } else {
                        format!("{shown}.0")
                    }
                }
                _ => n
                    .to_u128()
                    .map(|u| u.to_string())
                    .or_else(|| n.to_i128().map(|i| i.to_string()))
                    .unwrap_or_default(),
            }
        }
        Value::Bool(_, b) => return b.to_string(),
        other => format!("{other:?}"),
    };
    match format {
        RenderFormat::Yaml => serde_yaml_ng::to_string(&text)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or(text),
        RenderFormat::Toml => toml::Value::String(text).to_string(),
    }
}

/// `url` without its password: `postgres://user:***@host/db`, and `password=***` in its query.
pub fn redact_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some(query) = out.find('?') {
        let (head, tail) = out.split_at(query + 1);
        let redacted: Vec<String> = tail
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

/// `text` percent-encoded for a URL's user, password, host or path: all but RFC 3986's
/// unreserved characters.
fn encode(text: &str) -> String {
    const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// A file's value without its trailing line ending, or `None` when the file does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, SettingsError> {
    match std::fs::read_to_string(path) {
        // Only the line ending a file editor or `--from-file` leaves: spaces can belong to a
        // password. Numbers, hosts and names are trimmed by the layer.
        Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // A directory where a key's file would be (`<root>/<ns>/odte` itself is one).
        Err(_) if path.is_dir() => Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn retention_is_off_unless_keep_days_is_set_and_bad_values_are_named() {
        let load_with = |vars: &[(&str, &str)]| {
            let mut all = vec![
                ("ENTWINE_CONFIG_ROOT", "/nonexistent/entwine-configs"),
                ("ENTWINE_SECRET_ROOT", "/nonexistent/entwine-secrets"),
                ("ENTWINE_PODINFO_DIR", "/nonexistent/entwine-podinfo"),
                ("ENTWINE_NAMESPACE", "default"),
            ];
            all.extend_from_slice(vars);
            let env = Environment::from_vars(all);
            load(&Sources::new(&env)).unwrap()
        };
        assert_eq!(
            load_with(&[]).retention().unwrap(),
            None,
            "the seed's: keep all"
        );
        let half_day = load_with(&[
            ("ENTWINE_RETENTION__KEEP_DAYS", "0.5"),
            ("ENTWINE_RETENTION__PERIOD", "60"),
        ]);
        assert_eq!(
            half_day.retention().unwrap(),
            Some(RetentionSettings {
                keep: Duration::from_secs(43_200),
                period: Duration::from_secs(60),
            })
        );
        let default_period = load_with(&[("ENTWINE_RETENTION__KEEP_DAYS", "30")]);
        assert_eq!(
            default_period.retention().unwrap().unwrap().period,
            Duration::from_secs(3600)
        );
        for (key, value, expected) in [
            ("ENTWINE_RETENTION__KEEP_DAYS", "0", "retention.keep_days from ENTWINE_RETENTION__KEEP_DAYS: must be a number of days above 0 and at most 36600, got 0"),
            ("ENTWINE_RETENTION__KEEP_DAYS", "-1", "retention.keep_days from ENTWINE_RETENTION__KEEP_DAYS: must be a number of days above 0 and at most 36600, got -1"),
            ("ENTWINE_RETENTION__PERIOD", "0", "retention.period from ENTWINE_RETENTION__PERIOD: must be a number of seconds above 0 and at most a year, got 0"),
        ] {
            let loaded = load_with(&[(key, value)]);
            assert_eq!(loaded.retention().unwrap_err().to_string(), expected);
        }
    }

    #[test]
    fn every_key_is_a_field_of_its_section() {
        let mut config = Config::default();
        config.database.url = Some(Secret("u".into()));
        config.postgres.host = Some("h".into());
        config.postgres.database = Some("d".into());
        config.postgres.user = Some("u".into());
        config.postgres.password = Some(Secret("p".into()));
        config.postgres.sslmode = Some("require".into());
        config.odte.availability_max_gap = Some(1.0);
        config.odte.silence_threshold = Some(1.0);
        config.digital.broker_url = Some("b:1".into());
        config.digital.state_topic = Some("s".into());
        config.digital.lifecycle_topic = Some("l".into());
        config.auth.tokens = Some(Secret("t".into()));
        config.auth.token = Some(Secret("t".into()));
        config.postgres.sslrootcert = Some("r".into());
        config.models.dir = Some("m".into());
        config.retention.keep_days = Some(30.0);
        config.mqtt = MqttSection {
            username: Some("u".into()),
            password: Some(Secret("p".into())),
            ca_file: Some("c".into()),
            cert_file: Some("c".into()),
            key_file: Some("k".into()),
            credentials_file: Some("f".into()),
        };
        let Value::Dict(_, sections) = Value::serialize(&config).unwrap() else {
            panic!("a dict")
        };
        let listed: Vec<String> = KEYS
            .iter()
            .flat_map(|(s, keys)| keys.iter().map(move |k| format!("{s}.{k}")))
            .collect();
        let mut fields = Vec::new();
        for (section, value) in &sections {
            let Value::Dict(_, keys) = value else {
                panic!("a section")
            };
            fields.extend(keys.keys().map(|k| format!("{section}.{k}")));
        }
        let mut sorted = listed.clone();
        sorted.sort();
        fields.sort();
        assert_eq!(sorted, fields);
    }
}
