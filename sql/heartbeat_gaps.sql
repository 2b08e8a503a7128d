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
WITH gaps AS (
    SELECT h.agent_id,
           h.received_at,
           extract(epoch FROM h.received_at - lag(h.received_at) OVER w)::float8 AS gap_seconds
    FROM warden.agent_heartbeats h
    WHERE h.received_at >= $1::timestamptz
      AND h.received_at < $2::timestamptz
      AND ($3::text IS NULL OR h.agent_id = $3::text)
    WINDOW w AS (PARTITION BY h.agent_id ORDER BY h.received_at)
),
-- One pass over the heartbeats in the order the window left them (a
-- second reading, or a join before grouping, would sort them all again).
-- Gap lengths are kept per agent, to be compared with the agent's interval
-- once it is joined.
per_agent AS (
    SELECT g.agent_id,
           count(*) AS heartbeats,
           max(g.received_at) AS last_at,
           avg(g.gap_seconds) AS mean_gap_seconds,
           array_agg(g.gap_seconds) FILTER (WHERE g.gap_seconds IS NOT NULL) AS gap_lengths,
           max(g.gap_seconds) AS longest_gap_seconds,
           -- the end of the longest gap, the earliest of equal ones
           (array_agg(g.received_at ORDER BY g.gap_seconds DESC, g.received_at)
                FILTER (WHERE g.gap_seconds IS NOT NULL))[1] AS longest_gap_to
    FROM gaps g
    GROUP BY g.agent_id
)
SELECT p.agent_id,
       p.heartbeats,
       s.expected_interval_ms / 1000.0::float8 AS expected_interval_seconds,
       p.mean_gap_seconds,
       p.longest_gap_seconds,
       p.longest_gap_to - p.longest_gap_seconds * interval '1 second' AS longest_gap_from,
       p.longest_gap_to,
       (SELECT count(*)
        FROM unnest(p.gap_lengths) AS l(seconds)
        WHERE l.seconds * 1000.0 > s.expected_interval_ms * (1 + hp.jitter_tolerance)) AS late_gaps,
       greatest(extract(epoch FROM least($2::timestamptz, now()) - p.last_at), 0)::float8 AS trailing_silence_seconds
FROM per_agent p
LEFT JOIN warden.agent_status s ON s.agent_id = p.agent_id
LEFT JOIN warden.health_params hp ON true
ORDER BY p.longest_gap_seconds DESC NULLS LAST, p.agent_id
LIMIT $4::bigint;
