//! `entwine up`: the whole twin platform in one process.
//!
//! Start order: store (migrated) → MQTT broker (embedded unless `--broker-url`) → HTTP server
//! (the four function routes on Fission's paths, the twins API, `/metrics`) → connector → devices.
//! Stop order on SIGINT/SIGTERM is the reverse: devices stop publishing, the connector finishes
//! the chains in progress, the HTTP server drains, the store closes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use entwine_connector::{ConnectorConfig, ConnectorStats};
use entwine_device::conf::DeviceConf;
use entwine_device::fleet::{Broker, FleetOptions};
use entwine_device::Emulator;
use entwine_functions::handlers::{Function, SystemClock, TwinFunctions};
use entwine_functions::http::{routes, with_fallbacks};
use entwine_functions::publisher::{DigitalPublisher, PublisherSettings};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::cli::{open_migrated, UpArgs};

/// Binds `wanted`; when its port is taken, a free port on the same address instead.
pub async fn bind_or_free_port(wanted: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(wanted).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(%wanted, "address in use, choosing a free port");
            TcpListener::bind(SocketAddr::new(wanted.ip(), 0))
                .await
                .with_context(|| format!("cannot listen on {}", wanted.ip()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {wanted}")),
    }
}

/// Installs the process's Prometheus recorder, with latency buckets from 0.5 ms to 10 s. A
/// gauge not set for `idle` disappears from `/metrics`: the twin handler sets a twin's
/// `entwine_twin_odte` and `entwine_twin_entangled` on each of its states, so the series of a
/// twin silent longer than the silence threshold (unbound), or removed, go away, and the
/// number of series stays bounded by the twins that are alive.
fn install_metrics(idle: std::time::Duration) -> anyhow::Result<PrometheusHandle> {
    const BUCKETS: [f64; 14] = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
        .context("metric buckets")?
        .idle_timeout(MetricKindMask::GAUGE, Some(idle))
        .install_recorder()
        .context("cannot install the metrics recorder")
}

/// Runs the platform until `shutdown` completes, then stops it in order.
pub async fn up(
    args: &UpArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let odte = args.odte.config()?;
    let http_limits = entwine_http::Limits::from_env()?;
    let store = open_migrated(&args.database).await?;
    let metrics = install_metrics(std::time::Duration::from_millis(
        u64::try_from(odte.silence_ms()).unwrap_or(0),
    ))?;

    let embedded_broker = args.broker_url.is_none();
    let (broker, broker_note) = match &args.broker_url {
        Some(url) => {
            let (host, port) = entwine_connector::parse_broker_url(url)?;
            (Broker { host, port }, "external")
        }
        None => {
            let address = crate::broker::start(args.mqtt_listen).await?;
            let broker = Broker {
                host: address.ip().to_string(),
                port: address.port(),
            };
            (broker, "embedded")
        }
    };

    let listener = bind_or_free_port(args.listen).await?;
    let address = listener.local_addr().context("listener has no address")?;
    let (feed, _) = broadcast::channel(4096);
    let (lifecycle, _) = broadcast::channel(4096);
    let publisher = if args.no_digital_events {
        None
    } else {
        let mut settings = PublisherSettings::new(
            &format!("{}:{}", broker.host, broker.port),
            &format!("{}-digital", args.connector_client_id),
        );
        settings.state_topic = args.digital_state_topic.clone();
        settings.lifecycle_topic = args.digital_lifecycle_topic.clone();
        Some(
            DigitalPublisher::start(&settings)
                .map_err(|e| anyhow::anyhow!("digital events: {e}"))?,
        )
    };
    let functions = Arc::new(
        TwinFunctions::new(store.clone(), odte, Arc::new(SystemClock))
            .with_feed(feed.clone())
            .with_lifecycle_feed(lifecycle.clone())
            .with_publisher(publisher.as_ref().map(|(p, _)| p.clone())),
    );
    // `--evaluator-period` was checked when the flags were parsed (`cli::evaluator_period`).
    let evaluator_period = args
        .evaluator_period
        .unwrap_or_else(|| (odte.time_window_s() / 6.0).clamp(0.5, 10.0));
    let evaluator = {
        let functions = functions.clone();
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval(std::time::Duration::from_secs_f64(evaluator_period));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(e) = functions.evaluate_twins().await {
                    tracing::warn!(error = %e, "the twin evaluator failed; next try in {evaluator_period} s");
                }
            }
        })
    };
    let http_stop = CancellationToken::new();
    let app = with_fallbacks(routes(functions).merge(crate::api::router(
        store.clone(),
        feed.clone(),
        Some(metrics),
        http_stop.clone(),
    )));
    let http_token = http_stop.clone();
    let http = tokio::spawn(async move {
        entwine_http::serve(listener, app, http_limits, async move {
            http_token.cancelled().await
        })
        .await
    });

    let ids: Vec<String> = (1..=args.devices)
        .map(|i| format!("{}-{i}", args.device_prefix))
        .collect();
    let topics = if args.topic.is_empty() {
        vec!["device/+/telemetry/device_state".to_owned()]
    } else {
        args.topic.clone()
    };
    let connector_stop = CancellationToken::new();
    let connector_stats = Arc::new(ConnectorStats::default());
    let mut connector = if args.no_connector {
        None
    } else {
        let mut config = ConnectorConfig::new(
            &format!("{}:{}", broker.host, broker.port),
            topics.clone(),
            &format!("http://{address}"),
        )?;
        config.client_id = args.connector_client_id.clone();
        // The embedded broker stops with this process: nothing may be left in it at exit.
        config.finish_backlog = embedded_broker;
        anyhow::ensure!(
            !(embedded_broker && args.ack_order == crate::physical::AckOrderArg::Completion),
            "--ack-order completion needs a broker that accepts it (--broker-url to Mosquitto): the embedded one does not"
        );
        config.ack_order = args.ack_order.resolve(embedded_broker);
        Some(tokio::spawn(entwine_connector::run(
            config,
            connector_stats.clone(),
            connector_stop.clone(),
        )))
    };

    // Devices start once the connector's subscription holds: a fresh broker keeps nothing for a
    // subscriber that does not exist yet, so what the devices published before it would be lost.
    if let Some(connector) = &connector {
        let subscribed = connector_stats
            .wait_subscribed(connector, std::time::Duration::from_secs(10))
            .await;
        if !subscribed && !connector.is_finished() {
            tracing::warn!(
                "the connector is not subscribed after 10 s; starting the devices anyway"
            );
        }
    }
    if let Some(connector) = connector.take_if(|c| c.is_finished()) {
        connector
            .await
            .context("the connector panicked")?
            .context("connector")?;
        anyhow::bail!("the connector stopped before it subscribed");
    }
    let devices_stop = CancellationToken::new();
    let devices = if ids.is_empty() {
        None
    } else {
        let conf = DeviceConf {
            device_id: ids[0].clone(),
            target_mqtt_broker_address: broker.host.clone(),
            target_mqtt_broker_port: broker.port,
            update_period_ms: args.update_period_ms,
            update_initial_delay_ms: args.update_initial_delay_ms,
            aggregated_telemetry_msg_sec: args.device_rate,
            ..DeviceConf::default()
        };
        conf.validate()
            .map_err(|e| anyhow::anyhow!("invalid device settings: {e}"))?;
        let options = FleetOptions {
            count: args.devices,
            prefix: Some(args.device_prefix.clone()),
            ..FleetOptions::default()
        };
        let device_api = bind_or_free_port(args.device_api).await?;
        Some(Emulator::start(
            conf,
            options,
            broker.clone(),
            device_api,
            devices_stop.clone(),
        )?)
    };

    println!("entwine is up");
    println!(
        "  store:      {} ({})",
        store.backend(),
        redact(&args.database.database_url)
    );
    println!(
        "  broker:     {broker_note}, mqtt://{}:{}",
        broker.host, broker.port
    );
    println!("  functions:  http://{address}");
    for function in Function::ALL {
        println!("    POST {:<22} {}", function.route(), function.name());
    }
    println!(
        "  twins API:  http://{address}/api/twins  (…/{{id}}, …/{{id}}/history, live: /api/stream)"
    );
    println!("  metrics:    http://{address}/metrics");
    match &devices {
        Some(emulator) => println!(
            "  devices:    {} × {} msg/s ({} … {}), API http://{}/conf",
            emulator.device_ids.len(),
            args.device_rate,
            ids[0],
            ids[ids.len() - 1],
            emulator.http_address
        ),
        None => println!(
            "  devices:    none (--devices 0); the connector listens on {}",
            topics.join(" ")
        ),
    }
    println!(
        "  ODTE:       {} updates/s expected over {} s, timely within {} s, entangled at ≥ {}",
        odte.expected_update_rate(),
        odte.time_window_s(),
        odte.desired_timeliness_s(),
        odte.threshold()
    );
    println!(
        "  twins:      re-evaluated every {evaluator_period} s; unbound after {} s of silence",
        odte.silence_ms() as f64 / 1000.0
    );
    if !args.no_digital_events {
        println!(
            "  digital:    {} and {} on the broker",
            args.digital_state_topic, args.digital_lifecycle_topic
        );
    }
    println!("  try:        curl -s http://{address}/api/twins   or   entwine status --url http://{address}");
    println!("  stop:       Ctrl-C");

    let printer = tokio::spawn(print_lifecycle_changes(lifecycle.subscribe()));
    shutdown.await;
    println!(
        "stopping: devices, then the connector (finishing chains in progress), then the store"
    );

    devices_stop.cancel();
    let mut published = 0;
    if let Some(emulator) = devices {
        let stats = emulator.stats.clone();
        emulator.wait().await.context("devices")?;
        published = stats.aggregated.load(std::sync::atomic::Ordering::Relaxed);
    }
    connector_stop.cancel();
    if let Some(connector) = connector {
        connector
            .await
            .context("the connector panicked")?
            .context("connector")?;
    }
    // Live streams end with the server; a client that keeps its connection open cannot hold
    // the shutdown longer than this.
    http_stop.cancel();
    match tokio::time::timeout(std::time::Duration::from_secs(5), http).await {
        Ok(served) => served
            .context("the HTTP server panicked")?
            .context("HTTP server")?,
        Err(_) => tracing::warn!("HTTP connections still open after 5 s: closing them"),
    }
    let completed = connector_stats
        .completed
        .load(std::sync::atomic::Ordering::Relaxed);
    let dead = connector_stats
        .dead_lettered
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "devices published {published} messages; the connector completed {completed} chains and dead-lettered {dead}"
    );
    if !embedded_broker && published > completed + dead {
        println!(
            "the other {} wait in the broker's session {:?} for the next start",
            published - completed - dead,
            args.connector_client_id
        );
    }
    printer.abort();
    evaluator.abort();
    if let Some((publisher, pump)) = publisher {
        publisher.close().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), pump).await;
    }
    store.close().await;
    println!("entwine stopped");
    Ok(())
}

/// Prints a line whenever a twin changes lifecycle.
async fn print_lifecycle_changes(mut changes: broadcast::Receiver<entwine_store::TwinChange>) {
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        println!(
            "twin {}: {} → {} (ODTE {:.2} = A {:.2} × R {:.2} × T {:.2})",
            change.device_id,
            change.from.map_or("new", |l| l.as_str()),
            change.to.as_str(),
            change.odte,
            change.availability,
            change.reliability,
            change.timeliness
        );
    }
}

/// A database URL without its password, for printing.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_printed_urls() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://entwine.db"), "sqlite://entwine.db");
    }
}
