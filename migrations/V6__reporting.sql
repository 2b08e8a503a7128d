-- warden schema, version 6: the reporting face.
--
-- Views and functions shared by the reports in sql/, `warden report` and
-- the Grafana dashboards in dashboards/. They only read the contract
-- tables, so their definitions can change in later migrations without
-- touching what warden writes; reports and dashboards depend on their
-- columns, which are therefore kept stable (add, never rename or remove).

-- Every liveness transition the evaluator recorded, as columns instead of
-- jsonb. The evaluator writes one status_changed event per transition, in
-- the same transaction as the change to agent_status. Events agents post
-- themselves (source 'agent') may use any event_type and are not warden's
-- verdict, so they are left out.
CREATE VIEW warden.liveness_transitions AS
SELECT e.id,
       e.agent_id,
       e.occurred_at,
       e.details ->> 'old'    AS old_liveness,
       e.details ->> 'new'    AS new_liveness,
       e.details ->> 'reason' AS reason
FROM warden.system_events e
WHERE e.event_type = 'status_changed'
  AND e.source = 'warden'
  AND e.agent_id IS NOT NULL;

COMMENT ON VIEW warden.liveness_transitions IS
    'Liveness transitions (status_changed events) with old and new liveness as columns.';

-- Each agent's liveness history as half-open intervals [valid_from,
-- valid_to); valid_to is NULL for the interval still current.
--
-- * Between two transitions the agent was in the earlier one's new state.
-- * Before its first transition, from first_seen, it was in that
--   transition's old state (normally 'unknown'). If retention has pruned
--   older events, this attributes the pruned stretch to the old state of
--   the oldest transition kept, which is the best the data still says.
-- * An agent that never changed state has one interval from first_seen in
--   its current liveness.
-- Time before first_seen belongs to no interval: the agent did not exist.
CREATE VIEW warden.liveness_intervals AS
WITH t AS (
    SELECT lt.agent_id, lt.occurred_at, lt.old_liveness, lt.new_liveness,
           row_number() OVER w AS seq,
           lead(lt.occurred_at) OVER w AS next_at
    FROM warden.liveness_transitions lt
    WINDOW w AS (PARTITION BY lt.agent_id ORDER BY lt.occurred_at, lt.id)
)
SELECT s.agent_id, t.old_liveness AS liveness, s.first_seen AS valid_from, t.occurred_at AS valid_to
FROM t
JOIN warden.agent_status s ON s.agent_id = t.agent_id
WHERE t.seq = 1 AND s.first_seen < t.occurred_at
UNION ALL
SELECT t.agent_id, t.new_liveness, t.occurred_at, t.next_at
FROM t
UNION ALL
SELECT s.agent_id, s.liveness, s.first_seen, NULL::timestamptz
FROM warden.agent_status s
WHERE NOT EXISTS (
    SELECT 1 FROM warden.liveness_transitions x WHERE x.agent_id = s.agent_id
);

COMMENT ON VIEW warden.liveness_intervals IS
    'Per-agent liveness as [valid_from, valid_to) intervals built from the transitions; valid_to NULL = current.';

-- Seconds each agent spent in each liveness within [p_since, p_until),
-- from warden.liveness_intervals (not from sampling). The current interval
-- is counted up to now(), so a range reaching into the future is not
-- credited with time that has not happened yet.
--
-- Availability definition, shared by every report:
--   up       = online + degraded (degraded: heartbeats are late, but the
--              agent is still there; it is also the probation state on the
--              way back from offline). Degraded time is reported on its own
--              so the stricter online-only figure is always at hand.
--   down     = offline.
--   excluded = unknown (never evaluated yet) and anything before first_seen.
--   availability_pct = 100 * up / (up + down); NULL when nothing was observed.
--   online_pct       = 100 * online / (up + down).
CREATE FUNCTION warden.liveness_time(p_since timestamptz, p_until timestamptz, p_agent text DEFAULT NULL)
RETURNS TABLE (
    agent_id         text,
    online_seconds   double precision,
    degraded_seconds double precision,
    offline_seconds  double precision,
    unknown_seconds  double precision,
    observed_seconds double precision,
    availability_pct double precision,
    online_pct       double precision
)
LANGUAGE sql
STABLE
AS $$
    WITH bounds AS (
        SELECT p_since AS lo, least(p_until, now()) AS hi
    ),
    clipped AS (
        SELECT i.agent_id, i.liveness,
               extract(epoch FROM least(coalesce(i.valid_to, b.hi), b.hi) - greatest(i.valid_from, b.lo))::float8 AS secs
        FROM warden.liveness_intervals i
        CROSS JOIN bounds b
        WHERE (p_agent IS NULL OR i.agent_id = p_agent)
          AND i.valid_from < b.hi
          AND (i.valid_to IS NULL OR i.valid_to > b.lo)
    ),
    per_agent AS (
        SELECT c.agent_id,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'online'), 0)   AS online_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'degraded'), 0) AS degraded_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'offline'), 0)  AS offline_s,
               coalesce(sum(c.secs) FILTER (WHERE c.liveness = 'unknown'), 0)  AS unknown_s
        FROM clipped c
        WHERE c.secs > 0
        GROUP BY c.agent_id
    )
    SELECT p.agent_id, p.online_s, p.degraded_s, p.offline_s, p.unknown_s,
           p.online_s + p.degraded_s + p.offline_s,
           100.0 * (p.online_s + p.degraded_s) / nullif(p.online_s + p.degraded_s + p.offline_s, 0),
           100.0 * p.online_s / nullif(p.online_s + p.degraded_s + p.offline_s, 0)
    FROM per_agent p
$$;

COMMENT ON FUNCTION warden.liveness_time IS
    'Seconds per agent in each liveness within [since, until), and availability: up = online + degraded, down = offline, unknown excluded.';

-- One row per incident with the timings reports need.
--
-- evidence_at is the last sign of life before the incident: the agent's
-- last heartbeat as the evaluator saw it (details.last_seen, written on
-- liveness incidents), else its last heartbeat row at or before opened_at
-- (looked up within one day, so the lookup stays on a few partitions).
-- detect_seconds = opened_at - evidence_at: how long warden took to notice,
-- thresholds included; NULL for fleet incidents and predictions (nothing had
-- failed yet). recover_seconds = resolved_at - opened_at.
-- auto_resolved: a recovery action for the incident succeeded.
CREATE VIEW warden.incident_timings AS
SELECT i.id AS incident_id,
       i.agent_id,
       i.issue_type,
       i.severity,
       i.state,
       i.predicted,
       i.opened_at,
       i.resolved_at,
       ev.evidence_at,
       CASE WHEN NOT i.predicted
            THEN greatest(extract(epoch FROM i.opened_at - ev.evidence_at), 0)::float8 END AS detect_seconds,
       extract(epoch FROM i.resolved_at - i.opened_at)::float8 AS recover_seconds,
       EXISTS (
           SELECT 1 FROM warden.recovery_actions r
           WHERE r.incident_id = i.id AND r.state = 'succeeded'
       ) AS auto_resolved
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

COMMENT ON VIEW warden.incident_timings IS
    'Incidents with time to detect (from the last heartbeat), time to recover, and whether a recovery action succeeded.';
