-- recovery_success: success rate, attempts and durations of recovery, per strategy and action.
--
-- Purpose: which recovery strategies and actions work. One row per
--   (strategy, action) over the recovery_actions rows created within the
--   range; each row of that table is one attempt of one action. States:
--   pending, running and verifying are in progress; succeeded, failed,
--   timed_out and abandoned are finished. The success rate is over
--   finished attempts only, so work in progress neither helps nor hurts.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive), on created_at
--   $2 until  timestamptz  end of the range (exclusive), on created_at
--   $3 agent  text         one agent_id, or NULL for every agent
--
-- Columns:
--   strategy              text    the recovery strategy (recovery.strategies name)
--   action                text    the action within it
--   attempts              bigint  attempts created within the range
--   incidents             bigint  distinct incidents they were for
--   agents                bigint  distinct agents they were for
--   succeeded             bigint  attempts that succeeded
--   failed                bigint  attempts that failed
--   timed_out             bigint  attempts that timed out
--   abandoned             bigint  attempts given up on
--   in_progress           bigint  attempts pending, running or verifying
--   success_rate_pct      float8  succeeded as a percentage of finished attempts (NULL if none finished)
--   mean_attempt          float8  mean attempt number (1 = first try)
--   mean_duration_seconds float8  mean time from started_at to finished_at of finished attempts
--   p90_duration_seconds  float8  90th percentile of that duration
SELECT r.strategy,
       r.action,
       count(*) AS attempts,
       count(DISTINCT r.incident_id) AS incidents,
       count(DISTINCT r.agent_id) AS agents,
       count(*) FILTER (WHERE r.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       count(*) FILTER (WHERE r.state = 'timed_out') AS timed_out,
       count(*) FILTER (WHERE r.state = 'abandoned') AS abandoned,
       count(*) FILTER (WHERE r.state IN ('pending', 'running', 'verifying')) AS in_progress,
       (100.0 * count(*) FILTER (WHERE r.state = 'succeeded')
        / nullif(count(*) FILTER (WHERE r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned')), 0))::float8
           AS success_rate_pct,
       avg(r.attempt)::float8 AS mean_attempt,
       -- An attempt being verified has finished_at (its action is done) but
       -- no outcome yet: finished attempts only, as the header says.
       avg(extract(epoch FROM r.finished_at - r.started_at))
           FILTER (WHERE r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned'))::float8 AS mean_duration_seconds,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at)::float8)
           FILTER (WHERE r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned')) AS p90_duration_seconds
FROM warden.recovery_actions r
WHERE r.created_at >= $1::timestamptz
  AND r.created_at < $2::timestamptz
  AND ($3::text IS NULL OR r.agent_id = $3::text)
GROUP BY r.strategy, r.action
ORDER BY r.strategy, r.action;
