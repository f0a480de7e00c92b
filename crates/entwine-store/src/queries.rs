//! The store's SQL, written once for both backends, and the rows it reads.

use std::collections::HashMap;
use std::sync::OnceLock;

use entwine_core::model::ModelReadings;
use entwine_core::odte::WindowStats;
use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalState, Readings};
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

/// A window's counts as both window queries return them (`COUNT`, `SUM`: never negative).
pub(crate) fn window_stats(states: i64, timely: i64) -> WindowStats {
    WindowStats {
        states: u64::try_from(states).unwrap_or(0),
        timely: u64::try_from(timely).unwrap_or(0),
    }
}

/// The readings of model-described devices' physical states, by physical state id
/// (`physicalstate_reading`, migration 0008), read only for rows without the seed's readings.
pub(crate) type ModelReadingsById = HashMap<i32, ModelReadings>;

/// A row's readings: the seed's two columns when both are set, else its model readings; a row
/// with neither is corrupt (`table` row `id` has no `temperature`).
pub(crate) fn row_readings(
    table: &str,
    id: i32,
    physicalstate_id: i32,
    temperature: Option<f32>,
    energy: Option<f32>,
    models: &ModelReadingsById,
) -> Result<Readings, StoreError> {
    match (temperature, energy) {
        (Some(t), Some(e)) => Ok(Readings::seed(t, e)),
        (t, _) => match models.get(&physicalstate_id) {
            Some(m) => Ok(Readings::Model(m.clone())),
            None => Err(StoreError::Corrupt(format!(
                "{table} row {id} has no {}",
                if t.is_none() { "temperature" } else { "energy" }
            ))),
        },
    }
}

/// The readings of a state as the seed's columns bind them (`NULL` for a model's).
pub(crate) fn seed_columns(readings: &Readings) -> (Option<f32>, Option<f32>) {
    (readings.temperature(), readings.energy())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct PhysicalRow {
    pub(crate) id: i32,
    pub(crate) device_id: String,
    pub(crate) device_timestamp: i64,
    timestamp: i64,
    pub(crate) temperature: Option<f32>,
    energy: Option<f32>,
}

impl PhysicalRow {
    pub(crate) fn into_state(
        self,
        models: &ModelReadingsById,
    ) -> Result<PhysicalState, StoreError> {
        Ok(PhysicalState {
            device_id: stored_device("physicalstate", self.id, &self.device_id)?,
            readings: row_readings(
                "physicalstate",
                self.id,
                self.id,
                self.temperature,
                self.energy,
                models,
            )?,
            id: self.id,
            device_timestamp: self.device_timestamp,
            timestamp: self.timestamp,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PendingRow {
    id: i32,
    pub(crate) physicalstate_id: i32,
    pub(crate) device_id: String,
    timestamp: i64,
    pub(crate) temperature: Option<f32>,
    energy: Option<f32>,
}

impl PendingRow {
    pub(crate) fn into_pending(
        self,
        models: &ModelReadingsById,
    ) -> Result<PendingDigitalState, StoreError> {
        Ok(PendingDigitalState {
            device_id: stored_device("digitalstate", self.id, &self.device_id)?,
            readings: row_readings(
                "digitalstate",
                self.id,
                self.physicalstate_id,
                self.temperature,
                self.energy,
                models,
            )?,
            id: self.id,
            physicalstate_id: self.physicalstate_id,
            timestamp: self.timestamp,
        })
    }
}

/// A digital state row as the twin handler reads it. Columns are optional because a seed
/// database may hold rows written without them.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DigitalRow {
    pub(crate) id: i32,
    pub(crate) physicalstate_id: Option<i32>,
    pub(crate) device_id: Option<String>,
    pub(crate) timestamp: Option<i64>,
    pub(crate) temperature: Option<f32>,
    energy: Option<f32>,
    availability: Option<f32>,
    reliability: Option<f32>,
    timeliness: Option<f32>,
    odte: Option<f32>,
    lifecycle: Option<String>,
    twin_lifecycle: Option<String>,
    twin_since: Option<i64>,
    twin_bound_at: Option<i64>,
    twin_evaluated_at: Option<i64>,
    pub(crate) window_states: i64,
    pub(crate) window_timely: i64,
}

impl DigitalRow {
    /// The stored pending part. Called after the caller checked device, physical state and
    /// timestamp against its input, so only the readings can be missing.
    pub(crate) fn pending(
        &self,
        id: i32,
        models: &ModelReadingsById,
    ) -> Result<PendingDigitalState, StoreError> {
        let missing =
            |column: &str| StoreError::Corrupt(format!("digitalstate row {id} has no {column}"));
        let physicalstate_id = self
            .physicalstate_id
            .ok_or_else(|| missing("physicalstate_id"))?;
        Ok(PendingDigitalState {
            id,
            physicalstate_id,
            device_id: stored_device(
                "digitalstate",
                id,
                self.device_id
                    .as_deref()
                    .ok_or_else(|| missing("device_id"))?,
            )?,
            timestamp: self.timestamp.ok_or_else(|| missing("timestamp"))?,
            readings: row_readings(
                "digitalstate",
                id,
                physicalstate_id,
                self.temperature,
                self.energy,
                models,
            )?,
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

    /// When the evaluation its twin row holds was made, if it has a twin row.
    pub(crate) fn twin_evaluated_at(&self) -> Option<i64> {
        self.twin_evaluated_at
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
