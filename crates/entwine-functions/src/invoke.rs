//! One entry point for every function, whoever calls it: [`TwinFunctions::invoke`] runs a
//! function on its JSON input and answers what it answers, [`failure`] says which status and
//! body an error is, and [`observed`] counts and times the call. The HTTP routes
//! ([`crate::http`]) and in-process callers (the connector inside `entwine up` and
//! `entwine bench`) go through these three, so the functions behave the same either way.
//!
//! Batches: the four functions of the chain also take a JSON array of their inputs
//! ([`TwinFunctions::invoke_batch`], at most [`MAX_BATCH_ELEMENTS`], never empty), answering
//! one result per element in order: what the single call answers for it, or its own refusal,
//! as [`element_failure`] writes it (`{"error", "field", "status"}`); a failure of the store
//! itself fails the whole batch, with the single call's status and body. [`observed_batch`]
//! times a batch once and counts each element's outcome.

use entwine_core::input::kind;
use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalState};
use entwine_core::InputError;
use entwine_store::{StoreError, StoredDeadLetter};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::handlers::{Each, Element, Evaluation, Function, FunctionError, TwinFunctions};
use crate::http::MAX_BATCH_ELEMENTS;

/// What a function answers (serialized as the value inside, in its fields' order).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// physical-event-handler.
    Physical(PhysicalState),
    /// shadow-handler.
    Pending(PendingDigitalState),
    /// twin-handler and digital-event-handler.
    Digital(DigitalState),
    /// twin-evaluator.
    Evaluation(Evaluation),
    /// dead-letter-handler.
    DeadLetter(StoredDeadLetter),
}

impl Answer {
    /// The answer as a JSON value (what the next function of the chain takes).
    pub fn to_value(&self) -> Value {
        // Serializing these types cannot fail: plain fields, string keys, finite numbers (the
        // ODTE figures are checked finite when computed).
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Function {
    /// The function on `route` (`/physicalevents`, …).
    pub fn from_route(route: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.route() == route)
    }

    /// Whether it takes a batch (a JSON array of its inputs): the four of the chain do; the
    /// twin evaluator and the dead-letter handler take objects only.
    pub fn takes_batches(self) -> bool {
        Self::CHAIN.contains(&self)
    }
}

impl TwinFunctions {
    /// Runs `function` on `input` (the twin evaluator takes none: its input is ignored).
    pub async fn invoke(
        &self,
        function: Function,
        input: &Map<String, Value>,
    ) -> Result<Answer, FunctionError> {
        Ok(match function {
            Function::PhysicalEvent => Answer::Physical(self.physical_event(input).await?),
            Function::Shadow => Answer::Pending(self.shadow(input).await?),
            Function::Twin => Answer::Digital(self.twin(input).await?),
            Function::DigitalEvent => Answer::Digital(self.digital_event(input).await?),
            Function::TwinEvaluator => Answer::Evaluation(self.evaluate_twins().await?),
            Function::DeadLetter => Answer::DeadLetter(self.dead_letter(input).await?),
        })
    }

    /// Runs `function` on a batch of inputs (one of the chain's four: see
    /// [`Function::takes_batches`]), with one reading of the clock for all. Answers one result
    /// per input, in order: exactly what [`TwinFunctions::invoke`] answers for that input alone
    /// (an element that is not a JSON object is refused as the route refuses such a body:
    /// `expected a JSON object, got a number`), or the whole batch's failure: an empty batch or
    /// one of more than [`MAX_BATCH_ELEMENTS`] (bad input, field `body`), a function that
    /// takes no batches (`expected a JSON object, got an array`, as its route answers an
    /// array), or a failure of the store itself.
    pub async fn invoke_batch(
        &self,
        function: Function,
        inputs: &[Value],
    ) -> Result<Each<Answer>, FunctionError> {
        let elements: Vec<Element<'_>> = inputs.iter().map(Ok).collect();
        self.invoke_elements(function, &elements).await
    }

    /// [`TwinFunctions::invoke_batch`] on elements some of which may be refused already (an
    /// HTTP element over [`crate::http::MAX_BODY_BYTES`]): those are answered their refusal,
    /// in their place.
    pub async fn invoke_elements(
        &self,
        function: Function,
        inputs: &[Element<'_>],
    ) -> Result<Each<Answer>, FunctionError> {
        let no_batch = || InputError::new("body", "expected a JSON object, got an array").into();
        if !function.takes_batches() {
            return Err(no_batch());
        }
        if inputs.is_empty() {
            return Err(InputError::new(
                "body",
                format!("empty batch: expected 1 to {MAX_BATCH_ELEMENTS} elements"),
            )
            .into());
        }
        if inputs.len() > MAX_BATCH_ELEMENTS {
            return Err(InputError::new(
                "body",
                format!(
                    "a batch of {} elements, more than the limit of {MAX_BATCH_ELEMENTS}",
                    inputs.len()
                ),
            )
            .into());
        }
        fn answers<T>(each: Each<T>, answer: fn(T) -> Answer) -> Each<Answer> {
            each.into_iter().map(|r| r.map(answer)).collect()
        }
        Ok(match function {
            Function::PhysicalEvent => {
                answers(self.physical_events(inputs).await?, Answer::Physical)
            }
            Function::Shadow => answers(self.shadows(inputs).await?, Answer::Pending),
            Function::Twin => answers(self.twins(inputs).await?, Answer::Digital),
            Function::DigitalEvent => answers(self.digital_events(inputs).await?, Answer::Digital),
            Function::TwinEvaluator | Function::DeadLetter => return Err(no_batch()),
        })
    }
}

/// An element of a batch's answer: the single call's answer, or the element's refusal
/// ([`element_failure`]). Serialized as the value inside.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// What the single call answers for the element.
    Answer(Answer),
    /// The element's refusal: `{"error", "field", "status"}`.
    Refused(Value),
}

/// A batch's results as its answer, in order: serialized, a JSON array of as many elements
/// (serialize it directly, as the single call's [`Answer`] is, for the same JSON text).
pub fn batch_answer(each: Each<Answer>) -> Vec<Reply> {
    each.into_iter()
        .map(|r| match r {
            Ok(answer) => Reply::Answer(answer),
            Err(e) => Reply::Refused(element_failure(&e)),
        })
        .collect()
}

/// An element of a batch refused alone, as its place in the batch's answer: the body
/// [`failure`] gives the single call, plus its status (`{"error": "…", "field": "…",
/// "status": 400}`; 409 for a conflict, 500 `"internal error"` for a corrupt row).
pub fn element_failure(error: &FunctionError) -> Value {
    let (status, mut body) = failure(error);
    if let Value::Object(map) = &mut body {
        map.insert("status".to_owned(), Value::from(status));
    }
    body
}

/// The HTTP status and JSON body of a function's error, with the seed's error shape
/// (`{"error": "…"}`, plus `field` for bad input): 400 bad input, 409 a different event under a
/// used key, 503 the store unavailable (logged and counted by reason: the caller retries), 500
/// anything else (logged; the body says only "internal error").
pub fn failure(error: &FunctionError) -> (u16, Value) {
    match error {
        FunctionError::Input(e) | FunctionError::Store(StoreError::Rejected(e)) => {
            (400, json!({"error": e.to_string(), "field": e.field}))
        }
        FunctionError::Store(StoreError::Conflict(e)) => {
            (409, json!({"error": e.to_string(), "field": e.field}))
        }
        FunctionError::Store(e @ (StoreError::Unavailable(_) | StoreError::NotMigrated(_))) => {
            // The operator's (or time's) to fix; the caller retries until it passes.
            let reason = e.reason();
            tracing::warn!(error = %crate::http::error_chain(e), %reason, "store unavailable: answering 503, retry later");
            metrics::counter!("entwine_store_unavailable_total", "reason" => reason).increment(1);
            (503, json!({"error": e.to_string()}))
        }
        FunctionError::Store(e) => {
            tracing::error!(error = %crate::http::error_chain(e), "function failed");
            (500, json!({"error": "internal error"}))
        }
    }
}

/// Records a call's duration and outcome (`entwine_function_duration_seconds`,
/// `entwine_function_calls_total`, by function; outcome `ok`, `bad_input`, `conflict`,
/// `unavailable` or `internal`).
pub async fn observed<T>(
    function: Function,
    call: impl std::future::Future<Output = Result<T, FunctionError>>,
) -> Result<T, FunctionError> {
    let start = std::time::Instant::now();
    let result = call.await;
    metrics::histogram!("entwine_function_duration_seconds", "function" => function.name())
        .record(start.elapsed().as_secs_f64());
    count(function, outcome(&result), 1);
    result
}

/// Records a batch call of `elements` inputs: its duration once
/// (`entwine_function_duration_seconds`), its size (`entwine_function_batch_size`, by
/// function), and each element's outcome in `entwine_function_calls_total`, as [`observed`]
/// counts a single call's; a batch failed as a whole counts its failure once per element (once
/// for an empty batch).
pub async fn observed_batch<T>(
    function: Function,
    elements: usize,
    call: impl std::future::Future<Output = Result<Each<T>, FunctionError>>,
) -> Result<Each<T>, FunctionError> {
    let start = std::time::Instant::now();
    let result = call.await;
    metrics::histogram!("entwine_function_duration_seconds", "function" => function.name())
        .record(start.elapsed().as_secs_f64());
    metrics::histogram!("entwine_function_batch_size", "function" => function.name())
        .record(elements as f64);
    match &result {
        Ok(each) => {
            let mut counts: Vec<(&'static str, u64)> = Vec::new();
            for element in each {
                let outcome = outcome(element);
                match counts.iter_mut().find(|(o, _)| *o == outcome) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((outcome, 1)),
                }
            }
            for (outcome, n) in counts {
                count(function, outcome, n);
            }
        }
        Err(e) => count(function, error_outcome(e), elements.max(1) as u64),
    }
    result
}

/// A call's outcome, as `entwine_function_calls_total` labels it.
fn outcome<T>(result: &Result<T, FunctionError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => error_outcome(e),
    }
}

fn error_outcome(error: &FunctionError) -> &'static str {
    match error {
        FunctionError::Input(_) | FunctionError::Store(StoreError::Rejected(_)) => "bad_input",
        FunctionError::Store(StoreError::Conflict(_)) => "conflict",
        FunctionError::Store(StoreError::Unavailable(_) | StoreError::NotMigrated(_)) => {
            "unavailable"
        }
        FunctionError::Store(_) => "internal",
    }
}

fn count(function: Function, outcome: &'static str, n: u64) {
    metrics::counter!("entwine_function_calls_total", "function" => function.name(), "outcome" => outcome)
        .increment(n);
}

/// The input of an in-process call or of an element of a batch, checked as the HTTP adapter
/// checks a body: a JSON object (else refused in the route's words, `body: expected a JSON
/// object, got a number`).
pub fn object(body: &Value) -> Result<&Map<String, Value>, InputError> {
    body.as_object().ok_or_else(|| {
        InputError::new(
            "body",
            format!("expected a JSON object, got {}", kind(body)),
        )
    })
}
