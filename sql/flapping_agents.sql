-- flapping_agents: the agents whose liveness changed most often, with their flapping incidents.
--
-- Purpose: the noisiest agents by liveness churn. Counts the liveness
--   transitions (status_changed events) within the range, how many went
--   to offline, and the flapping incidents opened for the agent, with the
--   time those incidents were open within the range. Agents with neither a
--   transition nor a flapping incident in the range are left out.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive)
--   $2 until  timestamptz  end of the range (exclusive)
--   $3 agent  text         one agent_id, or NULL for every agent
--   $4 limit  bigint       most rows to return (reporting.top_n)
--
-- Columns:
--   agent_id               text         the agent
--   name                   text         its display name, if it sent one
--   transitions            bigint       liveness changes within the range
--   to_offline             bigint       of those, changes into offline
--   flapping_incidents     bigint       flapping incidents opened within the range
--   flapping_seconds       float8       time flapping incidents were open within the range
--   last_transition_at     timestamptz  the latest liveness change within the range
--   liveness_now           text         current liveness
WITH changes AS (
    SELECT t.agent_id,
           count(*) AS transitions,
           count(*) FILTER (WHERE t.new_liveness = 'offline') AS to_offline,
           max(t.occurred_at) AS last_transition_at
    FROM warden.liveness_transitions t
    WHERE t.occurred_at >= $1::timestamptz
      AND t.occurred_at < $2::timestamptz
      AND ($3::text IS NULL OR t.agent_id = $3::text)
    GROUP BY t.agent_id
),
flaps AS (
    SELECT n.agent_id,
           count(*) FILTER (WHERE n.opened_at >= $1::timestamptz) AS incidents,
           sum(extract(epoch FROM least(coalesce(n.resolved_at, now()), $2::timestamptz, now())
                                  - greatest(n.opened_at, $1::timestamptz)))::float8 AS seconds
    FROM warden.incidents n
    WHERE n.issue_type = 'flapping'
      AND n.agent_id IS NOT NULL
      AND n.opened_at < $2::timestamptz
      AND (n.resolved_at IS NULL OR n.resolved_at > $1::timestamptz)
      AND ($3::text IS NULL OR n.agent_id = $3::text)
    GROUP BY n.agent_id
)
SELECT coalesce(c.agent_id, f.agent_id) AS agent_id,
       s.name,
       coalesce(c.transitions, 0) AS transitions,
       coalesce(c.to_offline, 0) AS to_offline,
       coalesce(f.incidents, 0) AS flapping_incidents,
       coalesce(f.seconds, 0) AS flapping_seconds,
       c.last_transition_at,
       s.liveness AS liveness_now
FROM changes c
FULL JOIN flaps f ON f.agent_id = c.agent_id
LEFT JOIN warden.agent_status s ON s.agent_id = coalesce(c.agent_id, f.agent_id)
ORDER BY coalesce(f.incidents, 0) DESC, coalesce(c.transitions, 0) DESC, coalesce(f.seconds, 0) DESC,
         coalesce(c.agent_id, f.agent_id)
LIMIT $4::bigint;
