//! The ODTE engine: how faithfully a twin mirrors its device (availability × reliability ×
//! timeliness), with the seed system's formulas.
//!
//! For a pending digital state of device *d* at shadow time *t* (ms), the window is every digital
//! state of *d* with `timestamp` in `[t − window·1000, t]`, the current one included. For each,
//! `elapsed = digital timestamp − physical device_timestamp`. Then
//! - availability `A = 1` (the seed has no model for it);
//! - reliability `R = min(1, n / (expected_update_rate · window))`;
//! - timeliness `T = (states with elapsed ≤ desired_timeliness·1000) / n`, `0` when `n = 0`;
//! - `ODTE = A·R·T`, and the twin is `entangled` when `ODTE ≥ threshold`.
//!
//! The store counts the window (it holds the history); [`WindowStats::of`] is the same count
//! over states in memory, and [`crate::evaluation::WindowFigures::reference`] the whole of what
//! an evaluation reads, the reference the store's queries are tested against.

use serde::Serialize;

/// The ODTE configuration: the keys of the seed's `odte` ConfigMap, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OdteConfig {
    expected_update_rate: f64,
    time_window_s: f64,
    desired_timeliness_s: f64,
    threshold: f64,
    availability_max_gap_s: Option<f64>,
    silence_threshold_s: Option<f64>,
}

/// A configuration value that would make the ODTE meaningless.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OdteConfigError {
    /// `expected_update_rate` must be a finite number above zero (it divides).
    #[error("expected_update_rate must be a finite number above 0 (updates per second), got {0}")]
    UpdateRate(f64),
    /// `time_window` must be a finite number of seconds above zero (it divides).
    #[error("time_window must be a finite number of seconds above 0, got {0}")]
    TimeWindow(f64),
    /// `desired_timeliness` must be a finite, non-negative number of seconds.
    #[error("desired_timeliness must be a finite number of seconds, 0 or more, got {0}")]
    DesiredTimeliness(f64),
    /// `threshold` must lie in [0, 1], the range of the ODTE.
    #[error("threshold must be a number in [0, 1], got {0}")]
    Threshold(f64),
    /// `availability_max_gap` must be a finite number of seconds, 0 or more.
    #[error("availability_max_gap must be a finite number of seconds, 0 or more, got {0}")]
    AvailabilityMaxGap(f64),
    /// `silence_threshold` must be a finite number of seconds above 0.
    #[error("silence_threshold must be a finite number of seconds above 0, got {0}")]
    SilenceThreshold(f64),
}

impl OdteConfig {
    /// Validates a configuration: rates and windows in seconds, as in the seed's ConfigMap.
    pub fn new(
        expected_update_rate: f64,
        time_window_s: f64,
        desired_timeliness_s: f64,
        threshold: f64,
    ) -> Result<Self, OdteConfigError> {
        if !(expected_update_rate.is_finite() && expected_update_rate > 0.0) {
            return Err(OdteConfigError::UpdateRate(expected_update_rate));
        }
        // The window in ms must be at least one whole millisecond and fit an i64.
        if !(0.001..9.0e12).contains(&time_window_s) {
            return Err(OdteConfigError::TimeWindow(time_window_s));
        }
        if !(desired_timeliness_s.is_finite() && (0.0..9.0e12).contains(&desired_timeliness_s)) {
            return Err(OdteConfigError::DesiredTimeliness(desired_timeliness_s));
        }
        if !(0.0..=1.0).contains(&threshold) {
            return Err(OdteConfigError::Threshold(threshold));
        }
        Ok(Self {
            expected_update_rate,
            time_window_s,
            desired_timeliness_s,
            threshold,
            availability_max_gap_s: None,
            silence_threshold_s: None,
        })
    }

    /// The same configuration with availability defined (see [`crate::twin`]): time in gaps
    /// between twin updates longer than `max_gap_s` seconds is unavailable. `None` keeps the
    /// seed's constant availability of 1.
    pub fn with_availability_max_gap(
        self,
        max_gap_s: Option<f64>,
    ) -> Result<Self, OdteConfigError> {
        if let Some(gap) = max_gap_s {
            if !(gap.is_finite() && (0.0..9.0e12).contains(&gap)) {
                return Err(OdteConfigError::AvailabilityMaxGap(gap));
            }
        }
        Ok(Self {
            availability_max_gap_s: max_gap_s,
            ..self
        })
    }

    /// The same configuration with a silence threshold: a twin without an update for longer
    /// than `silence_s` seconds is unbound. `None` means twice the window.
    pub fn with_silence_threshold(self, silence_s: Option<f64>) -> Result<Self, OdteConfigError> {
        if let Some(silence) = silence_s {
            if !(silence.is_finite() && silence > 0.0 && silence < 9.0e12) {
                return Err(OdteConfigError::SilenceThreshold(silence));
            }
        }
        Ok(Self {
            silence_threshold_s: silence_s,
            ..self
        })
    }

    /// The availability gap in whole ms, when availability is defined.
    pub fn availability_max_gap_ms(&self) -> Option<i64> {
        self.availability_max_gap_s
            .map(|gap| (gap * 1000.0).floor() as i64)
    }

    /// The silence threshold in whole ms (twice the window unless configured).
    pub fn silence_ms(&self) -> i64 {
        match self.silence_threshold_s {
            Some(silence) => (silence * 1000.0).floor() as i64,
            None => self.window_ms().saturating_mul(2),
        }
    }

    /// The seed's ConfigMap: `expected_update_rate` 0.2, `time_window` 30, `desired_timeliness` 1,
    /// `threshold` 0.9.
    pub fn seed_default() -> Self {
        Self {
            expected_update_rate: 0.2,
            time_window_s: 30.0,
            desired_timeliness_s: 1.0,
            threshold: 0.9,
            availability_max_gap_s: None,
            silence_threshold_s: None,
        }
    }

    /// Expected updates per second.
    pub fn expected_update_rate(&self) -> f64 {
        self.expected_update_rate
    }

    /// Window length in seconds.
    pub fn time_window_s(&self) -> f64 {
        self.time_window_s
    }

    /// Desired timeliness in seconds.
    pub fn desired_timeliness_s(&self) -> f64 {
        self.desired_timeliness_s
    }

    /// Lifecycle threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The window in whole ms: a state at integer time `s` is in the window of `t` when
    /// `s ≥ t − window·1000`, that is `s ≥ t − floor(window·1000)`.
    pub fn window_ms(&self) -> i64 {
        // In range: time_window_s < 9e12 was checked, so the product is below 2^63.
        (self.time_window_s * 1000.0).floor() as i64
    }

    /// The desired timeliness in whole ms: an integer `elapsed` is timely when
    /// `elapsed ≤ desired·1000`, that is `elapsed ≤ floor(desired·1000)`.
    pub fn timeliness_ms(&self) -> i64 {
        (self.desired_timeliness_s * 1000.0).floor() as i64
    }

    /// The window of a state at shadow time `t_ms`: `[t − window, t]`, both ends included.
    pub fn window_of(&self, t_ms: i64) -> (i64, i64) {
        (t_ms.saturating_sub(self.window_ms()), t_ms)
    }

    /// Evaluates a window with the seed's availability of 1.
    pub fn evaluate(&self, stats: WindowStats) -> Entanglement {
        self.evaluate_with(stats, 1.0)
    }

    /// Evaluates a window whose availability was measured (see [`crate::twin::availability`]).
    pub fn evaluate_with(&self, stats: WindowStats, availability: f64) -> Entanglement {
        let n = stats.states as f64;
        let reliability = (n / (self.expected_update_rate * self.time_window_s)).min(1.0);
        let timeliness = if stats.states == 0 {
            0.0
        } else {
            stats.timely.min(stats.states) as f64 / n
        };
        let odte = availability * reliability * timeliness;
        Entanglement {
            availability,
            reliability,
            timeliness,
            odte,
            lifecycle: SeedLifecycle::for_odte(odte, self.threshold),
        }
    }
}

/// The counts the ODTE needs from a twin's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowStats {
    /// `n`: digital states in the window, the current one included.
    pub states: u64,
    /// States whose elapsed time is within the desired timeliness.
    pub timely: u64,
}

impl WindowStats {
    /// Counts the window of shadow time `t_ms` over `(digital timestamp, device timestamp)`
    /// pairs of one device, as the store's query does.
    pub fn of(
        config: &OdteConfig,
        t_ms: i64,
        states: impl IntoIterator<Item = (i64, i64)>,
    ) -> Self {
        let (from, to) = config.window_of(t_ms);
        let limit = config.timeliness_ms();
        states
            .into_iter()
            .filter(|(digital, _)| (from..=to).contains(digital))
            .fold(Self::default(), |acc, (digital, device)| Self {
                states: acc.states + 1,
                timely: acc.timely + u64::from(digital.saturating_sub(device) <= limit),
            })
    }
}

/// The evaluation of one digital state, at full precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entanglement {
    /// A.
    pub availability: f64,
    /// R.
    pub reliability: f64,
    /// T.
    pub timeliness: f64,
    /// A·R·T.
    pub odte: f64,
    /// Entangled when ODTE ≥ threshold.
    pub lifecycle: SeedLifecycle,
}

/// The seed's verdict on one evaluation: entangled when ODTE ≥ threshold. It is the
/// `lifecycle` of a digital state (`digitalstate.lifecycle`, the twin handler's answer), always
/// one of these two words, as in the seed.
///
/// Not to be confused with the twin's own lifecycle, [`crate::twin::TwinLifecycle`] (unbound,
/// bound, entangled, disentangled; the twin table): that one is a state machine over time, which
/// this verdict drives once the twin has been bound for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedLifecycle {
    /// ODTE ≥ threshold.
    Entangled,
    /// ODTE < threshold.
    Disentangled,
}

impl SeedLifecycle {
    /// The lifecycle of an ODTE value under `threshold`.
    pub fn for_odte(odte: f64, threshold: f64) -> Self {
        if odte >= threshold {
            Self::Entangled
        } else {
            Self::Disentangled
        }
    }

    /// Parses the stored text (`entangled`, `disentangled`).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "entangled" => Some(Self::Entangled),
            "disentangled" => Some(Self::Disentangled),
            _ => None,
        }
    }

    /// The stored text.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Entangled => "entangled",
            Self::Disentangled => "disentangled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_or_negative_rates_and_windows_are_configuration_errors() {
        assert_eq!(
            OdteConfig::new(0.0, 30.0, 1.0, 0.9),
            Err(OdteConfigError::UpdateRate(0.0))
        );
        assert_eq!(
            OdteConfig::new(-0.2, 30.0, 1.0, 0.9),
            Err(OdteConfigError::UpdateRate(-0.2))
        );
        assert!(matches!(
            OdteConfig::new(f64::NAN, 30.0, 1.0, 0.9),
            Err(OdteConfigError::UpdateRate(_))
        ));
        assert_eq!(
            OdteConfig::new(0.2, 0.0, 1.0, 0.9),
            Err(OdteConfigError::TimeWindow(0.0))
        );
        assert_eq!(
            OdteConfig::new(0.2, -30.0, 1.0, 0.9),
            Err(OdteConfigError::TimeWindow(-30.0))
        );
        assert_eq!(
            OdteConfig::new(0.2, 30.0, -1.0, 0.9),
            Err(OdteConfigError::DesiredTimeliness(-1.0))
        );
        assert_eq!(
            OdteConfig::new(0.2, 30.0, 1.0, 1.1),
            Err(OdteConfigError::Threshold(1.1))
        );
        assert_eq!(
            OdteConfig::new(0.2, 30.0, 1.0, 0.9),
            Ok(OdteConfig::seed_default())
        );
    }

    #[test]
    fn an_empty_window_has_zero_timeliness_and_reliability() {
        let e = OdteConfig::seed_default().evaluate(WindowStats::default());
        assert_eq!(e.timeliness, 0.0);
        assert_eq!(e.reliability, 0.0);
        assert_eq!(e.odte, 0.0);
        assert_eq!(e.lifecycle, SeedLifecycle::Disentangled);
    }

    #[test]
    fn a_new_twin_needs_a_full_window_to_become_entangled() {
        let config = OdteConfig::seed_default();
        for n in 1..6 {
            let e = config.evaluate(WindowStats {
                states: n,
                timely: n,
            });
            assert_eq!(e.lifecycle, SeedLifecycle::Disentangled, "n = {n}");
        }
        let e = config.evaluate(WindowStats {
            states: 6,
            timely: 6,
        });
        assert_eq!(e.odte, 1.0);
        assert_eq!(e.lifecycle, SeedLifecycle::Entangled);
    }

    #[test]
    fn the_lifecycle_flips_exactly_at_the_threshold() {
        // Timeliness 9/10 = 0.9 exactly in f64, as is the threshold: entangled.
        let config = OdteConfig::new(1.0, 10.0, 1.0, 0.9).unwrap();
        let at = config.evaluate(WindowStats {
            states: 10,
            timely: 9,
        });
        assert_eq!(at.odte, 0.9);
        assert_eq!(at.lifecycle, SeedLifecycle::Entangled);
        let below = config.evaluate(WindowStats {
            states: 10,
            timely: 8,
        });
        assert_eq!(below.lifecycle, SeedLifecycle::Disentangled);
        assert_eq!(SeedLifecycle::for_odte(0.9, 0.9), SeedLifecycle::Entangled);
        assert_eq!(
            SeedLifecycle::for_odte(0.9 - f64::EPSILON, 0.9),
            SeedLifecycle::Disentangled
        );
    }

    #[test]
    fn window_bounds_include_both_ends_and_use_whole_milliseconds() {
        let config = OdteConfig::new(0.2, 30.0, 1.0, 0.9).unwrap();
        assert_eq!(config.window_of(100_000), (70_000, 100_000));
        // 0.0015 s = 1.5 ms: a state 1 ms back is in, 2 ms back is out.
        let tiny = OdteConfig::new(1.0, 0.0015, 0.0015, 0.5).unwrap();
        let stats = WindowStats::of(&tiny, 10, [(10, 9), (9, 7), (8, 8)]);
        assert_eq!(
            stats,
            WindowStats {
                states: 2,
                timely: 1
            }
        );
    }

    /// A golden sequence, worked out by hand from the seed's formulas with the seed's ConfigMap
    /// (rate 0.2/s, window 30 s, desired timeliness 1 s, threshold 0.9). One event every 5 s;
    /// `elapsed` is shadow time minus device time.
    ///
    /// | # | device t | shadow t | elapsed | window [t−30000, t] holds | n | timely | R     | T     | ODTE  | lifecycle    |
    /// |---|----------|----------|---------|---------------------------|---|--------|-------|-------|-------|--------------|
    /// | 1 | 0        | 100      | 100     | 1                         | 1 | 1      | 1/6   | 1     | 1/6   | disentangled |
    /// | 2 | 5000     | 5200     | 200     | 1,2                       | 2 | 2      | 2/6   | 1     | 1/3   | disentangled |
    /// | 3 | 10000    | 11500    | 1500    | 1-3                       | 3 | 2      | 3/6   | 2/3   | 1/3   | disentangled |
    /// | 4 | 15000    | 15050    | 50      | 1-4                       | 4 | 3      | 4/6   | 3/4   | 1/2   | disentangled |
    /// | 5 | 20000    | 21000    | 1000    | 1-5                       | 5 | 4      | 5/6   | 4/5   | 2/3   | disentangled |
    /// | 6 | 25000    | 25010    | 10      | 1-6                       | 6 | 5      | 1     | 5/6   | 5/6   | disentangled |
    /// | 7 | 30000    | 30020    | 20      | 1-7 (100 ≥ 20)            | 7 | 6      | 1     | 6/7   | 6/7   | disentangled |
    /// | 8 | 35000    | 35100    | 100     | 2-8 (100 < 5100)          | 7 | 6      | 1     | 6/7   | 6/7   | disentangled |
    /// | 9 | 40000    | 40300    | 300     | 3-9 (5200 < 10300)        | 7 | 6      | 1     | 6/7   | 6/7   | disentangled |
    /// | 10| 45000    | 45200    | 200     | 5-10 (15050 < 15200)      | 6 | 6      | 1     | 1     | 1     | entangled    |
    pub(crate) const GOLDEN: [(i64, i64, f64, f64, f64, SeedLifecycle); 10] = {
        use SeedLifecycle::{Disentangled as D, Entangled as E};
        [
            (0, 100, 1.0 / 6.0, 1.0, 1.0 / 6.0, D),
            (5000, 5200, 2.0 / 6.0, 1.0, 2.0 / 6.0, D),
            (10000, 11500, 3.0 / 6.0, 2.0 / 3.0, 1.0 / 3.0, D),
            (15000, 15050, 4.0 / 6.0, 3.0 / 4.0, 1.0 / 2.0, D),
            (20000, 21000, 5.0 / 6.0, 4.0 / 5.0, 2.0 / 3.0, D),
            (25000, 25010, 1.0, 5.0 / 6.0, 5.0 / 6.0, D),
            (30000, 30020, 1.0, 6.0 / 7.0, 6.0 / 7.0, D),
            (35000, 35100, 1.0, 6.0 / 7.0, 6.0 / 7.0, D),
            (40000, 40300, 1.0, 6.0 / 7.0, 6.0 / 7.0, D),
            (45000, 45200, 1.0, 1.0, 1.0, E),
        ]
    };

    #[test]
    fn the_golden_sequence_gives_the_hand_worked_values_event_by_event() {
        let config = OdteConfig::seed_default();
        let mut history = Vec::new();
        for (i, &(device, shadow, r, t, odte, lifecycle)) in GOLDEN.iter().enumerate() {
            history.push((shadow, device));
            let e = config.evaluate(WindowStats::of(&config, shadow, history.iter().copied()));
            let row = i + 1;
            assert_eq!(e.availability, 1.0, "row {row}");
            assert!(
                (e.reliability - r).abs() < 1e-12,
                "row {row}: R = {}",
                e.reliability
            );
            assert!(
                (e.timeliness - t).abs() < 1e-12,
                "row {row}: T = {}",
                e.timeliness
            );
            assert!(
                (e.odte - odte).abs() < 1e-12,
                "row {row}: ODTE = {}",
                e.odte
            );
            assert_eq!(e.lifecycle, lifecycle, "row {row}");
        }
    }

    fn any_config() -> impl Strategy<Value = OdteConfig> {
        (
            0.001f64..100.0,
            0.001f64..3600.0,
            0.0f64..60.0,
            0.0f64..=1.0,
        )
            .prop_map(|(r, w, d, th)| OdteConfig::new(r, w, d, th).expect("valid ranges"))
    }

    proptest! {
        #[test]
        fn every_figure_is_in_the_unit_interval_and_odte_is_their_product(
            config in any_config(),
            states in 0u64..100_000,
            timely_fraction in 0.0f64..=1.0,
        ) {
            let timely = (states as f64 * timely_fraction).floor() as u64;
            let e = config.evaluate(WindowStats { states, timely });
            for v in [e.availability, e.reliability, e.timeliness, e.odte] {
                prop_assert!((0.0..=1.0).contains(&v), "{v} out of [0, 1]");
            }
            prop_assert_eq!(e.odte, e.availability * e.reliability * e.timeliness);
            prop_assert_eq!(e.lifecycle, SeedLifecycle::for_odte(e.odte, config.threshold()));
        }

        #[test]
        fn reliability_is_capped_at_one_and_grows_with_the_count(
            config in any_config(),
            states in 0u64..10_000,
        ) {
            let r = |n| config.evaluate(WindowStats { states: n, timely: n }).reliability;
            prop_assert!(r(states) <= 1.0);
            prop_assert!(r(states) <= r(states + 1));
            let expected = config.expected_update_rate() * config.time_window_s();
            if states as f64 >= expected {
                prop_assert_eq!(r(states), 1.0);
            }
        }

        #[test]
        fn the_window_never_counts_states_outside_it_and_order_does_not_matter(
            config in any_config(),
            t in 0i64..10_000_000,
            mut states in proptest::collection::vec((0i64..10_000_000, 0i64..10_000_000), 0..60),
        ) {
            let stats = WindowStats::of(&config, t, states.iter().copied());
            let (from, to) = config.window_of(t);
            let inside = states.iter().filter(|(d, _)| *d >= from && *d <= to).count() as u64;
            prop_assert_eq!(stats.states, inside);
            prop_assert!(stats.timely <= stats.states);
            states.reverse();
            prop_assert_eq!(WindowStats::of(&config, t, states.iter().copied()), stats);
        }
    }
}
