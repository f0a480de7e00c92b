//! `entwine config`: the effective configuration, each value with its source.

use clap::{Args, ValueEnum};
use entwine_config::{RenderFormat, DEFAULT_DATABASE_URL};

use crate::cli::{DatabaseArgs, OdteArgs};

/// Flags of `entwine config`: the same overrides as `entwine up`'s store and ODTE flags.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// How to print it.
    #[arg(long, value_enum, default_value = "yaml")]
    pub format: ConfigFormat,
    #[command(flatten)]
    /// The store (and `--config FILE`).
    pub database: DatabaseArgs,
    #[command(flatten)]
    /// The ODTE configuration.
    pub odte: OdteArgs,
}

/// The output format of `entwine config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigFormat {
    /// YAML, as a `--config` file takes it.
    Yaml,
    /// TOML, as a `--config` file takes it.
    Toml,
}

/// Loads and checks every section, then prints it (secrets redacted) with each value's source
/// as a comment. An invalid value is an error naming its key and source (exit code 2).
pub fn config(args: &ConfigArgs) -> anyhow::Result<()> {
    let loaded = args.database.load(Some(&args.odte))?;
    loaded.odte()?;
    loaded.store_options()?;
    loaded.http_limits()?;
    loaded.auth()?;
    loaded.client_token()?;
    loaded.mqtt()?;
    loaded.mqtt_device_credentials()?;
    loaded.models()?;
    loaded.database(Some(DEFAULT_DATABASE_URL))?;
    let format = match args.format {
        ConfigFormat::Yaml => RenderFormat::Yaml,
        ConfigFormat::Toml => RenderFormat::Toml,
    };
    print!("{}", loaded.render(format, Some(DEFAULT_DATABASE_URL)));
    Ok(())
}
