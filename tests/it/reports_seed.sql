-- A small, known history for the reporting tests (tests/it/reports.rs).
--
-- Times are minutes from t0, which the test sets first with
--   SELECT set_config('warden_test.t0', '<timestamptz>', false)
-- The reports are then run over [t0, t0 + 60m) ("the range") and compared
-- with the figures worked out by hand in reports.rs. The previous period,
-- [t0 - 60m, t0), carries a little history too for executive_summary.

CREATE FUNCTION pg_temp.t(minutes float8) RETURNS timestamptz
LANGUAGE sql STABLE
AS $$ SELECT current_setting('warden_test.t0')::timestamptz + minutes * interval '1 minute' $$;

-- a1: a database agent that goes late at 40, offline at 45 and comes back
--     at 60-61. a2: an idle worker online throughout, restarting in a loop.
--     a3: registered at 30, online from 31. a4: registered at 50, never
--     evaluated.
INSERT INTO warden.agent_status
    (agent_id, name, labels, mode, status, expected_interval_ms, first_seen, last_seen, heartbeat_count,
     liveness, liveness_since, score, tier, evaluated_at)
VALUES
    ('a1', 'db one', '{"role": "db"}', 'active', 'healthy', 60000, pg_temp.t(-30), pg_temp.t(59), 42,
     'online', pg_temp.t(61), 85, 'excellent', pg_temp.t(61)),
    ('a2', 'worker two', '{"role": "worker"}', 'idle', 'healthy', 300000, pg_temp.t(-60), pg_temp.t(55), 12,
     'online', pg_temp.t(-59), 72, 'good', pg_temp.t(61)),
    ('a3', NULL, '{}', 'sleep', 'degraded', 120000, pg_temp.t(30), pg_temp.t(58), 15,
     'online', pg_temp.t(31), 50, 'poor', pg_temp.t(61)),
    ('a4', NULL, '{}', NULL, 'healthy', 30000, pg_temp.t(50), pg_temp.t(50), 1,
     'unknown', pg_temp.t(50), NULL, NULL, NULL);

-- Liveness transitions, as the evaluator writes them.
INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
SELECT pg_temp.t(m), agent, 'status_changed', 'info', agent || ': ' || old || ' -> ' || new,
       jsonb_build_object('old', old, 'new', new, 'reason', 'test')
FROM (VALUES
    -- previous period: a1 online 10 min, offline 5, online 5
    (-20, 'a1', 'unknown', 'online'),
    (-10, 'a1', 'online', 'offline'),
    (-5, 'a1', 'offline', 'online'),
    (-59, 'a2', 'unknown', 'online'),
    -- the range: a1 online 40, degraded 5, offline 15
    (40, 'a1', 'online', 'degraded'),
    (45, 'a1', 'degraded', 'offline'),
    (60, 'a1', 'offline', 'degraded'),
    (61, 'a1', 'degraded', 'online'),
    (31, 'a3', 'unknown', 'online')
) AS v(m, agent, old, new);

-- Restarts: a2 three times in the range (and once before), a1 once.
INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
SELECT pg_temp.t(m), agent, 'agent_restarted', 'info', 'agent restarted',
       jsonb_build_object('previous_uptime_seconds', up, 'uptime_seconds', 1)
FROM (VALUES (-30, 'a2', 5000), (12, 'a2', 600), (15, 'a2', 170), (18, 'a2', 160), (58, 'a1', 3000))
    AS v(m, agent, up);

-- a3 posts restart events of its own (source 'agent'): never counted as
-- warden's finding.
INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details, source)
SELECT pg_temp.t(m), 'a3', 'agent_restarted', 'info', 'posted by the agent',
       jsonb_build_object('previous_uptime_seconds', 10), 'agent'
FROM generate_series(31, 35) AS m;

-- Heartbeats: a1 every minute 0-39, then 58 and 59; a2 every 5 minutes;
-- a3 every 2 minutes from 30 to 58.
INSERT INTO warden.agent_heartbeats (agent_id, received_at, status)
SELECT 'a1', pg_temp.t(m), 'healthy' FROM generate_series(0, 39) AS m
UNION ALL SELECT 'a1', pg_temp.t(m), 'healthy' FROM unnest(ARRAY[58, 59]) AS m
UNION ALL SELECT 'a2', pg_temp.t(m), 'healthy' FROM generate_series(0, 55, 5) AS m
UNION ALL SELECT 'a3', pg_temp.t(m), 'healthy' FROM generate_series(30, 58, 2) AS m
UNION ALL SELECT 'a4', pg_temp.t(50), 'healthy';

INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value, unit)
SELECT 'a1', pg_temp.t(m), 'cpu_percent', 20 + m, '%' FROM generate_series(0, 39) AS m;

-- Score snapshots.
INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness, components)
SELECT agent, pg_temp.t(m), score, tier, liveness,
       jsonb_build_object('heartbeat_consistency', jsonb_build_object('score', score, 'weight', 1.0, 'inputs', '{}'::jsonb))
FROM (VALUES
    ('a1', 5, 90.0, 'excellent', 'online'),
    ('a1', 15, 80.0, 'excellent', 'online'),
    ('a1', 35, 70.0, 'good', 'online'),
    ('a1', 50, 30.0, 'critical', 'offline'),
    ('a2', 10, 72.0, 'good', 'online')
) AS v(agent, m, score, tier, liveness);

-- Incidents (ids in insertion order: 1 previous-period outage of a1, then
-- 2 late a1, 3 unresponsive a1, 4 error rate a3, 5 restart loop a2 (still
-- open), 6 flapping a1, 7 a predicted resource exhaustion of a2).
INSERT INTO warden.incidents (agent_id, issue_type, severity, state, opened_at, resolved_at, predicted, summary, details)
VALUES
    ('a1', 'agent_unresponsive', 'critical', 'resolved', pg_temp.t(-9), pg_temp.t(-5), false, 'a1 offline',
     jsonb_build_object('last_seen', pg_temp.t(-11))),
    ('a1', 'heartbeat_late', 'warning', 'resolved', pg_temp.t(40), pg_temp.t(45), false, 'a1 late',
     jsonb_build_object('last_seen', pg_temp.t(39))),
    ('a1', 'agent_unresponsive', 'critical', 'resolved', pg_temp.t(45), pg_temp.t(61), false, 'a1 offline',
     jsonb_build_object('last_seen', pg_temp.t(39))),
    ('a3', 'high_error_rate', 'warning', 'resolved', pg_temp.t(35), pg_temp.t(50), false, 'a3 errors', '{}'),
    ('a2', 'restart_loop', 'critical', 'open', pg_temp.t(20), NULL, false, 'a2 restarting', '{"restarts": 3}'),
    ('a1', 'flapping', 'warning', 'resolved', pg_temp.t(42), pg_temp.t(55), false, 'a1 flapping', '{}'),
    ('a2', 'resource_exhaustion', 'warning', 'resolved', pg_temp.t(10), pg_temp.t(15), true, 'a2 may run out', '{}');

-- Recovery: a1's outage took two command attempts; a2's loop an http
-- attempt that timed out and one still running; the previous outage one.
INSERT INTO warden.recovery_actions
    (incident_id, agent_id, strategy, action, attempt, state, created_at, started_at, finished_at, outcome)
VALUES
    (1, 'a1', 'restart_worker', 'command', 1, 'succeeded', pg_temp.t(-8), pg_temp.t(-8), pg_temp.t(-7.5), 'ok'),
    (3, 'a1', 'restart_worker', 'command', 1, 'failed', pg_temp.t(46), pg_temp.t(46), pg_temp.t(47), 'exit 1'),
    (3, 'a1', 'restart_worker', 'command', 2, 'succeeded', pg_temp.t(50), pg_temp.t(50), pg_temp.t(50.5), 'ok'),
    (5, 'a2', 'restart_worker', 'http', 1, 'timed_out', pg_temp.t(21), pg_temp.t(21), pg_temp.t(22), 'timeout'),
    (5, 'a2', 'restart_worker', 'http', 2, 'running', pg_temp.t(25), pg_temp.t(25), NULL, NULL),
    -- its action done, no outcome yet: in progress, and no duration
    (5, 'a2', 'restart_worker', 'http', 3, 'verifying', pg_temp.t(26), pg_temp.t(26), pg_temp.t(28), NULL);

-- Alerts (ids 1-3) and their deliveries.
INSERT INTO warden.alerts
    (incident_id, dedup_key, severity, state, escalation_level, opened_at, acknowledged_at, acknowledged_by, resolved_at)
VALUES
    (2, 'a1:heartbeat_late', 'warning', 'resolved', 0, pg_temp.t(40), NULL, NULL, pg_temp.t(45)),
    (3, 'a1:agent_unresponsive', 'critical', 'resolved', 2, pg_temp.t(45), pg_temp.t(47), 'alice', pg_temp.t(61)),
    (5, 'a2:restart_loop', 'critical', 'acknowledged', 1, pg_temp.t(20), pg_temp.t(30), 'bob', NULL);

INSERT INTO warden.alert_deliveries (alert_id, channel, kind, state, attempts, created_at, next_attempt_at, last_error, sent_at)
VALUES
    (1, 'ops_slack', 'firing', 'sent', 1, pg_temp.t(40), pg_temp.t(40), NULL, pg_temp.t(40)),
    (1, 'ops_slack', 'resolved', 'sent', 1, pg_temp.t(45), pg_temp.t(45), NULL, pg_temp.t(45)),
    (2, 'ops_slack', 'firing', 'sent', 1, pg_temp.t(45), pg_temp.t(45), NULL, pg_temp.t(45)),
    (2, 'oncall_email', 'escalation', 'dead', 5, pg_temp.t(50), pg_temp.t(55), 'smtp: connection refused', NULL),
    (2, 'ops_slack', 'resolved', 'pending', 0, pg_temp.t(59), pg_temp.t(59), NULL, NULL),
    (3, 'ops_slack', 'firing', 'sent', 1, pg_temp.t(20), pg_temp.t(20), NULL, pg_temp.t(20));
