//! Reading the twins back: each device's latest evaluation, and its history.

use entwine_core::odte::SeedLifecycle;
use entwine_core::state::Readings;
use entwine_core::twin::TwinLifecycle;
use serde::Serialize;

use crate::lifecycle::stored_twin_lifecycle;
use crate::queries::{row_readings, Sql};
use crate::{stored_lifecycle, Store, StoreError};

/// A twin as it stands (the twin table): its lifecycle and its latest evaluation, by the twin
/// handler or by the twin evaluator.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TwinStatus {
    /// The device it mirrors.
    pub device_id: String,
    /// `unbound`, `bound`, `entangled` or `disentangled`.
    pub lifecycle: TwinLifecycle,
    /// Since when (ms).
    pub since: i64,
    /// Latest ODTE.
    pub odte: f32,
    /// Its availability.
    pub availability: f32,
    /// Its reliability.
    pub reliability: f32,
    /// Its timeliness.
    pub timeliness: f32,
    /// When these figures were computed (ms).
    pub evaluated_at: i64,
    /// The device's timestamp of the latest mirrored event (ms).
    pub last_physical_timestamp: Option<i64>,
    /// When the twin mirrored it (ms).
    pub last_digital_timestamp: Option<i64>,
    /// The latest digital state.
    pub digital_state_id: Option<i32>,
    /// The device model it mirrors (none: the seed's device). Filled in by the twins API,
    /// which knows the models; the store has no binding of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// One evaluated digital state of a twin's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// `digitalstate.id`.
    pub id: i32,
    /// The physical state it mirrors.
    pub physicalstate_id: i32,
    /// The device's timestamp (ms).
    pub device_timestamp: i64,
    /// The twin's timestamp (ms).
    pub timestamp: i64,
    /// What the device measured: the seed's `temperature` and `energy`, or a model's
    /// `model`, `model_version` and `readings`.
    #[serde(flatten)]
    pub readings: Readings,
    /// A.
    pub availability: f32,
    /// R.
    pub reliability: f32,
    /// T.
    pub timeliness: f32,
    /// ODTE.
    pub odte: f32,
    /// The lifecycle after this state.
    pub lifecycle: SeedLifecycle,
}

/// The rows of the devices whose id starts with a prefix: what a benchmark checks for lost and
/// duplicated events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, sqlx::FromRow)]
pub struct Tally {
    /// Physical states.
    pub physical: i64,
    /// Distinct `(device_id, device_timestamp)` among them: the events they record.
    pub events: i64,
    /// Digital states, evaluated or not.
    pub digital: i64,
    /// Digital states with their ODTE.
    pub evaluated: i64,
}

static TALLY: Sql = Sql::new(
    "SELECT \
       (SELECT COUNT(*) FROM physicalstate \
          WHERE substr(device_id, 1, length(CAST($1 AS TEXT))) = $1) AS physical, \
       (SELECT COUNT(*) FROM (SELECT DISTINCT device_id, device_timestamp FROM physicalstate \
          WHERE substr(device_id, 1, length(CAST($1 AS TEXT))) = $1) AS keys) AS events, \
       (SELECT COUNT(*) FROM digitalstate \
          WHERE substr(device_id, 1, length(CAST($1 AS TEXT))) = $1) AS digital, \
       (SELECT COUNT(*) FROM digitalstate \
          WHERE substr(device_id, 1, length(CAST($1 AS TEXT))) = $1 AND odte IS NOT NULL) \
          AS evaluated",
);

#[derive(sqlx::FromRow)]
struct StatusRow {
    device_id: String,
    lifecycle: String,
    since: i64,
    evaluated_at: i64,
    digitalstate_id: Option<i32>,
    last_update: Option<i64>,
    last_device_timestamp: Option<i64>,
    availability: f32,
    reliability: f32,
    timeliness: f32,
    odte: f32,
}

impl StatusRow {
    fn into_status(self) -> Result<TwinStatus, StoreError> {
        Ok(TwinStatus {
            lifecycle: stored_twin_lifecycle(&self.device_id, &self.lifecycle)?,
            device_id: self.device_id,
            since: self.since,
            odte: self.odte,
            availability: self.availability,
            reliability: self.reliability,
            timeliness: self.timeliness,
            evaluated_at: self.evaluated_at,
            last_physical_timestamp: self.last_device_timestamp,
            last_digital_timestamp: self.last_update,
            digital_state_id: self.digitalstate_id,
            model: None,
        })
    }
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    id: i32,
    physicalstate_id: i32,
    device_timestamp: i64,
    timestamp: i64,
    temperature: Option<f32>,
    energy: Option<f32>,
    availability: f32,
    reliability: f32,
    timeliness: f32,
    odte: f32,
    lifecycle: String,
}

/// Every twin, from the twin table.
static TWINS: Sql = Sql::new(
    "SELECT device_id, lifecycle, since, evaluated_at, digitalstate_id, last_update, \
            last_device_timestamp, availability, reliability, timeliness, odte \
     FROM twin ORDER BY device_id",
);

/// One twin.
static TWIN: Sql = Sql::new(
    "SELECT device_id, lifecycle, since, evaluated_at, digitalstate_id, last_update, \
            last_device_timestamp, availability, reliability, timeliness, odte \
     FROM twin WHERE device_id = $1",
);

/// A twin's evaluated states from `since` ($2) up to, not including, the cursor
/// (timestamp $3, id $5), newest first.
static HISTORY: Sql = Sql::new(
    "SELECT d.id, d.physicalstate_id, p.device_timestamp, d.timestamp, d.temperature, d.energy, \
            d.availability, d.reliability, d.timeliness, d.odte, d.lifecycle \
     FROM digitalstate d JOIN physicalstate p ON p.id = d.physicalstate_id \
     WHERE d.device_id = $1 AND d.odte IS NOT NULL AND d.timestamp >= $2 \
       AND (d.timestamp < $3 OR (d.timestamp = $3 AND d.id < $5)) \
     ORDER BY d.timestamp DESC, d.id DESC LIMIT $4",
);

/// Where a history page ends: the (timestamp, id) of its oldest entry; the next page starts
/// strictly before it, so entries that share a millisecond are neither skipped nor repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    /// Timestamp of the last entry seen (ms).
    pub timestamp: i64,
    /// Its id.
    pub id: i32,
}

impl HistoryCursor {
    /// The cursor before everything: the newest entries first.
    pub const START: Self = Self {
        timestamp: i64::MAX,
        id: i32::MAX,
    };
}

impl Store {
    /// Every twin, ordered by device id.
    pub async fn twins(&self) -> Result<Vec<TwinStatus>, StoreError> {
        let rows: Vec<StatusRow> = fetch!(self, TWINS, fetch_all, StatusRow)?;
        rows.into_iter().map(StatusRow::into_status).collect()
    }

    /// Counts the rows of the devices whose id starts with `prefix`.
    pub async fn tally(&self, prefix: &str) -> Result<Tally, StoreError> {
        fetch!(self, TALLY, fetch_one, Tally, prefix)
    }

    /// One twin, or `None` when the device has none.
    pub async fn twin(&self, device_id: &str) -> Result<Option<TwinStatus>, StoreError> {
        let row: Option<StatusRow> = fetch!(self, TWIN, fetch_optional, StatusRow, device_id)?;
        row.map(StatusRow::into_status).transpose()
    }

    /// A twin's evaluated states with `timestamp ≥ since_ms` that come before `cursor`, newest
    /// first, at most `limit` of them.
    pub async fn history(
        &self,
        device_id: &str,
        since_ms: i64,
        cursor: HistoryCursor,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows: Vec<HistoryRow> = fetch!(
            self,
            HISTORY,
            fetch_all,
            HistoryRow,
            device_id,
            since_ms,
            cursor.timestamp,
            i64::from(limit),
            cursor.id
        )?;
        let models = self
            .model_readings(
                rows.iter()
                    .filter(|r| r.temperature.is_none())
                    .map(|r| r.physicalstate_id),
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(HistoryEntry {
                    readings: row_readings(
                        "digitalstate",
                        r.id,
                        r.physicalstate_id,
                        r.temperature,
                        r.energy,
                        &models,
                    )?,
                    lifecycle: stored_lifecycle(r.id, &r.lifecycle)?,
                    id: r.id,
                    physicalstate_id: r.physicalstate_id,
                    device_timestamp: r.device_timestamp,
                    timestamp: r.timestamp,
                    availability: r.availability,
                    reliability: r.reliability,
                    timeliness: r.timeliness,
                    odte: r.odte,
                })
            })
            .collect()
    }
}
