//! A twin's lifecycle beyond the seed's two words, and availability for real.
//!
//! # The lifecycle
//! ```text
//!             first update                 a window after binding
//!   unbound ───────────────▶ bound ─────────────────────────────▶ entangled ⇄ disentangled
//!      ▲                       │                                  (ODTE ≥ threshold or not)
//!      └───────────────────────┴──── no update for silence_threshold ──────┘
//! ```
//! - **unbound**: the twin mirrors nothing: it never had an update, or its device has been
//!   silent for longer than the silence threshold.
//! - **bound**: updates arrive again, but for less than one window: the ODTE is still ramping up
//!   (reliability counts a window that is not yet full), so it says nothing yet.
//! - **entangled** / **disentangled**: the ODTE at or above the threshold, or below it.
//!
//! The seed's `entangled`/`disentangled` of each digital state stays as the seed computes it, in
//! `digitalstate.lifecycle`; this lifecycle is the twin's, kept in the twin table.
//!
//! # Availability
//! With the optional `availability_max_gap` key (seconds), availability is the share of the
//! window `[t − window, t]` during which the twin could shadow its device: time that lies in a
//! gap between consecutive twin updates longer than `max_gap` — beyond its first `max_gap` — is
//! unavailable. Gaps are taken between successive updates (the last one before the window
//! included, so a gap that straddles the window's start counts from its real beginning) and from
//! the last update to `t`, so a silent device loses availability as time passes even though no
//! new state arrives. A twin without an update before the window counts as updated at the
//! window's start. Without the key, availability is the seed's constant 1.

use serde::{Deserialize, Serialize};

use crate::odte::SeedLifecycle;

/// The lifecycle of a twin (see the module documentation), kept in the twin table. Not the
/// seed's two-word [`SeedLifecycle`] of one digital state: that is the verdict of a single
/// evaluation, which moves this state machine between entangled and disentangled once the twin
/// has been bound for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TwinLifecycle {
    /// Mirrors nothing: never updated, or silent beyond the threshold.
    Unbound,
    /// Updated again for less than a window.
    Bound,
    /// ODTE ≥ threshold.
    Entangled,
    /// ODTE < threshold.
    Disentangled,
}

impl TwinLifecycle {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unbound => "unbound",
            Self::Bound => "bound",
            Self::Entangled => "entangled",
            Self::Disentangled => "disentangled",
        }
    }

    /// Parses the stored text.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "unbound" => Some(Self::Unbound),
            "bound" => Some(Self::Bound),
            "entangled" => Some(Self::Entangled),
            "disentangled" => Some(Self::Disentangled),
            _ => None,
        }
    }
}

/// Where a twin stood at its previous evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TwinPosition {
    /// Its lifecycle.
    pub lifecycle: TwinLifecycle,
    /// When it entered that lifecycle (ms).
    pub since_ms: i64,
    /// When it was last bound (ms), if ever.
    pub bound_ms: Option<i64>,
}

/// The next position of a twin evaluated at `t_ms`, whose latest update is `last_update_ms`
/// (none if it never had one), with the seed's `verdict` on this evaluation: unbound when
/// silent for longer than `silence_ms`, bound for less than `window_ms` after the update that
/// bound it, then entangled or disentangled as the verdict says. Taking the verdict, not the
/// ODTE, keeps the twin's lifecycle equal to the digital state's `lifecycle` word, also when the
/// ODTE is read back at the stored precision (an `f32` just below a threshold its `f64` reached).
pub fn next_position(
    previous: Option<TwinPosition>,
    t_ms: i64,
    last_update_ms: Option<i64>,
    verdict: SeedLifecycle,
    window_ms: i64,
    silence_ms: i64,
) -> TwinPosition {
    let at = |lifecycle, bound_ms| TwinPosition {
        lifecycle,
        since_ms: match previous {
            Some(p) if p.lifecycle == lifecycle => p.since_ms,
            _ => t_ms,
        },
        bound_ms,
    };
    let Some(last) = last_update_ms.filter(|last| t_ms.saturating_sub(*last) <= silence_ms) else {
        return at(TwinLifecycle::Unbound, previous.and_then(|p| p.bound_ms));
    };
    let bound_ms = match previous {
        Some(p) if p.lifecycle != TwinLifecycle::Unbound => p.bound_ms.unwrap_or(last),
        // Bound by the update that ended the silence (or the very first one).
        _ => last,
    };
    let lifecycle = if t_ms.saturating_sub(bound_ms) < window_ms {
        TwinLifecycle::Bound
    } else {
        match verdict {
            SeedLifecycle::Entangled => TwinLifecycle::Entangled,
            SeedLifecycle::Disentangled => TwinLifecycle::Disentangled,
        }
    };
    at(lifecycle, Some(bound_ms))
}

/// Availability at `t_ms` over `[t − window, t]`: the share of the window not lost in gaps
/// longer than `max_gap_ms` between successive `updates` (ascending twin timestamps, the last
/// one before the window included when there is one) and from the last update to `t`.
pub fn availability(updates: &[i64], t_ms: i64, window_ms: i64, max_gap_ms: i64) -> f64 {
    if window_ms <= 0 {
        return 1.0;
    }
    let start = t_ms.saturating_sub(window_ms);
    let first = updates.first().copied().unwrap_or(start).min(start);
    let points = std::iter::once(first)
        .chain(updates.iter().copied().filter(|u| *u > first && *u <= t_ms))
        .chain(std::iter::once(t_ms));
    let mut lost: i64 = 0;
    let mut previous: Option<i64> = None;
    for point in points {
        if let Some(a) = previous {
            // Unavailable from `a + max_gap` to `point`, clipped to the window.
            let from = a.saturating_add(max_gap_ms).max(start);
            let to = point.min(t_ms);
            if to > from {
                lost += to - from;
            }
        }
        previous = Some(point);
    }
    (1.0 - lost as f64 / window_ms as f64).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 30_000;
    const SILENCE: i64 = 60_000;

    fn step(previous: Option<TwinPosition>, t: i64, last: Option<i64>, odte: f64) -> TwinPosition {
        let verdict = SeedLifecycle::for_odte(odte, 0.9);
        next_position(previous, t, last, verdict, W, SILENCE)
    }

    #[test]
    fn a_twin_binds_then_entangles_a_window_later_and_unbinds_after_silence() {
        let p = step(None, 0, None, 0.0);
        assert_eq!(p.lifecycle, TwinLifecycle::Unbound);
        let p = step(Some(p), 1_000, Some(1_000), 0.1);
        assert_eq!(
            (p.lifecycle, p.since_ms, p.bound_ms),
            (TwinLifecycle::Bound, 1_000, Some(1_000))
        );
        let p = step(Some(p), 20_000, Some(20_000), 0.95);
        assert_eq!(
            p.lifecycle,
            TwinLifecycle::Bound,
            "a window has not passed since binding"
        );
        let p = step(Some(p), 31_000, Some(31_000), 0.95);
        assert_eq!(
            (p.lifecycle, p.since_ms),
            (TwinLifecycle::Entangled, 31_000)
        );
        let p = step(Some(p), 36_000, Some(36_000), 0.95);
        assert_eq!(p.since_ms, 31_000, "staying entangled keeps its start");
        let p = step(Some(p), 50_000, Some(36_000), 0.5);
        assert_eq!(p.lifecycle, TwinLifecycle::Disentangled);
        let p = step(Some(p), 36_000 + SILENCE, Some(36_000), 0.0);
        assert_eq!(
            p.lifecycle,
            TwinLifecycle::Disentangled,
            "silent exactly the threshold"
        );
        let p = step(Some(p), 36_001 + SILENCE, Some(36_000), 0.0);
        assert_eq!(p.lifecycle, TwinLifecycle::Unbound);
        // The device returns: bound anew, by the update that ended the silence.
        let back = 200_000;
        let p = step(Some(p), back, Some(back), 0.1);
        assert_eq!(
            (p.lifecycle, p.bound_ms),
            (TwinLifecycle::Bound, Some(back))
        );
        let p = step(Some(p), back + W, Some(back + W), 1.0);
        assert_eq!(p.lifecycle, TwinLifecycle::Entangled);
    }

    #[test]
    fn lifecycle_texts_round_trip() {
        for l in [
            TwinLifecycle::Unbound,
            TwinLifecycle::Bound,
            TwinLifecycle::Entangled,
            TwinLifecycle::Disentangled,
        ] {
            assert_eq!(TwinLifecycle::parse(l.as_str()), Some(l));
        }
        assert_eq!(TwinLifecycle::parse("Entangled"), None);
    }

    #[test]
    fn availability_is_the_share_of_the_window_outside_long_gaps() {
        // Updates every 5 s, max gap 10 s: fully available.
        let regular: Vec<i64> = (0..=12).map(|i| i * 5_000).collect();
        assert_eq!(availability(&regular, 60_000, W, 10_000), 1.0);
        // Silent since 40 s, evaluated at 60 s: 40 + 10 = 50 → 60 is lost, 10 s of 30.
        let silent: Vec<i64> = (0..=8).map(|i| i * 5_000).collect();
        let a = availability(&silent, 60_000, W, 10_000);
        assert!((a - 2.0 / 3.0).abs() < 1e-12, "{a}");
        // A gap straddling the window's start counts from its real beginning: updates at 20 s
        // and 45 s, window [30, 60]: lost 30..45 (the gap's part beyond 20 + 10), then none.
        let a = availability(&[20_000, 45_000, 55_000], 60_000, W, 10_000);
        assert!((a - 0.5).abs() < 1e-12, "{a}");
        // Silent for longer than the window: nothing left.
        assert_eq!(availability(&[0], 100_000, W, 10_000), 0.0);
        // A twin without any update counts from the window's start.
        let a = availability(&[], 60_000, W, 10_000);
        assert!((a - 1.0 / 3.0).abs() < 1e-12, "{a}");
    }
}
