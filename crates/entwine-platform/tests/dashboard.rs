//! The dashboard in a real browser: Debian's chromium, headless, driven through chromedriver
//! (W3C WebDriver, tests/webdriver/mod.rs), against a platform started in this process. The fleet page lists
//! every twin, a twin's chart has points, and a device silenced through the device API changes
//! lifecycle on the open page, without a reload.
//!
//! chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`,
//! which scripts/test does); without them the test fails saying so.

use std::time::Duration;

use entwine_platform::{Platform, PlatformConfig};
use entwine_testing::{eventually, unique};
use serde_json::{json, Value};
use webdriver::{Browser, Driver};

mod webdriver;

const DEVICES: usize = 12;

/// `script`'s value in the page.
async fn js(client: &Browser, script: &str) -> Value {
    client.js(script).await
}

async fn wait_for(client: &Browser, what: &str, script: &str) {
    eventually(Duration::from_secs(30), what, || async {
        js(client, script).await == Value::Bool(true)
    })
    .await;
}

async fn start_platform(dir: &std::path::Path) -> Platform {
    let url = format!("sqlite://{}", dir.join("entwine.db").display());
    let mut config = PlatformConfig::ephemeral(&url);
    // A 5 s window: twins entangle within seconds, and a silent device loses it as quickly.
    config.odte = entwine_core::odte::OdteConfig::new(5.0, 2.0, 1.0, 0.9).unwrap();
    config.metrics = false;
    let devices = config.devices.as_mut().unwrap();
    devices.count = DEVICES;
    devices.prefix = unique("dash");
    devices.rate = 5.0;
    devices.update_period_ms = 200;
    devices.update_initial_delay_ms = 0;
    config.connector.as_mut().unwrap().client_id = unique("dashboard-connector");
    Platform::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_every_twin_charts_one_and_shows_a_silenced_device_live() {
    let dir = tempfile::tempdir().unwrap();
    let platform = start_platform(dir.path()).await;
    let base = format!("http://{}", platform.http_address());
    let mut ids: Vec<String> = platform.device_ids().to_vec();
    ids.sort();
    assert_eq!(ids.len(), DEVICES);
    let api = format!("{base}/api/twins?limit=1000");
    eventually(Duration::from_secs(30), "every twin entangled", || async {
        let page: Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        items.len() == DEVICES && items.iter().all(|t| t["lifecycle"] == "entangled")
    })
    .await;

    let driver = Driver::start().await;
    let client = driver.browser(1280, 900).await;

    // The fleet page: every twin of the platform, in device id order, with counts.
    client.goto(&format!("{base}/#/")).await;
    wait_for(
        &client,
        "the fleet page rendered",
        "return document.body.dataset.ready === 'fleet'",
    )
    .await;
    let listed = js(
        &client,
        "return [...document.querySelectorAll('#twins-table tbody tr')].map(r => r.dataset.deviceId)",
    )
    .await;
    assert_eq!(listed, json!(ids), "every twin, by device id");
    assert_eq!(
        js(
            &client,
            "return document.querySelector('#twins-table').dataset.total"
        )
        .await,
        json!(DEVICES.to_string())
    );
    assert_eq!(
        js(
            &client,
            "return document.querySelector('.count.lc-all').dataset.count"
        )
        .await,
        json!(DEVICES.to_string()),
        "the fleet's count"
    );
    let histogram = js(
        &client,
        "return document.querySelector('.histogram').dataset.counts",
    )
    .await;
    let buckets: Vec<u64> = histogram
        .as_str()
        .unwrap()
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        (buckets.len(), buckets.iter().sum::<u64>()),
        (10, DEVICES as u64),
        "the ODTE distribution holds every twin: {histogram}"
    );
    wait_for(
        &client,
        "the stream is live",
        "return document.getElementById('stream-status').dataset.state === 'live'",
    )
    .await;

    // The filter box asks the server for matching twins only.
    let target = ids[DEVICES - 1].clone();
    let search = client.find("#fleet-q").await;
    let suffix = target.rsplit('-').next().unwrap().to_string();
    search.send_keys(&format!("-{suffix}")).await;
    let expected: Vec<&String> = ids
        .iter()
        .filter(|id| id.contains(&format!("-{suffix}")))
        .collect();
    wait_for(
        &client,
        "the table filtered",
        &format!(
            "return JSON.stringify([...document.querySelectorAll('#twins-table tbody tr')]\
             .map(r => r.dataset.deviceId)) === {:?}",
            serde_json::to_string(&expected).unwrap()
        ),
    )
    .await;
    search.clear().await;
    search.send_keys(" ").await;
    wait_for(
        &client,
        "the table unfiltered",
        &format!("return document.querySelectorAll('#twins-table tbody tr').length === {DEVICES}"),
    )
    .await;

    // A twin's page: its chart has points, from the series and the live stream.
    client.goto(&format!("{base}/#/twins/{}", ids[0])).await;
    wait_for(
        &client,
        "the twin page rendered",
        "return document.body.dataset.ready === 'twin'",
    )
    .await;
    wait_for(
        &client,
        "points on the twin's chart",
        "return Number(document.getElementById('chart-figures').dataset.points) > 0",
    )
    .await;
    assert_eq!(
        js(
            &client,
            "return document.querySelector('#twin-lifecycle .badge').dataset.lifecycle"
        )
        .await,
        json!("entangled")
    );
    wait_for(
        &client,
        "recent states listed",
        "return document.querySelectorAll('#history-table tbody tr').length > 0",
    )
    .await;
    // The platform runs the devices: their configuration is shown.
    wait_for(
        &client,
        "the device panel shown",
        "return !document.getElementById('device-panel').hidden",
    )
    .await;

    // Back to the fleet through the page's own link (no reload), then silence the last device.
    client.find(".crumbs a").await.click().await;
    wait_for(
        &client,
        "the fleet page again",
        "return document.body.dataset.ready === 'fleet'",
    )
    .await;
    js(&client, "window.entwineMarker = 'same page'; return true").await;
    let row = format!("document.querySelector('tr[data-device-id=\"{target}\"]')");
    wait_for(
        &client,
        "the target row entangled",
        &format!("return {row}?.dataset.lifecycle === 'entangled'"),
    )
    .await;
    let device_api = platform
        .device_api()
        .expect("the platform runs the devices");
    let answer = reqwest::Client::new()
        .put(format!("http://{device_api}/faults"))
        .json(&json!({"device": target, "loss": 1.0}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{:?}", answer.text().await);
    wait_for(
        &client,
        "the silenced device's lifecycle change on the page",
        &format!("return ['disentangled', 'unbound'].includes({row}?.dataset.lifecycle)"),
    )
    .await;
    assert_eq!(
        js(&client, "return window.entwineMarker").await,
        json!("same page"),
        "the change came without a reload"
    );
    // The others still mirror their devices.
    let others = js(
        &client,
        &format!(
            "return [...document.querySelectorAll('#twins-table tbody tr')]\
             .filter(r => r.dataset.deviceId !== {target:?}).map(r => r.dataset.lifecycle)"
        ),
    )
    .await;
    assert_eq!(others, json!(vec!["entangled"; DEVICES - 1]));

    client.close().await;
    drop(driver);
    platform.shutdown().await.unwrap();
}
