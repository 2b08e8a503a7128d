#!/usr/bin/env bash
# What one call of warden.ingest_heartbeats costs, apart from HTTP and
# warden: pgbench calls it from one connection, each call its own
# transaction (as the writer's are), with SIZES heartbeats of distinct
# known agents (default 1, 31 and 1000), prepared (as the writer's are),
# beside a bare `SELECT 1` (the round trip) and a one-row UPDATE of
# agent_status (the least a write and its commit cost). Prints the mean
# latency of each; 31 is about what one flush holds for 64 connections
# sending single heartbeats.
#
#   scripts/ingest-call-cost.sh
#   SIZES="1 100" SECONDS_EACH=10 scripts/ingest-call-cost.sh
#
# Uses (drops and creates) the database warden_callcost on the PostgreSQL
# at 127.0.0.1:5432 (user postgres), and a release build for the schema
# and the agents.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-1 31 1000}
SECONDS_EACH=${SECONDS_EACH:-8}
DB=warden_callcost
PSQL=(psql -h 127.0.0.1 -U postgres -qAt)
export PGOPTIONS="-c client_min_messages=warning"

cargo build --release --quiet
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
# sslmode=disable: TLS on loopback would only add its CPU to the figures.
export WARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable"
target/release/warden migrate >/dev/null
# 3,000 known agents, registered through the function itself.
"${PSQL[@]}" -d "$DB" -c "
    SELECT count(*) FROM warden.ingest_heartbeats(
        (SELECT array_agg(format('cost-%s', lpad(g::text, 5, '0'))) FROM generate_series(1, 3000) g),
        array_fill(NULL::text, ARRAY[3000]), array_fill(NULL::jsonb, ARRAY[3000]),
        array_fill('active'::text, ARRAY[3000]), array_fill(NULL::text, ARRAY[3000]),
        array_fill(1::bigint, ARRAY[3000]), array_fill(NULL::integer, ARRAY[3000]),
        array_fill(NULL::timestamptz, ARRAY[3000]), '{}', '{}', '{}', '{}')" >/dev/null
"${PSQL[@]}" -d "$DB" -c "VACUUM ANALYZE warden.agent_status"

work=$(mktemp -d)
trap 'rm -rf "$work"; "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT

run() {
    local name=$1 script=$2
    printf '%s\n' "$script" >"$work/script.sql"
    if ! pgbench -n -M prepared -h 127.0.0.1 -U postgres -T "$SECONDS_EACH" -c 1 -f "$work/script.sql" "$DB" \
        >"$work/out" 2>&1; then
        echo "pgbench failed for: $name" >&2
        cat "$work/out" >&2
        exit 1
    fi
    printf '%-34s %s\n' "$name" "$(sed -n 's/^latency average = //p' "$work/out")"
}

run "SELECT 1" "SELECT 1;"
run "UPDATE of one agent_status row" "\\set a random(1, 3000)
UPDATE warden.agent_status SET heartbeat_count = heartbeat_count + 1 WHERE agent_id = format('cost-%s', lpad(:a::text, 5, '0'));"
for n in $SIZES; do
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 3000)); then
        echo "SIZES: $n is not between 1 and 3000 (the agents there are)" >&2
        exit 1
    fi
    # A window of n consecutive agents, sorted as the writer sends them;
    # the uptime rises with every call so no restart is ever detected.
    run "ingest_heartbeats, $n heartbeats" "\\set first random(1, 3000 - $n + 1)
SELECT count(*) FROM warden.ingest_heartbeats(
    (SELECT array_agg(format('cost-%s', lpad(g::text, 5, '0')) ORDER BY g) FROM generate_series(:first, :first + $n - 1) g),
    array_fill(NULL::text, ARRAY[$n]), array_fill(NULL::jsonb, ARRAY[$n]),
    array_fill('active'::text, ARRAY[$n]), array_fill(NULL::text, ARRAY[$n]),
    array_fill(extract(epoch FROM clock_timestamp())::bigint, ARRAY[$n]), array_fill(NULL::integer, ARRAY[$n]),
    array_fill(NULL::timestamptz, ARRAY[$n]), '{}', '{}', '{}', '{}');"
done
