//! One lane: the four-step chain of each message, with retries, dead letters and the
//! acknowledgement that releases the message at the broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use entwine_core::deadletter::DeadLetter;
use rumqttc::{AsyncClient, Publish, QoS};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::functions::{CallFailure, Functions};
use crate::{device_id_of, ConnectorConfig, ConnectorStats, DEAD_LETTER_ROUTE, ROUTES};

/// The twin-handler's route: once it answers, the digital state is stored with its ODTE.
const TWIN_ROUTE: &str = ROUTES[2];

/// How a message's chain ended.
#[derive(Debug, PartialEq)]
pub(crate) enum ChainOutcome {
    /// All four functions answered.
    Completed,
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
    /// Its number in arrival order, reported back when finished (see `Acks`).
    pub(crate) seq: u64,
    pub(crate) received_at: std::time::Instant,
}

/// Processes the messages of the devices hashed to this lane, one at a time, in order, and
/// reports each finished one on `finished`. After `shutdown` it stops before the next message
/// (unless the connector empties its session); `abandon` stops waiting to retry a call.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn lane(
    mut messages: mpsc::UnboundedReceiver<Delivery>,
    finished: mpsc::UnboundedSender<u64>,
    client: AsyncClient,
    functions: Arc<dyn Functions>,
    config: Arc<ConnectorConfig>,
    stats: Arc<ConnectorStats>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let letters = DeadLetters {
        client,
        functions: functions.clone(),
        config: config.clone(),
        stats: stats.clone(),
    };
    while let Some(Delivery {
        publish,
        seq,
        received_at,
    }) = messages.recv().await
    {
        if shutdown.is_cancelled() && !config.drains_session() {
            // Not started: leave it (and the rest of the queue) to the next session. A
            // connector that empties its session finishes its queue instead (see `run`).
            break;
        }
        match process(functions.as_ref(), &config, &stats, &publish, &abandon).await {
            ChainOutcome::Completed => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_completed_total").increment(1);
                metrics::histogram!("entwine_chain_duration_seconds")
                    .record(received_at.elapsed().as_secs_f64());
            }
            ChainOutcome::Rejected {
                stage,
                status,
                error,
            } => {
                if letters
                    .send(&publish, &stage, status, &error, &abandon)
                    .await
                    .is_err()
                {
                    // Shutdown while the letter could not be stored: the message stays
                    // unacknowledged and comes back to the next session.
                    break;
                }
            }
            ChainOutcome::Abandoned => break,
        }
        // The event loop acknowledges it, in arrival order.
        if finished.send(seq).is_err() {
            break;
        }
    }
}

/// Runs the chain of one message: payload + `device_id` → the four routes, each answer the body
/// of the next call.
pub(crate) async fn process(
    functions: &dyn Functions,
    config: &ConnectorConfig,
    stats: &ConnectorStats,
    publish: &Publish,
    abandon: &CancellationToken,
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
    if publish.payload.len() > config.max_payload_bytes {
        return ChainOutcome::Rejected {
            stage: "payload".into(),
            status: None,
            error: format!(
                "payload: {} bytes, over the functions' limit of {} bytes",
                publish.payload.len(),
                config.max_payload_bytes
            ),
        };
    }
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
        body = match call(functions, config, stats, route, &body, abandon).await {
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
        if route == TWIN_ROUTE {
            // The digital state is committed with its ODTE: the twin mirrors the device now.
            if let Some(device_ms) = device_timestamp {
                observe_entanglement_latency(device_ms);
            }
        }
    }
    ChainOutcome::Completed
}

enum CallError {
    Rejected { status: u16, error: String },
    Abandoned,
}

/// How many times a call is tried when its failure is probably the message's own (a 500, an
/// answer that is not JSON) before the message is dead-lettered.
pub(crate) const MAX_ATTEMPTS_FOR_ERRORS: u32 = 5;

/// What to do with an answer that is not a success.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The message is bad: dead-letter it at once (400, 413, 415, 422 and the like).
    Reject,
    /// Something is not there yet or overloaded: retry for as long as it takes (connection
    /// errors, timeouts, 404 before Fission's triggers exist, 408, 429, 502, 503, 504).
    RetryForever,
    /// Probably this message's fault, maybe transient (500, other 5xx, a body that is not
    /// JSON): retry a few times, then dead-letter, so one message cannot stall its lane.
    RetryThenReject,
}

/// The verdict on an HTTP status that is not a success.
pub(crate) fn verdict(status: u16) -> Verdict {
    match status {
        404 | 408 | 429 | 502 | 503 | 504 => Verdict::RetryForever,
        400..=499 => Verdict::Reject,
        _ => Verdict::RetryThenReject,
    }
}

/// One call, retried with exponential backoff as [`verdict`] says.
async fn call(
    functions: &dyn Functions,
    config: &ConnectorConfig,
    stats: &ConnectorStats,
    route: &'static str,
    body: &Value,
    abandon: &CancellationToken,
) -> Result<Value, CallError> {
    // The shared policy (`entwine_core::retry`): waits doubling from `retry_initial` to
    // `retry_max`, each in the upper half of its bound, so failing lanes do not retry in step.
    let mut delays = entwine_core::retry::delays(config.retry_initial, config.retry_max);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (status, failure, kind) = match functions.call(route, body).await {
            Ok(answer) => return Ok(answer),
            Err(CallFailure::Status { status, error }) => (status, error, verdict(status)),
            Err(CallFailure::NotJson { status, error }) => {
                (status, error, Verdict::RetryThenReject)
            }
            Err(CallFailure::Unreachable(error)) => (0, error, Verdict::RetryForever),
        };
        match kind {
            Verdict::Reject => {
                return Err(CallError::Rejected {
                    status,
                    error: failure,
                })
            }
            Verdict::RetryThenReject if attempts >= MAX_ATTEMPTS_FOR_ERRORS => {
                return Err(CallError::Rejected {
                    status,
                    error: format!("gave up after {attempts} attempts: {failure}"),
                })
            }
            Verdict::RetryThenReject | Verdict::RetryForever => {}
        }
        if abandon.is_cancelled() {
            return Err(CallError::Abandoned);
        }
        stats.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("entwine_connector_retries_total").increment(1);
        let delay = delays.next().unwrap_or(config.retry_max);
        tracing::warn!(route, status, error = %failure, retry_in = ?delay, "function call failed, retrying");
        tokio::select! {
            () = abandon.cancelled() => return Err(CallError::Abandoned),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Records `entwine_entanglement_latency_seconds`: from the device's timestamp to the moment its
/// digital state is committed with its ODTE (device and connector clocks assumed in sync).
/// Devices stamp whole milliseconds, so the figure is up to 1 ms late, 0.5 ms on average.
fn observe_entanglement_latency(device_ms: i64) {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let device_us = device_ms.saturating_mul(1000);
    metrics::histogram!("entwine_entanglement_latency_seconds")
        .record(now_us.saturating_sub(device_us).max(0) as f64 / 1e6);
}

/// Where refused messages go: a small [`DeadLetter`] (stage, reason, size, SHA-256 and a
/// bounded prefix of the payload, never the payload itself, so that a hostile message cannot
/// make a letter too large to send), stored by the dead-letter handler and announced on the
/// dead-letter topic.
#[derive(Clone)]
pub(crate) struct DeadLetters {
    pub(crate) client: AsyncClient,
    pub(crate) functions: Arc<dyn Functions>,
    pub(crate) config: Arc<ConnectorConfig>,
    pub(crate) stats: Arc<ConnectorStats>,
}

/// Shutdown came while a dead letter could not be stored yet.
pub(crate) struct NotStored;

impl DeadLetters {
    /// Dead-letters `publish`: stores the letter (retried until it is stored, like any call
    /// that fails for the operator's reasons), announces it, counts and logs it. Only then may
    /// the message be acknowledged. A letter the handler refuses is logged as an error and
    /// counted, never retried for ever.
    pub(crate) async fn send(
        &self,
        publish: &Publish,
        stage: &str,
        status: Option<u16>,
        error: &str,
        abandon: &CancellationToken,
    ) -> Result<(), NotStored> {
        let device = device_id_of(&publish.topic).ok();
        let letter = DeadLetter::of(
            &publish.topic,
            device.as_ref().map(|d| d.as_str()),
            &publish.payload,
            stage,
            status,
            error,
            now_ms(),
        );
        tracing::warn!(
            topic = %letter.topic,
            stage,
            status,
            error = %letter.error,
            payload_bytes = letter.payload_bytes,
            payload_sha256 = %letter.payload_sha256,
            "message dead-lettered"
        );
        let body = serde_json::to_value(&letter).unwrap_or(Value::Null);
        if self.config.store_dead_letters {
            let route = DEAD_LETTER_ROUTE;
            match call(
                self.functions.as_ref(),
                &self.config,
                &self.stats,
                route,
                &body,
                abandon,
            )
            .await
            {
                Ok(_) => {}
                Err(CallError::Abandoned) => return Err(NotStored),
                Err(CallError::Rejected { status, error }) => {
                    metrics::counter!("entwine_connector_dead_letters_unstored_total").increment(1);
                    tracing::error!(route, status, %error, "the dead-letter handler refused a letter; it is only logged and announced");
                }
            }
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("entwine_connector_dead_letters_total", "stage" => letter.stage.clone())
            .increment(1);
        // Best effort, never waiting: the letter is stored already, and the client's queue is
        // also what carries the acknowledgements.
        if let Err(e) = self.client.try_publish(
            &self.config.dead_letter_topic,
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        ) {
            tracing::warn!(error = %e, "cannot announce a dead letter on the topic");
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_messages_are_rejected_and_missing_or_overloaded_services_retried() {
        for status in [400, 401, 403, 405, 413, 415, 422] {
            assert_eq!(verdict(status), Verdict::Reject, "{status}");
        }
        for status in [404, 408, 429, 502, 503, 504] {
            assert_eq!(verdict(status), Verdict::RetryForever, "{status}");
        }
        for status in [500, 501, 505] {
            assert_eq!(verdict(status), Verdict::RetryThenReject, "{status}");
        }
    }
}
