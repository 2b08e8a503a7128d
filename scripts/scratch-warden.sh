# Sourced by the scripts that test a running warden (schemathesis.sh,
# mcp-sdk.sh): a scratch database on the PostgreSQL at $PGHOST:$PGPORT
# (default 127.0.0.1:5432, user postgres) and `warden serve` on a free
# loopback port at $BASE, both gone when the script exits. Set WORK (a
# directory for the log) and DB (the database's name) before sourcing;
# then call scratch_database, set any settings of the run's own, and
# start_warden; warden_log_clean at the end.

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}

say() { printf '==> %s\n' "$*" >&2; }

# The build under test: WARDEN_BIN, or this checkout's, built now.
warden_binary() {
    if [ -n "${WARDEN_BIN:-}" ]; then
        WARDEN=$WARDEN_BIN
    else
        say "building warden"
        cargo build --quiet --bin warden
        WARDEN=target/debug/warden
    fi
}

mkdir -p "$WORK"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    psql -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Creates the database and points warden's settings at it and at $PORT.
scratch_database() {
    say "scratch database $DB on $PGHOST:$PGPORT"
    psql -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" >/dev/null
    export WARDEN__DATABASE__URL="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB"
    export WARDEN__SERVER__LISTEN="127.0.0.1:$PORT"
    export WARDEN__TELEMETRY__LEVEL=${WARDEN__TELEMETRY__LEVEL:-warn,tokio_postgres=error}
}

# Starts `warden serve` in the background and waits until it is ready.
start_warden() {
    say "starting warden on $BASE (log: $WORK/warden.log)"
    "$WARDEN" serve >"$WORK/warden.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 100); do
        curl -fs "$BASE/readyz" >/dev/null 2>&1 && break
        kill -0 "$PID" 2>/dev/null || { cat "$WORK/warden.log" >&2; exit 1; }
        sleep 0.2
    done
    curl -fs "$BASE/readyz" >/dev/null
}

# Fails when warden logged a panic or an error during the run.
warden_log_clean() {
    if grep -E 'panicked|ERROR' "$WORK/warden.log" >&2; then
        say "warden logged errors during the run (above; whole log: $WORK/warden.log)"
        return 1
    fi
}
