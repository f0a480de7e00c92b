//! Fault injection: added delay with jitter, message loss and clock skew, fleet-wide or per
//! device, with presets for the levels of the Purdue model, switchable at run time
//! (`PUT /faults`).
//!
//! A device draws one [`Decision`] per message from its [`Faults`]: the message is lost (not
//! published, counted in `dropped_by_faults`), or published after a delay drawn uniformly from
//! `[delay − jitter, delay + jitter]` (clamped at 0). A delayed message keeps the timestamp it was
//! created with, so the delay shows up downstream as latency; since each message draws its own
//! delay, jitter may reorder one device's messages, as a real network may. The clock skew is
//! added to the timestamps the device writes into its payloads: its clock is off by that much.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use entwine_core::input::{Fields, InputError};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest delay a message may be given, `delayMs + jitterMs`, in ms (one minute).
pub const MAX_DELAY_MS: f64 = 60_000.0;
/// Largest clock skew, either way, in ms (one day).
pub const MAX_CLOCK_SKEW_MS: i64 = 24 * 3600 * 1000;

/// The faults of one device (or of the fleet): all zero, the default, is no fault at all.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Faults {
    /// Mean added delay, ms.
    pub delay_ms: f64,
    /// Half-width of the delay's uniform spread, ms: the delay is drawn from
    /// `[delay_ms − jitter_ms, delay_ms + jitter_ms]`, clamped at 0.
    pub jitter_ms: f64,
    /// Probability that a message is lost, in `[0, 1]`.
    pub loss: f64,
    /// How far the device's clock is off, ms (added to payload timestamps; may be negative).
    pub clock_skew_ms: i64,
}

/// What happens to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// The message is lost: not published at all.
    pub drop: bool,
    /// How long after its creation it is published.
    pub delay: Duration,
    /// Added to the payload's timestamp, ms.
    pub skew_ms: i64,
}

impl Faults {
    /// No fault.
    pub const NONE: Self = Self {
        delay_ms: 0.0,
        jitter_ms: 0.0,
        loss: 0.0,
        clock_skew_ms: 0,
    };

    /// Whether these are no faults at all, so that a message needs no decision.
    pub fn is_none(&self) -> bool {
        self.delay_ms == 0.0 && self.jitter_ms == 0.0 && self.loss == 0.0 && self.clock_skew_ms == 0
    }

    /// Checks every value, naming the field (`delayMs`, `jitterMs`, `loss`, `clockSkewMs`) of the
    /// first bad one.
    pub fn validate(&self) -> Result<(), InputError> {
        for (field, value) in [("delayMs", self.delay_ms), ("jitterMs", self.jitter_ms)] {
            if !value.is_finite() || value < 0.0 {
                return Err(InputError::new(
                    field,
                    format!("{value} is not a non-negative number of milliseconds"),
                ));
            }
        }
        if self.delay_ms + self.jitter_ms > MAX_DELAY_MS {
            let field = if self.jitter_ms > self.delay_ms {
                "jitterMs"
            } else {
                "delayMs"
            };
            return Err(InputError::new(
                field,
                format!(
                    "delayMs + jitterMs = {} is above {MAX_DELAY_MS} ms",
                    self.delay_ms + self.jitter_ms
                ),
            ));
        }
        if !(self.loss.is_finite() && (0.0..=1.0).contains(&self.loss)) {
            return Err(InputError::new(
                "loss",
                format!("{} is not a probability between 0 and 1", self.loss),
            ));
        }
        if self.clock_skew_ms.unsigned_abs() > MAX_CLOCK_SKEW_MS.unsigned_abs() {
            return Err(InputError::new(
                "clockSkewMs",
                format!(
                    "{} is beyond ±{MAX_CLOCK_SKEW_MS} ms (one day)",
                    self.clock_skew_ms
                ),
            ));
        }
        Ok(())
    }

    /// Decides the fate of one message. Draws nothing from `rng` when there is neither loss nor
    /// jitter. Out-of-range values (these fields are public) are clamped, never a panic.
    pub fn decide(&self, rng: &mut impl Rng) -> Decision {
        let drop = self.loss > 0.0 && rng.random::<f64>() < self.loss;
        let mut delay_ms = self.delay_ms;
        if self.jitter_ms > 0.0 {
            let u: f64 = rng.random();
            delay_ms += self.jitter_ms * (2.0 * u - 1.0);
        }
        let delay_ms = if delay_ms.is_finite() {
            delay_ms.clamp(0.0, MAX_DELAY_MS)
        } else {
            0.0
        };
        Decision {
            drop,
            delay: Duration::try_from_secs_f64(delay_ms / 1000.0).unwrap_or_default(),
            skew_ms: self.clock_skew_ms,
        }
    }

    /// The faults a `PUT /faults` body describes: a `preset`, explicit fields (`delayMs`,
    /// `jitterMs`, `loss`, `clockSkewMs`), or both (the fields then override the preset's).
    /// Fields not given are the preset's, or 0 without a preset. Keys in `ignore` are left to the
    /// caller; any other key is refused, naming it.
    pub fn from_json(body: &Map<String, Value>, ignore: &[&str]) -> Result<Self, InputError> {
        let fields = Fields::new(body);
        let mut faults = match fields.optional("preset") {
            Some(_) => fields.string("preset")?.parse::<Preset>()?.faults(),
            None => Self::NONE,
        };
        for key in body.keys() {
            match key.as_str() {
                "preset" => {}
                "delayMs" => faults.delay_ms = fields.number(key)?,
                "jitterMs" => faults.jitter_ms = fields.number(key)?,
                "loss" => faults.loss = fields.number(key)?,
                "clockSkewMs" => faults.clock_skew_ms = fields.integer(key)?,
                other if ignore.contains(&other) => {}
                other => {
                    return Err(InputError::new(
                        other,
                        "unknown key; PUT /faults takes preset, delayMs, jitterMs, loss, clockSkewMs and device",
                    ))
                }
            }
        }
        faults.validate()?;
        Ok(faults)
    }
}

/// Named fault levels after the Purdue model: the network between a device and the platform at
/// level 0/1 (field devices and controllers), 2 (supervisory) or 3 (operations), in a nominal,
/// deteriorated (latency and jitter doubled, 5 % loss) or critical (15 % loss) condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// `layer0-1`: 2.5 ± 2.5 ms.
    Layer01,
    /// `layer2`: 12.5 ± 7.5 ms.
    Layer2,
    /// `layer3`: 35 ± 15 ms.
    Layer3,
    /// `layer0-1-deteriorated`: 5 ± 5 ms, 5 % loss.
    Layer01Deteriorated,
    /// `layer2-deteriorated`: 25 ± 15 ms, 5 % loss.
    Layer2Deteriorated,
    /// `layer3-deteriorated`: 70 ± 30 ms, 5 % loss.
    Layer3Deteriorated,
    /// `layer0-1-critical`: 12.5 ± 12.5 ms, 15 % loss.
    Layer01Critical,
    /// `layer2-critical`: 50 ± 30 ms, 15 % loss.
    Layer2Critical,
    /// `layer3-critical`: 175 ± 75 ms, 15 % loss.
    Layer3Critical,
    /// `none`: no fault.
    None,
}

impl Preset {
    /// Every preset, in the order of the documentation.
    pub const ALL: [Self; 10] = [
        Self::Layer01,
        Self::Layer2,
        Self::Layer3,
        Self::Layer01Deteriorated,
        Self::Layer2Deteriorated,
        Self::Layer3Deteriorated,
        Self::Layer01Critical,
        Self::Layer2Critical,
        Self::Layer3Critical,
        Self::None,
    ];

    /// Its name, as `--faults` and `PUT /faults` take it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Layer01 => "layer0-1",
            Self::Layer2 => "layer2",
            Self::Layer3 => "layer3",
            Self::Layer01Deteriorated => "layer0-1-deteriorated",
            Self::Layer2Deteriorated => "layer2-deteriorated",
            Self::Layer3Deteriorated => "layer3-deteriorated",
            Self::Layer01Critical => "layer0-1-critical",
            Self::Layer2Critical => "layer2-critical",
            Self::Layer3Critical => "layer3-critical",
            Self::None => "none",
        }
    }

    /// Its faults: `(delay ± jitter ms, loss)`, no clock skew.
    pub fn faults(self) -> Faults {
        let (delay_ms, jitter_ms, loss) = match self {
            Self::Layer01 => (2.5, 2.5, 0.0),
            Self::Layer2 => (12.5, 7.5, 0.0),
            Self::Layer3 => (35.0, 15.0, 0.0),
            Self::Layer01Deteriorated => (5.0, 5.0, 0.05),
            Self::Layer2Deteriorated => (25.0, 15.0, 0.05),
            Self::Layer3Deteriorated => (70.0, 30.0, 0.05),
            Self::Layer01Critical => (12.5, 12.5, 0.15),
            Self::Layer2Critical => (50.0, 30.0, 0.15),
            Self::Layer3Critical => (175.0, 75.0, 0.15),
            Self::None => (0.0, 0.0, 0.0),
        };
        Faults {
            delay_ms,
            jitter_ms,
            loss,
            clock_skew_ms: 0,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = InputError;

    fn from_str(name: &str) -> Result<Self, InputError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                InputError::new(
                    "preset",
                    format!(
                        "unknown preset {name:?}, expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// The faults of a fleet: fleet-wide, and per device where a device has its own.
///
/// Serialized as `GET /faults` answers it: `{"fleet": {…}, "devices": {"<id>": {…}}}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultPlan {
    /// The faults of every device without its own.
    pub fleet: Faults,
    /// Devices with their own faults, which replace the fleet's for them.
    pub devices: BTreeMap<String, Faults>,
}

impl FaultPlan {
    /// The same faults for the whole fleet.
    pub fn fleet(faults: Faults) -> Self {
        Self {
            fleet: faults,
            devices: BTreeMap::new(),
        }
    }

    /// The faults of device `id`.
    pub fn for_device(&self, id: &str) -> Faults {
        self.devices.get(id).copied().unwrap_or(self.fleet)
    }

    /// Whether no device has any fault.
    pub fn is_none(&self) -> bool {
        self.fleet.is_none() && self.devices.values().all(Faults::is_none)
    }

    /// Checks every value, naming the field (`fleet.loss`, `devices.<id>.delayMs`).
    pub fn validate(&self) -> Result<(), InputError> {
        let prefixed = |prefix: String, e: InputError| {
            InputError::new(format!("{prefix}.{}", e.field), e.reason)
        };
        self.fleet
            .validate()
            .map_err(|e| prefixed("fleet".into(), e))?;
        for (id, faults) in &self.devices {
            faults
                .validate()
                .map_err(|e| prefixed(format!("devices.{id}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use serde_json::json;

    #[test]
    fn presets_are_the_numbers_of_the_purdue_levels() {
        let table = [
            ("layer0-1", 2.5, 2.5, 0.0),
            ("layer2", 12.5, 7.5, 0.0),
            ("layer3", 35.0, 15.0, 0.0),
            ("layer0-1-deteriorated", 5.0, 5.0, 0.05),
            ("layer2-deteriorated", 25.0, 15.0, 0.05),
            ("layer3-deteriorated", 70.0, 30.0, 0.05),
            ("layer0-1-critical", 12.5, 12.5, 0.15),
            ("layer2-critical", 50.0, 30.0, 0.15),
            ("layer3-critical", 175.0, 75.0, 0.15),
            ("none", 0.0, 0.0, 0.0),
        ];
        assert_eq!(table.len(), Preset::ALL.len());
        for (name, delay_ms, jitter_ms, loss) in table {
            let preset: Preset = name.parse().unwrap();
            assert_eq!(preset.name(), name);
            assert_eq!(preset.to_string(), name);
            let faults = preset.faults();
            assert_eq!(
                faults,
                Faults {
                    delay_ms,
                    jitter_ms,
                    loss,
                    clock_skew_ms: 0
                },
                "{name}"
            );
            faults.validate().unwrap();
        }
        // Deteriorated doubles the nominal latency and jitter.
        for (nominal, deteriorated) in [
            (Preset::Layer01, Preset::Layer01Deteriorated),
            (Preset::Layer2, Preset::Layer2Deteriorated),
            (Preset::Layer3, Preset::Layer3Deteriorated),
        ] {
            let (n, d) = (nominal.faults(), deteriorated.faults());
            assert_eq!(
                (2.0 * n.delay_ms, 2.0 * n.jitter_ms),
                (d.delay_ms, d.jitter_ms)
            );
        }
        assert!(Preset::None.faults().is_none());
        let err = "layer4".parse::<Preset>().unwrap_err();
        assert_eq!(err.field, "preset");
        assert!(err.reason.contains("layer2-critical"), "{err}");
    }

    #[test]
    fn validation_names_the_bad_field() {
        let bad = |f: Faults| f.validate().unwrap_err().field;
        let none = Faults::NONE;
        assert_eq!(
            bad(Faults {
                delay_ms: -1.0,
                ..none
            }),
            "delayMs"
        );
        assert_eq!(
            bad(Faults {
                delay_ms: f64::NAN,
                ..none
            }),
            "delayMs"
        );
        assert_eq!(
            bad(Faults {
                jitter_ms: -0.5,
                ..none
            }),
            "jitterMs"
        );
        assert_eq!(
            bad(Faults {
                jitter_ms: f64::INFINITY,
                ..none
            }),
            "jitterMs"
        );
        assert_eq!(
            bad(Faults {
                delay_ms: 60_001.0,
                ..none
            }),
            "delayMs"
        );
        assert_eq!(
            bad(Faults {
                delay_ms: 100.0,
                jitter_ms: 59_950.0,
                ..none
            }),
            "jitterMs"
        );
        assert_eq!(bad(Faults { loss: 1.01, ..none }), "loss");
        assert_eq!(
            bad(Faults {
                loss: -0.01,
                ..none
            }),
            "loss"
        );
        assert_eq!(
            bad(Faults {
                loss: f64::NAN,
                ..none
            }),
            "loss"
        );
        assert_eq!(
            bad(Faults {
                clock_skew_ms: -MAX_CLOCK_SKEW_MS - 1,
                ..none
            }),
            "clockSkewMs"
        );
        assert_eq!(
            bad(Faults {
                clock_skew_ms: i64::MIN,
                ..none
            }),
            "clockSkewMs"
        );
        // Jitter above the delay is allowed: the delay is clamped at 0.
        Faults {
            delay_ms: 1.0,
            jitter_ms: 10.0,
            loss: 1.0,
            clock_skew_ms: MAX_CLOCK_SKEW_MS,
        }
        .validate()
        .unwrap();

        let plan = FaultPlan {
            fleet: Faults::NONE,
            devices: BTreeMap::from([("d-1".to_owned(), Faults { loss: 2.0, ..none })]),
        };
        assert_eq!(plan.validate().unwrap_err().field, "devices.d-1.loss");
    }

    #[test]
    fn a_put_body_is_a_preset_fields_or_both() {
        let parse = |v: Value| Faults::from_json(v.as_object().unwrap(), &["device"]);
        assert_eq!(
            parse(json!({"preset": "layer2-critical"})).unwrap(),
            Preset::Layer2Critical.faults()
        );
        assert_eq!(
            parse(json!({"delayMs": 200, "clockSkewMs": -5000.0, "device": "x"})).unwrap(),
            Faults {
                delay_ms: 200.0,
                clock_skew_ms: -5000,
                ..Faults::NONE
            }
        );
        assert_eq!(
            parse(json!({"preset": "layer3", "loss": 0.5})).unwrap(),
            Faults {
                loss: 0.5,
                ..Preset::Layer3.faults()
            }
        );
        assert_eq!(parse(json!({})).unwrap(), Faults::NONE);
        for (body, field) in [
            (json!({"preset": "layer9"}), "preset"),
            (json!({"preset": 2}), "preset"),
            (json!({"delayMs": "slow"}), "delayMs"),
            (json!({"delayMs": -3}), "delayMs"),
            (json!({"jitterMs": -3}), "jitterMs"),
            (json!({"loss": 1.5}), "loss"),
            (json!({"clockSkewMs": 1.5}), "clockSkewMs"),
            (json!({"clockSkewMs": 1e15}), "clockSkewMs"),
            (json!({"latency": 3}), "latency"),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err().field, field, "{body}");
        }
    }

    #[test]
    fn the_plan_serializes_as_get_faults_answers() {
        let plan = FaultPlan {
            fleet: Preset::Layer2.faults(),
            devices: BTreeMap::from([(
                "d-2".to_owned(),
                Faults {
                    clock_skew_ms: 1000,
                    ..Faults::NONE
                },
            )]),
        };
        assert_eq!(
            serde_json::to_value(&plan).unwrap(),
            json!({
                "fleet": {"delayMs": 12.5, "jitterMs": 7.5, "loss": 0.0, "clockSkewMs": 0},
                "devices": {"d-2": {"delayMs": 0.0, "jitterMs": 0.0, "loss": 0.0, "clockSkewMs": 1000}},
            })
        );
        assert_eq!(plan.for_device("d-1"), Preset::Layer2.faults());
        assert_eq!(plan.for_device("d-2").clock_skew_ms, 1000);
        assert!(!plan.is_none());
        assert!(FaultPlan::default().is_none());
        let back: FaultPlan = serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn loss_of_fifteen_percent_loses_fifteen_percent() {
        // 10,000 seeded decisions: the binomial standard deviation is 0.36 %, so ±3 % is far
        // outside chance (and the seed makes it deterministic anyway).
        let mut rng = SmallRng::seed_from_u64(7);
        let faults = Preset::Layer3Critical.faults();
        let n = 10_000;
        let dropped = (0..n).filter(|_| faults.decide(&mut rng).drop).count();
        let rate = dropped as f64 / n as f64;
        assert!((0.12..=0.18).contains(&rate), "loss rate {rate}");
    }

    #[test]
    fn delays_spread_uniformly_over_delay_plus_or_minus_jitter_clamped_at_zero() {
        let mut rng = SmallRng::seed_from_u64(11);
        let faults = Preset::Layer3Critical.faults();
        let delays: Vec<f64> = (0..5_000)
            .map(|_| faults.decide(&mut rng).delay.as_secs_f64() * 1000.0)
            .collect();
        let (min, max) = delays
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((100.0..105.0).contains(&min), "min {min}");
        assert!(max > 245.0 && max <= 250.0, "max {max}");
        assert!((170.0..=180.0).contains(&mean), "mean {mean}");

        // Jitter wider than the delay: uniform over [-5, 15] ms clamped at 0, so never negative
        // and zero a quarter of the time.
        let wide = Faults {
            delay_ms: 5.0,
            jitter_ms: 10.0,
            ..Faults::NONE
        };
        let zeros = (0..3_000)
            .filter(|_| wide.decide(&mut rng).delay.is_zero())
            .count();
        assert!((600..=900).contains(&zeros), "{zeros} zero delays");

        // No jitter, no loss: exactly the delay and the skew, nothing drawn.
        let fixed = Faults {
            delay_ms: 200.0,
            clock_skew_ms: -30,
            ..Faults::NONE
        };
        let decision = fixed.decide(&mut rng);
        assert_eq!(
            decision,
            Decision {
                drop: false,
                delay: Duration::from_millis(200),
                skew_ms: -30
            }
        );
        assert_eq!(Faults::NONE.decide(&mut rng), Decision::default());

        // Values that validation would refuse never panic.
        let wild = Faults {
            delay_ms: f64::NAN,
            jitter_ms: f64::INFINITY,
            loss: 7.0,
            clock_skew_ms: 0,
        };
        assert!(wild.decide(&mut rng).drop);
    }
}
