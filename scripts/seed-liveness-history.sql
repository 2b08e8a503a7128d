-- 2,000 agents with a week of liveness history: 60 outages each (online ->
-- degraded -> offline -> degraded -> online), 480,000 status_changed events
-- in all, for timing the availability reports (BENCHMARKS.md, "Reports").
-- Run on a scratch database after `warden migrate`.
INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness, liveness_since)
SELECT 'agent-' || g, 30000, now() - interval '8 days', now(), 'online', now() - interval '1 hour'
FROM generate_series(1, 2000) g;
INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
SELECT now() - interval '7 days' + (c * 10080.0 / 60) * interval '1 minute' + (g % 97) * interval '1 second' + k.off * interval '1 minute',
       'agent-' || g, 'status_changed', 'info', 'x',
       jsonb_build_object('old', k.old, 'new', k.new, 'reason', 'test',
                          'figures', jsonb_build_object('silence_ms', k.silence, 'expected_interval_ms', 30000))
FROM generate_series(1, 2000) g, generate_series(0, 59) c,
     (VALUES (0, 'online', 'degraded', 40000), (1, 'degraded', 'offline', 100000),
             (6, 'offline', 'degraded', 0), (7, 'degraded', 'online', 0)) AS k(off, old, new, silence);
ANALYZE warden.system_events; ANALYZE warden.agent_status;
