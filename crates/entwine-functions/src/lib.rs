//! The four twin functions of entwine, reimplemented from the seed system.
//!
//! | function | route | in → out |
//! |---|---|---|
//! | `physical-event-handler` | `POST /physicalevents` | device payload + `device_id` → physical state |
//! | `shadow-handler` | `POST /physicalstates` | physical state → pending digital state |
//! | `twin-handler` | `POST /pendingdigitalstates` | pending digital state → digital state (ODTE) |
//! | `digital-event-handler` | `POST /digitalstates` | digital state → logged, echoed |
//!
//! # Layout
//! - [`handlers`]: the functions as plain async handlers over the store, with an injected clock.
//! - [`invoke`]: the one entry point every caller goes through ([`handlers::TwinFunctions::invoke`],
//!   and [`handlers::TwinFunctions::invoke_batch`] for a batch), the status of each error (and
//!   of each element of a batch), and the per-call metrics.
//! - [`http`]: axum routers over them: one per function (answering on `/`, as Fission's router
//!   calls it, and on its route) and one with all four (the local router). The chain's four
//!   routes take a JSON object or a batch of them (a JSON array, at most
//!   [`http::MAX_BATCH_ELEMENTS`] and [`http::MAX_BATCH_BODY_BYTES`]), answered element by
//!   element in order.
//! - [`fission`]: settings from Fission's ConfigMap and Secret mounts, and the `main` of the four
//!   binaries in `src/bin/`.
//! - [`telemetry`]: tracing setup.
//!
//! # Example
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use entwine_core::odte::OdteConfig;
//! use entwine_functions::{handlers::{SystemClock, TwinFunctions}, http::router};
//! use entwine_store::{Store, StoreOptions};
//!
//! let store = Store::open("sqlite://entwine.db", &StoreOptions::default())?;
//! store.migrate().await?;
//! let functions = TwinFunctions::new(store, OdteConfig::seed_default(), Arc::new(SystemClock));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, router(Arc::new(functions))).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod fission;
pub mod handlers;
pub mod http;
pub mod invoke;
pub mod publisher;
pub mod telemetry;
