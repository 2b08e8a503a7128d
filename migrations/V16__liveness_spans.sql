-- warden schema, version 16: liveness history that reads only the range
-- asked for, and outages that start when the agent fell silent.
--
-- 1. An offline transition is recorded when the evaluator gives up on an
--    agent, offline_after_missed intervals after its last heartbeat; the
--    degraded stretch before it was already the outage. A transition to
--    offline carries the silence it rested on (details.figures), so the
--    outage is taken to begin when the first missed heartbeat was due:
--    occurred_at - (silence_ms - expected_interval_ms). Each boundary is
--    then the earliest effective time of its own and every later
--    transition, so an outage that reaches back over a degraded stretch
--    swallows it. Transitions without figures keep their own time.
-- 2. warden.liveness_intervals materialised every agent's whole history
--    (its CTE was read twice) whatever the query's filter: a single
--    agent's availability took seconds with a few hundred thousand
--    transitions, and slo_breaches ran into the statement timeout.
--    warden.liveness_spans(since, until, agent) reads the agent's state
--    at `since` through the per-agent index and the transitions in the
--    range through the per-type index; liveness_time is built on it. The
--    view keeps its columns, now with the same boundaries, and no longer
--    materialises the whole history before an agent filter applies.
-- 3. Stretches in which warden evaluated nothing (it was down; the
--    evaluator records an evaluation_paused event when it resumes) are
--    unknown in liveness_spans, and so left out of availability, instead
--    of being credited with each agent's state before them. (The
--    whole-history view does not cut them out.)

-- The time a transition takes effect from (see 1 above). STABLE, like
-- timestamptz - interval, so that the planner inlines it (an IMMUTABLE
-- function over a STABLE expression is called row by row, 15 times slower).
CREATE FUNCTION warden.transition_effective_at(p_occurred_at timestamptz, p_details jsonb)
RETURNS timestamptz
LANGUAGE sql
STABLE
AS $$
    SELECT CASE
        WHEN p_details ->> 'new' = 'offline'
         AND jsonb_typeof(p_details #> '{figures,silence_ms}') = 'number'
         AND jsonb_typeof(p_details #> '{figures,expected_interval_ms}') = 'number'
        THEN p_occurred_at - greatest((p_details #>> '{figures,silence_ms}')::float8
                                      - (p_details #>> '{figures,expected_interval_ms}')::float8, 0)
                             * interval '1 millisecond'
        ELSE p_occurred_at
    END
$$;

-- Every transition with its boundary (the earliest effective time of it
-- and every later one) and the next transition's. A view, not a CTE, so
-- that an agent filter on liveness_intervals reaches the scan.
CREATE VIEW warden.liveness_boundaries AS
SELECT r.agent_id, r.old_liveness, r.new_liveness,
       min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC) AS bound,
       min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_bound,
       row_number() OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC)
           = count(*) OVER (PARTITION BY r.agent_id) AS first
FROM (
    SELECT e.agent_id, e.id, e.occurred_at, e.details ->> 'old' AS old_liveness,
           e.details ->> 'new' AS new_liveness, warden.transition_effective_at(e.occurred_at, e.details) AS eff
    FROM warden.system_events e
    WHERE e.event_type = 'status_changed' AND e.source = 'warden' AND e.agent_id IS NOT NULL
) r;

CREATE OR REPLACE VIEW warden.liveness_intervals AS
SELECT s.agent_id, m.old_liveness AS liveness, s.first_seen AS valid_from, m.bound AS valid_to
FROM warden.liveness_boundaries m
JOIN warden.agent_status s ON s.agent_id = m.agent_id
WHERE m.first AND s.first_seen < m.bound
UNION ALL
SELECT m.agent_id, m.new_liveness, m.bound, m.next_bound
FROM warden.liveness_boundaries m
WHERE m.next_bound IS NULL OR m.next_bound > m.bound
UNION ALL
SELECT s.agent_id, s.liveness, s.first_seen, NULL::timestamptz
FROM warden.agent_status s
WHERE NOT EXISTS (
    SELECT 1 FROM warden.system_events x
    WHERE x.agent_id = s.agent_id AND x.event_type = 'status_changed' AND x.source = 'warden'
);

-- Each agent's liveness within [p_since, least(p_until, now())), as
-- intervals clipped to it; one agent or all (p_agent NULL).
CREATE FUNCTION warden.liveness_spans(p_since timestamptz, p_until timestamptz, p_agent text DEFAULT NULL)
RETURNS TABLE (agent_id text, liveness text, valid_from timestamptz, valid_to timestamptz)
LANGUAGE sql
STABLE
AS $$
    WITH b AS (
        SELECT p_since AS lo, least(p_until, now()) AS hi
    ),
    agents AS (
        SELECT s.agent_id, s.first_seen, s.liveness, s.expected_interval_ms
        FROM warden.agent_status s, b
        WHERE (p_agent IS NULL OR s.agent_id = p_agent) AND s.first_seen < b.hi
    ),
    -- An outage is recorded up to (offline_after_missed + jitter) intervals
    -- after it began: the transitions that far past the range (a day at
    -- least) may still reach back into it.
    ahead AS (
        SELECT greatest(interval '1 day',
                        coalesce(max(a.expected_interval_ms), 0)
                        * coalesce((SELECT hp.offline_after_missed + hp.jitter_tolerance + 1
                                    FROM warden.health_params hp), 5)
                        * interval '1 millisecond') AS span
        FROM agents a
    ),
    -- Transitions in the range and that far after it.
    -- (Only the few columns needed travel through the sort.)
    raw AS MATERIALIZED (
        SELECT e.agent_id, e.id, e.occurred_at, e.details ->> 'new' AS new_liveness,
               warden.transition_effective_at(e.occurred_at, e.details) AS eff
        FROM warden.system_events e, b, ahead
        WHERE e.event_type = 'status_changed' AND e.source = 'warden' AND e.agent_id IS NOT NULL
          AND e.occurred_at > b.lo AND e.occurred_at < b.hi + ahead.span
          AND (p_agent IS NULL OR e.agent_id = p_agent)
    ),
    -- Newest first, the earliest effective time from a transition on is
    -- its boundary, and the same over the transitions after it is the
    -- next one's: both from one sort. (liveness_boundaries says the same
    -- over the whole history; a time filter cannot reach its scan through
    -- the window functions, so the range's rows are windowed here.)
    moves AS (
        SELECT r.agent_id, r.new_liveness,
               min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC) AS bound,
               min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_bound
        FROM raw r
    ),
    spans AS (
        -- What each agent was at the start of the range: the last
        -- transition before it, else (the history before it pruned or
        -- never there) the first transition's old state, else its
        -- liveness now.
        SELECT a.agent_id,
               coalesce(
                   (SELECT e.details ->> 'new' FROM warden.system_events e
                    WHERE e.agent_id = a.agent_id AND e.occurred_at <= b.lo
                      AND e.event_type = 'status_changed' AND e.source = 'warden'
                    ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1),
                   (SELECT e.details ->> 'old' FROM warden.system_events e
                    WHERE e.agent_id = a.agent_id AND e.occurred_at > b.lo
                      AND e.event_type = 'status_changed' AND e.source = 'warden'
                    ORDER BY e.occurred_at, e.id LIMIT 1),
                   a.liveness) AS liveness,
               greatest(b.lo, a.first_seen) AS valid_from,
               coalesce(f.first_bound, b.hi) AS valid_to
        FROM agents a
        CROSS JOIN b
        LEFT JOIN (SELECT m.agent_id, min(m.bound) AS first_bound FROM moves m GROUP BY m.agent_id) f
               ON f.agent_id = a.agent_id
        UNION ALL
        SELECT m.agent_id, m.new_liveness, greatest(m.bound, a.first_seen), coalesce(m.next_bound, b.hi)
        FROM moves m
        JOIN agents a ON a.agent_id = m.agent_id
        CROSS JOIN b
    ),
    clipped AS (
        SELECT sp.agent_id, sp.liveness, greatest(sp.valid_from, b.lo) AS valid_from,
               least(sp.valid_to, b.hi) AS valid_to
        FROM spans sp, b
        WHERE least(sp.valid_to, b.hi) > greatest(sp.valid_from, b.lo)
    ),
    -- Stretches in which no replica evaluated liveness (warden itself was
    -- down): what agents were then is unknown, whatever they were before.
    gaps AS (
        SELECT greatest((e.details ->> 'from')::timestamptz, b.lo) AS g_from, least(e.occurred_at, b.hi) AS g_to
        FROM warden.system_events e, b
        WHERE e.event_type = 'evaluation_paused' AND e.source = 'warden' AND e.agent_id IS NULL
          AND e.occurred_at > b.lo AND (e.details ->> 'from')::timestamptz < b.hi
    ),
    -- With gaps in the range, each span is cut at the gap edges inside it.
    pieces AS (
        SELECT c.agent_id, c.liveness, c.valid_to, x.at AS p_from,
               coalesce(lead(x.at) OVER (PARTITION BY c.agent_id, c.valid_from ORDER BY x.at), c.valid_to) AS p_to
        FROM clipped c
        CROSS JOIN LATERAL (
            SELECT c.valid_from AS at
            UNION
            SELECT g.g_from FROM gaps g WHERE g.g_from > c.valid_from AND g.g_from < c.valid_to
            UNION
            SELECT g.g_to FROM gaps g WHERE g.g_to > c.valid_from AND g.g_to < c.valid_to
        ) x
        WHERE EXISTS (SELECT 1 FROM gaps)
    )
    SELECT c.agent_id, c.liveness, c.valid_from, c.valid_to
    FROM clipped c
    WHERE NOT EXISTS (SELECT 1 FROM gaps)
    UNION ALL
    SELECT p.agent_id,
           CASE WHEN EXISTS (SELECT 1 FROM gaps g WHERE g.g_from <= p.p_from AND g.g_to >= p.p_to)
                THEN 'unknown' ELSE p.liveness END,
           p.p_from, p.p_to
    FROM pieces p
$$;

COMMENT ON FUNCTION warden.liveness_spans IS
    'Per-agent liveness intervals clipped to [since, least(until, now())); offline from when the first missed heartbeat was due.';

-- liveness_time, on liveness_spans, with one more column: the longest
-- offline stretch within the range (slo_breaches used to look it up agent
-- by agent). A function's columns cannot change in place.
DROP FUNCTION warden.liveness_time(timestamptz, timestamptz, text);

CREATE FUNCTION warden.liveness_time(p_since timestamptz, p_until timestamptz, p_agent text DEFAULT NULL)
RETURNS TABLE (
    agent_id                text,
    online_seconds          double precision,
    degraded_seconds        double precision,
    offline_seconds         double precision,
    unknown_seconds         double precision,
    observed_seconds        double precision,
    availability_pct        double precision,
    online_pct              double precision,
    longest_offline_seconds double precision
)
LANGUAGE sql
STABLE
AS $$
    WITH per_agent AS (
        SELECT c.agent_id,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'online'), 0)   AS online_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'degraded'), 0) AS degraded_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'offline'), 0)  AS offline_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'unknown'), 0)  AS unknown_s,
               max(c.secs) FILTER (WHERE c.liveness = 'offline')               AS longest_offline_s
        FROM (SELECT sp.agent_id, sp.liveness, extract(epoch FROM sp.valid_to - sp.valid_from)::float8 AS secs
              FROM warden.liveness_spans(p_since, p_until, p_agent) sp) c
        GROUP BY c.agent_id
    )
    SELECT p.agent_id, p.online_s, p.degraded_s, p.offline_s, p.unknown_s,
           p.online_s + p.degraded_s + p.offline_s,
           100.0 * (p.online_s + p.degraded_s) / nullif(p.online_s + p.degraded_s + p.offline_s, 0),
           100.0 * p.online_s / nullif(p.online_s + p.degraded_s + p.offline_s, 0),
           p.longest_offline_s
    FROM per_agent p
$$;

COMMENT ON FUNCTION warden.liveness_time IS
    'Seconds per agent in each liveness within [since, until), availability (up = online + degraded, down = offline from when the first missed heartbeat was due, unknown excluded) and the longest offline stretch.';
