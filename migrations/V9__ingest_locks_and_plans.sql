-- Ingestion at fleet scale. Every transaction that changes several
-- agent_status rows locks them in agent_id order first, so concurrent ones
-- wait for each other instead of deadlocking. The evaluator does so in its own statements; ingestion does
-- it here, in a new version of ingest_heartbeats (otherwise as in V2).

CREATE OR REPLACE FUNCTION warden.ingest_heartbeats(
    p_agent_id     text[],
    p_name         text[],
    p_labels       jsonb[],
    p_mode         text[],
    p_status       text[],
    p_uptime       bigint[],
    p_next_ms      integer[],
    p_sent_at      timestamptz[],
    p_metric_idx   integer[],
    p_metric_name  text[],
    p_metric_value double precision[],
    p_metric_unit  text[],
    p_received_at  timestamptz DEFAULT NULL
)
RETURNS TABLE (idx integer, is_new boolean, restart_detected boolean, next_heartbeat_ms integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ts     timestamptz := coalesce(p_received_at, now());
    rounds integer;
BEGIN
    IF cardinality(p_metric_idx) > 0 THEN
        INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value, unit)
        SELECT p_agent_id[m.i], ts, m.name, m.value, m.unit
        FROM unnest(p_metric_idx, p_metric_name, p_metric_value, p_metric_unit) AS m(i, name, value, unit);
    END IF;

    IF cardinality(p_agent_id) > 1 THEN
        -- Lock the agents' rows in agent_id order before touching them.
        -- The UPDATE below locks in whatever order its plan visits rows;
        -- two writers (or a writer and the evaluator) locking overlapping
        -- sets in different orders deadlock, and PostgreSQL only breaks
        -- that after deadlock_timeout, a one-second stall for everyone.
        PERFORM 1 FROM warden.agent_status WHERE agent_id = ANY (p_agent_id)
        ORDER BY agent_id FOR NO KEY UPDATE;
        SELECT max(c) INTO rounds FROM (SELECT count(*) AS c FROM unnest(p_agent_id) a GROUP BY a) per_agent;
    END IF;

    IF coalesce(rounds, 1) = 1 THEN
        RETURN QUERY
        SELECT * FROM warden.ingest_round(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at, ts);
        RETURN;
    END IF;

    FOR k IN 1..rounds LOOP
        RETURN QUERY
        WITH numbered AS (
            SELECT u.*, row_number() OVER (PARTITION BY u.agent_id ORDER BY u.ord) AS occurrence
            FROM unnest(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime, p_next_ms, p_sent_at)
                 WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
        ),
        round AS (
            SELECT array_agg(n.ord::integer ORDER BY n.ord) AS ords,
                   array_agg(n.agent_id ORDER BY n.ord) AS agent_id, array_agg(n.name ORDER BY n.ord) AS name,
                   array_agg(n.labels ORDER BY n.ord) AS labels, array_agg(n.mode ORDER BY n.ord) AS mode,
                   array_agg(n.status ORDER BY n.ord) AS status, array_agg(n.uptime ORDER BY n.ord) AS uptime,
                   array_agg(n.next_ms ORDER BY n.ord) AS next_ms, array_agg(n.sent_at ORDER BY n.ord) AS sent_at
            FROM numbered n
            WHERE n.occurrence = k
        )
        SELECT rd.ords[r.idx], r.is_new, r.restart_detected, r.next_heartbeat_ms
        FROM round rd,
             warden.ingest_round(rd.agent_id, rd.name, rd.labels, rd.mode, rd.status, rd.uptime,
                                 rd.next_ms, rd.sent_at, ts + (k - 1) * interval '1 microsecond') r;
    END LOOP;
END;
$$;

-- The ingest statements join the one-row health_params and the five-row
-- mode_intervals. Never analysed, they are guessed at two thousand rows
-- each, and the cached generic plan of ingest_round then hash-joins a
-- sequential scan of all of agent_status for every batch: a cost that grows
-- with the fleet (50 ms per batch at 10,000 agents). With statistics the
-- plan is an index lookup per heartbeat. `warden serve` analyses them again
-- after writing its settings into them, so a restored database heals too.
ANALYZE warden.health_params;
ANALYZE warden.mode_intervals;

-- Statistics alone are not enough: ingest_round runs a cached generic plan,
-- made on a session's first calls. A session that starts while
-- agent_status is small caches a sequential scan of it and keeps that
-- plan as the fleet grows, until something analyses agent_status again
-- (never, where autovacuum is off). Every access to agent_status in
-- ingest_round is by agent_id, for which the primary key index is right at
-- any size, so sequential scans are ruled out for this function, and for
-- ingest_heartbeats, whose lock step above looks agents up the same way.
ALTER FUNCTION warden.ingest_round SET enable_seqscan = off;
ALTER FUNCTION warden.ingest_heartbeats SET enable_seqscan = off;
