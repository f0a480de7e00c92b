//! The `entwine` command line as a library, so tests drive the same code as the binary.
//!
//! # Layout
//! - [`cli`]: the flags (clap derive; doc comments are the `--help` text) and the dispatch.
//! - [`local`]: `entwine up`, the platform on one machine: the store (a SQLite file unless a
//!   PostgreSQL URL is given, migrated on start) and the local router serving the four
//!   function routes on the same paths as Fission's router.
//! - [`physical`]: `entwine device` and `entwine connector`, the physical side.
#![warn(missing_docs)]

pub mod cli;
pub mod local;
pub mod physical;
