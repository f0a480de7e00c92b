//! entwine's store: the seed's `physicalstate` and `digitalstate` tables, in PostgreSQL
//! (production) or SQLite (the embedded default), behind one API.
//!
//! # Layout
//! - [`Store`]: a connection pool to either backend, and the three writes of the pipeline
//!   ([`Store::record_physical_event`], [`Store::record_shadow`],
//!   [`Store::evaluate_digital_state`]), each idempotent: calling it again with the same input
//!   answers the row it already wrote.
//! - [`Store::evaluate_digital_state`] (the twin handler: one digital state, at its time) and
//!   [`Store::reevaluate_twins`] (the twin evaluator: every twin, at the current time): the
//!   twin table, each twin's place in its lifecycle (unbound, bound, entangled, disentangled),
//!   moved on every evaluation and re-evaluated at the current time so that a silent device
//!   shows. Both only read the figures ([`Store::state_window`], [`Store::twin_windows`]), hand
//!   them to the one pure evaluation of the core ([`entwine_core::evaluation::evaluate`]) and
//!   write what it answers.
//! - [`Store::twins`], [`Store::twin`], [`Store::history`]: the twins read back for the API.
//! - [`Store::record_dead_letter`], [`Store::dead_letters`]: the messages the pipeline refused.
//! - [`StoreError`]: what went wrong, typed by who must act (the caller's input, the operator's
//!   database, or a bug).
//! - `migrations/` at the repository root: one folder per backend, embedded in the binary and
//!   applied by [`Store::migrate`] (safe to run concurrently and repeatedly).
//!
//! Each query is written once, in PostgreSQL's `$n` placeholder form, and rewritten to SQLite's
//! `?n` on first use. Statements are prepared once per pooled connection and cached (sqlx's
//! default), where the seed opened a new connection for every call.
//!
//! # Example
//! ```no_run
//! # async fn example() -> Result<(), entwine_store::StoreError> {
//! use entwine_store::{Store, StoreOptions};
//! let store = Store::open("sqlite://entwine.db", &StoreOptions::default())?;
//! store.migrate().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod batch;
mod error;
#[macro_use]
mod queries;
mod deadletters;
mod history;
mod lifecycle;
mod twins;

use std::str::FromStr;
use std::time::Duration;

use entwine_core::evaluation::WindowFigures;
use entwine_core::odte::{OdteConfig, SeedLifecycle};
use entwine_core::state::{
    DeviceId, DigitalState, PendingDigitalState, PhysicalEvent, PhysicalState,
};
use entwine_core::InputError;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub use batch::{is_element_error, Each};
pub use deadletters::StoredDeadLetter;
pub use error::StoreError;
pub use history::{
    retention_cutoff, retention_guard_ms, Aggregate, Bucket, RetentionReport, RetentionSettings,
    Series, RETENTION_BATCH, RETENTION_MARGIN_MS, SERIES_POSTGRES,
};
pub use lifecycle::{TwinChange, TwinWindow};
/// PostgreSQL connection options, for callers that assemble them from parts.
pub use sqlx::postgres::PgConnectOptions;
pub use twins::{HistoryCursor, HistoryEntry, Tally, TwinStatus};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Pool settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection before the store counts as unavailable.
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// A pool of connections to the twins' store.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL, the production store (and the seed's).
    Postgres(PgPool),
    /// SQLite, the embedded default: one file, nothing to install.
    Sqlite(SqlitePool),
}

/// Whether a write created its row or found the one an earlier call created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// This call inserted (or, for the twin, evaluated) the row.
    Created,
    /// An earlier call with the same input did; this one answered what it stored.
    Existing,
}

impl Store {
    /// A pool for `url`: `postgres://…`/`postgresql://…` or `sqlite://PATH` (the file is created
    /// when missing). Connections are opened on first use, so this only fails on a bad URL; a
    /// store that is down shows as [`StoreError::Unavailable`] on the first call.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => {
                let connect = PgConnectOptions::from_str(url).map_err(|e| {
                    StoreError::Url(format!("invalid PostgreSQL URL ({scheme}://…): {e}"))
                })?;
                Ok(Self::postgres(connect, options))
            }
            "sqlite" => {
                let connect = SqliteConnectOptions::from_str(url)
                    .map_err(|e| StoreError::Url(format!("invalid SQLite URL {url:?}: {e}")))?;
                Ok(Self::sqlite(connect, options))
            }
            _ => Err(StoreError::Url(format!(
                "unsupported database URL scheme {scheme:?}: expected postgres://, postgresql:// or sqlite://"
            ))),
        }
    }

    /// A PostgreSQL pool from connection options (the Fission functions build these from the
    /// `postgres` ConfigMap and Secret).
    pub fn postgres(connect: PgConnectOptions, options: &StoreOptions) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(
                connect
                    .application_name("entwine")
                    // Plan each execution for its own arguments and the tables' current size. A
                    // prepared statement's generic plan is made once per connection; made while
                    // the tables were small (a new database), it keeps scanning them whole as
                    // they grow, until an ANALYZE happens to invalidate it: measured at 650 µs
                    // of PostgreSQL CPU per event at saturation (sequential scans filtered by
                    // `= ANY`) against 330 µs with custom plans (160 µs once the window is also
                    // counted per state; BENCHMARKS.md, issue #13). Planning our short
                    // statements costs little, once per batch.
                    .options([("plan_cache_mode", "force_custom_plan")]),
            );
        Self::Postgres(pool)
    }

    /// A SQLite pool: write-ahead log (readers never wait for the writer), foreign keys on, and
    /// a busy timeout as long as the acquire timeout so concurrent writers queue, not fail.
    pub fn sqlite(connect: SqliteConnectOptions, options: &StoreOptions) -> Self {
        let connect = connect
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Every commit by one connection invalidates the page cache of the others (WAL):
            // without memory mapping each of them then reads the pages it needs again with
            // `pread`, copying them, under SQLite's page-cache mutex; mapped, a page is read in
            // place from the OS cache. 256 MiB of address space, not of memory. Measured with
            // `entwine bench --mode saturation` (BENCHMARKS.md, issue #11).
            .pragma("mmap_size", "268435456")
            .foreign_keys(true)
            .busy_timeout(options.acquire_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Self::Sqlite(pool)
    }

    /// `postgres` or `sqlite`, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    /// Creates the seed's tables when missing and adds entwine's keys and indexes. Safe to run
    /// again and from several processes at once: PostgreSQL serialises migrators with an
    /// advisory lock; SQLite serialises writers, and a migrator that lost the race retries and
    /// finds the work done.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(pool) => {
                // A seed database whose rows break the keys of migration 0002 is refused before
                // the migrator runs, so it stays exactly as it was (no `_sqlx_migrations` table,
                // nothing of 0001 applied) and the reason is said once. 0002's own guard still
                // covers a database that changes between this check and the migration.
                let unkeyed: (bool, bool) = sqlx::query_as(
                    "SELECT to_regclass('physicalstate') IS NOT NULL
                            AND to_regclass('physicalstate_device_event_key') IS NULL,
                            to_regclass('digitalstate') IS NOT NULL
                            AND to_regclass('digitalstate_physicalstate_key') IS NULL",
                )
                .fetch_one(pool)
                .await
                .map_err(StoreError::from_sqlx)?;
                let checks = [
                    (
                        unkeyed.0,
                        "SELECT COUNT(*) FROM (SELECT 1 FROM physicalstate
                             WHERE device_id IS NOT NULL AND device_timestamp IS NOT NULL
                             GROUP BY device_id, device_timestamp HAVING COUNT(*) > 1) AS d",
                        "(device_id, device_timestamp) pairs occur more than once in physicalstate",
                    ),
                    (
                        unkeyed.1,
                        "SELECT COUNT(*) FROM (SELECT 1 FROM digitalstate
                             WHERE physicalstate_id IS NOT NULL
                             GROUP BY physicalstate_id HAVING COUNT(*) > 1) AS d",
                        "physical states have more than one digital state in digitalstate",
                    ),
                ];
                for (unkeyed, count, what) in checks {
                    if !unkeyed {
                        continue;
                    }
                    let duplicates: i64 = sqlx::query_scalar(count)
                        .fetch_one(pool)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                    if duplicates > 0 {
                        return Err(StoreError::Corrupt(format!(
                            "cannot upgrade: {duplicates} {what}; keep one row of each (README, \"Upgrading a seed database\") and migrate again; nothing was changed"
                        )));
                    }
                }
                POSTGRES_MIGRATIONS
                    .run(pool)
                    .await
                    .map_err(StoreError::from_migrate)
            }
            Self::Sqlite(pool) => {
                let mut attempt = 0;
                loop {
                    match SQLITE_MIGRATIONS.run(pool).await {
                        Ok(()) => return Ok(()),
                        Err(e) if attempt < 5 => {
                            attempt += 1;
                            tracing::debug!(error = %e, attempt, "sqlite migration raced, retrying");
                            tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                        }
                        Err(e) => return Err(StoreError::from_migrate(e)),
                    }
                }
            }
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let result = match self {
            Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        };
        result.map_err(StoreError::from_sqlx)
    }

    /// Closes every connection, waiting for the ones in use to be returned.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }

    /// Stores a physical event received at `now_ms`, unless the same device already sent an event
    /// with the same device timestamp: then answers the state stored for it (and refuses, as
    /// [`StoreError::Conflict`] naming `timestamp`, a different event under that key). A batch
    /// of one ([`Store::record_physical_events`]).
    pub async fn record_physical_event(
        &self,
        event: &PhysicalEvent,
        now_ms: i64,
    ) -> Result<(PhysicalState, Written), StoreError> {
        only(
            self.record_physical_events(std::slice::from_ref(event), now_ms)
                .await?,
        )
    }

    /// Creates the twin's pending copy of a stored physical state at `now_ms`, unless one
    /// exists: then answers it. The readings are taken from the stored physical state.
    ///
    /// Rejects (as [`StoreError::Rejected`], naming the field) a physical state id that does not
    /// exist or that belongs to another device than the input says, or any other field that
    /// differs from the stored state. A batch of one ([`Store::record_shadows`]).
    pub async fn record_shadow(
        &self,
        physical: &PhysicalState,
        now_ms: i64,
    ) -> Result<(PendingDigitalState, Written), StoreError> {
        only(
            self.record_shadows(std::slice::from_ref(physical), now_ms)
                .await?,
        )
    }

    /// The twin handler's store work: evaluates a pending digital state over its device's
    /// window ([`entwine_core::evaluation::evaluate`] on the figures the store reads), stores
    /// the evaluation on the state's row and moves the twin by it. A state evaluated before is
    /// answered as stored, so a repeated call neither changes it nor counts anything twice; its
    /// stored evaluation still moves the twin, so that a first call cut short between the two
    /// writes is completed. The twin's position comes with the window, in the same query, and
    /// the twin row is written only when its lifecycle changes. Answers the change when it was
    /// written (a stale one, older than the twin's latest evaluation, is dropped unannounced).
    /// A batch of one ([`Store::evaluate_digital_states`]).
    ///
    /// Rejects an unknown id, or one whose stored device, physical state, timestamp or readings
    /// differ from the input.
    pub async fn evaluate_digital_state(
        &self,
        pending: &PendingDigitalState,
        config: &OdteConfig,
    ) -> Result<(DigitalState, Written, Option<TwinChange>), StoreError> {
        only(
            self.evaluate_digital_states(std::slice::from_ref(pending), config)
                .await?,
        )
    }

    /// [`Store::evaluate_digital_state`] without the twin: the seed's twin-handler work only
    /// (the ODTE of the state, stored on its row); the twin table is left as it is.
    pub async fn evaluate_digital_state_only(
        &self,
        pending: &PendingDigitalState,
        config: &OdteConfig,
    ) -> Result<(DigitalState, Written), StoreError> {
        only(
            self.evaluate_digital_states_only(std::slice::from_ref(pending), config)
                .await?,
        )
    }

    /// The figures the twin handler reads for digital state `id` (none if there is no such
    /// row): its device's window at the state's timestamp, among its states up to `id`, and
    /// the update times when `config` measures availability. [`Store::evaluate_digital_state`]
    /// evaluates exactly these; they equal [`WindowFigures::reference`] over the device's states.
    pub async fn state_window(
        &self,
        id: i32,
        config: &OdteConfig,
    ) -> Result<Option<WindowFigures>, StoreError> {
        let rows = self.digital_rows(&[id], config).await?;
        let Some(row) = rows.get(&id) else {
            return Ok(None);
        };
        let models = self.model_readings_of_rows(std::iter::once(row)).await?;
        row.pending(id, &models)?;
        let updates = if config.availability_max_gap_ms().is_some() {
            let mut updates = self.updates_of_states(&[id], &rows, config).await?;
            Some(updates.remove(&id).unwrap_or_default())
        } else {
            None
        };
        Ok(Some(WindowFigures {
            stats: queries::window_stats(row.window_states, row.window_timely),
            updates,
        }))
    }

    /// Checks that `digital` is exactly a digital state this store holds, evaluated: answers
    /// the stored one, or refuses (naming the first field that differs) an unknown id, a state
    /// not evaluated yet, or one whose readings, figures or lifecycle are not the stored ones.
    /// The digital-event handler announces only what passes. A batch of one
    /// ([`Store::stored_digitals`]).
    pub async fn stored_digital(&self, digital: &DigitalState) -> Result<DigitalState, StoreError> {
        only(self.stored_digitals(std::slice::from_ref(digital)).await?)
    }
}

/// The one result of a batch of one.
fn only<T>(each: Each<T>) -> Result<T, StoreError> {
    each.into_iter().next().unwrap_or_else(|| {
        Err(StoreError::Corrupt(
            "a batch of one answered nothing".into(),
        ))
    })
}

/// Refuses an input that differs from the stored row in any of these fields (whole values
/// compared as text, readings bit for bit), naming the first that differs.
fn contradiction(
    what: &str,
    whole: &[(&str, String, String)],
    readings: &[(&str, f32, f32)],
) -> Result<(), StoreError> {
    for (field, stored, given) in whole {
        if stored != given {
            return Err(mismatch(field, what.to_owned(), stored, given));
        }
    }
    for (field, stored, given) in readings {
        if stored.to_bits() != given.to_bits() {
            return Err(mismatch(
                field,
                what.to_owned(),
                &stored.to_string(),
                &given.to_string(),
            ));
        }
    }
    Ok(())
}

fn display_opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn mismatch(field: &str, what: String, stored: &str, given: &str) -> StoreError {
    StoreError::Rejected(InputError::new(
        field,
        format!("{what} has {field} {stored}, not {given}"),
    ))
}

fn stored_device(table: &str, id: i32, raw: &str) -> Result<DeviceId, StoreError> {
    DeviceId::parse("device_id", raw)
        .map_err(|e| StoreError::Corrupt(format!("{table} row {id}: {e}")))
}

fn stored_lifecycle(id: i32, raw: &str) -> Result<SeedLifecycle, StoreError> {
    SeedLifecycle::parse(raw).ok_or_else(|| {
        StoreError::Corrupt(format!("digitalstate row {id}: unknown lifecycle {raw:?}"))
    })
}
