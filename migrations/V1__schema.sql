-- warden schema, version 1: the tables of the DESIGN contract.
--
-- Conventions:
-- * Enumerated values are text columns with CHECK constraints rather than
--   enum types: reports read them as plain text and a later migration can
--   widen a list by swapping one constraint.
-- * Every timestamp is timestamptz; warden's sessions run in UTC.
-- * Append-only, high-volume tables (heartbeats, metrics, score history)
--   are range-partitioned by UTC day so retention drops whole partitions
--   instead of deleting rows. warden.ensure_partitions() creates them ahead.
-- * Those partitioned tables carry no foreign key to agent_status: ingest
--   writes the parent row in the same transaction, and a per-row FK check
--   would cost the hot path a lookup for nothing.
-- * Agent ids use the "C" collation everywhere: they are ASCII by rule,
--   byte order is their natural order, and index comparisons stay cheap.

-- The schema itself is created by the migration runner, which keeps its
-- history table inside it.

-- One row per agent: its identity, what it last reported, and what warden
-- concluded about it. Ingest owns the reporting columns; the evaluator owns
-- liveness, score, tier and components.
CREATE TABLE warden.agent_status (
    -- The character set is enforced when a row is inserted (trigger
    -- below), not by a CHECK that would re-run on every heartbeat's update.
    agent_id             text COLLATE "C" PRIMARY KEY CHECK (char_length(agent_id) BETWEEN 1 AND 128),
    name                 text CHECK (char_length(name) <= 256),
    labels               jsonb NOT NULL DEFAULT '{}'::jsonb
                         CHECK (jsonb_typeof(labels) = 'object'),
    mode                 text CHECK (mode IN ('emergency', 'active', 'idle', 'sleep')),
    status               text CHECK (status IN ('healthy', 'degraded', 'error')),
    expected_interval_ms integer NOT NULL CHECK (expected_interval_ms > 0),
    first_seen           timestamptz NOT NULL,
    last_seen            timestamptz NOT NULL,
    last_sent_at         timestamptz,
    uptime_seconds       bigint CHECK (uptime_seconds >= 0),
    heartbeat_count      bigint NOT NULL DEFAULT 0 CHECK (heartbeat_count >= 0),
    restart_count        bigint NOT NULL DEFAULT 0 CHECK (restart_count >= 0),
    last_restart_at      timestamptz,
    -- How long the agent had been up when it last restarted.
    uptime_before_restart bigint,
    liveness             text NOT NULL DEFAULT 'unknown'
                         CHECK (liveness IN ('unknown', 'online', 'degraded', 'offline')),
    liveness_since       timestamptz NOT NULL DEFAULT now(),
    score                double precision CHECK (score >= 0 AND score <= 100),
    tier                 text CHECK (tier IN ('excellent', 'good', 'fair', 'poor', 'critical')),
    components           jsonb,
    evaluated_at         timestamptz,
    -- Running figures kept by ingest, so the evaluator never reads raw
    -- heartbeats: on-time heartbeats in a row (recovery hysteresis), the
    -- exponentially weighted mean and variance of inter-arrival times (phi
    -- detector, jitter), and heartbeats received with a one-hour decay
    -- (delivery ratio).
    ontime_streak        integer NOT NULL DEFAULT 0,
    ia_count             integer NOT NULL DEFAULT 0,
    ia_mean_ms           double precision NOT NULL DEFAULT 0,
    ia_var_ms2           double precision NOT NULL DEFAULT 0,
    beats_decayed        double precision NOT NULL DEFAULT 0,
    -- Kept by the evaluator.
    score_trend          double precision,
    history_at           timestamptz
)
-- Every heartbeat rewrites its agent's row; free space on each page lets
-- PostgreSQL do that in place (HOT) without touching the indexes.
WITH (fillfactor = 70);

CREATE FUNCTION warden.check_agent_id() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.agent_id !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : -'
            USING ERRCODE = 'check_violation', COLUMN = 'agent_id';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER agent_status_agent_id_check
    BEFORE INSERT OR UPDATE OF agent_id ON warden.agent_status
    FOR EACH ROW EXECUTE FUNCTION warden.check_agent_id();

CREATE INDEX agent_status_liveness_idx ON warden.agent_status (liveness);
CREATE INDEX agent_status_tier_idx ON warden.agent_status (tier);
CREATE INDEX agent_status_labels_idx ON warden.agent_status USING gin (labels jsonb_path_ops);

-- Every heartbeat as received.
CREATE TABLE warden.agent_heartbeats (
    agent_id          text COLLATE "C" NOT NULL,
    received_at       timestamptz NOT NULL,
    sent_at           timestamptz,
    mode              text CHECK (mode IN ('emergency', 'active', 'idle', 'sleep')),
    status            text NOT NULL CHECK (status IN ('healthy', 'degraded', 'error')),
    uptime_seconds    bigint CHECK (uptime_seconds >= 0),
    next_heartbeat_ms integer CHECK (next_heartbeat_ms > 0),
    restart_detected  boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (received_at);

CREATE INDEX agent_heartbeats_agent_idx ON warden.agent_heartbeats (agent_id, received_at);
-- Rows arrive in time order, so a BRIN index serves time-range scans
-- (reports, rollups) for almost nothing per insert.
CREATE INDEX agent_heartbeats_time_idx ON warden.agent_heartbeats USING brin (received_at);

-- One row per metric sample.
CREATE TABLE warden.performance_metrics (
    agent_id    text COLLATE "C" NOT NULL,
    recorded_at timestamptz NOT NULL,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 128),
    value       double precision NOT NULL
                CHECK (value <> 'NaN'::double precision
                       AND value <> 'Infinity'::double precision
                       AND value <> '-Infinity'::double precision),
    unit        text CHECK (char_length(unit) <= 32)
) PARTITION BY RANGE (recorded_at);

CREATE INDEX performance_metrics_agent_idx ON warden.performance_metrics (agent_id, name, recorded_at);
CREATE INDEX performance_metrics_time_idx ON warden.performance_metrics USING brin (recorded_at);

-- Everything that happened: transitions, restarts, agent-reported errors,
-- recovery escalations. agent_id is NULL for fleet-wide events.
CREATE TABLE warden.system_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    agent_id    text COLLATE "C",
    event_type  text NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_.]{0,63}$'),
    severity    text NOT NULL CHECK (severity IN ('info', 'warning', 'critical', 'emergency')),
    message     text NOT NULL CHECK (char_length(message) <= 4096),
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    source      text NOT NULL DEFAULT 'warden' CHECK (source IN ('warden', 'agent'))
);

CREATE INDEX system_events_agent_idx ON warden.system_events (agent_id, occurred_at);
CREATE INDEX system_events_time_idx ON warden.system_events (occurred_at);
CREATE INDEX system_events_type_idx ON warden.system_events (event_type, occurred_at);

-- One episode of one issue on one agent (agent_id NULL: the whole fleet).
CREATE TABLE warden.incidents (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id    text COLLATE "C",
    issue_type  text NOT NULL CHECK (issue_type IN (
                    'agent_unresponsive', 'heartbeat_late', 'extended_offline',
                    'restart_loop', 'flapping', 'high_error_rate',
                    'resource_exhaustion', 'performance_degradation', 'fleet_outage')),
    severity    text NOT NULL CHECK (severity IN ('info', 'warning', 'critical', 'emergency')),
    state       text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    opened_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    predicted   boolean NOT NULL DEFAULT false,
    summary     text,
    resolution  text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    CHECK ((state = 'open') = (resolved_at IS NULL)),
    CHECK (resolved_at IS NULL OR resolved_at >= opened_at)
);

-- At most one open incident per agent and issue type; NULL agents (the
-- fleet) share one slot per issue type.
CREATE UNIQUE INDEX incidents_one_open_idx
    ON warden.incidents (coalesce(agent_id, ''), issue_type) WHERE state = 'open';
CREATE INDEX incidents_agent_idx ON warden.incidents (agent_id, opened_at);
CREATE INDEX incidents_opened_idx ON warden.incidents (opened_at);

-- One row per attempt of one recovery action.
CREATE TABLE warden.recovery_actions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id bigint REFERENCES warden.incidents (id),
    agent_id    text COLLATE "C" NOT NULL,
    strategy    text NOT NULL,
    action      text NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN (
                    'pending', 'running', 'verifying', 'succeeded', 'failed', 'timed_out', 'abandoned')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    outcome     text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX recovery_actions_incident_idx ON warden.recovery_actions (incident_id);
CREATE INDEX recovery_actions_agent_idx ON warden.recovery_actions (agent_id, created_at);
CREATE INDEX recovery_actions_active_idx ON warden.recovery_actions (state)
    WHERE state IN ('pending', 'running', 'verifying');

-- Score snapshots: one per agent on change, and periodically otherwise.
CREATE TABLE warden.health_history (
    agent_id     text COLLATE "C" NOT NULL,
    evaluated_at timestamptz NOT NULL,
    score        double precision CHECK (score >= 0 AND score <= 100),
    tier         text CHECK (tier IN ('excellent', 'good', 'fair', 'poor', 'critical')),
    liveness     text NOT NULL CHECK (liveness IN ('unknown', 'online', 'degraded', 'offline')),
    components   jsonb
) PARTITION BY RANGE (evaluated_at);

CREATE INDEX health_history_agent_idx ON warden.health_history (agent_id, evaluated_at);

-- The subject of notifications: one per dedup key while it is not resolved.
CREATE TABLE warden.alerts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id      bigint REFERENCES warden.incidents (id),
    dedup_key        text NOT NULL,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'critical', 'emergency')),
    state            text NOT NULL DEFAULT 'firing'
                     CHECK (state IN ('firing', 'acknowledged', 'resolved')),
    escalation_level integer NOT NULL DEFAULT 0 CHECK (escalation_level >= 0),
    opened_at        timestamptz NOT NULL DEFAULT now(),
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    resolved_at      timestamptz,
    CHECK ((state = 'acknowledged') <= (acknowledged_at IS NOT NULL)),
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);

CREATE UNIQUE INDEX alerts_one_active_idx ON warden.alerts (dedup_key) WHERE state <> 'resolved';
CREATE INDEX alerts_incident_idx ON warden.alerts (incident_id);
CREATE INDEX alerts_opened_idx ON warden.alerts (opened_at);

-- The outbox: one message to one channel.
CREATE TABLE warden.alert_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id        bigint NOT NULL REFERENCES warden.alerts (id),
    channel         text NOT NULL CHECK (channel ~ '^[a-z0-9_]{1,64}$'),
    kind            text NOT NULL CHECK (kind IN ('firing', 'escalation', 'repeat', 'resolved')),
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz,
    CHECK ((state = 'sent') = (sent_at IS NOT NULL))
);

CREATE INDEX alert_deliveries_due_idx ON warden.alert_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX alert_deliveries_alert_idx ON warden.alert_deliveries (alert_id);

-- Creates one partition per UTC day in [p_from, p_to] for every partitioned
-- table, skipping those that exist. Returns how many it created. Replicas
-- may call it concurrently: a transaction-scoped advisory lock serialises
-- them so none trips over another's CREATE.
CREATE FUNCTION warden.ensure_partitions(p_from date, p_to date)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    parent  text;
    day     date;
    created integer := 0;
    child   text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('warden.ensure_partitions'));
    FOREACH parent IN ARRAY ARRAY['agent_heartbeats', 'performance_metrics', 'health_history'] LOOP
        day := p_from;
        WHILE day <= p_to LOOP
            child := format('%s_p%s', parent, to_char(day, 'YYYYMMDD'));
            IF to_regclass(format('warden.%I', child)) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE warden.%I PARTITION OF warden.%I FOR VALUES FROM (%L) TO (%L)',
                    child, parent,
                    (day::timestamp AT TIME ZONE 'UTC'),
                    ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            END IF;
            day := day + 1;
        END LOOP;
    END LOOP;
    RETURN created;
END;
$$;

-- Partitions from yesterday to a week ahead, so the first heartbeat after
-- `warden migrate` has somewhere to go even before `serve` runs upkeep.
SELECT warden.ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, (now() AT TIME ZONE 'UTC')::date + 7);
