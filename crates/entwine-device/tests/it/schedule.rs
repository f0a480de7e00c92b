//! `PUT /conf` changes only what changed, as the payload timestamps on the wire show; and every
//! error of the device API is JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use entwine_device::fleet::{state_topic, FleetOptions};
use entwine_testing::{unique, Received, Subscriber};
use serde_json::{json, Value};

use super::{broker, conf, start};

fn timestamp(r: &Received) -> i64 {
    let v: Value = serde_json::from_slice(&r.payload).unwrap();
    v["timestamp"].as_i64().unwrap()
}

fn timestamps(received: &[Received], topic: &str) -> Vec<i64> {
    let mut ts: Vec<i64> = received
        .iter()
        .filter(|r| r.topic == topic)
        .map(timestamp)
        .collect();
    ts.sort_unstable();
    ts
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Asserts that `ts` sits on the grid `t0 + k * period` with no tick missing and none extra
/// between `t0` and `t0 + periods * period`: exactly `periods + 1` messages, each within
/// `tolerance` ms of the grid (the device stamps its payload when its task runs, a little after
/// the tick; more on a loaded machine).
fn assert_on_grid(ts: &[i64], t0: i64, period: i64, periods: i64, tolerance: i64, what: &str) {
    let window: Vec<i64> = ts
        .iter()
        .copied()
        .filter(|t| *t >= t0 && *t <= t0 + periods * period + period / 2)
        .collect();
    for t in &window {
        let offset = (t - t0 + period / 2).rem_euclid(period) - period / 2;
        assert!(
            offset.abs() <= tolerance,
            "{what}: {t} is {offset} ms off the {period} ms grid from {t0}: {window:?}"
        );
    }
    assert_eq!(
        window.len() as i64,
        periods + 1,
        "{what}: one message per {period} ms over {periods} periods: {window:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_conf_that_changes_nothing_does_not_disturb_the_schedule() {
    let id = unique("noop");
    let topic = state_topic(&id);
    let witness = Subscriber::start(std::slice::from_ref(&topic)).await;
    // 5 msg/s: a message every 200 ms.
    let device = start(conf(&id, 5.0), FleetOptions::default(), broker()).await;
    let first = witness
        .wait_for(Duration::from_secs(5), "the first message", |r| {
            !r.is_empty()
        })
        .await;
    let t0 = timestamp(&first[0]);
    let client = reqwest::Client::new();
    let current: Value = client
        .get(format!("{}/conf", device.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // 40 no-op changes over 2 s, one every 50 ms: `{}`, and what GET /conf gave, sent back.
    for i in 0..40 {
        let body = if i % 2 == 0 {
            json!({})
        } else {
            current.clone()
        };
        let response = client
            .put(format!("{}/conf", device.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = witness
        .wait_for(Duration::from_secs(10), "3 s of messages", |r| {
            r.iter().any(|m| timestamp(m) >= t0 + 3000)
        })
        .await;
    device.stop().await;
    // Restarting the timers would have published at each PUT: some 40 more messages, off grid.
    assert_on_grid(
        &timestamps(&received, &topic),
        t0,
        200,
        15,
        80,
        "aggregated",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_only_the_message_rate_leaves_the_update_timer_in_phase() {
    let id = unique("phase");
    let energy_topic = format!("device/{id}/telemetry/energy");
    let witness = Subscriber::start(&[format!("device/{id}/telemetry/#")]).await;
    let mut conf = conf(&id, 2.0);
    conf.update_period_ms = 300;
    conf.single_resource_telemetry_enabled = true;
    let device = start(conf, FleetOptions::default(), broker()).await;
    let before = witness
        .wait_for(Duration::from_secs(5), "two sensor updates", |r| {
            timestamps(r, &energy_topic).len() >= 2
        })
        .await;
    let t0 = timestamps(&before, &energy_topic)[0];
    // Halfway between two updates, so that restarting the update timer would show as a
    // 150 ms shift of its grid.
    let next_update = t0 + 300 * ((now_ms() - t0) / 300 + 1);
    tokio::time::sleep(Duration::from_millis(
        (next_update + 150 - now_ms()).max(0) as u64
    ))
    .await;
    let changed_at = now_ms();
    let response = reqwest::Client::new()
        .put(format!("{}/conf", device.api))
        .json(&json!({"aggregatedTelemetryMsgSec": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let received = witness
        .wait_for(Duration::from_secs(10), "3 s of updates", |r| {
            timestamps(r, &energy_topic)
                .last()
                .is_some_and(|t| *t >= t0 + 3000)
        })
        .await;
    device.stop().await;
    // The update timer kept its grid through the change: 11 updates over 10 periods, none
    // shifted by the 150 ms that a restart at the change would have caused.
    assert_on_grid(
        &timestamps(&received, &energy_topic),
        t0,
        300,
        10,
        100,
        "energy",
    );
    // The message timer restarted at 10 msg/s, on a grid of its own.
    let states: Vec<i64> = timestamps(&received, &state_topic(&id))
        .into_iter()
        .filter(|t| *t >= changed_at)
        .collect();
    assert!(states.len() >= 11, "{states:?}");
    assert_on_grid(
        &states,
        states[0],
        100,
        10,
        45,
        "aggregated after the change",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_the_device_api_is_json_naming_what_was_wrong() {
    let device = start(
        conf(&unique("errors"), 1.0),
        FleetOptions::default(),
        broker(),
    )
    .await;
    let client = reqwest::Client::new();
    let api = &device.api;
    let cases = [
        (
            client
                .put(format!("{api}/conf"))
                .body(vec![b' '; 70 * 1024]),
            413,
            "body: larger than the 65536-byte limit of PUT /conf",
        ),
        (
            client.get(format!("{api}/nowhere")),
            404,
            "path: no /nowhere; the device API serves /conf, /faults and /stats",
        ),
        (
            client.post(format!("{api}/conf")),
            405,
            "POST is not allowed on /conf; allowed: GET,HEAD,PUT",
        ),
        (
            client.put(format!("{api}/faults")).body("[1]"),
            400,
            "body: expected a JSON object",
        ),
    ];
    for (request, status, error) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{error}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{error}"
        );
        let body: Value = response.json().await.unwrap();
        let text = body["error"].as_str().unwrap_or_default();
        assert!(text.starts_with(error), "{status}: {body}");
    }
    device.stop().await;
}
