//! The twin table: each twin's place in its lifecycle ([`entwine_core::twin`]), advanced by the
//! twin handler on every evaluation and by the twin evaluator at the current time.

use std::collections::HashMap;

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

#[derive(sqlx::FromRow)]
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

static POSITION: Sql = Sql::new("SELECT lifecycle, since, bound_at FROM twin WHERE device_id = $1");

/// Writes a twin's evaluation: the figures and lifecycle only if no later evaluation is stored,
/// its latest digital state only if it is newer than the stored one (the handler and the
/// evaluator may race; neither may roll the other back).
static UPSERT: Sql = Sql::new(
    "INSERT INTO twin (device_id, lifecycle, since, bound_at, digitalstate_id, last_update, \
                       last_device_timestamp, evaluated_at, availability, reliability, \
                       timeliness, odte) \
     VALUES ($1, $2, $3, $4, $5, $6, \
             (SELECT device_timestamp FROM physicalstate WHERE id = $7), \
             $8, $9, $10, $11, $12) \
     ON CONFLICT (device_id) DO UPDATE SET \
       lifecycle = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                        THEN excluded.lifecycle ELSE twin.lifecycle END, \
       since = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                    THEN excluded.since ELSE twin.since END, \
       bound_at = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                       THEN excluded.bound_at ELSE twin.bound_at END, \
       availability = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                           THEN excluded.availability ELSE twin.availability END, \
       reliability = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                          THEN excluded.reliability ELSE twin.reliability END, \
       timeliness = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                         THEN excluded.timeliness ELSE twin.timeliness END, \
       odte = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                   THEN excluded.odte ELSE twin.odte END, \
       digitalstate_id = CASE WHEN excluded.last_update IS NOT NULL \
                               AND (twin.last_update IS NULL \
                                    OR excluded.last_update >= twin.last_update) \
                              THEN excluded.digitalstate_id ELSE twin.digitalstate_id END, \
       last_device_timestamp = CASE WHEN excluded.last_update IS NOT NULL \
                                     AND (twin.last_update IS NULL \
                                          OR excluded.last_update >= twin.last_update) \
                                    THEN excluded.last_device_timestamp \
                                    ELSE twin.last_device_timestamp END, \
       last_update = CASE WHEN excluded.last_update IS NOT NULL \
                           AND (twin.last_update IS NULL \
                                OR excluded.last_update >= twin.last_update) \
                          THEN excluded.last_update ELSE twin.last_update END, \
       evaluated_at = CASE WHEN excluded.evaluated_at >= twin.evaluated_at \
                           THEN excluded.evaluated_at ELSE twin.evaluated_at END",
);

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

impl Store {
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

    /// Advances the twin of a digital state the twin handler evaluated; answers the lifecycle
    /// change, if any. (The twin handler uses [`Store::evaluate_and_advance`], which reads the
    /// twin's position with the window and saves this read.)
    pub async fn advance_twin(
        &self,
        state: &DigitalState,
        config: &OdteConfig,
    ) -> Result<Option<TwinChange>, StoreError> {
        let device = state.pending.device_id.as_str();
        let previous: Option<PositionRow> =
            fetch!(self, POSITION, fetch_optional, PositionRow, device)?;
        let previous = previous.map(|row| position(device, row)).transpose()?;
        self.advance_from(previous, state, config).await
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
        let Some(change) = change(
            device,
            previous,
            next,
            t,
            state.odte,
            state.availability,
            state.reliability,
            state.timeliness,
        ) else {
            return Ok(None);
        };
        execute!(
            self,
            UPSERT,
            device,
            next.lifecycle.as_str(),
            next.since_ms,
            next.bound_ms,
            Some(state.pending.id),
            Some(t),
            Some(state.pending.physicalstate_id),
            t,
            state.availability,
            state.reliability,
            state.timeliness,
            state.odte
        )?;
        Ok(Some(change))
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
        for row in rows {
            let previous = position(
                &row.device_id,
                PositionRow {
                    lifecycle: row.lifecycle,
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
            let (a, r, t, odte) = (
                e.availability as f32,
                e.reliability as f32,
                e.timeliness as f32,
                e.odte as f32,
            );
            execute!(
                self,
                UPSERT,
                row.device_id.as_str(),
                next.lifecycle.as_str(),
                next.since_ms,
                next.bound_ms,
                row.latest_id,
                row.last_update,
                row.latest_physical_id,
                now_ms,
                a,
                r,
                t,
                odte
            )?;
            if let Some(c) = change(&row.device_id, Some(previous), next, now_ms, odte, a, r, t) {
                changes.push(c);
            }
        }
        Ok(changes)
    }
}

#[allow(clippy::too_many_arguments)]
fn change(
    device: &str,
    previous: Option<TwinPosition>,
    next: TwinPosition,
    at: i64,
    odte: f32,
    availability: f32,
    reliability: f32,
    timeliness: f32,
) -> Option<TwinChange> {
    let from = previous.map(|p| p.lifecycle);
    (from != Some(next.lifecycle)).then(|| TwinChange {
        device_id: device.to_owned(),
        from,
        to: next.lifecycle,
        at,
        odte,
        availability,
        reliability,
        timeliness,
    })
}
