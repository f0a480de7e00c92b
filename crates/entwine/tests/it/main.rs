//! The `entwine` binary as a user runs it.

mod api;
mod bench;
mod migrate;
mod physical;
mod up;
