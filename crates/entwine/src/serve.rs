//! `entwine serve`: the twins service ([`entwine_platform::service::TwinsService`]) over a store
//! the functions write (PostgreSQL on a cluster; any store URL works): the twins API, the live
//! stream, the dashboard and `/metrics`, with live updates from the digital events on the
//! broker (`digital.broker_url`, `--broker-url`). No function routes, connector, devices or
//! evaluator. Runs until SIGINT/SIGTERM, then drains.

use std::future::Future;
use std::net::SocketAddr;

use clap::Args;
use entwine_config::{Flags, Loaded};
use entwine_platform::service::{LiveUpdates, ServiceConfig, TwinsService};
use entwine_platform::StoreSource;

use crate::cli::{load_config, DatabaseArgs, ModelArgs, MqttArgs};

/// Flags of `entwine serve`. Each overrides the typed configuration (`--config` file, Fission
/// mounts, `ENTWINE_*`); the broker and topics are the functions' `digital` section.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The store.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The MQTT login and TLS files of the live updates' subscription.
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Where the twins API, the stream, the dashboard and /metrics listen. Beyond loopback it
    /// needs `auth.tokens` (docs/SECURITY.md).
    #[arg(long, env = "ENTWINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The broker the functions publish digital events to (`host:port`, `mqtt://…`,
    /// `mqtts://…`) [default: `digital.broker_url`; none: no live updates].
    #[arg(long)]
    pub broker_url: Option<String>,
    /// Topic of digital states, with `{device_id}` [default: `digital.state_topic`, else
    /// `digitaltwin/{device_id}/state`].
    #[arg(long)]
    pub digital_state_topic: Option<String>,
    /// Topic of lifecycle changes, with `{device_id}` [default: `digital.lifecycle_topic`, else
    /// `digitaltwin/{device_id}/lifecycle`].
    #[arg(long)]
    pub digital_lifecycle_topic: Option<String>,
    /// MQTT client id of the subscription (unique per replica) [default: entwine-twins- and
    /// the host name].
    #[arg(long)]
    pub client_id: Option<String>,
    /// Device models beside the seed's (`--models DIR`), to name each twin's model.
    #[command(flatten)]
    pub models: ModelArgs,
}

impl ServeArgs {
    /// The typed configuration with these flags on top.
    fn load(&self) -> anyhow::Result<Loaded> {
        let mut flags = Flags::default();
        self.mqtt.flags(&mut flags)?;
        self.models.flags(&mut flags);
        self.database.flags(&mut flags);
        flags
            .set(
                "digital.broker_url",
                "--broker-url",
                self.broker_url.clone(),
            )
            .set(
                "digital.state_topic",
                "--digital-state-topic",
                self.digital_state_topic.clone(),
            )
            .set(
                "digital.lifecycle_topic",
                "--digital-lifecycle-topic",
                self.digital_lifecycle_topic.clone(),
            );
        load_config(self.database.config.clone(), flags)
    }

    /// The service these flags and the configuration describe.
    pub fn service_config(&self) -> anyhow::Result<ServiceConfig> {
        let loaded = self.load()?;
        let url = self.database.url()?;
        let mut config = ServiceConfig::new(&url);
        config.store = StoreSource::Url {
            url,
            options: loaded.store_options()?,
        };
        config.listen = self.listen;
        config.http_limits = loaded.http_limits()?;
        config.auth = loaded.auth()?;
        config.odte = loaded.odte()?;
        config.retention = loaded.retention()?;
        config.models = loaded
            .models()?
            .models()
            .iter()
            .map(|m| m.as_ref().clone())
            .collect();
        let digital = &loaded.config.digital;
        config.live = match digital.broker_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(broker_url) => {
                let client_id = self.client_id.clone().unwrap_or_else(|| {
                    format!(
                        "entwine-twins-{}",
                        std::env::var("HOSTNAME")
                            .unwrap_or_else(|_| std::process::id().to_string())
                    )
                });
                let mut live = LiveUpdates::new(broker_url, &client_id);
                if let Some(topic) = &digital.state_topic {
                    live.state_topic = topic.clone();
                }
                if let Some(topic) = &digital.lifecycle_topic {
                    live.lifecycle_topic = topic.clone();
                }
                live.mqtt = loaded.mqtt()?;
                Some(live)
            }
        };
        Ok(config)
    }
}

/// Runs the twins service until `shutdown` completes, then stops it in order.
pub async fn serve(
    args: &ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = args.service_config()?;
    let live = config.live.clone();
    let protected = !config.auth.tokens.is_empty();
    let service = TwinsService::start(config).await?;
    let address = service.http_address();
    println!("entwine twins service");
    println!(
        "  store:      {} ({})",
        service.store().backend(),
        args.database.redacted_url()
    );
    match &live {
        Some(live) => println!(
            "  live:       {} and {} from {}",
            live.state_topic, live.lifecycle_topic, live.broker_url
        ),
        None => println!(
            "  live:       none (no digital.broker_url / --broker-url): the API serves the store, the stream stays quiet"
        ),
    }
    println!(
        "  auth:       {}",
        if protected {
            "bearer tokens (auth.tokens)"
        } else {
            "none on loopback (set auth.tokens to ask for bearer tokens; docs/SECURITY.md)"
        }
    );
    println!("  dashboard:  http://{address}/");
    println!(
        "  twins API:  http://{address}/api/twins  (…/{{id}}, …/{{id}}/history, live: /api/stream)"
    );
    println!("  metrics:    http://{address}/metrics");
    println!("  health:     http://{address}/healthz");
    println!("  stop:       Ctrl-C");
    shutdown.await;
    println!("stopping: no new connections, live streams end, then the broker and the store");
    service.shutdown().await?;
    println!("twins service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn serve_args(flags: &[&str]) -> super::ServeArgs {
        let cli = Cli::try_parse_from(["entwine", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        args
    }

    #[test]
    fn the_flags_name_the_store_the_listener_and_where_live_updates_come_from() {
        let args = serve_args(&[
            "--database-url",
            "sqlite://twins.db",
            "--broker-url",
            "mqtt://broker:1884",
            "--digital-state-topic",
            "plant/{device_id}/state",
            "--client-id",
            "twins-0",
        ]);
        assert_eq!(args.listen, "127.0.0.1:8080".parse().unwrap());
        let config = args.service_config().unwrap();
        let live = config.live.expect("a broker was named");
        assert_eq!(
            (
                live.broker_url.as_str(),
                live.state_topic.as_str(),
                live.client_id.as_str()
            ),
            ("mqtt://broker:1884", "plant/{device_id}/state", "twins-0")
        );
        assert_eq!(live.filters()[0], "plant/+/state");
        match config.store {
            entwine_platform::StoreSource::Url { url, .. } => assert_eq!(url, "sqlite://twins.db"),
            entwine_platform::StoreSource::Given(_) => panic!("a URL was named"),
        }
    }
}
