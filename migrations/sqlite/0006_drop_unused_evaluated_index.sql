-- digitalstate_evaluated_idx (migration 0003) served the twins API before the twin table; no
-- query uses it since. It cost a write per evaluation and, because the twin handler's UPDATE
-- sets `odte`, the column of its predicate, it kept PostgreSQL from updating those rows in place
-- (HOT). History is served by digitalstate_device_timestamp_idx.
DROP INDEX IF EXISTS digitalstate_evaluated_idx;
