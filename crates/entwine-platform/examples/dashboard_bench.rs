//! How long the dashboard takes to load in a real browser with a large fleet.
//!
//! Starts a platform (SQLite in a temporary directory, or `DATABASE_URL`) with `N` emulated
//! devices of the seed's model (default 10,000, each at 0.05 messages per second, so the
//! pipeline keeps working while the pages load), waits until every device has a twin, then
//! loads the fleet page and a twin's page in headless chromium (Debian's, through
//! chromedriver) and reports, from the page's own `performance` entries: the time from
//! navigation to the first full render (`entwine-ready`), the API calls' durations and the
//! bytes transferred. The first load of the fleet page is cold (empty cache), the others warm.
//!
//! `cargo run --release -p entwine-platform --example dashboard_bench -- [N] [LOADS]`
//! (scripts/bench-dashboard).

use std::time::{Duration, Instant};

use entwine_platform::{Platform, PlatformConfig};
use serde_json::Value;
use webdriver::{Browser, Driver};

#[path = "../tests/webdriver/mod.rs"]
mod webdriver;

async fn wait<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one page load measured.
#[derive(Debug)]
struct Load {
    ready_ms: f64,
    api: Vec<(String, f64, f64)>,
    transferred: f64,
}

async fn load(client: &Browser, url: &str, ready: &str) -> Load {
    client.goto("about:blank").await;
    client.goto(url).await;
    let script = format!("return document.body.dataset.ready === '{ready}'");
    wait(
        "the page's first full render",
        Duration::from_secs(60),
        || async { client.js(&script).await == Value::Bool(true) },
    )
    .await;
    let entries = client
        .js(
            "const ready = performance.getEntriesByName('entwine-ready')[0].startTime;
             const resources = performance.getEntriesByType('resource');
             const nav = performance.getEntriesByType('navigation')[0];
             return {
               ready,
               transferred: resources.reduce((s, r) => s + r.transferSize, nav.transferSize),
               api: resources.filter(r => r.name.includes('/api/') && !r.name.includes('/api/stream'))
                 .map(r => [new URL(r.name).pathname, r.duration, r.transferSize]),
             };",
        )
        .await;
    Load {
        ready_ms: entries["ready"].as_f64().unwrap(),
        transferred: entries["transferred"].as_f64().unwrap(),
        api: entries["api"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_f64().unwrap(),
                    e[2].as_f64().unwrap(),
                )
            })
            .collect(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let devices: usize = args
        .next()
        .map_or(10_000, |n| n.parse().expect("N: a number"));
    let loads: usize = args
        .next()
        .map_or(5, |n| n.parse().expect("LOADS: a number"));
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("entwine.db").display()));
    let mut config = PlatformConfig::ephemeral(&url);
    config.metrics = false;
    let settings = config.devices.as_mut().unwrap();
    settings.count = devices;
    settings.prefix = "bench-device".into();
    settings.rate = 0.05;
    settings.update_period_ms = 1000;
    settings.update_initial_delay_ms = 0;
    let started = Instant::now();
    let platform = Platform::start(config).await.unwrap();
    let base = format!("http://{}", platform.http_address());
    let fleet = format!("{base}/api/fleet");
    wait("every twin", Duration::from_secs(600), || async {
        match reqwest::get(&fleet).await {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|f| f["twins"].as_u64() == Some(devices as u64)),
            Err(_) => false,
        }
    })
    .await;
    eprintln!(
        "{devices} twins after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let driver = Driver::start().await;
    let client = driver.browser(1280, 800).await;

    let fleet_url = format!("{base}/#/");
    let cold = load(&client, &fleet_url, "fleet").await;
    let mut warm = Vec::new();
    for _ in 0..loads {
        warm.push(load(&client, &fleet_url, "fleet").await);
    }
    let twin_url = format!("{base}/#/twins/bench-device-1");
    let mut twin = Vec::new();
    for _ in 0..loads {
        twin.push(load(&client, &twin_url, "twin").await);
    }

    println!("twins: {devices}; loads: {loads} (median of the warm ones)");
    println!(
        "fleet page, cold: ready in {:.0} ms, {:.0} kB transferred",
        cold.ready_ms,
        cold.transferred / 1000.0
    );
    for (path, ms, bytes) in &cold.api {
        println!("  {path}: {ms:.0} ms, {:.1} kB", bytes / 1000.0);
    }
    println!(
        "fleet page, warm: ready in {:.0} ms (min {:.0}, max {:.0}), {:.0} kB transferred",
        median(warm.iter().map(|l| l.ready_ms).collect()),
        warm.iter()
            .map(|l| l.ready_ms)
            .fold(f64::INFINITY, f64::min),
        warm.iter().map(|l| l.ready_ms).fold(0.0, f64::max),
        median(warm.iter().map(|l| l.transferred).collect()) / 1000.0,
    );
    let api_paths: Vec<String> = warm[0].api.iter().map(|a| a.0.clone()).collect();
    for path in api_paths {
        let times: Vec<f64> = warm
            .iter()
            .filter_map(|l| l.api.iter().find(|a| a.0 == path).map(|a| a.1))
            .collect();
        println!("  {path}: {:.0} ms", median(times));
    }
    println!(
        "twin page (bench-device-1), warm: ready in {:.0} ms",
        median(twin.iter().map(|l| l.ready_ms).collect())
    );
    for path in twin[0].api.iter().map(|a| a.0.clone()) {
        let times: Vec<f64> = twin
            .iter()
            .filter_map(|l| l.api.iter().find(|a| a.0 == path).map(|a| a.1))
            .collect();
        println!("  {path}: {:.0} ms", median(times));
    }
    client.close().await;
    drop(driver);
    platform.shutdown().await.unwrap();
}
