-- restart_loops: the agents that restarted most often, with their restart_loop incidents.
--
-- Purpose: the noisiest agents by restarts. Counts the restarts warden
--   detected (agent_restarted events of source 'warden': uptime went down
--   between two heartbeats) within the range, the
--   restart_loop incidents opened for the agent, and how long the agent
--   typically ran before restarting. Agents with neither a restart nor a
--   restart_loop incident in the range are left out.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive)
--   $2 until  timestamptz  end of the range (exclusive)
--   $3 agent  text         one agent_id, or NULL for every agent
--   $4 limit  bigint       most rows to return (reporting.top_n)
--
-- Columns:
--   agent_id                    text         the agent
--   name                        text         its display name, if it sent one
--   restarts                    bigint       restarts within the range
--   restart_loop_incidents      bigint       restart_loop incidents opened within the range
--   loop_open_now               bool         a restart_loop incident is open for the agent now
--   mean_uptime_before_seconds  float8       mean uptime the agent reported just before restarting
--   min_uptime_before_seconds   float8       shortest of those uptimes
--   last_restart_at             timestamptz  the latest restart within the range
WITH restarts AS (
    SELECT e.agent_id,
           count(*) AS restarts,
           avg(u.uptime) AS mean_uptime,
           min(u.uptime) AS min_uptime,
           max(e.occurred_at) AS last_restart_at
    FROM warden.system_events e
    -- Older rows may hold any details: check the type before casting.
    CROSS JOIN LATERAL (
        SELECT CASE WHEN jsonb_typeof(e.details -> 'previous_uptime_seconds') = 'number'
                    THEN (e.details ->> 'previous_uptime_seconds')::float8 END AS uptime
    ) u
    WHERE e.event_type = 'agent_restarted'
      -- Agents may post events of this type themselves; only warden's count.
      AND e.source = 'warden'
      AND e.agent_id IS NOT NULL
      AND e.occurred_at >= $1::timestamptz
      AND e.occurred_at < $2::timestamptz
      AND ($3::text IS NULL OR e.agent_id = $3::text)
    GROUP BY e.agent_id
),
loops AS (
    SELECT n.agent_id, count(*) AS incidents
    FROM warden.incidents n
    WHERE n.issue_type = 'restart_loop'
      AND n.agent_id IS NOT NULL
      AND n.opened_at >= $1::timestamptz
      AND n.opened_at < $2::timestamptz
      AND ($3::text IS NULL OR n.agent_id = $3::text)
    GROUP BY n.agent_id
)
SELECT coalesce(r.agent_id, l.agent_id) AS agent_id,
       s.name,
       coalesce(r.restarts, 0) AS restarts,
       coalesce(l.incidents, 0) AS restart_loop_incidents,
       EXISTS (SELECT 1 FROM warden.incidents o
               WHERE o.agent_id = coalesce(r.agent_id, l.agent_id)
                 AND o.issue_type = 'restart_loop' AND o.state = 'open') AS loop_open_now,
       r.mean_uptime AS mean_uptime_before_seconds,
       r.min_uptime AS min_uptime_before_seconds,
       r.last_restart_at
FROM restarts r
FULL JOIN loops l ON l.agent_id = r.agent_id
LEFT JOIN warden.agent_status s ON s.agent_id = coalesce(r.agent_id, l.agent_id)
ORDER BY coalesce(r.restarts, 0) DESC, coalesce(l.incidents, 0) DESC, coalesce(r.agent_id, l.agent_id)
LIMIT $4::bigint;
