//! The twin table: each twin's place in its lifecycle ([`entwine_core::twin`]), advanced by the
//! twin handler on every evaluation and by the twin evaluator at the current time.

use std::collections::{HashMap, HashSet};

use entwine_core::odte::{OdteConfig, WindowStats};
use entwine_core::state::DigitalState;
use entwine_core::twin::{availability, next_position, TwinLifecycle, TwinPosition};
use serde::{Deserialize, Serialize};

use crate::queries::Sql;
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
struct TwinRow<'a> {
    device_id: &'a str,
    position: TwinPosition,
    /// The latest digital state: id, twin timestamp, physical state (for its device timestamp).
    digitalstate_id: Option<i32>,
    last_update: Option<i64>,
    physicalstate_id: Option<i32>,
    evaluated_at: i64,
    figures: Figures,
}

/// A, R, T and ODTE as stored.
#[derive(Debug, Clone, Copy)]
struct Figures {
    availability: f32,
    reliability: f32,
    timeliness: f32,
    odte: f32,
}

/// Rows per upsert statement: 12 parameters each stays far below both backends' limits.
const UPSERT_CHUNK: usize = 500;

/// Writes twins' evaluations, many per statement: the figures and lifecycle only where no later
/// evaluation is stored, the latest digital state only where it is newer than the stored one
/// (the handler and the evaluator may race; neither may roll the other back).
fn upsert_sql(rows: usize, postgres: bool) -> String {
    let mut sql = String::from(
        "INSERT INTO twin (device_id, lifecycle, since, bound_at, digitalstate_id, last_update, \
                           last_device_timestamp, evaluated_at, availability, reliability, \
                           timeliness, odte) VALUES ",
    );
    let p = |n: usize| {
        if postgres {
            format!("${n}")
        } else {
            format!("?{n}")
        }
    };
    for row in 0..rows {
        let b = row * 12;
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "({}, {}, {}, {}, {}, {}, (SELECT device_timestamp FROM physicalstate WHERE id = {}), \
             {}, {}, {}, {}, {})",
            p(b + 1),
            p(b + 2),
            p(b + 3),
            p(b + 4),
            p(b + 5),
            p(b + 6),
            p(b + 7),
            p(b + 8),
            p(b + 9),
            p(b + 10),
            p(b + 11),
            p(b + 12)
        ));
    }
    let later = "excluded.evaluated_at >= twin.evaluated_at";
    let newer = "excluded.last_update IS NOT NULL \
                 AND (twin.last_update IS NULL OR excluded.last_update >= twin.last_update)";
    sql.push_str(" ON CONFLICT (device_id) DO UPDATE SET ");
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
    sql.push_str(&sets.join(", "));
    // What each row holds after the statement: a row whose `evaluated_at` is not the one
    // written kept a later evaluation, so this write's lifecycle change did not happen.
    sql.push_str(" RETURNING device_id, evaluated_at");
    sql
}

/// The twin timestamps of device `$1` from its last update before `$2` (or `$2`) to `$3`.
static UPDATES_OF_DEVICE: Sql = Sql::new(
    "SELECT timestamp FROM digitalstate \
     WHERE device_id = $1 AND timestamp <= $3 \
       AND timestamp >= COALESCE( \
             (SELECT MAX(timestamp) FROM digitalstate WHERE device_id = $1 AND timestamp < $2), \
             $2) \
     ORDER BY timestamp",
);

/// Every twin with the counts of its window `[$1, $2]` (timely within `$3` ms), and its latest
/// digital state (the twin handler writes the twin row only when the lifecycle changes).
static WINDOWS_AT: Sql = Sql::new(
    "SELECT t.device_id, t.lifecycle, t.since, t.bound_at, \
            (SELECT MAX(x.timestamp) FROM digitalstate x WHERE x.device_id = t.device_id) \
                AS last_update, \
            (SELECT x.id FROM digitalstate x WHERE x.device_id = t.device_id \
             ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_id, \
            (SELECT x.physicalstate_id FROM digitalstate x WHERE x.device_id = t.device_id \
             ORDER BY x.timestamp DESC, x.id DESC LIMIT 1) AS latest_physical_id, \
            COUNT(p.id) AS window_states, \
            COALESCE(SUM(CASE WHEN w.timestamp - p.device_timestamp <= $3 THEN 1 ELSE 0 END), 0) \
                AS window_timely \
     FROM twin t \
     LEFT JOIN digitalstate w ON w.device_id = t.device_id \
          AND w.timestamp >= $1 AND w.timestamp <= $2 \
     LEFT JOIN physicalstate p ON p.id = w.physicalstate_id \
     GROUP BY t.device_id, t.lifecycle, t.since, t.bound_at \
     ORDER BY t.device_id",
);

/// Every device's twin timestamps in `[$1, $2]`.
static UPDATES_BETWEEN: Sql = Sql::new(
    "SELECT device_id, timestamp FROM digitalstate \
     WHERE timestamp >= $1 AND timestamp <= $2 AND device_id IS NOT NULL \
     ORDER BY device_id, timestamp",
);

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

/// Binds the upsert's parameters for one backend's query.
macro_rules! bind_rows {
    ($query:expr, $rows:expr) => {{
        let mut query = $query;
        for r in $rows {
            query = query
                .bind(r.device_id)
                .bind(r.position.lifecycle.as_str())
                .bind(r.position.since_ms)
                .bind(r.position.bound_ms)
                .bind(r.digitalstate_id)
                .bind(r.last_update)
                .bind(r.physicalstate_id)
                .bind(r.evaluated_at)
                .bind(r.figures.availability)
                .bind(r.figures.reliability)
                .bind(r.figures.timeliness)
                .bind(r.figures.odte);
        }
        query
    }};
}

impl Store {
    /// Upserts twin rows, [`UPSERT_CHUNK`] per statement. Answers the devices whose row took
    /// this write's lifecycle and figures (the others hold a later evaluation).
    async fn upsert(&self, rows: &[TwinRow<'_>]) -> Result<HashSet<String>, StoreError> {
        let mut applied = HashSet::with_capacity(rows.len());
        for chunk in rows.chunks(UPSERT_CHUNK) {
            let held: Vec<(String, i64)> = match self {
                Store::Postgres(pool) => {
                    let sql = upsert_sql(chunk.len(), true);
                    bind_rows!(sqlx::query_as(&sql), chunk)
                        .fetch_all(pool)
                        .await
                }
                Store::Sqlite(pool) => {
                    let sql = upsert_sql(chunk.len(), false);
                    bind_rows!(sqlx::query_as(&sql), chunk)
                        .fetch_all(pool)
                        .await
                }
            }
            .map_err(StoreError::from_sqlx)?;
            let written: HashMap<&str, i64> = chunk
                .iter()
                .map(|r| (r.device_id, r.evaluated_at))
                .collect();
            applied.extend(
                held.into_iter()
                    .filter(|(device, at)| written.get(device.as_str()) == Some(at))
                    .map(|(device, _)| device),
            );
        }
        Ok(applied)
    }

    /// The measured availability of `device` at `t_ms`, when `config` defines availability.
    pub(crate) async fn availability_of(
        &self,
        device: &str,
        t_ms: i64,
        config: &OdteConfig,
    ) -> Result<Option<f64>, StoreError> {
        let Some(max_gap) = config.availability_max_gap_ms() else {
            return Ok(None);
        };
        let (start, _) = config.window_of(t_ms);
        let rows: Vec<(i64,)> = fetch!(
            self,
            UPDATES_OF_DEVICE,
            fetch_all,
            (i64,),
            device,
            start,
            t_ms
        )?;
        let updates: Vec<i64> = rows.into_iter().map(|(t,)| t).collect();
        Ok(Some(availability(
            &updates,
            t_ms,
            config.window_ms(),
            max_gap,
        )))
    }

    /// Moves a twin from `previous` by the evaluation `state`. The row is written only when the
    /// lifecycle changes: between changes it would only repeat the figures of the digital
    /// state, and the hot path saves a write per event (the evaluator refreshes the figures).
    pub(crate) async fn advance_from(
        &self,
        previous: Option<TwinPosition>,
        state: &DigitalState,
        config: &OdteConfig,
    ) -> Result<Option<TwinChange>, StoreError> {
        let device = state.pending.device_id.as_str();
        let t = state.pending.timestamp;
        let next = next_position(
            previous,
            t,
            Some(t),
            f64::from(state.odte),
            config.threshold(),
            config.window_ms(),
            config.silence_ms(),
        );
        let figures = Figures {
            availability: state.availability,
            reliability: state.reliability,
            timeliness: state.timeliness,
            odte: state.odte,
        };
        let Some(change) = change(device, previous, next, t, figures) else {
            return Ok(None);
        };
        let applied = self
            .upsert(&[TwinRow {
                device_id: device,
                position: next,
                digitalstate_id: Some(state.pending.id),
                last_update: Some(t),
                physicalstate_id: Some(state.pending.physicalstate_id),
                evaluated_at: t,
                figures,
            }])
            .await?;
        // A stale evaluation (a redelivered old state) is refused by the upsert: its change
        // never happened, so it is not announced.
        Ok(applied.contains(device).then_some(change))
    }

    /// Re-evaluates every twin at `now_ms` (the twin evaluator): a twin whose device fell
    /// silent loses reliability as its window empties, becomes disentangled, then unbound after
    /// the silence threshold. Answers the lifecycle changes.
    pub async fn evaluate_twins(
        &self,
        now_ms: i64,
        config: &OdteConfig,
    ) -> Result<Vec<TwinChange>, StoreError> {
        let (start, end) = config.window_of(now_ms);
        let rows: Vec<WindowRow> = fetch!(
            self,
            WINDOWS_AT,
            fetch_all,
            WindowRow,
            start,
            end,
            config.timeliness_ms()
        )?;
        let mut updates: HashMap<String, Vec<i64>> = HashMap::new();
        let max_gap = config.availability_max_gap_ms();
        if let Some(gap) = max_gap {
            let listed: Vec<(String, i64)> = fetch!(
                self,
                UPDATES_BETWEEN,
                fetch_all,
                (String, i64),
                start.saturating_sub(gap),
                end
            )?;
            for (device, t) in listed {
                updates.entry(device).or_default().push(t);
            }
        }
        let mut changes = Vec::new();
        let mut upserts = Vec::with_capacity(rows.len());
        for row in rows {
            let previous = position(
                &row.device_id,
                PositionRow {
                    lifecycle: row.lifecycle.clone(),
                    since: row.since,
                    bound_at: row.bound_at,
                },
            )?;
            let a = match max_gap {
                None => 1.0,
                Some(gap) => {
                    let mut times = updates.remove(&row.device_id).unwrap_or_default();
                    // Updates before the listed range: the gap that straddles it started
                    // earlier than the range, which is all the availability needs to know.
                    let earlier = start.saturating_sub(gap);
                    if row.bound_at.is_some_and(|b| b < earlier)
                        && times.first().is_none_or(|first| *first >= start)
                    {
                        times.insert(0, earlier - 1);
                    }
                    availability(&times, now_ms, config.window_ms(), gap)
                }
            };
            let e = config.evaluate_with(
                WindowStats {
                    states: u64::try_from(row.window_states).unwrap_or(0),
                    timely: u64::try_from(row.window_timely).unwrap_or(0),
                },
                a,
            );
            let next = next_position(
                Some(previous),
                now_ms,
                row.last_update,
                e.odte,
                config.threshold(),
                config.window_ms(),
                config.silence_ms(),
            );
            let figures = Figures {
                availability: e.availability as f32,
                reliability: e.reliability as f32,
                timeliness: e.timeliness as f32,
                odte: e.odte as f32,
            };
            changes.extend(change(
                &row.device_id,
                Some(previous),
                next,
                now_ms,
                figures,
            ));
            upserts.push((row, next, figures));
        }
        // Every twin's refreshed figures and latest state, many rows per statement: a tick
        // costs a few statements, not one per twin.
        let rows: Vec<TwinRow<'_>> = upserts
            .iter()
            .map(|(row, next, figures)| TwinRow {
                device_id: &row.device_id,
                position: *next,
                digitalstate_id: row.latest_id,
                last_update: row.last_update,
                physicalstate_id: row.latest_physical_id,
                evaluated_at: now_ms,
                figures: *figures,
            })
            .collect();
        let applied = self.upsert(&rows).await?;
        // A twin the handler evaluated later than `now` in between keeps that evaluation.
        changes.retain(|c| applied.contains(&c.device_id));
        Ok(changes)
    }
}

fn change(
    device: &str,
    previous: Option<TwinPosition>,
    next: TwinPosition,
    at: i64,
    figures: Figures,
) -> Option<TwinChange> {
    let from = previous.map(|p| p.lifecycle);
    (from != Some(next.lifecycle)).then(|| TwinChange {
        device_id: device.to_owned(),
        from,
        to: next.lifecycle,
        at,
        odte: figures.odte,
        availability: figures.availability,
        reliability: figures.reliability,
        timeliness: figures.timeliness,
    })
}
