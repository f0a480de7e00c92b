//! The domain core of entwine: what a digital twin knows, and how faithfully it mirrors its device.
//!
//! This crate does no I/O. Everything that reaches the system (an MQTT payload, an HTTP body) is
//! parsed here once into types that cannot hold an invalid value, and the ODTE engine turns the
//! counts of a twin's recent history into availability, reliability, timeliness, ODTE and a
//! lifecycle, with exactly the formulas of the seed system.
//!
//! # Layout
//! - [`state`]: the four states of the pipeline (physical event → physical state → pending
//!   digital state → digital state) and their parsing from JSON.
//! - [`odte`]: the ODTE configuration (validated) and the engine; the seed's verdict
//!   ([`odte::SeedLifecycle`]) of one evaluation.
//! - [`evaluation`]: one twin evaluation from the figures of its window (the twin handler's and
//!   the twin evaluator's), and the reference those figures are tested against.
//! - [`twin`]: the twin's lifecycle (unbound → bound → entangled ⇄ disentangled, unbound again
//!   after silence) and availability measured from the gaps between updates.
//! - [`deadletter`]: a refused message as a small record (stage, reason, size, digest, prefix).
//! - [`model`]: device models (WoT Thing Models with an ODTE profile), which device is bound
//!   to which, and the validation of their readings; the seed's device is built in.
//! - [`input`]: the error that names the field a bad input got wrong, and the field readers.
//! - [`broker`]: the one parser of MQTT broker addresses (`host:port`, `mqtt://`, `[::1]`, …).
//! - [`retry`]: the one retry policy (jittered exponential backoff, `backon`), as pure values.
//!
//! # Example
//! ```
//! use entwine_core::odte::{OdteConfig, SeedLifecycle, WindowStats};
//!
//! // The seed's ConfigMap: 0.2 updates/s expected, a 30 s window, 1 s desired timeliness.
//! let config = OdteConfig::seed_default();
//! // Six states in the window, five of them mirrored within a second.
//! let e = config.evaluate(WindowStats { states: 6, timely: 5 });
//! assert_eq!(e.reliability, 1.0);
//! assert!((e.odte - 5.0 / 6.0).abs() < 1e-12);
//! assert_eq!(e.lifecycle, SeedLifecycle::Disentangled);
//! ```
#![warn(missing_docs)]

pub mod broker;
pub mod deadletter;
pub mod evaluation;
pub mod input;
pub mod model;
pub mod odte;
pub mod retry;
pub mod state;
pub mod twin;

pub use input::InputError;
