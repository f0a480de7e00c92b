//! The `entwine` command line as a library, so tests drive the same code as the binary.
//!
//! # Layout
//! - [`cli`]: the flags (clap derive; doc comments are the `--help` text) and the dispatch.
//! - [`local`]: `entwine up`: flags → [`entwine_platform::PlatformConfig`], the platform
//!   started ([`entwine_platform::Platform`]: store, broker, functions, twins API, evaluator,
//!   connector, devices) and printed until Ctrl-C.
//! - [`bench`](mod@bench), [`experiment`]: the same platform, measured or scripted.
//! - [`status`]: `entwine status`, a table of the twins.
//! - [`physical`]: `entwine device` and `entwine connector`, the physical side.
//! - [`serve`]: `entwine serve`, the twins service over a store the functions write.
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod config_cmd;
pub mod experiment;
pub mod local;
pub mod physical;
pub mod serve;
pub mod status;
