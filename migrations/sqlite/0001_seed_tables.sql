-- The seed system's two tables in SQLite, the embedded default store. SERIAL becomes
-- INTEGER PRIMARY KEY AUTOINCREMENT (ids never reused, as with a PostgreSQL sequence); the
-- other column names and declared types are the seed's.
CREATE TABLE IF NOT EXISTS physicalstate (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id VARCHAR(255),
    device_timestamp BIGINT,
    timestamp BIGINT,
    temperature REAL,
    energy REAL
);

CREATE TABLE IF NOT EXISTS digitalstate (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    physicalstate_id INTEGER REFERENCES physicalstate(id),
    device_id VARCHAR(255),
    timestamp BIGINT,
    temperature REAL,
    energy REAL,
    availability REAL,
    reliability REAL,
    timeliness REAL,
    odte REAL,
    lifecycle VARCHAR(255)
);
