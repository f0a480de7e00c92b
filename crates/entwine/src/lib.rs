//! The `entwine` command line as a library, so tests drive the same code as the binary.
//!
//! # Layout
//! - [`cli`]: the flags (clap derive; doc comments are the `--help` text) and the dispatch.
//! - [`local`]: `entwine up`, the platform in one process: the store (a SQLite file unless a
//!   PostgreSQL URL is given, migrated on start), an MQTT broker ([`broker`], embedded unless
//!   one is given), the local router serving the four function routes on Fission's paths with
//!   the twins API ([`api`]) and `/metrics`, the connector and a fleet of devices.
//! - [`status`]: `entwine status`, a table of the twins.
//! - [`physical`]: `entwine device` and `entwine connector`, the physical side.
#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod experiment;
pub mod local;
pub mod physical;
pub mod status;
