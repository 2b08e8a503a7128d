#!/usr/bin/env bash
# Property-based API testing of a running warden with schemathesis, against
# the OpenAPI document it serves (GET /openapi.json): no 5xx, every response
# as documented (status, content type, headers, schema), invalid requests
# refused and valid ones accepted. Exits non-zero on any failure.
#
#   scripts/schemathesis.sh                  # 40 examples per operation
#   SCHEMATHESIS_EXAMPLES=200 scripts/schemathesis.sh
#
# It installs schemathesis into target/schemathesis-venv (pip, from PyPI),
# builds warden, creates a scratch database on the PostgreSQL at
# $PGHOST:$PGPORT (default 127.0.0.1:5432, user postgres), starts
# `warden serve` on it with an admin key, seeds a few agents, events,
# incidents, alerts, silences and recoveries so the read endpoints return
# real rows, runs schemathesis, and drops the database again. Reports land
# in target/schemathesis-report/. Extra arguments go to `schemathesis run`.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-40}
SEED=${SCHEMATHESIS_SEED:-20260101}
VENV=target/schemathesis-venv
WORK=target/schemathesis
DB=warden_schemathesis_$$
. scripts/scratch-warden.sh

if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -n 1)" != "$SCHEMATHESIS_VERSION" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

warden_binary
scratch_database

# A strategy whose command does nothing, so recoveries are recorded (a
# strategy of kind "none" is alert only, and refuses manual runs).
cat >"$WORK/settings.toml" <<'EOF'
[[recovery.strategies]]
name = "note"
issues = ["agent_unresponsive", "heartbeat_late"]

[[recovery.strategies.actions]]
kind = "command"
argv = ["/bin/true"]
timeout = "5s"
EOF
export WARDEN_CONFIG="$WORK/settings.toml"
export WARDEN__HEALTH__CHECK_INTERVAL=1s

"$WARDEN" migrate >/dev/null
KEY=$("$WARDEN" keys create --name schemathesis --scope admin 2>/dev/null)

start_warden

say "seeding agents, events, incidents, alerts, a silence and a recovery"
post() {
    curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
        -X POST "$BASE$1" -d "$2"
}
post /v1/heartbeats '{"heartbeats": [
  {"agent_id": "worker-1", "mode": "active"},
  {"agent_id": "seed-1", "name": "Seed one", "mode": "active", "status": "healthy", "uptime_seconds": 100,
   "next_heartbeat_ms": 30000, "metrics": {"cpu_percent": 40, "latency_ms": {"value": 12, "unit": "ms"},
   "tasks": 5, "errors": 0}, "labels": {"role": "worker", "region": "eu"}},
  {"agent_id": "seed-2", "mode": "idle", "status": "degraded", "labels": {"role": "db"}},
  {"agent_id": "seed-gone", "name": "Goes quiet", "next_heartbeat_ms": 100, "labels": {"role": "worker"}}]}'
post /v1/heartbeats '{"agent_id": "seed-1", "uptime_seconds": 3, "metrics": {"cpu_percent": 55}}'
post /v1/events '{"agent_id": "seed-1", "event_type": "task_failed", "severity": "warning",
  "message": "task 7 failed", "details": {"task": 7}}'
post /v1/silences '{"agent_id": "seed-2", "duration": "2h", "comment": "seeded by scripts/schemathesis.sh"}'
sleep 4 # seed-gone goes offline: an incident and its alert
post /v1/agents/seed-gone/recover '{}'
alert=$(curl -fsS -H "Authorization: Bearer $KEY" "$BASE/v1/alerts?limit=1" | python3 -c \
    'import json, sys; a = json.load(sys.stdin)["alerts"]; print(a[0]["id"] if a else "")')
[ -n "$alert" ] && post "/v1/alerts/$alert/ack" '{"comment": "seen"}'

say "schemathesis $SCHEMATHESIS_VERSION: $EXAMPLES examples per operation, seed $SEED"
status=0
"$VENV/bin/schemathesis" --config-file scripts/schemathesis.toml run "$BASE/openapi.json" \
    --header "Authorization: Bearer $KEY" \
    --checks all \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --request-timeout 20 \
    --report junit --report-dir target/schemathesis-report \
    "$@" || status=$?

warden_log_clean || status=1
exit "$status"
