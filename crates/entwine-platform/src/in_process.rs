//! The functions called in process: what the connector inside `entwine up` and `entwine bench`
//! uses instead of HTTP over loopback. Each call runs the same entry point as the function's
//! HTTP route ([`TwinFunctions::invoke`], counted by [`observed`]; a batch, a JSON array on
//! one of the chain's four, [`TwinFunctions::invoke_batch`], counted by [`observed_batch`]),
//! answers what the route answers (a batch: an array of as many elements, each the single
//! answer or its [`element_failure`]) and fails with the status the route would answer
//! ([`failure`]), so the connector's retry and dead-letter rules apply unchanged; only the
//! socket and the JSON text between the steps are gone. (So are the body-size limits; and a
//! number is the `f64` of its `f32`, in a batch's answer as in a single one's, where HTTP
//! prints the `f32` at its shortest: the same `f32` either way.)
//!
//! [`element_failure`]: entwine_functions::invoke::element_failure

use std::sync::Arc;

use entwine_connector::{CallFailure, CallFuture, Functions};
use entwine_functions::handlers::{Function, TwinFunctions};
use entwine_functions::invoke::{batch_answer, failure, object, observed, observed_batch};
use serde_json::Value;

/// [`Functions`] on a [`TwinFunctions`] of this process.
#[derive(Clone)]
pub struct InProcessFunctions {
    functions: Arc<TwinFunctions>,
}

impl InProcessFunctions {
    /// Calls into `functions`.
    pub fn new(functions: Arc<TwinFunctions>) -> Self {
        Self { functions }
    }
}

impl Functions for InProcessFunctions {
    fn call<'a>(&'a self, route: &'static str, body: &'a Value) -> CallFuture<'a> {
        Box::pin(async move {
            let Some(function) = Function::from_route(route) else {
                return Err(CallFailure::Status {
                    status: 404,
                    error: format!("no function at {route}"),
                });
            };
            let result = match body {
                Value::Array(inputs) if function.takes_batches() => observed_batch(
                    function,
                    inputs.len(),
                    self.functions.invoke_batch(function, inputs),
                )
                .await
                .map(|each| serde_json::to_value(batch_answer(each)).unwrap_or(Value::Null)),
                _ => observed(function, async {
                    let input = object(body)?;
                    self.functions.invoke(function, input).await
                })
                .await
                .map(|answer| answer.to_value()),
            };
            match result {
                Ok(answer) => Ok(answer),
                Err(e) => {
                    let (status, body) = failure(&e);
                    let error = body
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    Err(CallFailure::Status { status, error })
                }
            }
        })
    }

    fn describe(&self) -> String {
        "in process".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use entwine_core::odte::OdteConfig;
    use entwine_functions::handlers::{Clock, SystemClock};
    use entwine_testing::TestStore;
    use serde_json::json;

    use super::*;

    fn event(device: &str, at: i64) -> Value {
        json!({
            "timestamp": at,
            "data": {"iot.sensor.energy": 3.71, "iot.sensor.temperature": 27.42},
            "device_id": device
        })
    }

    fn in_process(t: &TestStore) -> InProcessFunctions {
        InProcessFunctions::new(Arc::new(TwinFunctions::new(
            t.store.clone(),
            OdteConfig::seed_default(),
            Arc::new(SystemClock),
        )))
    }

    /// An array is a batch: each element answered what it alone is answered (here, again: a
    /// redelivery answers the first answer), or its refusal with its status, in order.
    #[tokio::test]
    async fn a_batch_is_answered_element_by_element_as_each_alone() {
        let t = TestStore::sqlite().await;
        let functions = in_process(&t);
        let now = SystemClock.now_ms();
        let mut conflict = event("press-1", now);
        conflict["data"]["iot.sensor.energy"] = json!(9.5);
        let mut bodies = vec![
            event("press-1", now),
            json!(7),
            event("press-2", now),
            conflict,
            json!({"device_id": "press-3"}),
        ];
        for route in [
            "/physicalevents",
            "/physicalstates",
            "/pendingdigitalstates",
        ] {
            let answer = functions.call(route, &Value::Array(bodies.clone())).await;
            let answers = answer.unwrap().as_array().cloned().unwrap();
            assert_eq!(answers.len(), bodies.len(), "{route}");
            let mut next = Vec::new();
            for (body, element) in bodies.iter().zip(&answers) {
                match functions.call(route, body).await {
                    Ok(single) => {
                        assert_eq!(element, &single, "{route}");
                        next.push(single);
                    }
                    Err(CallFailure::Status { status, error }) => {
                        assert_eq!(element["status"], status, "{route}: {element}");
                        assert_eq!(element["error"], error.as_str(), "{route}");
                    }
                    Err(e) => panic!("{route}: {e:?}"),
                }
            }
            if route == "/physicalevents" {
                let statuses: Vec<&Value> = answers.iter().map(|a| &a["status"]).collect();
                assert_eq!(
                    statuses,
                    [
                        &Value::Null,
                        &json!(400),
                        &Value::Null,
                        &json!(409),
                        &json!(400)
                    ]
                );
                assert_eq!(
                    answers[1]["error"],
                    "body: expected a JSON object, got a number"
                );
            }
            bodies = next;
        }
        assert_eq!(bodies.len(), 2);
    }

    /// A batch refused or failed whole fails the call with the status the route answers.
    #[tokio::test]
    async fn a_batch_refused_whole_is_a_status() {
        let t = TestStore::sqlite().await;
        let functions = in_process(&t);
        let refused = |status: u16, error: &str| {
            Err::<Value, _>(CallFailure::Status {
                status,
                error: error.to_owned(),
            })
        };
        assert_eq!(
            functions.call("/physicalevents", &json!([])).await,
            refused(400, "body: empty batch: expected 1 to 256 elements")
        );
        assert_eq!(
            functions
                .call("/physicalevents", &Value::Array(vec![json!({}); 257]))
                .await,
            refused(
                400,
                "body: a batch of 257 elements, more than the limit of 256"
            )
        );
        assert_eq!(
            functions.call("/deadletters", &json!([{}])).await,
            refused(400, "body: expected a JSON object, got an array")
        );
        let unmigrated = TestStore::sqlite_empty();
        let failing = in_process(&unmigrated);
        let now = SystemClock.now_ms();
        let single = failing
            .call("/physicalevents", &event("press-1", now))
            .await;
        let batch = failing
            .call("/physicalevents", &json!([event("press-1", now)]))
            .await;
        assert!(
            matches!(&single, Err(CallFailure::Status { status: 503, .. })),
            "{single:?}"
        );
        assert_eq!(batch, single);
    }
}
