-- Device models (entwine_core::model): a device of a loaded model reports readings of its own
-- properties, which the seed's two REAL columns cannot hold. They are stored here, one row per
-- physical state, beside the seed's tables (which keep exactly their columns; the state's
-- `temperature` and `energy` stay NULL): the model and its version, and every reading by
-- property name as JSONB. A digital state reads its readings through its physical state
-- (`digitalstate.physicalstate_id`), as it copies the seed's readings from it. The seed's own
-- device never writes here, so a seed database and its rows are untouched by this migration.
CREATE TABLE IF NOT EXISTS physicalstate_reading (
    physicalstate_id INTEGER PRIMARY KEY REFERENCES physicalstate(id) ON DELETE CASCADE,
    model VARCHAR(255) NOT NULL,
    model_version VARCHAR(64) NOT NULL,
    readings JSONB NOT NULL CHECK (jsonb_typeof(readings) = 'object')
);
