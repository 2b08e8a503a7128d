-- warden schema, version 35: a heartbeat delivered after a newer one is
-- not a restart; a heartbeat is on time until it would have been late; a
-- heartbeat committed after a transition counts as one since it.
--
-- On time. The on-time run (ontime_streak), which takes a degraded or
-- offline agent back online, grew only with gaps within interval x (1 +
-- jitter_tolerance), while an agent is late only past interval x
-- (degraded_after_missed + jitter_tolerance). With degraded_after_missed
-- above 1, an agent beating every 1.5 intervals was never late, yet never
-- on time: after one late beat it stayed degraded for ever. The bound is
-- now the one lateness uses, published by `warden serve` to
-- health_params.degraded_after_missed (1 until it does, as before). With
-- the phi detector, which judges an agent by its learned rhythm once it
-- has phi_min_samples gaps within a factor of 2 of the interval it
-- announces, a gap within that rhythm's mean plus the tolerance is on
-- time too: an agent beating every 1.5 announced intervals, which phi
-- rightly finds fine, was otherwise never on time again after one late
-- verdict. health_params.detector and phi_min_samples say which rule.
--
-- A restart starts a new on-time run: the run of the process it replaced
-- vouched for the new one, so a restarted agent was back online, and a
-- recovery verified, on the new process's first beat.
--
-- Committed after a transition. A flush stamps its heartbeats when it
-- begins; one that waited on another agent's row lock could commit after
-- a liveness cycle had judged (say, taken offline) an agent it carried,
-- with last_seen before that transition: the evaluator, which takes a
-- heartbeat after the transition as the sign to reconsider, ignored it
-- until the agent's next one (a whole interval: 15 minutes in sleep
-- mode, and extended_offline with a recovery meanwhile). last_seen is now
-- at least a microsecond past liveness_since.
--
-- Late heartbeats. Two heartbeats of one agent in flight at once (a
-- stalled request overtaken by the agent's next one, a retry through another replica,
-- parallel senders, requests held up together by a stalled database) can
-- commit in either order. When the older one came second, its lower
-- uptime read as a restart: an agent_restarted event, a restart counted
-- towards restart_loop, and the agent's uptime, mode and status set back
-- to what they had been. One from before a restart, committed after the
-- restarted agent's first heartbeat, set the uptime back up, so the next
-- heartbeat read as a second restart.
--
-- A heartbeat is late when its sent_at is earlier than the last one's and
-- either its uptime is lower and its run did not start later than the
-- last one's (sent_at minus uptime, within 2 s for whole-second uptimes
-- and two clocks read apart), or it was sent before the last one's run
-- began (more than 2 s before the last sent_at minus the last uptime):
-- it comes from that run or an earlier one. A real restart is still seen
-- when the host's clock went back meanwhile by less than the previous run
-- had lasted, and a clock set back within a run makes nothing late unless
-- it goes back past the run's start. A late heartbeat arrives like any
-- other (stored, counted, seen, and in the on-time run and the rhythm and
-- delivery statistics), but changes nothing the agent reports (uptime,
-- sent_at, mode, status, name, labels, interval) and is no restart.
-- Without sent_at on both and an uptime on the last one, nothing is late,
-- and heartbeats apply in commit order as before.
--
-- Otherwise V31's function, replaced whole. Lateness is decided in the
-- one UPDATE, column by column, so that every row is locked there in
-- agent_id order (a second UPDATE for late rows would lock them out of
-- that order, and could deadlock with another writer or the evaluator);
-- the inlined comparison stops at its first step unless sent_at went
-- backwards.
ALTER TABLE warden.health_params
    ADD COLUMN degraded_after_missed integer NOT NULL DEFAULT 1 CHECK (degraded_after_missed >= 1),
    ADD COLUMN detector text NOT NULL DEFAULT 'fixed' CHECK (detector IN ('fixed', 'phi')),
    ADD COLUMN phi_min_samples integer NOT NULL DEFAULT 10 CHECK (phi_min_samples >= 1);

CREATE FUNCTION warden.heartbeat_late(
    uptime bigint, sent_at timestamptz, last_uptime bigint, last_sent_at timestamptz
)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- Called for several columns of every heartbeat: without sent_at on
    -- both sides, or in order, the first comparison settles it.
    SELECT CASE WHEN sent_at < last_sent_at
                THEN coalesce((uptime < last_uptime
                               AND date_part('epoch', last_sent_at - sent_at) >= last_uptime - uptime - 2)
                              OR date_part('epoch', last_sent_at - sent_at) > last_uptime + 2,
                              false)
                ELSE false END
$$;

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
    late_after integer;
    phi        boolean;
    phi_after  integer;
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
    done_fresh   boolean[];
    done_restart boolean[];
    done_next    integer[];
    missing      integer[];
    answered     integer := 0;
    got          integer;
BEGIN
    SELECT hp.jitter_tolerance, hp.offline_after_missed, hp.degraded_after_missed,
           hp.detector = 'phi', hp.phi_min_samples
    INTO tol, off_after, late_after, phi, phi_after FROM warden.health_params hp;
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

        -- Two tries: a first heartbeat of an agent can race another
        -- transaction's first heartbeat of it; the loser finds the agent
        -- registered when its insert comes, and goes through the update
        -- the second time, as any heartbeat of a known agent does.
        FOR try_no IN 1..2 LOOP
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
                    -- A late heartbeat (see warden.heartbeat_late) arrives like
                    -- any other, but what it reports is older than what the
                    -- row holds: kept, and no restart.
                    name                  = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.name ELSE coalesce(h.name, s.name) END,
                    labels                = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.labels ELSE coalesce(h.labels, s.labels) END,
                    mode                  = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.mode ELSE coalesce(h.mode, s.mode) END,
                    status                = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.status ELSE h.status END,
                    expected_interval_ms  = warden.interval_after(CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.expected_interval_ms
                                                                       ELSE h.given_ms END,
                                                                  s.mode, default_ms, emergency_ms,
                                                                  active_ms, idle_ms, sleep_ms),
                    -- Stamped when the flush began, the heartbeat may commit
                    -- after a liveness cycle that judged the agent without it
                    -- (this flush waited on another agent's row): it is then
                    -- seen just after that transition, or it would not count
                    -- as a heartbeat since it until the next one.
                    last_seen             = greatest(r_ts, s.liveness_since + interval '1 microsecond'),
                    last_sent_at          = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.last_sent_at ELSE h.sent_at END,
                    uptime_seconds        = CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.uptime_seconds
                                                 ELSE coalesce(h.uptime, s.uptime_seconds) END,
                    heartbeat_count       = s.heartbeat_count + 1,
                    restart_count         = s.restart_count
                                            + coalesce((h.uptime < s.uptime_seconds AND NOT warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at))::integer, 0),
                    last_restart_at       = CASE WHEN h.uptime < s.uptime_seconds AND NOT warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at)
                                                 THEN r_ts ELSE s.last_restart_at END,
                    uptime_before_restart = CASE WHEN h.uptime < s.uptime_seconds AND NOT warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at)
                                                 THEN s.uptime_seconds ELSE s.uptime_before_restart END,
                    -- On time: before the agent would have been late (missed
                    -- degraded_after_missed intervals past the tolerance). A
                    -- restart starts a new run: beats of the process it
                    -- replaced vouch for nothing (a recovery's verification
                    -- waits for the run, not for one beat of the new process).
                    -- Every heartbeat counts as one; on-time ones extend the run.
                    -- Heartbeats of one batch (under 10 ms apart) count once:
                    -- an agent that comes back with a buffer of them has shown
                    -- one on-time beat, not a run.
                    ontime_streak         = CASE WHEN h.uptime < s.uptime_seconds
                                                      AND NOT warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at)
                                                 THEN 1
                                                 WHEN date_part('epoch', r_ts - s.last_seen) * 1000 < 10
                                                 THEN s.ontime_streak
                                                 WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                                      <= CASE WHEN phi AND s.ia_count >= phi_after
                                                                   AND s.ia_mean_ms BETWEEN s.expected_interval_ms / 2.0
                                                                                        AND s.expected_interval_ms * 2.0
                                                              THEN greatest(s.expected_interval_ms * (late_after + tol),
                                                                            s.ia_mean_ms * (1 + tol))
                                                              ELSE s.expected_interval_ms * (late_after + tol) END
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
                                            * warden.interval_after(CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.expected_interval_ms ELSE h.given_ms END,
                                                                    s.mode, default_ms, emergency_ms, active_ms, idle_ms, sleep_ms)::float8
                                            / s.expected_interval_ms,
                    ia_var_ms2            = CASE WHEN date_part('epoch', r_ts - s.last_seen) * 1000
                                                      BETWEEN 10 AND s.expected_interval_ms * (off_after + tol)
                                                 THEN (1.0::float8 - greatest(1.0::float8 / (s.ia_count + 1), 0.05::float8))
                                                      * (s.ia_var_ms2 + greatest(1.0::float8 / (s.ia_count + 1), 0.05::float8)
                                                         * power(date_part('epoch', r_ts - s.last_seen) * 1000
                                                                 - s.ia_mean_ms, 2))
                                                 ELSE s.ia_var_ms2 END
                                            * power(warden.interval_after(CASE WHEN warden.heartbeat_late(h.uptime, h.sent_at, s.uptime_seconds, s.last_sent_at) THEN s.expected_interval_ms ELSE h.given_ms END,
                                                                          s.mode, default_ms, emergency_ms, active_ms, idle_ms, sleep_ms)::float8
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

            EXIT WHEN got = cardinality(r_agent_id);

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
                -- Registered meanwhile by another transaction: left to the next try.
                ON CONFLICT (agent_id) DO NOTHING
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
            SELECT array_agg(d.i), array_agg(d.fresh), array_agg(d.restart), array_agg(d.expected_interval_ms), count(*)
            INTO done_i, done_fresh, done_restart, done_next, got
            FROM done d;

            RETURN QUERY
            SELECT coalesce(r_ord[d.i], d.i), d.fresh, d.restart, d.next_ms
            FROM unnest(done_i, done_fresh, done_restart, done_next) AS d(i, fresh, restart, next_ms);
            answered := answered + got;

            EXIT WHEN got = cardinality(r_agent_id);

            SELECT array_agg(g.i ORDER BY g.i) INTO missing
            FROM generate_series(1, cardinality(r_agent_id)) AS g(i)
            WHERE g.i NOT IN (SELECT d FROM unnest(done_i) AS d);
            SELECT array_agg(coalesce(r_ord[o], o) ORDER BY n), array_agg(r_agent_id[o] ORDER BY n),
                   array_agg(r_name[o] ORDER BY n), array_agg(r_labels[o] ORDER BY n), array_agg(r_mode[o] ORDER BY n),
                   array_agg(r_status[o] ORDER BY n), array_agg(r_uptime[o] ORDER BY n),
                   array_agg(r_next_ms[o] ORDER BY n), array_agg(r_sent_at[o] ORDER BY n)
            INTO r_ord, r_agent_id, r_name, r_labels, r_mode, r_status, r_uptime, r_next_ms, r_sent_at
            FROM unnest(missing) WITH ORDINALITY AS x(o, n);
        END LOOP;
    END LOOP;

    -- Every heartbeat is an update or an insert within two tries. One
    -- that is neither (a caller whose snapshot predates another
    -- transaction's registration of the agent: REPEATABLE READ) fails the
    -- whole call, to be tried again, rather than let a caller acknowledge
    -- a heartbeat that was not written.
    IF answered <> n THEN
        RAISE EXCEPTION 'ingest_heartbeats wrote % of % heartbeats: another transaction registered an agent at the same moment; try again',
                        answered, n
            USING ERRCODE = 'serialization_failure';
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
