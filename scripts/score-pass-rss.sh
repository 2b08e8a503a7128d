#!/bin/bash
# Peak RSS (KiB) of `warden serve` up to the end of its first score pass
# over 100,000 agents (BENCHMARKS.md, "Memory"), in a scratch database
# wb_rss on 127.0.0.1:5432 made for the run and dropped after it.
# usage: scripts/score-pass-rss.sh [BINARY] [PORT]
set -u
BIN=${1:-target/release/warden}; PORT=${2:-18400}
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS wb_rss" -c "CREATE DATABASE wb_rss" 2>/dev/null
export WARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/wb_rss?sslmode=disable"
$BIN migrate >/dev/null 2>&1
psql -h 127.0.0.1 -U postgres -d wb_rss -qc "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness, liveness_since, mode) SELECT 'a' || g, 30000, now() - interval '1 hour', now() + interval '1 hour', 'online', now() - interval '1 hour', 'active' FROM generate_series(1,100000) g"
WARDEN__RECOVERY__ENABLED=false WARDEN__ALERTING__ENABLED=false WARDEN__RETENTION__ENABLED=false WARDEN__SERVER__LISTEN=127.0.0.1:$PORT WARDEN__AUTH__ENABLED=false WARDEN__TELEMETRY__LEVEL=debug,tokio_postgres=warn,hyper=warn $BIN serve > "${TMPDIR:-/tmp}/score-pass-rss.log" 2>&1 &
PID=$!
peak=0
for i in $(seq 1 200); do
  sleep 0.2
  r=$(ps -o rss= -p $PID); [ -n "$r" ] && [ "$r" -gt "$peak" ] && peak=$r
  grep -q "score pass" "${TMPDIR:-/tmp}/score-pass-rss.log" && break
done
kill $PID; wait $PID 2>/dev/null
echo "$BIN peak_rss_kib=$peak $(grep -o 'scored: [0-9]*' "${TMPDIR:-/tmp}/score-pass-rss.log")"
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS wb_rss"
