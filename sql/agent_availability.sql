-- agent_availability: uptime percentage per agent over the range, from the liveness transitions.
--
-- Purpose: how much of the range each agent was available. Computed from
--   the recorded liveness transitions (warden.liveness_time over
--   warden.liveness_spans), not by sampling, and an agent's liveness before
--   the range carries into it. Definition (the same in every report):
--     up       = online + degraded (degraded: late but back without going
--                offline, or on probation coming back; shown on its own in
--                degraded_seconds),
--     down     = offline, from when the first missed heartbeat was due
--                (the offline transition records the silence it saw), so
--                the late stretch before an outage is down time too,
--     excluded = unknown (not yet evaluated) and any time before first_seen.
--   availability_pct = up / (up + down); online_pct = online / (up + down).
--   The range is clipped to now(). Agents that did not exist during the
--   range are left out; agents that were only unknown show NULL percentages.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive)
--   $2 until  timestamptz  end of the range (exclusive)
--   $3 agent  text         one agent_id, or NULL for every agent
--
-- Columns:
--   agent_id          text    the agent
--   name              text    its display name, if it sent one
--   availability_pct  float8  up time (online + degraded) as a percentage of observed time; NULL if only unknown
--   online_pct        float8  online time alone as a percentage of observed time
--   online_seconds    float8  seconds online within the range
--   degraded_seconds  float8  seconds degraded within the range
--   offline_seconds   float8  seconds offline within the range
--   unknown_seconds   float8  seconds not yet evaluated (excluded from the percentages)
--   observed_seconds  float8  online + degraded + offline seconds
--   outages           bigint  transitions into offline within the range
--   liveness_now      text    current liveness
SELECT lt.agent_id,
       s.name,
       lt.availability_pct,
       lt.online_pct,
       lt.online_seconds,
       lt.degraded_seconds,
       lt.offline_seconds,
       lt.unknown_seconds,
       lt.observed_seconds,
       (SELECT count(*)
        FROM warden.liveness_transitions t
        WHERE t.agent_id = lt.agent_id
          AND t.new_liveness = 'offline'
          AND t.occurred_at >= greatest($1::timestamptz, s.first_seen)
          AND t.occurred_at < $2::timestamptz) AS outages,
       s.liveness AS liveness_now
FROM warden.liveness_time($1::timestamptz, $2::timestamptz, $3::text) lt
LEFT JOIN warden.agent_status s ON s.agent_id = lt.agent_id
ORDER BY lt.availability_pct ASC NULLS LAST, lt.agent_id;
