#!/usr/bin/env bash
# warden's /mcp against the official MCP Python SDK, 1.x and 2.x
# (scripts/mcp_sdk_check.py): initialize, tools/list with output schemas
# (which the SDK then validates results against), the heartbeat and
# agent_status tools, a tool error naming its field, and a session that
# keeps working through the key's rate limit. Exits non-zero on failure.
#
#   scripts/mcp-sdk.sh
#   MCP_SDK_VERSIONS="1.30.0" scripts/mcp-sdk.sh
#   WARDEN_BIN=path/to/warden scripts/mcp-sdk.sh   # another build, unbuilt here
#
# Each SDK version is installed into target/mcp-sdk-venv-VERSION (pip, from
# PyPI). A scratch database on the PostgreSQL at $PGHOST:$PGPORT (default
# 127.0.0.1:5432, user postgres) serves one `warden serve` with a low
# rate limit, and is dropped again.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSIONS=${MCP_SDK_VERSIONS:-"1.30.0 2.3.0"}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
WORK=target/mcp-sdk
DB=warden_mcp_sdk_$$

say() { printf '==> %s\n' "$*" >&2; }

for version in $VERSIONS; do
    venv="target/mcp-sdk-venv-$version"
    if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null)" != "$version" ]; then
        say "installing the MCP Python SDK $version into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==$version"
    fi
done

say "building warden"
[ -n "${WARDEN_BIN:-}" ] || cargo build --quiet --bin warden
WARDEN=${WARDEN_BIN:-target/debug/warden}

mkdir -p "$WORK"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    psql -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" >/dev/null
export WARDEN__DATABASE__URL="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB"
export WARDEN__SERVER__LISTEN="127.0.0.1:$PORT"
# Enough for a session's set-up and a few calls, then refusals.
export WARDEN__LIMITS__RATE_PER_SECOND=1 WARDEN__LIMITS__BURST=12
export WARDEN__TELEMETRY__LEVEL=${WARDEN__TELEMETRY__LEVEL:-warn,tokio_postgres=error}
"$WARDEN" migrate >/dev/null

"$WARDEN" serve >"$WORK/warden.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/warden.log" >&2; exit 1; }
    sleep 0.2
done

status=0
for version in $VERSIONS; do
    say "MCP Python SDK $version against http://127.0.0.1:$PORT/mcp"
    # A key per run: each starts with a full bucket.
    key=$("$WARDEN" keys create --name "mcp-sdk-$version" --scope ingest --scope read 2>/dev/null)
    WARDEN_MCP_URL="http://127.0.0.1:$PORT/mcp" WARDEN_KEY="$key" MCP_AGENT_ID="sdk-$version" \
        "target/mcp-sdk-venv-$version/bin/python" scripts/mcp_sdk_check.py || status=1
done
if grep -E 'panicked|ERROR' "$WORK/warden.log" >&2; then
    say "warden logged errors during the run (above; whole log: $WORK/warden.log)"
    status=1
fi
exit "$status"
