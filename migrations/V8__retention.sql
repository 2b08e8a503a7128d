-- warden schema, version 8: rollups that outlive the raw rows, and the
-- bookkeeping of the retention job.
--
-- Raw heartbeats and metrics are kept for days; these per-agent rollups
-- keep the shape of the history (heartbeat rate, score range) for months,
-- so long-range dashboards and reports stay cheap after the raw rows are
-- dropped. Availability over months comes from the liveness transitions
-- (status_changed events), which are few and kept as long as the rollups.

CREATE TABLE warden.heartbeat_rollups (
    agent_id     text COLLATE "C" NOT NULL,
    -- 'minute' or 'hour'
    bucket       text NOT NULL CHECK (bucket IN ('minute', 'hour')),
    bucket_start timestamptz NOT NULL,
    heartbeats   bigint NOT NULL CHECK (heartbeats >= 0),
    -- Heartbeats that reported a restart, and a non-healthy status.
    restarts     bigint NOT NULL DEFAULT 0,
    unhealthy    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, bucket, bucket_start)
);

CREATE INDEX heartbeat_rollups_time_idx ON warden.heartbeat_rollups (bucket, bucket_start);

CREATE TABLE warden.score_rollups (
    agent_id   text COLLATE "C" NOT NULL,
    hour_start timestamptz NOT NULL,
    samples    integer NOT NULL,
    score_min  double precision,
    score_avg  double precision,
    score_max  double precision,
    PRIMARY KEY (agent_id, hour_start)
);

CREATE INDEX score_rollups_time_idx ON warden.score_rollups (hour_start);

-- Where the rollups have got to. One row.
CREATE TABLE warden.retention_state (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    minute_watermark timestamptz,
    hour_watermark   timestamptz,
    score_watermark  timestamptz,
    last_run_at      timestamptz
);

INSERT INTO warden.retention_state DEFAULT VALUES;
