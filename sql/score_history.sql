-- score_history: each agent's lowest, mean and highest score per bucket, for ranges of months.
--
-- Purpose: how agents' scores ranged over time, over ranges longer than
--   the score snapshots are kept (retention.health_history, 30 days).
--   Whole hours of the range that the retention job has rolled up are
--   read from warden.score_rollups (kept retention.hour_rollups, 400 days);
--   the rest of the range (hours before the job's first run or after its
--   score watermark, and partial hours at either end) from the snapshots
--   in warden.health_history, so that the figures are exact wherever the
--   snapshots are still kept.
--   Figures are over snapshots, not weighted by time (as in score_trend,
--   which has each bucket's last score and tier but reads the snapshots
--   only). Buckets are aligned to the Unix epoch and a whole number of
--   hours wide; buckets without a snapshot are absent.
--
-- Parameters:
--   $1 since           timestamptz  start of the range (inclusive)
--   $2 until           timestamptz  end of the range (exclusive)
--   $3 agent           text         one agent_id, or NULL for every agent
--   $4 bucket_seconds  float8       bucket width in seconds (reporting.trend_bucket), rounded up to whole hours
--
-- Columns:
--   agent_id    text         the agent
--   bucket      timestamptz  start of the bucket
--   samples     bigint       score snapshots in the bucket
--   min_score   float8       lowest score
--   mean_score  float8       mean score of the snapshots
--   max_score   float8       highest score
WITH params AS (
    SELECT ceil(greatest($4::float8, 3600) / 3600) * 3600 AS width, s.covered_from, s.covered_to
    FROM warden.rollup_span('scores', $1::timestamptz, $2::timestamptz) s
),
hours AS (
    -- Rolled-up hours cover [covered_from, covered_to); snapshots the rest.
    -- The bounds are scalar subqueries, not a join, so that PostgreSQL
    -- skips the partitions and index ranges outside them.
    SELECT r.agent_id, r.hour_start AS at, r.samples::bigint AS samples,
           r.score_min, r.score_avg * r.samples AS score_sum, r.score_max
    FROM warden.score_rollups r
    WHERE r.hour_start >= (SELECT covered_from FROM params)
      AND r.hour_start < (SELECT covered_to FROM params)
      AND r.samples > 0
      AND ($3::text IS NULL OR r.agent_id = $3::text)
    UNION ALL
    SELECT h.agent_id, h.evaluated_at, 1, h.score, h.score, h.score
    FROM warden.health_history h
    WHERE h.evaluated_at >= $1::timestamptz
      AND h.evaluated_at < least((SELECT covered_from FROM params), $2::timestamptz)
      AND h.score IS NOT NULL
      AND ($3::text IS NULL OR h.agent_id = $3::text)
    UNION ALL
    SELECT h.agent_id, h.evaluated_at, 1, h.score, h.score, h.score
    FROM warden.health_history h
    WHERE h.evaluated_at >= (SELECT greatest(covered_to, covered_from) FROM params)
      AND h.evaluated_at < $2::timestamptz
      AND h.score IS NOT NULL
      AND ($3::text IS NULL OR h.agent_id = $3::text)
)
SELECT x.agent_id,
       to_timestamp(floor(extract(epoch FROM x.at) / p.width) * p.width) AS bucket,
       sum(x.samples)::bigint AS samples,
       min(x.score_min) AS min_score,
       sum(x.score_sum) / sum(x.samples) AS mean_score,
       max(x.score_max) AS max_score
FROM hours x, params p
GROUP BY x.agent_id, 2, p.width
ORDER BY x.agent_id, 2;
