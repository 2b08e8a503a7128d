-- warden schema, version 27: liveness history looks past its range only
-- as far as each agent's own interval needs.
--
-- An offline transition is recorded up to (offline_after_missed + jitter)
-- intervals after the outage began, so liveness_spans reads transitions
-- past the end of its range that may reach back into it. It looked as far
-- as the longest interval in the fleet called for: one agent with a 7-day
-- next_heartbeat_ms made every fleet-wide availability query, a one-hour
-- dashboard range included, read four weeks of every agent's transitions.
-- Now every agent's are read for a day past the range, as before, and
-- further only for the agents whose own interval reaches further, through
-- the per-agent index (V21). Same results: a transition past an agent's
-- own reach cannot take effect inside the range. Otherwise the function
-- of V16, replaced whole.
--
-- Also liveness_time, whose percentages came out a hair above 100
-- (100.00000000000001: 100 * up / observed in floating point) for agents
-- that were never down, which reports print as numbers: capped at 100.
-- Otherwise V16's, replaced whole.
CREATE OR REPLACE FUNCTION warden.liveness_spans(p_since timestamptz, p_until timestamptz, p_agent text DEFAULT NULL)
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
    -- least) may still reach back into it. How far is each agent's own:
    -- every agent's transitions for the first day after the range, and
    -- beyond it, through the per-agent index, only those of agents whose
    -- interval reaches further (a daily cron job: four days).
    ahead AS (
        SELECT a.agent_id,
               a.expected_interval_ms
               * coalesce((SELECT hp.offline_after_missed + hp.jitter_tolerance + 1
                           FROM warden.health_params hp), 5)
               * interval '1 millisecond' AS span
        FROM agents a
    ),
    -- Transitions in the range and as far after it as they can reach back.
    -- (Only the few columns needed travel through the sort.)
    raw AS MATERIALIZED (
        SELECT e.agent_id, e.id, e.occurred_at, e.details ->> 'new' AS new_liveness,
               warden.transition_effective_at(e.occurred_at, e.details) AS eff
        FROM warden.system_events e, b
        WHERE e.event_type = 'status_changed' AND e.source = 'warden' AND e.agent_id IS NOT NULL
          AND e.occurred_at > b.lo AND e.occurred_at < b.hi + interval '1 day'
          AND (p_agent IS NULL OR e.agent_id = p_agent)
        UNION ALL
        SELECT e.agent_id, e.id, e.occurred_at, e.details ->> 'new' AS new_liveness,
               warden.transition_effective_at(e.occurred_at, e.details) AS eff
        FROM ahead x
        CROSS JOIN b
        JOIN warden.system_events e ON e.agent_id = x.agent_id
        WHERE x.span > interval '1 day'
          AND e.event_type = 'status_changed' AND e.source = 'warden'
          AND e.occurred_at >= b.hi + interval '1 day' AND e.occurred_at > b.lo
          AND e.occurred_at < b.hi + x.span
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

CREATE OR REPLACE FUNCTION warden.liveness_time(p_since timestamptz, p_until timestamptz, p_agent text DEFAULT NULL)
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
           -- (least() would turn "nothing observed", NULL, into 100.)
           CASE WHEN p.online_s + p.degraded_s + p.offline_s > 0
                THEN least(100.0 * (p.online_s + p.degraded_s) / (p.online_s + p.degraded_s + p.offline_s), 100) END,
           CASE WHEN p.online_s + p.degraded_s + p.offline_s > 0
                THEN least(100.0 * p.online_s / (p.online_s + p.degraded_s + p.offline_s), 100) END,
           p.longest_offline_s
    FROM per_agent p
$$;
