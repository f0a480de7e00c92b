-- Dead letters: messages the pipeline refused, with why (see entwine_core::deadletter). Small
-- whatever the message: the payload's size, SHA-256 and a bounded prefix, never the payload.
-- The same message refused again at the same stage (a redelivery after a crash, or a device
-- repeating itself) is one row whose `deliveries` counts it.
CREATE TABLE IF NOT EXISTS deadletter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic VARCHAR(1024) NOT NULL,
    device_id VARCHAR(1024),
    stage VARCHAR(64) NOT NULL,
    status INTEGER,
    error TEXT NOT NULL,
    payload_bytes BIGINT NOT NULL,
    payload_sha256 CHAR(64) NOT NULL,
    payload_prefix TEXT NOT NULL,
    truncated INTEGER NOT NULL,
    first_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    deliveries BIGINT NOT NULL DEFAULT 1,
    UNIQUE (topic, stage, payload_sha256)
);
CREATE INDEX IF NOT EXISTS deadletter_last_at_idx ON deadletter (last_at, id);
