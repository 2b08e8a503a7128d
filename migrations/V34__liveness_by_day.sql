-- warden schema, version 34: one definition of an agent's seconds in each
-- state per UTC day.
--
-- The public status page split the liveness spans of its last days into
-- UTC days in its own statement, and retention wrote each final day to
-- liveness_days (V33) with another; the two are the same figures by
-- design, and now come from one function: retention calls it for one day,
-- the page for the days after retention's watermark.
--
-- Each span of liveness_spans(p_since, p_until) is split at the UTC
-- midnights it crosses (a lateral series of its own days, not a join of
-- every span with every day), clipped to p_until, and summed per agent and
-- day. Unknown time is counted in none of the three.
CREATE FUNCTION warden.liveness_by_day(p_since timestamptz, p_until timestamptz)
RETURNS TABLE (agent_id text, day date, online_seconds double precision, degraded_seconds double precision,
               offline_seconds double precision)
LANGUAGE sql
STABLE
AS $$
    SELECT i.agent_id, (d.start AT TIME ZONE 'UTC')::date,
           coalesce(sum(x.secs) FILTER (WHERE i.liveness = 'online'), 0),
           coalesce(sum(x.secs) FILTER (WHERE i.liveness = 'degraded'), 0),
           coalesce(sum(x.secs) FILTER (WHERE i.liveness = 'offline'), 0)
    FROM warden.liveness_spans(p_since, p_until) i
    CROSS JOIN LATERAL generate_series(
        date_trunc('day', greatest(i.valid_from, p_since), 'UTC'),
        least(coalesce(i.valid_to, p_until), p_until) - interval '1 microsecond',
        interval '24 hours') AS d(start)
    CROSS JOIN LATERAL (
        SELECT extract(epoch FROM least(coalesce(i.valid_to, p_until), d.start + interval '24 hours', p_until)
                                  - greatest(i.valid_from, d.start))::float8 AS secs) x
    WHERE x.secs > 0
    GROUP BY i.agent_id, d.start
$$;
