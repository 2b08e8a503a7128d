-- slo_breaches: agents whose availability over the range fell below the target.
--
-- Purpose: who missed the availability objective, by how much, and what it
--   cost in downtime. Availability is agent_availability's (up = online +
--   degraded, down = offline, unknown excluded). The downtime budget is the
--   offline time the target allows over the agent's observed time.
--
-- Parameters:
--   $1 since       timestamptz  start of the range (inclusive)
--   $2 until       timestamptz  end of the range (exclusive)
--   $3 agent       text         one agent_id, or NULL for every agent
--   $4 target_pct  float8       availability target in percent (reporting.availability_target)
--
-- Columns:
--   agent_id                 text    the agent
--   name                     text    its display name, if it sent one
--   availability_pct         float8  up time as a percentage of observed time
--   target_pct               float8  the target it is measured against
--   shortfall_pct            float8  target minus availability, in percentage points
--   offline_seconds          float8  seconds offline within the range
--   budget_seconds           float8  offline seconds the target allows over the observed time
--   over_budget_seconds      float8  offline seconds beyond that budget
--   longest_outage_seconds   float8  the longest single offline stretch, clipped to the range
--   incidents                bigint  incidents opened for the agent within the range
WITH measured AS (
    SELECT lt.*
    FROM warden.liveness_time($1::timestamptz, $2::timestamptz, $3::text) lt
    WHERE lt.availability_pct < $4::float8
)
SELECT m.agent_id,
       s.name,
       m.availability_pct,
       $4::float8 AS target_pct,
       $4::float8 - m.availability_pct AS shortfall_pct,
       m.offline_seconds,
       m.observed_seconds * (100.0 - $4::float8) / 100.0 AS budget_seconds,
       greatest(m.offline_seconds - m.observed_seconds * (100.0 - $4::float8) / 100.0, 0) AS over_budget_seconds,
       m.longest_offline_seconds AS longest_outage_seconds,
       (SELECT count(*)
        FROM warden.incidents n
        WHERE n.agent_id = m.agent_id
          AND n.opened_at >= greatest($1::timestamptz, s.first_seen)
          AND n.opened_at < $2::timestamptz) AS incidents
FROM measured m
LEFT JOIN warden.agent_status s ON s.agent_id = m.agent_id
ORDER BY m.availability_pct ASC, m.agent_id;
