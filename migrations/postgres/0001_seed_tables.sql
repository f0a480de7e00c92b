-- The seed system's two tables, exactly as its deployment guide creates them (names, columns,
-- types). IF NOT EXISTS: a database an operator of the seed system created is kept as it is,
-- rows included, and upgraded by the migrations that follow.
CREATE TABLE IF NOT EXISTS physicalstate (
    id SERIAL PRIMARY KEY,
    device_id VARCHAR(255),
    device_timestamp BIGINT,
    timestamp BIGINT,
    temperature REAL,
    energy REAL
);

CREATE TABLE IF NOT EXISTS digitalstate (
    id SERIAL PRIMARY KEY,
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
