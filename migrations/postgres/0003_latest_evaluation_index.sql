-- A twin's latest evaluation (the twins API): the evaluated states of one device by id.
CREATE INDEX IF NOT EXISTS digitalstate_evaluated_idx
    ON digitalstate (device_id, id) WHERE odte IS NOT NULL;
