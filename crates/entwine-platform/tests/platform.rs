//! The platform as a library: two of them in one process at once (one recorder, two stores,
//! two brokers), one calling the functions in process and one over HTTP, each mirroring every
//! message of its devices exactly once and reporting it at shutdown.

use std::time::Duration;

use entwine_platform::{FunctionsAccess, Platform, PlatformConfig};
use entwine_testing::{eventually, scalar, unique};
use serde_json::Value;

async fn start(dir: &std::path::Path, access: FunctionsAccess) -> Platform {
    let url = format!("sqlite://{}", dir.join("entwine.db").display());
    let mut config = PlatformConfig::ephemeral(&url);
    config.odte = entwine_core::odte::OdteConfig::new(5.0, 2.0, 1.0, 0.9).unwrap();
    let devices = config.devices.as_mut().unwrap();
    devices.count = 2;
    devices.prefix = unique("platform");
    devices.rate = 5.0;
    devices.update_period_ms = 200;
    devices.update_initial_delay_ms = 0;
    let connector = config.connector.as_mut().unwrap();
    connector.access = access;
    connector.client_id = unique("platform-connector");
    Platform::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_platforms_run_in_one_process_in_process_and_over_http_each_mirroring_every_message_once(
) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let in_process = start(a.path(), FunctionsAccess::InProcess).await;
    let over_http = start(b.path(), FunctionsAccess::Http).await;
    assert_ne!(in_process.http_address(), over_http.http_address());
    assert_ne!(in_process.broker().port, over_http.broker().port);
    for platform in [&in_process, &over_http] {
        let api = format!("http://{}/api/twins", platform.http_address());
        eventually(Duration::from_secs(30), "both twins entangled", || async {
            let page: Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
            let items = page["items"].as_array().unwrap();
            items.len() == 2 && items.iter().all(|t| t["lifecycle"] == "entangled")
        })
        .await;
        // The dashboard's view of an emulated device: its configuration and its faults, as
        // the devices' own API gives them, changed through that API.
        let device = platform.device_ids()[0].clone();
        let view = format!("http://{}/api/devices/{device}", platform.http_address());
        let before: Value = reqwest::get(&view).await.unwrap().json().await.unwrap();
        assert_eq!(before["conf"]["aggregatedTelemetryMsgSec"], 5.0, "{before}");
        assert_eq!(before["conf"]["updatePeriodMs"], 200, "{before}");
        assert_eq!(
            (&before["model"], &before["own_faults"]),
            (&Value::Null, &false.into())
        );
        assert_eq!(before["faults"]["delayMs"], 0.0, "{before}");
        let device_api = platform.device_api().unwrap();
        let put = reqwest::Client::new()
            .put(format!("http://{device_api}/faults"))
            .json(&serde_json::json!({"device": device, "delayMs": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 200);
        let after: Value = reqwest::get(&view).await.unwrap().json().await.unwrap();
        assert_eq!(
            (&after["faults"]["delayMs"], &after["own_faults"]),
            (&1.0.into(), &true.into())
        );
        assert_eq!(after["api"], format!("http://{device_api}"));
        let ghost = reqwest::get(format!(
            "http://{}/api/devices/ghost",
            platform.http_address()
        ))
        .await
        .unwrap();
        assert_eq!(ghost.status(), 404);
        // /metrics is served by both (the process's one recorder).
        let metrics = reqwest::get(format!("http://{}/metrics", platform.http_address()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let device = &platform.device_ids()[0];
        assert!(
            metrics.contains(&format!("entwine_twin_odte{{device_id=\"{device}\"}}")),
            "{device} in /metrics"
        );
    }
    for (platform, dir) in [(in_process, &a), (over_http, &b)] {
        let report = platform.shutdown().await.unwrap();
        assert!(report.published > 10, "{report:?}");
        assert_eq!(
            (report.completed, report.dead_lettered),
            (report.published, 0),
            "{report:?}"
        );
        // The store was opened by the platform and closed at shutdown: reopen it to count.
        let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
        let store = entwine_store::Store::open(&url, &Default::default()).unwrap();
        let published = i64::try_from(report.published).unwrap();
        assert_eq!(
            (
                scalar(&store, "SELECT COUNT(*) FROM physicalstate").await,
                scalar(
                    &store,
                    "SELECT COUNT(*) FROM digitalstate WHERE odte IS NOT NULL"
                )
                .await
            ),
            (published, published),
            "one physical and one evaluated digital state per message"
        );
    }
}
