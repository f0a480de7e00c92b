//! Tests of the functions: over HTTP in-process on both stores, their Fission settings, and each
//! binary started the way the Fission Rust environment starts it.

mod batches;
mod container;
mod contract;
mod http;
mod service;
mod serving;
mod settings;
mod specs;
mod support;
