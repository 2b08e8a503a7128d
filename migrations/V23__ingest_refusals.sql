-- Heartbeats refused because warden was at its ingest capacity (503, the
-- queue full). Such a heartbeat was authenticated and valid: its agent
-- was alive when it sent it, warden only could not store it then. The
-- writers note each known agent's latest refusal here within a fraction
-- of a second, and liveness counts the agent's silence from it when it is
-- later than the last stored heartbeat. An overloaded warden therefore
-- does not take the agents it turns away late or offline, while an agent
-- that stopped is judged as ever: it sends nothing to refuse.
--
-- A refusal only holds the silence back: it never brings an agent online
-- (that takes stored heartbeats), and nothing else reads it as a
-- heartbeat. One row per agent, kept a week.
CREATE TABLE warden.ingest_refusals (
    agent_id   text COLLATE "C" PRIMARY KEY
               REFERENCES warden.agent_status (agent_id) ON DELETE CASCADE,
    refused_at timestamptz NOT NULL
);

-- Time to detect runs from the last sign of life: liveness incidents now
-- record `last_heard` (the later of the last stored heartbeat and the
-- last refusal) beside `last_seen`. Older incidents have only last_seen.
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
               WHEN jsonb_typeof(i.details -> 'last_heard') = 'string' THEN (i.details ->> 'last_heard')::timestamptz
               WHEN jsonb_typeof(i.details -> 'last_seen') = 'string' THEN (i.details ->> 'last_seen')::timestamptz
               ELSE (SELECT max(h.received_at)
                     FROM warden.agent_heartbeats h
                     WHERE h.agent_id = i.agent_id
                       AND h.received_at <= i.opened_at
                       AND h.received_at > i.opened_at - interval '1 day')
           END AS evidence_at
) ev ON true;
