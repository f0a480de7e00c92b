//! A twin's history downsampled for a chart: `GET /api/twins/{id}/series?from=&to=&step=`
//! (milliseconds), the digital states with a twin timestamp in `[from, to)` in buckets of
//! `step` ms, aggregated by the store in one query ([`entwine_store::Store::series`]).
//!
//! Defaults: `to` now (the wall clock), `from` an hour before `to`, `step` the smallest of
//! [`STEPS`] giving at most [`TARGET_BUCKETS`] buckets. At most [`MAX_BUCKETS`] buckets.

use std::collections::HashMap;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use entwine_functions::handlers::{Clock, SystemClock};

use super::{twin_id, Api, ApiError, Params};

/// The bucket widths a default `step` is chosen from (ms): 1 s, 5 s, 10 s, 30 s, 1 min,
/// 5 min, 15 min, 1 h, 6 h, 1 day.
pub(super) const STEPS: [i64; 10] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000, 21_600_000, 86_400_000,
];

/// Most buckets a default `step` makes.
pub(super) const TARGET_BUCKETS: i64 = 600;

/// Most buckets a request may ask for.
pub(super) const MAX_BUCKETS: i64 = 10_000;

/// The range `from` covers when it is not given (ms): an hour.
pub(super) const DEFAULT_RANGE: i64 = 3_600_000;

/// How many buckets of `step` ms `[from, to)` spans.
fn buckets(from: i64, to: i64, step: i64) -> i128 {
    let span = i128::from(to) - i128::from(from);
    let step = i128::from(step);
    (span + step - 1) / step
}

/// The default step for `[from, to)`: the smallest of [`STEPS`] giving at most
/// [`TARGET_BUCKETS`] buckets, else whole days enough for that.
pub(super) fn default_step(from: i64, to: i64) -> i64 {
    STEPS
        .iter()
        .copied()
        .find(|&step| buckets(from, to, step) <= i128::from(TARGET_BUCKETS))
        .unwrap_or_else(|| {
            let days = buckets(from, to, STEPS[9] * TARGET_BUCKETS);
            i64::try_from(days.saturating_mul(i128::from(STEPS[9]))).unwrap_or(i64::MAX)
        })
}

pub(super) async fn series(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = twin_id(path)?;
    let params = Params::new(raw, &["from", "to", "step"])?;
    let any = i64::MIN..=i64::MAX;
    let given_from = params.integer("from", any.clone())?;
    let given_to = params.integer("to", any.clone())?;
    let given_step = params.integer("step", any)?;
    let to = given_to.unwrap_or_else(|| SystemClock.now_ms());
    let from = given_from.unwrap_or_else(|| to.saturating_sub(DEFAULT_RANGE));
    if from >= to {
        return Err(ApiError::BadParameter(
            "from".into(),
            format!("{from} is not before to ({to})"),
        ));
    }
    let step = match given_step {
        Some(step) if step <= 0 => {
            return Err(ApiError::BadParameter(
                "step".into(),
                format!("{step} is not above 0 ms"),
            ))
        }
        Some(step) => step,
        None => default_step(from, to),
    };
    let count = buckets(from, to, step);
    if count > i128::from(MAX_BUCKETS) {
        return Err(ApiError::BadParameter(
            "step".into(),
            format!("{step} ms makes {count} buckets from {from} to {to}, more than {MAX_BUCKETS}"),
        ));
    }
    if api.store.twin(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no twin {id:?}")));
    }
    Ok(Json(api.store.series(&id, from, to, step).await?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_step_is_the_smallest_giving_at_most_600_buckets() {
        // An hour: 10 s gives 360 buckets, 5 s 720.
        assert_eq!(default_step(0, 3_600_000), 10_000);
        // Ten minutes exactly: 1 s gives 600.
        assert_eq!(default_step(0, 600_000), 1_000);
        // One ms more: 601 buckets of 1 s, so 5 s.
        assert_eq!(default_step(0, 600_001), 5_000);
        // A day: 5 min gives 288, 1 min 1,440.
        assert_eq!(default_step(0, 86_400_000), 300_000);
        // 600 days: 1 day. 601 days: 2 days (whole days giving at most 600 buckets).
        assert_eq!(default_step(0, 600 * 86_400_000), 86_400_000);
        assert_eq!(default_step(0, 601 * 86_400_000), 2 * 86_400_000);
    }
}
