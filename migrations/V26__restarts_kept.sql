-- warden's own restart detections (agent_restarted events of source
-- 'warden') are kept as long as liveness transitions (retention.transitions,
-- 400 days) rather than with other events (retention.events, 90 days).
-- The restart_loop incidents they explain, and the hourly rollups that count
-- restarts, are kept 400 days: restart_loops over a longer range showed an
-- agent with restart-loop incidents and no restarts. They are few (one per
-- restart an agent reports), unlike events agents post.
--
-- The retention job's prune of other events reads oldest first through
-- this partial index, whose predicate must be the prune's: rebuilt with the
-- new exclusion, in the migration's transaction (event writes wait for it,
-- about a second per million events).
DROP INDEX warden.system_events_prunable_idx;
CREATE INDEX system_events_prunable_idx ON warden.system_events (occurred_at)
    WHERE NOT (event_type IN ('status_changed', 'evaluation_paused', 'agent_restarted') AND source = 'warden');
