-- warden schema, version 3: the health evaluator.

-- What the evaluator remembers between cycles. One row.
CREATE TABLE warden.evaluator_state (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- Replica that ran the last liveness cycle.
    leader            text,
    last_cycle_at     timestamptz,
    -- When evaluation last resumed after a gap (warden down, database
    -- down, no leader): silence before this does not count against agents.
    resumed_at        timestamptz,
    last_score_at     timestamptz,
    -- Metric samples up to this time are folded into agent_metric_stats.
    metrics_watermark timestamptz
);

INSERT INTO warden.evaluator_state DEFAULT VALUES;

-- Running metric figures per agent and kind (see src/health/stats.rs):
-- fast (5 min) and slow (1 h) weighted averages of a gauge, or of a
-- counter's hourly rate; a counter's count over about the last hour; and
-- weighted least-squares sums for the trend, time origin at updated_at.
CREATE TABLE warden.agent_metric_stats (
    agent_id   text COLLATE "C" NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('latency', 'cpu', 'memory', 'errors', 'work', 'error_rate')),
    samples    bigint NOT NULL CHECK (samples >= 0),
    updated_at timestamptz NOT NULL,
    fast       double precision NOT NULL,
    slow       double precision NOT NULL,
    hour_sum   double precision NOT NULL DEFAULT 0,
    reg_w      double precision NOT NULL DEFAULT 0,
    reg_t      double precision NOT NULL DEFAULT 0,
    reg_tt     double precision NOT NULL DEFAULT 0,
    reg_x      double precision NOT NULL DEFAULT 0,
    reg_tx     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, kind)
);

-- Liveness transitions are read back by time (flap detection, reports).
CREATE INDEX system_events_transitions_idx ON warden.system_events (occurred_at, agent_id)
    WHERE event_type = 'status_changed';
