-- Ingestion keeps an agent's statistics meaningful across a change of
-- its expected interval, and a batch of buffered heartbeats no longer
-- counts as a run of on-time ones. Same signature and otherwise the same
-- statements as V11 (a function is replaced whole).
--
-- - Mode switch (sleep 15 min -> active 30 s, or a new next_heartbeat_ms):
--   the inter-arrival mean and variance are rescaled by new / old interval
--   (their coefficient of variation, which scores jitter, is unchanged).
--   Before, an agent waking from sleep read as badly jittery for dozens of
--   beats, and phi judged it on a variance learnt at the old scale.
-- - Delivery (heartbeats received / expected over the last hour, both
--   decayed) needs what was expected under each interval in force, not
--   the current interval applied to the agent's whole life: a new column,
--   beats_expected, accumulates it heartbeat by heartbeat as beats_decayed
--   accumulates what arrived. Before, an agent waking from a 15 minute
--   sleep was held to 120 heartbeats an hour it had never owed, and read
--   as missing most of them for an hour. beats_decayed itself is left the
--   heartbeats really received: it is also the unit errors are counted
--   against when an agent has no work metric.
-- - Heartbeats under 10 ms apart (one request's, or one flush's) leave the
--   on-time run where it was, as they already left the inter-arrival
--   statistics alone: two buffered beats sent together after an outage
--   are not two on-time beats, and so not a recovery.

-- Heartbeats expected of the agent over its life, decayed with a one-hour
-- time constant, as at last_seen: each gap adds what its interval called
-- for (3600 s / interval at the steady state). Existing agents start from
-- what their current interval, held since first_seen, would have given.
--
-- components must stay the row's last column (V14: a heartbeat then logs
-- the bytes it changes, not the score breakdown behind them), so it moves
-- behind the new column as V14 moved it, rewriting every row once under
-- ALTER TABLE's lock: seconds per 100,000 agents, heartbeats waiting.
SET LOCAL lock_timeout = '10s';
ALTER TABLE warden.agent_status ADD COLUMN beats_expected double precision NOT NULL DEFAULT 0;
ALTER TABLE warden.agent_status ADD COLUMN components_moved jsonb;
UPDATE warden.agent_status
SET beats_expected = 3600000.0::float8 / expected_interval_ms
                     * (1 - exp(-greatest(date_part('epoch', last_seen - first_seen), 0) / 3600.0::float8)),
    components_moved = components, components = NULL;
ALTER TABLE warden.agent_status DROP COLUMN components;
ALTER TABLE warden.agent_status RENAME COLUMN components_moved TO components;
RESET lock_timeout;

-- The interval an agent is expected at after a heartbeat: the one it gave
-- (next_heartbeat_ms, else its mode's), else its recorded mode's default,
-- else 30 s. A plain SQL expression, inlined where it is used.
CREATE FUNCTION warden.interval_after(
    given integer, agent_mode text,
    default_ms integer, emergency_ms integer, active_ms integer, idle_ms integer, sleep_ms integer
)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(given,
                    CASE coalesce(agent_mode, 'default')
                        WHEN 'emergency' THEN emergency_ms WHEN 'active' THEN active_ms
                        WHEN 'idle' THEN idle_ms WHEN 'sleep' THEN sleep_ms
                        WHEN 'default' THEN default_ms END,
                    30000)
$$;

-- Applies a batch of heartbeats, in array order, in the caller's
-- transaction.
--
-- Parallel arrays hold one element per heartbeat; metrics are flattened
-- into their own parallel arrays, p_metric_idx pointing (1-based) at the
-- heartbeat each belongs to. Returns one row per heartbeat (idx is its
-- position), in no particular order.
--
-- Several heartbeats of one agent are applied in order: the batch is cut
-- into rounds, round k holding every agent's k-th heartbeat, and the
-- rounds run one after another, each seeing the one before. Restart
-- detection thus compares each uptime with the one before it, and
-- agent_status ends with the last values. Round k is received one
-- microsecond after round k-1, so received_at keeps the order too. Most
-- batches are one round.
--
-- Known agents are UPDATEd, and every decision that depends on the
-- agent's previous state (restart detection, the mode an omitted mode
-- falls back to) is made in the SET clause from the row as locked by that
-- UPDATE, so a concurrent writer can never make it compare against stale
-- values. New agents are inserted; if another writer registered the same
-- agent an instant earlier, ON CONFLICT turns the insert into the same
-- update.
--
-- p_occurrence, when given, must hold for each heartbeat its number among
-- its agent's heartbeats in the batch (1 for the first); when NULL it is
-- computed here. Only its length is checked: numbering one agent's
-- heartbeats alike would apply them in no defined order.
--
-- Callers validate first; the table constraints are the backstop.
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
    p_received_at  timestamptz DEFAULT NULL,
    p_occurrence   integer[] DEFAULT NULL
)
RETURNS TABLE (idx integer, is_new boolean, restart_detected boolean, next_heartbeat_ms integer)
LANGUAGE plpgsql
-- The statements' best plans do not depend on the arrays' contents, and
-- planning the large one afresh per call cost more than running it. Its
-- generic plan's row estimates are pessimistic enough to trigger JIT
-- compilation, seconds per call on a statement that runs in microseconds.
-- Sequential and bitmap scans are ruled out because every access to
-- agent_status here is by agent_id: the primary key index is right at
-- any fleet size (a plan cached while the table was small would otherwise
-- keep scanning it all as it grows), and it keeps the lock order above.
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    ts         timestamptz := coalesce(p_received_at, now());
    tol        double precision;
    off_after  integer;
    n          integer := cardinality(p_agent_id);
    default_ms integer;
    emergency_ms integer;
    active_ms  integer;
    idle_ms    integer;
    sleep_ms   integer;
    rounds     integer := 1;
    occurrence integer[] := p_occurrence;
    r_ts       timestamptz;
    r_ord      integer[];
    r_agent_id text[];
    r_name     text[];
    r_labels   jsonb[];
    r_mode     text[];
    r_status   text[];
    r_uptime   bigint[];
    r_next_ms  integer[];
    r_sent_at  timestamptz[];
    done_i       integer[];
    done_restart boolean[];
    done_next    integer[];
    missing      integer[];
    answered     integer := 0;
    got          integer;
BEGIN
    SELECT hp.jitter_tolerance, hp.offline_after_missed INTO tol, off_after FROM warden.health_params hp;
    -- default_ms stays NULL without a 'default' row: a heartbeat without a
    -- mode from an agent without one then falls back to 30 s, as before.
    SELECT max(m.interval_ms) FILTER (WHERE m.mode = 'default'),
           max(m.interval_ms) FILTER (WHERE m.mode = 'emergency'),
           max(m.interval_ms) FILTER (WHERE m.mode = 'active'),
           max(m.interval_ms) FILTER (WHERE m.mode = 'idle'),
           max(m.interval_ms) FILTER (WHERE m.mode = 'sleep')
    INTO default_ms, emergency_ms, active_ms, idle_ms, sleep_ms
    FROM warden.mode_intervals m;

    IF cardinality(p_metric_idx) > 0 THEN
        INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value, unit)
        SELECT p_agent_id[m.i], ts, m.name, m.value, m.unit
        FROM unnest(p_metric_idx, p_metric_name, p_metric_value, p_metric_unit) AS m(i, name, value, unit);
    END IF;

    IF n > 1 THEN
        -- occurrence[i]: heartbeat i is its agent's occurrence[i]-th in the batch.
        IF occurrence IS NULL THEN
            SELECT array_agg(o.k ORDER BY o.ord)
            INTO occurrence
            FROM (SELECT u.ord, row_number() OVER (PARTITION BY u.agent_id COLLATE "C" ORDER BY u.ord)::integer AS k
                  FROM unnest(p_agent_id) WITH ORDINALITY AS u(agent_id, ord)) o;
        ELSIF cardinality(occurrence) <> n THEN
            RAISE EXCEPTION 'p_occurrence has % elements for % heartbeats', cardinality(occurrence), n
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT max(k) INTO rounds FROM unnest(occurrence) AS k;
    END IF;

    FOR round_no IN 1..rounds LOOP
        r_ts := ts + (round_no - 1) * interval '1 microsecond';
        IF rounds = 1 THEN
            r_ord := NULL;
            r_agent_id := p_agent_id; r_name := p_name; r_labels := p_labels; r_mode := p_mode;
            r_status := p_status; r_uptime := p_uptime; r_next_ms := p_next_ms; r_sent_at := p_sent_at;
        ELSE
            SELECT array_agg(o.ord::integer ORDER BY o.ord) INTO r_ord
            FROM unnest(occurrence) WITH ORDINALITY AS o(nth, ord)
            WHERE o.nth = round_no;
            SELECT array_agg(p_agent_id[o] ORDER BY n), array_agg(p_name[o] ORDER BY n),
                   array_agg(p_labels[o] ORDER BY n), array_agg(p_mode[o] ORDER BY n),
                   array_agg(p_status[o] ORDER BY n), array_agg(p_uptime[o] ORDER BY n),
                   array_agg(p_next_ms[o] ORDER BY n), array_agg(p_sent_at[o] ORDER BY n)
            INTO r_agent_id, r_name, r_labels, r_mode, r_status, r_uptime, r_next_ms, r_sent_at
            FROM unnest(r_ord) WITH ORDINALITY AS x(o, n);
        END IF;

        -- Known agents: the statement that runs for almost every heartbeat.
        WITH hb AS MATERIALIZED (
            SELECT u.ord::integer AS i, u.agent_id COLLATE "C" AS agent_id, u.name, u.labels, u.mode,
                   coalesce(u.status, 'healthy') AS status, u.uptime, u.next_ms, u.sent_at,
                   coalesce(u.next_ms, CASE u.mode WHEN 'emergency' THEN emergency_ms WHEN 'active' THEN active_ms
                                                   WHEN 'idle' THEN idle_ms WHEN 'sleep' THEN sleep_ms END) AS given_ms
            FROM unnest(r_agent_id, r_name, r_labels, r_mode, r_status, r_uptime, r_next_ms, r_sent_at)
                 WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
            ORDER BY u.agent_id COLLATE "C"
        ),
        upd AS (
            UPDATE warden.agent_status s SET
                name                  = coalesce(h.name, s.name),
                labels                = coalesce(h.labels, s.labels),
                mode                  = coalesce(h.mode, s.mode),
                status                = h.status,
                expected_interval_ms  = warden.interval_after(h.given_ms, s.mode, default_ms, emergency_ms,
                                                              active_ms, idle_ms, sleep_ms),
                last_seen             = r_ts,
                last_sent_at          = h.sent_at,
                uptime_seconds        = coalesce(h.uptime, s.uptime_seconds),
                heartbeat_count       = s.heartbeat_count + 1,
                restart_count         = s.restart_count + coalesce((h.uptime < s.uptime_seconds)::integer, 0),
                last_restart_at       = CASE WHEN h.uptime < s.uptime_seconds THEN r_ts ELSE s.last_restart_at END,
                uptime_before_restart = CASE WHEN h.uptime < s.uptime_seconds THEN s.uptime_seconds
                                             ELSE s.uptime_before_restart END,
                -- On time: within the expected interval plus the tolerance.
                -- Every heartbeat counts as one; on-time ones extend the run.
                -- Heartbeats of one batch (under 10 ms apart) count once:
                -- an agent that comes back with a buffer of them has shown
                -- one on-time beat, not a run.
                ontime_streak         = CASE WHEN date_part('epoch', r_ts - s.last_seen) * 1000 < 10
                                             THEN s.ontime_streak
                                             WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                                  <= s.expected_interval_ms * (1 + tol)
                                             THEN s.ontime_streak + 1 ELSE 1 END,
                -- Inter-arrival statistics leave out outages (gaps past the
                -- offline threshold) and heartbeats of one batch (under 10 ms),
                -- which say nothing about the agent's rhythm. The weight is a
                -- plain average for the first 20 samples, then exponential.
                -- When the expected interval changes (a mode switch), mean
                -- and variance are rescaled to it, keeping their coefficient
                -- of variation: learnt at 15 minutes, they would otherwise
                -- read a 30 s rhythm as wild jitter for dozens of beats. The
                -- heartbeat that makes the switch ends a gap of the old
                -- rhythm, so its sample is taken before the rescaling.
                ia_count              = s.ia_count + CASE WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                             BETWEEN 10 AND s.expected_interval_ms * (off_after + tol) THEN 1 ELSE 0 END,
                ia_mean_ms            = CASE WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                                  BETWEEN 10 AND s.expected_interval_ms * (off_after + tol)
                                             THEN s.ia_mean_ms + greatest(1.0::float8 / (s.ia_count + 1), 0.05::float8)
                                                  * (date_part('epoch', r_ts - s.last_seen) * 1000 - s.ia_mean_ms)
                                             ELSE s.ia_mean_ms END
                                        * warden.interval_after(h.given_ms, s.mode, default_ms, emergency_ms, active_ms, idle_ms, sleep_ms)::float8
                                        / s.expected_interval_ms,
                ia_var_ms2            = CASE WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                                  BETWEEN 10 AND s.expected_interval_ms * (off_after + tol)
                                             THEN (1.0::float8 - greatest(1.0::float8 / (s.ia_count + 1), 0.05::float8))
                                                  * (s.ia_var_ms2 + greatest(1.0::float8 / (s.ia_count + 1), 0.05::float8)
                                                     * power(date_part('epoch', r_ts - s.last_seen) * 1000
                                                             - s.ia_mean_ms, 2))
                                             ELSE s.ia_var_ms2 END
                                        * power(warden.interval_after(h.given_ms, s.mode, default_ms, emergency_ms, active_ms, idle_ms, sleep_ms)::float8
                                        / s.expected_interval_ms, 2),
                beats_decayed         = s.beats_decayed * exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8)) + 1,
                -- The gap just ended was owed at the interval in force during it.
                beats_expected        = s.beats_expected * exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8))
                                        + 3600000.0::float8 / s.expected_interval_ms
                                          * (1 - exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8)))
            FROM hb h
            WHERE s.agent_id = h.agent_id
            RETURNING h.i, s.agent_id, s.last_restart_at IS NOT DISTINCT FROM r_ts AS restart,
                      s.uptime_before_restart, s.uptime_seconds, s.expected_interval_ms,
                      h.sent_at, h.mode, h.status, h.uptime, h.next_ms
        ),
        ins_heartbeats AS (
            INSERT INTO warden.agent_heartbeats
                (agent_id, received_at, sent_at, mode, status, uptime_seconds, next_heartbeat_ms, restart_detected)
            SELECT u.agent_id, r_ts, u.sent_at, u.mode, u.status, u.uptime, u.next_ms, u.restart
            FROM upd u
        ),
        ins_events AS (
            INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
            SELECT r_ts, d.agent_id, 'agent_restarted', 'info',
                   format('agent restarted: uptime went from %ss to %ss', d.uptime_before_restart, d.uptime_seconds),
                   jsonb_build_object('previous_uptime_seconds', d.uptime_before_restart,
                                      'uptime_seconds', d.uptime_seconds)
            FROM upd d
            WHERE d.restart
        )
        SELECT array_agg(u.i), array_agg(u.restart), array_agg(u.expected_interval_ms), count(*)
        INTO done_i, done_restart, done_next, got
        FROM upd u;

        RETURN QUERY
        SELECT coalesce(r_ord[d.i], d.i), false, d.restart, d.next_ms
        FROM unnest(done_i, done_restart, done_next) AS d(i, restart, next_ms);
        answered := answered + got;

        CONTINUE WHEN got = cardinality(r_agent_id);

        SELECT array_agg(g.i ORDER BY g.i) INTO missing
        FROM generate_series(1, cardinality(r_agent_id)) AS g(i)
        WHERE g.i NOT IN (SELECT d FROM unnest(done_i) AS d);

        -- Agents not seen before (or removed since): register them. Their
        -- heartbeats become this round's arrays, mapped back to positions
        -- in the batch through r_ord.
        SELECT array_agg(coalesce(r_ord[o], o) ORDER BY n), array_agg(r_agent_id[o] ORDER BY n),
               array_agg(r_name[o] ORDER BY n), array_agg(r_labels[o] ORDER BY n), array_agg(r_mode[o] ORDER BY n),
               array_agg(r_status[o] ORDER BY n), array_agg(r_uptime[o] ORDER BY n),
               array_agg(r_next_ms[o] ORDER BY n), array_agg(r_sent_at[o] ORDER BY n)
        INTO r_ord, r_agent_id, r_name, r_labels, r_mode, r_status, r_uptime, r_next_ms, r_sent_at
        FROM unnest(missing) WITH ORDINALITY AS x(o, n);

        RETURN QUERY
        WITH hb AS MATERIALIZED (
            SELECT u.ord::integer AS i, u.agent_id COLLATE "C" AS agent_id, u.name, u.labels, u.mode,
                   coalesce(u.status, 'healthy') AS status, u.uptime, u.next_ms, u.sent_at,
                   CASE u.mode WHEN 'emergency' THEN emergency_ms WHEN 'active' THEN active_ms
                               WHEN 'idle' THEN idle_ms WHEN 'sleep' THEN sleep_ms END AS mode_ms
            FROM unnest(r_agent_id, r_name, r_labels, r_mode, r_status, r_uptime, r_next_ms, r_sent_at)
                 WITH ORDINALITY AS u(agent_id, name, labels, mode, status, uptime, next_ms, sent_at, ord)
            ORDER BY u.agent_id COLLATE "C"
        ),
        ins AS (
            INSERT INTO warden.agent_status AS s
                (agent_id, name, labels, mode, status, expected_interval_ms, first_seen, last_seen,
                 last_sent_at, uptime_seconds, heartbeat_count, restart_count, liveness_since,
                 ontime_streak, beats_decayed)
            SELECT h.agent_id, h.name, coalesce(h.labels, '{}'::jsonb), h.mode, h.status,
                   coalesce(h.next_ms, h.mode_ms, default_ms, 30000), r_ts, r_ts, h.sent_at, h.uptime, 1, 0, r_ts, 1, 1
            FROM hb h
            ORDER BY h.agent_id
            ON CONFLICT (agent_id) DO UPDATE SET
                name                  = coalesce(EXCLUDED.name, s.name),
                labels                = CASE WHEN EXCLUDED.labels = '{}'::jsonb THEN s.labels ELSE EXCLUDED.labels END,
                mode                  = coalesce(EXCLUDED.mode, s.mode),
                status                = EXCLUDED.status,
                expected_interval_ms  = EXCLUDED.expected_interval_ms,
                last_seen             = r_ts,
                last_sent_at          = EXCLUDED.last_sent_at,
                uptime_seconds        = coalesce(EXCLUDED.uptime_seconds, s.uptime_seconds),
                heartbeat_count       = s.heartbeat_count + 1,
                restart_count         = s.restart_count
                                        + coalesce((EXCLUDED.uptime_seconds < s.uptime_seconds)::integer, 0),
                last_restart_at       = CASE WHEN EXCLUDED.uptime_seconds < s.uptime_seconds THEN r_ts
                                             ELSE s.last_restart_at END,
                uptime_before_restart = CASE WHEN EXCLUDED.uptime_seconds < s.uptime_seconds THEN s.uptime_seconds
                                             ELSE s.uptime_before_restart END,
                ontime_streak         = s.ontime_streak + 1,
                beats_decayed         = s.beats_decayed * exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8)) + 1,
                beats_expected        = s.beats_expected * exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8))
                                        + 3600000.0::float8 / s.expected_interval_ms
                                          * (1 - exp(greatest(-date_part('epoch', r_ts - s.last_seen) / 3600.0::float8, -700.0::float8)))
            RETURNING s.agent_id, s.heartbeat_count = 1 AS fresh, s.last_restart_at IS NOT DISTINCT FROM r_ts AS restart,
                      s.uptime_before_restart, s.uptime_seconds, s.mode, s.expected_interval_ms
        ),
        done AS (
            SELECT h.i, n.agent_id, n.fresh, n.restart, n.uptime_before_restart, n.uptime_seconds, n.mode AS agent_mode,
                   n.expected_interval_ms, h.sent_at, h.mode, h.status, h.uptime, h.next_ms
            FROM ins n
            JOIN hb h ON h.agent_id = n.agent_id
        ),
        ins_heartbeats AS (
            INSERT INTO warden.agent_heartbeats
                (agent_id, received_at, sent_at, mode, status, uptime_seconds, next_heartbeat_ms, restart_detected)
            SELECT d.agent_id, r_ts, d.sent_at, d.mode, d.status, d.uptime, d.next_ms, d.restart
            FROM done d
        ),
        ins_events AS (
            INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details)
            SELECT r_ts, d.agent_id, 'agent_restarted', 'info',
                   format('agent restarted: uptime went from %ss to %ss', d.uptime_before_restart, d.uptime_seconds),
                   jsonb_build_object('previous_uptime_seconds', d.uptime_before_restart,
                                      'uptime_seconds', d.uptime_seconds)
            FROM done d
            WHERE d.restart
            UNION ALL
            SELECT r_ts, d.agent_id, 'agent_registered', 'info',
                   format('agent registered (mode %s, expecting a heartbeat every %s ms)',
                          coalesce(d.agent_mode, 'unset'), d.expected_interval_ms),
                   jsonb_build_object('mode', d.agent_mode, 'expected_interval_ms', d.expected_interval_ms)
            FROM done d
            WHERE d.fresh
        )
        SELECT coalesce(r_ord[d.i], d.i), d.fresh, d.restart, d.expected_interval_ms
        FROM done d;
        GET DIAGNOSTICS got = ROW_COUNT;
        answered := answered + got;
    END LOOP;

    -- Every heartbeat is either an update or an insert (ON CONFLICT DO
    -- UPDATE always returns its row). Should one ever fall through, fail
    -- the whole call rather than let a caller acknowledge a heartbeat that
    -- was not written.
    IF answered <> n THEN
        RAISE EXCEPTION 'ingest_heartbeats wrote % of % heartbeats', answered, n
            USING ERRCODE = 'internal_error';
    END IF;

    -- Almost always nobody watches: one look at an empty table.
    IF EXISTS (SELECT 1 FROM warden.observed_agents) THEN
        PERFORM pg_notify('warden_heartbeats', json_build_object(
                    'agent_id', u.agent_id, 'received_at', ts, 'status', coalesce(u.status, 'healthy'),
                    'mode', u.mode, 'uptime_seconds', u.uptime, 'next_heartbeat_ms', u.next_ms)::text)
        FROM unnest(p_agent_id, p_status, p_mode, p_uptime, p_next_ms) AS u(agent_id, status, mode, uptime, next_ms)
        JOIN warden.observed_agents o ON o.agent_id = u.agent_id AND o.until > ts;
    END IF;
END;
$$;

