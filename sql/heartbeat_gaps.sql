-- heartbeat_gaps: the longest silence between consecutive heartbeats of each agent over the range.
--
-- Purpose: where heartbeats went missing. For every agent with heartbeats
--   in the range, the gaps between consecutive heartbeats (window function
--   lag over agent_heartbeats), the longest one and when it was, how many
--   gaps were late (longer than the expected interval plus the jitter
--   tolerance in warden.health_params), and the silence from the last
--   heartbeat to the end of the range (clipped to now()), which may still
--   be going on. Only heartbeats within the range are looked at, so a gap
--   that began before it is counted from the first heartbeat inside it.
--   Sorted by the longest gap, longest first.
--
-- Parameters:
--   $1 since  timestamptz  start of the range (inclusive)
--   $2 until  timestamptz  end of the range (exclusive)
--   $3 agent  text         one agent_id, or NULL for every agent
--   $4 limit  bigint       most rows to return (reporting.top_n)
--
-- Columns:
--   agent_id                   text         the agent
--   heartbeats                 bigint       heartbeats received within the range
--   expected_interval_seconds  float8       the agent's current expected interval
--   mean_gap_seconds           float8       mean time between consecutive heartbeats
--   longest_gap_seconds        float8       the longest time between two consecutive heartbeats
--   longest_gap_from           timestamptz  the heartbeat before that gap
--   longest_gap_to             timestamptz  the heartbeat after it
--   late_gaps                  bigint       gaps longer than expected interval x (1 + jitter tolerance)
--   trailing_silence_seconds   float8       from the last heartbeat in the range to the range's end (or now)
WITH beats AS (
    SELECT h.agent_id,
           h.received_at,
           lag(h.received_at) OVER (PARTITION BY h.agent_id ORDER BY h.received_at) AS previous_at
    FROM warden.agent_heartbeats h
    WHERE h.received_at >= $1::timestamptz
      AND h.received_at < $2::timestamptz
      AND ($3::text IS NULL OR h.agent_id = $3::text)
),
gaps AS (
    SELECT b.agent_id, b.previous_at, b.received_at,
           extract(epoch FROM b.received_at - b.previous_at)::float8 AS gap_seconds
    FROM beats b
    WHERE b.previous_at IS NOT NULL
),
longest AS (
    SELECT DISTINCT ON (g.agent_id) g.agent_id, g.gap_seconds, g.previous_at, g.received_at
    FROM gaps g
    ORDER BY g.agent_id, g.gap_seconds DESC, g.received_at
),
per_agent AS (
    SELECT b.agent_id, count(*) AS heartbeats, max(b.received_at) AS last_at
    FROM beats b
    GROUP BY b.agent_id
)
SELECT p.agent_id,
       p.heartbeats,
       s.expected_interval_ms / 1000.0::float8 AS expected_interval_seconds,
       (SELECT avg(g.gap_seconds) FROM gaps g WHERE g.agent_id = p.agent_id) AS mean_gap_seconds,
       l.gap_seconds AS longest_gap_seconds,
       l.previous_at AS longest_gap_from,
       l.received_at AS longest_gap_to,
       (SELECT count(*)
        FROM gaps g
        WHERE g.agent_id = p.agent_id
          AND g.gap_seconds * 1000.0 > s.expected_interval_ms * (1 + hp.jitter_tolerance)) AS late_gaps,
       greatest(extract(epoch FROM least($2::timestamptz, now()) - p.last_at), 0)::float8 AS trailing_silence_seconds
FROM per_agent p
LEFT JOIN longest l ON l.agent_id = p.agent_id
LEFT JOIN warden.agent_status s ON s.agent_id = p.agent_id
LEFT JOIN warden.health_params hp ON true
ORDER BY l.gap_seconds DESC NULLS LAST, p.agent_id
LIMIT $4::bigint;
