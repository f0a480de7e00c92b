//! End to end: emulated devices → real Mosquitto → connector → the functions over HTTP → real
//! PostgreSQL.

mod batches;
mod faults;
mod outages;
mod pipeline;
mod sessions;
mod support;
