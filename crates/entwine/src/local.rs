//! `entwine up`: the twin platform on one machine.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use entwine_functions::handlers::{Function, SystemClock, TwinFunctions};
use entwine_functions::http::router;
use tokio::net::TcpListener;

use crate::cli::{open_migrated, UpArgs};

/// Binds `wanted`; when its port is taken, a free port on the same address instead.
pub async fn bind_or_free_port(wanted: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(wanted).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%wanted, "address in use, choosing a free port (set --listen to pick one)");
            TcpListener::bind(SocketAddr::new(wanted.ip(), 0))
                .await
                .with_context(|| format!("cannot listen on {}", wanted.ip()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {wanted}")),
    }
}

/// Runs the store and the local router until `shutdown` completes; then drains in-flight
/// requests and closes the store.
pub async fn up(
    args: &UpArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let odte = args.odte.config()?;
    let store = open_migrated(&args.database).await?;
    let listener = bind_or_free_port(args.listen).await?;
    let address = listener.local_addr().context("listener has no address")?;
    let functions = Arc::new(TwinFunctions::new(
        store.clone(),
        odte,
        Arc::new(SystemClock),
    ));

    println!("entwine is up");
    println!(
        "  store:     {} ({})",
        store.backend(),
        redact(&args.database.database_url)
    );
    println!("  functions: http://{address}");
    for function in Function::ALL {
        println!(
            "    POST http://{address}{:<22} {}",
            function.route(),
            function.name()
        );
    }
    println!("  try:       curl -s -H 'content-type: application/json' http://{address}/physicalevents \\");
    println!("               -d '{{\"device_id\": \"iiot-device-1\", \"timestamp\": '$(date +%s%3N)', \"type\": \"iot.sensor.state.aggregated\", \"data\": {{\"iot.sensor.energy\": 3.2, \"iot.sensor.temperature\": 27.1}}}}'");
    println!("  stop:      Ctrl-C");

    axum::serve(listener, router(functions))
        .with_graceful_shutdown(shutdown)
        .await
        .context("local router failed")?;
    store.close().await;
    println!("entwine stopped");
    Ok(())
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
    use super::redact;

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
