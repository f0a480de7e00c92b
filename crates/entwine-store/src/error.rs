//! What can go wrong in the store, typed by who must act on it.

use entwine_core::InputError;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's input contradicts what is stored (an unknown id, another device): the
    /// caller must fix it; retrying will not help.
    #[error(transparent)]
    Rejected(InputError),
    /// The input collides with a different row already stored under the same key (a second,
    /// different event with a device timestamp the device used before): the caller must look,
    /// retrying will not help. Nothing was written.
    #[error(transparent)]
    Conflict(InputError),
    /// The database cannot serve the call right now, for a reason the operator (or time) must
    /// fix, not the caller: unreachable, starting or stopping, refusing our credentials (a
    /// password rotation), read-only (a fail-over), out of resources, a serialization failure,
    /// a deadlock or a cancelled statement, a missing privilege. Retrying later may work.
    #[error("store unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The tables or their keys are missing: the operator must run `entwine migrate`.
    #[error("store schema missing: run `entwine migrate`")]
    NotMigrated(#[source] sqlx::Error),
    /// The database URL cannot be used.
    #[error("{0}")]
    Url(String),
    /// A migration failed.
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A row breaks an invariant the store relies on (a bug, or a hand-edited database).
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("store query failed")]
    Query(#[source] sqlx::Error),
}

impl StoreError {
    /// Classifies a database error by what the caller can do about it.
    pub(crate) fn from_sqlx(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            Self::Unavailable(error)
        } else if is_missing_table(&error) {
            Self::NotMigrated(error)
        } else {
            Self::Query(error)
        }
    }

    pub(crate) fn from_migrate(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(e) if is_unavailable(&e) => Self::Unavailable(e),
            other => Self::Migrate(other),
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Why the store is unavailable, for logs and metrics: the SQLSTATE (PostgreSQL) or result
    /// code (SQLite) when the database answered, else the kind of failure.
    pub fn reason(&self) -> String {
        let error = match self {
            Self::Unavailable(e) | Self::NotMigrated(e) | Self::Query(e) => e,
            Self::Rejected(_) => return "rejected".into(),
            Self::Conflict(_) => return "conflict".into(),
            Self::Url(_) => return "url".into(),
            Self::Migrate(_) => return "migrate".into(),
            Self::Corrupt(_) => return "corrupt".into(),
        };
        match error {
            sqlx::Error::Database(db) => db
                .code()
                .map_or_else(|| "database".into(), |c| c.into_owned()),
            sqlx::Error::PoolTimedOut => "pool_timed_out".into(),
            sqlx::Error::PoolClosed => "pool_closed".into(),
            sqlx::Error::Io(_) => "io".into(),
            sqlx::Error::Tls(_) => "tls".into(),
            sqlx::Error::WorkerCrashed => "worker_crashed".into(),
            _ => "other".into(),
        }
    }
}

/// PostgreSQL's SQLSTATEs (or classes, two characters) that mean "not now", not "not this": the
/// call is right and will pass once the operator or time fixes the database.
const POSTGRES_RETRYABLE: [&str; 14] = [
    "08",    // connection exception
    "53",    // insufficient resources: disk full, out of memory, too many connections
    "57P",   // operator intervention: shutdown, crash shutdown, cannot connect now
    "57014", // query_canceled (statement_timeout, pg_cancel_backend)
    "58",    // system error (I/O)
    "28000", // invalid_authorization_specification (pg_hba.conf, a dropped role)
    "28P01", // invalid_password (a password rotation in progress)
    "25006", // read_only_sql_transaction (a fail-over, a replica promoted late)
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "42501", // insufficient_privilege (a grant missing or being changed)
    "55P03", // lock_not_available
    "55006", // object_in_use
    "3D000", // invalid_catalog_name: the database does not exist (yet)
];

fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLite reports extended codes, whose low byte is the primary one. (PostgreSQL's
            // codes are five characters, SQLite's at most four digits.)
            let sqlite_primary = (code.len() < 5)
                .then(|| code.parse::<i32>().ok())
                .flatten()
                .map(|c| c & 0xff);
            // SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_READONLY (8), SQLITE_IOERR
            // (10), SQLITE_FULL (13), SQLITE_CANTOPEN (14).
            if code.len() == 5 {
                POSTGRES_RETRYABLE.iter().any(|c| code.starts_with(c))
            } else {
                matches!(sqlite_primary, Some(5 | 6 | 8 | 10 | 13 | 14))
            }
        }
        _ => false,
    }
}

fn is_missing_table(error: &sqlx::Error) -> bool {
    match error {
        // A missing table, or a missing idempotency key (PostgreSQL 42P10 and SQLite's "ON
        // CONFLICT clause does not match…" when the second migration has not run, e.g. because
        // it refused a seed database holding duplicates).
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("42P01" | "42P10"))
                || db.message().starts_with("no such table")
                || db.message().contains("ON CONFLICT clause does not match")
        }
        _ => false,
    }
}
