#!/usr/bin/env bash
# What warden's database sessions wait on: samples pg_stat_activity every
# 20 ms for SECONDS (default 60) while something else runs (a soak, a
# benchmark), keeps the samples in a scratch database, and summarises
# them per statement and wait event, then lists the moments an ingest
# call had been running for SLOW_MS (default 20) or more.
#
#   cargo build --release
#   DB=warden_soak scripts/pg-waits.sh 640 &  DURATION=10m scripts/soak.sh
#
# The samples stay in the database warden_waits (table samples) for
# lining up with `warden simulate --slow` and PostgreSQL's log; the next
# run replaces them. Times are UTC, as `warden simulate --slow` prints
# them. Needs the PostgreSQL at 127.0.0.1:5432 (user postgres).
# pg_stat_activity shows other roles' queries only to superusers and
# members of pg_read_all_stats.
#
# The sampler commits 50 times a second; it does so asynchronously into an
# unlogged table, so that it adds no WAL flushes of its own to the
# database's waits it measures.
set -euo pipefail

SECONDS_TO_SAMPLE=${1:-60}
DB=${DB:-warden_soak}
SLOW_MS=${SLOW_MS:-20}
PSQL=(env PGOPTIONS="-c client_min_messages=warning -c synchronous_commit=off -c TimeZone=UTC" psql -h 127.0.0.1 -U postgres -X -q -v ON_ERROR_STOP=1)

if ! [[ "$SECONDS_TO_SAMPLE" =~ ^[0-9]+$ && "$SLOW_MS" =~ ^[0-9]+$ ]] || [ "$SECONDS_TO_SAMPLE" -lt 1 ]; then
    echo "usage: [DB=database] [SLOW_MS=20] $0 [seconds]" >&2
    exit 2
fi

exists=$("${PSQL[@]}" -d postgres -At -v db="$DB" <<'SQL'
SELECT count(*) FROM pg_database WHERE datname = :'db';
SQL
)
if [ "$exists" != 1 ]; then
    echo "no database named $DB (set DB to warden's database)" >&2
    exit 2
fi

"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS warden_waits WITH (FORCE)" -c "CREATE DATABASE warden_waits"
"${PSQL[@]}" -d warden_waits <<'SQL'
CREATE UNLOGGED TABLE samples (
    at timestamptz, pid int, backend_type text, wait_event_type text, wait_event text,
    xact_age interval, query_age interval, query text
);
-- A procedure, so that each sample commits (and pg_stat_activity is read
-- afresh) while the loop goes on.
CREATE PROCEDURE sample(db text, seconds int) LANGUAGE plpgsql AS $$
DECLARE stop timestamptz := clock_timestamp() + seconds * interval '1 second';
BEGIN
    WHILE clock_timestamp() < stop LOOP
        PERFORM pg_stat_clear_snapshot();
        INSERT INTO samples
        SELECT clock_timestamp(), a.pid, a.backend_type, a.wait_event_type, a.wait_event,
               clock_timestamp() - a.xact_start, clock_timestamp() - a.query_start, left(a.query, 200)
        FROM pg_stat_activity a
        WHERE a.pid <> pg_backend_pid()
          AND ((a.datname = db AND a.state = 'active') OR a.backend_type <> 'client backend')
          AND a.wait_event_type IS DISTINCT FROM 'Activity';
        COMMIT;
        PERFORM pg_sleep(0.02);
    END LOOP;
END $$;
SQL

echo "sampling sessions of $DB for ${SECONDS_TO_SAMPLE}s"
# Ctrl-C ends the sampling early; the summaries still print.
trap 'echo " sampling stopped early"' INT
"${PSQL[@]}" -d warden_waits -v db="$DB" -v seconds="$SECONDS_TO_SAMPLE" <<'SQL' || true
CALL sample(:'db', :'seconds');
SQL
trap - INT

"${PSQL[@]}" -d warden_waits -P footer=off -v slow_ms="$SLOW_MS" <<'SQL'
\echo
\echo 'client sessions: samples by statement and wait (CPU = running)'
SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 60) AS statement,
       coalesce(wait_event_type || ': ' || wait_event, 'CPU') AS wait,
       count(*) AS samples
FROM samples WHERE backend_type = 'client backend'
GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 20;
\echo 'seconds in which an ingest call had run' :slow_ms 'ms or more when sampled (UTC; the first 50)'
SELECT to_char(date_trunc('second', at), 'HH24:MI:SS"Z"') AS second, pid,
       count(*) AS samples,
       max(round(extract(epoch FROM query_age) * 1000)) AS longest_ms,
       string_agg(DISTINCT coalesce(wait_event_type || ': ' || wait_event, 'CPU'), ', ') AS waits
FROM samples
WHERE backend_type = 'client backend' AND query LIKE '%ingest_heartbeats%'
  AND query_age >= :'slow_ms'::int * interval '1 millisecond'
GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 50;
SELECT count(DISTINCT date_trunc('second', at)) AS seconds_in_all
FROM samples
WHERE backend_type = 'client backend' AND query LIKE '%ingest_heartbeats%'
  AND query_age >= :'slow_ms'::int * interval '1 millisecond';
SQL
