#!/usr/bin/env bash
# CPU time per heartbeat written, by PostgreSQL and by warden, during one
# `warden bench ingest` run (group commit only). Throughput on a shared
# 2-core machine can move by a third between runs with the machine's
# speed; the CPU a heartbeat costs moves far less, so compare builds or
# schema changes by it, runs alternated (A B B A).
#
#   scripts/ingest-cpu.sh --batch 100
#   WARDEN=/tmp/warden-old scripts/ingest-cpu.sh --batch 100 --metrics 2
#   SSLMODE=require scripts/ingest-cpu.sh --batch 100
#   AFTER_MIGRATE_SQL=variant.sql scripts/ingest-cpu.sh --batch 100
#
# Arguments go to `warden bench ingest`. Uses (drops and creates) the
# database warden_bench on the PostgreSQL at 127.0.0.1:5432 (user
# postgres); WARDEN is the binary (default: a release build of this
# checkout). PostgreSQL's figure is every process named postgres on the
# machine, so run it on an otherwise idle one with a single cluster.
set -euo pipefail
if [ -n "${WARDEN:-}" ]; then
    WARDEN=$(realpath "$WARDEN")
fi
cd "$(dirname "$0")/.."

DB=warden_bench
PSQL=(psql -h 127.0.0.1 -U postgres -qAt)
if [ -z "${WARDEN:-}" ]; then
    cargo build --release --quiet
    WARDEN=target/release/warden
fi
export PGOPTIONS="-c client_min_messages=warning"
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
# sslmode=disable by default: TLS on loopback would only add its CPU to the
# figures. SSLMODE=require measures what TLS to PostgreSQL costs.
export WARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=${SSLMODE:-disable}"
"$WARDEN" migrate >/dev/null
# A schema variant to compare against (a function's earlier body, say),
# applied on top of the migrations.
if [ -n "${AFTER_MIGRATE_SQL:-}" ]; then
    "${PSQL[@]}" -d "$DB" -v ON_ERROR_STOP=1 -f "$AFTER_MIGRATE_SQL"
fi

output=$(mktemp)
times_file=$(mktemp)
before=$(mktemp)
after=$(mktemp)
trap 'rm -f "$output" "$times_file" "$before" "$after"' EXIT

# One line per postgres process: pid, start time (pid and start time name
# a process; pids are reused), parent pid, its own user+system ticks, and
# those of its children it has reaped.
sample() {
    local stat line rest
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue
        # The command is between the first "(" and the last ")", and may
        # itself hold either.
        rest=${line##*) }
        case ${line#*(} in
            postgres*) ;;
            *) continue ;;
        esac
        # After the command: state is the 1st field, ppid the 2nd, utime,
        # stime, cutime and cstime the 12th to 15th, start time the 20th.
        # shellcheck disable=SC2086
        set -- $rest
        echo "${stat//[^0-9]/} ${20} $2 $((${12} + ${13})) $((${14} + ${15}))"
    done
}

sample >"$before"
# warden's CPU is what the bench and the server it starts used, reaped in
# this subshell by the time `times` reports its children.
rc=0
(
    rc=0
    "$WARDEN" bench ingest --skip-naive "$@" >"$output" 2>&1 || rc=$?
    times >"$times_file"
    exit "$rc"
) || rc=$?
sample >"$after"
grep -v -e '^[[:space:]]*$' -e WARN "$output" || true
if [ "$rc" -ne 0 ]; then
    echo "warden bench ingest failed (exit status $rc)" >&2
    exit "$rc"
fi

rows=$("${PSQL[@]}" -d "$DB" -c "SELECT count(*) FROM warden.agent_heartbeats")
warden_seconds=$(awk 'NR == 2 {
        for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); total += t[1] * 60 + t[2] }
        print total }' "$times_file")
awk -v rows="$rows" -v hz="$(getconf CLK_TCK)" -v warden="$warden_seconds" '
    FNR == NR { base[$1 " " $2] = $4; base_reaped[$1 " " $2] = $5; next }
    { key = $1 " " $2; own[key] = $4; reaped[key] = $5; parent[key] = $3; pid[key] = $1; alive[$1] = 1 }
    END {
        for (key in own) {
            ticks += own[key] - base[key]
            # The postmaster (whose parent is no postgres process): the CPU
            # of the backends that exited during the run, all of it.
            if (!(parent[key] in alive)) ticks += reaped[key] - base_reaped[key]
        }
        if (rows == 0) { print "no heartbeat rows were written"; exit 1 }
        printf "heartbeat rows written: %d\n", rows
        printf "postgres CPU per heartbeat row: %.2f us\n", ticks / hz / rows * 1e6
        printf "warden   CPU per heartbeat row: %.2f us (server and load generator)\n", warden / rows * 1e6
    }' "$before" "$after"
