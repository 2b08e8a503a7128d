-- warden schema, version 28: an agent registered again after removal
-- starts its liveness history afresh.
--
-- `warden agents remove` deletes an agent's status row and keeps its
-- history; a heartbeat afterwards registers it as new (a new first_seen).
-- liveness_spans carried the earlier life's last transition (offline, as
-- a rule) into the new one: until its first evaluation the agent counted
-- as offline, not unknown, in every availability figure built on it
-- (reports, dashboards, the status page). Now only transitions at or after
-- first_seen count. Otherwise V27's function, replaced whole.
--
-- The whole-history view liveness_intervals had the same fault, and more:
-- the earlier life's last interval ran on over the new one, the new life
-- had no interval before its first transition, and none at all until
-- then. Its current agents' intervals now start at first_seen; the
-- history of agents removed for good stays as it was. liveness_boundaries
-- gains each transition's time (a new last column) for it.
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
    -- Only this life's: an agent removed and registered again is a new
    -- agent, and its earlier life's last state (offline, as a rule) is not
    -- what it was before its first evaluation now.
    moves AS (
        SELECT r.agent_id, r.new_liveness,
               min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC) AS bound,
               min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_bound
        FROM raw r
        JOIN agents a ON a.agent_id = r.agent_id
        WHERE r.occurred_at >= a.first_seen
    ),
    spans AS (
        -- What each agent was at the start of the range (or of its
        -- life, if later): the last transition of this life before it,
        -- else (the history before it pruned or never there) the first
        -- transition's old state, else its liveness now.
        SELECT a.agent_id,
               coalesce(
                   (SELECT e.details ->> 'new' FROM warden.system_events e
                    WHERE e.agent_id = a.agent_id AND e.occurred_at <= b.lo AND e.occurred_at >= a.first_seen
                      AND e.event_type = 'status_changed' AND e.source = 'warden'
                    ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1),
                   (SELECT e.details ->> 'old' FROM warden.system_events e
                    WHERE e.agent_id = a.agent_id AND e.occurred_at > b.lo AND e.occurred_at >= a.first_seen
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

CREATE OR REPLACE VIEW warden.liveness_boundaries AS
SELECT r.agent_id, r.old_liveness, r.new_liveness,
       min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC) AS bound,
       min(r.eff) OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_bound,
       row_number() OVER (PARTITION BY r.agent_id ORDER BY r.occurred_at DESC, r.id DESC)
           = count(*) OVER (PARTITION BY r.agent_id) AS first,
       r.occurred_at
FROM (
    SELECT e.agent_id, e.id, e.occurred_at, e.details ->> 'old' AS old_liveness,
           e.details ->> 'new' AS new_liveness, warden.transition_effective_at(e.occurred_at, e.details) AS eff
    FROM warden.system_events e
    WHERE e.event_type = 'status_changed' AND e.source = 'warden' AND e.agent_id IS NOT NULL
) r;

-- A current agent's life began at first_seen: its transitions before that
-- (an earlier life, ended by removal) are left out, and before its first
-- transition since, it was in that transition's old state.
CREATE OR REPLACE VIEW warden.liveness_intervals AS
SELECT first.agent_id, first.liveness, first.valid_from, first.valid_to
FROM (
    -- DISTINCT ON the column the view returns, so that an agent filter
    -- on the view reaches the per-agent scan.
    SELECT DISTINCT ON (s.agent_id) s.agent_id, m.old_liveness AS liveness, s.first_seen AS valid_from,
           m.bound AS valid_to
    FROM warden.liveness_boundaries m
    JOIN warden.agent_status s ON s.agent_id = m.agent_id
    WHERE m.occurred_at >= s.first_seen
    ORDER BY s.agent_id, m.occurred_at
) first
WHERE first.valid_from < first.valid_to
UNION ALL
SELECT m.agent_id, m.new_liveness, m.bound, m.next_bound
FROM warden.liveness_boundaries m
LEFT JOIN warden.agent_status s ON s.agent_id = m.agent_id
WHERE (m.next_bound IS NULL OR m.next_bound > m.bound)
  AND (s.first_seen IS NULL OR m.occurred_at >= s.first_seen)
UNION ALL
SELECT s.agent_id, s.liveness, s.first_seen, NULL::timestamptz
FROM warden.agent_status s
WHERE NOT EXISTS (
    SELECT 1 FROM warden.system_events x
    WHERE x.agent_id = s.agent_id AND x.event_type = 'status_changed' AND x.source = 'warden'
      AND x.occurred_at >= s.first_seen
);
