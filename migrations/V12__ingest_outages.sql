-- When ingestion refused heartbeats because the database was out of
-- reach, recorded by the writer that found it again. Liveness leaves
-- these stretches out of agents' silence: a heartbeat refused with 503
-- is not the agent's fault. Outages long enough to pause evaluation too
-- are also covered by the evaluator's own resumption (evaluator_state);
-- these windows cover the shorter ones. Kept for a week.
CREATE TABLE warden.ingest_outages (
    started_at timestamptz NOT NULL,
    ended_at   timestamptz NOT NULL,
    CHECK (ended_at >= started_at)
);

CREATE INDEX ingest_outages_ended_idx ON warden.ingest_outages (ended_at);
