-- warden schema, version 2: ingestion.
--
-- warden.ingest_heartbeats() is the one implementation of what a heartbeat
-- does to the database. The HTTP path calls it with a whole group-committed
-- batch; warden.record_heartbeat(), for agents that write to PostgreSQL
-- directly, calls it with a batch of one. Both paths therefore leave the
-- same rows.

-- API keys. Only a SHA-256 of each key is stored; the key itself is shown
-- once, when created. key_id is the public part embedded in the key
-- (wdn_<key_id>_<secret>) and finds the row without scanning.
CREATE TABLE warden.api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id       text NOT NULL UNIQUE CHECK (key_id ~ '^[0-9a-f]{12}$'),
    secret_hash  bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    name         text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 128),
    scopes       text[] NOT NULL
                 CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'read', 'admin']),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- Expected heartbeat interval per mode, and the fallback ('default') for
-- agents that name no mode. `warden serve` writes [health.modes] and
-- health.default_interval here at start-up, so the SQL path and the HTTP
-- path agree on them.
CREATE TABLE warden.mode_intervals (
    mode        text PRIMARY KEY CHECK (mode IN ('emergency', 'active', 'idle', 'sleep', 'default')),
    interval_ms integer NOT NULL CHECK (interval_ms > 0)
);

INSERT INTO warden.mode_intervals (mode, interval_ms) VALUES
    ('emergency', 5000), ('active', 30000), ('idle', 30000), ('sleep', 900000), ('default', 30000);

-- Applies a batch of heartbeats, in array order, as one statement.
--
-- Parallel arrays hold one element per heartbeat; metrics are flattened
-- into their own parallel arrays, p_metric_idx pointing (1-based) at the
-- heartbeat each belongs to. Several heartbeats of the same agent are
-- applied in order: restart detection compares each uptime with the one
-- before it (in the batch, else the stored one), and agent_status ends with
-- the last values. Returns one row per heartbeat.
--
-- Callers validate first; the table constraints are the backstop.
CREATE FUNCTION warden.ingest_heartbeats(
    p_agent_id     text[],
    p_name         text[],
    p_labels       jsonb[],
    p_mode         text[],
    p_status       text[],
    p_uptime       bigint[],
    p_next_ms      integer[],
    p_sent_at      timestamptz[],
    p_metric_idx   integer[],
    p_metric_name  text[],
    p_metric_value double precision[],
    p_metric_unit  text[],
    p_received_at  timestamptz DEFAULT NULL
)
RETURNS TABLE (idx integer, is_new boolean, restart_detected boolean, next_heartbeat_ms integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ts timestamptz := coalesce(p_received_at, now());
BEGIN
    -- Lock the agents' rows in one global order, so concurrent writers
    -- with overlapping agents queue instead of deadlocking, and each sees
    -- the other's committed uptime before comparing.
    PERFORM 1
    FROM warden.agent_status s
    WHERE s.agent_id = ANY (p_agent_id)
    ORDER BY s.agent_id
    FOR UPDATE;

    RETURN QUERY
    WITH hb AS (
        SELECT u.ord::integer AS i, u.agent_id, u.name, u.labels, u.mode,
               coalesce(u.status, 'healthy') AS status, u.uptime, u.next_ms, u.sent_at
        FROM unnest(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at)
             WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
    ),
    prior AS (
        SELECT s.agent_id, s.name, s.labels, s.mode, s.uptime_seconds
        FROM warden.agent_status s
        WHERE s.agent_id = ANY (p_agent_id)
    ),
    seq AS (
        SELECT hb.*,
               (p.agent_id IS NULL AND row_number() OVER w = 1) AS fresh,
               coalesce((array_agg(hb.uptime) FILTER (WHERE hb.uptime IS NOT NULL) OVER before)[
                            count(hb.uptime) OVER before], p.uptime_seconds) AS prev_uptime,
               coalesce(hb.mode,
                        (array_agg(hb.mode) FILTER (WHERE hb.mode IS NOT NULL) OVER before)[
                            count(hb.mode) OVER before],
                        p.mode) AS effective_mode
        FROM hb
        LEFT JOIN prior p ON p.agent_id = hb.agent_id
        WINDOW w AS (PARTITION BY hb.agent_id ORDER BY hb.i),
               before AS (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
    ),
    res AS (
        SELECT seq.*,
               coalesce(seq.uptime < seq.prev_uptime, false) AS restart,
               coalesce(seq.next_ms, mi.interval_ms, md.interval_ms, 30000) AS expected_ms
        FROM seq
        LEFT JOIN warden.mode_intervals mi ON mi.mode = seq.effective_mode
        LEFT JOIN warden.mode_intervals md ON md.mode = 'default'
    ),
    ins_heartbeats AS (
        INSERT INTO warden.agent_heartbeats
            (agent_id, received_at, sent_at, mode, status, uptime_seconds, next_heartbeat_ms, restart_detected)
        SELECT r.agent_id, ts, r.sent_at, r.mode, r.status, r.uptime, r.next_ms, r.restart
        FROM res r
        ORDER BY r.i
    ),
    ins_metrics AS (
        INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value, unit)
        SELECT p_agent_id[m.i], ts, m.name, m.value, m.unit
        FROM unnest(p_metric_idx, p_metric_name, p_metric_value, p_metric_unit) AS m(i, name, value, unit)
    ),
    ins_events AS (
        INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
        SELECT ts, r.agent_id, 'agent_restarted', 'info',
               format('agent restarted: uptime went from %ss to %ss', r.prev_uptime, r.uptime),
               jsonb_build_object('previous_uptime_seconds', r.prev_uptime, 'uptime_seconds', r.uptime)
        FROM res r
        WHERE r.restart
        UNION ALL
        SELECT ts, r.agent_id, 'agent_registered', 'info',
               format('agent registered (mode %s, expecting a heartbeat every %s ms)',
                      coalesce(r.effective_mode, 'unset'), r.expected_ms),
               jsonb_build_object('mode', r.effective_mode, 'expected_interval_ms', r.expected_ms)
        FROM res r
        WHERE r.fresh
    ),
    agg AS (
        SELECT r.agent_id,
               (array_agg(r.name ORDER BY r.i DESC) FILTER (WHERE r.name IS NOT NULL))[1] AS name,
               (array_agg(r.labels ORDER BY r.i DESC) FILTER (WHERE r.labels IS NOT NULL))[1] AS labels,
               (array_agg(r.mode ORDER BY r.i DESC) FILTER (WHERE r.mode IS NOT NULL))[1] AS mode,
               (array_agg(r.status ORDER BY r.i DESC))[1] AS status,
               (array_agg(r.expected_ms ORDER BY r.i DESC))[1] AS expected_ms,
               (array_agg(r.sent_at ORDER BY r.i DESC))[1] AS sent_at,
               (array_agg(r.uptime ORDER BY r.i DESC) FILTER (WHERE r.uptime IS NOT NULL))[1] AS uptime,
               count(*) AS beats,
               count(*) FILTER (WHERE r.restart) AS restarts
        FROM res r
        GROUP BY r.agent_id
    ),
    upsert AS (
        INSERT INTO warden.agent_status AS s
            (agent_id, name, labels, mode, status, expected_interval_ms, first_seen, last_seen,
             last_sent_at, uptime_seconds, heartbeat_count, restart_count, liveness_since)
        SELECT a.agent_id,
               coalesce(a.name, p.name),
               coalesce(a.labels, p.labels, '{}'::jsonb),
               coalesce(a.mode, p.mode),
               a.status, a.expected_ms, ts, ts, a.sent_at,
               coalesce(a.uptime, p.uptime_seconds),
               a.beats, a.restarts, ts
        FROM agg a
        LEFT JOIN prior p ON p.agent_id = a.agent_id
        ORDER BY a.agent_id
        ON CONFLICT (agent_id) DO UPDATE SET
            name                 = EXCLUDED.name,
            labels               = EXCLUDED.labels,
            mode                 = EXCLUDED.mode,
            status               = EXCLUDED.status,
            expected_interval_ms = EXCLUDED.expected_interval_ms,
            last_seen            = EXCLUDED.last_seen,
            last_sent_at         = EXCLUDED.last_sent_at,
            uptime_seconds       = EXCLUDED.uptime_seconds,
            heartbeat_count      = s.heartbeat_count + EXCLUDED.heartbeat_count,
            restart_count        = s.restart_count + EXCLUDED.restart_count
    )
    SELECT r.i, r.fresh, r.restart, r.expected_ms
    FROM res r
    ORDER BY r.i;
END;
$$;

-- What a heartbeat is answered with, over HTTP and from SQL alike.
CREATE TYPE warden.heartbeat_ack AS (
    received          boolean,
    is_new            boolean,
    restart_detected  boolean,
    next_heartbeat_ms integer
);

-- One heartbeat from SQL, with the same effect as one POST /v1/heartbeats.
-- metrics: an object of name -> number, or name -> {"value": n, "unit": "ms"}.
-- Invalid input raises invalid_parameter_value (22023) naming the parameter.
CREATE FUNCTION warden.record_heartbeat(
    agent_id          text,
    mode              text DEFAULT NULL,
    status            text DEFAULT 'healthy',
    uptime_seconds    bigint DEFAULT NULL,
    next_heartbeat_ms integer DEFAULT NULL,
    metrics           jsonb DEFAULT NULL,
    name              text DEFAULT NULL,
    labels            jsonb DEFAULT NULL,
    sent_at           timestamptz DEFAULT NULL
)
RETURNS warden.heartbeat_ack
LANGUAGE plpgsql
AS $$
DECLARE
    ack     warden.heartbeat_ack;
    m_name  text[] := '{}';
    m_value double precision[] := '{}';
    m_unit  text[] := '{}';
    m_idx   integer[] := '{}';
    entry   record;
    v       double precision;
    u       text;
BEGIN
    IF agent_id IS NULL OR agent_id !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : -'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'agent_id';
    END IF;
    IF mode IS NOT NULL AND mode NOT IN ('emergency', 'active', 'idle', 'sleep') THEN
        RAISE EXCEPTION 'mode must be one of emergency, active, idle or sleep'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'mode';
    END IF;
    IF coalesce(status, 'healthy') NOT IN ('healthy', 'degraded', 'error') THEN
        RAISE EXCEPTION 'status must be one of healthy, degraded or error'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'status';
    END IF;
    IF uptime_seconds < 0 THEN
        RAISE EXCEPTION 'uptime_seconds must not be negative'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'uptime_seconds';
    END IF;
    IF next_heartbeat_ms NOT BETWEEN 100 AND 604800000 THEN
        RAISE EXCEPTION 'next_heartbeat_ms must be from 100 to 604800000 (7 days)'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'next_heartbeat_ms';
    END IF;
    IF labels IS NOT NULL AND jsonb_typeof(labels) <> 'object' THEN
        RAISE EXCEPTION 'labels must be an object of string values'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'labels';
    END IF;
    IF labels IS NOT NULL AND EXISTS (SELECT 1 FROM jsonb_each(labels) l WHERE jsonb_typeof(l.value) <> 'string') THEN
        RAISE EXCEPTION 'labels must be an object of string values'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'labels';
    END IF;
    IF metrics IS NOT NULL THEN
        IF jsonb_typeof(metrics) <> 'object' THEN
            RAISE EXCEPTION 'metrics must be an object of name -> number'
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
        END IF;
        FOR entry IN SELECT key, value FROM jsonb_each(metrics) ORDER BY key LOOP
            IF entry.key !~ '^[A-Za-z0-9._:/-]{1,128}$' THEN
                RAISE EXCEPTION 'metric name % must be 1-128 characters of A-Z a-z 0-9 . _ : / -', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            IF jsonb_typeof(entry.value) = 'number' THEN
                v := entry.value::text::double precision;
                u := NULL;
            ELSIF jsonb_typeof(entry.value) = 'object' AND jsonb_typeof(entry.value -> 'value') = 'number' THEN
                v := (entry.value ->> 'value')::double precision;
                u := entry.value ->> 'unit';
            ELSE
                RAISE EXCEPTION 'metric % must be a number or {"value": number, "unit": text}', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            IF v IN ('NaN'::double precision, 'Infinity'::double precision, '-Infinity'::double precision) THEN
                RAISE EXCEPTION 'metric % must be a finite number', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            m_idx := m_idx || 1;
            m_name := m_name || entry.key;
            m_value := m_value || v;
            m_unit := m_unit || u;
        END LOOP;
    END IF;

    SELECT true, r.is_new, r.restart_detected, r.next_heartbeat_ms
    INTO ack
    FROM warden.ingest_heartbeats(
        ARRAY[record_heartbeat.agent_id], ARRAY[record_heartbeat.name], ARRAY[record_heartbeat.labels],
        ARRAY[record_heartbeat.mode], ARRAY[coalesce(record_heartbeat.status, 'healthy')],
        ARRAY[record_heartbeat.uptime_seconds], ARRAY[record_heartbeat.next_heartbeat_ms],
        ARRAY[record_heartbeat.sent_at],
        m_idx, m_name, m_value, m_unit) AS r;
    RETURN ack;
END;
$$;

COMMENT ON FUNCTION warden.record_heartbeat IS
    'One heartbeat from SQL, with the same effect as one POST /v1/heartbeats.';
