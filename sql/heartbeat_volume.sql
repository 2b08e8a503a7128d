-- heartbeat_volume: heartbeats, restarts and unhealthy reports per agent over time, for ranges of months.
--
-- Purpose: how much each agent reported, and how much of it was trouble,
--   over ranges longer than raw heartbeats are kept (retention.heartbeats,
--   7 days). Hours the retention job has rolled up are read from
--   warden.heartbeat_rollups (kept retention.hour_rollups, 400 days); the
--   hours after its hour watermark, not rolled up yet, from the raw
--   heartbeats. A rolled-up hour counts whole when it starts within the
--   range; raw heartbeats count when they were received within it.
--   Buckets are aligned to the Unix epoch and at least an hour wide (an
--   hour is what the rollups keep); buckets without heartbeats are absent.
--
-- Parameters:
--   $1 since           timestamptz  start of the range (inclusive)
--   $2 until           timestamptz  end of the range (exclusive)
--   $3 agent           text         one agent_id, or NULL for every agent
--   $4 bucket_seconds  float8       bucket width in seconds (reporting.trend_bucket), at least 3600
--
-- Columns:
--   agent_id               text         the agent
--   bucket                 timestamptz  start of the bucket
--   heartbeats             bigint       heartbeats received in the bucket
--   restarts               bigint       of which reported a restart
--   unhealthy              bigint       of which reported a status other than healthy
--   heartbeats_per_minute  float8       heartbeats over the bucket's width
WITH params AS (
    SELECT greatest($4::float8, 3600) AS width,
           -- Before the retention job's first run nothing is rolled up.
           coalesce((SELECT hour_watermark FROM warden.retention_state), '-infinity') AS rolled_up_to
),
hours AS (
    SELECT r.agent_id, r.bucket_start AS at, r.heartbeats, r.restarts, r.unhealthy
    FROM warden.heartbeat_rollups r, params p
    WHERE r.bucket = 'hour'
      AND r.bucket_start >= $1::timestamptz
      AND r.bucket_start < $2::timestamptz
      AND r.bucket_start < p.rolled_up_to
      AND ($3::text IS NULL OR r.agent_id = $3::text)
    UNION ALL
    SELECT h.agent_id, h.received_at, 1, h.restart_detected::int, (h.status <> 'healthy')::int
    FROM warden.agent_heartbeats h, params p
    WHERE h.received_at >= greatest($1::timestamptz, p.rolled_up_to)
      AND h.received_at < $2::timestamptz
      AND ($3::text IS NULL OR h.agent_id = $3::text)
)
SELECT x.agent_id,
       to_timestamp(floor(extract(epoch FROM x.at) / p.width) * p.width) AS bucket,
       sum(x.heartbeats)::bigint AS heartbeats,
       sum(x.restarts)::bigint AS restarts,
       sum(x.unhealthy)::bigint AS unhealthy,
       sum(x.heartbeats)::float8 / (p.width / 60) AS heartbeats_per_minute
FROM hours x, params p
GROUP BY x.agent_id, 2, p.width
ORDER BY x.agent_id, 2;
