//! One evaluation of a twin, pure: what the twin handler computes for a digital state (at the
//! state's time) and the twin evaluator for every twin (at the current time).
//!
//! The store reads a twin's window at the instant `t` of the evaluation, [`WindowFigures`]: the
//! counts of [`WindowStats`] and, when availability is measured (`availability_max_gap`), the
//! update times of [`UpdateTimes`]; it also reads where the twin stood ([`TwinPosition`]) and
//! its latest update. [`evaluate`] turns them into the evaluation (A, R, T, ODTE and the seed's
//! verdict), the twin's next position and its lifecycle change, if any; the store only writes
//! what it is given. A digital state evaluated before (a redelivery) is not evaluated again: its
//! stored evaluation moves the twin ([`Window::Evaluated`]), so a redelivery answers what the
//! first call stored and still completes a first call cut short before the twin was written.
//!
//! [`WindowFigures::reference`] reads the same figures from a list of states in memory: the
//! store's queries are tested against it, boundary by boundary.
//!
//! # Example
//! ```
//! use entwine_core::evaluation::{evaluate, UpdateTimes, Window, WindowFigures};
//! use entwine_core::odte::{OdteConfig, SeedLifecycle, WindowStats};
//! use entwine_core::twin::{TwinLifecycle, TwinPosition};
//!
//! let config = OdteConfig::seed_default();
//! let figures = WindowFigures { stats: WindowStats { states: 6, timely: 6 }, updates: None };
//! let bound = TwinPosition { lifecycle: TwinLifecycle::Bound, since_ms: 0, bound_ms: Some(0) };
//! // A window after binding, six timely states in 30 s: entangled.
//! let e = evaluate(&config, 30_000, Some(30_000), Window::Read(&figures), Some(bound));
//! assert_eq!(e.entanglement.odte, 1.0);
//! assert_eq!(e.entanglement.lifecycle, SeedLifecycle::Entangled);
//! assert_eq!(e.position.lifecycle, TwinLifecycle::Entangled);
//! assert_eq!(e.change.map(|c| c.to), Some(TwinLifecycle::Entangled));
//! ```

use crate::odte::{Entanglement, OdteConfig, WindowStats};
use crate::state::DigitalState;
use crate::twin::{availability, next_position, TwinLifecycle, TwinPosition};

/// A digital state as the window reads it: its twin timestamp, and the device timestamp of its
/// physical state (none when it has none: a seed row without `physicalstate_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedState {
    /// `digitalstate.timestamp` (ms).
    pub timestamp: i64,
    /// `physicalstate.device_timestamp` of its physical state (ms).
    pub device_timestamp: Option<i64>,
}

/// The twin's update times that availability needs at `t`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateTimes {
    /// The latest twin timestamp before the window's start `t − window`, if any: the gap that
    /// straddles the start counts from its real beginning.
    pub before_window: Option<i64>,
    /// Every twin timestamp in the window `[t − window, t]`, ascending (repeats kept).
    pub in_window: Vec<i64>,
}

/// What an evaluation reads of one twin's window at `t`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowFigures {
    /// States in `[t − window, t]` that have a physical state, and how many of them are timely.
    pub stats: WindowStats,
    /// The update times, read only when the configuration measures availability.
    pub updates: Option<UpdateTimes>,
}

impl WindowFigures {
    /// The figures of the window at `t_ms` over one device's `states`, computed in memory: the
    /// reference the store's queries must equal. The window is `[t − window_ms, t]`, both ends
    /// included; a state is timely when `timestamp − device_timestamp ≤ timeliness_ms`; only
    /// states with a physical state are counted, while every state is an update. The update
    /// times are read only when `config` measures availability, as the store does.
    pub fn reference(config: &OdteConfig, t_ms: i64, states: &[RecordedState]) -> Self {
        let (from, to) = config.window_of(t_ms);
        let limit = config.timeliness_ms();
        let mut stats = WindowStats::default();
        for state in states.iter().filter(|s| (from..=to).contains(&s.timestamp)) {
            if let Some(device) = state.device_timestamp {
                stats.states += 1;
                stats.timely += u64::from(state.timestamp.saturating_sub(device) <= limit);
            }
        }
        let updates = config.availability_max_gap_ms().map(|_| {
            let mut in_window: Vec<i64> = states
                .iter()
                .map(|s| s.timestamp)
                .filter(|t| (from..=to).contains(t))
                .collect();
            in_window.sort_unstable();
            UpdateTimes {
                before_window: states
                    .iter()
                    .map(|s| s.timestamp)
                    .filter(|t| *t < from)
                    .max(),
                in_window,
            }
        });
        Self { stats, updates }
    }
}

/// What an evaluation starts from.
#[derive(Debug, Clone, Copy)]
pub enum Window<'a> {
    /// The figures the store read: a fresh evaluation.
    Read(&'a WindowFigures),
    /// A digital state evaluated before (a redelivery, or a concurrent call that won): its
    /// stored figures and verdict stand, at the stored precision.
    Evaluated(&'a DigitalState),
}

/// A twin's lifecycle change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleChange {
    /// The lifecycle before (none for a new twin).
    pub from: Option<TwinLifecycle>,
    /// The lifecycle now.
    pub to: TwinLifecycle,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwinEvaluation {
    /// A, R, T, ODTE and the seed's verdict.
    pub entanglement: Entanglement,
    /// Where the twin stands now.
    pub position: TwinPosition,
    /// Its lifecycle change, when the position's lifecycle differs from the previous one.
    pub change: Option<LifecycleChange>,
}

/// Evaluates a twin at `t_ms`, whose latest update is `last_update_ms` (none if it never had
/// one) and whose previous position is `previous` (none for a twin without a row yet), from
/// `window`.
///
/// The ODTE is the seed's (see [`crate::odte`]), with availability measured from the update
/// times when `config` sets `availability_max_gap` ([`availability`]; the seed's 1 otherwise).
/// The next position is [`next_position`]'s, driven by the seed's verdict of this evaluation,
/// so the twin's entangled/disentangled is always the digital state's `lifecycle` word. Time
/// before the first update counts from the window's start when no update precedes the window.
pub fn evaluate(
    config: &OdteConfig,
    t_ms: i64,
    last_update_ms: Option<i64>,
    window: Window<'_>,
    previous: Option<TwinPosition>,
) -> TwinEvaluation {
    let entanglement = match window {
        Window::Read(figures) => {
            let a = match config.availability_max_gap_ms() {
                None => 1.0,
                Some(max_gap) => {
                    let updates = figures.updates.as_ref();
                    let times: Vec<i64> = updates
                        .and_then(|u| u.before_window)
                        .into_iter()
                        .chain(
                            updates
                                .into_iter()
                                .flat_map(|u| u.in_window.iter().copied()),
                        )
                        .collect();
                    availability(&times, t_ms, config.window_ms(), max_gap)
                }
            };
            config.evaluate_with(figures.stats, a)
        }
        Window::Evaluated(state) => Entanglement {
            availability: f64::from(state.availability),
            reliability: f64::from(state.reliability),
            timeliness: f64::from(state.timeliness),
            odte: f64::from(state.odte),
            lifecycle: state.lifecycle,
        },
    };
    let position = next_position(
        previous,
        t_ms,
        last_update_ms,
        entanglement.lifecycle,
        config.window_ms(),
        config.silence_ms(),
    );
    let from = previous.map(|p| p.lifecycle);
    TwinEvaluation {
        entanglement,
        position,
        change: (from != Some(position.lifecycle)).then_some(LifecycleChange {
            from,
            to: position.lifecycle,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::odte::SeedLifecycle;
    use crate::state::{DeviceId, PendingDigitalState};

    /// 1 update/s expected over a 10 s window, timely within 1 s, threshold 0.9, unbound after
    /// 30 s of silence; gaps beyond 2 s unavailable.
    fn measured() -> OdteConfig {
        OdteConfig::new(1.0, 10.0, 1.0, 0.9)
            .unwrap()
            .with_silence_threshold(Some(30.0))
            .unwrap()
            .with_availability_max_gap(Some(2.0))
            .unwrap()
    }

    fn at(lifecycle: TwinLifecycle, since_ms: i64, bound_ms: i64) -> Option<TwinPosition> {
        Some(TwinPosition {
            lifecycle,
            since_ms,
            bound_ms: Some(bound_ms),
        })
    }

    #[test]
    fn a_window_after_binding_the_verdict_decides_and_the_change_is_reported() {
        // Seed configuration, t = 30 s, bound at 0: 30 000 − 0 is not below the window.
        // Six states, five timely: R = min(1, 6 / (0.2·30)) = 1, T = 5/6, ODTE = 5/6 < 0.9.
        let figures = WindowFigures {
            stats: WindowStats {
                states: 6,
                timely: 5,
            },
            updates: None,
        };
        let config = OdteConfig::seed_default();
        let bound = at(TwinLifecycle::Bound, 0, 0);
        let e = evaluate(&config, 30_000, Some(30_000), Window::Read(&figures), bound);
        assert_eq!(e.entanglement.availability, 1.0);
        assert_eq!(e.entanglement.reliability, 1.0);
        assert_eq!(e.entanglement.timeliness, 5.0 / 6.0);
        assert_eq!(e.entanglement.odte, 5.0 / 6.0);
        assert_eq!(e.entanglement.lifecycle, SeedLifecycle::Disentangled);
        assert_eq!(
            e.position,
            TwinPosition {
                lifecycle: TwinLifecycle::Disentangled,
                since_ms: 30_000,
                bound_ms: Some(0)
            }
        );
        assert_eq!(
            e.change,
            Some(LifecycleChange {
                from: Some(TwinLifecycle::Bound),
                to: TwinLifecycle::Disentangled
            })
        );
        // One ms earlier the twin is still bound (29 999 < 30 000), whatever the ODTE.
        let e = evaluate(&config, 29_999, Some(29_999), Window::Read(&figures), bound);
        assert_eq!(e.position.lifecycle, TwinLifecycle::Bound);
        assert_eq!(e.position.since_ms, 0, "staying bound keeps its start");
        assert_eq!(e.change, None);
    }

    #[test]
    fn availability_counts_the_gap_from_the_last_update_before_the_window() {
        // t = 20 s, window [10 000, 20 000], max gap 2 000. Updates 7 500 (before), 11 000,
        // 12 000, 16 000, 20 000. Lost: 10 000 → 11 000 (the gap from 7 500 is beyond its
        // first 2 000 from 9 500, clipped to the window's start) = 1 000; 14 000 → 16 000 =
        // 2 000; 18 000 → 20 000 = 2 000. A = 1 − 5 000/10 000 = 0.5.
        // Four states, all timely: R = 4/10, T = 1, ODTE = 0.5 · 0.4 · 1 = 0.2.
        let mut figures = WindowFigures {
            stats: WindowStats {
                states: 4,
                timely: 4,
            },
            updates: Some(UpdateTimes {
                before_window: Some(7_500),
                in_window: vec![11_000, 12_000, 16_000, 20_000],
            }),
        };
        let config = measured();
        let entangled = at(TwinLifecycle::Entangled, 5_000, 0);
        let e = evaluate(
            &config,
            20_000,
            Some(20_000),
            Window::Read(&figures),
            entangled,
        );
        assert_eq!(e.entanglement.availability, 0.5);
        assert_eq!(e.entanglement.reliability, 0.4);
        assert_eq!(e.entanglement.timeliness, 1.0);
        assert_eq!(e.entanglement.odte, 0.5 * 0.4);
        assert_eq!(
            (
                e.position.lifecycle,
                e.position.since_ms,
                e.position.bound_ms
            ),
            (TwinLifecycle::Disentangled, 20_000, Some(0))
        );
        assert_eq!(
            e.change,
            Some(LifecycleChange {
                from: Some(TwinLifecycle::Entangled),
                to: TwinLifecycle::Disentangled
            })
        );
        // Without an update before the window the twin counts as updated at its start: the
        // first second is within the gap forgiven, A = 1 − 4 000/10 000 = 0.6.
        figures.updates.as_mut().unwrap().before_window = None;
        let e = evaluate(
            &config,
            20_000,
            Some(20_000),
            Window::Read(&figures),
            entangled,
        );
        assert_eq!(e.entanglement.availability, 0.6);
        // The same figures under a configuration without the key: the seed's A = 1.
        let seed_like = OdteConfig::new(1.0, 10.0, 1.0, 0.9).unwrap();
        let e = evaluate(
            &seed_like,
            20_000,
            Some(20_000),
            Window::Read(&figures),
            entangled,
        );
        assert_eq!(e.entanglement.availability, 1.0);
        assert_eq!(e.entanglement.odte, 0.4);
    }

    #[test]
    fn a_stored_evaluation_moves_the_twin_by_its_verdict_not_its_rounded_odte() {
        // ODTE 0.9 in f64 reaches the threshold 0.9; stored as REAL it is 0.899999976…, below
        // it. The stored verdict (entangled) decides, as it does for a fresh evaluation.
        let pending = PendingDigitalState {
            id: 7,
            physicalstate_id: 7,
            device_id: DeviceId::parse("device_id", "press-1").unwrap(),
            timestamp: 10_000,
            readings: crate::state::Readings::seed(20.0, 1.0),
        };
        let stored = DigitalState {
            pending,
            availability: 1.0,
            reliability: 0.9,
            timeliness: 1.0,
            odte: 0.9,
            lifecycle: SeedLifecycle::Entangled,
        };
        assert!(f64::from(stored.odte) < 0.9);
        let config = measured();
        let bound = at(TwinLifecycle::Bound, 0, 0);
        let e = evaluate(
            &config,
            10_000,
            Some(10_000),
            Window::Evaluated(&stored),
            bound,
        );
        assert_eq!(e.entanglement.odte, f64::from(0.9f32));
        assert_eq!(e.entanglement.reliability, f64::from(0.9f32));
        assert_eq!(e.entanglement.lifecycle, SeedLifecycle::Entangled);
        assert_eq!(e.position.lifecycle, TwinLifecycle::Entangled);
        // A fresh evaluation of the same window agrees: 9 of 10 expected, all timely.
        let figures = WindowFigures {
            stats: WindowStats {
                states: 9,
                timely: 9,
            },
            updates: Some(UpdateTimes {
                before_window: Some(0),
                in_window: (2..=10).map(|s| s * 1_000).collect(),
            }),
        };
        let fresh = evaluate(&config, 10_000, Some(10_000), Window::Read(&figures), bound);
        assert_eq!(fresh.entanglement.odte, 0.9);
        assert_eq!(fresh.position, e.position);
    }

    #[test]
    fn a_new_twin_is_bound_and_a_silent_one_unbound_past_the_threshold() {
        let config = measured();
        let one = WindowFigures {
            stats: WindowStats {
                states: 1,
                timely: 1,
            },
            updates: Some(UpdateTimes {
                before_window: None,
                in_window: vec![50_000],
            }),
        };
        let e = evaluate(&config, 50_000, Some(50_000), Window::Read(&one), None);
        // Window [40 000, 50 000] counted from its start: lost 42 000 → 50 000, so
        // A = 1 − 8 000/10 000 (0.2 up to the f64 rounding of 1 − 0.8); R = 1/10, T = 1.
        assert_eq!(e.entanglement.availability, 1.0 - 0.8);
        assert_eq!(e.entanglement.reliability, 0.1);
        assert_eq!(
            e.position,
            TwinPosition {
                lifecycle: TwinLifecycle::Bound,
                since_ms: 50_000,
                bound_ms: Some(50_000)
            }
        );
        assert_eq!(
            e.change,
            Some(LifecycleChange {
                from: None,
                to: TwinLifecycle::Bound
            })
        );
        // Silent since 50 000: at 80 000 (exactly the 30 s threshold) still disentangled,
        // at 80 001 unbound; an empty window evaluates to 0 with no availability left.
        let empty = WindowFigures {
            stats: WindowStats::default(),
            updates: Some(UpdateTimes {
                before_window: Some(50_000),
                in_window: vec![],
            }),
        };
        let entangled = at(TwinLifecycle::Entangled, 60_000, 0);
        let e = evaluate(
            &config,
            80_000,
            Some(50_000),
            Window::Read(&empty),
            entangled,
        );
        assert_eq!(e.entanglement.availability, 0.0);
        assert_eq!(e.entanglement.odte, 0.0);
        assert_eq!(
            (e.position.lifecycle, e.position.since_ms),
            (TwinLifecycle::Disentangled, 80_000)
        );
        let disentangled = Some(e.position);
        let e = evaluate(
            &config,
            80_001,
            Some(50_000),
            Window::Read(&empty),
            disentangled,
        );
        assert_eq!(
            e.position,
            TwinPosition {
                lifecycle: TwinLifecycle::Unbound,
                since_ms: 80_001,
                bound_ms: Some(0)
            }
        );
        assert_eq!(
            e.change,
            Some(LifecycleChange {
                from: Some(TwinLifecycle::Disentangled),
                to: TwinLifecycle::Unbound
            })
        );
        // Staying unbound is no change.
        let e = evaluate(
            &config,
            90_000,
            Some(50_000),
            Window::Read(&empty),
            Some(e.position),
        );
        assert_eq!((e.position.since_ms, e.change), (80_001, None));
    }

    #[test]
    fn the_reference_reads_every_boundary_of_the_window() {
        // t = 50 000, window [40 000, 50 000], timely within 1 000 ms.
        let state = |timestamp, device_timestamp| RecordedState {
            timestamp,
            device_timestamp,
        };
        let states = [
            state(39_000, Some(38_990)), // before the window, not the last one before it
            state(39_999, Some(39_990)), // 1 ms outside: the last update before the window
            state(40_000, Some(39_000)), // exactly at the start, elapsed exactly 1 000: timely
            state(40_001, Some(39_000)), // 1 ms inside, elapsed 1 001: late
            state(45_000, None),         // no physical state: an update, not counted
            state(50_000, Some(49_990)), // exactly at t, timely
            state(50_001, Some(50_000)), // 1 ms after t
        ];
        assert_eq!(
            WindowFigures::reference(&measured(), 50_000, &states),
            WindowFigures {
                stats: WindowStats {
                    states: 3,
                    timely: 2
                },
                updates: Some(UpdateTimes {
                    before_window: Some(39_999),
                    in_window: vec![40_000, 40_001, 45_000, 50_000],
                }),
            }
        );
        // Without the availability key the update times are not read.
        let seed_like = OdteConfig::new(1.0, 10.0, 1.0, 0.9).unwrap();
        assert_eq!(
            WindowFigures::reference(&seed_like, 50_000, &states).updates,
            None
        );
    }
}
