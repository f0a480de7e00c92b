//! The one retry policy of entwine: jittered exponential backoff, built with the `backon` crate.
//!
//! Every loop that waits before trying again (a device connection reconnecting to its broker,
//! the digital publisher, the connector's calls) draws its waits from [`policy`]: pure values, no
//! I/O and no clock here; the caller sleeps on its own runtime (so a paused tokio clock in tests
//! still drives it) and keeps its own stop conditions.
//!
//! # The caps
//! With `policy(initial, max)`, wait `n` (from 0) is drawn uniformly from the upper half of
//! `d(n) = min(initial · 2ⁿ, max)`, that is from `[d(n) / 2, d(n))`:
//!
//! - the first wait is at most `initial` (and at least `initial / 2`),
//! - each later one at most doubles the bound,
//! - **no wait is ever longer than `max`**, however many attempts,
//! - there is no maximum number of attempts: the iterator never ends (add
//!   [`ExponentialBuilder::with_max_times`] for a bounded one).
//!
//! The jitter keeps many clients that lost the same server (a fleet's connections, a
//! connector's lanes) from retrying in step. After a success, start again from a fresh
//! iterator ([`delays`] or `policy(..).build()`).
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use entwine_core::retry::{self, BackoffBuilder};
//!
//! let (initial, max) = (Duration::from_millis(100), Duration::from_secs(2));
//! let waits: Vec<Duration> = retry::policy(initial, max).build().take(10).collect();
//! assert!(waits[0] <= initial && waits[0] >= initial / 2);
//! assert!(waits.iter().all(|w| *w <= max));
//! // The bound has reached `max` by the sixth wait: 100, 200, 400, 800, 1600, 2000 ms.
//! assert!(waits[9] >= max / 2);
//! ```

use std::time::Duration;

pub use backon::{BackoffBuilder, ExponentialBuilder};

/// The backoff policy: waits from `initial` doubling to `max`, each drawn from the upper half of
/// its bound (see the [module's caps](self#the-caps)), without end.
///
/// `policy(..).build()` is an `Iterator<Item = Duration>` of the waits ([`BackoffBuilder`] must
/// be in scope; [`delays`] does it for you). A zero `initial` is taken as 1 ms, and a `max`
/// below `initial` as `initial`.
pub fn policy(initial: Duration, max: Duration) -> ExponentialBuilder {
    let initial = initial.max(Duration::from_millis(1));
    let max = max.max(initial);
    // backon's jitter adds up to one more bound to each wait (`[b, 2b)`), so it is given half of
    // each bound: the waits then lie in `[d / 2, d)`.
    ExponentialBuilder::new()
        .with_min_delay(initial / 2)
        .with_max_delay(max / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// The waits of [`policy`]`(initial, max)`, without end.
pub fn delays(initial: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    policy(initial, max).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn each_wait_lies_in_the_upper_half_of_its_doubling_bound_and_never_beyond_max() {
        let (initial, max) = (100 * MS, 2000 * MS);
        let bounds = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for seed in 0..200 {
            let waits: Vec<Duration> = policy(initial, max)
                .with_jitter_seed(seed)
                .build()
                .take(bounds.len())
                .collect();
            assert_eq!(waits.len(), bounds.len());
            for (wait, bound) in waits.iter().zip(bounds) {
                let bound = bound * MS;
                assert!(
                    *wait >= bound / 2 && *wait <= bound,
                    "{wait:?} for {bound:?}"
                );
            }
        }
    }

    #[test]
    fn the_policy_never_runs_out_of_attempts() {
        let mut waits = delays(10 * MS, 40 * MS);
        let last = waits.nth(10_000).expect("no maximum number of attempts");
        assert!(last >= 20 * MS && last <= 40 * MS, "{last:?}");
    }

    #[test]
    fn the_waits_are_jittered() {
        let first: Vec<Duration> = (0..20)
            .map(|seed| {
                policy(100 * MS, 2000 * MS)
                    .with_jitter_seed(seed)
                    .build()
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(first.iter().any(|w| *w != first[0]), "{first:?}");
    }

    #[test]
    fn a_zero_initial_or_a_max_below_initial_are_made_usable() {
        let wait = delays(Duration::ZERO, Duration::ZERO).next().unwrap();
        assert!(wait <= MS, "{wait:?}");
        let waits: Vec<Duration> = delays(100 * MS, 10 * MS).take(5).collect();
        assert!(
            waits.iter().all(|w| *w >= 50 * MS && *w <= 100 * MS),
            "{waits:?}"
        );
    }
}
