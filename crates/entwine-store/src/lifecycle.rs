//! The twin table: each twin's place in its lifecycle ([`entwine_core::twin`]), moved by the
//! twin handler on every evaluation ([`Store::evaluate_digital_state`]) and by the twin
//! evaluator at the current time ([`Store::reevaluate_twins`]). Both read the figures of a
//! window, evaluate them with [`entwine_core::evaluation::evaluate`] and write the answer.

use std::collections::{HashMap, HashSet};

use entwine_core::evaluation::{
    self, LifecycleChange, TwinEvaluation, UpdateTimes, Window, WindowFigures,
};
use entwine_core::odte::{Entanglement, OdteConfig};
use entwine_core::state::DigitalState;
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

impl Figures {
    /// An evaluation at the stored precision (`REAL`), as [`DigitalState::new`] rounds it.
    fn of(e: &Entanglement) -> Self {
        Self {
            availability: e.availability as f32,
            reliability: e.reliability as f32,
            timeliness: e.timeliness as f32,
            odte: e.odte as f32,
        }
    }
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

/// The twin timestamps of device `$1` from its last update before `$2` (or `$2`) to `$3`, of
/// its states up to digital state `$4` (those written after it are not its history, even when
/// a batch stamped them with the same time).
static UPDATES_OF_DEVICE: Sql = Sql::new(
    "SELECT timestamp FROM digitalstate \
     WHERE device_id = $1 AND timestamp <= $3 AND id <= $4 \
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

    /// The update times of `device` that availability needs at `t_ms`, when `config` measures
    /// it: the last one before the window and those in it.
    pub(crate) async fn updates_of(
        &self,
        device: &str,
        t_ms: i64,
        up_to_id: i32,
        config: &OdteConfig,
    ) -> Result<Option<UpdateTimes>, StoreError> {
        if config.availability_max_gap_ms().is_none() {
            return Ok(None);
        }
        let (start, _) = config.window_of(t_ms);
        let rows: Vec<(i64,)> = fetch!(
            self,
            UPDATES_OF_DEVICE,
            fetch_all,
            (i64,),
            device,
            start,
            t_ms,
            up_to_id
        )?;
        let mut updates = UpdateTimes::default();
        for (t,) in rows {
            if t < start {
                updates.before_window = updates.before_window.max(Some(t));
            } else {
                updates.in_window.push(t);
            }
        }
        Ok(Some(updates))
    }

    /// Writes the twin handler's lifecycle change, if its evaluation made one, and answers it
    /// when the write applied. The row is written only on a change: between changes it would
    /// only repeat the figures of the digital state, and the hot path saves a write per event
    /// (the evaluator refreshes the figures).
    pub(crate) async fn record_twin_change(
        &self,
        state: &DigitalState,
        evaluation: &TwinEvaluation,
    ) -> Result<Option<TwinChange>, StoreError> {
        let Some(change) = evaluation.change else {
            return Ok(None);
        };
        let device = state.pending.device_id.as_str();
        let t = state.pending.timestamp;
        let figures = Figures::of(&evaluation.entanglement);
        let applied = self
            .upsert(&[TwinRow {
                device_id: device,
                position: evaluation.position,
                digitalstate_id: Some(state.pending.id),
                last_update: Some(t),
                physicalstate_id: Some(state.pending.physicalstate_id),
                evaluated_at: t,
                figures,
            }])
            .await?;
        // A stale evaluation (a redelivered old state) is refused by the upsert: its change
        // never happened, so it is not announced.
        Ok(applied
            .contains(device)
            .then(|| twin_change(device, change, t, figures)))
    }

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
        config: &OdteConfig,
    ) -> Result<Vec<TwinChange>, StoreError> {
        let windows = self.twin_windows(now_ms, config).await?;
        let mut changes = Vec::new();
        let mut rows = Vec::with_capacity(windows.len());
        for twin in &windows {
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
        let applied = self.upsert(&rows).await?;
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
        config: &OdteConfig,
    ) -> Result<Vec<TwinWindow>, StoreError> {
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
        let measured = config.availability_max_gap_ms().is_some();
        let mut updates: HashMap<String, UpdateTimes> = HashMap::new();
        if measured {
            let listed: Vec<(String, Option<i64>, i32)> = fetch!(
                self,
                UPDATES_AT,
                fetch_all,
                (String, Option<i64>, i32),
                start,
                end
            )?;
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

fn twin_change(device: &str, change: LifecycleChange, at: i64, figures: Figures) -> TwinChange {
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
