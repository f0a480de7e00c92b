//! The functions called in process: what the connector inside `entwine up` and `entwine bench`
//! uses instead of HTTP over loopback. Each call runs the same entry point as the function's
//! HTTP route ([`TwinFunctions::invoke`], counted by [`observed`]) and fails with the status
//! the route would answer ([`failure`]), so the connector's retry and dead-letter rules apply
//! unchanged; only the socket and the JSON text between the steps are gone.

use std::sync::Arc;

use entwine_connector::{CallFailure, CallFuture, Functions};
use entwine_functions::handlers::{Function, TwinFunctions};
use entwine_functions::invoke::{failure, object, observed};
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
            let result = observed(function, async {
                let input = object(body)?;
                self.functions.invoke(function, input).await
            })
            .await;
            match result {
                Ok(answer) => Ok(answer.to_value()),
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
