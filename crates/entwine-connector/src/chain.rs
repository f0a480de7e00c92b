//! One lane: the four-step chain of its messages, in batches taken without waiting, with
//! retries, dead letters and the acknowledgement that releases each message at the broker.

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

/// Why a message was refused: what its dead letter says.
#[derive(Debug, PartialEq)]
pub(crate) struct Refusal {
    /// The route that refused it, `payload` or `topic`.
    pub(crate) stage: String,
    /// The HTTP status, when a function answered.
    pub(crate) status: Option<u16>,
    /// The reason.
    pub(crate) error: String,
}

impl Refusal {
    fn at(route: &str, status: u16, error: String) -> Self {
        Self {
            stage: route.trim_start_matches('/').to_owned(),
            status: Some(status),
            error,
        }
    }
}

/// The lane stops: shutdown came while a call waited to retry (or a letter could not be stored
/// yet), or the event loop is gone. What the batch had not finished stays unacknowledged.
pub(crate) struct Stop;

/// A message taken from the broker, and when.
pub(crate) struct Delivery {
    pub(crate) publish: Publish,
    /// Its number in arrival order, reported back when finished (see `Acks`).
    pub(crate) seq: u64,
    pub(crate) received_at: std::time::Instant,
}

/// Processes the messages of the devices hashed to this lane in batches, in arrival order, and
/// reports each finished one on `finished`. A batch is one delivery awaited and whatever else
/// is queued already (up to `max_batch` messages and about `max_batch_bytes`): no timer, so a
/// message at low load goes alone. After `shutdown` it stops before the next batch (unless the
/// connector empties its session); `abandon` stops waiting to retry a call.
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
    let lane = Lane {
        letters: DeadLetters {
            client,
            functions: functions.clone(),
            config: config.clone(),
            stats: stats.clone(),
        },
        functions,
        config,
        stats,
        finished,
        abandon,
    };
    // A message taken from the queue that did not fit in the previous batch's bytes.
    let mut carried: Option<Delivery> = None;
    loop {
        let first = match carried.take() {
            Some(delivery) => delivery,
            None => match messages.recv().await {
                Some(delivery) => delivery,
                None => break,
            },
        };
        if shutdown.is_cancelled() && !lane.config.drains_session() {
            // Not started: leave it (and the rest of the queue) to the next session. A
            // connector that empties its session finishes its queue instead (see `run`).
            break;
        }
        let batch = take_batch(first, &mut messages, &lane.config, &mut carried);
        if lane.run(batch).await.is_err() {
            break;
        }
    }
}

/// `first` and what is queued behind it already, never waiting: up to `max_batch` messages and
/// about `max_batch_bytes` (each call's array is measured exactly before it is sent). The
/// first message that does not fit in the bytes is left in `carried` for the next batch.
fn take_batch(
    first: Delivery,
    messages: &mut mpsc::UnboundedReceiver<Delivery>,
    config: &ConnectorConfig,
    carried: &mut Option<Delivery>,
) -> Vec<Delivery> {
    let mut bytes = estimated_bytes(&first.publish);
    let mut batch = vec![first];
    while batch.len() < config.max_batch {
        let Ok(next) = messages.try_recv() else {
            break;
        };
        let size = estimated_bytes(&next.publish);
        if bytes + size > config.max_batch_bytes {
            *carried = Some(next);
            break;
        }
        bytes += size;
        batch.push(next);
    }
    batch
}

/// About what a message adds to a batch's body: its payload, its device id (the topic is
/// longer) and a separator.
fn estimated_bytes(publish: &Publish) -> usize {
    publish.payload.len() + publish.topic.len() + 16
}

/// What a lane needs to run its batches.
struct Lane {
    functions: Arc<dyn Functions>,
    config: Arc<ConnectorConfig>,
    stats: Arc<ConnectorStats>,
    letters: DeadLetters,
    finished: mpsc::UnboundedSender<u64>,
    abandon: CancellationToken,
}

/// A message of a batch on its way through the chain.
struct Item {
    delivery: Delivery,
    /// The body of the next call: the payload + `device_id`, then each answer.
    body: Value,
    /// The device's timestamp, for the entanglement latency.
    device_timestamp: Option<i64>,
}

/// One step's answer for one message: the body of its next call, or why it was refused.
type Step = Result<Value, Refusal>;

impl Lane {
    /// Runs the chain of a batch: route k takes the messages that route k − 1 answered, in
    /// order; a message refused at any point is dead-lettered alone and the others go on. Each
    /// message is reported finished once its own chain ended (completed or dead-lettered).
    async fn run(&self, batch: Vec<Delivery>) -> Result<(), Stop> {
        let mut refused = Vec::new();
        let mut items = Vec::with_capacity(batch.len());
        for delivery in batch {
            match prepare(&self.config, &delivery.publish) {
                Ok((body, device_timestamp)) => items.push(Item {
                    delivery,
                    body,
                    device_timestamp,
                }),
                Err(refusal) => refused.push((delivery, refusal)),
            }
        }
        for route in ROUTES {
            if items.is_empty() {
                break;
            }
            let bodies = items
                .iter_mut()
                .map(|item| std::mem::take(&mut item.body))
                .collect();
            let steps = self.call_route(route, bodies).await?;
            let mut next = Vec::with_capacity(items.len());
            for (mut item, step) in items.into_iter().zip(steps) {
                match step {
                    Ok(answer) => {
                        if route == TWIN_ROUTE {
                            // The digital state is committed with its ODTE: the twin mirrors
                            // the device now.
                            if let Some(device_ms) = item.device_timestamp {
                                observe_entanglement_latency(device_ms);
                            }
                        }
                        item.body = answer;
                        next.push(item);
                    }
                    Err(refusal) => refused.push((item.delivery, refusal)),
                }
            }
            items = next;
        }
        for item in items {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("entwine_connector_completed_total").increment(1);
            metrics::histogram!("entwine_chain_duration_seconds")
                .record(item.delivery.received_at.elapsed().as_secs_f64());
            self.finish(item.delivery.seq)?;
        }
        for (delivery, refusal) in refused {
            // Shutdown while the letter could not be stored: the message stays
            // unacknowledged and comes back to the next session.
            self.letters
                .send(
                    &delivery.publish,
                    &refusal.stage,
                    refusal.status,
                    &refusal.error,
                    &self.abandon,
                )
                .await
                .map_err(|NotStored| Stop)?;
            self.finish(delivery.seq)?;
        }
        Ok(())
    }

    /// The event loop acknowledges it (in arrival order, or as it finishes).
    fn finish(&self, seq: u64) -> Result<(), Stop> {
        self.finished.send(seq).map_err(|_| Stop)
    }

    /// One route for the bodies of a batch, in order: split into calls of at most `max_batch`
    /// elements and `max_batch_bytes` of JSON array; answers one step per body, in order.
    async fn call_route(&self, route: &'static str, bodies: Vec<Value>) -> Result<Vec<Step>, Stop> {
        let mut steps = Vec::with_capacity(bodies.len());
        for chunk in split(bodies, self.config.max_batch, self.config.max_batch_bytes) {
            if route == ROUTES[0] {
                self.count_batch(chunk.len());
            }
            steps.extend(self.call_chunk(route, chunk).await?);
        }
        Ok(steps)
    }

    fn count_batch(&self, len: usize) {
        let len = len as u64;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.batched_events.fetch_add(len, Ordering::Relaxed);
        self.stats.largest_batch.fetch_max(len, Ordering::Relaxed);
        metrics::histogram!("entwine_connector_batch_size").record(len as f64);
    }

    /// One call: a body alone as itself (a JSON object, exactly the call of an unbatched
    /// connector), several as a JSON array answered by an array of as many elements. An
    /// element answered with an error object is refused alone. A batch refused whole (a 4xx,
    /// such as from functions that take only objects, or a 500 or a wrong answer tried
    /// `MAX_ATTEMPTS_FOR_ERRORS` times) is called again one message at a time, in order, so
    /// that nothing is dead-lettered for having been batched.
    async fn call_chunk(
        &self,
        route: &'static str,
        mut chunk: Vec<Value>,
    ) -> Result<Vec<Step>, Stop> {
        if chunk.len() == 1 {
            let body = chunk.pop().unwrap_or_default();
            return Ok(vec![self.call_alone(route, &body).await?]);
        }
        let len = chunk.len();
        let batch = Value::Array(chunk);
        let outcome = call(
            self.functions.as_ref(),
            &self.config,
            &self.stats,
            route,
            &batch,
            &self.abandon,
            |answer| batch_answer(answer, len),
        )
        .await;
        match outcome {
            Ok(answers) => Ok(answers
                .into_iter()
                .map(|answer| match element_error(&answer) {
                    Some((status, error)) => Err(Refusal::at(route, status, error)),
                    None => Ok(answer),
                })
                .collect()),
            Err(CallError::Abandoned) => Err(Stop),
            Err(CallError::Rejected { status, error }) => {
                self.stats.batch_fallbacks.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("entwine_connector_batch_fallbacks_total").increment(1);
                tracing::warn!(
                    route,
                    status,
                    %error,
                    messages = len,
                    "a batch was refused whole; calling each of its messages alone (functions that take \
                     only objects, such as the seed's, need max_batch 1)"
                );
                let mut steps = Vec::with_capacity(len);
                for body in batch.as_array().map(Vec::as_slice).unwrap_or_default() {
                    steps.push(self.call_alone(route, body).await?);
                }
                Ok(steps)
            }
        }
    }

    /// One message alone, with the retry and dead-letter rules of every call.
    async fn call_alone(&self, route: &'static str, body: &Value) -> Result<Step, Stop> {
        match call(
            self.functions.as_ref(),
            &self.config,
            &self.stats,
            route,
            body,
            &self.abandon,
            Ok,
        )
        .await
        {
            Ok(answer) => Ok(Ok(answer)),
            Err(CallError::Rejected { status, error }) => {
                Ok(Err(Refusal::at(route, status, error)))
            }
            Err(CallError::Abandoned) => Err(Stop),
        }
    }
}

/// The body of a message's first call, payload + `device_id`, and the device's timestamp; or
/// why it cannot be sent at all (a topic without a device id, a payload over the functions'
/// limit or not a JSON object).
pub(crate) fn prepare(
    config: &ConnectorConfig,
    publish: &Publish,
) -> Result<(Value, Option<i64>), Refusal> {
    let device = device_id_of(&publish.topic).map_err(|error| Refusal {
        stage: "topic".into(),
        status: None,
        error,
    })?;
    if publish.payload.len() > config.max_payload_bytes {
        return Err(Refusal {
            stage: "payload".into(),
            status: None,
            error: format!(
                "payload: {} bytes, over the functions' limit of {} bytes",
                publish.payload.len(),
                config.max_payload_bytes
            ),
        });
    }
    let mut body = match entwine_core::input::parse_object(&publish.payload) {
        Ok(map) => Value::Object(map),
        Err(e) => {
            return Err(Refusal {
                stage: "payload".into(),
                status: None,
                error: format!("payload: {}", e.reason),
            })
        }
    };
    let device_timestamp = body.get("timestamp").and_then(Value::as_i64);
    body["device_id"] = Value::String(device.as_str().to_owned());
    Ok((body, device_timestamp))
}

/// Splits `bodies`, in order, into calls of at most `max_len` elements whose JSON array (as
/// serialized, compact) is at most `max_bytes`; a body alone goes whatever its size (it is
/// sent as an object, under the single call's limit).
pub(crate) fn split(bodies: Vec<Value>, max_len: usize, max_bytes: usize) -> Vec<Vec<Value>> {
    let max_len = max_len.max(1);
    if max_len == 1 {
        return bodies.into_iter().map(|body| vec![body]).collect();
    }
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    // `[` and `]`, the elements and a comma between each two.
    let mut bytes = 0;
    for body in bodies {
        let size = serialized_len(&body);
        if !chunk.is_empty() && (chunk.len() >= max_len || bytes + 1 + size > max_bytes) {
            chunks.push(std::mem::take(&mut chunk));
        }
        bytes = if chunk.is_empty() {
            2 + size
        } else {
            bytes + 1 + size
        };
        chunk.push(body);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// The length of `value` serialized as compact JSON (as `reqwest`'s `json` sends it), without
/// building the text.
fn serialized_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// A batch's answer: an array of `len` elements, each the single call's answer or an error
/// object. Anything else counts as an answer that is not JSON (retried, then refused whole). An
/// element error that means "not now" (a retry-for-ever status, which the functions answer for
/// the whole batch) makes the whole call fail with it, so that it is retried, not dead-lettered.
fn batch_answer(answer: Value, len: usize) -> Result<Vec<Value>, Failure> {
    let answers = match answer {
        Value::Array(answers) if answers.len() == len => answers,
        other => {
            let got = match &other {
                Value::Array(answers) => format!("an array of {}", answers.len()),
                _ => "not an array".to_owned(),
            };
            return Err(Failure {
                status: 200,
                error: format!("answered a batch of {len} with a body that is {got}"),
                verdict: Verdict::RetryThenReject,
            });
        }
    };
    if let Some((status, error)) = answers
        .iter()
        .filter_map(element_error)
        .find(|(status, _)| verdict(*status) == Verdict::RetryForever)
    {
        return Err(Failure {
            status,
            error,
            verdict: Verdict::RetryForever,
        });
    }
    Ok(answers)
}

/// The status and message of an element answered with an error object
/// (`{"error": "…", "field": "…", "status": 400}`; without a valid status, 500). No state the
/// functions answer has an `error` key.
fn element_error(answer: &Value) -> Option<(u16, String)> {
    let error = answer.get("error")?.as_str()?.to_owned();
    let status = answer
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..=599).contains(s))
        .unwrap_or(500);
    Some((status, error))
}

enum CallError {
    Rejected { status: u16, error: String },
    Abandoned,
}

/// Why an answer is not taken, and what to do about it.
struct Failure {
    status: u16,
    error: String,
    verdict: Verdict,
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
        // 401/403: the connector's token (auth.token) is missing, wrong or revoked — no message
        // is at fault and every one would be refused alike, so each waits for the token to be
        // fixed instead of being dead-lettered.
        401 | 403 | 404 | 408 | 429 | 502 | 503 | 504 => Verdict::RetryForever,
        400..=499 => Verdict::Reject,
        _ => Verdict::RetryThenReject,
    }
}

/// One call, retried with exponential backoff as [`verdict`] says; `accept` turns a successful
/// answer into what the caller needs, or says why it is not taken (retried alike).
#[allow(clippy::too_many_arguments)]
async fn call<T>(
    functions: &dyn Functions,
    config: &ConnectorConfig,
    stats: &ConnectorStats,
    route: &'static str,
    body: &Value,
    abandon: &CancellationToken,
    accept: impl Fn(Value) -> Result<T, Failure>,
) -> Result<T, CallError> {
    // The shared policy (`entwine_core::retry`): waits doubling from `retry_initial` to
    // `retry_max`, each in the upper half of its bound, so failing lanes do not retry in step.
    let mut delays = entwine_core::retry::delays(config.retry_initial, config.retry_max);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Failure {
            status,
            error: failure,
            verdict: kind,
        } = match functions.call(route, body).await {
            Ok(answer) => match accept(answer) {
                Ok(taken) => return Ok(taken),
                Err(failure) => failure,
            },
            Err(CallFailure::Status { status, error }) => Failure {
                status,
                error,
                verdict: verdict(status),
            },
            Err(CallFailure::NotJson { status, error }) => Failure {
                status,
                error,
                verdict: Verdict::RetryThenReject,
            },
            Err(CallFailure::Unreachable(error)) => Failure {
                status: 0,
                error,
                verdict: Verdict::RetryForever,
            },
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
                Ok,
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
    use crate::functions::CallFuture;
    use serde_json::json;
    use std::time::Duration;

    /// Functions that answer each call with the next of `answers` (the last one forever after),
    /// counting the calls: the retry loop's timing is the subject, not the functions.
    struct Scripted {
        answers: Vec<Result<Value, CallFailure>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Value, CallFailure>>) -> Self {
            Self {
                answers,
                calls: Default::default(),
            }
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::Relaxed)
        }
    }

    impl Functions for Scripted {
        fn call<'a>(&'a self, _route: &'static str, _body: &'a Value) -> CallFuture<'a> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let answer = self.answers[n.min(self.answers.len() - 1)].clone();
            Box::pin(async move { answer })
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn status(status: u16) -> Result<Value, CallFailure> {
        Err(CallFailure::Status {
            status,
            error: format!("answered {status}"),
        })
    }

    fn retrying_config() -> ConnectorConfig {
        let mut config =
            ConnectorConfig::new("127.0.0.1:1883", vec!["t/#".into()], "http://127.0.0.1:1")
                .unwrap();
        config.retry_initial = Duration::from_millis(100);
        config.retry_max = Duration::from_secs(1);
        config
    }

    async fn timed_call(
        functions: &Scripted,
        abandon: &CancellationToken,
    ) -> (Result<Value, CallError>, Duration, u64) {
        let stats = ConnectorStats::default();
        let start = tokio::time::Instant::now();
        let result = call(
            functions,
            &retrying_config(),
            &stats,
            "/physicalevents",
            &json!({}),
            abandon,
            Ok,
        )
        .await;
        (
            result,
            start.elapsed(),
            stats.retries.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_function_that_recovers_is_called_again_after_waits_that_double() {
        // 503, 503, then the answer: two waits, the first in [50, 100) ms, the second in
        // [100, 200) ms, so the answer comes 150 to 300 ms after the first call.
        let functions = Scripted::new(vec![status(503), status(503), Ok(json!({"id": 7}))]);
        let (result, elapsed, retries) = timed_call(&functions, &CancellationToken::new()).await;
        assert_eq!(result.ok(), Some(json!({"id": 7})));
        assert_eq!((functions.calls(), retries), (3, 2));
        assert!(
            elapsed >= Duration::from_millis(150) && elapsed < Duration::from_millis(300),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_final_at_once_and_an_error_after_five_attempts_within_the_caps() {
        let functions = Scripted::new(vec![status(400)]);
        let (result, elapsed, retries) = timed_call(&functions, &CancellationToken::new()).await;
        assert!(
            matches!(result, Err(CallError::Rejected { status: 400, .. })),
            "a 400 names the message: no retry"
        );
        assert_eq!(
            (functions.calls(), retries, elapsed),
            (1, 0, Duration::ZERO)
        );

        // A 500 is retried, then refused: five calls, four waits below 100 + 200 + 400 + 800 ms
        // and at least half of that.
        let functions = Scripted::new(vec![status(500)]);
        let (result, elapsed, retries) = timed_call(&functions, &CancellationToken::new()).await;
        match result {
            Err(CallError::Rejected { status, error }) => {
                assert_eq!(status, 500);
                assert_eq!(error, "gave up after 5 attempts: answered 500");
            }
            _ => panic!("a persistent 500 is refused"),
        }
        assert_eq!((functions.calls(), retries), (5, 4));
        assert!(
            elapsed >= Duration::from_millis(750) && elapsed < Duration::from_millis(1500),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_store_is_waited_for_without_end_at_most_retry_max_apart() {
        // 503 forever (the store is down): after 10 virtual minutes the call is still waiting,
        // having retried about every second (waits capped at `retry_max`, 1 s, each at least
        // 0.5 s once the bound reached it), until the connector abandons it.
        let functions = Scripted::new(vec![status(503)]);
        let abandon = CancellationToken::new();
        let waiting = {
            let abandon = abandon.clone();
            let functions = std::sync::Arc::new(functions);
            let shared = functions.clone();
            (
                tokio::spawn(async move { timed_call(&shared, &abandon).await.1 }),
                functions,
            )
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        let calls = waiting.1.calls();
        assert!((600..=1205).contains(&calls), "{calls} calls in 600 s");
        abandon.cancel();
        let elapsed = waiting.0.await.unwrap();
        assert_eq!(elapsed, Duration::from_secs(600), "abandoned at once");
    }

    fn state(i: usize, filler: usize) -> Value {
        json!({"device_id": format!("d{i}"), "timestamp": 1_700_000_000_000_i64 + i as i64,
            "filler": "x".repeat(filler)})
    }

    #[test]
    fn batches_are_split_in_order_under_both_limits_measured_as_sent() {
        let bodies: Vec<Value> = (0..10).map(|i| state(i, 100 * i)).collect();
        for (max_len, max_bytes) in [(3, 1 << 20), (64, 1000), (4, 1500), (64, 1)] {
            let chunks = split(bodies.clone(), max_len, max_bytes);
            let flat: Vec<Value> = chunks.iter().flatten().cloned().collect();
            assert_eq!(
                flat, bodies,
                "in order, nothing lost: {max_len} {max_bytes}"
            );
            for chunk in &chunks {
                assert!(!chunk.is_empty() && chunk.len() <= max_len);
                let sent = serde_json::to_vec(&Value::Array(chunk.clone()))
                    .unwrap()
                    .len();
                assert!(
                    chunk.len() == 1 || sent <= max_bytes,
                    "{sent} bytes over {max_bytes}"
                );
            }
        }
        // Exactly at the limit: two elements fit, a third does not.
        let two = serde_json::to_vec(&Value::Array(bodies[..2].to_vec()))
            .unwrap()
            .len();
        let chunks = split(bodies[..3].to_vec(), 64, two);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        let chunks = split(bodies[..3].to_vec(), 64, two - 1);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        // One per call: never an array.
        assert!(split(bodies.clone(), 1, 1 << 20)
            .iter()
            .all(|c| c.len() == 1));
        assert_eq!(serialized_len(&bodies[3]), bodies[3].to_string().len());
    }

    #[test]
    fn a_batch_answer_is_an_array_of_its_length_with_errors_per_element() {
        let ok = json!([{"id": 1}, {"error": "data: missing", "field": "data", "status": 400}]);
        let answers = batch_answer(ok, 2).ok().unwrap();
        assert_eq!(element_error(&answers[0]), None);
        assert_eq!(
            element_error(&answers[1]),
            Some((400, "data: missing".to_owned()))
        );
        assert_eq!(
            element_error(&json!({"error": "boom"})),
            Some((500, "boom".to_owned()))
        );
        for wrong in [json!([{"id": 1}]), json!({"id": 1}), json!(null)] {
            let failure = batch_answer(wrong, 2).err().unwrap();
            assert_eq!(failure.verdict, Verdict::RetryThenReject);
            assert_eq!(failure.status, 200);
        }
        // "Not now" for one element: the whole call is retried, nothing dead-lettered.
        let failure = batch_answer(
            json!([{"id": 1}, {"error": "store unavailable", "status": 503}]),
            2,
        )
        .err()
        .unwrap();
        assert_eq!(failure.verdict, Verdict::RetryForever);
        assert_eq!(failure.status, 503);
    }

    #[test]
    fn bad_messages_are_rejected_and_missing_or_overloaded_services_retried() {
        for status in [400, 405, 413, 415, 422] {
            assert_eq!(verdict(status), Verdict::Reject, "{status}");
        }
        // A refused token is the connector's configuration, not the message's fault.
        for status in [401, 403, 404, 408, 429, 502, 503, 504] {
            assert_eq!(verdict(status), Verdict::RetryForever, "{status}");
        }
        for status in [500, 501, 505] {
            assert_eq!(verdict(status), Verdict::RetryThenReject, "{status}");
        }
    }
}
