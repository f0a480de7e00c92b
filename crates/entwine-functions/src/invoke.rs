//! One entry point for every function, whoever calls it: [`TwinFunctions::invoke`] runs a
//! function on its JSON input and answers what it answers, [`failure`] says which status and
//! body an error is, and [`observed`] counts and times the call. The HTTP routes
//! ([`crate::http`]) and in-process callers (the connector inside `entwine up` and
//! `entwine bench`) go through these three, so the functions behave the same either way.

use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalState};
use entwine_core::InputError;
use entwine_store::{StoreError, StoredDeadLetter};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::handlers::{Evaluation, Function, FunctionError, TwinFunctions};

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
    let outcome = match &result {
        Ok(_) => "ok",
        Err(FunctionError::Input(_) | FunctionError::Store(StoreError::Rejected(_))) => "bad_input",
        Err(FunctionError::Store(StoreError::Conflict(_))) => "conflict",
        Err(FunctionError::Store(StoreError::Unavailable(_) | StoreError::NotMigrated(_))) => {
            "unavailable"
        }
        Err(_) => "internal",
    };
    metrics::histogram!("entwine_function_duration_seconds", "function" => function.name())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("entwine_function_calls_total", "function" => function.name(), "outcome" => outcome)
        .increment(1);
    result
}

/// The input of an in-process call, checked as the HTTP adapter checks a body: a JSON object.
pub fn object(body: &Value) -> Result<&Map<String, Value>, InputError> {
    body.as_object()
        .ok_or_else(|| InputError::new("body", "expected a JSON object"))
}
