-- warden schema, version 33: each agent's liveness per UTC day, kept once
-- the day can no longer change.
--
-- The public status page drew its daily bars (90 days by default) from
-- warden.liveness_spans over the whole range at every refresh: its cost
-- grew with the fleet's churn over all those days, and reached the
-- page's 10 s bound near 6,000 agents with a busy week. Retention
-- (src/retention.rs) now writes each closed day here once, one day per
-- transaction, and the page computes only the days after
-- retention_state.liveness_day_watermark from the transitions.
--
-- A day is written once no transition still to come can reach back into
-- it: an outage is recorded up to (offline_after_missed + jitter + 1)
-- intervals after it began, and a stretch without evaluation when
-- evaluation resumes, after the last cycle. The figures are those of
-- liveness_spans for the day alone; a later change to that function's
-- meaning must empty this table (and the watermark) to have them
-- written again.
CREATE TABLE warden.liveness_days (
    day              date NOT NULL,
    agent_id         text NOT NULL,
    -- The agent's life the day belongs to: an agent removed and
    -- registered again starts afresh (V28), and its earlier life's days
    -- are not its own.
    first_seen       timestamptz NOT NULL,
    online_seconds   double precision NOT NULL,
    degraded_seconds double precision NOT NULL,
    offline_seconds  double precision NOT NULL,
    PRIMARY KEY (day, agent_id)
);

-- Days before it are in liveness_days; NULL: none yet.
ALTER TABLE warden.retention_state ADD COLUMN liveness_day_watermark date;
