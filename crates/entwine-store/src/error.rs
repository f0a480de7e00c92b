//! What can go wrong in the store, typed by who must act on it.

use entwine_core::InputError;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's input contradicts what is stored (an unknown id, another device): the
    /// caller must fix it; retrying will not help.
    #[error(transparent)]
    Rejected(InputError),
    /// The database cannot be reached or refuses connections right now; retrying later may work.
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
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: connection exception (08…), shutdown or start-up (57P…), too many
            // connections (53300). SQLite reports extended codes, whose low byte is the primary
            // one: SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_CANTOPEN (14).
            // (PostgreSQL's codes are five characters, SQLite's at most four digits.)
            let sqlite_primary = (code.len() < 5)
                .then(|| code.parse::<i32>().ok())
                .flatten()
                .map(|c| c & 0xff);
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "53300"
                || matches!(sqlite_primary, Some(5 | 6 | 14))
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
