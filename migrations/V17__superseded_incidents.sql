-- warden schema, version 17: incidents that became another.
--
-- A heartbeat_late incident whose agent then goes offline is resolved by
-- the evaluator as "superseded: ..." (the problem became
-- agent_unresponsive, it did not go away). incident_timings says so in a
-- new last column, and the reports leave such incidents out of the time
-- to recover, which they used to pull down (a late incident "recovered"
-- in seconds at every outage).
--
-- Time to detect is measured for silence incidents only (agent
-- unresponsive, late, extended offline): from the last heartbeat is what
-- detecting silence means. For an error rate or a gauge the last heartbeat
-- is the one that carried the bad figure, under an interval ago, which
-- pulled every mean towards zero and changed with the mix of issues.
CREATE OR REPLACE VIEW warden.incident_timings AS
SELECT i.id AS incident_id,
       i.agent_id,
       i.issue_type,
       i.severity,
       i.state,
       i.predicted,
       i.opened_at,
       i.resolved_at,
       ev.evidence_at,
       CASE WHEN NOT i.predicted AND i.issue_type IN ('agent_unresponsive', 'heartbeat_late', 'extended_offline')
            THEN greatest(extract(epoch FROM i.opened_at - ev.evidence_at), 0)::float8 END AS detect_seconds,
       extract(epoch FROM i.resolved_at - i.opened_at)::float8 AS recover_seconds,
       EXISTS (
           SELECT 1 FROM warden.recovery_actions r
           WHERE r.incident_id = i.id AND r.state = 'succeeded'
       ) AS auto_resolved,
       coalesce(i.resolution LIKE 'superseded:%', false) AS superseded
FROM warden.incidents i
LEFT JOIN LATERAL (
    SELECT CASE
               WHEN i.agent_id IS NULL THEN NULL
               WHEN jsonb_typeof(i.details -> 'last_seen') = 'string' THEN (i.details ->> 'last_seen')::timestamptz
               ELSE (SELECT max(h.received_at)
                     FROM warden.agent_heartbeats h
                     WHERE h.agent_id = i.agent_id
                       AND h.received_at <= i.opened_at
                       AND h.received_at > i.opened_at - interval '1 day')
           END AS evidence_at
) ev ON true;
