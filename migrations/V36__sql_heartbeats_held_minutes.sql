-- warden schema, version 36: a heartbeat recorded through SQL in a
-- transaction that stays open is rolled up when it commits.
--
-- record_heartbeat stamps a heartbeat when it is called, and others see it
-- when the caller commits. Retention closed minutes (and hours) behind
-- the oldest open transaction it could see, but only one begun within
-- twice the statement timeout, and none of another role without
-- pg_read_all_stats: an agent's transaction open longer than that, or
-- half a minute as its own role, let the rollup pass its heartbeat's
-- minute before it committed, and the heartbeat was never counted in
-- heartbeat_rollups (heartbeat_volume, the dashboards' Heartbeats once
-- the raw rows are gone).
--
-- Now each call holds a shared advisory lock (class 2003985508, 'wrdd')
-- naming its minute (since the epoch) until its transaction ends, and
-- retention closes no minute from the oldest one held (pg_locks, which
-- hides nothing from any role; src/db/mod.rs,
-- oldest_uncommitted_sql_heartbeat). Otherwise V30's function, replaced
-- whole.
CREATE OR REPLACE FUNCTION warden.record_heartbeat(
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
    n       numeric;
    v       double precision;
    u       jsonb;
    lim     warden.health_params%ROWTYPE;
BEGIN
    SELECT * INTO lim FROM warden.health_params;
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
    IF char_length(name) > 256 THEN
        RAISE EXCEPTION 'name must be at most 256 characters'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'name';
    END IF;
    IF name ~ '[\u0001-\u001f\u007f-\u009f]' THEN
        RAISE EXCEPTION 'name must not contain control characters'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'name';
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
    IF labels IS NOT NULL AND (SELECT count(*) FROM jsonb_object_keys(labels)) > lim.max_labels THEN
        RAISE EXCEPTION 'labels holds % labels; ingest.max_labels allows %',
                        (SELECT count(*) FROM jsonb_object_keys(labels)), lim.max_labels
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'labels';
    END IF;
    FOR entry IN SELECT key, value FROM jsonb_each_text(labels) ORDER BY key LOOP
        IF entry.key !~ '^[A-Za-z0-9._/-]{1,63}$' THEN
            RAISE EXCEPTION 'label % : label names are 1-63 characters of A-Z a-z 0-9 . _ / -', entry.key
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'labels';
        END IF;
        IF char_length(entry.value) > 256 OR entry.value ~ '[\u0001-\u001f\u007f-\u009f]' THEN
            RAISE EXCEPTION 'label % : label values are at most 256 characters, without control characters', entry.key
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'labels';
        END IF;
    END LOOP;
    IF NOT isfinite(sent_at) OR sent_at > clock_timestamp() + lim.max_clock_skew_ms * interval '1 millisecond' THEN
        RAISE EXCEPTION 'sent_at is in the future; at most % ms of clock skew is allowed', lim.max_clock_skew_ms
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'sent_at';
    END IF;
    IF metrics IS NOT NULL THEN
        IF jsonb_typeof(metrics) <> 'object' THEN
            RAISE EXCEPTION 'metrics must be an object of name -> number'
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
        END IF;
        IF (SELECT count(*) FROM jsonb_object_keys(metrics)) > lim.max_metrics THEN
            RAISE EXCEPTION 'metrics holds % metrics; ingest.max_metrics allows %',
                            (SELECT count(*) FROM jsonb_object_keys(metrics)), lim.max_metrics
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
        END IF;
        FOR entry IN SELECT key, value FROM jsonb_each(metrics) ORDER BY key LOOP
            IF entry.key !~ '^[A-Za-z0-9._:/-]{1,128}$' THEN
                RAISE EXCEPTION 'metric name % must be 1-128 characters of A-Z a-z 0-9 . _ : / -', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            IF jsonb_typeof(entry.value) = 'number' THEN
                n := entry.value::numeric;
                u := NULL;
            ELSIF jsonb_typeof(entry.value) = 'object' AND jsonb_typeof(entry.value -> 'value') = 'number' THEN
                n := (entry.value -> 'value')::numeric;
                u := entry.value -> 'unit';
            ELSE
                RAISE EXCEPTION 'metric % must be a number or {"value": number, "unit": text}', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            -- Bounded as a JSON number, before it becomes a double: 1e400
            -- must be refused by name, not fail the cast.
            IF abs(n) > 1e100 THEN
                RAISE EXCEPTION 'metric % must be from -1e100 to 1e100', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            -- Below the smallest double, a value is 0, as HTTP parses it.
            v := CASE WHEN abs(n) < 1e-323 THEN 0 ELSE n::double precision END;
            IF u = 'null'::jsonb THEN
                u := NULL;
            END IF;
            IF u IS NOT NULL AND (jsonb_typeof(u) <> 'string' OR char_length(u #>> '{}') NOT BETWEEN 1 AND 32
                                  OR (u #>> '{}') ~ '[\u0001-\u001f\u007f-\u009f]') THEN
                RAISE EXCEPTION 'metric % : units are 1-32 characters, none of them control characters', entry.key
                    USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metrics';
            END IF;
            m_idx := m_idx || 1;
            m_name := m_name || entry.key;
            m_value := m_value || v;
            m_unit := m_unit || (u #>> '{}');
        END LOOP;
    END IF;

    -- The minute this heartbeat is stamped in, held until the caller's
    -- transaction ends: retention closes no minute a held lock names
    -- (warden's rollups read pg_locks, which every role may; another
    -- role's transaction start is hidden from them without
    -- pg_read_all_stats). Shared, so callers never wait on each other;
    -- taken before the stamp, so it never names a later minute.
    PERFORM pg_advisory_xact_lock_shared(2003985508, floor(date_part('epoch', clock_timestamp()) / 60)::integer);

    SELECT true, r.is_new, r.restart_detected, r.next_heartbeat_ms
    INTO ack
    FROM warden.ingest_heartbeats(
        ARRAY[record_heartbeat.agent_id], ARRAY[record_heartbeat.name], ARRAY[record_heartbeat.labels],
        ARRAY[record_heartbeat.mode], ARRAY[coalesce(record_heartbeat.status, 'healthy')],
        ARRAY[record_heartbeat.uptime_seconds], ARRAY[record_heartbeat.next_heartbeat_ms],
        ARRAY[record_heartbeat.sent_at],
        m_idx, m_name, m_value, m_unit,
        p_received_at => clock_timestamp()) AS r;
    RETURN ack;
END;
$$;
