-- Same keys and index as the PostgreSQL migration of the same number (see there for why).
CREATE UNIQUE INDEX IF NOT EXISTS physicalstate_device_event_key
    ON physicalstate (device_id, device_timestamp);

CREATE UNIQUE INDEX IF NOT EXISTS digitalstate_physicalstate_key
    ON digitalstate (physicalstate_id);

CREATE INDEX IF NOT EXISTS digitalstate_device_timestamp_idx
    ON digitalstate (device_id, timestamp);
