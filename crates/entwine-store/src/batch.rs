//! The pipeline's writes, for one input or many at once (what a function does with a batch, a
//! JSON array through its route). Each answers one result per input, in order, with exactly
//! the per-event semantics: the inputs are taken in order, as if each were written alone after
//! the previous one (a device's later state in the batch is not in an earlier state's window,
//! and its twin moves through the batch's evaluations in turn), each idempotent. An input the
//! store refuses (unknown id, a different event under a used key, a corrupt row) is refused
//! alone and the others go on; a failure of the store itself (unavailable, not migrated) fails
//! the whole batch.
//!
//! Set-based: each step is one statement for the whole batch, whatever its size — on
//! PostgreSQL over `UNNEST` of one array per column, on SQLite over `json_each` of one JSON
//! array of rows — so its text never changes and each connection prepares it once. The single
//! calls ([`Store::record_physical_event`] and the others) are batches of one.

use std::collections::{HashMap, HashSet};

use entwine_core::evaluation::{self, TwinEvaluation, UpdateTimes, Window, WindowFigures};
use entwine_core::model::{by_profile, ModelReadings, Profiles};
use entwine_core::odte::OdteConfig;
use entwine_core::state::{
    DigitalState, PendingDigitalState, PhysicalEvent, PhysicalState, Readings,
};
use entwine_core::twin::TwinPosition;
use entwine_core::InputError;
use serde_json::{json, Value};

use crate::lifecycle::{twin_change, upsert_lite, upsert_pg, Figures, TwinRow};
use crate::queries::{
    seed_columns, window_stats, DigitalRow, ModelReadingsById, PendingRow, PhysicalRow,
};
use crate::{contradiction, display_opt, mismatch, Store, StoreError, TwinChange, Written};

/// One result per input of a batch, in the inputs' order: what the single call would answer, or
/// the input's own refusal ([`StoreError::Rejected`], [`StoreError::Conflict`] or
/// [`StoreError::Corrupt`]).
pub type Each<T> = Vec<Result<T, StoreError>>;

/// Whether an error is the input's own (it refuses that input alone) rather than the store's
/// (it fails the whole batch).
pub fn is_element_error(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Rejected(_) | StoreError::Conflict(_) | StoreError::Corrupt(_)
    )
}

/// A reading as SQLite's JSON carries it: the `f64` of the `f32`, whose shortest decimal text
/// parses back to exactly the double SQLite stores for the `f32` (binding an `f32` stores the
/// same double), so equality with a stored reading holds bit for bit.
fn reading(value: f32) -> Value {
    json!(f64::from(value))
}

/// [`reading`] of a column that is `NULL` for a model's state.
fn reading_opt(value: Option<f32>) -> Value {
    value.map_or(Value::Null, reading)
}

/// The readings of model states, by physical state id (migration 0008).
const MODEL_READINGS_PG: &str = "\
    SELECT physicalstate_id, model, model_version, CAST(readings AS TEXT) AS readings \
    FROM physicalstate_reading WHERE physicalstate_id = ANY($1)";

const MODEL_READINGS_LITE: &str = "\
    SELECT physicalstate_id, model, model_version, CAST(readings AS TEXT) AS readings \
    FROM physicalstate_reading WHERE physicalstate_id IN (SELECT value FROM json_each(?1))";

/// The readings of physical states just inserted, in the same transaction.
const INSERT_READINGS_PG: &str = "\
    INSERT INTO physicalstate_reading (physicalstate_id, model, model_version, readings) \
    SELECT b.id, b.model, b.version, b.readings::jsonb \
    FROM UNNEST($1::int4[], $2::varchar[], $3::varchar[], $4::text[]) \
         AS b(id, model, version, readings)";

const INSERT_READINGS_LITE: &str = "\
    INSERT INTO physicalstate_reading (physicalstate_id, model, model_version, readings) \
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
           json_extract(value, '$[3]') \
    FROM json_each(?1)";

/// Runs a statement of `postgres` (binding each array) or `sqlite` (binding one JSON text) form.
macro_rules! set_based {
    ($store:expr, $method:ident, $row:ty, pg: $pg:expr => [$($pgarg:expr),* $(,)?], lite: $lite:expr => [$($litearg:expr),* $(,)?]) => {
        match $store {
            Store::Postgres(pool) => {
                sqlx::query_as::<_, $row>($pg)$(.bind($pgarg))*.$method(pool).await
            }
            Store::Sqlite(pool) => {
                sqlx::query_as::<_, $row>($lite)$(.bind($litearg))*.$method(pool).await
            }
        }
        .map_err(StoreError::from_sqlx)
    };
}

const INSERT_PHYSICAL_PG: &str = "\
    INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy) \
    SELECT b.device_id, b.device_timestamp, $5, b.temperature, b.energy \
    FROM UNNEST($1::varchar[], $2::int8[], $3::float4[], $4::float4[]) WITH ORDINALITY \
         AS b(device_id, device_timestamp, temperature, energy, ord) \
    ORDER BY b.ord \
    ON CONFLICT (device_id, device_timestamp) DO NOTHING \
    RETURNING id, device_id, device_timestamp, timestamp, temperature, energy";

/// `WHERE true`: SQLite needs it to read `ON CONFLICT` after `INSERT … SELECT` as the upsert.
const INSERT_PHYSICAL_LITE: &str = "\
    INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy) \
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?2, \
           json_extract(value, '$[2]'), json_extract(value, '$[3]') \
    FROM json_each(?1) WHERE true ORDER BY key \
    ON CONFLICT (device_id, device_timestamp) DO NOTHING \
    RETURNING id, device_id, device_timestamp, timestamp, temperature, energy";

const PHYSICAL_BY_EVENTS_PG: &str = "\
    SELECT p.id, p.device_id, p.device_timestamp, p.timestamp, p.temperature, p.energy \
    FROM physicalstate p \
    JOIN UNNEST($1::varchar[], $2::int8[]) AS b(device_id, device_timestamp) \
      ON p.device_id = b.device_id AND p.device_timestamp = b.device_timestamp";

const PHYSICAL_BY_EVENTS_LITE: &str = "\
    SELECT p.id, p.device_id, p.device_timestamp, p.timestamp, p.temperature, p.energy \
    FROM json_each(?1) b \
    JOIN physicalstate p ON p.device_id = json_extract(b.value, '$[0]') \
                        AND p.device_timestamp = json_extract(b.value, '$[1]')";

const PHYSICAL_BY_IDS_PG: &str = "\
    SELECT id, device_id, device_timestamp, timestamp, temperature, energy \
    FROM physicalstate WHERE id = ANY($1)";

const PHYSICAL_BY_IDS_LITE: &str = "\
    SELECT id, device_id, device_timestamp, timestamp, temperature, energy \
    FROM physicalstate WHERE id IN (SELECT value FROM json_each(?1))";

/// The digital copy of each physical state that is exactly the stored one (device, device
/// timestamp, timestamp, readings) and has no copy yet.
const INSERT_SHADOWS_PG: &str = "\
    INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, energy) \
    SELECT p.id, p.device_id, $7, p.temperature, p.energy \
    FROM UNNEST($1::int4[], $2::varchar[], $3::int8[], $4::int8[], $5::float4[], $6::float4[]) \
         WITH ORDINALITY AS b(id, device_id, device_timestamp, timestamp, temperature, energy, ord) \
    JOIN physicalstate p ON p.id = b.id AND p.device_id = b.device_id \
     AND p.device_timestamp = b.device_timestamp AND p.timestamp = b.timestamp \
     AND p.temperature IS NOT DISTINCT FROM b.temperature \
     AND p.energy IS NOT DISTINCT FROM b.energy \
    ORDER BY b.ord \
    ON CONFLICT (physicalstate_id) DO NOTHING \
    RETURNING id, physicalstate_id, device_id, timestamp, temperature, energy";

const INSERT_SHADOWS_LITE: &str = "\
    INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, energy) \
    SELECT p.id, p.device_id, ?2, p.temperature, p.energy \
    FROM json_each(?1) b \
    JOIN physicalstate p ON p.id = json_extract(b.value, '$[0]') \
     AND p.device_id = json_extract(b.value, '$[1]') \
     AND p.device_timestamp = json_extract(b.value, '$[2]') \
     AND p.timestamp = json_extract(b.value, '$[3]') \
     AND p.temperature IS json_extract(b.value, '$[4]') \
     AND p.energy IS json_extract(b.value, '$[5]') \
    WHERE true ORDER BY b.key \
    ON CONFLICT (physicalstate_id) DO NOTHING \
    RETURNING id, physicalstate_id, device_id, timestamp, temperature, energy";

const SHADOWS_BY_PHYSICAL_PG: &str = "\
    SELECT id, physicalstate_id, device_id, timestamp, temperature, energy \
    FROM digitalstate WHERE physicalstate_id = ANY($1)";

const SHADOWS_BY_PHYSICAL_LITE: &str = "\
    SELECT id, physicalstate_id, device_id, timestamp, temperature, energy \
    FROM digitalstate WHERE physicalstate_id IN (SELECT value FROM json_each(?1))";

/// The digital states of a batch, each with its twin's row (read once) and the counts of its
/// device's window `[timestamp − $2, timestamp]`: the states in it that have a physical state,
/// and those mirrored within `$3` ms of the device's measurement — among the device's states
/// up to it (a later one of the same batch, stamped with the same time, is not in its window).
/// One round trip for the whole batch (SQLite's form; PostgreSQL's is below); the window is read
/// from `digitalstate_window` alone
/// (migration 0007: the states' copies with their device timestamps, one covering index), not
/// joined to `physicalstate` state by state.
/// `GROUP BY d.id, t.device_id` is enough for the other columns: PostgreSQL knows they depend
/// on the primary keys, and SQLite allows them.
macro_rules! digital_with_window {
    ($ids:literal, $window:literal, $timely:literal) => {
        concat!(
            "SELECT d.id, d.physicalstate_id, d.device_id, d.timestamp, d.temperature, d.energy, \
                    d.availability, d.reliability, d.timeliness, d.odte, d.lifecycle, \
                    t.lifecycle AS twin_lifecycle, t.since AS twin_since, \
                    t.bound_at AS twin_bound_at, t.evaluated_at AS twin_evaluated_at, \
                    COUNT(w.digitalstate_id) AS window_states, \
                    COALESCE(SUM(CASE WHEN w.timestamp - w.device_timestamp <= ",
            $timely,
            " THEN 1 ELSE 0 END), 0) AS window_timely \
             FROM digitalstate d \
             LEFT JOIN twin t ON t.device_id = d.device_id \
             LEFT JOIN digitalstate_window w ON w.device_id = d.device_id \
                  AND w.timestamp >= d.timestamp - ",
            $window,
            " AND w.timestamp <= d.timestamp AND w.digitalstate_id <= d.id \
             WHERE d.id ",
            $ids,
            " GROUP BY d.id, t.device_id"
        )
    };
}

/// PostgreSQL's form: the twin row and the window counted per state in `LATERAL` subqueries,
/// so that each is one index probe or range scan per state of the batch. As a join (SQLite's
/// form below), PostgreSQL hashed the whole window table whenever its statistics were stale (a
/// young database between two ANALYZE runs): 13 ms per batch, growing with the table.
const DIGITAL_WITH_WINDOW_PG: &str = "\
    SELECT d.id, d.physicalstate_id, d.device_id, d.timestamp, d.temperature, d.energy, \
           d.availability, d.reliability, d.timeliness, d.odte, d.lifecycle, \
           t.lifecycle AS twin_lifecycle, t.since AS twin_since, t.bound_at AS twin_bound_at, \
           t.evaluated_at AS twin_evaluated_at, \
           w.states AS window_states, w.timely AS window_timely \
    FROM digitalstate d \
    LEFT JOIN LATERAL (SELECT x.lifecycle, x.since, x.bound_at, x.evaluated_at FROM twin x \
                       WHERE x.device_id = d.device_id) t ON true \
    CROSS JOIN LATERAL ( \
        SELECT COUNT(*) AS states, \
               COALESCE(SUM(CASE WHEN c.timestamp - c.device_timestamp <= $3 THEN 1 ELSE 0 END), 0) \
                   AS timely \
        FROM digitalstate_window c \
        WHERE c.device_id = d.device_id AND c.timestamp >= d.timestamp - $2 \
          AND c.timestamp <= d.timestamp AND c.digitalstate_id <= d.id) w \
    WHERE d.id = ANY($1)";
const DIGITAL_WITH_WINDOW_LITE: &str =
    digital_with_window!("IN (SELECT value FROM json_each(?1))", "?2", "?3");

/// The digital states of a batch as stored, in [`DigitalRow`]'s shape without twin or window.
macro_rules! digital_by_ids {
    ($ids:literal) => {
        concat!(
            "SELECT id, physicalstate_id, device_id, timestamp, temperature, energy, \
                    availability, reliability, timeliness, odte, lifecycle, \
                    CAST(NULL AS VARCHAR(32)) AS twin_lifecycle, CAST(NULL AS BIGINT) AS twin_since, \
                    CAST(NULL AS BIGINT) AS twin_bound_at, CAST(NULL AS BIGINT) AS twin_evaluated_at, \
                    CAST(0 AS BIGINT) AS window_states, CAST(0 AS BIGINT) AS window_timely \
             FROM digitalstate WHERE id ",
            $ids
        )
    };
}

const DIGITAL_BY_IDS_PG: &str = digital_by_ids!("= ANY($1)");
const DIGITAL_BY_IDS_LITE: &str = digital_by_ids!("IN (SELECT value FROM json_each(?1))");

/// The update times availability needs for each digital state of a batch: its device's twin
/// timestamps from the last one before its window `[timestamp − $2, timestamp]` (or the
/// window's start) to its own, among the states up to it.
macro_rules! updates_of_states {
    ($ids:literal, $window:literal) => {
        concat!(
            "SELECT d.id, x.timestamp FROM digitalstate d \
             JOIN digitalstate x ON x.device_id = d.device_id \
              AND x.timestamp <= d.timestamp AND x.id <= d.id \
              AND x.timestamp >= COALESCE( \
                    (SELECT MAX(y.timestamp) FROM digitalstate y \
                     WHERE y.device_id = d.device_id AND y.timestamp < d.timestamp - ",
            $window,
            "), d.timestamp - ",
            $window,
            ") WHERE d.id ",
            $ids,
            " ORDER BY d.id, x.timestamp"
        )
    };
}

const UPDATES_OF_STATES_PG: &str = updates_of_states!("= ANY($1)", "$2");
const UPDATES_OF_STATES_LITE: &str =
    updates_of_states!("IN (SELECT value FROM json_each(?1))", "?2");

/// Stores evaluations where none is stored yet; answers the rows it wrote.
const STORE_EVALUATIONS_PG: &str = "\
    UPDATE digitalstate d \
    SET availability = b.availability, reliability = b.reliability, timeliness = b.timeliness, \
        odte = b.odte, lifecycle = b.lifecycle \
    FROM UNNEST($1::int4[], $2::float4[], $3::float4[], $4::float4[], $5::float4[], \
                $6::varchar[]) AS b(id, availability, reliability, timeliness, odte, lifecycle) \
    WHERE d.id = b.id AND d.odte IS NULL \
    RETURNING d.id";

const STORE_EVALUATIONS_LITE: &str = "\
    UPDATE digitalstate \
    SET availability = b.availability, reliability = b.reliability, timeliness = b.timeliness, \
        odte = b.odte, lifecycle = b.lifecycle \
    FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS availability, \
                 json_extract(value, '$[2]') AS reliability, \
                 json_extract(value, '$[3]') AS timeliness, json_extract(value, '$[4]') AS odte, \
                 json_extract(value, '$[5]') AS lifecycle \
          FROM json_each(?1)) AS b \
    WHERE digitalstate.id = b.id AND digitalstate.odte IS NULL \
    RETURNING digitalstate.id";

/// A batch's ids as each backend binds them.
fn ids_json(ids: &[i32]) -> String {
    Value::from(ids.to_vec()).to_string()
}

impl Store {
    /// [`Store::record_physical_event`] for every event of a batch, received at `now_ms`: one
    /// insert for all of them, and one read of the stored rows of those that were there before.
    pub async fn record_physical_events(
        &self,
        events: &[PhysicalEvent],
        now_ms: i64,
    ) -> Result<Each<(PhysicalState, Written)>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let devices: Vec<&str> = events.iter().map(|e| e.device_id.as_str()).collect();
        let stamps: Vec<i64> = events.iter().map(|e| e.device_timestamp).collect();
        // A created row's model readings are the ones written with it.
        let (inserted, created_readings) = self.insert_physical(events, now_ms).await?;
        let mut created: HashMap<(String, i64), PhysicalRow> = inserted
            .into_iter()
            .map(|row| ((row.device_id.clone(), row.device_timestamp), row))
            .collect();
        // The events not inserted now: redeliveries, a different event under a used key, or
        // the second of two equal keys in this batch (then the first one's row).
        let mut stored: HashMap<(String, i64), PhysicalState> = HashMap::new();
        if created.len() < events.len() {
            let lite = || {
                Value::from(
                    events
                        .iter()
                        .map(|e| json!([e.device_id.as_str(), e.device_timestamp]))
                        .collect::<Vec<_>>(),
                )
                .to_string()
            };
            let rows: Vec<PhysicalRow> = set_based!(self, fetch_all, PhysicalRow,
                pg: PHYSICAL_BY_EVENTS_PG => [&devices, &stamps],
                lite: PHYSICAL_BY_EVENTS_LITE => [lite()])?;
            let models = self.model_readings_of_physical(&rows).await?;
            for row in rows {
                let key = (row.device_id.clone(), row.device_timestamp);
                if !created.contains_key(&key) {
                    stored.insert(key, row.into_state(&models)?);
                }
            }
        }
        let mut each = Vec::with_capacity(events.len());
        for event in events {
            let key = (event.device_id.as_str().to_owned(), event.device_timestamp);
            if let Some(row) = created.remove(&key) {
                let state = row.into_state(&created_readings);
                if let Ok(state) = &state {
                    stored.insert(key, state.clone());
                }
                each.push(state.map(|s| (s, Written::Created)));
                continue;
            }
            each.push(match stored.get(&key) {
                Some(state) => {
                    same_event(state, event).map(|()| (state.clone(), Written::Existing))
                }
                None => Err(StoreError::Corrupt(format!(
                    "physical state of {} at {} conflicted on insert but cannot be read",
                    event.device_id, event.device_timestamp
                ))),
            });
        }
        Ok(each)
    }

    /// [`Store::record_shadow`] for every physical state of a batch, at `now_ms`: one insert for
    /// all of them; the physical states and copies of those not inserted read in two more.
    pub async fn record_shadows(
        &self,
        states: &[PhysicalState],
        now_ms: i64,
    ) -> Result<Each<(PendingDigitalState, Written)>, StoreError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i32> = states.iter().map(|s| s.id).collect();
        // A model state's readings are compared before its copy is made (a physical state's
        // readings never change): one that is not the stored one is refused, and not copied.
        let given_models: ModelReadingsById = states
            .iter()
            .filter_map(|s| s.readings.model().map(|m| (s.id, m.clone())))
            .collect();
        let mut refused: HashMap<i32, StoreError> = HashMap::new();
        if !given_models.is_empty() {
            let stored = self.model_readings(given_models.keys().copied()).await?;
            for (id, given) in &given_models {
                let what = format!("physical state {id}");
                let result = match stored.get(id) {
                    Some(stored) => model_contradiction(&what, stored, given),
                    None => Err(mismatch(
                        "readings",
                        what,
                        "no readings of a model",
                        &format!("readings of model {}", given.model),
                    )),
                };
                if let Err(e) = result {
                    refused.insert(*id, e);
                }
            }
        }
        let copied: Vec<&PhysicalState> = states
            .iter()
            .filter(|s| !refused.contains_key(&s.id))
            .collect();
        let lite = || {
            Value::from(
                copied
                    .iter()
                    .map(|s| {
                        json!([
                            s.id,
                            s.device_id.as_str(),
                            s.device_timestamp,
                            s.timestamp,
                            reading_opt(s.readings.temperature()),
                            reading_opt(s.readings.energy())
                        ])
                    })
                    .collect::<Vec<_>>(),
            )
            .to_string()
        };
        let inserted: Vec<PendingRow> = if copied.is_empty() {
            Vec::new()
        } else {
            set_based!(self, fetch_all, PendingRow,
            pg: INSERT_SHADOWS_PG => [
                copied.iter().map(|s| s.id).collect::<Vec<i32>>(),
                copied.iter().map(|s| s.device_id.as_str()).collect::<Vec<&str>>(),
                copied.iter().map(|s| s.device_timestamp).collect::<Vec<i64>>(),
                copied.iter().map(|s| s.timestamp).collect::<Vec<i64>>(),
                copied.iter().map(|s| seed_columns(&s.readings).0).collect::<Vec<Option<f32>>>(),
                copied.iter().map(|s| seed_columns(&s.readings).1).collect::<Vec<Option<f32>>>(),
                now_ms
            ],
            lite: INSERT_SHADOWS_LITE => [lite(), now_ms])?
        };
        let mut created: HashMap<i32, PendingRow> = inserted
            .into_iter()
            .map(|row| (row.physicalstate_id, row))
            .collect();
        // Not inserted: a redelivery, or a physical state that is not the stored one. Either
        // way the input must be exactly what is stored, or nothing is answered but an error.
        let mut physical: HashMap<i32, PhysicalState> = HashMap::new();
        let mut copies: HashMap<i32, PendingDigitalState> = HashMap::new();
        let mut unreadable: HashMap<i32, StoreError> = HashMap::new();
        let rest: Vec<i32> = ids
            .iter()
            .copied()
            .filter(|id| !created.contains_key(id) && !refused.contains_key(id))
            .collect();
        if !rest.is_empty() {
            let rows: Vec<PhysicalRow> = set_based!(self, fetch_all, PhysicalRow,
                pg: PHYSICAL_BY_IDS_PG => [&rest],
                lite: PHYSICAL_BY_IDS_LITE => [ids_json(&rest)])?;
            let models = self.model_readings_of_physical(&rows).await?;
            for row in rows {
                let id = row.id;
                match row.into_state(&models) {
                    Ok(state) => {
                        physical.insert(id, state);
                    }
                    Err(e) => {
                        unreadable.insert(id, e);
                    }
                }
            }
            let rows: Vec<PendingRow> = set_based!(self, fetch_all, PendingRow,
                pg: SHADOWS_BY_PHYSICAL_PG => [&rest],
                lite: SHADOWS_BY_PHYSICAL_LITE => [ids_json(&rest)])?;
            for row in rows {
                copies.insert(row.physicalstate_id, row.into_pending(&models)?);
            }
        }
        let mut each = Vec::with_capacity(states.len());
        for state in states {
            if let Some(e) = refused.remove(&state.id) {
                each.push(Err(e));
                continue;
            }
            if let Some(row) = created.remove(&state.id) {
                let pending = row.into_pending(&given_models);
                if let Ok(pending) = &pending {
                    copies.insert(state.id, pending.clone());
                    physical.entry(state.id).or_insert_with(|| state.clone());
                }
                each.push(pending.map(|p| (p, Written::Created)));
                continue;
            }
            if let Some(e) = unreadable.remove(&state.id) {
                each.push(Err(e));
                continue;
            }
            each.push(existing_shadow(
                state,
                physical.get(&state.id),
                copies.get(&state.id),
            ));
        }
        Ok(each)
    }

    /// [`Store::evaluate_digital_state`] for every pending state of a batch, in order: each
    /// state's window holds the states up to it (not those after it in the batch), and each
    /// twin moves through its states' evaluations in turn. One read of every state with its
    /// window and twin (and one of the update times when availability is measured); then one
    /// statement storing the new evaluations and one writing the twins that changed lifecycle,
    /// in one transaction.
    ///
    /// Each state is evaluated by its device's profile (`profiles`: one [`OdteConfig`] for
    /// every device, or a [`entwine_core::model::ModelSet`]'s per model); the window query runs
    /// once per profile the batch holds.
    pub async fn evaluate_digital_states(
        &self,
        pending: &[PendingDigitalState],
        profiles: &dyn Profiles,
    ) -> Result<Each<(DigitalState, Written, Option<TwinChange>)>, StoreError> {
        self.evaluate_batch(pending, profiles, true).await
    }

    /// [`Store::evaluate_digital_states`] without the twins (see
    /// [`Store::evaluate_digital_state_only`]).
    pub async fn evaluate_digital_states_only(
        &self,
        pending: &[PendingDigitalState],
        profiles: &dyn Profiles,
    ) -> Result<Each<(DigitalState, Written)>, StoreError> {
        let each = self.evaluate_batch(pending, profiles, false).await?;
        Ok(each
            .into_iter()
            .map(|r| r.map(|(state, written, _)| (state, written)))
            .collect())
    }

    async fn evaluate_batch(
        &self,
        pending: &[PendingDigitalState],
        profiles: &dyn Profiles,
        twins: bool,
    ) -> Result<Each<(DigitalState, Written, Option<TwinChange>)>, StoreError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        // A concurrent call may evaluate some of the same states between this batch's read and
        // its write; the write then stored nothing, and the batch is read again, finding them
        // evaluated (a redelivery racing its first delivery).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let plan = self.plan_evaluations(pending, profiles, twins).await?;
            match self.write_evaluations(&plan).await? {
                Some(applied) => return Ok(plan.answers(applied)),
                None if attempt < 3 => {
                    tracing::debug!(attempt, "evaluations raced another call; reading again");
                }
                None => {
                    return Err(StoreError::Corrupt(
                        "digital states were neither evaluated nor updatable after 3 attempts"
                            .into(),
                    ))
                }
            }
        }
    }

    /// Reads the batch's states with their windows and evaluates them in order.
    async fn plan_evaluations(
        &self,
        pending: &[PendingDigitalState],
        profiles: &dyn Profiles,
        twins: bool,
    ) -> Result<Plan, StoreError> {
        // The batch's states by profile: one window query per profile (a fleet of the seed's
        // devices alone: one).
        let groups = by_profile(
            profiles,
            pending.iter().map(|p| (p.device_id.as_str(), p.id)),
        );
        let mut rows: HashMap<i32, DigitalRow> = HashMap::new();
        let mut updates: HashMap<i32, UpdateTimes> = HashMap::new();
        for (index, ids) in &groups {
            let config = &profiles.profiles()[*index];
            let group = self.digital_rows(ids, config).await?;
            if config.availability_max_gap_ms().is_some() {
                updates.extend(self.updates_of_states(ids, &group, config).await?);
            }
            rows.extend(group);
        }
        let models = self.model_readings_of_rows(rows.values()).await?;
        let mut plan = Plan {
            results: Vec::with_capacity(pending.len()),
            evaluations: Vec::new(),
            twins: HashMap::new(),
        };
        // Each device's twin as this batch moves it: where it stands, and the time of the
        // evaluation its row holds (a change older than that is stale and not written).
        let mut positions: HashMap<String, (Option<TwinPosition>, Option<i64>)> = HashMap::new();
        let mut evaluated: HashMap<i32, DigitalState> = HashMap::new();
        for input in pending {
            let Some(row) = rows.get(&input.id) else {
                plan.results.push(Err(StoreError::Rejected(InputError::new(
                    "id",
                    format!("no digital state with id {}", input.id),
                ))));
                continue;
            };
            let checked = check_row(row, input, &models).and_then(|stored_pending| {
                let device = input.device_id.as_str();
                let twin = match positions.get(device) {
                    Some(twin) => *twin,
                    None => (row.twin_position(device)?, row.twin_evaluated_at()),
                };
                Ok((stored_pending, twin))
            });
            let (stored_pending, (position, twin_at)) = match checked {
                Ok(checked) => checked,
                Err(e) => {
                    plan.results.push(Err(e));
                    continue;
                }
            };
            // The handler evaluates at the state's time, which is then the twin's latest update.
            let t = input.timestamp;
            let config = profiles.profile_of(input.device_id.as_str());
            let evaluate = |window| evaluation::evaluate(config, t, Some(t), window, position);
            let earlier = match evaluated.get(&input.id) {
                Some(state) => Some(state.clone()),
                None => match row.evaluation(stored_pending.clone()) {
                    Ok(stored) => stored,
                    Err(e) => {
                        plan.results.push(Err(e));
                        continue;
                    }
                },
            };
            let (state, written, evaluation) = match earlier {
                Some(stored) => {
                    let evaluation = evaluate(Window::Evaluated(&stored));
                    (stored, Written::Existing, evaluation)
                }
                None => {
                    let figures = WindowFigures {
                        stats: window_stats(row.window_states, row.window_timely),
                        updates: config
                            .availability_max_gap_ms()
                            .map(|_| updates.remove(&input.id).unwrap_or_default()),
                    };
                    let evaluation = evaluate(Window::Read(&figures));
                    let state = DigitalState::new(stored_pending, &evaluation.entanglement);
                    evaluated.insert(input.id, state.clone());
                    plan.evaluations.push(state.clone());
                    (state, Written::Created, evaluation)
                }
            };
            let device = input.device_id.as_str().to_owned();
            let mut twin = (position, twin_at);
            let change = if twins {
                plan.move_twin(&device, &state, &evaluation, &mut twin)
            } else {
                None
            };
            positions.insert(device, twin);
            plan.results.push(Ok((state, written, change)));
        }
        Ok(plan)
    }

    /// Writes a plan's evaluations and twins, in one transaction when both are to be written or
    /// several evaluations (one statement alone applies whole or not at all). Answers the devices whose twin
    /// row took this write, or `None` (nothing written) if a state was evaluated by another
    /// call since it was read.
    async fn write_evaluations(&self, plan: &Plan) -> Result<Option<HashSet<String>>, StoreError> {
        let states = &plan.evaluations;
        let twins: Vec<TwinRow<'_>> = plan.twins.values().map(|t| t.row()).collect();
        if states.is_empty() && twins.is_empty() {
            return Ok(Some(HashSet::new()));
        }
        macro_rules! write {
            ($pool:expr, $upsert:ident, $evaluations:expr) => {{
                // One statement alone needs no transaction of its own (the common case of a
                // single event, whose twin did not change): it applies whole or not at all.
                if twins.is_empty() && states.len() == 1 {
                    let updated: Vec<(i32,)> = $evaluations
                        .fetch_all($pool)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                    return Ok((updated.len() == 1).then(HashSet::new));
                }
                if states.is_empty() {
                    let mut conn = $pool.acquire().await.map_err(StoreError::from_sqlx)?;
                    return Ok(Some($upsert(&mut conn, &twins).await?));
                }
                let mut tx = $pool.begin().await.map_err(StoreError::from_sqlx)?;
                let updated: Vec<(i32,)> = $evaluations
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                if updated.len() != states.len() {
                    tx.rollback().await.map_err(StoreError::from_sqlx)?;
                    return Ok(None);
                }
                let applied = $upsert(&mut tx, &twins).await?;
                tx.commit().await.map_err(StoreError::from_sqlx)?;
                Ok(Some(applied))
            }};
        }
        match self {
            Store::Postgres(pool) => write!(
                pool,
                upsert_pg,
                sqlx::query_as::<_, (i32,)>(STORE_EVALUATIONS_PG)
                    .bind(states.iter().map(|s| s.pending.id).collect::<Vec<i32>>())
                    .bind(states.iter().map(|s| s.availability).collect::<Vec<f32>>())
                    .bind(states.iter().map(|s| s.reliability).collect::<Vec<f32>>())
                    .bind(states.iter().map(|s| s.timeliness).collect::<Vec<f32>>())
                    .bind(states.iter().map(|s| s.odte).collect::<Vec<f32>>())
                    .bind(
                        states
                            .iter()
                            .map(|s| s.lifecycle.as_str())
                            .collect::<Vec<&str>>()
                    )
            ),
            Store::Sqlite(pool) => write!(
                pool,
                upsert_lite,
                sqlx::query_as::<_, (i32,)>(STORE_EVALUATIONS_LITE).bind(
                    Value::from(
                        states
                            .iter()
                            .map(|s| json!([
                                s.pending.id,
                                reading(s.availability),
                                reading(s.reliability),
                                reading(s.timeliness),
                                reading(s.odte),
                                s.lifecycle.as_str()
                            ]))
                            .collect::<Vec<_>>()
                    )
                    .to_string()
                )
            ),
        }
    }

    /// [`Store::stored_digital`] for every digital state of a batch: one read for all.
    pub async fn stored_digitals(
        &self,
        states: &[DigitalState],
    ) -> Result<Each<DigitalState>, StoreError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i32> = states.iter().map(|s| s.pending.id).collect();
        let rows: Vec<DigitalRow> = set_based!(self, fetch_all, DigitalRow,
            pg: DIGITAL_BY_IDS_PG => [&ids],
            lite: DIGITAL_BY_IDS_LITE => [ids_json(&ids)])?;
        let models = self.model_readings_of_rows(rows.iter()).await?;
        let rows: HashMap<i32, DigitalRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        Ok(states
            .iter()
            .map(|given| check_stored(rows.get(&given.pending.id), given, &models))
            .collect())
    }

    /// Inserts a batch's physical states; with a model's readings among them, the readings of
    /// those created too, in one transaction (a state is never stored without its readings).
    /// Answers the created rows and the model readings written, by physical state id.
    async fn insert_physical(
        &self,
        events: &[PhysicalEvent],
        now_ms: i64,
    ) -> Result<(Vec<PhysicalRow>, ModelReadingsById), StoreError> {
        let devices: Vec<&str> = events.iter().map(|e| e.device_id.as_str()).collect();
        let stamps: Vec<i64> = events.iter().map(|e| e.device_timestamp).collect();
        let temperatures: Vec<Option<f32>> =
            events.iter().map(|e| e.readings.temperature()).collect();
        let energies: Vec<Option<f32>> = events.iter().map(|e| e.readings.energy()).collect();
        let lite = || {
            Value::from(
                events
                    .iter()
                    .map(|e| {
                        json!([
                            e.device_id.as_str(),
                            e.device_timestamp,
                            reading_opt(e.readings.temperature()),
                            reading_opt(e.readings.energy())
                        ])
                    })
                    .collect::<Vec<_>>(),
            )
            .to_string()
        };
        // Each key's model readings: the first event of the batch under it (the one inserted).
        let mut by_key: HashMap<(&str, i64), &ModelReadings> = HashMap::new();
        for e in events {
            if let Some(m) = e.readings.model() {
                by_key
                    .entry((e.device_id.as_str(), e.device_timestamp))
                    .or_insert(m);
            }
        }
        if by_key.is_empty() {
            let rows = set_based!(self, fetch_all, PhysicalRow,
                pg: INSERT_PHYSICAL_PG => [&devices, &stamps, &temperatures, &energies, now_ms],
                lite: INSERT_PHYSICAL_LITE => [lite(), now_ms])?;
            return Ok((rows, ModelReadingsById::new()));
        }
        let readings_of = |rows: &[PhysicalRow]| -> Vec<(i32, &ModelReadings, String)> {
            rows.iter()
                .filter_map(|row| {
                    let m = by_key.get(&(row.device_id.as_str(), row.device_timestamp))?;
                    Some((row.id, *m, Value::Object(m.readings.clone()).to_string()))
                })
                .collect()
        };
        let written = |readings: &[(i32, &ModelReadings, String)]| -> ModelReadingsById {
            readings
                .iter()
                .map(|(id, m, _)| (*id, (*m).clone()))
                .collect()
        };
        match self {
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(StoreError::from_sqlx)?;
                let rows: Vec<PhysicalRow> = sqlx::query_as(INSERT_PHYSICAL_PG)
                    .bind(&devices)
                    .bind(&stamps)
                    .bind(&temperatures)
                    .bind(&energies)
                    .bind(now_ms)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                let readings = readings_of(&rows);
                if !readings.is_empty() {
                    sqlx::query(INSERT_READINGS_PG)
                        .bind(readings.iter().map(|r| r.0).collect::<Vec<i32>>())
                        .bind(
                            readings
                                .iter()
                                .map(|r| r.1.model.as_str())
                                .collect::<Vec<&str>>(),
                        )
                        .bind(
                            readings
                                .iter()
                                .map(|r| r.1.model_version.as_str())
                                .collect::<Vec<&str>>(),
                        )
                        .bind(readings.iter().map(|r| r.2.as_str()).collect::<Vec<&str>>())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                }
                tx.commit().await.map_err(StoreError::from_sqlx)?;
                let written = written(&readings);
                Ok((rows, written))
            }
            Store::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(StoreError::from_sqlx)?;
                let rows: Vec<PhysicalRow> = sqlx::query_as(INSERT_PHYSICAL_LITE)
                    .bind(lite())
                    .bind(now_ms)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                let readings = readings_of(&rows);
                if !readings.is_empty() {
                    let rows_json = Value::from(
                        readings
                            .iter()
                            .map(|r| json!([r.0, r.1.model, r.1.model_version, r.2]))
                            .collect::<Vec<_>>(),
                    )
                    .to_string();
                    sqlx::query(INSERT_READINGS_LITE)
                        .bind(rows_json)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                }
                tx.commit().await.map_err(StoreError::from_sqlx)?;
                let written = written(&readings);
                Ok((rows, written))
            }
        }
    }

    /// The model readings of physical states `ids` (none read when there are none to read).
    pub(crate) async fn model_readings(
        &self,
        ids: impl Iterator<Item = i32>,
    ) -> Result<ModelReadingsById, StoreError> {
        let ids: Vec<i32> = ids.collect();
        if ids.is_empty() {
            return Ok(ModelReadingsById::new());
        }
        let rows: Vec<(i32, String, String, String)> = set_based!(self, fetch_all, (i32, String, String, String),
            pg: MODEL_READINGS_PG => [&ids],
            lite: MODEL_READINGS_LITE => [ids_json(&ids)])?;
        rows.into_iter()
            .map(
                |(id, model, model_version, text)| match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(readings)) => Ok((
                        id,
                        ModelReadings {
                            model,
                            model_version,
                            readings,
                        },
                    )),
                    _ => Err(StoreError::Corrupt(format!(
                        "physicalstate_reading row {id} does not hold a JSON object"
                    ))),
                },
            )
            .collect()
    }

    /// The model readings of those physical `rows` that lack the seed's readings.
    async fn model_readings_of_physical(
        &self,
        rows: &[PhysicalRow],
    ) -> Result<ModelReadingsById, StoreError> {
        self.model_readings(
            rows.iter()
                .filter(|r| r.temperature.is_none())
                .map(|r| r.id),
        )
        .await
    }

    /// The model readings of those digital `rows` that lack the seed's readings.
    pub(crate) async fn model_readings_of_rows(
        &self,
        rows: impl Iterator<Item = &DigitalRow>,
    ) -> Result<ModelReadingsById, StoreError> {
        self.model_readings(
            rows.filter(|r| r.temperature.is_none())
                .filter_map(|r| r.physicalstate_id),
        )
        .await
    }

    /// The rows of digital states `ids` with their windows and twins, by id.
    pub(crate) async fn digital_rows(
        &self,
        ids: &[i32],
        config: &OdteConfig,
    ) -> Result<HashMap<i32, DigitalRow>, StoreError> {
        let rows: Vec<DigitalRow> = set_based!(self, fetch_all, DigitalRow,
            pg: DIGITAL_WITH_WINDOW_PG => [ids, config.window_ms(), config.timeliness_ms()],
            lite: DIGITAL_WITH_WINDOW_LITE => [ids_json(ids), config.window_ms(), config.timeliness_ms()])?;
        Ok(rows.into_iter().map(|r| (r.id, r)).collect())
    }

    /// The update times of each of `ids` that availability needs: the last one before its
    /// window and those in it.
    pub(crate) async fn updates_of_states(
        &self,
        ids: &[i32],
        rows: &HashMap<i32, DigitalRow>,
        config: &OdteConfig,
    ) -> Result<HashMap<i32, UpdateTimes>, StoreError> {
        let listed: Vec<(i32, i64)> = set_based!(self, fetch_all, (i32, i64),
            pg: UPDATES_OF_STATES_PG => [ids, config.window_ms()],
            lite: UPDATES_OF_STATES_LITE => [ids_json(ids), config.window_ms()])?;
        let mut updates: HashMap<i32, UpdateTimes> = HashMap::new();
        for (id, t) in listed {
            let Some(state_t) = rows.get(&id).and_then(|r| r.timestamp) else {
                continue;
            };
            let (start, _) = config.window_of(state_t);
            let times = updates.entry(id).or_default();
            if t < start {
                times.before_window = times.before_window.max(Some(t));
            } else {
                times.in_window.push(t);
            }
        }
        Ok(updates)
    }
}

/// What a batch of evaluations will write and answer.
struct Plan {
    results: Each<(DigitalState, Written, Option<TwinChange>)>,
    /// The evaluations to store (each state once).
    evaluations: Vec<DigitalState>,
    /// Each changed twin's latest row, by device.
    twins: HashMap<String, PlannedTwin>,
}

/// A twin's row as the batch's last change of it leaves it.
struct PlannedTwin {
    device_id: String,
    position: TwinPosition,
    digitalstate_id: i32,
    physicalstate_id: i32,
    at: i64,
    figures: Figures,
}

impl PlannedTwin {
    fn row(&self) -> TwinRow<'_> {
        TwinRow {
            device_id: &self.device_id,
            position: self.position,
            digitalstate_id: Some(self.digitalstate_id),
            last_update: Some(self.at),
            physicalstate_id: Some(self.physicalstate_id),
            evaluated_at: self.at,
            figures: self.figures,
        }
    }
}

impl Plan {
    /// Moves `device`'s twin by `evaluation`, as the single handler's write would: only on a
    /// lifecycle change, and not when its row holds a later evaluation (a redelivered old state
    /// is stale). Answers the change to announce.
    fn move_twin(
        &mut self,
        device: &str,
        state: &DigitalState,
        evaluation: &TwinEvaluation,
        twin: &mut (Option<TwinPosition>, Option<i64>),
    ) -> Option<TwinChange> {
        let change = evaluation.change?;
        let t = state.pending.timestamp;
        if twin.1.is_some_and(|held| t < held) {
            return None;
        }
        let figures = Figures::of(&evaluation.entanglement);
        *twin = (Some(evaluation.position), Some(t));
        self.twins.insert(
            device.to_owned(),
            PlannedTwin {
                device_id: device.to_owned(),
                position: evaluation.position,
                digitalstate_id: state.pending.id,
                physicalstate_id: state.pending.physicalstate_id,
                at: t,
                figures,
            },
        );
        Some(twin_change(device, change, t, figures))
    }

    /// The answers, without the changes of twins whose row did not take this write (the twin
    /// evaluator wrote a later evaluation in between).
    fn answers(
        self,
        applied: HashSet<String>,
    ) -> Each<(DigitalState, Written, Option<TwinChange>)> {
        self.results
            .into_iter()
            .map(|r| {
                r.map(|(state, written, change)| {
                    let change = change.filter(|c| applied.contains(&c.device_id));
                    (state, written, change)
                })
            })
            .collect()
    }
}

/// A redelivered event carries the same readings; a different event under the same key would
/// be answered with the stored one and never stored itself: refuse it, naming it.
fn same_event(state: &PhysicalState, event: &PhysicalEvent) -> Result<(), StoreError> {
    let conflict = |difference: String| {
        Err(StoreError::Conflict(InputError::new(
            "timestamp",
            format!(
                "device {} already sent a different event at device timestamp {} \
                 ({difference}): device timestamps must be unique",
                event.device_id, event.device_timestamp
            ),
        )))
    };
    if let (
        Readings::Seed {
            temperature: st,
            energy: se,
        },
        Readings::Seed {
            temperature: gt,
            energy: ge,
        },
    ) = (&state.readings, &event.readings)
    {
        for (field, stored, sent) in [("temperature", st, gt), ("energy", se, ge)] {
            if stored.to_bits() != sent.to_bits() {
                return conflict(format!("{field} {stored} stored, {sent} sent"));
            }
        }
        return Ok(());
    }
    match readings_contradiction("the stored event", &state.readings, &event.readings) {
        Err(StoreError::Rejected(e)) => conflict(e.reason),
        _ => Ok(()),
    }
}

/// Refuses `given` readings that are not the `stored` ones, naming the first that differs:
/// the seed's bit for bit, a model's by model, version and each property's value.
pub(crate) fn readings_contradiction(
    what: &str,
    stored: &Readings,
    given: &Readings,
) -> Result<(), StoreError> {
    match (stored, given) {
        (
            Readings::Seed {
                temperature: st,
                energy: se,
            },
            Readings::Seed {
                temperature: gt,
                energy: ge,
            },
        ) => contradiction(
            what,
            &[],
            &[("temperature", *st, *gt), ("energy", *se, *ge)],
        ),
        (Readings::Model(stored), Readings::Model(given)) => {
            model_contradiction(what, stored, given)
        }
        (Readings::Model(stored), Readings::Seed { .. }) => Err(mismatch(
            "readings",
            what.to_owned(),
            &format!("readings of model {}", stored.model),
            "the seed's temperature and energy",
        )),
        (Readings::Seed { .. }, Readings::Model(given)) => Err(mismatch(
            "readings",
            what.to_owned(),
            "the seed's temperature and energy",
            &format!("readings of model {}", given.model),
        )),
    }
}

/// [`readings_contradiction`] of two model readings.
fn model_contradiction(
    what: &str,
    stored: &ModelReadings,
    given: &ModelReadings,
) -> Result<(), StoreError> {
    contradiction(
        what,
        &[
            ("model", stored.model.clone(), given.model.clone()),
            (
                "model_version",
                stored.model_version.clone(),
                given.model_version.clone(),
            ),
        ],
        &[],
    )?;
    let keys: std::collections::BTreeSet<&String> = stored
        .readings
        .keys()
        .chain(given.readings.keys())
        .collect();
    for key in keys {
        let (s, g) = (stored.readings.get(key), given.readings.get(key));
        if s != g {
            let show = |v: Option<&Value>| v.map_or_else(|| "none".to_owned(), Value::to_string);
            return Err(mismatch(
                &format!("readings.{key}"),
                what.to_owned(),
                &show(s),
                &show(g),
            ));
        }
    }
    Ok(())
}

/// The answer to a physical state whose copy was not inserted now: its existing copy, if the
/// input is exactly the stored physical state.
fn existing_shadow(
    physical: &PhysicalState,
    stored: Option<&PhysicalState>,
    copy: Option<&PendingDigitalState>,
) -> Result<(PendingDigitalState, Written), StoreError> {
    let Some(stored) = stored else {
        return Err(StoreError::Rejected(InputError::new(
            "id",
            format!("no physical state with id {}", physical.id),
        )));
    };
    let what = format!("physical state {}", physical.id);
    let device = physical.device_id.as_str();
    if stored.device_id.as_str() != device {
        return Err(mismatch(
            "device_id",
            what,
            stored.device_id.as_str(),
            device,
        ));
    }
    contradiction(
        &what,
        &[
            (
                "device_timestamp",
                stored.device_timestamp.to_string(),
                physical.device_timestamp.to_string(),
            ),
            (
                "timestamp",
                stored.timestamp.to_string(),
                physical.timestamp.to_string(),
            ),
        ],
        &[],
    )?;
    readings_contradiction(&what, &stored.readings, &physical.readings)?;
    let copy = copy.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "digital copy of physical state {} conflicted on insert but cannot be read",
            physical.id
        ))
    })?;
    Ok((copy.clone(), Written::Existing))
}

/// The stored pending part of a row, refused unless it is exactly the input (device, physical
/// state, timestamp and readings).
fn check_row(
    row: &DigitalRow,
    pending: &PendingDigitalState,
    models: &ModelReadingsById,
) -> Result<PendingDigitalState, StoreError> {
    let what = format!("digital state {}", pending.id);
    if row.device_id.as_deref() != Some(pending.device_id.as_str()) {
        return Err(mismatch(
            "device_id",
            what,
            row.device_id.as_deref().unwrap_or("no device"),
            pending.device_id.as_str(),
        ));
    }
    if row.physicalstate_id != Some(pending.physicalstate_id) {
        return Err(mismatch(
            "physicalstate_id",
            what,
            &display_opt(row.physicalstate_id),
            &pending.physicalstate_id.to_string(),
        ));
    }
    if row.timestamp != Some(pending.timestamp) {
        return Err(mismatch(
            "timestamp",
            what,
            &display_opt(row.timestamp),
            &pending.timestamp.to_string(),
        ));
    }
    let stored_pending = row.pending(pending.id, models)?;
    readings_contradiction(&what, &stored_pending.readings, &pending.readings)?;
    Ok(stored_pending)
}

/// The stored digital state `given` claims to be, or the first field in which it differs.
fn check_stored(
    row: Option<&DigitalRow>,
    digital: &DigitalState,
    models: &ModelReadingsById,
) -> Result<DigitalState, StoreError> {
    let id = digital.pending.id;
    let row = row.ok_or_else(|| {
        StoreError::Rejected(InputError::new(
            "id",
            format!("no digital state with id {id}"),
        ))
    })?;
    let what = format!("digital state {id}");
    let given = &digital.pending;
    contradiction(
        &what,
        &[
            (
                "device_id",
                row.device_id.clone().unwrap_or_else(|| "none".into()),
                given.device_id.to_string(),
            ),
            (
                "physicalstate_id",
                display_opt(row.physicalstate_id),
                given.physicalstate_id.to_string(),
            ),
            (
                "timestamp",
                display_opt(row.timestamp),
                given.timestamp.to_string(),
            ),
        ],
        &[],
    )?;
    let stored_pending = row.pending(id, models)?;
    let stored = row.evaluation(stored_pending)?.ok_or_else(|| {
        StoreError::Rejected(InputError::new(
            "odte",
            format!("{what} has not been evaluated by the twin handler"),
        ))
    })?;
    readings_contradiction(&what, &stored.pending.readings, &given.readings)?;
    contradiction(
        &what,
        &[],
        &[
            ("availability", stored.availability, digital.availability),
            ("reliability", stored.reliability, digital.reliability),
            ("timeliness", stored.timeliness, digital.timeliness),
            ("odte", stored.odte, digital.odte),
        ],
    )?;
    contradiction(
        &what,
        &[(
            "lifecycle",
            stored.lifecycle.as_str().to_owned(),
            digital.lifecycle.as_str().to_owned(),
        )],
        &[],
    )?;
    Ok(stored)
}
