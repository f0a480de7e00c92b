//! The `entwine` binary as a user runs it.

mod migrate;
mod physical;
mod up;
