-- Idempotency: one physical state per (device, device timestamp), so a redelivered event is
-- answered with the state it already produced; one digital state per physical state, so a
-- repeated shadow call neither adds a row nor counts twice in reliability.
--
-- A seed database may hold duplicates (the seed stored a redelivered event twice). The keys
-- cannot be added over them, so the upgrade stops here, inside its transaction, with nothing
-- changed and a message saying what to resolve (README, "Upgrading a seed database").
DO $$
DECLARE
    duplicate_events BIGINT;
    duplicate_shadows BIGINT;
BEGIN
    SELECT COUNT(*) INTO duplicate_events FROM (
        SELECT 1 FROM physicalstate
        WHERE device_id IS NOT NULL AND device_timestamp IS NOT NULL
        GROUP BY device_id, device_timestamp HAVING COUNT(*) > 1
    ) AS d;
    IF duplicate_events > 0 THEN
        RAISE EXCEPTION 'cannot upgrade: % (device_id, device_timestamp) pairs occur more than once in physicalstate; keep one row of each (README, "Upgrading a seed database") and migrate again', duplicate_events;
    END IF;
    SELECT COUNT(*) INTO duplicate_shadows FROM (
        SELECT 1 FROM digitalstate WHERE physicalstate_id IS NOT NULL
        GROUP BY physicalstate_id HAVING COUNT(*) > 1
    ) AS d;
    IF duplicate_shadows > 0 THEN
        RAISE EXCEPTION 'cannot upgrade: % physical states have more than one digital state in digitalstate; keep one row of each (README, "Upgrading a seed database") and migrate again', duplicate_shadows;
    END IF;
END
$$;

CREATE UNIQUE INDEX IF NOT EXISTS physicalstate_device_event_key
    ON physicalstate (device_id, device_timestamp);

CREATE UNIQUE INDEX IF NOT EXISTS digitalstate_physicalstate_key
    ON digitalstate (physicalstate_id);

-- The twin handler's window: the digital states of one device between two timestamps.
CREATE INDEX IF NOT EXISTS digitalstate_device_timestamp_idx
    ON digitalstate (device_id, timestamp);
