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

-- The health settings ingest needs to keep its running figures, also
-- written by `warden serve` at start-up. One row.
CREATE TABLE warden.health_params (
    id                   boolean PRIMARY KEY DEFAULT true CHECK (id),
    jitter_tolerance     double precision NOT NULL CHECK (jitter_tolerance >= 0),
    offline_after_missed integer NOT NULL CHECK (offline_after_missed >= 1)
);

INSERT INTO warden.health_params (jitter_tolerance, offline_after_missed) VALUES (0.2, 3);

-- Agents someone watches live (GET /v1/stream?agent=ID&heartbeats=true):
-- ingest announces their heartbeats on the warden_heartbeats channel.
-- Registrations expire unless the watching replica refreshes them.
CREATE TABLE warden.observed_agents (
    agent_id text COLLATE "C" PRIMARY KEY,
    until    timestamptz NOT NULL
);

-- Applies heartbeats whose agents are all distinct, as one statement: the
-- heartbeat rows, restart and registration events, and agent_status.
-- Returns one row per heartbeat (idx is its array position). Internal to
-- warden.ingest_heartbeats, which guarantees the distinctness.
--
-- Known agents are UPDATEd, and every decision that depends on the
-- agent's previous state (restart detection, the mode an omitted mode
-- falls back to) is made in the SET clause from the row as locked by that
-- UPDATE. A concurrent writer therefore can never make it compare against
-- stale values. New agents are inserted; if another writer registered the
-- same agent an instant earlier, ON CONFLICT turns the insert into the
-- same update.
CREATE FUNCTION warden.ingest_round(
    p_agent_id text[],
    p_name     text[],
    p_labels   jsonb[],
    p_mode     text[],
    p_status   text[],
    p_uptime   bigint[],
    p_next_ms  integer[],
    p_sent_at  timestamptz[],
    ts         timestamptz
)
RETURNS TABLE (idx integer, is_new boolean, restart_detected boolean, next_heartbeat_ms integer)
LANGUAGE plpgsql
-- The statement below is large and its best plan does not depend on the
-- arrays' contents; planning it afresh per call cost more than running it.
-- The generic plan's row estimates are pessimistic enough to trigger JIT
-- compilation, which costs seconds per call on a query that runs in
-- microseconds; callers may be any session, so it is switched off here.
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH hb AS (
        SELECT u.ord::integer AS i, u.agent_id, u.name, u.labels, u.mode,
               coalesce(u.status, 'healthy') AS status, u.uptime, u.next_ms, u.sent_at,
               mi.interval_ms AS mode_ms, hp.jitter_tolerance AS tol, hp.offline_after_missed AS off
        FROM unnest(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at)
             WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
        CROSS JOIN warden.health_params hp
        LEFT JOIN warden.mode_intervals mi ON mi.mode = u.mode
    ),
    upd AS (
        UPDATE warden.agent_status s SET
            name                  = coalesce(h.name, s.name),
            labels                = coalesce(h.labels, s.labels),
            mode                  = coalesce(h.mode, s.mode),
            status                = h.status,
            expected_interval_ms  = coalesce(h.next_ms, h.mode_ms,
                                             (SELECT m.interval_ms FROM warden.mode_intervals m
                                              WHERE m.mode = coalesce(s.mode, 'default')),
                                             30000),
            last_seen             = ts,
            last_sent_at          = h.sent_at,
            uptime_seconds        = coalesce(h.uptime, s.uptime_seconds),
            heartbeat_count       = s.heartbeat_count + 1,
            restart_count         = s.restart_count + coalesce((h.uptime < s.uptime_seconds)::integer, 0),
            last_restart_at       = CASE WHEN h.uptime < s.uptime_seconds THEN ts ELSE s.last_restart_at END,
            uptime_before_restart = CASE WHEN h.uptime < s.uptime_seconds THEN s.uptime_seconds
                                         ELSE s.uptime_before_restart END,
            -- On time: within the expected interval plus the tolerance.
            -- Every heartbeat counts as one; on-time ones extend the run.
            ontime_streak         = CASE WHEN extract(epoch FROM ts - s.last_seen) * 1000
                                              <= s.expected_interval_ms * (1 + h.tol)
                                         THEN s.ontime_streak + 1 ELSE 1 END,
            -- Inter-arrival statistics leave out outages (gaps past the
            -- offline threshold) and heartbeats of one batch (under 10 ms),
            -- which say nothing about the agent's rhythm. The weight is a
            -- plain average for the first 20 samples, then exponential.
            ia_count              = s.ia_count + CASE WHEN extract(epoch FROM ts - s.last_seen) * 1000
                                         BETWEEN 10 AND s.expected_interval_ms * (h.off + h.tol) THEN 1 ELSE 0 END,
            ia_mean_ms            = CASE WHEN extract(epoch FROM ts - s.last_seen) * 1000
                                              BETWEEN 10 AND s.expected_interval_ms * (h.off + h.tol)
                                         THEN s.ia_mean_ms + greatest(1.0 / (s.ia_count + 1), 0.05)
                                              * (extract(epoch FROM ts - s.last_seen) * 1000 - s.ia_mean_ms)
                                         ELSE s.ia_mean_ms END,
            ia_var_ms2            = CASE WHEN extract(epoch FROM ts - s.last_seen) * 1000
                                              BETWEEN 10 AND s.expected_interval_ms * (h.off + h.tol)
                                         THEN (1 - greatest(1.0 / (s.ia_count + 1), 0.05))
                                              * (s.ia_var_ms2 + greatest(1.0 / (s.ia_count + 1), 0.05)
                                                 * power(extract(epoch FROM ts - s.last_seen) * 1000 - s.ia_mean_ms, 2))
                                         ELSE s.ia_var_ms2 END,
            beats_decayed         = s.beats_decayed * exp(-extract(epoch FROM ts - s.last_seen) / 3600.0) + 1
        FROM hb h
        WHERE s.agent_id = h.agent_id
        RETURNING h.i, s.agent_id, false AS fresh, s.last_restart_at IS NOT DISTINCT FROM ts AS restart,
                  s.uptime_before_restart, s.uptime_seconds, s.mode, s.expected_interval_ms
    ),
    ins AS (
        INSERT INTO warden.agent_status AS s
            (agent_id, name, labels, mode, status, expected_interval_ms, first_seen, last_seen,
             last_sent_at, uptime_seconds, heartbeat_count, restart_count, liveness_since,
             ontime_streak, beats_decayed)
        SELECT h.agent_id, h.name, coalesce(h.labels, '{}'::jsonb), h.mode, h.status,
               coalesce(h.next_ms, h.mode_ms, d.interval_ms, 30000), ts, ts, h.sent_at, h.uptime, 1, 0, ts, 1, 1
        FROM hb h
        LEFT JOIN warden.mode_intervals d ON d.mode = 'default'
        WHERE NOT EXISTS (SELECT 1 FROM warden.agent_status x WHERE x.agent_id = h.agent_id)
        ORDER BY h.agent_id
        ON CONFLICT (agent_id) DO UPDATE SET
            name                  = coalesce(EXCLUDED.name, s.name),
            labels                = CASE WHEN EXCLUDED.labels = '{}'::jsonb THEN s.labels ELSE EXCLUDED.labels END,
            mode                  = coalesce(EXCLUDED.mode, s.mode),
            status                = EXCLUDED.status,
            expected_interval_ms  = EXCLUDED.expected_interval_ms,
            last_seen             = ts,
            last_sent_at          = EXCLUDED.last_sent_at,
            uptime_seconds        = coalesce(EXCLUDED.uptime_seconds, s.uptime_seconds),
            heartbeat_count       = s.heartbeat_count + 1,
            restart_count         = s.restart_count + coalesce((EXCLUDED.uptime_seconds < s.uptime_seconds)::integer, 0),
            last_restart_at       = CASE WHEN EXCLUDED.uptime_seconds < s.uptime_seconds THEN ts
                                         ELSE s.last_restart_at END,
            uptime_before_restart = CASE WHEN EXCLUDED.uptime_seconds < s.uptime_seconds THEN s.uptime_seconds
                                         ELSE s.uptime_before_restart END,
            ontime_streak         = s.ontime_streak + 1,
            beats_decayed         = s.beats_decayed * exp(-extract(epoch FROM ts - s.last_seen) / 3600.0) + 1
        RETURNING s.agent_id, s.heartbeat_count = 1 AS fresh, s.last_restart_at IS NOT DISTINCT FROM ts AS restart,
                  s.uptime_before_restart, s.uptime_seconds, s.mode, s.expected_interval_ms
    ),
    done AS (
        SELECT u.i, u.agent_id, u.fresh, u.restart, u.uptime_before_restart, u.uptime_seconds, u.mode,
               u.expected_interval_ms
        FROM upd u
        UNION ALL
        SELECT h.i, n.agent_id, n.fresh, n.restart, n.uptime_before_restart, n.uptime_seconds, n.mode,
               n.expected_interval_ms
        FROM ins n
        JOIN hb h ON h.agent_id = n.agent_id
    ),
    ins_heartbeats AS (
        INSERT INTO warden.agent_heartbeats
            (agent_id, received_at, sent_at, mode, status, uptime_seconds, next_heartbeat_ms, restart_detected)
        SELECT h.agent_id, ts, h.sent_at, h.mode, h.status, h.uptime, h.next_ms, d.restart
        FROM done d
        JOIN hb h ON h.i = d.i
    ),
    ins_events AS (
        INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
        SELECT ts, d.agent_id, 'agent_restarted', 'info',
               format('agent restarted: uptime went from %ss to %ss', d.uptime_before_restart, d.uptime_seconds),
               jsonb_build_object('previous_uptime_seconds', d.uptime_before_restart,
                                  'uptime_seconds', d.uptime_seconds)
        FROM done d
        WHERE d.restart
        UNION ALL
        SELECT ts, d.agent_id, 'agent_registered', 'info',
               format('agent registered (mode %s, expecting a heartbeat every %s ms)',
                      coalesce(d.mode, 'unset'), d.expected_interval_ms),
               jsonb_build_object('mode', d.mode, 'expected_interval_ms', d.expected_interval_ms)
        FROM done d
        WHERE d.fresh
    )
    SELECT d.i, d.fresh, d.restart, d.expected_interval_ms
    FROM done d;

    -- Almost always nobody watches: one look at an empty table.
    IF EXISTS (SELECT 1 FROM warden.observed_agents) THEN
        PERFORM pg_notify('warden_heartbeats', json_build_object(
                    'agent_id', u.agent_id, 'received_at', ts, 'status', coalesce(u.status, 'healthy'),
                    'mode', u.mode, 'uptime_seconds', u.uptime, 'next_heartbeat_ms', u.next_ms)::text)
        FROM unnest(p_agent_id, p_status, p_mode, p_uptime, p_next_ms) AS u(agent_id, status, mode, uptime, next_ms)
        JOIN warden.observed_agents o ON o.agent_id = u.agent_id AND o.until > ts;
    END IF;
END;
$$;

-- Applies a batch of heartbeats, in array order, in the caller's
-- transaction.
--
-- Parallel arrays hold one element per heartbeat; metrics are flattened
-- into their own parallel arrays, p_metric_idx pointing (1-based) at the
-- heartbeat each belongs to. Returns one row per heartbeat (idx is its
-- position), in no particular order.
--
-- Several heartbeats of one agent are applied in order: the batch is cut
-- into rounds, round k holding every agent's k-th heartbeat, and the
-- rounds run one after another, each seeing the one before. Restart
-- detection thus compares each uptime with the one before it, and
-- agent_status ends with the last values. Round k is received one
-- microsecond after round k-1, so received_at keeps the order too. Most
-- batches are one round.
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
    ts     timestamptz := coalesce(p_received_at, now());
    rounds integer;
BEGIN
    IF cardinality(p_metric_idx) > 0 THEN
        INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value, unit)
        SELECT p_agent_id[m.i], ts, m.name, m.value, m.unit
        FROM unnest(p_metric_idx, p_metric_name, p_metric_value, p_metric_unit) AS m(i, name, value, unit);
    END IF;

    IF cardinality(p_agent_id) > 1 THEN
        SELECT max(c) INTO rounds FROM (SELECT count(*) AS c FROM unnest(p_agent_id) a GROUP BY a) per_agent;
    END IF;

    IF coalesce(rounds, 1) = 1 THEN
        RETURN QUERY
        SELECT * FROM warden.ingest_round(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at, ts);
        RETURN;
    END IF;

    FOR k IN 1..rounds LOOP
        RETURN QUERY
        WITH numbered AS (
            SELECT u.*, row_number() OVER (PARTITION BY u.agent_id ORDER BY u.ord) AS occurrence
            FROM unnest(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at)
                 WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
        ),
        round AS (
            SELECT array_agg(n.ord::integer ORDER BY n.ord) AS ords,
                   array_agg(n.agent_id ORDER BY n.ord) AS agent_id, array_agg(n.name ORDER BY n.ord) AS name,
                   array_agg(n.labels ORDER BY n.ord) AS labels, array_agg(n.mode ORDER BY n.ord) AS mode,
                   array_agg(n.status ORDER BY n.ord) AS status, array_agg(n.uptime ORDER BY n.ord) AS uptime,
                   array_agg(n.next_ms ORDER BY n.ord) AS next_ms, array_agg(n.sent_at ORDER BY n.ord) AS sent_at
            FROM numbered n
            WHERE n.occurrence = k
        )
        SELECT rd.ords[r.idx], r.is_new, r.restart_detected, r.next_heartbeat_ms
        FROM round rd,
             warden.ingest_round(rd.agent_id, rd.name, rd.labels, rd.mode, rd.status, rd.uptime,
                                 rd.next_ms, rd.sent_at, ts + (k - 1) * interval '1 microsecond') r;
    END LOOP;
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
