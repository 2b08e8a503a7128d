-- Which part of a time range the hourly rollups stand for, shared by the
-- long-range reports (heartbeat_volume, score_history) and the
-- agent-detail dashboard, so that they split a range the same way.
--
-- The rollups stand for the whole UTC hours of [p_since, p_until) that
-- the retention job has rolled up: from the first hourly rollup kept
-- (hours before the job's first run were never rolled up) to the job's
-- watermark. Callers read the rollups within [covered_from, covered_to)
-- and the raw rows everywhere else in the range. When nothing is covered,
-- covered_from is at or past covered_to (possibly 'infinity' and
-- '-infinity').
--
-- p_rollups: 'heartbeats' (warden.heartbeat_rollups, hour buckets, up to
-- retention_state.hour_watermark) or 'scores' (warden.score_rollups, up to
-- score_watermark).
CREATE FUNCTION warden.rollup_span(p_rollups text, p_since timestamptz, p_until timestamptz,
                                   OUT covered_from timestamptz, OUT covered_to timestamptz)
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    first_rollup timestamptz;
    watermark    timestamptz;
BEGIN
    CASE p_rollups
        WHEN 'heartbeats' THEN
            SELECT min(r.bucket_start) INTO first_rollup FROM warden.heartbeat_rollups r WHERE r.bucket = 'hour';
            SELECT s.hour_watermark INTO watermark FROM warden.retention_state s;
        WHEN 'scores' THEN
            SELECT min(r.hour_start) INTO first_rollup FROM warden.score_rollups r;
            SELECT s.score_watermark INTO watermark FROM warden.retention_state s;
        ELSE
            RAISE EXCEPTION 'unknown rollups %: expected heartbeats or scores', p_rollups
                USING ERRCODE = 'invalid_parameter_value';
    END CASE;
    covered_from := greatest(date_trunc('hour', p_since + interval '1 hour' - interval '1 microsecond', 'UTC'),
                             coalesce(first_rollup, 'infinity'));
    covered_to := least(date_trunc('hour', p_until, 'UTC'), coalesce(watermark, '-infinity'));
END;
$$;
