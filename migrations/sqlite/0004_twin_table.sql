-- The twin table: each twin's place in its lifecycle (unbound, bound, entangled, disentangled;
-- see entwine_core::twin) and its latest figures, kept by the twin handler on every evaluation
-- and by the twin evaluator, which re-evaluates every twin at the current time so that silence
-- shows. The seed's tables are untouched: digitalstate.lifecycle keeps the seed's two words.
CREATE TABLE IF NOT EXISTS twin (
    device_id VARCHAR(255) PRIMARY KEY,
    lifecycle VARCHAR(32) NOT NULL,
    -- When the twin entered this lifecycle, and when it was last bound (ms).
    since BIGINT NOT NULL,
    bound_at BIGINT,
    -- Its latest digital state: id, twin timestamp, and the device's timestamp it mirrors.
    digitalstate_id INTEGER,
    last_update BIGINT,
    last_device_timestamp BIGINT,
    -- The figures of its latest evaluation, and when that was (ms).
    evaluated_at BIGINT NOT NULL,
    availability REAL NOT NULL,
    reliability REAL NOT NULL,
    timeliness REAL NOT NULL,
    odte REAL NOT NULL
);

-- Twins the database already holds (a seed database, or one from before this table) start
-- from their latest evaluation, bound since their first state.
INSERT INTO twin (device_id, lifecycle, since, bound_at, digitalstate_id, last_update,
                  last_device_timestamp, evaluated_at, availability, reliability, timeliness, odte)
SELECT d.device_id, d.lifecycle, d.timestamp,
       (SELECT MIN(f.timestamp) FROM digitalstate f WHERE f.device_id = d.device_id),
       d.id, d.timestamp, p.device_timestamp, d.timestamp,
       d.availability, d.reliability, d.timeliness, d.odte
FROM digitalstate d JOIN physicalstate p ON p.id = d.physicalstate_id
WHERE d.id IN (SELECT MAX(id) FROM digitalstate
               WHERE odte IS NOT NULL AND device_id IS NOT NULL GROUP BY device_id)
  AND d.lifecycle IN ('entangled', 'disentangled') AND d.timestamp IS NOT NULL
  AND d.availability IS NOT NULL AND d.reliability IS NOT NULL AND d.timeliness IS NOT NULL
ON CONFLICT (device_id) DO NOTHING;
