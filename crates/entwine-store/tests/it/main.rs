//! Store tests, each against real PostgreSQL (a schema of its own) and SQLite (a file of its own).

mod batches;
mod history;
mod integrity;
mod lifecycle;
mod migrations;
mod models;
mod pipeline;
mod windows;
