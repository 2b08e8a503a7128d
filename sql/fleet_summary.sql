-- fleet_summary: agents by liveness, tier and mode now, and how many registered in the range.
--
-- Purpose: the fleet at a glance, as GET /v1/fleet sees it: the current
--   number of agents in each liveness, tier and mode. Every known value is
--   listed, zero counts included, so the shape never changes. Agents with
--   no score yet count under tier 'unscored'; agents that never named a
--   mode count under mode 'unset'.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive), for registered_in_range
--   $2 until  timestamptz  end of the range (exclusive), for registered_in_range
--   $3 agent  text         one agent_id, or NULL for the whole fleet
--
-- Columns:
--   dimension            text    'fleet' (the total), 'liveness', 'tier' or 'mode'
--   value                text    the liveness, tier or mode; 'all' for the total
--   agents               bigint  agents with that value now
--   share_pct            float8  agents as a percentage of the fleet (NULL for an empty fleet)
--   registered_in_range  bigint  of those, agents first seen within [since, until)
WITH agents AS (
    SELECT s.liveness,
           coalesce(s.tier, 'unscored') AS tier,
           coalesce(s.mode, 'unset') AS mode,
           s.first_seen >= $1::timestamptz AND s.first_seen < $2::timestamptz AS registered
    FROM warden.agent_status s
    WHERE $3::text IS NULL OR s.agent_id = $3::text
),
categories (dimension, value, dim_order, value_order) AS (
    VALUES ('fleet', 'all', 0, 0),
           ('liveness', 'online', 1, 1), ('liveness', 'degraded', 1, 2),
           ('liveness', 'offline', 1, 3), ('liveness', 'unknown', 1, 4),
           ('tier', 'excellent', 2, 1), ('tier', 'good', 2, 2), ('tier', 'fair', 2, 3),
           ('tier', 'poor', 2, 4), ('tier', 'critical', 2, 5), ('tier', 'unscored', 2, 6),
           ('mode', 'emergency', 3, 1), ('mode', 'active', 3, 2), ('mode', 'idle', 3, 3),
           ('mode', 'sleep', 3, 4), ('mode', 'unset', 3, 5)
),
counted AS (
    SELECT c.dimension, c.value, c.dim_order, c.value_order,
           count(a.*) AS agents,
           count(a.*) FILTER (WHERE a.registered) AS registered_in_range
    FROM categories c
    LEFT JOIN agents a ON c.dimension = 'fleet'
                       OR (c.dimension = 'liveness' AND a.liveness = c.value)
                       OR (c.dimension = 'tier' AND a.tier = c.value)
                       OR (c.dimension = 'mode' AND a.mode = c.value)
    GROUP BY c.dimension, c.value, c.dim_order, c.value_order
)
SELECT c.dimension,
       c.value,
       c.agents,
       (100.0 * c.agents / nullif((SELECT count(*) FROM agents), 0))::float8 AS share_pct,
       c.registered_in_range
FROM counted c
ORDER BY c.dim_order, c.value_order;
