//! The pipeline's writes for many inputs at once: what a function does with a batch (a JSON
//! array through its route). Each answers one result per input, in order, with exactly the
//! per-event semantics: the inputs are taken in order, as if each were written alone after the
//! previous one (a device's later state in the batch is not in an earlier state's window), each
//! idempotent. An input the store refuses (unknown id, a different event under a used key, a
//! corrupt row) is refused alone and the others go on; a failure of the store itself
//! (unavailable, not migrated) fails the whole batch, which then wrote nothing.

use entwine_core::odte::OdteConfig;
use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalEvent, PhysicalState};

use crate::{Store, StoreError, TwinChange, Written};

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

/// Sorts a single call's result into the batch's: an element's own error is kept in `each`, the
/// store's ends the batch.
fn sort<T>(each: &mut Each<T>, result: Result<T, StoreError>) -> Result<(), StoreError> {
    match result {
        Err(e) if !is_element_error(&e) => Err(e),
        other => {
            each.push(other);
            Ok(())
        }
    }
}

impl Store {
    /// [`Store::record_physical_event`] for every event of a batch, received at `now_ms`.
    pub async fn record_physical_events(
        &self,
        events: &[PhysicalEvent],
        now_ms: i64,
    ) -> Result<Each<(PhysicalState, Written)>, StoreError> {
        let mut each = Vec::with_capacity(events.len());
        for event in events {
            sort(&mut each, self.record_physical_event(event, now_ms).await)?;
        }
        Ok(each)
    }

    /// [`Store::record_shadow`] for every physical state of a batch, at `now_ms`.
    pub async fn record_shadows(
        &self,
        states: &[PhysicalState],
        now_ms: i64,
    ) -> Result<Each<(PendingDigitalState, Written)>, StoreError> {
        let mut each = Vec::with_capacity(states.len());
        for state in states {
            sort(&mut each, self.record_shadow(state, now_ms).await)?;
        }
        Ok(each)
    }

    /// [`Store::evaluate_digital_state`] for every pending state of a batch, in order: each
    /// state's window holds the states before it, not those after it in the batch, and each
    /// twin moves through its states' evaluations in turn.
    pub async fn evaluate_digital_states(
        &self,
        pending: &[PendingDigitalState],
        config: &OdteConfig,
    ) -> Result<Each<(DigitalState, Written, Option<TwinChange>)>, StoreError> {
        let mut each = Vec::with_capacity(pending.len());
        for state in pending {
            sort(&mut each, self.evaluate_digital_state(state, config).await)?;
        }
        Ok(each)
    }

    /// [`Store::stored_digital`] for every digital state of a batch.
    pub async fn stored_digitals(
        &self,
        states: &[DigitalState],
    ) -> Result<Each<DigitalState>, StoreError> {
        let mut each = Vec::with_capacity(states.len());
        for state in states {
            sort(&mut each, self.stored_digital(state).await)?;
        }
        Ok(each)
    }
}
