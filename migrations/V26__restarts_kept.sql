-- warden's own restart detections (agent_restarted events of source
-- 'warden') are kept as long as liveness transitions (retention.transitions,
-- 400 days) rather than with other events (retention.events, 90 days).
-- The restart_loop incidents they explain, and the hourly rollups that count
-- restarts, are kept 400 days: restart_loops over a longer range showed an
-- agent with restart-loop incidents and no restarts. They are few (one per
-- restart an agent reports), unlike events agents post.
--
-- The retention job's prune of other events reads oldest first through
-- a partial index whose predicate must be the prune's. The new one is
-- built beside the old under another name, in the migration's transaction
-- (event writes wait for it, about a second per million events; reads do
-- not), and only then is the old one dropped, which takes the table's
-- exclusive lock for an instant: bounded by lock_timeout, so that a long
-- report reading system_events fails the migration (retried at the next
-- start) instead of queueing every reader and writer behind it.
SET LOCAL lock_timeout = '10s';
CREATE INDEX system_events_prunable_v26_idx ON warden.system_events (occurred_at)
    WHERE NOT (event_type IN ('status_changed', 'evaluation_paused', 'agent_restarted') AND source = 'warden');
DROP INDEX warden.system_events_prunable_idx;
ALTER INDEX warden.system_events_prunable_v26_idx RENAME TO system_events_prunable_idx;
RESET lock_timeout;
