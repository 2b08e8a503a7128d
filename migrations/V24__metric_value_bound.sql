-- warden schema, version 24: metric values are bounded.
--
-- A finite value is not enough: averages and variances square the
-- samples, and PostgreSQL's avg(float8) raises an overflow error once two
-- samples differ by more than about 1.3e154. One such sample from one
-- agent made every score pass fail, for the whole fleet, until the row
-- aged out. Values beyond +-1e100 are refused here as they are by
-- POST /v1/heartbeats and /mcp; the bound leaves squares and sums of any
-- realistic number of samples far from overflowing, and no real metric
-- (bytes, nanoseconds since 1970, tokens) comes near it. Otherwise the
-- same function as V20.
--
-- The table holds every writer to the bound too (warden.ingest_heartbeats
-- can be called directly): NOT VALID, so that adding it scans nothing and
-- rows written before stay (the score pass leaves them out); partitions
-- made from now on copy it, validated.
SET LOCAL lock_timeout = '10s';
ALTER TABLE warden.performance_metrics
    ADD CONSTRAINT performance_metrics_value_bound CHECK (abs(value) <= 1e100) NOT VALID;
RESET lock_timeout;

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
            IF abs(v) > 1e100 THEN
                RAISE EXCEPTION 'metric % must be from -1e100 to 1e100', entry.key
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
        m_idx, m_name, m_value, m_unit,
        p_received_at => clock_timestamp()) AS r;
    RETURN ack;
END;
$$;
