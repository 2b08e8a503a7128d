-- mttd_mttr: mean and 90th-percentile time to detect and time to recover, per issue type.
--
-- Purpose: how quickly warden notices problems and how quickly they go
--   away, for incidents opened within the range (warden.incident_timings).
--   Time to detect: from the agent's last sign of life before the incident
--     (details.last_heard of liveness incidents: the last heartbeat, or a
--     later one refused at capacity; details.last_seen for incidents from
--     before it was recorded; else the last
--     agent_heartbeats row at or before opened_at) to opened_at. It
--     includes the configured thresholds (an agent is offline only after
--     3 missed intervals). Only silence incidents (agent_unresponsive,
--     heartbeat_late, extended_offline) have one; predictions and
--     fleet-wide incidents have none.
--   Time to recover: opened_at to resolved_at; open incidents have none yet,
--     and predictions (warnings before anything failed) are left out, as
--     are incidents superseded by another (a heartbeat_late incident ends
--     when its agent goes offline: the problem became agent_unresponsive,
--     it was not recovered from), and incidents ended by removing their
--     agent (`warden agents remove`: nothing recovered).
--   The last row, issue_type 'all', covers every incident in the range.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive), on opened_at
--   $2 until  timestamptz  end of the range (exclusive), on opened_at
--   $3 agent  text         one agent_id, or NULL for every agent (and the fleet)
--
-- Columns:
--   issue_type          text    the issue type, or 'all'
--   incidents           bigint  incidents opened within the range
--   resolved            bigint  of those, resolved by now
--   still_open          bigint  of those, still open
--   auto_resolved       bigint  of those, with a recovery action that succeeded
--   predicted           bigint  of those, predictions rather than failures
--   mttd_seconds        float8  mean time to detect
--   mttd_p90_seconds    float8  90th percentile of time to detect
--   mttr_seconds        float8  mean time to recover, over resolved incidents that were neither predictions, superseded nor ended by a removal
--   mttr_p90_seconds    float8  90th percentile of time to recover
--   max_mttr_seconds    float8  the longest recovery
SELECT coalesce(it.issue_type, 'all') AS issue_type,
       count(*) AS incidents,
       count(*) FILTER (WHERE it.state = 'resolved') AS resolved,
       count(*) FILTER (WHERE it.state = 'open') AS still_open,
       count(*) FILTER (WHERE it.auto_resolved) AS auto_resolved,
       count(*) FILTER (WHERE it.predicted) AS predicted,
       avg(it.detect_seconds) AS mttd_seconds,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY it.detect_seconds) AS mttd_p90_seconds,
       avg(it.recover_seconds) FILTER (WHERE NOT it.predicted AND NOT it.superseded AND NOT it.removed) AS mttr_seconds,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY it.recover_seconds)
           FILTER (WHERE NOT it.predicted AND NOT it.superseded AND NOT it.removed) AS mttr_p90_seconds,
       max(it.recover_seconds) FILTER (WHERE NOT it.predicted AND NOT it.superseded AND NOT it.removed) AS max_mttr_seconds
FROM warden.incident_timings it
WHERE it.opened_at >= $1::timestamptz
  AND it.opened_at < $2::timestamptz
  AND ($3::text IS NULL OR it.agent_id = $3::text)
GROUP BY GROUPING SETS ((it.issue_type), ())
ORDER BY GROUPING(it.issue_type), it.issue_type;
