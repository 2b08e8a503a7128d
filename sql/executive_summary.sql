-- executive_summary: one page: availability vs target, incidents, MTTD/MTTR, automation, downtime cost, trend.
--
-- Purpose: the few figures a manager asks for, each for the range and for
--   the previous period of equal length ([since - (until - since), since),
--   with until clipped to now: month-to-date against as many days before),
--   with the change and whether it is better or worse.
--   * Fleet availability is time-weighted: all agents' up time over all
--     agents' observed time (up = online + degraded, down = offline,
--     unknown excluded; see agent_availability).
--   * Incidents are those opened in the period; MTTD and MTTR as in
--     mttd_mttr (predictions, superseded incidents and those ended by
--     removing their agent left out).
--   * An incident counts as resolved automatically when a recovery action
--     for it succeeded; the share is over the incidents opened in the
--     period, predictions, superseded ones and those ended by removing
--     their agent left out (a late heartbeat
--     that turned into an outage is one problem, which recovery acts on
--     as the outage).
--   * Downtime cost = each agent's offline minutes x its cost per minute:
--     the highest cost in label_costs among the agent's labels
--     ({"label": {"value": cost}}), else cost_per_minute.
--
-- Parameters:
--   $1 since             timestamptz  start of the range (inclusive)
--   $2 until             timestamptz  end of the range (exclusive)
--   $3 agent             text         one agent_id, or NULL for the whole fleet
--   $4 target_pct        float8       availability target in percent (reporting.availability_target)
--   $5 cost_per_minute   float8       cost of one agent-minute offline (reporting.downtime_cost_per_minute)
--   $6 label_costs       jsonb        per-label costs per minute, {"label": {"value": cost}} (reporting.label_costs)
--
-- Columns:
--   metric     text    what is measured (see the list below)
--   current    float8  its value over the range
--   previous   float8  its value over the previous period
--   change     float8  current minus previous
--   unit       text    percent, agents, incidents, seconds, minutes or cost
--   trend      text    better, worse or unchanged (NULL where neither direction is better)
--   note       text    a word on the figure: whether the target was met, what it covers
--
-- Metrics, in order: fleet_availability_pct, availability_target_pct,
--   agents_observed, agents_below_target, incidents, incidents_emergency,
--   incidents_critical, incidents_warning, incidents_info, mttd_seconds,
--   mttr_seconds, auto_resolved_pct, recovery_success_pct, offline_minutes,
--   downtime_cost.
-- A range reaching into the future is measured up to now, and so is the
-- previous period's length: month-to-date is compared with as many days
-- before it, not with a whole month.
WITH periods (period, lo, hi) AS (
    VALUES ('current', $1::timestamptz, least($2::timestamptz, now())),
           -- In seconds: an interval of days would be counted in the
           -- session's calendar days, an hour short across a DST change.
           ('previous', $1::timestamptz - date_part('epoch', greatest(least($2::timestamptz, now()), $1::timestamptz)
                                                             - $1::timestamptz) * interval '1 second',
            $1::timestamptz)
),
agent_cost AS (
    SELECT s.agent_id,
           coalesce((SELECT max((lc.value ->> l.value)::float8)
                     FROM jsonb_each_text(s.labels) l
                     JOIN jsonb_each($6::jsonb) lc ON lc.key = l.key
                     WHERE jsonb_typeof(lc.value -> l.value) = 'number'),
                    $5::float8) AS per_minute
    FROM warden.agent_status s
),
availability AS (
    SELECT p.period,
           CASE WHEN sum(lt.observed_seconds) > 0
                THEN least(100.0 * sum(lt.online_seconds + lt.degraded_seconds) / sum(lt.observed_seconds), 100) END AS fleet_pct,
           count(*) FILTER (WHERE lt.observed_seconds > 0) AS observed,
           count(*) FILTER (WHERE lt.availability_pct < $4::float8) AS below,
           coalesce(sum(lt.offline_seconds), 0) / 60.0 AS offline_minutes,
           coalesce(sum(lt.offline_seconds / 60.0 * coalesce(c.per_minute, $5::float8)), 0) AS cost
    FROM periods p
    LEFT JOIN LATERAL warden.liveness_time(p.lo, p.hi, $3::text) lt ON true
    LEFT JOIN agent_cost c ON c.agent_id = lt.agent_id
    GROUP BY p.period
),
incidents AS (
    SELECT p.period,
           count(it.incident_id) AS total,
           count(it.incident_id) FILTER (WHERE it.severity = 'emergency') AS emergency,
           count(it.incident_id) FILTER (WHERE it.severity = 'critical') AS critical,
           count(it.incident_id) FILTER (WHERE it.severity = 'warning') AS warning,
           count(it.incident_id) FILTER (WHERE it.severity = 'info') AS info,
           avg(it.detect_seconds) AS mttd,
           avg(it.recover_seconds) FILTER (WHERE NOT it.predicted AND NOT it.superseded AND NOT it.removed) AS mttr,
           100.0 * count(it.incident_id) FILTER (WHERE it.auto_resolved AND NOT it.predicted AND NOT it.superseded AND NOT it.removed)
               / nullif(count(it.incident_id) FILTER (WHERE NOT it.predicted AND NOT it.superseded AND NOT it.removed), 0) AS auto_pct
    FROM periods p
    LEFT JOIN warden.incident_timings it
           ON it.opened_at >= p.lo AND it.opened_at < p.hi
          AND ($3::text IS NULL OR it.agent_id = $3::text)
    GROUP BY p.period
),
recovery AS (
    SELECT p.period,
           100.0 * count(r.id) FILTER (WHERE r.state = 'succeeded')
               / nullif(count(r.id) FILTER (WHERE r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned')), 0)
               AS success_pct
    FROM periods p
    LEFT JOIN warden.recovery_actions r
           ON r.created_at >= p.lo AND r.created_at < p.hi
          AND ($3::text IS NULL OR r.agent_id = $3::text)
    GROUP BY p.period
),
figures AS (
    SELECT a.period, m.ord, m.metric, m.unit, m.higher_is_better, m.value
    FROM availability a
    JOIN incidents i ON i.period = a.period
    JOIN recovery r ON r.period = a.period
    CROSS JOIN LATERAL (VALUES
        (1, 'fleet_availability_pct', 'percent', true, a.fleet_pct::float8),
        (2, 'availability_target_pct', 'percent', NULL, $4::float8),
        (3, 'agents_observed', 'agents', NULL, a.observed::float8),
        (4, 'agents_below_target', 'agents', false, a.below::float8),
        (5, 'incidents', 'incidents', false, i.total::float8),
        (6, 'incidents_emergency', 'incidents', false, i.emergency::float8),
        (7, 'incidents_critical', 'incidents', false, i.critical::float8),
        (8, 'incidents_warning', 'incidents', false, i.warning::float8),
        (9, 'incidents_info', 'incidents', false, i.info::float8),
        (10, 'mttd_seconds', 'seconds', false, i.mttd::float8),
        (11, 'mttr_seconds', 'seconds', false, i.mttr::float8),
        (12, 'auto_resolved_pct', 'percent', true, i.auto_pct::float8),
        (13, 'recovery_success_pct', 'percent', true, r.success_pct::float8),
        (14, 'offline_minutes', 'minutes', false, a.offline_minutes::float8),
        (15, 'downtime_cost', 'cost', false, a.cost::float8)
    ) AS m (ord, metric, unit, higher_is_better, value)
)
SELECT c.metric,
       c.value AS current,
       p.value AS previous,
       c.value - p.value AS change,
       c.unit,
       CASE WHEN c.higher_is_better IS NULL OR c.value IS NULL OR p.value IS NULL THEN NULL
            WHEN c.value = p.value THEN 'unchanged'
            WHEN (c.value > p.value) = c.higher_is_better THEN 'better'
            ELSE 'worse'
       END AS trend,
       CASE c.metric
           WHEN 'fleet_availability_pct' THEN
               CASE WHEN c.value IS NULL THEN 'no agent observed'
                    WHEN c.value >= $4::float8 THEN 'meets the target'
                    ELSE 'below the target' END
           WHEN 'agents_observed' THEN 'agents with liveness known for part of the range'
           WHEN 'mttd_seconds' THEN 'last heartbeat to incident opened'
           WHEN 'mttr_seconds' THEN 'incident opened to resolved'
           WHEN 'auto_resolved_pct' THEN 'incidents with a successful recovery action'
           WHEN 'downtime_cost' THEN 'offline minutes x cost per minute'
       END AS note
FROM figures c
JOIN figures p ON p.metric = c.metric AND p.period = 'previous'
WHERE c.period = 'current'
ORDER BY c.ord;
