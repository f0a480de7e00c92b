//! The `entwine` binary as a user runs it.

mod api;
mod bench;
mod brokers;
mod experiment;
mod migrate;
mod models;
mod physical;
mod security;
mod up;
