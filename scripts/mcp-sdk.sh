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
WORK=target/mcp-sdk
DB=warden_mcp_sdk_$$
. scripts/scratch-warden.sh

for version in $VERSIONS; do
    venv="target/mcp-sdk-venv-$version"
    if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null)" != "$version" ]; then
        say "installing the MCP Python SDK $version into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==$version"
    fi
done

warden_binary
scratch_database
# Enough for a session's set-up and a few calls, then refusals.
export WARDEN__LIMITS__RATE_PER_SECOND=1 WARDEN__LIMITS__BURST=12
"$WARDEN" migrate >/dev/null
start_warden

status=0
for version in $VERSIONS; do
    say "MCP Python SDK $version against $BASE/mcp"
    # A key per run: each starts with a full bucket.
    key=$("$WARDEN" keys create --name "mcp-sdk-$version" --scope ingest --scope read 2>/dev/null)
    WARDEN_MCP_URL="$BASE/mcp" WARDEN_KEY="$key" MCP_AGENT_ID="sdk-$version" \
        "target/mcp-sdk-venv-$version/bin/python" scripts/mcp_sdk_check.py || status=1
done
warden_log_clean || status=1
exit "$status"
