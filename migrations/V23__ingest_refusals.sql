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
