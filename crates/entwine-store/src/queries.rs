//! The store's SQL, written once for both backends, and the rows it reads.

use std::sync::OnceLock;

use entwine_core::odte::WindowStats;
use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalState};
use entwine_core::twin::TwinPosition;

use crate::{stored_device, stored_lifecycle, StoreError};

/// One statement in PostgreSQL's form (`$1`, `$2`…), with its SQLite form (`?1`, `?2`…) made on
/// first use. Both backends take the rest of our SQL as it is (`ON CONFLICT`, `RETURNING`).
pub(crate) struct Sql {
    pub(crate) postgres: &'static str,
    sqlite: OnceLock<String>,
}

impl Sql {
    pub(crate) const fn new(postgres: &'static str) -> Self {
        Self {
            postgres,
            sqlite: OnceLock::new(),
        }
    }

    /// SQLite numbers `?NNN` parameters as written, where `$NNN` would be numbered by first
    /// appearance; the rewrite keeps every placeholder bound to the same argument.
    pub(crate) fn sqlite(&'static self) -> &'static str {
        self.sqlite.get_or_init(|| self.postgres.replace('$', "?"))
    }
}

/// Runs a `query_as` on whichever backend the store is, binding the same arguments.
macro_rules! fetch {
    ($store:expr, $sql:expr, $method:ident, $row:ty $(, $arg:expr)* $(,)?) => {
        match $store {
            $crate::Store::Postgres(pool) => {
                sqlx::query_as::<_, $row>($sql.postgres)$(.bind($arg))*.$method(pool).await
            }
            $crate::Store::Sqlite(pool) => {
                sqlx::query_as::<_, $row>($sql.sqlite())$(.bind($arg))*.$method(pool).await
            }
        }
        .map_err($crate::StoreError::from_sqlx)
    };
}

/// Runs a statement on whichever backend the store is; yields the number of rows it changed.
macro_rules! execute {
    ($store:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        match $store {
            $crate::Store::Postgres(pool) => sqlx::query($sql.postgres)$(.bind($arg))*
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
            $crate::Store::Sqlite(pool) => sqlx::query($sql.sqlite())$(.bind($arg))*
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
        }
        .map_err($crate::StoreError::from_sqlx)
    };
}

/// Inserts a physical state unless its (device, device timestamp) key exists; returns it when
/// inserted, nothing otherwise.
pub(crate) static INSERT_PHYSICAL: Sql = Sql::new(
    "INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (device_id, device_timestamp) DO NOTHING \
     RETURNING id, device_id, device_timestamp, timestamp, temperature, energy",
);

pub(crate) static PHYSICAL_BY_EVENT: Sql = Sql::new(
    "SELECT id, device_id, device_timestamp, timestamp, temperature, energy \
     FROM physicalstate WHERE device_id = $1 AND device_timestamp = $2",
);

pub(crate) static PHYSICAL_BY_ID: Sql = Sql::new(
    "SELECT id, device_id, device_timestamp, timestamp, temperature, energy \
     FROM physicalstate WHERE id = $1",
);

/// Inserts the digital copy of physical state `$1` if it is exactly the stored one (device
/// `$2`, device timestamp `$4`, timestamp `$5`, readings `$6`, `$7`) and has no copy yet;
/// returns it when inserted.
pub(crate) static INSERT_SHADOW: Sql = Sql::new(
    "INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, energy) \
     SELECT id, device_id, $3, temperature, energy FROM physicalstate \
     WHERE id = $1 AND device_id = $2 AND device_timestamp = $4 AND timestamp = $5 \
       AND temperature = $6 AND energy = $7 \
     ON CONFLICT (physicalstate_id) DO NOTHING \
     RETURNING id, physicalstate_id, device_id, timestamp, temperature, energy",
);

pub(crate) static SHADOW_BY_PHYSICAL: Sql = Sql::new(
    "SELECT id, physicalstate_id, device_id, timestamp, temperature, energy \
     FROM digitalstate WHERE physicalstate_id = $1",
);

/// Digital state `$1` with the counts of its device's window `[timestamp − $2, timestamp]`:
/// the states in it that have a physical state, and those mirrored within `$3` ms of the
/// device's measurement, among the device's states up to `$1` (a state written after it, such
/// as a later one of the same batch stamped with the same time, is not in its window). One
/// round trip, served by `digitalstate_device_timestamp_idx`.
/// `GROUP BY d.id` is enough for the other columns of `d`: PostgreSQL knows they depend on the
/// primary key, and SQLite allows them.
pub(crate) static DIGITAL_WITH_WINDOW: Sql = Sql::new(
    "SELECT d.physicalstate_id, d.device_id, d.timestamp, d.temperature, d.energy, \
            d.availability, d.reliability, d.timeliness, d.odte, d.lifecycle, \
            (SELECT t.lifecycle FROM twin t WHERE t.device_id = d.device_id) AS twin_lifecycle, \
            (SELECT t.since FROM twin t WHERE t.device_id = d.device_id) AS twin_since, \
            (SELECT t.bound_at FROM twin t WHERE t.device_id = d.device_id) AS twin_bound_at, \
            COUNT(p.id) AS window_states, \
            COALESCE(SUM(CASE WHEN w.timestamp - p.device_timestamp <= $3 THEN 1 ELSE 0 END), 0) \
                AS window_timely \
     FROM digitalstate d \
     LEFT JOIN digitalstate w ON w.device_id = d.device_id \
          AND w.timestamp >= d.timestamp - $2 AND w.timestamp <= d.timestamp AND w.id <= d.id \
     LEFT JOIN physicalstate p ON p.id = w.physicalstate_id \
     WHERE d.id = $1 \
     GROUP BY d.id",
);

/// Digital state `$1` as stored, in [`DigitalRow`]'s shape without the window (the
/// digital-event handler checks what it is given against it).
pub(crate) static DIGITAL_BY_ID: Sql = Sql::new(
    "SELECT physicalstate_id, device_id, timestamp, temperature, energy, \
            availability, reliability, timeliness, odte, lifecycle, \
            CAST(NULL AS VARCHAR(32)) AS twin_lifecycle, CAST(NULL AS BIGINT) AS twin_since, \
            CAST(NULL AS BIGINT) AS twin_bound_at, \
            CAST(0 AS BIGINT) AS window_states, CAST(0 AS BIGINT) AS window_timely \
     FROM digitalstate WHERE id = $1",
);

/// Stores an evaluation unless one is stored already (a concurrent call won).
pub(crate) static STORE_EVALUATION: Sql = Sql::new(
    "UPDATE digitalstate \
     SET availability = $2, reliability = $3, timeliness = $4, odte = $5, lifecycle = $6 \
     WHERE id = $1 AND odte IS NULL",
);

/// A window's counts as both window queries return them (`COUNT`, `SUM`: never negative).
pub(crate) fn window_stats(states: i64, timely: i64) -> WindowStats {
    WindowStats {
        states: u64::try_from(states).unwrap_or(0),
        timely: u64::try_from(timely).unwrap_or(0),
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PhysicalRow {
    id: i32,
    pub(crate) device_id: String,
    device_timestamp: i64,
    timestamp: i64,
    temperature: f32,
    energy: f32,
}

impl PhysicalRow {
    pub(crate) fn into_state(self) -> Result<PhysicalState, StoreError> {
        Ok(PhysicalState {
            device_id: stored_device("physicalstate", self.id, &self.device_id)?,
            id: self.id,
            device_timestamp: self.device_timestamp,
            timestamp: self.timestamp,
            temperature: self.temperature,
            energy: self.energy,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PendingRow {
    id: i32,
    physicalstate_id: i32,
    pub(crate) device_id: String,
    timestamp: i64,
    temperature: f32,
    energy: f32,
}

impl PendingRow {
    pub(crate) fn into_pending(self) -> Result<PendingDigitalState, StoreError> {
        Ok(PendingDigitalState {
            device_id: stored_device("digitalstate", self.id, &self.device_id)?,
            id: self.id,
            physicalstate_id: self.physicalstate_id,
            timestamp: self.timestamp,
            temperature: self.temperature,
            energy: self.energy,
        })
    }
}

/// A digital state row as the twin handler reads it. Columns are optional because a seed
/// database may hold rows written without them.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DigitalRow {
    pub(crate) physicalstate_id: Option<i32>,
    pub(crate) device_id: Option<String>,
    pub(crate) timestamp: Option<i64>,
    temperature: Option<f32>,
    energy: Option<f32>,
    availability: Option<f32>,
    reliability: Option<f32>,
    timeliness: Option<f32>,
    odte: Option<f32>,
    lifecycle: Option<String>,
    twin_lifecycle: Option<String>,
    twin_since: Option<i64>,
    twin_bound_at: Option<i64>,
    pub(crate) window_states: i64,
    pub(crate) window_timely: i64,
}

impl DigitalRow {
    /// The stored pending part. Called after the caller checked device, physical state and
    /// timestamp against its input, so only the readings can be missing.
    pub(crate) fn pending(&self, id: i32) -> Result<PendingDigitalState, StoreError> {
        let missing =
            |column: &str| StoreError::Corrupt(format!("digitalstate row {id} has no {column}"));
        Ok(PendingDigitalState {
            id,
            physicalstate_id: self
                .physicalstate_id
                .ok_or_else(|| missing("physicalstate_id"))?,
            device_id: stored_device(
                "digitalstate",
                id,
                self.device_id
                    .as_deref()
                    .ok_or_else(|| missing("device_id"))?,
            )?,
            timestamp: self.timestamp.ok_or_else(|| missing("timestamp"))?,
            temperature: self.temperature.ok_or_else(|| missing("temperature"))?,
            energy: self.energy.ok_or_else(|| missing("energy"))?,
        })
    }

    /// Where the row's twin stood in its lifecycle, if it has a twin row.
    pub(crate) fn twin_position(&self, device: &str) -> Result<Option<TwinPosition>, StoreError> {
        let (Some(lifecycle), Some(since)) = (&self.twin_lifecycle, self.twin_since) else {
            return Ok(None);
        };
        Ok(Some(TwinPosition {
            lifecycle: crate::lifecycle::stored_twin_lifecycle(device, lifecycle)?,
            since_ms: since,
            bound_ms: self.twin_bound_at,
        }))
    }

    /// The stored evaluation, if the row has one (its `odte` is set).
    pub(crate) fn evaluation(
        &self,
        pending: PendingDigitalState,
    ) -> Result<Option<DigitalState>, StoreError> {
        let Some(odte) = self.odte else {
            return Ok(None);
        };
        let id = pending.id;
        let missing = |column: &str| {
            StoreError::Corrupt(format!("digitalstate row {id} has an odte but no {column}"))
        };
        Ok(Some(DigitalState {
            availability: self.availability.ok_or_else(|| missing("availability"))?,
            reliability: self.reliability.ok_or_else(|| missing("reliability"))?,
            timeliness: self.timeliness.ok_or_else(|| missing("timeliness"))?,
            odte,
            lifecycle: stored_lifecycle(
                id,
                self.lifecycle
                    .as_deref()
                    .ok_or_else(|| missing("lifecycle"))?,
            )?,
            pending,
        }))
    }
}
