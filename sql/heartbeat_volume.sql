-- heartbeat_volume: heartbeats, restarts and unhealthy reports per agent over time, for ranges of months.
--
-- Purpose: how much each agent reported, and how much of it was trouble,
--   over ranges longer than raw heartbeats are kept (retention.heartbeats,
--   7 days). Whole hours of the range that the retention job has rolled
--   up are read from warden.heartbeat_rollups (kept retention.hour_rollups,
--   400 days); the rest of the range (hours before the job's first run
--   or after its hour watermark, and partial hours at either end) from the
--   raw heartbeats, so that the figures are exact wherever the raw rows
--   are still kept.
--   Buckets are aligned to the Unix epoch and a whole number of hours wide
--   (hours are what the rollups keep); buckets without heartbeats are
--   absent.
--
-- Parameters:
--   $1 since           timestamptz  start of the range (inclusive)
--   $2 until           timestamptz  end of the range (exclusive)
--   $3 agent           text         one agent_id, or NULL for every agent
--   $4 bucket_seconds  float8       bucket width in seconds (reporting.trend_bucket), rounded up to whole hours
--
-- Columns:
--   agent_id               text         the agent
--   bucket                 timestamptz  start of the bucket
--   heartbeats             bigint       heartbeats received in the bucket
--   restarts               bigint       of which reported a restart
--   unhealthy              bigint       of which reported a status other than healthy
--   heartbeats_per_minute  float8       heartbeats over the minutes of the bucket inside the range (and before now)
WITH params AS (
    SELECT ceil(greatest($4::float8, 3600) / 3600) * 3600 AS width, s.covered_from, s.covered_to
    FROM warden.rollup_span('heartbeats', $1::timestamptz, $2::timestamptz) s
),
hours AS (
    -- Rolled-up hours cover [covered_from, covered_to); raw rows the rest.
    -- The bounds are scalar subqueries, not a join, so that PostgreSQL
    -- skips the partitions and index ranges outside them.
    SELECT r.agent_id, r.bucket_start AS at, r.heartbeats, r.restarts, r.unhealthy
    FROM warden.heartbeat_rollups r
    WHERE r.bucket = 'hour'
      AND r.bucket_start >= (SELECT covered_from FROM params)
      AND r.bucket_start < (SELECT covered_to FROM params)
      AND ($3::text IS NULL OR r.agent_id = $3::text)
    UNION ALL
    SELECT h.agent_id, h.received_at, 1, h.restart_detected::int, (h.status <> 'healthy')::int
    FROM warden.agent_heartbeats h
    WHERE h.received_at >= $1::timestamptz
      AND h.received_at < least((SELECT covered_from FROM params), $2::timestamptz)
      AND ($3::text IS NULL OR h.agent_id = $3::text)
    UNION ALL
    SELECT h.agent_id, h.received_at, 1, h.restart_detected::int, (h.status <> 'healthy')::int
    FROM warden.agent_heartbeats h
    WHERE h.received_at >= (SELECT greatest(covered_to, covered_from) FROM params)
      AND h.received_at < $2::timestamptz
      AND ($3::text IS NULL OR h.agent_id = $3::text)
)
SELECT x.agent_id,
       to_timestamp(floor(extract(epoch FROM x.at) / p.width) * p.width) AS bucket,
       sum(x.heartbeats)::bigint AS heartbeats,
       sum(x.restarts)::bigint AS restarts,
       sum(x.unhealthy)::bigint AS unhealthy,
       -- Over the part of the bucket inside the range (and before now):
       -- the first and last buckets are usually partial.
       sum(x.heartbeats)::float8
           / nullif(extract(epoch FROM least(to_timestamp((floor(extract(epoch FROM x.at) / p.width) + 1) * p.width),
                                       $2::timestamptz, now())
                             - greatest(to_timestamp(floor(extract(epoch FROM x.at) / p.width) * p.width),
                                        $1::timestamptz)) / 60, 0) AS heartbeats_per_minute
FROM hours x, params p
GROUP BY x.agent_id, 2, p.width, floor(extract(epoch FROM x.at) / p.width)
ORDER BY x.agent_id, 2;
