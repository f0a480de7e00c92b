//! One lane: the four-step chain of each message, with retries, dead letters and the
//! acknowledgement that releases the message at the broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Publish, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{device_id_of, ConnectorConfig, ConnectorStats, ROUTES};

/// How a message's chain ended.
#[derive(Debug, PartialEq)]
pub enum ChainOutcome {
    /// All four functions answered.
    Completed {
        /// The last answer: the digital state.
        digital: Value,
        /// The payload's `timestamp`, when it had one.
        device_timestamp: Option<i64>,
    },
    /// A function refused the message (4xx), or it could not be sent at all.
    Rejected {
        /// The route that refused it, or `payload`.
        stage: String,
        /// The HTTP status, when a function answered.
        status: Option<u16>,
        /// The reason.
        error: String,
    },
    /// Shutdown came while the chain waited to retry: the message stays unacknowledged.
    Abandoned,
}

/// A message taken from the broker, and when.
pub(crate) struct Delivery {
    pub(crate) publish: Publish,
    pub(crate) received_at: std::time::Instant,
}

/// Processes the messages of the devices hashed to this lane, one at a time, in order. After
/// `shutdown` it stops before the next message (a shared member goes on until its queue is
/// empty); `abandon` stops waiting to retry a call.
pub(crate) async fn lane(
    mut messages: mpsc::UnboundedReceiver<Delivery>,
    client: AsyncClient,
    http: reqwest::Client,
    config: Arc<ConnectorConfig>,
    stats: Arc<ConnectorStats>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    while let Some(Delivery {
        publish,
        received_at,
    }) = messages.recv().await
    {
        if shutdown.is_cancelled() && !config.is_shared() {
            // Not started: leave it (and the rest of the queue) to the next session. A shared
            // member has left its group and finishes its queue instead (see `run`).
            break;
        }
        match process(&http, &config, &stats, &publish, &abandon).await {
            ChainOutcome::Completed {
                device_timestamp, ..
            } => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_completed_total").increment(1);
                metrics::histogram!("entwine_chain_duration_seconds")
                    .record(received_at.elapsed().as_secs_f64());
                if let Some(device_ms) = device_timestamp {
                    observe_entanglement_latency(device_ms);
                }
            }
            ChainOutcome::Rejected {
                stage,
                status,
                error,
            } => {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_dead_letters_total", "stage" => stage.clone())
                    .increment(1);
                dead_letter(
                    &client,
                    &config.dead_letter_topic,
                    &publish,
                    &stage,
                    status,
                    &error,
                )
                .await;
            }
            ChainOutcome::Abandoned => break,
        }
        if let Err(e) = client.ack(&publish).await {
            tracing::warn!(error = %e, "cannot acknowledge a message; it will be delivered again");
        }
    }
}

/// Runs the chain of one message: payload + `device_id` → the four routes, each answer the body
/// of the next call.
pub(crate) async fn process(
    http: &reqwest::Client,
    config: &ConnectorConfig,
    stats: &ConnectorStats,
    publish: &Publish,
    shutdown: &CancellationToken,
) -> ChainOutcome {
    let device = match device_id_of(&publish.topic) {
        Ok(device) => device,
        Err(error) => {
            return ChainOutcome::Rejected {
                stage: "topic".into(),
                status: None,
                error,
            }
        }
    };
    let mut body = match entwine_core::input::parse_object(&publish.payload) {
        Ok(map) => Value::Object(map),
        Err(e) => {
            return ChainOutcome::Rejected {
                stage: "payload".into(),
                status: None,
                error: format!("payload: {}", e.reason),
            }
        }
    };
    let device_timestamp = body.get("timestamp").and_then(Value::as_i64);
    body["device_id"] = Value::String(device.as_str().to_owned());
    for route in ROUTES {
        let url = format!("{}{route}", config.router_url);
        body = match call(http, config, stats, &url, &body, shutdown).await {
            Ok(answer) => answer,
            Err(CallError::Rejected { status, error }) => {
                return ChainOutcome::Rejected {
                    stage: route.trim_start_matches('/').to_owned(),
                    status: Some(status),
                    error,
                }
            }
            Err(CallError::Abandoned) => return ChainOutcome::Abandoned,
        };
    }
    ChainOutcome::Completed {
        digital: body,
        device_timestamp,
    }
}

enum CallError {
    Rejected { status: u16, error: String },
    Abandoned,
}

/// One POST, retried with exponential backoff on 5xx, timeouts and connection errors.
async fn call(
    http: &reqwest::Client,
    config: &ConnectorConfig,
    stats: &ConnectorStats,
    url: &str,
    body: &Value,
    shutdown: &CancellationToken,
) -> Result<Value, CallError> {
    let mut delay = config.retry_initial;
    loop {
        let failure = match http.post(url).json(body).send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    match response.json::<Value>().await {
                        Ok(answer) => return Ok(answer),
                        Err(e) => {
                            format!("{url} answered {status} with a body that is not JSON: {e}")
                        }
                    }
                } else if status.is_client_error() {
                    let text = response.text().await.unwrap_or_default();
                    let error = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                        .unwrap_or(text);
                    return Err(CallError::Rejected {
                        status: status.as_u16(),
                        error,
                    });
                } else {
                    format!("{url} answered {status}")
                }
            }
            Err(e) => format!("{url}: {e}"),
        };
        if shutdown.is_cancelled() {
            return Err(CallError::Abandoned);
        }
        stats.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("entwine_connector_retries_total").increment(1);
        tracing::warn!(error = %failure, retry_in = ?delay, "function call failed, retrying");
        tokio::select! {
            () = shutdown.cancelled() => return Err(CallError::Abandoned),
            () = tokio::time::sleep(jittered(delay)) => {}
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// Records `entwine_entanglement_latency_seconds`: from the device's timestamp to the moment its
/// digital state is committed with its ODTE (device and connector clocks assumed in sync).
fn observe_entanglement_latency(device_ms: i64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(device_ms, |d| {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        });
    metrics::histogram!("entwine_entanglement_latency_seconds")
        .record((now_ms - device_ms).max(0) as f64 / 1000.0);
}

/// ±20 % so that lanes failing together do not retry in lockstep.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// Publishes a rejected message, with why, to the dead-letter topic (QoS 1), and logs it.
pub(crate) async fn dead_letter(
    client: &AsyncClient,
    topic: &str,
    publish: &Publish,
    stage: &str,
    status: Option<u16>,
    error: &str,
) {
    tracing::warn!(topic = %publish.topic, stage, status, error, "message dead-lettered");
    let letter = json!({
        "topic": publish.topic,
        "payload": String::from_utf8_lossy(&publish.payload),
        "stage": stage,
        "status": status,
        "error": error,
    });
    if let Err(e) = client
        .publish(topic, QoS::AtLeastOnce, false, letter.to_string())
        .await
    {
        tracing::error!(error = %e, "cannot publish a dead letter");
    }
}
