-- warden schema, version 15: new partitions are attached, not created in
-- place.
--
-- CREATE TABLE ... PARTITION OF takes an ACCESS EXCLUSIVE lock on the
-- parent: queued behind any long reader of the table (a report, a
-- dashboard, pg_dump), it made every heartbeat wait behind it in turn,
-- once a day per table. Creating the table on its own and then attaching
-- it needs only SHARE UPDATE EXCLUSIVE on the parent, which readers and
-- writers do not conflict with. The new table is empty, so attaching it
-- checks nothing. A lock that cannot be had in 10 s fails the call (the
-- hourly upkeep tries again; partitions are made a week ahead) rather
-- than wait for as long as the statement may run.

CREATE OR REPLACE FUNCTION warden.ensure_partitions(p_from date, p_to date)
RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '10s'
AS $$
DECLARE
    parent  text;
    day     date;
    created integer := 0;
    child   text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('warden.ensure_partitions'));
    FOREACH parent IN ARRAY ARRAY['agent_heartbeats', 'performance_metrics', 'health_history'] LOOP
        day := p_from;
        WHILE day <= p_to LOOP
            child := format('%s_p%s', parent, to_char(day, 'YYYYMMDD'));
            IF to_regclass(format('warden.%I', child)) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE warden.%I (LIKE warden.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                    child, parent);
                EXECUTE format(
                    'ALTER TABLE warden.%I ATTACH PARTITION warden.%I FOR VALUES FROM (%L) TO (%L)',
                    parent, child,
                    (day::timestamp AT TIME ZONE 'UTC'),
                    ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            END IF;
            day := day + 1;
        END LOOP;
    END LOOP;
    RETURN created;
END;
$$;
