//! History that stays fast: a twin's states downsampled into time buckets for charts
//! ([`Store::series`]), and retention ([`Store::apply_retention`]), which deletes old states
//! without touching any row a window evaluation reads.
//!
//! Both work per device through the `(device_id, timestamp)` indexes (migrations 0002 and
//! 0007), so their cost follows the states of one device in the range, not the table's size;
//! neither needs an index of its own (each would cost every write).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use entwine_core::model::Profiles;
use serde::Serialize;
use serde_json::Value;

use crate::queries::Sql;
use crate::{Store, StoreError};

/// Minimum, mean and maximum of one figure over a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Aggregate {
    /// The mean.
    pub avg: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

/// One non-empty time bucket of a [`Series`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// The bucket's start (ms): `from + k × step`.
    pub t: i64,
    /// How many digital states fall in it (evaluated or not).
    pub count: i64,
    /// ODTE over the bucket's evaluated states (`None`: none is evaluated).
    pub odte: Option<Aggregate>,
    /// Mean availability of its evaluated states.
    pub availability: Option<f64>,
    /// Mean reliability of its evaluated states.
    pub reliability: Option<f64>,
    /// Mean timeliness of its evaluated states.
    pub timeliness: Option<f64>,
    /// The seed's lifecycle word (`entangled`, `disentangled`) of the bucket's latest state
    /// (highest timestamp, then highest id); `None` if that state is not evaluated.
    pub lifecycle: Option<String>,
    /// Every numeric reading by name: the seed's `temperature` and `energy`, or a model's
    /// numeric properties (booleans and strings are skipped).
    pub readings: BTreeMap<String, Aggregate>,
}

/// A twin's digital states in `[from, to)`, grouped into buckets of `step` ms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// The device.
    pub device_id: String,
    /// The range's start (ms, included).
    pub from: i64,
    /// The range's end (ms, excluded).
    pub to: i64,
    /// The bucket width (ms).
    pub step: i64,
    /// The non-empty buckets, ascending `t`.
    pub buckets: Vec<Bucket>,
}

/// Retention as configured (`retention` in `entwine-config`): keep `keep` of history, run
/// every `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How much history is kept: states older than now − `keep` are deleted, unless a window
    /// needs them ([`retention_guard_ms`]).
    pub keep: Duration,
    /// How often retention runs.
    pub period: Duration,
}

/// What one run of [`Store::apply_retention`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// States older than this (ms) were deleted, `None` when retention is off (nothing
    /// deleted): `now − keep`, or earlier when the ODTE windows need more.
    pub cutoff_ms: Option<i64>,
    /// Digital states deleted (their `digitalstate_window` copies go with them).
    pub digital_states: u64,
    /// Physical states deleted (their model readings go with them).
    pub physical_states: u64,
    /// Dead letters deleted (`last_at` older than the cutoff).
    pub dead_letters: u64,
    /// How long the run took.
    pub duration: Duration,
}

/// Rows deleted per statement (and transaction) by retention: short transactions, bounded
/// memory (the ids returned), and the twin handler never waits long on a lock.
pub const RETENTION_BATCH: i64 = 10_000;

/// Added to the longest window and gap by [`retention_guard_ms`]: room for clock differences
/// between processes and for a state evaluated a little late.
pub const RETENTION_MARGIN_MS: i64 = 10 * 60 * 1000;

/// How far back from now retention must keep every state whatever `keep` says: the longest
/// window plus its availability gap over every profile, plus [`RETENTION_MARGIN_MS`].
pub fn retention_guard_ms(profiles: &dyn Profiles) -> i64 {
    profiles
        .profiles()
        .iter()
        .map(|p| {
            p.window_ms()
                .saturating_add(p.availability_max_gap_ms().unwrap_or(0))
        })
        .max()
        .unwrap_or(0)
        .saturating_add(RETENTION_MARGIN_MS)
}

/// The cutoff of a retention run: `now − keep`, never later than `now − guard`.
pub fn retention_cutoff(keep_ms: i64, now_ms: i64, guard_ms: i64) -> i64 {
    now_ms
        .saturating_sub(keep_ms.max(0))
        .min(now_ms.saturating_sub(guard_ms.max(0)))
}

/// One row of the series query: a bucket's figures (`name` NULL) or one reading's.
#[derive(Debug, sqlx::FromRow)]
struct SeriesRow {
    b: i64,
    name: Option<String>,
    count: i64,
    avg: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    availability: Option<f64>,
    reliability: Option<f64>,
    timeliness: Option<f64>,
    lifecycle: Option<String>,
}

/// The series query: the device's states in `[$2, $3)` by the `(device_id, timestamp)` index,
/// each with its bucket `(timestamp − $2) / $4` and its rank from the bucket's latest; then one
/// row per bucket (figures) and one per bucket and reading (the seed's columns, and a model's
/// numeric readings through the physical state, by its primary key, for rows without the
/// seed's). `$join`,
/// `$numeric` and `$number` are each backend's way to expand a JSON object into `(key, value)`
/// rows, keep the numbers and read one.
macro_rules! series_sql {
    ($join:literal, $numeric:literal, $number:literal) => {
        concat!(
            "WITH s AS ( \
                SELECT d.id, d.physicalstate_id, d.odte, d.availability, d.reliability, \
                       d.timeliness, d.lifecycle, d.temperature, d.energy, \
                       (d.timestamp - $2) / $4 AS b, \
                       ROW_NUMBER() OVER (PARTITION BY (d.timestamp - $2) / $4 \
                                          ORDER BY d.timestamp DESC, d.id DESC) AS rn \
                FROM digitalstate d \
                WHERE d.device_id = $1 AND d.timestamp >= $2 AND d.timestamp < $3) \
             SELECT b, CAST(NULL AS TEXT) AS name, COUNT(*) AS count, \
                    CAST(AVG(odte) AS DOUBLE PRECISION) AS avg, \
                    CAST(MIN(odte) AS DOUBLE PRECISION) AS min, \
                    CAST(MAX(odte) AS DOUBLE PRECISION) AS max, \
                    CAST(AVG(availability) AS DOUBLE PRECISION) AS availability, \
                    CAST(AVG(reliability) AS DOUBLE PRECISION) AS reliability, \
                    CAST(AVG(timeliness) AS DOUBLE PRECISION) AS timeliness, \
                    MAX(CASE WHEN rn = 1 THEN lifecycle END) AS lifecycle \
             FROM s GROUP BY b \
             UNION ALL \
             SELECT b, 'temperature', COUNT(*), CAST(AVG(temperature) AS DOUBLE PRECISION), \
                    CAST(MIN(temperature) AS DOUBLE PRECISION), \
                    CAST(MAX(temperature) AS DOUBLE PRECISION), NULL, NULL, NULL, NULL \
             FROM s WHERE temperature IS NOT NULL GROUP BY b \
             UNION ALL \
             SELECT b, 'energy', COUNT(*), CAST(AVG(energy) AS DOUBLE PRECISION), \
                    CAST(MIN(energy) AS DOUBLE PRECISION), CAST(MAX(energy) AS DOUBLE PRECISION), \
                    NULL, NULL, NULL, NULL \
             FROM s WHERE energy IS NOT NULL GROUP BY b \
             UNION ALL \
             SELECT s.b, e.key, COUNT(*), AVG(",
            $number,
            "), MIN(",
            $number,
            "), MAX(",
            $number,
            "), NULL, NULL, NULL, NULL \
             FROM s ",
            $join,
            " WHERE (s.temperature IS NULL OR s.energy IS NULL) AND ",
            $numeric,
            " GROUP BY s.b, e.key"
        )
    };
}

/// [`Store::series`]'s query in PostgreSQL's form (`$1` device, `$2` from, `$3` to, `$4` step),
/// for an `EXPLAIN` (`examples/history_bench.rs` prints its plan).
pub const SERIES_POSTGRES: &str = SERIES_PG;

const SERIES_PG: &str = series_sql!(
    "CROSS JOIN LATERAL (SELECT r.readings FROM physicalstate_reading r \
                         WHERE r.physicalstate_id = s.physicalstate_id) r \
     CROSS JOIN LATERAL jsonb_each(r.readings) e",
    "jsonb_typeof(e.value) = 'number'",
    "CAST(e.value AS DOUBLE PRECISION)"
);
static SERIES_LITE: Sql = Sql::new(series_sql!(
    "JOIN physicalstate_reading r ON r.physicalstate_id = s.physicalstate_id \
     JOIN json_each(r.readings) e",
    "e.type IN ('integer', 'real')",
    "CAST(e.value AS REAL)"
));

/// The latest twin timestamp of a device before the cutoff (kept: the last update before any
/// later window, which availability reads).
static LATEST_BEFORE: Sql =
    Sql::new("SELECT MAX(timestamp) FROM digitalstate WHERE device_id = $1 AND timestamp < $2");

/// Devices retention looks at: every twin, with its latest digital state (never deleted).
static TWINS: Sql = Sql::new("SELECT device_id, digitalstate_id FROM twin ORDER BY device_id");

/// At most `$4` digital states of device `$1` older than `$2`, never `$3` (the twin's latest).
/// PostgreSQL's form takes the ids as an array (one primary-key probe each): as `IN (…)` it
/// hashed them and scanned the whole table.
const DELETE_DIGITAL_PG: &str = "\
    DELETE FROM digitalstate WHERE id = ANY(ARRAY( \
        SELECT id FROM digitalstate WHERE device_id = $1 AND timestamp < $2 \
          AND id <> $3 LIMIT $4)) \
    RETURNING physicalstate_id";
const DELETE_DIGITAL_LITE: &str = "\
    DELETE FROM digitalstate WHERE id IN ( \
        SELECT id FROM digitalstate WHERE device_id = ?1 AND timestamp < ?2 \
          AND id <> ?3 LIMIT ?4) \
    RETURNING physicalstate_id";

/// The physical states of the digital states just deleted.
const DELETE_PHYSICAL_PG: &str = "DELETE FROM physicalstate WHERE id = ANY($1)";
const DELETE_PHYSICAL_LITE: &str =
    "DELETE FROM physicalstate WHERE id IN (SELECT value FROM json_each(?1))";

/// Physical states of device `$1` that never got a digital state (a chain cut short), both
/// timestamps older than `$2`, by the `(device_id, device_timestamp)` key; at most `$3`.
macro_rules! delete_orphans {
    ($open:literal, $close:literal) => {
        concat!(
            "DELETE FROM physicalstate WHERE id ",
            $open,
            "SELECT p.id FROM physicalstate p \
             WHERE p.device_id = $1 AND p.device_timestamp < $2 AND p.timestamp < $2 \
               AND NOT EXISTS (SELECT 1 FROM digitalstate d WHERE d.physicalstate_id = p.id) \
             LIMIT $3",
            $close
        )
    };
}
const DELETE_ORPHANS_PG: &str = delete_orphans!("= ANY(ARRAY(", "))");
static DELETE_ORPHANS_LITE: Sql = Sql::new(delete_orphans!("IN (", ")"));

/// Dead letters last refused before `$1`, oldest first, by `deadletter_last_at_idx`.
macro_rules! delete_dead_letters {
    ($open:literal, $close:literal) => {
        concat!(
            "DELETE FROM deadletter WHERE id ",
            $open,
            "SELECT id FROM deadletter WHERE last_at < $1 ORDER BY last_at, id LIMIT $2",
            $close
        )
    };
}
const DELETE_DEAD_LETTERS_PG: &str = delete_dead_letters!("= ANY(ARRAY(", "))");
static DELETE_DEAD_LETTERS_LITE: Sql = Sql::new(delete_dead_letters!("IN (", ")"));

impl Store {
    /// The digital states of `device_id` with a twin timestamp in `[from_ms, to_ms)`, in
    /// buckets of `step_ms` (bucket `k` holds `from + k × step ≤ timestamp < from + (k+1) ×
    /// step`), aggregated by the database in one query (never the rows themselves): per
    /// non-empty bucket its count, ODTE min/mean/max, mean A, R and T (states without figures
    /// skipped), the latest state's lifecycle, and each numeric reading's min/mean/max.
    ///
    /// Refuses (as [`StoreError::Rejected`]) `from_ms >= to_ms` or `step_ms <= 0`.
    pub async fn series(
        &self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        step_ms: i64,
    ) -> Result<Series, StoreError> {
        if from_ms >= to_ms {
            return Err(StoreError::Rejected(entwine_core::InputError::new(
                "from",
                format!("must be before to ({to_ms}), got {from_ms}"),
            )));
        }
        if step_ms <= 0 {
            return Err(StoreError::Rejected(entwine_core::InputError::new(
                "step",
                format!("must be above 0 ms, got {step_ms}"),
            )));
        }
        let rows: Vec<SeriesRow> = match self {
            Self::Postgres(pool) => {
                sqlx::query_as(SERIES_PG)
                    .bind(device_id)
                    .bind(from_ms)
                    .bind(to_ms)
                    .bind(step_ms)
                    .fetch_all(pool)
                    .await
            }
            Self::Sqlite(pool) => {
                sqlx::query_as(SERIES_LITE.sqlite())
                    .bind(device_id)
                    .bind(from_ms)
                    .bind(to_ms)
                    .bind(step_ms)
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(StoreError::from_sqlx)?;
        let mut buckets: BTreeMap<i64, Bucket> = BTreeMap::new();
        for row in rows {
            let t = from_ms.saturating_add(row.b.saturating_mul(step_ms));
            let bucket = buckets.entry(row.b).or_insert_with(|| Bucket {
                t,
                count: 0,
                odte: None,
                availability: None,
                reliability: None,
                timeliness: None,
                lifecycle: None,
                readings: BTreeMap::new(),
            });
            let aggregate = match (row.avg, row.min, row.max) {
                (Some(avg), Some(min), Some(max)) => Some(Aggregate { avg, min, max }),
                _ => None,
            };
            match row.name {
                None => {
                    bucket.count = row.count;
                    bucket.odte = aggregate;
                    bucket.availability = row.availability;
                    bucket.reliability = row.reliability;
                    bucket.timeliness = row.timeliness;
                    bucket.lifecycle = row.lifecycle;
                }
                Some(name) => {
                    if let Some(aggregate) = aggregate {
                        bucket.readings.insert(name, aggregate);
                    }
                }
            }
        }
        Ok(Series {
            device_id: device_id.to_owned(),
            from: from_ms,
            to: to_ms,
            step: step_ms,
            buckets: buckets.into_values().collect(),
        })
    }

    /// Deletes the history older than `now_ms − keep_ms` (nothing when `keep_ms` is `None`),
    /// and the dead letters last refused before the same cutoff. The cutoff is never later
    /// than `now_ms − guard_ms` ([`retention_guard_ms`]: the longest window and availability
    /// gap of every profile, and a margin), and per device the latest state before the cutoff
    /// is kept (the last update before any later window, which availability measures from),
    /// as is each twin's latest digital state and its physical state: no evaluation at or after
    /// `now_ms` reads anything deleted, so no ODTE changes.
    ///
    /// Per twin (the `twin` table's devices; states of a device that has no twin row are
    /// kept), in statements of at most [`RETENTION_BATCH`] rows, each its own transaction:
    /// digital states (their window copies cascade), then their physical states (their model
    /// readings cascade), then physical states older than the cutoff that never got a digital
    /// state. Counts `entwine_retention_deleted_total{table}`.
    pub async fn apply_retention(
        &self,
        keep_ms: Option<i64>,
        now_ms: i64,
        guard_ms: i64,
    ) -> Result<RetentionReport, StoreError> {
        let started = Instant::now();
        let mut report = RetentionReport {
            cutoff_ms: None,
            digital_states: 0,
            physical_states: 0,
            dead_letters: 0,
            duration: Duration::ZERO,
        };
        let Some(keep_ms) = keep_ms else {
            return Ok(report);
        };
        let cutoff = retention_cutoff(keep_ms, now_ms, guard_ms);
        report.cutoff_ms = Some(cutoff);
        let twins: Vec<(String, Option<i32>)> =
            fetch!(self, TWINS, fetch_all, (String, Option<i32>))?;
        for (device, latest) in twins {
            let before: (Option<i64>,) = fetch!(
                self,
                LATEST_BEFORE,
                fetch_one,
                (Option<i64>,),
                &device,
                cutoff
            )?;
            if let Some(before) = before.0 {
                // Strictly older than the latest state before the cutoff: that one is kept.
                let latest = latest.unwrap_or(0);
                loop {
                    let (digital, physical) =
                        self.delete_digital_batch(&device, before, latest).await?;
                    report.digital_states += digital;
                    report.physical_states += physical;
                    count("digitalstate", digital);
                    count("physicalstate", physical);
                    if digital < RETENTION_BATCH as u64 {
                        break;
                    }
                }
            }
            loop {
                let orphans = delete_orphans(self, &device, cutoff).await?;
                report.physical_states += orphans;
                count("physicalstate", orphans);
                if orphans < RETENTION_BATCH as u64 {
                    break;
                }
            }
        }
        loop {
            let deleted = match self {
                Self::Postgres(pool) => sqlx::query(DELETE_DEAD_LETTERS_PG)
                    .bind(cutoff)
                    .bind(RETENTION_BATCH)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected()),
                Self::Sqlite(pool) => sqlx::query(DELETE_DEAD_LETTERS_LITE.sqlite())
                    .bind(cutoff)
                    .bind(RETENTION_BATCH)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected()),
            }
            .map_err(StoreError::from_sqlx)?;
            report.dead_letters += deleted;
            count("deadletter", deleted);
            if deleted < RETENTION_BATCH as u64 {
                break;
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    /// One transaction: at most [`RETENTION_BATCH`] digital states of `device` older than
    /// `before` (never `latest`), and their physical states. Answers both counts.
    async fn delete_digital_batch(
        &self,
        device: &str,
        before: i64,
        latest: i32,
    ) -> Result<(u64, u64), StoreError> {
        let result: Result<(u64, u64), sqlx::Error> = match self {
            Self::Postgres(pool) => {
                async {
                    let mut tx = pool.begin().await?;
                    let ids: Vec<(Option<i32>,)> = sqlx::query_as(DELETE_DIGITAL_PG)
                        .bind(device)
                        .bind(before)
                        .bind(latest)
                        .bind(RETENTION_BATCH)
                        .fetch_all(&mut *tx)
                        .await?;
                    let physical: Vec<i32> = ids.iter().filter_map(|r| r.0).collect();
                    let deleted = sqlx::query(DELETE_PHYSICAL_PG)
                        .bind(&physical)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok((ids.len() as u64, deleted))
                }
                .await
            }
            Self::Sqlite(pool) => {
                async {
                    let mut tx = pool.begin().await?;
                    let ids: Vec<(Option<i32>,)> = sqlx::query_as(DELETE_DIGITAL_LITE)
                        .bind(device)
                        .bind(before)
                        .bind(latest)
                        .bind(RETENTION_BATCH)
                        .fetch_all(&mut *tx)
                        .await?;
                    let physical: Vec<i32> = ids.iter().filter_map(|r| r.0).collect();
                    let deleted = sqlx::query(DELETE_PHYSICAL_LITE)
                        .bind(Value::from(physical).to_string())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok((ids.len() as u64, deleted))
                }
                .await
            }
        };
        result.map_err(StoreError::from_sqlx)
    }
}

async fn delete_orphans(store: &Store, device: &str, cutoff: i64) -> Result<u64, StoreError> {
    match store {
        Store::Postgres(pool) => sqlx::query(DELETE_ORPHANS_PG)
            .bind(device)
            .bind(cutoff)
            .bind(RETENTION_BATCH)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
        Store::Sqlite(pool) => sqlx::query(DELETE_ORPHANS_LITE.sqlite())
            .bind(device)
            .bind(cutoff)
            .bind(RETENTION_BATCH)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
    }
    .map_err(StoreError::from_sqlx)
}

fn count(table: &'static str, deleted: u64) {
    if deleted > 0 {
        metrics::counter!("entwine_retention_deleted_total", "table" => table).increment(deleted);
    }
}
