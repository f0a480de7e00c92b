-- The twin handler's window needs each state's device timestamp, which the seed keeps in
-- `physicalstate` only; joining it costs a lookup per state in the window. This table copies
-- what the count needs, beside the seed's tables (which stay exactly as they are), and is read
-- alone from its covering index. A trigger writes it, so rows written by anyone count; rows
-- deleted from digitalstate take their copies with them. (PostgreSQL: see its 0007.)
CREATE TABLE IF NOT EXISTS digitalstate_window (
    digitalstate_id INTEGER NOT NULL REFERENCES digitalstate(id) ON DELETE CASCADE,
    device_id VARCHAR(255) NOT NULL,
    timestamp BIGINT NOT NULL,
    device_timestamp BIGINT
);

CREATE INDEX IF NOT EXISTS digitalstate_window_idx
    ON digitalstate_window (device_id, timestamp, digitalstate_id, device_timestamp);

CREATE INDEX IF NOT EXISTS digitalstate_window_state_idx
    ON digitalstate_window (digitalstate_id);

CREATE TRIGGER IF NOT EXISTS digitalstate_window_copy AFTER INSERT ON digitalstate
WHEN NEW.device_id IS NOT NULL AND NEW.timestamp IS NOT NULL
BEGIN
    INSERT INTO digitalstate_window (digitalstate_id, device_id, timestamp, device_timestamp)
    SELECT NEW.id, NEW.device_id, NEW.timestamp, p.device_timestamp
    FROM physicalstate p WHERE p.id = NEW.physicalstate_id;
END;

INSERT INTO digitalstate_window (digitalstate_id, device_id, timestamp, device_timestamp)
SELECT d.id, d.device_id, d.timestamp, p.device_timestamp
FROM digitalstate d JOIN physicalstate p ON p.id = d.physicalstate_id
WHERE d.device_id IS NOT NULL AND d.timestamp IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM digitalstate_window c WHERE c.digitalstate_id = d.id);
