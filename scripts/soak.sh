#!/usr/bin/env bash
# Soak test: AGENTS simulated agents (default 10,000), each heartbeating
# every AGENTS/RATE seconds (default every 10 s), for DURATION (default
# 10m), against a release `warden serve` on a scratch database. Reports the
# warden process's resident memory and the database connections at the
# start and the end, the load generator's figures, and the evaluation cycle
# durations from /metrics.
#
#   scripts/soak.sh                      # the documented run
#   AGENTS=2000 DURATION=1m scripts/soak.sh
#
# Requests that took SLOW (default 100ms) or longer are listed by the
# second they were due in (UTC), to line them up with
# scripts/pg-waits.sh or PostgreSQL's log (if its log_timezone is UTC).
#
# Needs the PostgreSQL at 127.0.0.1:5432 (user postgres) to create and drop
# the database warden_soak.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-10000}
RATE=${RATE:-1000}
DURATION=${DURATION:-10m}
PORT=${PORT:-18080}
DB=warden_soak
PSQL=(psql -h 127.0.0.1 -U postgres -qAt)

cargo build --release --quiet
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
# SOAK_DB_QUERY adds connection parameters, e.g. "&options=-c%20log_lock_waits%3Don".
# sslmode=disable: TLS on loopback would only add its CPU to the figures.
export WARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable${SOAK_DB_QUERY:-}"
export WARDEN__SERVER__LISTEN="127.0.0.1:$PORT"
export WARDEN__TELEMETRY__LEVEL=warn
unset WARDEN_CONFIG

target/release/warden migrate >/dev/null
KEY=$(target/release/warden keys create --name soak --scope ingest 2>/dev/null)
target/release/warden serve &
WARDEN_PID=$!
trap 'kill $WARDEN_PID 2>/dev/null || true; wait $WARDEN_PID 2>/dev/null || true; "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
for _ in $(seq 1 100); do
    curl -sf "localhost:$PORT/readyz" >/dev/null && break
    sleep 0.2
done

rss() { awk '/VmRSS/ {print $2}' "/proc/$WARDEN_PID/status"; }
conns() { "${PSQL[@]}" -c "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB'"; }
queue() { curl -s "localhost:$PORT/metrics" | awk '/^warden_ingest_queue_depth / {print $2}'; }
cycles() {
    curl -s "localhost:$PORT/metrics" | awk '
        /^warden_evaluation_cycle_seconds_sum\{kind="liveness"\}/ {s=$2}
        /^warden_evaluation_cycle_seconds_count\{kind="liveness"\}/ {c=$2}
        /^warden_evaluation_cycle_seconds_bucket\{kind="liveness",le="0.1"\}/ {b=$2}
        END {if (c > 0) printf "%d liveness cycles, mean %.1f ms, %.1f%% under 100 ms\n", c, 1000*s/c, 100*b/c}'
}

# Warm up: every agent registers before measuring.
target/release/warden simulate --url "http://127.0.0.1:$PORT" --key "$KEY" \
    --agents "$AGENTS" --rate "$RATE" --connections 32 --duration 15s >/dev/null
echo "start: rss $(rss) KiB, database connections $(conns), $(cycles)"
# One line a minute while the load runs, to show memory and connections
# staying flat rather than just two end points.
(
    while sleep 60; do
        echo "  $(date -u +%T): rss $(rss) KiB, database connections $(conns), queue $(queue), $(cycles)"
    done
) &
SAMPLER=$!
target/release/warden simulate --url "http://127.0.0.1:$PORT" --key "$KEY" \
    --agents "$AGENTS" --rate "$RATE" --connections 32 --duration "$DURATION" --slow "${SLOW:-100ms}"
kill $SAMPLER 2>/dev/null || true
echo "end:   rss $(rss) KiB, database connections $(conns), $(cycles)"
"${PSQL[@]}" -d "$DB" -c "SELECT 'agents by liveness: ' || string_agg(liveness || '=' || n, ' ') FROM (SELECT liveness, count(*) n FROM warden.agent_status GROUP BY 1 ORDER BY 1) x"
"${PSQL[@]}" -d "$DB" -c "SELECT 'heartbeats stored: ' || count(*) FROM warden.agent_heartbeats"
"${PSQL[@]}" -d "$DB" -c "VACUUM ANALYZE warden.agent_heartbeats" -c "
  SELECT 'storage: ' || pg_size_pretty(sum(pg_total_relation_size(i.inhrelid))::bigint) || ' for '
         || (SELECT count(*) FROM warden.agent_heartbeats) || ' heartbeats, '
         || round(sum(pg_total_relation_size(i.inhrelid)) / greatest((SELECT count(*) FROM warden.agent_heartbeats), 1))
         || ' bytes each with indexes'
  FROM pg_inherits i WHERE i.inhparent = 'warden.agent_heartbeats'::regclass"
