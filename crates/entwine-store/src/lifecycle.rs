//! The twin table: each twin's place in its lifecycle ([`entwine_core::twin`]), moved by the
//! twin handler on every evaluation ([`Store::evaluate_digital_state`]) and by the twin
//! evaluator at the current time ([`Store::reevaluate_twins`]). Both read the figures of a
//! window, evaluate them with [`entwine_core::evaluation::evaluate`] and write the answer.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use entwine_core::evaluation::{self, LifecycleChange, UpdateTimes, Window, WindowFigures};
use entwine_core::model::{by_profile, Profiles};
use entwine_core::odte::{Entanglement, OdteConfig};
use entwine_core::twin::{TwinLifecycle, TwinPosition};
use serde::{Deserialize, Serialize};

use crate::queries::{window_stats, Sql};
use crate::{Store, StoreError};

/// A twin that changed lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwinChange {
    /// The device it mirrors.
    pub device_id: String,
    /// Its lifecycle before (none for a new twin).
    pub from: Option<TwinLifecycle>,
    /// Its lifecycle now.
    pub to: TwinLifecycle,
    /// When it changed (ms): the twin time of the evaluation that changed it.
    pub at: i64,
    /// ODTE at that evaluation.
    pub odte: f32,
    /// Availability.
    pub availability: f32,
    /// Reliability.
    pub reliability: f32,
    /// Timeliness.
    pub timeliness: f32,
}

struct PositionRow {
    lifecycle: String,
    since: i64,
    bound_at: Option<i64>,
}

fn position(device: &str, row: PositionRow) -> Result<TwinPosition, StoreError> {
    Ok(TwinPosition {
        lifecycle: stored_twin_lifecycle(device, &row.lifecycle)?,
        since_ms: row.since,
        bound_ms: row.bound_at,
    })
}

pub(crate) fn stored_twin_lifecycle(device: &str, raw: &str) -> Result<TwinLifecycle, StoreError> {
    TwinLifecycle::parse(raw)
        .ok_or_else(|| StoreError::Corrupt(format!("twin {device:?}: unknown lifecycle {raw:?}")))
}

/// One twin row to upsert.
pub(crate) struct TwinRow<'a> {
    pub(crate) device_id: &'a str,
    pub(crate) position: TwinPosition,
    /// The latest digital state: id, twin timestamp, physical state (for its device timestamp).
    pub(crate) digitalstate_id: Option<i32>,
    pub(crate) last_update: Option<i64>,
    pub(crate) physicalstate_id: Option<i32>,
    pub(crate) evaluated_at: i64,
    pub(crate) figures: Figures,
}

/// A, R, T and ODTE as stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    availability: f32,
    reliability: f32,
    timeliness: f32,
    odte: f32,
}

impl Figures {
    /// An evaluation at the stored precision (`REAL`), as [`DigitalState::new`] rounds it.
    pub(crate) fn of(e: &Entanglement) -> Self {
        Self {
            availability: e.availability as f32,
            reliability: e.reliability as f32,
            timeliness: e.timeliness as f32,
            odte: e.odte as f32,
        }
    }
}

/// Rows per upsert statement when the evaluator writes every twin: bounds a statement's size.
const UPSERT_CHUNK: usize = 1000;

/// Writes twins' evaluations, set-based (one statement for all rows over `rows`, its text built
/// once): the figures and lifecycle only where no later evaluation is stored, the latest digital
/// state only where it is newer than the stored one (the handler and the evaluator may race;
/// neither may roll the other back). What each row holds after the statement comes back: a row
/// whose `evaluated_at` is not the one written kept a later evaluation, so this write's
/// lifecycle change did not happen. Rows must name distinct devices.
fn upsert_twins(rows: &str) -> String {
    let later = "excluded.evaluated_at >= twin.evaluated_at";
    let newer = "excluded.last_update IS NOT NULL \
                 AND (twin.last_update IS NULL OR excluded.last_update >= twin.last_update)";
    let sets: Vec<String> = [
        ("lifecycle", later),
        ("since", later),
        ("bound_at", later),
        ("availability", later),
        ("reliability", later),
        ("timeliness", later),
        ("odte", later),
        ("digitalstate_id", newer),
        ("last_device_timestamp", newer),
        ("last_update", newer),
        ("evaluated_at", later),
    ]
    .iter()
    .map(|(column, when)| {
        format!("{column} = CASE WHEN {when} THEN excluded.{column} ELSE twin.{column} END")
    })
    .collect();
    format!(
        "INSERT INTO twin (device_id, lifecycle, since, bound_at, digitalstate_id, last_update, \
                           last_device_timestamp, evaluated_at, availability, reliability, \
                           timeliness, odte) \
         SELECT b.device_id, b.lifecycle, b.since, b.bound_at, b.digitalstate_id, b.last_update, \
                (SELECT device_timestamp FROM physicalstate WHERE id = b.physicalstate_id), \
                b.evaluated_at, b.availability, b.reliability, b.timeliness, b.odte \
         FROM {rows} WHERE true \
         ON CONFLICT (device_id) DO UPDATE SET {} \
         RETURNING device_id, evaluated_at",
        sets.join(", ")
    )
}

static UPSERT_TWINS_PG: LazyLock<String> = LazyLock::new(|| {
    upsert_twins(
        "UNNEST($1::varchar[], $2::varchar[], $3::int8[], $4::int8[], $5::int4[], $6::int8[], \
            $7::int4[], $8::int8[], $9::float4[], $10::float4[], $11::float4[], $12::float4[]) \
     AS b(device_id, lifecycle, since, bound_at, digitalstate_id, last_update, physicalstate_id, \
          evaluated_at, availability, reliability, timeliness, odte)",
    )
});

static UPSERT_TWINS_LITE: LazyLock<String> = LazyLock::new(|| {
    upsert_twins(
        "(SELECT json_extract(value, '$[0]') AS device_id, json_extract(value, '$[1]') AS lifecycle, \
             json_extract(value, '$[2]') AS since, json_extract(value, '$[3]') AS bound_at, \
             json_extract(value, '$[4]') AS digitalstate_id, \
             json_extract(value, '$[5]') AS last_update, \
             json_extract(value, '$[6]') AS physicalstate_id, \
             json_extract(value, '$[7]') AS evaluated_at, \
             json_extract(value, '$[8]') AS availability, \
             json_extract(value, '$[9]') AS reliability, \
             json_extract(value, '$[10]') AS timeliness, json_extract(value, '$[11]') AS odte \
      FROM json_each(?1)) AS b",
    )
});

/// The devices whose row holds what was written (see [`upsert_twins`]).
fn applied(rows: &[TwinRow<'_>], held: Vec<(String, i64)>) -> HashSet<String> {
    let written: HashMap<&str, i64> = rows.iter().map(|r| (r.device_id, r.evaluated_at)).collect();
    held.into_iter()
        .filter(|(device, at)| written.get(device.as_str()) == Some(at))
        .map(|(device, _)| device)
        .collect()
}

/// Upserts twin rows on a PostgreSQL connection (a transaction's, or the pool's).
pub(crate) async fn upsert_pg(
    conn: &mut sqlx::PgConnection,
    rows: &[TwinRow<'_>],
) -> Result<HashSet<String>, StoreError> {
    let mut done = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(UPSERT_CHUNK) {
        let f = |get: fn(&TwinRow<'_>) -> f32| chunk.iter().map(get).collect::<Vec<f32>>();
        let held: Vec<(String, i64)> = sqlx::query_as(UPSERT_TWINS_PG.as_str())
            .bind(chunk.iter().map(|r| r.device_id).collect::<Vec<&str>>())
            .bind(
                chunk
                    .iter()
                    .map(|r| r.position.lifecycle.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|r| r.position.since_ms)
                    .collect::<Vec<i64>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|r| r.position.bound_ms)
                    .collect::<Vec<Option<i64>>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|r| r.digitalstate_id)
                    .collect::<Vec<Option<i32>>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|r| r.last_update)
                    .collect::<Vec<Option<i64>>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|r| r.physicalstate_id)
                    .collect::<Vec<Option<i32>>>(),
            )
            .bind(chunk.iter().map(|r| r.evaluated_at).collect::<Vec<i64>>())
            .bind(f(|r| r.figures.availability))
            .bind(f(|r| r.figures.reliability))
            .bind(f(|r| r.figures.timeliness))
            .bind(f(|r| r.figures.odte))
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        done.extend(applied(chunk, held));
    }
    Ok(done)
}

/// Upserts twin rows on a SQLite connection (a transaction's, or the pool's).
pub(crate) async fn upsert_lite(
    conn: &mut sqlx::SqliteConnection,
    rows: &[TwinRow<'_>],
) -> Result<HashSet<String>, StoreError> {
    let mut done = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(UPSERT_CHUNK) {
        let json: Vec<serde_json::Value> = chunk
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.device_id,
                    r.position.lifecycle.as_str(),
                    r.position.since_ms,
                    r.position.bound_ms,
                    r.digitalstate_id,
                    r.last_update,
                    r.physicalstate_id,
                    r.evaluated_at,
                    f64::from(r.figures.availability),
                    f64::from(r.figures.reliability),
                    f64::from(r.figures.timeliness),
                    f64::from(r.figures.odte),
                ])
            })
            .collect();
        let held: Vec<(String, i64)> = sqlx::query_as(UPSERT_TWINS_LITE.as_str())
            .bind(serde_json::Value::from(json).to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        done.extend(applied(chunk, held));
    }
    Ok(done)
}

/// Every twin with the counts of its window `[$1, $2]` (timely within `$3` ms), and its latest
/// digital state (the twin handler writes the twin row only when the lifecycle changes).
/// SQLite's form (its planner probes the index per twin); PostgreSQL's is [`WINDOWS_AT_PG`].
macro_rules! windows_at {
    ($filter:literal) => {
        concat!(
    "SELECT t.device_id, t.lifecycle, t.since, t.bound_at, \
            (SELECT MAX(x.timestamp) FROM digitalstate x WHERE x.device_id = t.device_id) \
                AS last_update, \
            (SELECT x.id FROM digitalstate x WHERE x.device_id = t.device_id \
             ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_id, \
            (SELECT x.physicalstate_id FROM digitalstate x WHERE x.device_id = t.device_id \
             ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_physical_id, \
            COUNT(w.digitalstate_id) AS window_states, \
            COALESCE(SUM(CASE WHEN w.timestamp - w.device_timestamp <= $3 THEN 1 ELSE 0 END), 0) \
                AS window_timely \
     FROM twin t \
     LEFT JOIN digitalstate_window w ON w.device_id = t.device_id \
          AND w.timestamp >= $1 AND w.timestamp <= $2 ",
            $filter,
            " GROUP BY t.device_id, t.lifecycle, t.since, t.bound_at \
     ORDER BY t.device_id"
        )
    };
}
static WINDOWS_AT: Sql = Sql::new(windows_at!(""));
/// [`WINDOWS_AT`] for the twins of one profile (`$4`, a JSON array of device ids).
static WINDOWS_AT_OF: Sql = Sql::new(windows_at!(
    "WHERE t.device_id IN (SELECT value FROM json_each($4))"
));

/// [`WINDOWS_AT`] in PostgreSQL's form: each twin's window counted in a `LATERAL` subquery, one
/// index range scan per twin, whatever the planner's statistics say (as a join it could hash
/// the whole window table).
macro_rules! windows_at_pg {
    ($filter:literal) => {
        concat!("\
    SELECT t.device_id, t.lifecycle, t.since, t.bound_at, \
           (SELECT MAX(x.timestamp) FROM digitalstate x WHERE x.device_id = t.device_id) \
               AS last_update, \
           (SELECT x.id FROM digitalstate x WHERE x.device_id = t.device_id \
            ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_id, \
           (SELECT x.physicalstate_id FROM digitalstate x WHERE x.device_id = t.device_id \
            ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_physical_id, \
           w.states AS window_states, w.timely AS window_timely \
    FROM twin t \
    CROSS JOIN LATERAL ( \
        SELECT COUNT(*) AS states, \
               COALESCE(SUM(CASE WHEN c.timestamp - c.device_timestamp <= $3 THEN 1 ELSE 0 END), 0) \
                   AS timely \
        FROM digitalstate_window c \
        WHERE c.device_id = t.device_id AND c.timestamp >= $1 AND c.timestamp <= $2) w ",
            $filter,
            " ORDER BY t.device_id"
        )
    };
}
static WINDOWS_AT_PG: &str = windows_at_pg!("");
/// [`WINDOWS_AT_PG`] for the twins of one profile (`$4`).
static WINDOWS_AT_OF_PG: &str = windows_at_pg!("WHERE t.device_id = ANY($4)");

/// Every device's twin timestamps in `[$1, $2]` (`before_window` = 0), and each twin's latest
/// one before `$1` (`before_window` = 1; no timestamp for a twin without one): what
/// availability needs of every twin, in one round trip.
static UPDATES_AT: Sql = Sql::new(
    "SELECT device_id, timestamp, 0 AS before_window FROM digitalstate \
     WHERE timestamp >= $1 AND timestamp <= $2 AND device_id IS NOT NULL \
     UNION ALL \
     SELECT t.device_id, \
            (SELECT MAX(x.timestamp) FROM digitalstate x \
             WHERE x.device_id = t.device_id AND x.timestamp < $1), \
            1 \
     FROM twin t \
     ORDER BY 1, 3, 2",
);

/// [`UPDATES_AT`] for the twins of one profile (`$3`).
static UPDATES_AT_OF_PG: &str = "\
    SELECT device_id, timestamp, 0 AS before_window FROM digitalstate \
    WHERE timestamp >= $1 AND timestamp <= $2 AND device_id = ANY($3) \
    UNION ALL \
    SELECT t.device_id, \
           (SELECT MAX(x.timestamp) FROM digitalstate x \
            WHERE x.device_id = t.device_id AND x.timestamp < $1), \
           1 \
    FROM twin t WHERE t.device_id = ANY($3) \
    ORDER BY 1, 3, 2";

static UPDATES_AT_OF_LITE: &str = "\
    SELECT device_id, timestamp, 0 AS before_window FROM digitalstate \
    WHERE timestamp >= ?1 AND timestamp <= ?2 \
      AND device_id IN (SELECT value FROM json_each(?3)) \
    UNION ALL \
    SELECT t.device_id, \
           (SELECT MAX(x.timestamp) FROM digitalstate x \
            WHERE x.device_id = t.device_id AND x.timestamp < ?1), \
           1 \
    FROM twin t WHERE t.device_id IN (SELECT value FROM json_each(?3)) \
    ORDER BY 1, 3, 2";

/// Every twin's device.
static TWIN_DEVICES: Sql = Sql::new("SELECT device_id FROM twin ORDER BY device_id");

#[derive(sqlx::FromRow)]
struct WindowRow {
    device_id: String,
    lifecycle: String,
    since: i64,
    bound_at: Option<i64>,
    last_update: Option<i64>,
    latest_id: Option<i32>,
    latest_physical_id: Option<i32>,
    window_states: i64,
    window_timely: i64,
}

impl Store {
    /// The twin evaluator's store work: re-evaluates every twin at `now_ms`
    /// ([`entwine_core::evaluation::evaluate`] on the figures of [`Store::twin_windows`]), so
    /// that a twin whose device fell silent loses reliability as its window empties, becomes
    /// disentangled, then unbound after the silence threshold. Refreshes every twin's figures
    /// and latest state; answers the lifecycle changes that were written (a twin the handler
    /// evaluated later than `now_ms` in between keeps that evaluation, and its change here is
    /// dropped).
    pub async fn reevaluate_twins(
        &self,
        now_ms: i64,
        profiles: &dyn Profiles,
    ) -> Result<Vec<TwinChange>, StoreError> {
        let windows = self.twin_windows(now_ms, profiles).await?;
        let mut changes = Vec::new();
        let mut rows = Vec::with_capacity(windows.len());
        for twin in &windows {
            let config = profiles.profile_of(&twin.device_id);
            let evaluation = evaluation::evaluate(
                config,
                now_ms,
                twin.last_update,
                Window::Read(&twin.figures),
                Some(twin.position),
            );
            let figures = Figures::of(&evaluation.entanglement);
            if let Some(change) = evaluation.change {
                changes.push(twin_change(&twin.device_id, change, now_ms, figures));
            }
            rows.push(TwinRow {
                device_id: &twin.device_id,
                position: evaluation.position,
                digitalstate_id: twin.latest_id,
                last_update: twin.last_update,
                physicalstate_id: twin.latest_physical_id,
                evaluated_at: now_ms,
                figures,
            });
        }
        // Every twin's refreshed figures and latest state, many rows per statement: a tick
        // costs a few statements, not one per twin.
        let applied = match self {
            Store::Postgres(pool) => {
                let mut conn = pool.acquire().await.map_err(StoreError::from_sqlx)?;
                upsert_pg(&mut conn, &rows).await?
            }
            Store::Sqlite(pool) => {
                let mut conn = pool.acquire().await.map_err(StoreError::from_sqlx)?;
                upsert_lite(&mut conn, &rows).await?
            }
        };
        changes.retain(|c| applied.contains(&c.device_id));
        Ok(changes)
    }

    /// What the twin evaluator reads at `now_ms`: every twin, its position, its latest update
    /// and the figures of its window `[now − window, now]` (one grouped query, and one more
    /// for the update times when `config` measures availability). The figures equal
    /// [`entwine_core::evaluation::WindowFigures::reference`] over each device's states.
    pub async fn twin_windows(
        &self,
        now_ms: i64,
        profiles: &dyn Profiles,
    ) -> Result<Vec<TwinWindow>, StoreError> {
        if let [config] = profiles.profiles() {
            return self.twin_windows_of(now_ms, config, None).await;
        }
        // Several profiles (device models): the twins grouped by profile, one grouped query
        // per profile in use, each with its own window.
        let devices: Vec<(String,)> = fetch!(self, TWIN_DEVICES, fetch_all, (String,))?;
        let groups = by_profile(profiles, devices.iter().map(|(d,)| (d.as_str(), d.clone())));
        let mut windows = Vec::new();
        for (index, devices) in &groups {
            let config = &profiles.profiles()[*index];
            windows.extend(self.twin_windows_of(now_ms, config, Some(devices)).await?);
        }
        windows.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(windows)
    }

    /// [`Store::twin_windows`] by one profile, of every twin or of `devices`.
    async fn twin_windows_of(
        &self,
        now_ms: i64,
        config: &OdteConfig,
        devices: Option<&[String]>,
    ) -> Result<Vec<TwinWindow>, StoreError> {
        let (start, end) = config.window_of(now_ms);
        let timely = config.timeliness_ms();
        let listed_json =
            || serde_json::Value::from(devices.unwrap_or_default().to_vec()).to_string();
        let rows: Vec<WindowRow> = match (self, devices) {
            (Store::Postgres(pool), None) => {
                sqlx::query_as(WINDOWS_AT_PG)
                    .bind(start)
                    .bind(end)
                    .bind(timely)
                    .fetch_all(pool)
                    .await
            }
            (Store::Postgres(pool), Some(devices)) => {
                sqlx::query_as(WINDOWS_AT_OF_PG)
                    .bind(start)
                    .bind(end)
                    .bind(timely)
                    .bind(devices)
                    .fetch_all(pool)
                    .await
            }
            (Store::Sqlite(pool), None) => {
                sqlx::query_as(WINDOWS_AT.sqlite())
                    .bind(start)
                    .bind(end)
                    .bind(timely)
                    .fetch_all(pool)
                    .await
            }
            (Store::Sqlite(pool), Some(_)) => {
                sqlx::query_as(WINDOWS_AT_OF.sqlite())
                    .bind(start)
                    .bind(end)
                    .bind(timely)
                    .bind(listed_json())
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(StoreError::from_sqlx)?;
        let measured = config.availability_max_gap_ms().is_some();
        let mut updates: HashMap<String, UpdateTimes> = HashMap::new();
        if measured {
            let listed: Vec<(String, Option<i64>, i32)> = match (self, devices) {
                (_, None) => fetch!(
                    self,
                    UPDATES_AT,
                    fetch_all,
                    (String, Option<i64>, i32),
                    start,
                    end
                )?,
                (Store::Postgres(pool), Some(devices)) => sqlx::query_as(UPDATES_AT_OF_PG)
                    .bind(start)
                    .bind(end)
                    .bind(devices)
                    .fetch_all(pool)
                    .await
                    .map_err(StoreError::from_sqlx)?,
                (Store::Sqlite(pool), Some(_)) => sqlx::query_as(UPDATES_AT_OF_LITE)
                    .bind(start)
                    .bind(end)
                    .bind(listed_json())
                    .fetch_all(pool)
                    .await
                    .map_err(StoreError::from_sqlx)?,
            };
            for (device, t, before_window) in listed {
                let times = updates.entry(device).or_default();
                match (before_window, t) {
                    (_, None) => {}
                    (0, Some(t)) => times.in_window.push(t),
                    (_, Some(t)) => times.before_window = Some(t),
                }
            }
        }
        rows.into_iter()
            .map(|row| {
                let position = position(
                    &row.device_id,
                    PositionRow {
                        lifecycle: row.lifecycle,
                        since: row.since,
                        bound_at: row.bound_at,
                    },
                )?;
                let updates = measured.then(|| updates.remove(&row.device_id).unwrap_or_default());
                Ok(TwinWindow {
                    position,
                    last_update: row.last_update,
                    figures: WindowFigures {
                        stats: window_stats(row.window_states, row.window_timely),
                        updates,
                    },
                    latest_id: row.latest_id,
                    latest_physical_id: row.latest_physical_id,
                    device_id: row.device_id,
                })
            })
            .collect()
    }
}

/// One twin as the twin evaluator reads it ([`Store::twin_windows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TwinWindow {
    /// The device it mirrors.
    pub device_id: String,
    /// Where it stood at its previous evaluation.
    pub position: TwinPosition,
    /// Its latest update: the largest timestamp of its digital states (ms).
    pub last_update: Option<i64>,
    /// The figures of its window.
    pub figures: WindowFigures,
    latest_id: Option<i32>,
    latest_physical_id: Option<i32>,
}

pub(crate) fn twin_change(
    device: &str,
    change: LifecycleChange,
    at: i64,
    figures: Figures,
) -> TwinChange {
    TwinChange {
        device_id: device.to_owned(),
        from: change.from,
        to: change.to,
        at,
        odte: figures.odte,
        availability: figures.availability,
        reliability: figures.reliability,
        timeliness: figures.timeliness,
    }
}
