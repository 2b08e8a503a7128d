-- alert_volume: alerts and deliveries by severity and channel: outcomes and time to acknowledge.
--
-- Purpose: how much paging warden does, through which channels, whether
--   messages got through, and how fast people acknowledged. One row per
--   (severity, channel) over the alerts opened within the range. An alert
--   routed to several channels counts once under each of them. Messages
--   belong to the alert in their alert_id; an alert with no message of its
--   own (none sent yet, or it went out inside another alert's grouped
--   message) shows under channel '(none)'.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive), on alerts.opened_at
--   $2 until  timestamptz  end of the range (exclusive), on alerts.opened_at
--   $3 agent  text         one agent_id (through the alert's incident), or NULL for all
--
-- Columns:
--   severity          text    alert severity
--   channel           text    delivery channel, or '(none)'
--   alerts            bigint  alerts opened within the range with a delivery on this channel
--   escalated         bigint  of those, alerts that escalated past their first level
--   acknowledged      bigint  of those, alerts someone acknowledged
--   resolved          bigint  of those, alerts resolved by now
--   deliveries        bigint  messages to this channel for those alerts
--   sent              bigint  messages delivered
--   pending           bigint  messages still waiting or retrying
--   dead              bigint  messages given up on
--   cancelled         bigint  messages made moot before they were sent (e.g. the alert was acknowledged)
--   mean_attempts     float8  mean delivery attempts per message
--   mean_ack_seconds  float8  mean time from opened_at to acknowledged_at
--   p90_ack_seconds   float8  90th percentile of time to acknowledge
WITH per_alert AS (
    SELECT a.id,
           a.severity,
           coalesce(d.channel, '(none)') AS channel,
           a.escalation_level > 1 AS escalated,
           a.acknowledged_at IS NOT NULL AS acknowledged,
           a.state = 'resolved' AS resolved,
           extract(epoch FROM a.acknowledged_at - a.opened_at)::float8 AS ack_seconds,
           count(d.id) AS deliveries,
           count(d.id) FILTER (WHERE d.state = 'sent') AS sent,
           count(d.id) FILTER (WHERE d.state = 'pending') AS pending,
           count(d.id) FILTER (WHERE d.state = 'dead') AS dead,
           count(d.id) FILTER (WHERE d.state = 'cancelled') AS cancelled,
           sum(d.attempts) AS attempts
    FROM warden.alerts a
    LEFT JOIN warden.incidents i ON i.id = a.incident_id
    LEFT JOIN warden.alert_deliveries d ON d.alert_id = a.id
    WHERE a.opened_at >= $1::timestamptz
      AND a.opened_at < $2::timestamptz
      AND ($3::text IS NULL OR i.agent_id = $3::text)
    GROUP BY a.id, a.severity, coalesce(d.channel, '(none)')
)
SELECT p.severity,
       p.channel,
       count(*) AS alerts,
       count(*) FILTER (WHERE p.escalated) AS escalated,
       count(*) FILTER (WHERE p.acknowledged) AS acknowledged,
       count(*) FILTER (WHERE p.resolved) AS resolved,
       sum(p.deliveries)::bigint AS deliveries,
       sum(p.sent)::bigint AS sent,
       sum(p.pending)::bigint AS pending,
       sum(p.dead)::bigint AS dead,
       sum(p.cancelled)::bigint AS cancelled,
       (sum(p.attempts) / nullif(sum(p.deliveries), 0))::float8 AS mean_attempts,
       avg(p.ack_seconds) AS mean_ack_seconds,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY p.ack_seconds) AS p90_ack_seconds
FROM per_alert p
GROUP BY p.severity, p.channel
ORDER BY CASE p.severity WHEN 'emergency' THEN 1 WHEN 'critical' THEN 2 WHEN 'warning' THEN 3 ELSE 4 END, p.channel;
