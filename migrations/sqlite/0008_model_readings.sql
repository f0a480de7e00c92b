-- Device models: the readings of a model-described device, one row per physical state, beside
-- the seed's tables (whose `temperature` and `energy` stay NULL for such a state); readings as
-- JSON text. (PostgreSQL: see its 0008.)
CREATE TABLE IF NOT EXISTS physicalstate_reading (
    physicalstate_id INTEGER PRIMARY KEY REFERENCES physicalstate(id) ON DELETE CASCADE,
    model VARCHAR(255) NOT NULL,
    model_version VARCHAR(64) NOT NULL,
    readings TEXT NOT NULL CHECK (json_valid(readings) AND json_type(readings) = 'object')
);
