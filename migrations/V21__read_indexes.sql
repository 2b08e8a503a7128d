-- Indexes for reads that walked whole tables.
--
-- - An agent's last liveness transition before a time (liveness_spans'
--   starting state, read once per agent by the availability reports and
--   dashboards) went through system_events_agent_idx and filtered on the
--   type afterwards, passing over every event the agent posted since its
--   last transition: 71 ms for an agent with 500,000 posted events, per
--   agent and per panel. With this index, 0.07 ms.
-- - The retention job's prune of events other than transitions (kept 90
--   days) found its rows behind all the transitions kept 400 days, which
--   it read every minute and deleted none of: 248 ms for 1.2 million of
--   them, growing with the history. With this index (and the prune
--   reading oldest first, so the planner takes it), 0.06 ms.
-- - Fleet-wide recovery figures (dashboards' recovery panels,
--   recovery_success, executive_summary) select actions by created_at
--   alone, which only the per-agent index led with agent_id held: they
--   read every action kept (400 days).
--
-- Built in the migration's transaction, so writes of events (restarts
-- found by ingest among them) wait for it: 1.2 s for 1.7 million events
-- here. Pending migrations share one transaction: these come before
-- V22, whose ALTER TABLE of agent_status holds every heartbeat until that
-- transaction ends, so that hold does not last the index builds too.
CREATE INDEX system_events_agent_transitions_idx ON warden.system_events (agent_id, occurred_at, id)
    WHERE event_type = 'status_changed' AND source = 'warden';
CREATE INDEX system_events_prunable_idx ON warden.system_events (occurred_at)
    WHERE NOT (event_type IN ('status_changed', 'evaluation_paused') AND source = 'warden');
CREATE INDEX recovery_actions_created_idx ON warden.recovery_actions (created_at);
