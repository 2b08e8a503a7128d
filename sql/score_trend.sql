-- score_trend: each agent's health score over time, in fixed-width buckets.
--
-- Purpose: how agents' scores moved over the range, from the snapshots in
--   warden.health_history (one on every liveness or tier change, otherwise
--   one per health.history_interval). Figures are over the snapshots in
--   each bucket, not weighted by time; buckets without a snapshot are
--   absent. Buckets are aligned to the Unix epoch, so a 1h bucket starts on
--   the hour (UTC).
--
-- Parameters:
--   $1 since           timestamptz  start of the range (inclusive)
--   $2 until           timestamptz  end of the range (exclusive)
--   $3 agent           text         one agent_id, or NULL for every agent
--   $4 bucket_seconds  float8       bucket width in seconds (reporting.trend_bucket)
--
-- Columns:
--   agent_id     text         the agent
--   bucket       timestamptz  start of the bucket
--   samples      bigint       snapshots in the bucket
--   mean_score   float8       mean score of those snapshots
--   min_score    float8       lowest score
--   max_score    float8       highest score
--   last_score   float8       score at the last snapshot of the bucket
--   last_tier    text         tier at the last snapshot of the bucket
--   change       float8       last_score minus the previous bucket's last_score (NULL for the first)
WITH bucketed AS (
    SELECT h.agent_id,
           to_timestamp(floor(extract(epoch FROM h.evaluated_at) / $4::float8) * $4::float8) AS bucket,
           h.evaluated_at,
           h.score,
           h.tier
    FROM warden.health_history h
    WHERE h.evaluated_at >= $1::timestamptz
      AND h.evaluated_at < $2::timestamptz
      AND h.score IS NOT NULL
      AND ($3::text IS NULL OR h.agent_id = $3::text)
),
per_bucket AS (
    SELECT b.agent_id,
           b.bucket,
           count(*) AS samples,
           avg(b.score) AS mean_score,
           min(b.score) AS min_score,
           max(b.score) AS max_score,
           (array_agg(b.score ORDER BY b.evaluated_at DESC))[1] AS last_score,
           (array_agg(b.tier ORDER BY b.evaluated_at DESC))[1] AS last_tier
    FROM bucketed b
    GROUP BY b.agent_id, b.bucket
)
SELECT p.agent_id,
       p.bucket,
       p.samples,
       p.mean_score,
       p.min_score,
       p.max_score,
       p.last_score,
       p.last_tier,
       p.last_score - lag(p.last_score) OVER (PARTITION BY p.agent_id ORDER BY p.bucket) AS change
FROM per_bucket p
ORDER BY p.agent_id, p.bucket;
