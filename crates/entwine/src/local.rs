//! `entwine up`: the whole twin platform in one process ([`entwine_platform::Platform`]),
//! printed.
//!
//! Start order: store (migrated) → MQTT broker (embedded unless `--broker-url`) → HTTP server
//! (the function routes on Fission's paths, the twins API, `/metrics`) → evaluator → connector
//! (calling the functions in process) → devices. Stop order on SIGINT/SIGTERM is the reverse:
//! devices stop publishing, the connector finishes the chains in progress, the HTTP server
//! drains, the store closes.

use std::future::Future;
use std::time::Duration;

use entwine_platform::{
    BrokerSource, ConnectorSettings, DeviceSettings, DigitalEventSettings, EvaluatorPeriod,
    FunctionsAccess, Platform, PlatformConfig, StoreSource,
};
use tokio::sync::broadcast;

use crate::cli::UpArgs;

/// The platform `args` describe.
pub fn platform_config(args: &UpArgs) -> anyhow::Result<PlatformConfig> {
    let odte = args.odte.config()?;
    // The store and its pool from the typed configuration (`cli::DatabaseArgs`).
    let url = args.database.url()?;
    let mut config = PlatformConfig::local(&url);
    config.store = StoreSource::Url {
        url,
        options: args.database.store_options()?,
    };
    config.broker = match &args.broker_url {
        Some(url) => BrokerSource::External(url.clone()),
        None => BrokerSource::Embedded(args.mqtt_listen),
    };
    config.listen = args.listen;
    let loaded = args.load()?;
    config.models = loaded
        .models()?
        .models()
        .iter()
        .map(|m| m.as_ref().clone())
        .collect();
    config.http_limits = loaded.http_limits()?;
    config.retention = loaded.retention()?;
    // Tokens (none: open, loopback only — `Platform::start` refuses any other address).
    config.auth = loaded.auth()?;
    config.client_token = loaded.client_token()?;
    config.mqtt = loaded.mqtt()?;
    config.embedded_broker_tls = match (&args.mqtt_tls_cert, &args.mqtt_tls_key) {
        (Some(cert_file), Some(key_file)) => Some(entwine_mqtt::ClientCert {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        _ => None,
    };
    config.odte = odte;
    // `--evaluator-period` was checked when the flags were parsed (`cli::evaluator_period`).
    config.evaluator = match args.evaluator_period {
        Some(seconds) => EvaluatorPeriod::Every(Duration::from_secs_f64(seconds)),
        None => EvaluatorPeriod::Default,
    };
    config.connector = (!args.no_connector).then(|| ConnectorSettings {
        topics: if args.topic.is_empty() {
            ConnectorSettings::default().topics
        } else {
            args.topic.clone()
        },
        client_id: args.connector_client_id.clone(),
        ack_order: args.ack_order.explicit(),
        lanes: None,
        max_batch: args.max_batch,
        access: if args.http_functions {
            FunctionsAccess::Http
        } else {
            FunctionsAccess::InProcess
        },
        subscribe_timeout: Duration::from_secs(10),
    });
    config.devices =
        (args.devices > 0 || args.fleet.iter().any(|(_, n)| *n > 0)).then(|| DeviceSettings {
            count: args.devices,
            prefix: args.device_prefix.clone(),
            rate: args.device_rate,
            update_period_ms: args.update_period_ms,
            update_initial_delay_ms: args.update_initial_delay_ms,
            api_listen: args.device_api,
            model_devices: args.fleet.clone(),
        });
    config.digital_events = (!args.no_digital_events).then(|| DigitalEventSettings {
        state_topic: args.digital_state_topic.clone(),
        lifecycle_topic: args.digital_lifecycle_topic.clone(),
    });
    Ok(config)
}

/// A rate as a reader writes it: `10 msg/s`, or `1 msg per 60 s` below one a second when that
/// is a whole number of seconds.
fn per_second(rate: f64, what: &str) -> String {
    let period = 1.0 / rate;
    if rate < 1.0 && (period - period.round()).abs() < 1e-6 {
        format!("1 {} per {} s", what.trim_end_matches('s'), period.round())
    } else {
        format!("{rate} {what}/s")
    }
}

/// What `entwine up` prints about authentication.
fn auth_phrase(auth: &entwine_http::Auth, mqtt_login: bool) -> String {
    use entwine_http::Interface;
    let mqtt = if mqtt_login {
        "MQTT with a login"
    } else {
        "MQTT without a login"
    };
    if auth.tokens.is_empty() {
        return format!(
            "none on loopback (set auth.tokens to ask for bearer tokens; docs/SECURITY.md); {mqtt}"
        );
    }
    let open: Vec<&str> = [
        (Interface::Functions, "functions"),
        (Interface::Metrics, "/metrics"),
    ]
    .into_iter()
    .filter(|(interface, _)| !auth.protects(*interface))
    .map(|(_, name)| name)
    .collect();
    if open.is_empty() {
        format!("bearer tokens on every interface; {mqtt}")
    } else {
        format!(
            "bearer tokens, except {} (open on purpose); {mqtt}",
            open.join(" and ")
        )
    }
}

/// Runs the platform until `shutdown` completes, then stops it in order.
pub async fn up(
    args: &UpArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = platform_config(args)?;
    let odte = config.odte;
    let models = config.models.clone();
    let retention = config.retention;
    let auth = auth_phrase(&config.auth, config.mqtt.credentials.is_some());
    let platform = Platform::start(config).await?;
    let broker = platform.broker().clone();
    let address = platform.http_address();

    println!("entwine is up");
    println!(
        "  store:      {} ({})",
        platform.store().backend(),
        args.database.redacted_url()
    );
    println!(
        "  broker:     {}, {}://{}",
        if broker.embedded {
            "embedded"
        } else {
            "external"
        },
        if broker.tls { "mqtts" } else { "mqtt" },
        broker.address()
    );
    println!("  auth:       {auth}");
    println!("  console:    http://{address}/");
    println!("  functions:  http://{address}");
    for (route, name) in Platform::function_routes() {
        println!("    POST {route:<22} {name}");
    }
    println!(
        "  twins API:  http://{address}/api/twins  (…/{{id}}, …/{{id}}/history, live: /api/stream)"
    );
    println!("  metrics:    http://{address}/metrics");
    let ids = platform.device_ids();
    match platform.device_api() {
        Some(api) if !ids.is_empty() => {
            let seed = args.devices.min(ids.len());
            if seed > 0 {
                println!(
                    "  devices:    {seed} × {} msg/s ({} … {}), API http://{api}/conf",
                    args.device_rate,
                    ids[0],
                    ids[seed - 1],
                );
            } else {
                println!("  devices:    API http://{api}/conf");
            }
            let mut next = seed;
            for (id, count) in args.fleet.iter().filter(|(_, n)| *n > 0) {
                let rate = models
                    .iter()
                    .find(|m| &m.id == id)
                    .map_or(0.0, |m| m.profile.expected_update_rate());
                let group = &ids[next..(next + count).min(ids.len())];
                next += count;
                if let (Some(first), Some(last)) = (group.first(), group.last()) {
                    println!(
                        "              {count} × {id} at {} ({first} … {last})",
                        per_second(rate, "msg")
                    );
                }
            }
        }
        _ => println!("  devices:    none (--devices 0)"),
    }
    if platform.has_connector() {
        println!(
            "  connector:  functions called {}, {}",
            if args.http_functions {
                "over HTTP"
            } else {
                "in process"
            },
            batch_phrase(args.max_batch.or_else(crate::cli::default_max_batch))
        );
    }
    println!(
        "  ODTE:       {} updates/s expected over {} s, timely within {} s, entangled at ≥ {}",
        odte.expected_update_rate(),
        odte.time_window_s(),
        odte.desired_timeliness_s(),
        odte.threshold()
    );
    for model in &models {
        let p = &model.profile;
        println!(
            "  model:      {} {} for {}: {} over {} s, timely within {} s, entangled at ≥ {}, unbound after {} s of silence; topic {}",
            model.id,
            model.version,
            model
                .devices()
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            per_second(p.expected_update_rate(), "updates"),
            p.time_window_s(),
            p.desired_timeliness_s(),
            p.threshold(),
            p.silence_ms() as f64 / 1000.0,
            model.topic()
        );
    }
    if let Some(period) = platform.evaluator_period() {
        println!(
            "  twins:      re-evaluated every {} s; unbound after {} s of silence",
            period.as_secs_f64(),
            odte.silence_ms() as f64 / 1000.0
        );
    }
    match &retention {
        Some(r) => println!(
            "  history:    states older than {} days deleted every {} s (what a window reads is kept)",
            r.keep.as_secs_f64() / 86_400.0,
            r.period.as_secs_f64()
        ),
        None => println!("  history:    kept whole (retention.keep_days unset)"),
    }
    if !args.no_digital_events {
        println!(
            "  digital:    {} and {} on the broker",
            args.digital_state_topic, args.digital_lifecycle_topic
        );
    }
    println!("  try:        curl -s http://{address}/api/twins   or   entwine status --url http://{address}");
    println!("  stop:       Ctrl-C");

    let printer = tokio::spawn(print_lifecycle_changes(platform.lifecycle_changes()));
    shutdown.await;
    println!(
        "stopping: devices, then the connector (finishing chains in progress), then the store"
    );
    let report = platform.shutdown().await?;
    printer.abort();
    println!(
        "devices published {} messages; the connector completed {} chains and dead-lettered {}",
        report.published, report.completed, report.dead_lettered
    );
    if !broker.embedded && report.published > report.completed + report.dead_lettered {
        println!(
            "the other {} wait in the broker's session {:?} for the next start",
            report.published - report.completed - report.dead_lettered,
            args.connector_client_id
        );
    }
    println!("entwine stopped");
    Ok(())
}

/// How `entwine up` prints the connector's `--max-batch`: `one event per call`, or
/// `up to 64 events per call`.
pub fn batch_phrase(max_batch: Option<usize>) -> String {
    match max_batch {
        Some(1) => "one event per call".to_owned(),
        Some(n) => format!("up to {n} events per call"),
        None => "batches of the connector's default size".to_owned(),
    }
}

/// Prints a line whenever a twin changes lifecycle.
async fn print_lifecycle_changes(mut changes: broadcast::Receiver<entwine_store::TwinChange>) {
    loop {
        match changes.recv().await {
            Ok(change) => println!("{}", lifecycle_line(&change)),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How `entwine up` prints a lifecycle change:
/// `twin d-1: bound → entangled (ODTE 0.95 = A 1.00 × R 0.95 × T 1.00)`.
pub fn lifecycle_line(change: &entwine_store::TwinChange) -> String {
    format!(
        "twin {}: {} → {} (ODTE {:.2} = A {:.2} × R {:.2} × T {:.2})",
        change.device_id,
        change.from.map_or("new", |l| l.as_str()),
        change.to.as_str(),
        change.odte,
        change.availability,
        change.reliability,
        change.timeliness
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_line_says_what_asks_for_a_token_and_what_is_open_on_purpose() {
        let tokens =
            entwine_http::Tokens::parse(&"alpha-token-0123456789".to_owned().into()).unwrap();
        let mut auth = entwine_http::Auth {
            tokens,
            ..Default::default()
        };
        assert_eq!(
            auth_phrase(&auth, true),
            "bearer tokens on every interface; MQTT with a login"
        );
        auth.functions = false;
        auth.metrics = false;
        assert_eq!(
            auth_phrase(&auth, false),
            "bearer tokens, except functions and /metrics (open on purpose); MQTT without a login"
        );
    }
}
