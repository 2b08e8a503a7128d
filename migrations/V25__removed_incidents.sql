-- warden schema, version 25: incidents ended by removing their agent.
--
-- `warden agents remove` (DELETE /v1/agents/{id}) resolves the agent's
-- open incidents with the resolution 'agent removed'. Nothing recovered:
-- their time to "recover" is how long it took someone to remove the agent,
-- so incident_timings marks them (`removed`, a new last column) and the
-- MTTR and auto-recovery reports leave them out, as they leave out
-- superseded ones. Otherwise the same view as V23.

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
       coalesce(i.resolution LIKE 'superseded:%', false) AS superseded,
       coalesce(i.resolution = 'agent removed', false) AS removed
FROM warden.incidents i
LEFT JOIN LATERAL (
    SELECT CASE
               WHEN i.agent_id IS NULL THEN NULL
               WHEN jsonb_typeof(i.details -> 'last_heard') = 'string' THEN (i.details ->> 'last_heard')::timestamptz
               WHEN jsonb_typeof(i.details -> 'last_seen') = 'string' THEN (i.details ->> 'last_seen')::timestamptz
               ELSE (SELECT max(h.received_at)
                     FROM warden.agent_heartbeats h
                     WHERE h.agent_id = i.agent_id
                       AND h.received_at <= i.opened_at
                       AND h.received_at > i.opened_at - interval '1 day')
           END AS evidence_at
) ev ON true;
